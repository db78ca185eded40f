//! Populate: allocate every page of a range on the nodes its policy names.
//!
//! Workers take chunks from a shared queue and fallocate(KEEP_SIZE) them. Under the task-policy
//! strategy each worker first sets its own thread policy to the chunk's range policy, since the
//! file has no shared policy and pages follow the allocating thread. Under shared-policy the
//! file's policy places the pages whoever allocates them.
//!
//! Asked to verify, each worker also reads its chunk's pages back right after allocating them
//! (read faults through the agent's mapping, then move_pages, then the page-table entries are
//! dropped again), so the proof runs in parallel with the allocation instead of in one pass
//! after it. Without verify the answer comes from the page cache alone (cachestat).
//!
//! With a memory cgroup named, the workers run in a short-lived child process that first joins
//! that cgroup, so the VM's cgroup is charged rather than the agent's.

use super::placement::{self, Placement};
use super::{Agent, AgentError, kerr};
use crate::domain::{
    Backend, EventKind, NodeSet, Policy, PolicyMode, RegionKey, RegionStatus, Strategy,
    resolve_span, validate_name,
};
use crate::kernel::{self, Mapping, mempolicy};
use crate::store::WriteOp;
use nix::errno::Errno;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// Bytes one worker allocates per step: large enough to amortize the syscall, small enough for
/// even load between workers and timely progress and cancellation.
const CHUNK: u64 = 32 << 20;
/// Fd number the helper child finds the region's file at.
pub const CHILD_FD: i32 = 3;

/// A Populate request in domain terms.
#[derive(Clone, Debug)]
pub struct PopulateRequest {
    /// The region.
    pub key: RegionKey,
    /// Offset.
    pub offset: u64,
    /// Length, 0 for to the end.
    pub length: u64,
    /// Workers; 0 for the default.
    pub threads: u32,
    /// Memory cgroup directory to charge, if any.
    pub cgroup: Option<PathBuf>,
    /// Read every allocated page's node back from the kernel before answering.
    pub verify: bool,
}

/// Shared progress of a running populate; the caller may set `cancel`.
#[derive(Debug, Default)]
pub struct PopulateProgress {
    /// Bytes done.
    pub done: AtomicU64,
    /// Bytes to do.
    pub total: AtomicU64,
    /// Set to stop early.
    pub cancel: AtomicBool,
    /// Notified whenever `done` grows, so a caller can report the first progress at once instead
    /// of on its next tick (a fast populate may finish before any tick).
    pub advanced: tokio::sync::Notify,
}

impl PopulateProgress {
    fn advance_to(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
        self.advanced.notify_one();
    }

    fn advance_by(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        self.advanced.notify_one();
    }
}

/// How a populate ended.
#[derive(Clone, Debug)]
pub struct PopulateOutcome {
    /// Bytes of the span allocated afterwards, as the kernel reports them.
    pub bytes_done: u64,
    /// Bytes requested.
    pub bytes_total: u64,
    /// Placement of the span afterwards; empty unless `verified`.
    pub placement: Placement,
    /// Whether `placement` was read from the kernel.
    pub verified: bool,
    /// Seconds.
    pub elapsed_seconds: f64,
    /// Stopped by the caller.
    pub cancelled: bool,
    /// Workers used.
    pub threads: u32,
}

/// One unit of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// Policy to allocate under (task-policy), or `None` to rely on the file's policy.
    pub policy: Option<Policy>,
}

/// Splits ranges into chunks.
pub fn plan(ranges: &[(u64, u64, Option<Policy>)], page: u64) -> Vec<Chunk> {
    let step = CHUNK.max(page) / page * page;
    let mut out = Vec::new();
    for &(offset, length, policy) in ranges {
        let mut at = offset;
        while at < offset + length {
            let l = step.min(offset + length - at);
            out.push(Chunk {
                offset: at,
                length: l,
                policy,
            });
            at += l;
        }
    }
    out
}

/// Pages of one chunk per kernel status, as [`placement::map_resident`] reports a page: a node
/// id, -ENOENT for a page not allocated, or another negative errno.
pub type ChunkStatus = BTreeMap<i32, u64>;

