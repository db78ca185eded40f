//! Finding a running process's guest memory files, for AttachProcess: every memfd it maps shared
//! (/proc/PID/maps, taken through /proc/PID/map_files when it holds no fd for it) and every memfd
//! or guest_memfd it holds as an fd (/proc/PID/fd, taken with pidfd_getfd). Each file is confirmed
//! by (st_dev, st_ino) on the copy taken, so a link that changed meanwhile is not mistaken for it.

use super::fdpass::{self, FileKind};
use super::maps::{io_errno, maybe_gmem, memfd_name, memory_mappings};
use super::pidfd;
use nix::errno::Errno;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

/// `hugetlbfs`, where a MFD_HUGETLB memfd lives.
const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;

/// Which kind of memory file was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemKind {
    /// A memfd on shmem.
    Memfd,
    /// A MFD_HUGETLB memfd, with its huge page size.
    MemfdHugetlb(u64),
    /// A KVM guest_memfd.
    GuestMemfd,
}

/// One guest memory file of the process, with a copy of its fd.
#[derive(Debug)]
pub struct FoundFile {
    /// The agent's copy of the file.
    pub fd: OwnedFd,
    /// (st_dev, st_ino).
    pub file_id: (u64, u64),
    /// The file's size in bytes.
    pub size: u64,
    /// What it is.
    pub kind: MemKind,
    /// The memfd's name (`memfd_create`'s first argument), empty for guest_memfd.
    pub name: String,
    /// The fd number in the process, if it holds one.
    pub held_fd: Option<i32>,
    /// Whether the process maps it MAP_SHARED.
    pub mapped_shared: bool,
    /// The process's shared mappings of the file as /proc/PID/maps showed them at the scan.
    pub shared_mappings: Vec<FileMapping>,
}

/// One shared mapping of a file in a process, from /proc/PID/maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMapping {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Offset into the file.
    pub offset: u64,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct ProcessMemory {
    /// The files that can be attached, in the order first seen (fds by number, then mappings).
    pub files: Vec<FoundFile>,
    /// memfds the process maps only MAP_PRIVATE: its writes land in private copies, not the file.
    pub private_memfds: Vec<String>,
    /// memfds the process maps shared but holds no fd for, which the agent could not open
    /// through /proc/PID/map_files (it needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN), with why.
    pub unopenable: Vec<String>,
    /// The process's command name (/proc/PID/comm).
    pub comm: String,
    /// The process's arguments (/proc/PID/cmdline), read with its files.
    pub cmdline: Vec<String>,
}

/// The process's command name, or empty.
pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The thread-group id (process id) of `pid` and its state letter, from /proc/PID/status.
pub fn tgid_and_state(pid: i32) -> Option<(i32, char)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let tgid = field("Tgid:")?.parse().ok()?;
    let state = field("State:")?.chars().next()?;
    Some((tgid, state))
}

/// Classifies a file taken from the process.
fn kind_of(fd: &OwnedFd, link: &str) -> Option<MemKind> {
    match fdpass::file_kind(fd.as_fd()) {
        FileKind::Memfd if memfd_name(link).is_some() => {
            let fs = nix::sys::statfs::fstatfs(fd).ok()?;
            if fs.filesystem_type().0 as libc::c_long == HUGETLBFS_MAGIC {
                let st = nix::sys::stat::fstat(fd).ok()?;
                Some(MemKind::MemfdHugetlb(st.st_blksize as u64))
            } else {
                Some(MemKind::Memfd)
            }
        }
        FileKind::GuestMemfd if maybe_gmem(link) => Some(MemKind::GuestMemfd),
        _ => None,
    }
}

