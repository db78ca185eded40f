//! The engine's core: the [`Agent`] with its region map, VM registry, event bus and store, and the
//! plumbing every operation shares: lookups, durable events, commits, and [`Agent::blocking`],
//! which runs kernel work on a blocking thread.
//!
//! Locks: the region and VM maps are `parking_lot` mutexes, held only to look up or insert (never
//! across an await or a syscall), and they do not poison: a panic elsewhere cannot wedge every
//! later request. Each region is a tokio `RwLock`, held across its kernel work.

use super::error::AgentError;
use super::handles::{Journal, Regions, Vms};
use super::live::{LiveRegion, RegionView, Slot};
use crate::domain::{Event, EventKind, RegionKey, Strategy, VmId};
use crate::handoff::token::TokenKey;
use crate::kernel::{GuestMemfdVm, probe::Features};
use crate::store::{Store, WriteOp, unix_now_ms};
use crate::topology::{Topology, TopologyCache};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::ops::Deref;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tokio::sync::broadcast;

/// What callers may ask for (region limits), and the engine's fixed choices (forced strategy, how long memory outlives its holder).
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Regions at most.
    pub max_regions: usize,
    /// Ranges per region at most (each can split a kernel VMA; vm.max_map_count is finite).
    pub max_ranges_per_region: usize,
    /// Bytes per region at most.
    pub max_region_bytes: u64,
    /// The strategy of every new region, when the configuration forces one (`force_strategy`);
    /// `None` picks per backend from the probed capabilities.
    pub force_strategy: Option<Strategy>,
    /// How long a region the agent made keeps its memory after its last holder exited, for a
    /// VMM that restarts; `None` keeps it until it is deleted (see `engine::holders`).
    pub keep_after_holder_exit: Option<std::time::Duration>,
    /// Bytes of guest memory GetPlacement may keep mapped in the agent between calls, over all
    /// regions, so that a count does not fault again what it faulted before (see
    /// `engine::placement::Census`). Each GiB kept costs about 2 MiB of page tables.
    pub placement_map_max_bytes: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_regions: 4096,
            max_ranges_per_region: 256,
            max_region_bytes: 1 << 40,
            force_strategy: None,
            keep_after_holder_exit: Some(std::time::Duration::from_secs(
                DEFAULT_KEEP_AFTER_HOLDER_EXIT_SECS,
            )),
            placement_map_max_bytes: DEFAULT_PLACEMENT_MAP_MAX_BYTES,
        }
    }
}

/// The default of `placement_map_max_bytes`: 16 GiB, whose page tables take about 32 MiB.
pub const DEFAULT_PLACEMENT_MAP_MAX_BYTES: u64 = 16 << 30;

/// The default of `release_agent_regions_after`: five minutes, long enough for a supervisor
/// (systemd, libvirt, a Kubernetes restart) to bring a crashed VMM back to the memory it had,
/// short enough that a VM that is gone for good does not pin its RAM for long.
pub const DEFAULT_KEEP_AFTER_HOLDER_EXIT_SECS: u64 = 300;

/// Counters the metrics endpoint reads.
#[derive(Debug, Default)]
pub struct AgentCounters {
    /// Ranges found drifted.
    pub drifted: std::sync::atomic::AtomicU64,
    /// Ranges re-applied.
    pub reapplied: std::sync::atomic::AtomicU64,
    /// Regions lost.
    pub regions_lost: std::sync::atomic::AtomicU64,
    /// Regions released after their last holder exited.
    pub regions_released: std::sync::atomic::AtomicU64,
    /// Handoffs served.
    pub handoffs: std::sync::atomic::AtomicU64,
    /// Drifts found per range: (region, range offset) to count.
    range_drifts: Mutex<BTreeMap<(RegionKey, u64), u64>>,
}

impl AgentCounters {
    /// Counts one drift on each range of region `key` at the given offsets.
    pub(crate) fn count_range_drifts(&self, key: &RegionKey, offsets: &[u64]) {
        if offsets.is_empty() {
            return;
        }
        let mut m = self.range_drifts.lock();
        for &o in offsets {
            *m.entry((key.clone(), o)).or_default() += 1;
        }
    }

