//! Where a range's pages are, read from the kernel without allocating.
//!
//! GetPlacement counts each range through the region's [`Census`]
//! ([`kernel::residency::count_nodes_census`]). Where the region's holder (the process the file
//! was handed to, adopted from or attached from) maps the file shared and its mappings hold every
//! allocated page of the range exactly once, the per-node counts of those mappings in its
//! `/proc/PID/numa_maps` are the answer: the holder already faulted the pages, so reading them
//! costs one walk of page tables that exist. Otherwise move_pages names the node of each page
//! the agent's long-lived mapping of the file already maps, and only the allocated pages it does
//! not map yet (from the page cache, read over those runs only) are read-faulted into it and
//! asked. They stay mapped for the next count, within the agent's [`CensusBudget`]; a punched
//! page leaves the mapping by itself. Each range says which way it was counted
//! ([`RangePlacementView::counted_from`]). The engine's migrate and the populate proof need each
//! page's node before and after, so they read-fault allocated runs into a mapping and ask
//! move_pages (`syscalls::map_resident`, `syscalls::nodes_of`).

use super::{Agent, AgentError};
use crate::domain::RangeIntent;
use crate::domain::{RegionKey, resolve_span};
use crate::kernel::{self, Mapping};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const ENOENT: i32 = -2;

/// What GetPlacement keeps mapped in a region's long-lived mapping between counts (the census):
/// the pages it read-faulted there to learn their nodes stay mapped, so the next count asks
/// move_pages about them without faulting them again (`kernel::residency::count_nodes_census`).
/// The bytes kept are charged to the agent's [`CensusBudget`] and given back when the region's
/// file is dropped.
#[derive(Debug, Default)]
pub(crate) struct Census {
    runs: kernel::residency::CensusRuns,
    budget: Option<Arc<CensusBudget>>,
}

impl Drop for Census {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// The bytes all censuses may keep mapped (`EngineSettings::placement_map_max_bytes`), and how
/// many they keep.
#[derive(Debug)]
pub(crate) struct CensusBudget {
    limit: u64,
    used: AtomicU64,
}

impl CensusBudget {
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Reserves `bytes`, if they fit.
    fn reserve(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(bytes).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }
}

impl Census {
    /// Unmaps every page the census keeps mapped in `mapping` and gives its bytes back: before a
    /// VMM gets the file, whose own mbind with `MPOL_MF_MOVE` (QEMU's `host-nodes`, with
    /// `MPOL_MF_STRICT`) would otherwise find those pages shared with the agent, leave them where
    /// they are and fail.
    pub(crate) fn forget(&mut self, mapping: Option<&Mapping>) {
        if self.runs.bytes() == 0 {
            return;
        }
        if let Some(m) = mapping {
            let _ = m.unmap_pages(0, m.len());
        }
        self.give_back();
    }

    /// Gives the bytes kept back to the budget and forgets them (their pages are unmapped, or
    /// the mapping is going).
    fn give_back(&mut self) {
        if let Some(b) = &self.budget {
            b.used.fetch_sub(self.runs.bytes(), Ordering::Relaxed);
        }
        self.runs.clear();
    }

    /// Counts one range through the census `mapping`, keeping what it faults mapped when the
    /// budget has room for the whole range.
    fn count(
        &mut self,
        budget: &Arc<CensusBudget>,
        fd: BorrowedFd<'_>,
        mapping: &Mapping,
        span: (u64, u64, u64),
        holder: Option<&kernel::residency::HolderMappings>,
    ) -> Result<kernel::residency::NodeCounts, nix::errno::Errno> {
        let budget = self.budget.get_or_insert_with(|| budget.clone()).clone();
        let before = self.runs.bytes();
        let keep = budget.reserve(span.1);
        let (offset, length, page) = span;
        let counted = kernel::residency::count_nodes_census(
            fd,
            mapping,
            &mut self.runs,
            (mapping.len(), offset, length, page),
            holder,
            keep,
        );
        let after = self.runs.bytes();
        if keep {
            // What was reserved for the range, less what it added.
            budget
                .used
                .fetch_sub(span.1 - (after - before).min(span.1), Ordering::Relaxed);
        }
        counted
    }
}

/// Pages on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeCount {
    /// Node id.
    pub node: u32,
    /// Pages.
    pub pages: u64,
}

