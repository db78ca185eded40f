//! [`Syscalls`] over a real file: the agent's mapping reads the policy, a fresh mapping sets it
//! (see [`bind_file_range`]), and the page cache (or a probe through the mapping) tells which
//! pages are allocated. Migrate and the populate proof read each page's node by read-faulting
//! allocated runs into a mapping and asking move_pages ([`map_resident`], [`nodes_of`]).

use super::{Moved, Syscalls};
use crate::domain::{NodeSet, Policy, PolicyMode};
use crate::kernel::{self, Mapping, mempolicy};
use nix::errno::Errno;
use std::os::fd::BorrowedFd;

const ENOENT: i32 = -2;

/// A region's file as the engine sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RealFile<'a> {
    /// The file.
    pub fd: BorrowedFd<'a>,
    /// A shared mapping of the whole file, where it can be mapped.
    pub mapping: Option<&'a Mapping>,
    /// The file's page size.
    pub page: u64,
}

impl Syscalls for RealFile<'_> {
    fn policy_at(&self, offset: u64) -> Option<Policy> {
        self.mapping?.policy_at(offset).ok().flatten()
    }

    fn bind(&self, offset: u64, length: u64, policy: &Policy) -> Result<(), Errno> {
        let window = Mapping::window(self.fd, offset, length)?;
        bind_file_range(&window, offset, length, policy, 0)
    }

    /// Every range is bound in order of offset through one fresh mapping of the whole file (one
    /// mmap for the region instead of one window per range; a restart binds 16,000 ranges). That
    /// is as exact as a window per range (see [`bind_file_range`]), because on a fresh mapping:
    /// - the range's part of the mapping has no policy of its own yet, so mbind never skips it;
    /// - mbind can merge the range only with a neighbour of equal policy: a lower range this call
    ///   just bound to that same policy (re-set to it, atomically), never the unbound rest above,
    ///   whose policy is none. A DEFAULT range is the exception: its bind ends on none, which
    ///   would merge with the unbound rest and clear the file's policy there until those ranges
    ///   are bound, so it gets a window of its own.
    ///
    /// Where the whole file cannot be mapped, each range falls back to a window of its own.
    fn bind_each(&self, ranges: &[(u64, u64, Policy)]) -> Vec<Result<(), Errno>> {
        let end = ranges.iter().map(|r| r.0 + r.1).max().unwrap_or(0);
        let size = self.mapping.map_or(end, |m| m.len().max(end));
        let binder = Mapping::new(self.fd, size).ok();
        ranges
            .iter()
            .map(|(offset, length, policy)| match &binder {
                Some(b) if policy.mode != PolicyMode::Default => {
                    bind_file_range(b, *offset, *length, policy, 0)
                }
                _ => self.bind(*offset, *length, policy),
            })
            .collect()
    }

    fn bind_moving(&self, offset: u64, length: u64, policy: &Policy) -> Result<Moved, Errno> {
        let window = Mapping::window(self.fd, offset, length)?;
        // mbind moves only pages mapped in this process: map the resident ones first.
        let before = map_resident(self.fd, &window, offset, length, self.page);
        let mut flags = mempolicy::MPOL_MF_MOVE;
        if kernel::pidfd::have_cap_sys_nice() {
            // Pages the VMM also maps are shared; MOVE alone skips them.
            flags |= mempolicy::MPOL_MF_MOVE_ALL;
        } else if let Some(m) = self.mapping {
            // Without MOVE_ALL, a page GetPlacement keeps mapped in the long-lived mapping
            // (its census) would count as shared and stay where it is: unmap it there first.
            let _ = m.unmap_pages(offset, length);
        }
        let bound = bind_file_range(&window, offset, length, policy, flags);
        let after = nodes_of(&window, offset, length, self.page);
        let _ = window.unmap_pages(offset, length);
        bound?;
        let mut done = Moved::default();
        for (b, a) in before.iter().zip(after.iter()) {
            if *b < 0 {
                continue;
            }
            match policy.allows(*a as u32) {
                Some(false) => done.failed += 1,
                _ if a != b => done.moved += 1,
                _ => {}
            }
        }
        Ok(done)
    }

    fn allocated_pages(&self, offset: u64, length: u64) -> Result<u64, Errno> {
        let map = match self.mapping {
            Some(m) => kernel::residency::allocated(self.fd, m.len(), offset, length, self.page)?,
            None => kernel::files::allocated_map(self.fd, offset, length, self.page)?,
        };
        Ok(map.iter().filter(|b| **b).count() as u64)
    }

    fn set_task_policy(&self, policy: &Policy) -> Result<(), Errno> {
        mempolicy::set_thread_policy(policy)
    }

    fn allocate(&self, offset: u64, length: u64) -> Result<(), Errno> {
        kernel::fallocate(self.fd, offset, length, false)
    }
}