    /// Drifts found so far per (region, range offset), for the metrics to read.
    pub fn range_drifts(&self) -> Vec<((RegionKey, u64), u64)> {
        self.range_drifts
            .lock()
            .iter()
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }
}

/// The engine. Its state is private: each job takes the narrow handle it needs
/// ([`Agent::regions`]; the journal through [`Agent::commit`], [`Agent::store`] and
/// [`Agent::subscribe`]; the VMs through [`Agent::vm_for`]) and the host's facts through
/// accessors.
pub struct Agent {
    journal: Journal,
    regions: Regions,
    vms: Vms,
    features: Features,
    topology: TopologyCache,
    page: u64,
    settings: EngineSettings,
    tokens: TokenKey,
    /// Holders to watch for exit (see `engine::holders`).
    holder_watch: tokio::sync::mpsc::UnboundedSender<crate::domain::Holder>,
    /// Bytes GetPlacement keeps mapped, over all regions (see `engine::placement::Census`).
    census_budget: std::sync::Arc<super::placement::CensusBudget>,
    /// Counters for metrics.
    pub counters: AgentCounters,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").finish_non_exhaustive()
    }
}

/// The actor recorded for the agent's own actions.
pub const AGENT_ACTOR: &str = "agent";

impl Agent {
    /// An engine with no region yet (see `start.rs`, which recovers the stored ones).
    pub(crate) fn new(
        store: Store,
        features: Features,
        topology: TopologyCache,
        settings: EngineSettings,
        secret: &[u8],
        holder_watch: tokio::sync::mpsc::UnboundedSender<crate::domain::Holder>,
    ) -> Self {
        let census_budget = std::sync::Arc::new(super::placement::CensusBudget::new(
            settings.placement_map_max_bytes,
        ));
        Self {
            journal: Journal::new(store),
            regions: Regions::default(),
            vms: Vms::default(),
            features,
            topology,
            page: crate::kernel::page_size(),
            settings,
            tokens: TokenKey::new(secret),
            holder_watch,
            census_budget,
            counters: AgentCounters::default(),
        }
    }

    /// The live regions.
    pub(crate) fn regions(&self) -> &Regions {
        &self.regions
    }

    /// Bytes GetPlacement keeps mapped, over all regions.
    pub(crate) fn census_budget(&self) -> &std::sync::Arc<super::placement::CensusBudget> {
        &self.census_budget
    }

    /// What callers may ask for, and the engine's fixed choices.
    pub(crate) fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// The host's topology as last cached (policy checks; see [`TopologyCache`]).
    pub(crate) fn cached_topology(&self) -> &TopologyCache {
        &self.topology
    }

    /// The kernel features probed at start.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// The store.
    pub fn store(&self) -> &Store {
        self.journal.store()
    }

    /// Base page size.
    pub fn page_size(&self) -> u64 {
        self.page
    }

    /// Reads the topology now (free memory and huge pages as they are; this also refreshes the
    /// cached shape that policy checks use, see [`TopologyCache`]).
    pub fn topology(&self) -> Topology {
        self.topology.read_now()
    }

    /// The handoff token of a VM (see [`crate::handoff::token`]).
    pub fn vm_token(&self, vm_id: &str) -> String {
        self.tokens.token(vm_id)
    }

    /// Whether `token` is the VM's handoff token, compared in constant time.
    pub fn check_token(&self, vm_id: &str, token: &str) -> bool {
        self.tokens.check(vm_id, token)
    }

    /// Watches holder `h`: when it exits, `Agent::holder_exited` (`engine::holders`) runs.
    pub(crate) fn watch_holder(&self, h: crate::domain::Holder) {
        let _ = self.holder_watch.send(h);
    }