/// Reads back where the pages of a chunk that was just allocated are: read-faults them into
/// `mapping` (every page is allocated, so this allocates nothing), asks move_pages, and drops the
/// page-table entries again.
fn read_back(mapping: &Mapping, c: &Chunk, page: u64) -> ChunkStatus {
    let mut status = ChunkStatus::new();
    match mapping.populate_read(c.offset, c.length) {
        Ok(()) => {
            for n in placement::nodes_of(mapping, c.offset, c.length, page) {
                *status.entry(n).or_default() += 1;
            }
        }
        Err(e) => {
            status.insert(-(e as i32), c.length / page);
        }
    }
    let _ = mapping.unmap_pages(c.offset, c.length);
    status
}

/// Runs `threads` workers over `chunks` on `fd`. Returns the first error, if any, or else each
/// chunk's status, read back through `verify` (the mapping and page size) right after the chunk
/// was allocated; empty without `verify`. Each worker is a fresh thread, so a task policy it sets
/// for its chunks dies with it.
pub fn run_workers(
    fd: BorrowedFd<'_>,
    chunks: &[Chunk],
    threads: usize,
    progress: &PopulateProgress,
    verify: Option<(&Mapping, u64)>,
) -> Result<Vec<ChunkStatus>, Errno> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = std::sync::Mutex::new(None);
    let statuses = std::sync::Mutex::new(vec![ChunkStatus::new(); chunks.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut current: Option<Policy> = None;
                loop {
                    if progress.cancel.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(c) = chunks.get(i) else { break };
                    let r = (|| {
                        if let Some(p) = c.policy
                            && current != Some(p)
                        {
                            mempolicy::set_thread_policy(&p)?;
                            current = Some(p);
                        }
                        kernel::fallocate(fd, c.offset, c.length, false)
                    })();
                    match r {
                        Ok(()) => {
                            progress.advance_by(c.length);
                            if let Some((mapping, page)) = verify {
                                let status = read_back(mapping, c, page);
                                if let Some(slot) = statuses
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .get_mut(i)
                                {
                                    *slot = status;
                                }
                            }
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            break;
                        }
                    }
                }
                // Scoped threads exit here, so their task policy goes with them.
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(statuses.into_inner().unwrap_or_else(|p| p.into_inner())),
    }
}

