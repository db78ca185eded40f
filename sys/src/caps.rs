//! Process capabilities: at start-up, before the runtime spawns any thread (capabilities are
//! per thread and threads inherit them), the agent keeps only the capabilities its paths use and
//! drops every other one from its bounding, permitted, effective and inheritable sets, so a
//! compromised agent cannot mount, load modules, reconfigure the network or become another user.
//! capget, capset and the bounding-set prctls are the `caps` crate's; this module keeps the
//! agent's list and its one rule (keep these, drop the rest, then no new privileges).

use caps::{CapSet, Capability, CapsHashSet};
use nix::errno::Errno;

/// `CAP_DAC_OVERRIDE`: open sockets, cgroup files and state files whoever made their directory.
pub const CAP_DAC_OVERRIDE: u32 = 1;
/// `CAP_DAC_READ_SEARCH`: walk directories (cgroups, /proc) owned by other users.
pub const CAP_DAC_READ_SEARCH: u32 = 2;
/// `CAP_FOWNER`: chmod the sockets in a runtime directory another user made.
pub const CAP_FOWNER: u32 = 3;
/// `CAP_NET_BIND_SERVICE`: kept only when a configured listener uses a port below 1024.
pub const CAP_NET_BIND_SERVICE: u32 = 10;
/// `CAP_SETPCAP`: needed to shrink the bounding set itself (dropped last).
pub const CAP_SETPCAP: u32 = 8;
/// `CAP_IPC_LOCK`: hugetlb memfd backing.
pub const CAP_IPC_LOCK: u32 = 14;
/// `CAP_SYS_PTRACE`: pidfd_getfd and /proc/PID/fdinfo of VMMs after a restart.
pub const CAP_SYS_PTRACE: u32 = 19;
/// `CAP_SYS_ADMIN`: never needed after start; named for tests and logs.
pub const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_SYS_NICE`: mbind with MPOL_MF_MOVE_ALL and move_pages on pages VMMs share.
pub const CAP_SYS_NICE: u32 = 23;
/// `CAP_SYS_RESOURCE`: raise RLIMIT_NOFILE for many regions.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// `CAP_CHECKPOINT_RESTORE` (5.9+): open a VMM's memfd through /proc/PID/map_files when the VMM
/// maps it but holds no fd for it (AttachProcess, and taking it back after a restart).
pub const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// What the agent keeps after start-up.
pub const KEEP: &[u32] = &[
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_FOWNER,
    CAP_IPC_LOCK,
    CAP_SYS_PTRACE,
    CAP_SYS_NICE,
    CAP_SYS_RESOURCE,
    CAP_CHECKPOINT_RESTORE,
];

/// The effective, permitted and inheritable sets, as bit masks (bit N = capability N).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
}

impl CapSets {
    /// Whether `cap` is in the effective set.
    pub fn has(&self, cap: u32) -> bool {
        cap < 64 && self.effective & (1u64 << cap) != 0
    }
}

/// The `caps` crate's errors carry text, not the errno: the errno its failed call left.
fn errno(_: caps::errors::CapsError) -> Errno {
    match Errno::last() {
        Errno::UnknownErrno => Errno::EPERM,
        e => e,
    }
}

fn mask(set: &CapsHashSet) -> u64 {
    set.iter()
        .map(|c| c.index())
        .filter(|i| *i < 64)
        .fold(0, |m, i| m | (1u64 << i))
}

fn capability(index: u32) -> Option<Capability> {
    caps::all()
        .into_iter()
        .find(|c| u32::from(c.index()) == index)
}

/// This thread's capability sets.
pub fn current() -> Result<CapSets, Errno> {
    let read = |set| caps::read(None, set).map(|s| mask(&s)).map_err(errno);
    Ok(CapSets {
        effective: read(CapSet::Effective)?,
        permitted: read(CapSet::Permitted)?,
        inheritable: read(CapSet::Inheritable)?,
    })
}

/// What [`drop_all_but`] did.
#[derive(Clone, Debug, Default)]
pub struct Dropped {
    /// Capabilities removed from the bounding set.
    pub bounding: Vec<u32>,
    /// The sets afterwards.
    pub after: CapSets,
}

/// Keeps only `keep` in every set of this thread: the bounding set (with CAP_SETPCAP; without
/// it, the bounding set is left as it is), then permitted, effective and inheritable. Then sets
/// no_new_privs, so nothing this process execs gains privileges. Call it before any other thread
/// starts.
pub fn drop_all_but(keep: &[u32]) -> Result<Dropped, Errno> {
    let keep: CapsHashSet = keep.iter().filter_map(|c| capability(*c)).collect();
    let mut out = Dropped::default();
    if current()?.has(CAP_SETPCAP) {
        let supported = caps::runtime::procfs_all_supported(None).unwrap_or_else(|_| caps::all());
        let mut bounding: Vec<Capability> = supported
            .into_iter()
            .filter(|c| !keep.contains(c))
            .filter(|c| caps::has_cap(None, CapSet::Bounding, *c).unwrap_or(false))
            .collect();
        bounding.sort_by_key(|c| c.index());
        for c in bounding {
            caps::drop(None, CapSet::Bounding, c).map_err(errno)?;
            out.bounding.push(u32::from(c.index()));
        }
    }
    // Effective first: it must stay within permitted at every step.
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        let now = caps::read(None, set).map_err(errno)?;
        let kept: CapsHashSet = now.intersection(&keep).copied().collect();
        caps::set(None, set, &kept).map_err(errno)?;
    }
    nix::sys::prctl::set_no_new_privs()?;
    out.after = current()?;
    Ok(out)
}
