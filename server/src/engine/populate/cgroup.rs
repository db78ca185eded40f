//! Populate's helper child: with a memory cgroup named, the workers run in a short-lived child
//! process (`memplaced __populate-worker`) that first joins that cgroup, so the VM's cgroup is
//! charged rather than the agent's. The parent passes the region's fd and the chunks, and reads
//! the bytes done back as lines.

use super::workers::{Chunk, run_workers};
use super::{CHILD_FD, PopulateProgress};
use crate::domain::{NodeSet, Policy, PolicyMode};
use crate::engine::AgentError;
use crate::kernel;
use nix::errno::Errno;
use std::io::{BufRead, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Checks that a cgroup path is a cgroup directory under /sys/fs/cgroup and returns the file a
/// process writes to join it.
pub fn cgroup_procs_file(path: &Path) -> Result<PathBuf, AgentError> {
    let bad = |why: &str| AgentError::InvalidArgument(format!("cgroup {}: {why}", path.display()));
    if !path.is_absolute()
        || path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(bad("must be an absolute path without '..'"));
    }
    if !path.starts_with("/sys/fs/cgroup") {
        return Err(bad("must be under /sys/fs/cgroup"));
    }
    let procs = path.join("cgroup.procs");
    if !procs.exists() {
        return Err(bad("is not a cgroup directory (no cgroup.procs)"));
    }
    Ok(procs)
}

/// The entry point of the helper child (`memplaced __populate-worker`): join the cgroup, then
/// run the workers on the inherited fd, printing bytes done as lines. Exit code 0 on success.
pub fn child_main(args: &[String]) -> i32 {
    let ChildArgs {
        cgroup,
        threads,
        chunks,
    } = match parse_child_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("populate worker: {e}");
            return 2;
        }
    };
    let Some(fd) = kernel::inherited_fd(CHILD_FD) else {
        eprintln!("populate worker: no region fd at {CHILD_FD}");
        return 2;
    };
    if let Some(cg) = cgroup {
        // Writing 0 moves the writing process itself, in cgroup v1 and v2 alike.
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .open(Path::new(&cg).join("cgroup.procs"))
            .and_then(|mut f| f.write_all(b"0"))
        {
            eprintln!("populate worker: joining cgroup {cg}: {e}");
            return 3;
        }
    }
    let progress = PopulateProgress::default();
    let stop = AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            let mut last = u64::MAX;
            while !stop.load(Ordering::Relaxed) {
                let d = progress.done.load(Ordering::Relaxed);
                if d != last {
                    println!("{d}");
                    last = d;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let k = crate::engine::syscalls::RealFile {
            fd: fd.as_fd(),
            mapping: None,
            page: kernel::page_size(),
        };
        let r = run_workers(&k, &chunks, threads, &progress, None);
        stop.store(true, Ordering::Relaxed);
        r
    });
    println!("{}", progress.done.load(Ordering::Relaxed));
    match r {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("populate worker: fallocate: {}", e.desc());
            10 + (e as i32).min(200)
        }
    }
}

/// The helper child's arguments.
#[derive(Debug, PartialEq, Eq)]
struct ChildArgs {
    cgroup: Option<String>,
    threads: usize,
    chunks: Vec<Chunk>,
}

