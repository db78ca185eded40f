//! Populate's workers: the span is split into chunks, and each worker thread takes chunks from a
//! shared queue and fallocate(KEEP_SIZE)s them, first setting its own task policy where the
//! region is placed by task policy. Asked to verify, a worker reads each chunk's pages back right
//! after allocating them.

use super::PopulateProgress;
use crate::domain::Policy;
use crate::engine::syscalls::{RealFile, Syscalls, nodes_of};
use crate::kernel::Mapping;
use nix::errno::Errno;
use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Bytes one worker allocates per step: large enough to amortize the syscall, small enough for
/// even load between workers and timely progress and cancellation.
const CHUNK: u64 = 32 << 20;

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

/// Pages of one chunk per kernel status, as `syscalls::map_resident` reports a page: a node
/// id, -ENOENT for a page not allocated, or another negative errno.
pub type ChunkStatus = BTreeMap<i32, u64>;

/// Reads back where the pages of a chunk that was just allocated are: read-faults them into
/// `mapping` (every page is allocated, so this allocates nothing), asks move_pages, and drops the
/// page-table entries again.
fn read_back(mapping: &Mapping, c: &Chunk, page: u64) -> ChunkStatus {
    let mut status = ChunkStatus::new();
    match mapping.populate_read(c.offset, c.length) {
        Ok(()) => {
            for n in nodes_of(mapping, c.offset, c.length, page) {
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

/// Runs `threads` workers over `chunks` on the file `k` (its allocation under a task policy goes
/// through [`Syscalls`]). Returns the first error, if any, or else per
/// chunk `Some` once fallocate allocated every page of it (so no page cache walk is needed to
/// count it), holding its status as read back through `verify` (the mapping and page size) right
/// after the allocation, empty without `verify`; `None` for a chunk that never ran (cancelled).
/// Each worker is a fresh thread, so a task policy it sets for its chunks dies with it.
pub fn run_workers(
    k: &(impl Syscalls + Sync),
    chunks: &[Chunk],
    threads: usize,
    progress: &PopulateProgress,
    verify: Option<(&Mapping, u64)>,
) -> Result<Vec<Option<ChunkStatus>>, Errno> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = std::sync::Mutex::new(None);
    let statuses = std::sync::Mutex::new(vec![None; chunks.len()]);
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
                            k.set_task_policy(&p)?;
                            current = Some(p);
                        }
                        k.allocate(c.offset, c.length)
                    })();
                    match r {
                        Ok(()) => {
                            progress.advance_by(c.length);
                            let status = match verify {
                                Some((mapping, page)) => read_back(mapping, c, page),
                                None => ChunkStatus::new(),
                            };
                            if let Some(slot) = statuses
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_mut(i)
                            {
                                *slot = Some(status);
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
    let k = RealFile { fd, mapping, page };
    k.allocated_pages(offset, length).ok().map(|n| n * page)
}

/// Bytes of the span `(offset, length, page)` allocated once the workers are done, without
/// walking what they allocated: a chunk whose fallocate succeeded is allocated in full (fallocate
/// allocates every page of its range or fails), and only the rest of the span (chunks a cancel
/// left, or all of it when the cgroup helper ran and `done` is `None`) is counted from the page
/// cache.
pub(super) fn allocated_after(
    fd: BorrowedFd<'_>,
    mapping: Option<&Mapping>,
    (offset, length, page): (u64, u64, u64),
    chunks: &[Chunk],
    done: Option<&[Option<ChunkStatus>]>,
) -> Option<u64> {
    let end = offset + length;
    let count = |from: u64, to: u64| {
        if to > from {
            allocated_bytes(fd, mapping, from, to - from, page)
        } else {
            Some(0)
        }
    };
    let Some(done) = done else {
        return count(offset, end);
    };
    let mut bytes = 0;
    let mut at = offset;
    for c in chunks
        .iter()
        .zip(done)
        .filter_map(|(c, d)| d.as_ref().map(|_| c))
    {
        // Chunks come in file order (`plan`); anything else is counted whole.
        if c.offset < at || c.offset + c.length > end {
            return count(offset, end);
        }
        bytes += count(at, c.offset)? + c.length;
        at = c.offset + c.length;
    }
    Some(bytes + count(at, end)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{NodeSet, PolicyMode};
    use crate::kernel;

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

    /// After a cancel: the chunks fallocate completed count in full, and the rest of the span
    /// (the chunks that never ran, and pages allocated there before) comes from the page cache.
    #[test]
    fn allocated_after_counts_done_chunks_whole_and_the_rest_from_the_page_cache() {
        use std::os::fd::AsFd;
        let page = kernel::page_size();
        let fd = kernel::files::create_memfd("allocated-after", 16 * page, None).unwrap();
        let fd = fd.as_fd();
        let chunks: Vec<Chunk> = (0..4)
            .map(|i| Chunk {
                offset: i * 4 * page,
                length: 4 * page,
                policy: None,
            })
            .collect();
        // Allocated before the populate: two pages of chunk 1 and the last page of chunk 3.
        kernel::fallocate(fd, 5 * page, 2 * page, false).unwrap();
        kernel::fallocate(fd, 15 * page, page, false).unwrap();
        // The workers did chunks 0 and 2, then were cancelled.
        let done = vec![
            Some(ChunkStatus::new()),
            None,
            Some(ChunkStatus::new()),
            None,
        ];
        for c in [chunks[0], chunks[2]] {
            kernel::fallocate(fd, c.offset, c.length, false).unwrap();
        }
        let span = (0, 16 * page, page);
        assert_eq!(
            allocated_after(fd, None, span, &chunks, Some(&done)),
            Some(11 * page)
        );
        // The cgroup helper reports no chunks: the whole span is counted.
        assert_eq!(
            allocated_after(fd, None, span, &chunks, None),
            Some(11 * page)
        );
        // A span starting inside chunk 1, whose chunks are 2 and 3, and a gap before them.
        let tail = [chunks[2], chunks[3]];
        let tail_done = [Some(ChunkStatus::new()), None];
        assert_eq!(
            allocated_after(
                fd,
                None,
                (6 * page, 10 * page, page),
                &tail,
                Some(&tail_done)
            ),
            Some(6 * page)
        );
    }
}
