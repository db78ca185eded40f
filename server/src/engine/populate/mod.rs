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
//! after it. Without verify the answer is what fallocate reported: a chunk it allocated is
//! allocated in full, so only what the workers did not do (after a cancel) is counted, from the
//! page cache (cachestat); walking the page cache over all 4 GiB just populated cost 30-60 ms.
//!
//! The workers are in `workers`. With a memory cgroup named, the workers run in a short-lived child process that first joins
//! that cgroup, so the VM's cgroup is charged rather than the agent's.

pub(super) mod cgroup;
mod workers;

use super::live::{LiveRegion, Slot};
use super::placement::{self, Placement};
use super::syscalls::{RealFile, Syscalls};
use super::{Agent, AgentError, kerr};
use crate::domain::{
    Backend, Event, EventKind, NodeSet, Policy, PolicyMode, RangeIntent, RegionKey, Strategy,
    resolve_span,
};
use crate::store::WriteOp;
use cgroup::{cgroup_procs_file, check_cgroup_room, run_in_cgroup};
use nix::errno::Errno;
use std::collections::BTreeMap;
use workers::{Chunk, allocated_after, plan, run_workers};

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::OwnedRwLockReadGuard;

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
    pub(super) fn advance_to(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
        self.advanced.notify_one();
    }

    pub(super) fn advance_by(&self, bytes: u64) {
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
        progress: &Arc<PopulateProgress>,
        actor: &str,
    ) -> Result<PopulateOutcome, AgentError> {
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
        let live = slot.clone().read_owned().await;
        let span = self.span(&live, &req)?;
        let (live, needs) = missing_pages(live, span.clone()).await?;
        self.check_capacity(live.intent.backend, span.page, &needs)?;
        // hugetlb pages are charged to the hugetlb controller, not to memory.
        if let Some(cg) = req.cgroup.as_deref()
            && live.intent.backend != Backend::MemfdHugetlb
        {
            check_cgroup_room(cg, needs.iter().map(|(_, pages)| pages * span.page).sum())?;
        }
        let chunks = plan(
            &span
                .ranges
                .iter()
                .map(|r| (r.offset, r.length, span.task.then_some(r.policy)))
                .collect::<Vec<_>>(),
            span.page,
        );
        let threads = match req.threads {
            0 => std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(8),
            n => n as usize,
        }
        .min(chunks.len().max(1));
        progress.total.store(span.length, Ordering::Relaxed);
        let work = Work {
            chunks,
            threads,
            cgroup: req.cgroup.clone(),
            verify: req.verify,
            progress: progress.clone(),
        };
        let (live, ran) = run(live, span.clone(), work).await?;
        drop(live);
        // A cancel that came after the last chunk stopped nothing.
        let cancelled = progress.cancel.load(Ordering::Relaxed)
            && progress.done.load(Ordering::Relaxed) < span.length;
        let read_back = ran.result?.filter(|_| !cancelled);
        let answer = self
            .populate_answer(&req, &span, read_back, ran.cached, progress)
            .await;
        let event = answer.as_ref().ok().map(|(_, done, _)| {
            self.event(
                EventKind::Populated,
                Some(&req.key),
                format!(
                    "populated: {done} of {} bytes at {:#x} allocated, with {threads} workers{}{}",
                    span.length,
                    span.offset,
                    if cancelled { " (cancelled)" } else { "" },
                    req.cgroup
                        .as_ref()
                        .map_or(String::new(), |c| format!(", charged to {}", c.display()))
                ),
                actor,
            )
        });
        // The pages are placed even when reading the answer failed: record that all the same.
        self.record_populated(&slot, &req.key, &span, span.task && !cancelled, event)
            .await?;
        let (placement, done, verified) = answer?;
        Ok(PopulateOutcome {
            bytes_done: done,
            bytes_total: span.length,
            placement,
            verified,
            elapsed_seconds: start.elapsed().as_secs_f64(),
            cancelled,
            threads: threads as u32,
        })
    }

    /// The span a populate covers, in whole pages of the region's file.
    fn span(&self, live: &LiveRegion, req: &PopulateRequest) -> Result<Span, AgentError> {
        if let Some(e) = AgentError::without_file(&live.intent) {
            return Err(e);
        }
        let page = live.intent.page_size(self.page_size());
        let (offset, length) = resolve_span(req.offset, req.length, live.intent.size_bytes, page)?;
        if live.file.is_none() {
            return Err(AgentError::FailedPrecondition(format!(
                "region {} has no file",
                req.key
            )));
        }
        Ok(Span {
            page,
            offset,
            length,
            generation: live.intent.generation,
            task: live.intent.strategy == Strategy::TaskPolicy,
            ranges: live.intent.ranges.clipped(offset, offset + length),
        })
    }

    /// Commits the populate's event and, when `placed`, marks a task-policy span as placed,
    /// unless the intent changed meanwhile: both in one transaction, so one durable write.
    async fn record_populated(
        &self,
        slot: &Slot,
        key: &RegionKey,
        span: &Span,
        placed: bool,
        event: Option<Event>,
    ) -> Result<(), AgentError> {
        let events = Vec::from_iter(event);
        if placed {
            let mut live = slot.write().await;
            let mut ranges = live.intent.ranges.clone();
            ranges.mark_placed(span.offset, span.offset + span.length);
            if live.intent.generation == span.generation && ranges != live.intent.ranges {
                let save = WriteOp::SaveRanges {
                    key: key.clone(),
                    generation: span.generation,
                    ranges: ranges.clone(),
                };
                self.commit(vec![save], events).await?;
                live.intent.ranges = ranges;
                return Ok(());
            }
        }
        if !events.is_empty() {
            self.commit(Vec::new(), events).await?;
        }
        Ok(())
    }

    /// What a populate answers: what the kernel holds, not what the workers did. Pages allocated
    /// before count: a chunk fallocate completed is allocated in full, and the rest of the span
    /// is counted from the page cache. With verify, each chunk's pages as read back right after
    /// its allocation. Either way a page another process punches after its chunk was done is
    /// not seen (the agent never punches a region it populates). A file the agent cannot map (a
    /// guest_memfd without MMAP) has no readable placement; then the workers' count stands.
    /// Returns the placement, the bytes present, and whether it was verified.
    async fn populate_answer(
        &self,
        req: &PopulateRequest,
        span: &Span,
        read_back: Option<Placement>,
        cached: Option<u64>,
        progress: &PopulateProgress,
    ) -> Result<(Placement, u64, bool), AgentError> {
        let page = span.page;
        let present = |p: &Placement| (span.length / page - p.total(|r| r.not_present)) * page;
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
        Ok(match read_back {
            Some(p) => {
                let done = present(&p);
                (p, done, true)
            }
            None if req.verify => match self.placement(&req.key, span.offset, span.length).await {
                Ok(p) => {
                    let done = present(&p);
                    (p, done, true)
                }
                Err(AgentError::FailedPrecondition(_)) => unverified(None),
                Err(e) => return Err(e),
            },
            None => unverified(cached),
        })
    }
}

