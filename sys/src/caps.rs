//! Process capabilities: at start-up, before the runtime spawns any thread (capabilities are
//! per thread and threads inherit them), the agent keeps only the capabilities its paths use and
//! drops every other one from its bounding, permitted, effective and inheritable sets, so a
//! compromised agent cannot mount, load modules, reconfigure the network or become another user.

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

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The process's capability sets as 64-bit masks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    /// Effective.
    pub effective: u64,
    /// Permitted.
    pub permitted: u64,
    /// Inheritable.
    pub inheritable: u64,
}

impl CapSets {
    /// Whether `cap` is effective.
    pub fn has(&self, cap: u32) -> bool {
        cap < 64 && self.effective & (1u64 << cap) != 0
    }
}

/// Reads this process's capability sets.
pub fn current() -> Result<CapSets, Errno> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData structs (the v3 layout) into `data`, which is exactly that
    // size, and reads the header we own.
    super::check(unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        )
    })?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(CapSets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

fn set(sets: CapSets) -> Result<(), Errno> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let split = |m: u64| (m as u32, (m >> 32) as u32);
    let (e0, e1) = split(sets.effective);
    let (p0, p1) = split(sets.permitted);
    let (i0, i1) = split(sets.inheritable);
    let data = [
        CapData {
            effective: e0,
            permitted: p0,
            inheritable: i0,
        },
        CapData {
            effective: e1,
            permitted: p1,
            inheritable: i1,
        },
    ];
    // SAFETY: capset reads the header and two CapData structs (the v3 layout) that we own.
    super::check(unsafe {
        libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr())
    })
    .map(|_| ())
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// What [`drop_all_but`] did.
#[derive(Clone, Debug, Default)]
pub struct Dropped {
    /// Capabilities removed from the bounding set.
    pub bounding: Vec<u32>,
    /// The sets after the drop.
    pub after: CapSets,
}

/// Drops every capability not in `keep` from the bounding set, then from the permitted,
/// effective and inheritable sets, and sets no_new_privs so no exec can regain them. Without
/// CAP_SETPCAP (not root) the bounding set cannot shrink; the other sets still do.
pub fn drop_all_but(keep: &[u32]) -> Result<Dropped, Errno> {
    let keep_mask = keep
        .iter()
        .filter(|c| **c < 64)
        .fold(0u64, |m, c| m | (1u64 << c));
    let mut out = Dropped::default();
    let have_setpcap = current()?.has(CAP_SETPCAP);
    for cap in 0..=last_cap().min(63) {
        if keep_mask & (1u64 << cap) != 0 || !have_setpcap {
            continue;
        }
        // SAFETY: PR_CAPBSET_READ/PR_CAPBSET_DROP take plain integers and touch no memory.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if present == 1 {
            // SAFETY: as above.
            super::check(unsafe {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0)
            } as libc::c_long)?;
            out.bounding.push(cap);
        }
    }
    let now = current()?;
    set(CapSets {
        effective: now.effective & keep_mask,
        permitted: now.permitted & keep_mask,
        inheritable: now.inheritable & keep_mask,
    })?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers and touches no memory.
    super::check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long)?;
    out.after = current()?;
    Ok(out)
}