/// Finds and takes every memfd and guest_memfd of process `pid`, which must still be the process
/// that started at `start`: the ones it holds as fds and the memfds it maps shared. A memfd it
/// maps only privately is listed in `private_memfds`, not taken. Needs what pidfd_getfd needs
/// (CAP_SYS_PTRACE over the process); opening map_files needs CAP_CHECKPOINT_RESTORE
/// (or CAP_SYS_ADMIN).
pub fn scan(pid: i32, start: u64) -> Result<ProcessMemory, Errno> {
    if pidfd::start_time(pid) != Some(start) {
        return Err(Errno::ESRCH);
    }
    let pidfd = pidfd::open(pid)?;
    if pidfd::start_time(pid) != Some(start) {
        return Err(Errno::ESRCH);
    }
    let mappings = memory_mappings(pid)?;
    let mut out = ProcessMemory {
        comm: comm(pid),
        cmdline: cmdline(pid),
        ..Default::default()
    };
    let shared_mappings_of = |ino: u64| -> Vec<FileMapping> {
        mappings
            .iter()
            .filter(|m| m.ino == ino && m.shared)
            .map(|m| FileMapping {
                start: m.start,
                length: m.end - m.start,
                offset: m.offset,
            })
            .collect()
    };
    // By inode: whether mapped shared, mapped private.
    let mut mapped: BTreeMap<u64, (bool, bool)> = BTreeMap::new();
    for m in &mappings {
        let e = mapped.entry(m.ino).or_default();
        if m.shared {
            e.0 = true;
        } else {
            e.1 = true;
        }
    }
    let fds = memory_fds(pid)?;
    let mut seen = std::collections::HashSet::new();
    for (n, link) in fds {
        let Ok(fd) = pidfd::getfd(&pidfd, n) else {
            continue; // closed meanwhile
        };
        let Ok(st) = nix::sys::stat::fstat(&fd) else {
            continue;
        };
        let id = (st.st_dev, st.st_ino);
        let Some(kind) = kind_of(&fd, &link) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let (shared, private) = mapped.get(&st.st_ino).copied().unwrap_or_default();
        let name = memfd_name(&link).unwrap_or_default().to_string();
        if kind != MemKind::GuestMemfd && private && !shared {
            out.private_memfds.push(format!("{name} (fd {n})"));
            continue;
        }
        out.files.push(FoundFile {
            fd,
            file_id: id,
            size: st.st_size as u64,
            kind,
            name,
            held_fd: Some(n),
            mapped_shared: shared,
            shared_mappings: shared_mappings_of(st.st_ino),
        });
    }
    // Memfds the process maps but holds no fd for: open them through map_files.
    for m in &mappings {
        if memfd_name(&m.link).is_none() || seen.iter().any(|id| id.1 == m.ino) {
            continue;
        }
        let name = memfd_name(&m.link).unwrap_or_default().to_string();
        if !m.shared {
            if !mapped.get(&m.ino).is_some_and(|e| e.0) && !out.private_memfds.contains(&name) {
                out.private_memfds.push(name);
            }
            continue;
        }
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/map_files/{}", m.range))
        {
            Ok(f) => f,
            Err(e) => {
                out.unopenable.push(format!("{name} ({e})"));
                continue;
            }
        };
        let fd = OwnedFd::from(file);
        let Ok(st) = nix::sys::stat::fstat(&fd) else {
            continue;
        };
        if st.st_ino != m.ino || !seen.insert((st.st_dev, st.st_ino)) {
            continue;
        }
        let Some(kind) = kind_of(&fd, &m.link) else {
            continue;
        };
        out.files.push(FoundFile {
            fd,
            file_id: (st.st_dev, st.st_ino),
            size: st.st_size as u64,
            kind,
            name,
            held_fd: None,
            mapped_shared: true,
            shared_mappings: shared_mappings_of(st.st_ino),
        });
    }
    // The process must still be the one scanned: a pid reused meanwhile would hand over another
    // process's files.
    if pidfd::start_time(pid) != Some(start) {
        return Err(Errno::ESRCH);
    }
    Ok(out)
}

/// The command line of `pid`, one argument each; empty when it cannot be read.
fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The fds of `pid` that may be guest memory (a memfd, or what may be a guest_memfd), with their
/// links, in fd order.
fn memory_fds(pid: i32) -> Result<Vec<(i32, String)>, Errno> {
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(io_errno)?
        .flatten()
        .filter_map(|e| {
            let n: i32 = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?.into_os_string();
            Some((n, link.into_string().ok()?))
        })
        .filter(|(_, link)| memfd_name(link).is_some() || maybe_gmem(link))
        .collect();
    fds.sort_unstable_by_key(|(n, _)| *n);
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_names_come_from_the_link() {
        assert_eq!(
            memfd_name("/memfd:memory-backend-memfd (deleted)"),
            Some("memory-backend-memfd")
        );
        assert_eq!(memfd_name("/memfd:a b"), Some("a b"));
        assert_eq!(memfd_name("/dev/shm/x"), None);
        assert!(maybe_gmem("anon_inode:[kvm-gmem]"));
        assert!(!maybe_gmem("anon_inode:[eventfd]"));
    }

    #[test]
    fn a_process_with_a_shared_and_a_private_memfd() {
        let me = std::process::id() as i32;
        let start = pidfd::start_time(me).unwrap();
        let shared = super::super::create_memfd("shared-one", 1 << 16, None).unwrap();
        let private = super::super::create_memfd("private-one", 1 << 16, None).unwrap();
        let m = super::super::Mapping::new(shared.as_fd(), 1 << 16).unwrap();
        // SAFETY: a new private read-only mapping of a file this test owns; nothing else uses the
        // address range, and it is unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                1 << 16,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&private),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let found = scan(me, start).unwrap();
        let names: Vec<&str> = found.files.iter().map(|f| f.name.as_str()).collect();
        assert!(names.contains(&"memplace:shared-one"), "{found:?}");
        assert!(!names.contains(&"memplace:private-one"), "{found:?}");
        assert!(
            found
                .private_memfds
                .iter()
                .any(|n| n.starts_with("memplace:private-one")),
            "{found:?}"
        );
        let f = found
            .files
            .iter()
            .find(|f| f.name == "memplace:shared-one")
            .unwrap();
        assert_eq!(f.kind, MemKind::Memfd);
        assert_eq!(f.size, 1 << 16);
        assert!(f.mapped_shared);
        assert_eq!(f.file_id, super::super::fd_file_id(shared.as_fd()).unwrap());
        drop(m);
        // SAFETY: `p` is the mapping made above, of this length, and nothing refers to it.
        assert_eq!(unsafe { libc::munmap(p, 1 << 16) }, 0);
    }
}