    /// Runs kernel work on tokio's blocking pool and waits for it without blocking the runtime
    /// (on any runtime flavour; `block_in_place` panics on a current-thread runtime). The closure
    /// owns what it touches: a region is passed in as an owned guard and handed back with the
    /// result. A panic in the work is answered as [`AgentError::Internal`], not propagated.
    pub(crate) async fn blocking<T, F>(f: F) -> Result<T, AgentError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        tokio::task::spawn_blocking(f).await.map_err(|e| {
            AgentError::Internal(format!("kernel work on a blocking thread failed: {e}"))
        })
    }

    /// Subscribes to live events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.journal.subscribe()
    }

    pub(crate) fn slot(&self, key: &RegionKey) -> Result<Slot, AgentError> {
        self.regions.get(key)
    }

    pub(crate) fn slots(&self, vm_id: Option<&str>) -> Vec<Slot> {
        self.regions.all(vm_id)
    }

    /// Appends an event durably and broadcasts it.
    pub async fn emit(
        &self,
        kind: EventKind,
        key: Option<&RegionKey>,
        message: String,
        actor: &str,
    ) -> Result<(), AgentError> {
        self.journal
            .commit(Vec::new(), vec![event(kind, key, message, actor)])
            .await
    }

    /// An event to commit (its sequence is set when it is written).
    pub(crate) fn event(
        &self,
        kind: EventKind,
        key: Option<&RegionKey>,
        message: String,
        actor: &str,
    ) -> Event {
        event(kind, key, message, actor)
    }

    /// Commits `ops` plus events, then broadcasts the events with their sequence numbers, and
    /// watches every holder it recorded.
    pub(crate) async fn commit(
        &self,
        ops: Vec<WriteOp>,
        events: Vec<Event>,
    ) -> Result<(), AgentError> {
        let holders: Vec<_> = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::SaveHolder { holder, .. } => *holder,
                WriteOp::InsertRegion(r) => r.holder,
                _ => None,
            })
            .collect();
        self.journal.commit(ops, events).await?;
        // A holder recorded durably is watched for exit from now on.
        for h in holders {
            self.watch_holder(h);
        }
        Ok(())
    }

    /// The VM this vm_id's guest_memfd files are made on (see [`Vms::for_vm`]).
    pub(crate) async fn vm_for(&self, vm_id: &str) -> Result<Arc<GuestMemfdVm>, AgentError> {
        self.vms.for_vm(vm_id).await
    }

    /// Forgets a vm_id's VM once no region of that VM is left.
    pub(crate) fn release_vm_if_unused(&self, vm_id: &str) {
        self.vms.release_if_unused(vm_id, &self.regions);
    }

    /// Uses a VMM's VM fd for this vm_id's later guest_memfd regions, with its audit event: the
    /// event is durable before the VM is used, and when it cannot be written nothing is attached
    /// and the error is returned.
    pub async fn attach_vm_audited(
        &self,
        vm_id: &VmId,
        fd: OwnedFd,
        message: String,
        actor: &str,
    ) -> Result<(), AgentError> {
        let vm = vm_of_fd(fd)?;
        let mut ev = event(EventKind::VmAttached, None, message, actor);
        ev.vm_id = vm_id.to_string();
        self.journal.commit(Vec::new(), vec![ev]).await?;
        self.vms.insert(vm_id.as_str(), vm);
        Ok(())
    }
}

/// An event to commit (its sequence is set when it is written).
pub(crate) fn event(
    kind: EventKind,
    key: Option<&RegionKey>,
    message: String,
    actor: &str,
) -> Event {
    Event {
        sequence: 0,
        time_unix_ms: unix_now_ms(),
        kind,
        vm_id: key.map(|k| k.vm_id.clone()).unwrap_or_default(),
        name: key.map(|k| k.name.clone()).unwrap_or_default(),
        message,
        actor: actor.to_string(),
    }
}

fn vm_of_fd(fd: OwnedFd) -> Result<GuestMemfdVm, AgentError> {
    GuestMemfdVm::from_fd(fd)
        .map_err(|_| AgentError::InvalidArgument("the fd handed in is not a KVM VM fd".into()))
}

