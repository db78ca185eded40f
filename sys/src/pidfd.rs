//! Taking an fd back from another process after an agent restart: find candidates by inode in
//! /proc/PID/fdinfo, check the process is still the one recorded, pidfd_getfd, and confirm the
//! copy is the file by (st_dev, st_ino).

use super::check;
use nix::errno::Errno;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Field 22 of /proc/PID/stat: the process start time in clock ticks since boot. Together with the
/// pid it identifies a process across pid reuse.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // `rest` starts at field 3, so field 22 is index 19.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The fd numbers in `pid` whose file has inode `ino`, from /proc/PID/fdinfo, which CAP_SYS_PTRACE
/// can read even where /proc/PID/fd is closed to the agent (another uid without
/// CAP_DAC_READ_SEARCH). Candidates are confirmed by (st_dev, st_ino) on the fd taken.
pub fn find_fds(pid: i32, file_id: (u64, u64)) -> Vec<i32> {
    let mut out: Vec<i32> = open_inodes(pid)
        .into_iter()
        .filter(|&(_, ino)| ino == file_id.1)
        .map(|(n, _)| n)
        .collect();
    out.sort_unstable();
    out
}

/// Every (fd number, inode) of `pid`, from /proc/PID/fdinfo.
fn open_inodes(pid: i32) -> Vec<(i32, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let n: i32 = e.file_name().to_str()?.parse().ok()?;
            let info = std::fs::read_to_string(e.path()).ok()?;
            let ino: u64 = info
                .lines()
                .find_map(|l| l.strip_prefix("ino:"))?
                .trim()
                .parse()
                .ok()?;
            Some((n, ino))
        })
        .collect()
}

/// Which other processes have which inodes open, from one pass over /proc/*/fdinfo. For when a
/// recorded holder is gone but the memory may not be: a second VMM acquired the file later, or
/// the VMM passed its fd on. A restart that looks for several files reads /proc once.
#[derive(Debug, Default)]
pub struct OpenFiles {
    /// inode -> (pid, fd number).
    by_ino: HashMap<u64, Vec<(i32, i32)>>,
}

impl OpenFiles {
    /// Reads every process's fd table but this one's.
    pub fn scan() -> Self {
        let me = std::process::id() as i32;
        let mut by_ino: HashMap<u64, Vec<(i32, i32)>> = HashMap::new();
        let pids = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != me);
        for pid in pids {
            for (n, ino) in open_inodes(pid) {
                by_ino.entry(ino).or_default().push((pid, n));
            }
        }
        Self { by_ino }
    }

    /// The processes seen holding the file (dev, ino) open, each with its start time; the inode
    /// seen in fdinfo is confirmed by the device of /proc/PID/fd/N. Processes that exited since
    /// the scan are left out.
    pub fn holders(&self, file_id: (u64, u64)) -> Vec<(i32, u64)> {
        use std::os::unix::fs::MetadataExt;
        let mut out: Vec<(i32, u64)> = self
            .by_ino
            .get(&file_id.1)
            .into_iter()
            .flatten()
            .filter(|&&(pid, n)| {
                std::fs::metadata(format!("/proc/{pid}/fd/{n}"))
                    .is_ok_and(|m| (m.dev(), m.ino()) == file_id)
            })
            .filter_map(|&(pid, _)| Some((pid, start_time(pid)?)))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Takes a copy of the file (dev, ino) from a process seen holding it, if one still does.
    /// Returns that process (pid, start time) and the fd.
    pub fn take(&self, file_id: (u64, u64)) -> Option<(i32, u64, OwnedFd)> {
        self.by_ino.get(&file_id.1)?.iter().find_map(|&(pid, n)| {
            let start = start_time(pid)?;
            let pidfd = verified_pidfd(pid, start)?;
            getfd_of_file(&pidfd, n, file_id).map(|fd| (pid, start, fd))
        })
    }
}

/// The fd tables of recorded holders, each read once: a restart that takes many files back from
/// one VMM reads its /proc/PID/fdinfo once, not once per file (1,000 regions held by one process
/// were a million fdinfo reads).
#[derive(Debug, Default)]
pub struct HolderFds {
    /// pid -> inode -> fd numbers.
    by_pid: HashMap<i32, HashMap<u64, Vec<i32>>>,
    /// (pid, start time) -> a pidfd for that process, opened once (`None`: it is gone).
    pidfds: HashMap<(i32, u64), Option<OwnedFd>>,
}