/// Parses the helper child's arguments. Anything it cannot read is an error: a chunk dropped
/// here would leave part of the span unallocated while the populate reports success.
fn parse_child_args(args: &[String]) -> Result<ChildArgs, String> {
    let mut out = ChildArgs {
        cgroup: None,
        threads: 1,
        chunks: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--cgroup" => out.cgroup = Some(value()?.clone()),
            "--threads" => {
                let v = value()?;
                out.threads = v
                    .parse()
                    .ok()
                    .filter(|t| *t > 0)
                    .ok_or_else(|| format!("--threads {v:?} is not a positive count"))?;
            }
            "--chunk" => {
                let v = value()?;
                out.chunks
                    .push(parse_chunk(v).ok_or_else(|| format!("--chunk {v:?} cannot be parsed"))?);
            }
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(out)
}

fn format_chunk(c: &Chunk) -> String {
    match c.policy {
        None => format!("{}:{}:-", c.offset, c.length),
        Some(p) => format!(
            "{}:{}:{}:{}:{}:{}",
            c.offset,
            c.length,
            p.mode.as_str(),
            p.nodes,
            p.static_nodes as u8,
            p.relative_nodes as u8
        ),
    }
}

fn parse_chunk(s: &str) -> Option<Chunk> {
    let parts: Vec<&str> = s.split(':').collect();
    let offset = parts.first()?.parse().ok()?;
    let length = parts.get(1)?.parse().ok()?;
    let policy = if parts.get(2) == Some(&"-") {
        None
    } else {
        Some(Policy {
            mode: PolicyMode::parse(parts.get(2)?)?,
            nodes: NodeSet::parse_list(parts.get(3)?).ok()?,
            static_nodes: *parts.get(4)? == "1",
            relative_nodes: *parts.get(5)? == "1",
        })
    };
    Some(Chunk {
        offset,
        length,
        policy,
    })
}

/// Runs the workers in a child process that joins `cgroup` first.
pub(super) fn run_in_cgroup(
    fd: BorrowedFd<'_>,
    chunks: &[Chunk],
    threads: usize,
    cgroup: &Path,
    progress: &PopulateProgress,
) -> Result<(), AgentError> {
    let exe = std::env::current_exe()
        .map_err(|e| AgentError::FailedPrecondition(format!("own binary: {e}")))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__populate-worker")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--threads")
        .arg(threads.to_string());
    for c in chunks {
        cmd.arg("--chunk").arg(format_chunk(c));
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null());
    kernel::pass_fd_to_child(&mut cmd, fd, CHILD_FD);
    let mut child = cmd.spawn().map_err(|e| {
        AgentError::FailedPrecondition(format!("starting the populate helper: {e}"))
    })?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(AgentError::FailedPrecondition(
            "the populate helper has no stdout".into(),
        ));
    };
    let base = progress.done.load(Ordering::Relaxed);
    let killed = AtomicBool::new(false);
    let pid = child.id() as i32;
    std::thread::scope(|s| {
        s.spawn(|| {
            while !killed.load(Ordering::Relaxed) {
                if progress.cancel.load(Ordering::Relaxed) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(d) = line.trim().parse::<u64>() {
                progress.advance_to(base + d);
            }
        }
        killed.store(true, Ordering::Relaxed);
    });
    let out = child.wait_with_output().map_err(|e| {
        AgentError::FailedPrecondition(format!("waiting for the populate helper: {e}"))
    })?;
    if out.status.success() || progress.cancel.load(Ordering::Relaxed) {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&out.status) {
        // Nobody but the agent (on cancel, handled above) and the kernel kills the helper, and
        // the kernel's SIGKILL is the cgroup's OOM killer: the allocation hit a memory limit.
        let why = format!(
            "the populate helper in cgroup {} was killed by signal {signal}",
            cgroup.display()
        );
        return Err(if signal == libc::SIGKILL {
            AgentError::ResourceExhausted(format!(
                "{why}, by the OOM killer of that cgroup or an ancestor: its memory limit is too small for this populate; what was allocated stays"
            ))
        } else {
            AgentError::FailedPrecondition(why)
        });
    }
    match out.status.code() {
        Some(c) if c >= 10 => Err(AgentError::Kernel {
            op: "fallocate in the cgroup helper",
            errno: Errno::from_raw(c - 10),
        }),
        _ => Err(AgentError::FailedPrecondition(format!(
            "populate helper failed: {msg}"
        ))),
    }
}

/// Bytes that may still be charged to a memory cgroup under its own limit and its ancestors'
/// (v1 `memory.limit_in_bytes`/`usage_in_bytes`, v2 `memory.max`/`current`); `None` when no
/// limit applies or none can be read.
fn cgroup_room(cgroup: &Path) -> Option<u64> {
    let read = |dir: &Path, file: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    cgroup
        .ancestors()
        .take_while(|d| d.starts_with("/sys/fs/cgroup"))
        .filter_map(|d| {
            let (limit, usage) = match read(d, "memory.limit_in_bytes") {
                Some(limit) => (limit, read(d, "memory.usage_in_bytes")?),
                // v2 writes "max" for no limit, which does not parse.
                None => (read(d, "memory.max")?, read(d, "memory.current")?),
            };
            Some(limit.saturating_sub(usage))
        })
        .min()
}

/// Refuses a populate whose unallocated bytes would not fit under the memory limit of the cgroup
/// it charges, before anything is allocated (rather than have the OOM killer stop it half-way).
pub(super) fn check_cgroup_room(cgroup: &Path, bytes: u64) -> Result<(), AgentError> {
    match cgroup_room(cgroup) {
        Some(room) if bytes > room => Err(AgentError::ResourceExhausted(format!(
            "populate needs {bytes} bytes charged to cgroup {} but its memory limit leaves {room} bytes: short by {} bytes; nothing was allocated",
            cgroup.display(),
            bytes - room
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_text_round_trips() {
        let mut p = Policy::new(
            PolicyMode::Interleave,
            NodeSet::from_ids([0, 2, 3]).unwrap(),
        );
        p.static_nodes = true;
        for c in [
            Chunk {
                offset: 4096,
                length: 8192,
                policy: Some(p),
            },
            Chunk {
                offset: 0,
                length: 4096,
                policy: None,
            },
        ] {
            assert_eq!(parse_chunk(&format_chunk(&c)), Some(c));
        }
    }

    #[test]
    fn child_args_refuse_what_they_cannot_read() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let good = parse_child_args(&args(&[
            "--threads",
            "3",
            "--chunk",
            "0:4096:-",
            "--cgroup",
            "/sys/fs/cgroup/x",
        ]))
        .unwrap();
        assert_eq!(good.threads, 3);
        assert_eq!(good.chunks.len(), 1);
        assert_eq!(good.cgroup.as_deref(), Some("/sys/fs/cgroup/x"));
        for bad in [
            &["--chunk", "0:4096:bind:zz:0:0"][..],
            &["--chunk", "x:4096:-"],
            &["--chunk", "0:4096:-", "--chunk", "garbage"],
            &["--threads", "many"],
            &["--threads", "0"],
            &["--chunk"],
            &["--frobnicate"],
        ] {
            assert!(
                parse_child_args(&args(bad)).is_err(),
                "{bad:?} must be refused, not dropped"
            );
        }
    }

    #[test]
    fn cgroup_paths_are_checked() {
        assert!(cgroup_procs_file(Path::new("relative")).is_err());
        assert!(cgroup_procs_file(Path::new("/tmp")).is_err());
        assert!(cgroup_procs_file(Path::new("/sys/fs/cgroup/../../etc")).is_err());
        assert!(cgroup_procs_file(Path::new("/sys/fs/cgroup/memory/does-not-exist")).is_err());
    }
}