/// A random (version 4) UUID for a new region.
pub(crate) fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Agent {
    /// A view without reading the kernel: every range pending. Used for stored first answers.
    pub(crate) fn view_without_kernel(&self, live: &LiveRegion) -> RegionView {
        live.view_without_kernel(self.page)
    }

    /// [`LiveRegion::view`]: inline when it needs no kernel call, else on a blocking thread; the
    /// region (an owned guard, or a boxed region not yet in the map) is handed back with its view.
    pub(crate) async fn view_of<G>(&self, live: G) -> Result<(G, RegionView), AgentError>
    where
        G: Deref<Target = LiveRegion> + Send + 'static,
    {
        let page = self.page;
        if live.answers_from_check() {
            let view = live.view(page);
            return Ok((live, view));
        }
        Agent::blocking(move || {
            let view = live.view(page);
            (live, view)
        })
        .await
    }

    /// [`LiveRegion::fresh_view`] on a blocking thread.
    pub(crate) async fn fresh_view_of<G>(&self, live: G) -> Result<(G, RegionView), AgentError>
    where
        G: std::ops::DerefMut<Target = LiveRegion> + Send + 'static,
    {
        let page = self.page;
        Agent::blocking(move || {
            let mut live = live;
            let view = live.fresh_view(page);
            (live, view)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Backend, NodeSet, Policy, PolicyMode};
    use crate::engine::CreateRequest;
    use crate::kernel;
    use crate::topology::TopologyReader;
    use std::time::Duration;

    /// The engine runs on a current-thread runtime (`#[tokio::test]`'s default): kernel work goes
    /// through `spawn_blocking`, where `block_in_place` would panic. Every operation that reads
    /// or changes the kernel is called once, on a memfd region bound to node 0, and a restart of
    /// the agent recovers the region.
    #[tokio::test]
    async fn the_engine_runs_on_a_current_thread_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let usable: Vec<u32> = TopologyReader::host().read().usable.iter().collect();
        let features = kernel::probe::probe(&usable);
        let open = || Store::open(&db, Duration::from_secs(5));
        let agent = Agent::start(
            open().await.unwrap(),
            features.clone(),
            TopologyReader::host(),
            EngineSettings::default(),
        )
        .await
        .unwrap();
        let page = agent.page_size();
        let key = RegionKey::parse("vm", "r").unwrap();
        let bind0 = Policy::new(PolicyMode::Bind, NodeSet::from_ids([0]).unwrap());
        let req = CreateRequest {
            key: key.clone(),
            size_bytes: 4 * page,
            backend: Backend::Memfd,
            hugepage_size_bytes: 0,
            policies: vec![(0, 0, bind0)],
        };
        let v = agent.create_region(req, "test", None).await.unwrap();
        assert_eq!(v.ranges.len(), 1);
        assert_eq!(v.ranges[0].observed, Some(bind0));
        let out = agent
            .set_policy(
                crate::engine::SetPolicyRequest {
                    key: key.clone(),
                    offset: page,
                    length: page,
                    policy: Policy::DEFAULT,
                    migrate: true,
                    expected_generation: 0,
                },
                "test",
                None,
            )
            .await
            .unwrap();
        assert_eq!(out.region.ranges.len(), 3);
        assert_eq!(agent.get_region(&key, false).await.unwrap().ranges.len(), 3);
        let report = agent.reconcile(None, "test").await.unwrap();
        // Three ranges of one page, each reading its intent: checked, nothing to re-bind.
        assert_eq!((report.checked, report.reapplied), (3, 0), "{report:?}");
        let progress = Arc::new(crate::engine::PopulateProgress::default());
        let req = crate::engine::PopulateRequest {
            key: key.clone(),
            offset: 0,
            length: 0,
            threads: 1,
            cgroup: None,
            verify: true,
        };
        let done = agent.populate(req, &progress, "test").await.unwrap();
        assert_eq!(done.bytes_done, 4 * page);
        let placed = agent.placement(&key, 0, 0).await.unwrap();
        assert_eq!(placed.total(|r| r.not_present), 0);
        drop(agent);
        // Never handed off: the restart recreates the file (empty) and re-binds every range.
        let agent = Agent::start(
            open().await.unwrap(),
            features,
            TopologyReader::host(),
            EngineSettings::default(),
        )
        .await
        .unwrap();
        let v = agent
            .list_regions(Some(&VmId::parse("vm").unwrap()))
            .await
            .unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].ranges[0].observed, Some(bind0));
        agent.delete_region(&key, "test", None).await.unwrap();
        assert!(agent.list_regions(None).await.unwrap().is_empty());
    }
}