impl HolderFds {
    /// [`take_file`], looking the fd up in `pid`'s table as read the first time. A miss reads the
    /// table again, in case the holder opened the file since.
    pub fn take(&mut self, pid: i32, start: u64, file_id: (u64, u64)) -> Result<OwnedFd, Errno> {
        let table = self.by_pid.entry(pid).or_insert_with(|| {
            let mut t: HashMap<u64, Vec<i32>> = HashMap::new();
            for (n, ino) in open_inodes(pid) {
                t.entry(ino).or_default().push(n);
            }
            t
        });
        let candidates = table.get(&file_id.1).map_or(&[][..], Vec::as_slice);
        let pidfd = self
            .pidfds
            .entry((pid, start))
            .or_insert_with(|| verified_pidfd(pid, start));
        if let Some(pidfd) = pidfd
            && let Some(fd) = candidates
                .iter()
                .find_map(|&n| getfd_of_file(pidfd, n, file_id))
        {
            return Ok(fd);
        }
        take_file(pid, start, file_id)
    }
}

/// A pidfd for `pid` if it still is the process that started at `start`. The start time is
/// checked again after opening, so the pidfd refers to that process; it stays valid for that
/// process only, whatever later reuses the pid.
fn verified_pidfd(pid: i32, start: u64) -> Option<OwnedFd> {
    if start_time(pid) != Some(start) {
        return None;
    }
    let pidfd = open(pid).ok()?;
    (start_time(pid) == Some(start)).then_some(pidfd)
}

/// A copy of fd `n` of the process behind `pidfd` if it is the file `file_id`.
fn getfd_of_file(pidfd: &OwnedFd, n: i32, file_id: (u64, u64)) -> Option<OwnedFd> {
    let fd = getfd(pidfd, n).ok()?;
    let st = nix::sys::stat::fstat(&fd).ok()?;
    ((st.st_dev, st.st_ino) == file_id).then_some(fd)
}

/// A pidfd for `pid`.
pub fn open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open has no memory-safety preconditions.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until the process behind `pidfd` has exited (a pidfd polls readable then), through
/// tokio's reactor, so a watch costs no thread. Must run inside a tokio runtime.
#[cfg(feature = "tokio")]
pub async fn wait_for_exit(pidfd: OwnedFd) -> std::io::Result<()> {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and refers to the same
    // pidfd for the AsyncFd's whole life, and OwnedFd::as_raw_fd always returns it.
    let afd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let _ready = afd.readable().await?;
    Ok(())
}

/// A duplicate of `target_fd` of the process behind `pidfd` (needs PTRACE_MODE_ATTACH_REALCREDS).
pub fn getfd(pidfd: &OwnedFd, target_fd: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_getfd has no memory-safety preconditions.
    let fd =
        check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) })?;
    // SAFETY: pidfd_getfd returned a new descriptor (CLOEXEC) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Takes a copy of the file (dev, ino) from process `pid` if it still is the process that started
/// at `start`. The pidfd is opened before the start time is checked again, so the check covers the
/// process the pidfd refers to.
pub fn take_file(pid: i32, start: u64, file_id: (u64, u64)) -> Result<OwnedFd, Errno> {
    take_file_among(pid, start, file_id, &find_fds(pid, file_id))
}

/// [`take_file`] trying only the fd numbers in `candidates`.
fn take_file_among(
    pid: i32,
    start: u64,
    file_id: (u64, u64),
    candidates: &[i32],
) -> Result<OwnedFd, Errno> {
    if start_time(pid) != Some(start) {
        return Err(Errno::ESRCH);
    }
    let pidfd = open(pid)?;
    if start_time(pid) != Some(start) {
        return Err(Errno::ESRCH);
    }
    candidates
        .iter()
        .find_map(|&n| getfd_of_file(&pidfd, n, file_id))
        // A holder that maps the file without an fd (an attached VMM that closed its memfd).
        .or_else(|| open_mapped(pid, start, file_id))
        .ok_or(Errno::ENOENT)
}

/// Whether this process has CAP_SYS_PTRACE in its effective set (needed for pidfd_getfd on
/// another uid's process).
pub fn have_cap_sys_ptrace() -> bool {
    has_effective_cap(19)
}

/// Whether this process has CAP_SYS_NICE (needed for MPOL_MF_MOVE_ALL).
pub fn have_cap_sys_nice() -> bool {
    has_effective_cap(23)
}

fn has_effective_cap(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << bit) != 0)
}
/// Opens the file (dev, ino) through /proc/PID/map_files when process `pid`, still the one that
/// started at `start`, maps it but may hold no fd for it (a VMM that closed its memfd after
/// mmap). The copy is confirmed by (st_dev, st_ino).
pub fn open_mapped(pid: i32, start: u64, file_id: (u64, u64)) -> Option<OwnedFd> {
    if start_time(pid) != Some(start) {
        return None;
    }
    let fd = super::maps::memory_mappings(pid)
        .ok()?
        .into_iter()
        .filter(|m| m.shared && m.ino == file_id.1)
        .find_map(|m| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{pid}/map_files/{}", m.range))
                .ok()?;
            let fd = OwnedFd::from(f);
            let st = nix::sys::stat::fstat(&fd).ok()?;
            ((st.st_dev, st.st_ino) == file_id).then_some(fd)
        })?;
    // Opened from the process that was checked, not from one that reused its pid meanwhile.
    (start_time(pid) == Some(start)).then_some(fd)
}
