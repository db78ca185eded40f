//! What /proc says about a process: its stat fields, its fds and the files behind them.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

/// Field `n` (1-based, as proc(5) counts them) of /proc/PID/stat, from field 3 on.
fn stat_field(pid: i32, n: usize) -> String {
    assert!(n >= 3, "fields 1 and 2 are the pid and the command");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat[stat.rfind(')').expect(")") + 2..]
        .split_whitespace()
        .nth(n - 3)
        .unwrap_or_else(|| panic!("field {n} of /proc/{pid}/stat"))
        .to_string()
}

/// Field 22 of /proc/PID/stat.
pub fn start_time(pid: i32) -> u64 {
    stat_field(pid, 22).parse().expect("number")
}

/// Field 4 (ppid) of /proc/PID/stat.
pub fn parent_of(pid: i32) -> i32 {
    stat_field(pid, 4).parse().expect("number")
}

/// The process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').unwrap_or(0)..].starts_with(") Z"))
}

/// `kill -SIG PID` through kill(1), which must succeed.
pub fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill(1)")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Every fd of `pid` with its link text and inode.
pub fn fds_of(pid: u32) -> Vec<(String, u64)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading the agent's fd table")
        .flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            let ino = std::fs::metadata(e.path()).map(|m| m.ino()).unwrap_or(0);
            Some((link.display().to_string(), ino))
        })
        .collect()
}

pub fn fd_count(pid: u32) -> usize {
    fds_of(pid).len()
}

/// (dev, ino) of the file behind /proc/PID/fd/N.
pub fn file_id(pid: i32, fd: i32) -> (u64, u64) {
    let m = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
        .unwrap_or_else(|e| panic!("stat /proc/{pid}/fd/{fd}: {e}"));
    (m.dev(), m.ino())
}

/// Every fd of `pid` whose link contains `needle`, as (fd, (dev, ino)).
pub fn fds_like(pid: i32, needle: &str) -> Vec<(i32, (u64, u64))> {
    let mut out = vec![];
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
    {
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        if link.display().to_string().contains(needle) {
            let fd: i32 = e.file_name().to_string_lossy().parse().expect("fd number");
            out.push((fd, file_id(pid, fd)));
        }
    }
    out
}

/// (dev, ino) of the first fd of `pid` whose link contains `needle`.
pub fn file_id_in(pid: i32, needle: &str) -> (u64, u64) {
    match fds_like(pid, needle).first() {
        Some((_, id)) => *id,
        None => panic!("pid {pid} has no fd like {needle}"),
    }
}

/// /proc/PID/fd/N of the agent's (pid `agent`) memfd for region `vm`/`name`.
pub fn agent_memfd(agent: u32, vm: &str, name: &str) -> PathBuf {
    let want = format!("/memfd:memplace:{vm}/{name} (deleted)");
    for entry in std::fs::read_dir(format!("/proc/{agent}/fd")).expect("the agent's fds") {
        let path = entry.unwrap().path();
        if std::fs::read_link(&path).is_ok_and(|l| l.as_os_str() == want.as_str()) {
            return path;
        }
    }
    panic!("the agent holds no {want}");
}

/// Allocated bytes of the agent's memfd for a region: st_blocks of /proc/PID/fd/N, which for
/// shmem counts every allocated page. A witness per file, independent of cachestat.
pub fn memfd_allocated_bytes(agent: u32, vm: &str, name: &str) -> u64 {
    let path = agent_memfd(agent, vm, name);
    std::fs::metadata(&path).expect("stat the memfd").blocks() * 512
}

/// How many NUMA nodes have memory on this machine (`/sys/devices/system/node/has_memory`). A
/// check that pages are on node N can fail only where another node exists.
pub fn memory_node_count() -> usize {
    let list = std::fs::read_to_string("/sys/devices/system/node/has_memory")
        .unwrap_or_else(|_| "0".to_owned());
    list.trim()
        .split(',')
        .filter(|part| !part.is_empty())
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0),
            None => 1,
        })
        .sum()
}

/// A field of every NUMA node's sysfs meminfo (`Shmem`, `FilePages`, ...), summed, in bytes.
pub fn node_meminfo(field: &str) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir("/sys/devices/system/node")
        .expect("/sys/devices/system/node")
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if !n.starts_with("node") || n[4..].parse::<u32>().is_err() {
            continue;
        }
        let text = std::fs::read_to_string(e.path().join("meminfo")).expect("node meminfo");
        let kb: u64 = text
            .lines()
            .find_map(|l| {
                let rest = l.split_once(&format!(" {field}:"))?.1;
                rest.split_whitespace().next()?.parse().ok()
            })
            .unwrap_or_else(|| panic!("no {field} in {}/meminfo", e.path().display()));
        total += kb * 1024;
    }
    total
}

/// Whether process `pid` holds an fd of the file with inode `ino`.
pub fn holds_inode(pid: u32, ino: u64) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's fds")
        .flatten()
        .any(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == ino))
}