/// Placement of one effective range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangePlacementView {
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// Pages per node.
    pub nodes: Vec<NodeCount>,
    /// Pages not allocated.
    pub not_present: u64,
    /// Pages on a node the policy does not allow.
    pub misplaced: u64,
    /// Pages whose node could not be read.
    pub unknown: u64,
    /// The pid of the holder whose page tables counted the allocated pages; `None` when the
    /// agent read-faulted them into its own window (or none is allocated).
    pub counted_from: Option<i32>,
}

/// Placement of a span of a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Per range.
    pub ranges: Vec<RangePlacementView>,
    /// Page size.
    pub page_size: u64,
}

impl Placement {
    /// Pages per node over all ranges.
    pub fn nodes(&self) -> Vec<NodeCount> {
        let mut m: BTreeMap<u32, u64> = BTreeMap::new();
        for r in &self.ranges {
            for n in &r.nodes {
                *m.entry(n.node).or_default() += n.pages;
            }
        }
        m.into_iter()
            .map(|(node, pages)| NodeCount { node, pages })
            .collect()
    }

    /// Sum of a field over ranges.
    pub fn total(&self, f: impl Fn(&RangePlacementView) -> u64) -> u64 {
        self.ranges.iter().map(f).sum()
    }
}

/// Counts the placement of one range: from the holder's mappings where they map every allocated
/// page of the range exactly once, otherwise through the region's census (its long-lived
/// mapping, [`Census`]), which keeps the pages it faulted mapped for the next count.
fn count_range(
    census: &mut Census,
    budget: &Arc<CensusBudget>,
    (fd, mapping): (BorrowedFd<'_>, &Mapping),
    r: &RangeIntent,
    page: u64,
    holder: Option<&kernel::residency::HolderMappings>,
) -> RangePlacementView {
    match census.count(budget, fd, mapping, (r.offset, r.length, page), holder) {
        Ok(c) => RangePlacementView {
            counted_from: c.counted_from,
            ..range_view(
                r,
                c.nodes
                    .into_iter()
                    .map(|(n, pages)| (n as i32, pages))
                    .chain([
                        (ENOENT, c.not_present),
                        (-(nix::errno::Errno::EIO as i32), c.unknown),
                    ]),
            )
        },
        Err(e) => range_view(r, [(-(e as i32), r.length / page)]),
    }
}

/// The holder's shared mappings of the file, when the region has a holder that maps it so that
/// at least one of `ranges` could be counted from them. A holder that is gone, maps nothing of
/// it, or whose mappings changed while they were read gives `None`, and every range is then
/// counted in the agent's own window.
fn holder_mappings(
    fd: BorrowedFd<'_>,
    holder: Option<crate::domain::Holder>,
    ranges: &[(u64, u64)],
) -> Option<kernel::residency::HolderMappings> {
    let pid = holder?.pid;
    let file_id = kernel::files::fd_file_id(fd).ok()?;
    kernel::residency::holder_mappings(pid, file_id, ranges)
        .ok()
        .filter(|h| !h.vmas.is_empty())
}

/// The placement of one range from `(status, pages)` pairs, where a status is what
/// `syscalls::map_resident` reports for a page: a node id, -ENOENT for a page not allocated, or another
/// negative errno.
pub(crate) fn range_view(
    r: &RangeIntent,
    statuses: impl IntoIterator<Item = (i32, u64)>,
) -> RangePlacementView {
    let mut per: BTreeMap<u32, u64> = BTreeMap::new();
    let mut view = RangePlacementView {
        offset: r.offset,
        length: r.length,
        nodes: Vec::new(),
        not_present: 0,
        misplaced: 0,
        unknown: 0,
        counted_from: None,
    };
    for (n, pages) in statuses {
        if n == ENOENT {
            view.not_present += pages;
        } else if n < 0 {
            view.unknown += pages;
        } else {
            *per.entry(n as u32).or_default() += pages;
            if r.policy.allows(n as u32) == Some(false) {
                view.misplaced += pages;
            }
        }
    }
    view.nodes = per
        .into_iter()
        .map(|(node, pages)| NodeCount { node, pages })
        .collect();
    view
}

/// Allocated pages of a task-policy range whose node is read, at most.
pub const CHECK_SAMPLES: u64 = 512;

/// What the kernel shows for a task-policy range now: how many of its pages are allocated
/// (exact, from the page cache), and the nodes of up to [`CHECK_SAMPLES`] allocated pages spread
/// over it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeCheck {
    /// Pages in the range.
    pub pages_total: u64,
    /// Pages allocated in the file.
    pub pages_allocated: u64,
    /// Allocated pages whose node was read.
    pub pages_sampled: u64,
    /// Sampled pages on a node the policy does not allow.
    pub pages_sampled_misplaced: u64,
    /// Sampled pages whose node could not be read.
    pub pages_sampled_unknown: u64,
}