/// A populate's span, resolved against the region.
#[derive(Clone, Debug)]
struct Span {
    page: u64,
    offset: u64,
    length: u64,
    generation: u64,
    task: bool,
    ranges: Vec<RangeIntent>,
}

/// How the workers run.
struct Work {
    chunks: Vec<Chunk>,
    threads: usize,
    cgroup: Option<PathBuf>,
    verify: bool,
    progress: Arc<PopulateProgress>,
}

/// What the workers did: the placement they read back (when they verified every chunk), or
/// the error; and without verify, the bytes of the span allocated (see [`allocated_after`]).
struct Ran {
    result: Result<Option<Placement>, AgentError>,
    cached: Option<u64>,
}

/// Per range, its policy and how many of its pages are not allocated yet. Blocking work, on a
/// blocking thread.
async fn missing_pages(
    live: OwnedRwLockReadGuard<LiveRegion>,
    span: Span,
) -> Result<(OwnedRwLockReadGuard<LiveRegion>, Vec<(Policy, u64)>), AgentError> {
    Agent::blocking(move || {
        let page = span.page;
        let needs = span
            .ranges
            .iter()
            .map(|r| {
                let missing = live
                    .file
                    .as_ref()
                    .and_then(|f| {
                        let k = RealFile {
                            fd: f.fd.as_fd(),
                            mapping: Some(f.mapping.as_ref()?),
                            page,
                        };
                        k.allocated_pages(r.offset, r.length).ok()
                    })
                    .map_or(r.length / page, |allocated| r.length / page - allocated);
                (r.policy, missing)
            })
            .collect();
        (live, needs)
    })
    .await
}