/// Binds a file range's shared policy through `binder`, a fresh mapping (never the agent's
/// long-lived mapping):
/// - the kernel skips mbind on a VMA whose own policy already equals the new one, so re-binding
///   through the long-lived mapping would leave in place a policy someone changed through another
///   mapping;
/// - when mbind merges a VMA with an equal-policy neighbour it sets the policy over the merged
///   span, so a window wider than the range could overwrite its neighbours' policies;
/// - a fresh VMA has no policy, which equals DEFAULT, so DEFAULT goes through LOCAL first.
///
/// The long-lived mapping also stays one VMA however many ranges there are.
fn bind_file_range(
    binder: &Mapping,
    offset: u64,
    length: u64,
    policy: &Policy,
    flags: u32,
) -> Result<(), Errno> {
    if policy.mode == PolicyMode::Default {
        binder.mbind(
            offset,
            length,
            &Policy::new(PolicyMode::Local, NodeSet::new()),
            0,
        )?;
    }
    binder.mbind(offset, length, policy, flags)
}

/// Read-faults the allocated pages of a span into `mapping` and returns each page's node, -ENOENT
/// for a page not allocated, or another negative errno where the kernel could not tell. Pages not
/// allocated are never touched, so nothing is allocated.
fn map_resident(
    fd: BorrowedFd<'_>,
    mapping: &Mapping,
    offset: u64,
    length: u64,
    page: u64,
) -> Vec<i32> {
    let pages = (length / page) as usize;
    let resident = match kernel::residency::allocated(fd, mapping.len(), offset, length, page) {
        Ok(r) => r,
        Err(e) => return vec![-(e as i32); pages],
    };
    let mut nodes = vec![ENOENT; pages];
    let mut i = 0;
    while i < resident.len() {
        if !resident[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < resident.len() && resident[i] {
            i += 1;
        }
        let (at, len) = (offset + start as u64 * page, (i - start) as u64 * page);
        // A page punched between the allocation check and here would be allocated by this read
        // fault; that race needs a concurrent hole punch and costs one zero page.
        nodes[start..i].copy_from_slice(&fault_and_query(mapping, at, len, page));
    }
    nodes
}

/// Read-faults a run of allocated pages into `mapping` and returns each page's node. When the
/// fault fails, the pages' nodes are unknown (the errno), never "not present": they are
/// allocated, only not mapped here.
pub(crate) fn fault_and_query(mapping: &Mapping, offset: u64, length: u64, page: u64) -> Vec<i32> {
    match mapping.populate_read(offset, length) {
        Ok(()) => nodes_of(mapping, offset, length, page),
        Err(e) => vec![-(e as i32); (length / page) as usize],
    }
}

/// Each page's node as mapped in this process now (-ENOENT where not mapped here).
pub(crate) fn nodes_of(mapping: &Mapping, offset: u64, length: u64, page: u64) -> Vec<i32> {
    mapping
        .page_nodes(offset, length, page)
        .unwrap_or_else(|e| vec![-(e as i32); (length / page) as usize])
}