/// Reads a [`RangeCheck`] of a range of a file of `file_len` bytes. The sampled pages are
/// read-faulted into a window of the range's own (a read fault on an allocated page allocates
/// nothing), so the agent's long-lived mapping, which placement reads use, is left alone; the
/// window goes when this returns.
pub(crate) fn check_range(
    fd: BorrowedFd<'_>,
    file_len: u64,
    r: &RangeIntent,
    page: u64,
) -> Result<RangeCheck, nix::errno::Errno> {
    let map = kernel::residency::allocated(fd, file_len, r.offset, r.length, page)?;
    let pages = map.len() as u64;
    let stride = pages.div_ceil(CHECK_SAMPLES).max(1);
    // The first allocated page of each stride.
    let mut samples = Vec::new();
    let mut bucket = u64::MAX;
    for (i, _) in map.iter().enumerate().filter(|(_, a)| **a) {
        let b = i as u64 / stride;
        if b != bucket {
            bucket = b;
            samples.push(r.offset + i as u64 * page);
        }
    }
    let mut check = RangeCheck {
        pages_total: pages,
        pages_allocated: map.iter().filter(|a| **a).count() as u64,
        pages_sampled: samples.len() as u64,
        ..Default::default()
    };
    if samples.is_empty() {
        return Ok(check);
    }
    let window = Mapping::window(fd, r.offset, r.length)?;
    let faulted: Vec<bool> = samples
        .iter()
        .map(|o| window.populate_read(*o, page).is_ok())
        .collect();
    let nodes = window.nodes_at(&samples)?;
    for (n, ok) in nodes.into_iter().zip(faulted) {
        if !ok || n < 0 {
            check.pages_sampled_unknown += 1;
        } else if r.policy.allows(n as u32) == Some(false) {
            check.pages_sampled_misplaced += 1;
        }
    }
    Ok(check)
}