/// Bytes of a span allocated, from the page cache (a probe through a mapping on hugetlbfs, which
/// has none); `None` where the kernel cannot tell.
fn allocated_bytes(
    fd: BorrowedFd<'_>,
    mapping: Option<&Mapping>,
    offset: u64,
    length: u64,
    page: u64,
) -> Option<u64> {
    let map = match mapping {
        Some(m) => placement::allocated(fd, m, offset, length, page),
        None => kernel::files::allocated_map(fd, offset, length, page),
    };
    map.ok()
        .map(|v| v.iter().filter(|allocated| **allocated).count() as u64 * page)
}

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
        let r = run_workers(fd.as_fd(), &chunks, threads, &progress, None);
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
fn run_in_cgroup(
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
fn check_cgroup_room(cgroup: &Path, bytes: u64) -> Result<(), AgentError> {
    match cgroup_room(cgroup) {
        Some(room) if bytes > room => Err(AgentError::ResourceExhausted(format!(
            "populate needs {bytes} bytes charged to cgroup {} but its memory limit leaves {room} bytes: short by {} bytes; nothing was allocated",
            cgroup.display(),
            bytes - room
        ))),
        _ => Ok(()),
    }
}

impl Agent {
    /// Checks that the nodes a BIND range may use have room for its unallocated pages, before
    /// anything is allocated.
    fn check_capacity(
        &self,
        backend: Backend,
        page: u64,
        needs: &[(Policy, u64)],
    ) -> Result<(), AgentError> {
        let topo = self.topology();
        let mut demand: BTreeMap<String, (NodeSet, u64)> = BTreeMap::new();
        for (p, pages) in needs {
            let set = if p.mode == PolicyMode::Bind && !p.relative_nodes {
                p.nodes
            } else if backend == Backend::MemfdHugetlb {
                topo.usable
            } else {
                continue;
            };
            let e = demand.entry(set.to_string()).or_insert((set, 0));
            e.1 += pages * page;
        }
        for (set, bytes) in demand.values() {
            let free: u64 = set
                .iter()
                .filter_map(|n| topo.node(n))
                .map(|n| {
                    if backend == Backend::MemfdHugetlb {
                        n.hugepages
                            .iter()
                            .find(|h| h.page_size == page)
                            .map_or(0, |h| h.free * page)
                    } else {
                        n.mem_free
                    }
                })
                .sum();
            if *bytes > free {
                let what = if backend == Backend::MemfdHugetlb {
                    format!("free {} KiB huge pages", page / 1024)
                } else {
                    "free memory".to_string()
                };
                return Err(AgentError::ResourceExhausted(format!(
                    "populate needs {bytes} bytes on node {set} but it has {free} bytes of {what}: short by {} bytes; nothing was allocated",
                    bytes - free
                )));
            }
        }
        Ok(())
    }

    /// Allocates every page of a span. Progress is published in `progress`; setting its
    /// `cancel` stops the workers, and what was allocated stays and is reported.
    pub async fn populate(
        &self,
        req: PopulateRequest,
        progress: &PopulateProgress,
        actor: &str,
    ) -> Result<PopulateOutcome, AgentError> {
        validate_name("vm_id", &req.key.vm_id)?;
        validate_name("name", &req.key.name)?;
        if req.threads > 64 {
            return Err(AgentError::InvalidArgument(format!(
                "threads {} is too many: use 0 (default) to 64",
                req.threads
            )));
        }
        if let Some(cg) = req.cgroup.as_deref() {
            cgroup_procs_file(cg)?;
        }
        let start = Instant::now();
        let slot = self.slot(&req.key)?;
        let live = slot.read().await;
        if live.intent.status == RegionStatus::Lost {
            return Err(AgentError::FailedPrecondition(format!(
                "region {} is lost: its file did not survive; delete and recreate it",
                req.key
            )));
        }
        let page = live.intent.page_size(self.page);
        let (offset, length) = resolve_span(req.offset, req.length, live.intent.size_bytes, page)?;
        let generation = live.intent.generation;
        let task = live.intent.strategy == Strategy::TaskPolicy;
        let ranges = live.intent.ranges.clipped(offset, offset + length);
        let Some(file) = live.file.as_ref() else {
            return Err(AgentError::FailedPrecondition(format!(
                "region {} has no file",
                req.key
            )));
        };
        let needs: Vec<(Policy, u64)> = tokio::task::block_in_place(|| {
            ranges
                .iter()
                .map(|r| {
                    let missing = file
                        .mapping
                        .as_ref()
                        .and_then(|m| {
                            super::placement::allocated(
                                file.fd.as_fd(),
                                m,
                                r.offset,
                                r.length,
                                page,
                            )
                            .ok()
                        })
                        .map_or(r.length / page, |v| {
                            v.iter().filter(|b| !**b).count() as u64
                        });
                    (r.policy, missing)
                })
                .collect()
        });
        self.check_capacity(live.intent.backend, page, &needs)?;
        // hugetlb pages are charged to the hugetlb controller, not to memory.
        if let Some(cg) = req.cgroup.as_deref()
            && live.intent.backend != Backend::MemfdHugetlb
        {
            check_cgroup_room(cg, needs.iter().map(|(_, pages)| pages * page).sum())?;
        }
        let chunks = plan(
            &ranges
                .iter()
                .map(|r| (r.offset, r.length, task.then_some(r.policy)))
                .collect::<Vec<_>>(),
            page,
        );
        let threads = match req.threads {
            0 => std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(8),
            n => n as usize,
        }
        .min(chunks.len().max(1));
        progress.total.store(length, Ordering::Relaxed);
        let fd = file.fd.as_fd();
        let mapping = file.mapping.as_ref();
        // The helper child of a cgroup populate has no mapping: verify after it, below.
        let verify_in_workers = match (req.verify, req.cgroup.is_none(), mapping) {
            (true, true, Some(m)) => Some((m, page)),
            _ => None,
        };
        let result = tokio::task::block_in_place(|| match req.cgroup.as_deref() {
            Some(cg) => run_in_cgroup(fd, &chunks, threads, cg, progress).map(|()| Vec::new()),
            None => run_workers(fd, &chunks, threads, progress, verify_in_workers)
                .map_err(kerr("fallocate")),
        });
        // A cancel that came after the last chunk stopped nothing.
        let cancelled = progress.cancel.load(Ordering::Relaxed)
            && progress.done.load(Ordering::Relaxed) < length;
        let result = result.map_err(|e| match e {
            AgentError::Kernel { errno, .. } if matches!(errno, Errno::ENOMEM | Errno::ENOSPC) => {
                AgentError::ResourceExhausted(format!(
                    "the kernel ran out of memory for this range's policy while populating ({}); what was allocated stays",
                    errno.desc()
                ))
            }
            e => e,
        });
        let statuses = result?;
        // Every chunk was read back unless the populate stopped early; then a full pass below.
        let read_back = (verify_in_workers.is_some() && !cancelled).then(|| Placement {
            ranges: ranges
                .iter()
                .map(|r| {
                    let statuses = chunks
                        .iter()
                        .zip(&statuses)
                        .filter(|(c, _)| c.offset >= r.offset && c.offset < r.end())
                        .flat_map(|(_, s)| s.iter().map(|(&n, &pages)| (n, pages)));
                    placement::range_view(r, statuses)
                })
                .collect(),
            page_size: page,
        });
        let cached = (!req.verify)
            .then(|| {
                tokio::task::block_in_place(|| {
                    allocated_bytes(file.fd.as_fd(), mapping, offset, length, page)
                })
            })
            .flatten();
        drop(live);
        if task && !cancelled {
            let mut live = slot.write().await;
            if live.intent.generation == generation {
                let mut ranges = live.intent.ranges.clone();
                ranges.mark_placed(offset, offset + length);
                if ranges != live.intent.ranges {
                    self.store
                        .write(vec![WriteOp::SaveRanges {
                            key: req.key.clone(),
                            generation,
                            ranges: ranges.clone(),
                        }])
                        .await?;
                    live.intent.ranges = ranges;
                }
            }
        }
        // What the kernel holds now, not what the workers did: pages allocated before count, and
        // a page punched meanwhile does not. A file the agent cannot map (a guest_memfd without
        // MMAP) has no readable placement; then the workers' count stands.
        let unverified = |done: Option<u64>| {
            let placement = Placement {
                ranges: Vec::new(),
                page_size: page,
            };
            (
                placement,
                done.unwrap_or(progress.done.load(Ordering::Relaxed)),
                false,
            )
        };
        let present = |p: &Placement| (length / page - p.total(|r| r.not_present)) * page;
        let (placement, done, verified) = match read_back {
            Some(p) => {
                let done = present(&p);
                (p, done, true)
            }
            None if req.verify => match self.placement(&req.key, offset, length).await {
                Ok(p) => {
                    let done = present(&p);
                    (p, done, true)
                }
                Err(AgentError::FailedPrecondition(_)) => unverified(None),
                Err(e) => return Err(e),
            },
            None => unverified(cached),
        };
        self.emit(
            EventKind::Populated,
            Some(&req.key),
            format!(
                "populated: {done} of {length} bytes at {offset:#x} allocated, with {threads} workers{}{}",
                if cancelled { " (cancelled)" } else { "" },
                req.cgroup
                    .as_ref()
                    .map_or(String::new(), |c| format!(", charged to {}", c.display()))
            ),
            actor,
        )
        .await?;
        Ok(PopulateOutcome {
            bytes_done: done,
            bytes_total: length,
            placement,
            verified,
            elapsed_seconds: start.elapsed().as_secs_f64(),
            cancelled,
            threads: threads as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_splits_at_chunk_size() {
        let p = Policy::new(PolicyMode::Bind, NodeSet::from_ids([0]).unwrap());
        let chunks = plan(
            &[(0, CHUNK * 2 + 4096, Some(p)), (CHUNK * 3, 4096, None)],
            4096,
        );
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks[2].length, 4096);
        assert_eq!(chunks[3].policy, None);
        let total: u64 = chunks.iter().map(|c| c.length).sum();
        assert_eq!(total, CHUNK * 2 + 8192);
    }

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