/// Runs the workers (in the agent, or in a helper child in a cgroup) on a blocking thread.
async fn run(
    live: OwnedRwLockReadGuard<LiveRegion>,
    span: Span,
    work: Work,
) -> Result<(OwnedRwLockReadGuard<LiveRegion>, Ran), AgentError> {
    Agent::blocking(move || {
        let ran = run_blocking(&live, &span, &work);
        (live, ran)
    })
    .await
}

fn run_blocking(live: &LiveRegion, span: &Span, work: &Work) -> Ran {
    let Some(file) = live.file.as_ref() else {
        return Ran {
            result: Err(AgentError::FailedPrecondition(format!(
                "region {} has no file",
                live.intent.key
            ))),
            cached: None,
        };
    };
    let page = span.page;
    let fd = file.fd.as_fd();
    let mapping = file.mapping.as_ref();
    let progress = &*work.progress;
    // The helper child of a cgroup populate has no mapping: verify after it, in the answer.
    let verify_in_workers = match (work.verify, work.cgroup.is_none(), mapping) {
        (true, true, Some(m)) => Some((m, page)),
        _ => None,
    };
    // Per chunk, whether the workers allocated it (`None` from the cgroup helper, which reports
    // only its progress).
    let result = match work.cgroup.as_deref() {
        Some(cg) => run_in_cgroup(fd, &work.chunks, work.threads, cg, progress).map(|()| None),
        None => run_workers(
            &RealFile { fd, mapping, page },
            &work.chunks,
            work.threads,
            progress,
            verify_in_workers,
        )
        .map(Some)
        .map_err(kerr("fallocate")),
    };
    let result = result.map_err(|e| match e {
        AgentError::Kernel { errno, .. } if matches!(errno, Errno::ENOMEM | Errno::ENOSPC) => {
            AgentError::ResourceExhausted(format!(
                "the kernel ran out of memory for this range's policy while populating ({}); what was allocated stays",
                errno.desc()
            ))
        }
        e => e,
    });
    let cached = match (&result, work.verify) {
        (Ok(done), false) => allocated_after(
            fd,
            mapping,
            (span.offset, span.length, page),
            &work.chunks,
            done.as_deref(),
        ),
        _ => None,
    };
    // Every chunk was read back when the workers verified (unless stopped early: the caller
    // drops it then, and a full pass runs instead).
    let result = result.map(|statuses| {
        verify_in_workers
            .zip(statuses)
            .map(|(_, statuses)| Placement {
                ranges: span
                    .ranges
                    .iter()
                    .map(|r| {
                        let statuses = work
                            .chunks
                            .iter()
                            .zip(&statuses)
                            .filter(|(c, _)| c.offset >= r.offset && c.offset < r.end())
                            .flat_map(|(_, s)| s.iter().flatten().map(|(&n, &pages)| (n, pages)));
                        placement::range_view(r, statuses)
                    })
                    .collect(),
                page_size: page,
            })
    });
    Ran { result, cached }
}