impl Agent {
    /// Where the pages of `[offset, offset+length)` of a region are. Never allocates.
    pub async fn placement(
        &self,
        key: &RegionKey,
        offset: u64,
        length: u64,
    ) -> Result<Placement, AgentError> {
        let live = self.slot(key)?.read_owned().await;
        let page = live.intent.page_size(self.page_size());
        let (offset, length) = resolve_span(offset, length, live.intent.size_bytes, page)?;
        if live
            .file
            .as_ref()
            .and_then(|f| f.mapping.as_ref())
            .is_none()
        {
            return Err(AgentError::FailedPrecondition(format!(
                "region {key} has no mapping in the agent (lost, or a guest_memfd without MMAP), so its placement cannot be read"
            )));
        }
        let budget = self.census_budget().clone();
        let ranges = Agent::blocking(move || {
            let Some((file, mapping)) = live
                .file
                .as_ref()
                .and_then(|f| Some((f, f.mapping.as_ref()?)))
            else {
                return Vec::new();
            };
            let fd = file.fd.as_fd();
            let ranges = live.intent.ranges.clipped(offset, offset + length);
            let spans: Vec<(u64, u64)> = ranges.iter().map(|r| (r.offset, r.length)).collect();
            let holder = holder_mappings(fd, live.intent.holder, &spans);
            // One count of a region at a time: they share its census.
            let mut census = file.census.lock().unwrap_or_else(|p| p.into_inner());
            ranges
                .iter()
                .map(|r| {
                    count_range(
                        &mut census,
                        &budget,
                        (fd, mapping),
                        r,
                        page,
                        holder.as_ref(),
                    )
                })
                .collect()
        })
        .await?;
        Ok(Placement {
            ranges,
            page_size: page,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of a region's long-lived mapping that are mapped now.
    async fn mapped_pages(agent: &Agent, key: &RegionKey) -> usize {
        let live = agent.slot(key).unwrap().read_owned().await;
        let m = live.file.as_ref().unwrap().mapping.as_ref().unwrap();
        m.page_nodes(0, m.len(), agent.page_size())
            .unwrap()
            .iter()
            .filter(|s| **s >= 0)
            .count()
    }

    /// What GetPlacement keeps mapped is charged to the budget and kept only while it fits;
    /// counts are right either way; a handoff unmaps the region's pages and gives its bytes back,
    /// and so does a delete.
    #[tokio::test]
    async fn placement_keeps_what_fits_its_budget_and_gives_it_back() {
        use crate::domain::{Backend, NodeSet, Policy, PolicyMode};
        use crate::engine::{CreateRequest, EngineSettings};
        let dir = tempfile::tempdir().unwrap();
        let usable: Vec<u32> = crate::topology::TopologyReader::host()
            .read()
            .usable
            .iter()
            .collect();
        let page = kernel::page_size();
        let agent = Agent::start(
            crate::store::Store::open(&dir.path().join("s.db"), std::time::Duration::from_secs(5))
                .await
                .unwrap(),
            kernel::probe::probe(&usable),
            crate::topology::TopologyReader::host(),
            EngineSettings {
                placement_map_max_bytes: 12 * page,
                ..EngineSettings::default()
            },
        )
        .await
        .unwrap();
        let used = || agent.census_budget().used.load(Ordering::Relaxed);
        let bind0 = Policy::new(PolicyMode::Bind, NodeSet::from_ids([0]).unwrap());
        let keys = ["a", "b"].map(|n| RegionKey::parse("vm", n).unwrap());
        for key in &keys {
            let req = CreateRequest {
                key: key.clone(),
                size_bytes: 8 * page,
                backend: Backend::Memfd,
                hugepage_size_bytes: 0,
                policies: vec![(0, 0, bind0)],
            };
            agent.create_region(req, "test", None).await.unwrap();
            let req = crate::engine::PopulateRequest {
                key: key.clone(),
                offset: 0,
                length: 0,
                threads: 1,
                cgroup: None,
                verify: false,
            };
            let progress = Arc::new(crate::engine::PopulateProgress::default());
            agent.populate(req, &progress, "test").await.unwrap();
        }
        let on_node0 = |p: &Placement| (p.nodes(), p.total(|r| r.not_present));
        let all8 = (vec![NodeCount { node: 0, pages: 8 }], 0);
        // a fits: kept.
        let p = agent.placement(&keys[0], 0, 0).await.unwrap();
        assert_eq!(on_node0(&p), all8);
        assert_eq!(
            (used(), mapped_pages(&agent, &keys[0]).await),
            (8 * page, 8)
        );
        // Counted again: the same answer, still kept once.
        let p = agent.placement(&keys[0], 0, 0).await.unwrap();
        assert_eq!(on_node0(&p), all8);
        assert_eq!(used(), 8 * page);
        // b does not fit beside it: counted, not kept.
        let p = agent.placement(&keys[1], 0, 0).await.unwrap();
        assert_eq!(on_node0(&p), all8);
        assert_eq!(
            (used(), mapped_pages(&agent, &keys[1]).await),
            (8 * page, 0)
        );
        // A handoff of a unmaps its pages and gives their bytes back.
        let me = crate::domain::Holder {
            pid: std::process::id() as i32,
            start_time: 0,
        };
        agent.record_holder(&keys[0], me, "test").await.unwrap();
        assert_eq!((used(), mapped_pages(&agent, &keys[0]).await), (0, 0));
        // Now b fits; its delete gives the bytes back.
        agent.placement(&keys[1], 0, 0).await.unwrap();
        assert_eq!(used(), 8 * page);
        agent.delete_region(&keys[1], "test", None).await.unwrap();
        assert_eq!(used(), 0);
    }

    /// A read fault that fails leaves the run's pages unknown, not "not present", even where
    /// move_pages could still name the node of a page mapped earlier.
    #[test]
    fn failed_read_fault_is_unknown() {
        let page = kernel::page_size();
        let fd = kernel::create_memfd("fault-test", 2 * page, None).unwrap();
        let mapping = Mapping::new(fd.as_fd(), 2 * page).unwrap();
        // Page 0 allocated and mapped here; page 1 a hole whose read fault fails.
        mapping.write(0, &[1]).unwrap();
        let _uffd = mapping.fail_faults_on_holes(0, 2 * page).unwrap();
        assert!(mapping.populate_read(0, 2 * page).is_err());
        let nodes = crate::engine::syscalls::fault_and_query(&mapping, 0, 2 * page, page);
        assert_eq!(nodes.len(), 2);
        for n in &nodes {
            assert!(
                *n < 0 && *n != ENOENT,
                "expected unknown statuses: {nodes:?}"
            );
        }
        let view = range_view(
            &RangeIntent {
                offset: 0,
                length: 2 * page,
                policy: crate::domain::Policy::DEFAULT,
                placed: false,
            },
            nodes.into_iter().map(|n| (n, 1)),
        );
        assert_eq!((view.unknown, view.not_present), (2, 0), "{view:?}");
    }
}
