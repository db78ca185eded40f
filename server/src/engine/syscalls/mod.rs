//! The engine's one kernel interface: every call the engine makes on a region's file goes
//! through [`Syscalls`], built in one place ([`RealFile`], over `memplace-sys`). The planner
//! (`engine/plan.rs`) and the binds of SetPolicy, create, recovery and attach
//! (`engine/apply.rs`) are written against the trait, so the same code runs on the fake kernel
//! (`fake.rs`, unit tests) and the real one; `contract.rs` runs each case on both and fails where
//! they differ.
//!
//! Imports go one way: the engine's jobs → `plan`/`apply` → `syscalls` → `memplace-sys`.

use crate::domain::Policy;
use nix::errno::Errno;

#[cfg(test)]
pub(crate) mod contract;
#[cfg(test)]
pub(crate) mod fake;
mod real;

#[cfg(test)]
pub(crate) use real::fault_and_query;
pub(crate) use real::{RealFile, nodes_of};

/// What a bind that moves pages did: pages that moved to a node the policy allows, and pages
/// still on a node it does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Pages now on another node, one the policy allows.
    pub moved: u64,
    /// Pages left on a node the policy does not allow.
    pub failed: u64,
}

/// The kernel calls the engine makes over one region's file.
pub trait Syscalls {
    /// Read-back: the file's shared policy at `offset` as the kernel reports it; `None` when
    /// unreadable.
    fn policy_at(&self, offset: u64) -> Option<Policy>;
    /// Binds `[offset, offset+length)` of the file to `policy`, replacing whatever any mapping
    /// set there before, without touching its neighbours.
    fn bind(&self, offset: u64, length: u64, policy: &Policy) -> Result<(), Errno>;
    /// Binds each range in order, with the same outcome per range as [`Syscalls::bind`]; the
    /// real file does it through one mapping (a restart binds thousands of ranges).
    fn bind_each(&self, ranges: &[(u64, u64, Policy)]) -> Vec<Result<(), Errno>> {
        ranges
            .iter()
            .map(|(offset, length, policy)| self.bind(*offset, *length, policy))
            .collect()
    }
    /// Binds like [`Syscalls::bind`] and moves the range's allocated pages to nodes `policy`
    /// allows (SetPolicy with migrate).
    fn bind_moving(&self, offset: u64, length: u64, policy: &Policy) -> Result<Moved, Errno>;
    /// Residency: pages of `[offset, offset+length)` allocated in the file. An error when the
    /// kernel cannot tell, never 0.
    fn allocated_pages(&self, offset: u64, length: u64) -> Result<u64, Errno>;
    /// Sets the calling thread's policy, under which [`Syscalls::allocate`] then allocates
    /// (populate where the kernel keeps no shared policy for the file).
    fn set_task_policy(&self, policy: &Policy) -> Result<(), Errno>;
    /// Allocates `[offset, offset+length)` (fallocate, KEEP_SIZE) under the file's policy or the
    /// calling thread's.
    fn allocate(&self, offset: u64, length: u64) -> Result<(), Errno>;
}
