//! The agent's engine: it owns the live regions (fd, mapping, intent), turns requests into durable
//! intent first and kernel changes second, reads back what the kernel holds, and brings regions
//! back after a restart. Kernel work runs on tokio's blocking pool (`Agent::blocking`).
//!
//! One file per job:
//! - `agent`: the [`Agent`], its maps, events, commits and the blocking-thread helper;
//! - `handles`: the narrow handles a job takes from the agent (regions, journal = store and
//!   events, VMs);
//! - `error`: [`AgentError`] and its one status code ([`AgentError::code`]);
//! - `live`: what the agent holds of a region, and the views read from the kernel;
//! - `regions`: create, get, list, delete, and the handoff's holder record;
//! - `idempotency`: the one request record of a keyed mutation, encoded from its outcome;
//! - `policy`: SetPolicy (check, commit, bind, read back);
//! - `reconcile`: Reconcile (sample, report drift, re-bind);
//! - `syscalls`: the one kernel interface ([`syscalls::Syscalls`]): bind, read-back, residency
//!   and allocation under a task policy, on a real file or the fake kernel, with the contract
//!   suite that runs every case on both;
//! - `plan`: the pure decisions (reconcile, recovery, migrate) over that trait;
//! - `apply`: SetPolicy's, create's, recovery's binds over that trait;
//! - `adopt`, `attach`: files a VMM made or holds become regions (`qemu`: which file is which of
//!   QEMU's memory backends);
//! - `populate` (its worker threads in `workers`, its cgroup helper child in `cgroup`):
//!   allocating pages where the policy says;
//! - `placement`: where pages are; `recover`: bringing regions back after a restart;
//! - `holders`: a holder's exit (pidfd), and giving back the memory nobody holds any more.

mod agent;
mod apply;
mod attach;
mod error;
mod handles;
mod holders;
mod idempotency;
mod live;
mod placement;
mod plan;
mod policy;
mod populate;
mod reconcile;
mod recover;
mod regions;
mod start;
mod syscalls;

pub use agent::{
    AGENT_ACTOR, Agent, AgentCounters, DEFAULT_KEEP_AFTER_HOLDER_EXIT_SECS,
    DEFAULT_PLACEMENT_MAP_MAX_BYTES, EngineSettings,
};
pub use error::{AgentError, ErrorCode};
pub use idempotency::{EncodeAnswer, Idempotency};
pub use live::{RangeState, RangeView, RegionView};
pub use placement::{NodeCount, Placement, RangePlacementView};
pub use policy::{SetPolicyOutcome, SetPolicyRequest};
pub use populate::cgroup::child_main as populate_child_main;
pub use populate::{PopulateOutcome, PopulateProgress, PopulateRequest};
pub use reconcile::ReconcileReport;
pub use regions::CreateRequest;

pub(crate) use agent::new_uid;
pub(crate) use error::kerr;
pub(crate) use live::{LiveRegion, RegionFile};
