//! The agent's engine: it owns the live regions (fd, mapping, intent), turns requests into durable
//! intent first and kernel changes second, reads back what the kernel holds, and brings regions
//! back after a restart. Blocking syscalls run on blocking threads.

mod attach;
mod placement;
mod populate;
mod recover;

pub use attach::AttachIdempotency;
pub use placement::{NodeCount, Placement, RangePlacementView};
pub use populate::{
    PopulateOutcome, PopulateProgress, PopulateRequest, child_main as populate_child_main,
};

use crate::domain::{
    Backend, DomainError, Event, EventKind, Holder, Policy, PolicyMode, RangeIntent, RangeMap,
    RegionIntent, RegionKey, RegionStatus, Strategy, resolve_span, validate_name,
};
use crate::kernel::{self, GuestMemfdVm, Mapping, probe::Capabilities};
use crate::store::{Store, StoreError, WriteOp, unix_now, unix_now_ms};
use crate::topology::{Topology, TopologyReader};
use nix::errno::Errno;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex as StdMutex};
use tokio::sync::{RwLock, broadcast};

/// Failures of agent operations. The API turns each into one gRPC code, in one place.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad caller input.
    #[error(transparent)]
    Invalid(#[from] DomainError),
    /// Bad caller input not covered by the domain rules.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such region.
    #[error("region {0} not found")]
    NotFound(RegionKey),
    /// No such process (AttachProcess).
    #[error("{0}")]
    ProcessNotFound(String),
    /// The region exists.
    #[error("region {0} already exists")]
    AlreadyExists(RegionKey),
    /// A request id was reused for another request.
    #[error("request_id {0:?} was already used for a different request")]
    RequestIdReused(String),
    /// The request id was committed by a concurrent call; its stored answer applies.
    #[error("request_id {0:?} was committed by a concurrent call")]
    DuplicateRequest(String),
    /// The host or region cannot do this now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// expected_generation did not match.
    #[error("region {key} is at generation {actual}, not the expected {expected}")]
    GenerationConflict {
        /// The region.
        key: RegionKey,
        /// What the caller expected.
        expected: u64,
        /// What it is.
        actual: u64,
    },
    /// Not enough memory or another limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A kernel call failed.
    #[error("{op} failed: {errno}")]
    Kernel {
        /// What was attempted.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
}

fn kerr(op: &'static str) -> impl FnOnce(Errno) -> AgentError {
    move |errno| AgentError::Kernel { op, errno }
}

/// Limits on what callers may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Regions at most.
    pub max_regions: usize,
    /// Ranges per region at most (each can split a kernel VMA; vm.max_map_count is finite).
    pub max_ranges_per_region: usize,
    /// Bytes per region at most.
    pub max_region_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_regions: 4096,
            max_ranges_per_region: 256,
            max_region_bytes: 1 << 40,
        }
    }
}

/// The agent's open file of a region.
#[derive(Debug)]
pub(crate) struct RegionFile {
    fd: OwnedFd,
    /// The agent's own shared mapping; None where the file cannot be mapped.
    mapping: Option<Mapping>,
    /// The VM a guest_memfd belongs to, when the agent has its fd.
    vm: Option<Arc<GuestMemfdVm>>,
}

/// One live region: durable intent plus the agent's handles, and per-range apply errors.
#[derive(Debug)]
pub(crate) struct LiveRegion {
    intent: RegionIntent,
    file: Option<RegionFile>,
    /// Last apply error by range offset; cleared on success.
    errors: HashMap<u64, String>,
}

type Slot = Arc<RwLock<LiveRegion>>;

/// Where a range stands against the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeState {
    /// The kernel reports the intent.
    Applied,
    /// Not in force yet.
    Pending,
    /// The last apply failed.
    Failed,
    /// The kernel reports something else.
    Drifted,
}

/// A range with what the kernel reports.
#[derive(Clone, Debug)]
pub struct RangeView {
    /// Intent.
    pub intent: RangeIntent,
    /// Observed from the kernel.
    pub observed: Option<Policy>,
    /// State.
    pub state: RangeState,
    /// Last error.
    pub last_error: String,
}

/// A region with observed state, as the API returns it.
#[derive(Clone, Debug)]
pub struct RegionView {
    /// Durable intent.
    pub intent: RegionIntent,
    /// Ranges with observed policies.
    pub ranges: Vec<RangeView>,
    /// Page size of the file.
    pub page_size: u64,
}

/// Encodes the first answer to a request from the committed region.
pub type EncodeAnswer = Box<dyn Fn(&RegionView) -> Vec<u8> + Send + Sync>;

/// An idempotency record to commit with a mutation: the request id, a digest of the request, and
/// the encoded first answer.
pub struct Idempotency {
    /// The id.
    pub request_id: String,
    /// The method.
    pub method: &'static str,
    /// Digest of the request.
    pub fingerprint: Vec<u8>,
    /// Encodes the answer from the committed intent (and token, for creates).
    pub encode: EncodeAnswer,
}

/// The outcome of SetPolicy.
#[derive(Clone, Debug)]
pub struct SetPolicyOutcome {
    /// The region after the change.
    pub region: RegionView,
    /// Pages moved with migrate.
    pub pages_migrated: u64,
    /// Pages that could not move.
    pub pages_migrate_failed: u64,
}

/// A CreateRegion request in domain terms.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    /// Identity.
    pub key: RegionKey,
    /// Size.
    pub size_bytes: u64,
    /// Backend.
    pub backend: Backend,
    /// Huge page size, 0 for default.
    pub hugepage_size_bytes: u64,
    /// Initial policies: (offset, length, policy).
    pub policies: Vec<(u64, u64, Policy)>,
}

/// Totals of a reconcile pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Regions checked.
    pub regions: u32,
    /// Ranges compared.
    pub checked: u32,
    /// Ranges applied again.
    pub reapplied: u32,
    /// Ranges found drifted.
    pub drifted: u32,
    /// Ranges that failed.
    pub failed: u32,
}

/// Counters the metrics endpoint reads.
#[derive(Debug, Default)]
pub struct AgentCounters {
    /// Ranges found drifted.
    pub drifted: std::sync::atomic::AtomicU64,
    /// Ranges re-applied.
    pub reapplied: std::sync::atomic::AtomicU64,
    /// Regions lost.
    pub regions_lost: std::sync::atomic::AtomicU64,
    /// Handoffs served.
    pub handoffs: std::sync::atomic::AtomicU64,
}

/// The engine.
pub struct Agent {
    store: Store,
    caps: Capabilities,
    topology: TopologyReader,
    page: u64,
    limits: Limits,
    regions: StdMutex<BTreeMap<RegionKey, Slot>>,
    /// Serializes creates and deletes, so region counts and names stay consistent.
    membership: tokio::sync::Mutex<()>,
    vms: StdMutex<HashMap<String, Arc<GuestMemfdVm>>>,
    events: broadcast::Sender<Event>,
    token_key: Vec<u8>,
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
    /// Builds the engine from an open store and probed capabilities, then recovers every stored
    /// region (see [`Agent::recover`]).
    pub async fn start(
        store: Store,
        caps: Capabilities,
        topology: TopologyReader,
        limits: Limits,
    ) -> Result<Arc<Self>, AgentError> {
        let token_key = store
            .meta_or_init("handoff_token_key", || {
                let mut k = vec![0u8; 32];
                rand::fill(&mut k[..]);
                k
            })
            .await?;
        let (events, _) = broadcast::channel(4096);
        let agent = Arc::new(Self {
            store,
            caps,
            topology,
            page: kernel::page_size(),
            limits,
            regions: StdMutex::new(BTreeMap::new()),
            membership: tokio::sync::Mutex::new(()),
            vms: StdMutex::new(HashMap::new()),
            events,
            token_key,
            counters: AgentCounters::default(),
        });
        agent.recover().await?;
        agent
            .emit(
                EventKind::AgentStarted,
                None,
                "agent started".into(),
                AGENT_ACTOR,
            )
            .await?;
        Ok(agent)
    }

    /// Probed capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Base page size.
    pub fn page_size(&self) -> u64 {
        self.page
    }

    /// Reads the topology now.
    pub fn topology(&self) -> Topology {
        self.topology.read()
    }

    /// Subscribes to live events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The handoff token of a VM: HMAC-SHA256 of the vm_id under the agent's secret. One token
    /// per VM lets its VMM acquire, adopt and attach for that VM only; it survives restarts.
    pub fn vm_token(&self, vm_id: &str) -> String {
        use hmac::{Mac, digest::KeyInit};
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.token_key)
            .expect("HMAC takes any key length");
        mac.update(vm_id.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Whether `token` is the VM's token, compared in constant time.
    pub fn check_token(&self, vm_id: &str, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        let want = self.vm_token(vm_id);
        want.len() == token.len() && bool::from(want.as_bytes().ct_eq(token.as_bytes()))
    }

    fn slot(&self, key: &RegionKey) -> Result<Slot, AgentError> {
        self.regions
            .lock()
            .expect("region map lock")
            .get(key)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(key.clone()))
    }

    fn slots(&self, vm_id: Option<&str>) -> Vec<Slot> {
        self.regions
            .lock()
            .expect("region map lock")
            .iter()
            .filter(|(k, _)| vm_id.is_none_or(|v| k.vm_id == v))
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Appends an event durably and broadcasts it.
    pub async fn emit(
        &self,
        kind: EventKind,
        key: Option<&RegionKey>,
        message: String,
        actor: &str,
    ) -> Result<(), AgentError> {
        let mut event = self.event(kind, key, message, actor);
        let seqs = self
            .store
            .write(vec![WriteOp::AppendEvent(event.clone())])
            .await?;
        event.sequence = seqs.first().copied().unwrap_or(0);
        let _ = self.events.send(event);
        Ok(())
    }

    fn event(
        &self,
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

    /// Commits `ops` plus events, then broadcasts the events with their sequence numbers.
    async fn commit(&self, mut ops: Vec<WriteOp>, events: Vec<Event>) -> Result<(), AgentError> {
        let n = events.len();
        ops.extend(events.iter().cloned().map(WriteOp::AppendEvent));
        let seqs = self.store.write(ops).await?;
        for (mut e, seq) in events.into_iter().zip(seqs).take(n) {
            e.sequence = seq;
            let _ = self.events.send(e);
        }
        Ok(())
    }

    /// Checks a policy against the modes this kernel supports and the nodes the agent may use.
    pub fn check_policy(&self, policy: &Policy) -> Result<(), AgentError> {
        policy.validate()?;
        let unsupported = match policy.mode {
            PolicyMode::PreferredMany if !self.caps.preferred_many => {
                Some("preferred-many (5.15+)")
            }
            PolicyMode::WeightedInterleave if !self.caps.weighted_interleave => {
                Some("weighted-interleave (6.9+)")
            }
            _ => None,
        };
        if let Some(m) = unsupported {
            return Err(AgentError::FailedPrecondition(format!(
                "policy mode {m} is not supported by kernel {}",
                self.caps.kernel_release
            )));
        }
        policy.check_usable(&self.topology.read().usable)?;
        Ok(())
    }

    fn strategy_for(&self, backend: Backend) -> Strategy {
        // Tests prove the task-policy path on memfd in multi-node guests, where KVM is absent.
        if std::env::var("MEMPLACE_FORCE_STRATEGY").as_deref() == Ok("task-policy") {
            return Strategy::TaskPolicy;
        }
        let shared = match backend {
            Backend::Memfd => self.caps.memfd_shared_policy,
            Backend::GuestMemfd => self.caps.guest_memfd_shared_policy,
            Backend::MemfdHugetlb => self.caps.hugetlb_shared_policy,
        };
        if shared {
            Strategy::SharedPolicy
        } else {
            Strategy::TaskPolicy
        }
    }

    fn vm_for(&self, vm_id: &str) -> Result<Arc<GuestMemfdVm>, AgentError> {
        let mut vms = self.vms.lock().expect("vm map lock");
        if let Some(vm) = vms.get(vm_id) {
            return Ok(vm.clone());
        }
        let vm = Arc::new(GuestMemfdVm::create().map_err(kerr("creating a KVM VM"))?);
        vms.insert(vm_id.to_string(), vm.clone());
        Ok(vm)
    }

    /// Uses a VMM's VM fd for this vm_id's later guest_memfd regions.
    pub fn attach_vm(&self, vm_id: &str, fd: OwnedFd) -> Result<(), AgentError> {
        let vm = GuestMemfdVm::from_fd(fd).map_err(|_| {
            AgentError::InvalidArgument("the fd handed in is not a KVM VM fd".into())
        })?;
        self.vms
            .lock()
            .expect("vm map lock")
            .insert(vm_id.to_string(), Arc::new(vm));
        Ok(())
    }

    /// Creates the kernel file of a region.
    fn create_file(&self, intent: &RegionIntent) -> Result<RegionFile, AgentError> {
        match intent.backend {
            Backend::Memfd | Backend::MemfdHugetlb => {
                let huge =
                    (intent.backend == Backend::MemfdHugetlb).then_some(intent.hugepage_size_bytes);
                let fd = kernel::create_memfd(&intent.key.to_string(), intent.size_bytes, huge)
                    .map_err(kerr("memfd_create"))?;
                let mapping = Mapping::new(fd.as_fd(), intent.size_bytes).map_err(kerr("mmap"))?;
                Ok(RegionFile {
                    fd,
                    mapping: Some(mapping),
                    vm: None,
                })
            }
            Backend::GuestMemfd => {
                let vm = self.vm_for(&intent.key.vm_id)?;
                let flags = self.caps.guest_memfd_flags
                    & (kernel::files::GUEST_MEMFD_FLAG_MMAP
                        | kernel::files::GUEST_MEMFD_FLAG_INIT_SHARED);
                let fd = vm
                    .create_guest_memfd(intent.size_bytes, flags)
                    .map_err(kerr("KVM_CREATE_GUEST_MEMFD"))?;
                let mapping = if flags & kernel::files::GUEST_MEMFD_FLAG_MMAP != 0 {
                    Some(Mapping::new(fd.as_fd(), intent.size_bytes).map_err(kerr("mmap"))?)
                } else {
                    None
                };
                Ok(RegionFile {
                    fd,
                    mapping,
                    vm: Some(vm),
                })
            }
        }
    }

    fn check_backend(&self, req: &CreateRequest) -> Result<u64, AgentError> {
        match req.backend {
            Backend::GuestMemfd => {
                if !self.caps.kvm_usable {
                    return Err(AgentError::FailedPrecondition(format!(
                        "guest_memfd regions need KVM, which is not usable here ({}); memfd regions still work",
                        self.caps.kvm_error
                    )));
                }
                if !self.caps.guest_memfd_supported {
                    return Err(AgentError::FailedPrecondition(format!(
                        "kernel {} does not support guest_memfd (KVM_CAP_GUEST_MEMFD); use a memfd backend",
                        self.caps.kernel_release
                    )));
                }
                if req.hugepage_size_bytes != 0 {
                    return Err(AgentError::InvalidArgument(
                        "hugepage_size_bytes applies only to BACKEND_MEMFD_HUGETLB".into(),
                    ));
                }
                Ok(self.page)
            }
            Backend::Memfd => {
                if req.hugepage_size_bytes != 0 {
                    return Err(AgentError::InvalidArgument(
                        "hugepage_size_bytes applies only to BACKEND_MEMFD_HUGETLB".into(),
                    ));
                }
                Ok(self.page)
            }
            Backend::MemfdHugetlb => {
                let sizes: Vec<u64> = self
                    .topology
                    .read()
                    .nodes
                    .iter()
                    .flat_map(|n| n.hugepages.iter().map(|h| h.page_size))
                    .collect();
                let hp = if req.hugepage_size_bytes == 0 {
                    2 << 20
                } else {
                    req.hugepage_size_bytes
                };
                if !sizes.contains(&hp) {
                    return Err(AgentError::InvalidArgument(format!(
                        "hugepage_size_bytes {hp} is not a huge page size of this host (sizes: {sizes:?})"
                    )));
                }
                Ok(hp)
            }
        }
    }

    /// Creates a region. The intent (and idempotency record) is durable before the file exists,
    /// and the file exists before the call returns.
    pub async fn create_region(
        &self,
        req: CreateRequest,
        actor: &str,
        idem: Option<Idempotency>,
    ) -> Result<RegionView, AgentError> {
        validate_name("vm_id", &req.key.vm_id)?;
        validate_name("name", &req.key.name)?;
        let page = self.check_backend(&req)?;
        if req.size_bytes == 0 || req.size_bytes > self.limits.max_region_bytes {
            return Err(DomainError::BadSize {
                size: req.size_bytes,
                max: self.limits.max_region_bytes,
            }
            .into());
        }
        if !req.size_bytes.is_multiple_of(page) {
            return Err(DomainError::Unaligned {
                what: "size_bytes",
                value: req.size_bytes,
                page,
            }
            .into());
        }
        let mut ranges = RangeMap::new(req.size_bytes);
        for (offset, length, policy) in &req.policies {
            self.check_policy(policy)?;
            let (o, l) = resolve_span(*offset, *length, req.size_bytes, page)?;
            ranges.apply(o, l, *policy);
        }
        self.check_range_count(&req.key, &ranges)?;
        let _m = self.membership.lock().await;
        if self
            .regions
            .lock()
            .expect("region map lock")
            .contains_key(&req.key)
        {
            return Err(AgentError::AlreadyExists(req.key));
        }
        if self.regions.lock().expect("region map lock").len() >= self.limits.max_regions {
            return Err(AgentError::ResourceExhausted(format!(
                "the agent already holds its limit of {} regions",
                self.limits.max_regions
            )));
        }
        let mut intent = RegionIntent {
            key: req.key.clone(),
            uid: new_uid(),
            backend: req.backend,
            size_bytes: req.size_bytes,
            hugepage_size_bytes: if req.backend == Backend::MemfdHugetlb {
                page
            } else {
                0
            },
            generation: 1,
            strategy: self.strategy_for(req.backend),
            ranges,
            created_unix: unix_now(),
            status: RegionStatus::Active,
            holder: None,
            file_id: None,
            adopted: false,
        };
        // The file is made before the commit only to learn its identity; if the commit fails it is
        // closed and nothing was acknowledged. Its memory is untouched until after the commit.
        let file = self.create_file(&intent)?;
        intent.file_id = kernel::fd_file_id(file.fd.as_fd()).ok();
        let mut live = LiveRegion {
            intent: intent.clone(),
            file: Some(file),
            errors: HashMap::new(),
        };
        let pending_view = self.view_without_kernel(&live);
        let mut ops = vec![WriteOp::InsertRegion(intent.clone())];
        if let Some(i) = &idem {
            ops.push(save_request(i, &pending_view));
        }
        let ev = self.event(
            EventKind::RegionCreated,
            Some(&req.key),
            format!(
                "created {} region of {} bytes ({})",
                req.backend.as_str(),
                req.size_bytes,
                intent.strategy.as_str()
            ),
            actor,
        );
        self.commit(ops, vec![ev]).await.map_err(|e| match e {
            AgentError::Store(StoreError::Conflict) => AgentError::AlreadyExists(req.key.clone()),
            e => e,
        })?;
        let applied = tokio::task::block_in_place(|| self.apply_all(&mut live));
        let view = self.view(&live);
        self.regions
            .lock()
            .expect("region map lock")
            .insert(req.key.clone(), Arc::new(RwLock::new(live)));
        if applied > 0 {
            tracing::debug!(region = %req.key, applied, "initial policies applied");
        }
        Ok(view)
    }

    fn check_range_count(&self, key: &RegionKey, ranges: &RangeMap) -> Result<(), AgentError> {
        if ranges.ranges().len() > self.limits.max_ranges_per_region {
            return Err(AgentError::ResourceExhausted(format!(
                "region {key} would have {} ranges, over the limit of {}",
                ranges.ranges().len(),
                self.limits.max_ranges_per_region
            )));
        }
        Ok(())
    }

    /// Applies every shared-policy range of a live region through its mapping. Returns the number
    /// applied. Blocking.
    fn apply_all(&self, live: &mut LiveRegion) -> u32 {
        if live.intent.strategy != Strategy::SharedPolicy {
            return 0;
        }
        let Some(file) = live.file.as_ref() else {
            return 0;
        };
        let fd = file.fd.as_fd();
        let mut n = 0;
        for r in live.intent.ranges.ranges() {
            let bound = Mapping::window(fd, r.offset, r.length)
                .and_then(|w| bind_file_range(&w, r.offset, r.length, &r.policy, 0));
            match bound {
                Ok(()) => {
                    live.errors.remove(&r.offset);
                    n += 1;
                }
                Err(e) => {
                    live.errors.insert(r.offset, format!("mbind: {}", e.desc()));
                }
            }
        }
        n
    }

    /// A view without reading the kernel: every range pending. Used for stored first answers.
    fn view_without_kernel(&self, live: &LiveRegion) -> RegionView {
        RegionView {
            ranges: live
                .intent
                .ranges
                .ranges()
                .iter()
                .map(|r| RangeView {
                    intent: *r,
                    observed: None,
                    state: RangeState::Pending,
                    last_error: String::new(),
                })
                .collect(),
            page_size: live.intent.page_size(self.page),
            intent: live.intent.clone(),
        }
    }

    /// A view with each range's policy read from the kernel now.
    fn view(&self, live: &LiveRegion) -> RegionView {
        let mapping = live.file.as_ref().and_then(|f| f.mapping.as_ref());
        let page = live.intent.page_size(self.page);
        let ranges = live
            .intent
            .ranges
            .ranges()
            .iter()
            .map(|r| {
                let last_error = live.errors.get(&r.offset).cloned().unwrap_or_default();
                let observed = mapping.and_then(|m| observe(m, r, page));
                let state = match live.intent.strategy {
                    _ if live.file.is_none() => RangeState::Failed,
                    Strategy::SharedPolicy => match observed {
                        Some(p) if p == r.policy => RangeState::Applied,
                        _ if !last_error.is_empty() => RangeState::Failed,
                        Some(_) => RangeState::Drifted,
                        None => RangeState::Pending,
                    },
                    Strategy::TaskPolicy => {
                        if !last_error.is_empty() {
                            RangeState::Failed
                        } else if r.placed || r.policy == Policy::DEFAULT {
                            RangeState::Applied
                        } else {
                            RangeState::Pending
                        }
                    }
                };
                let last_error = if live.file.is_none() && last_error.is_empty() {
                    "region lost: no process held its file while the agent was down".to_string()
                } else {
                    last_error
                };
                RangeView {
                    intent: *r,
                    observed: if live.intent.strategy == Strategy::SharedPolicy {
                        observed
                    } else {
                        None
                    },
                    state,
                    last_error,
                }
            })
            .collect();
        RegionView {
            intent: live.intent.clone(),
            ranges,
            page_size: page,
        }
    }

    /// One region with observed state.
    pub async fn get_region(&self, key: &RegionKey) -> Result<RegionView, AgentError> {
        validate_name("vm_id", &key.vm_id)?;
        validate_name("name", &key.name)?;
        let slot = self.slot(key)?;
        let live = slot.read().await;
        Ok(tokio::task::block_in_place(|| self.view(&live)))
    }

    /// Every region's intent, without reading the kernel (for metrics).
    pub async fn list_intents(&self) -> Result<Vec<RegionIntent>, AgentError> {
        let mut out = Vec::new();
        for slot in self.slots(None) {
            out.push(slot.read().await.intent.clone());
        }
        Ok(out)
    }

    /// All regions (of one VM), with observed state.
    pub async fn list_regions(&self, vm_id: Option<&str>) -> Result<Vec<RegionView>, AgentError> {
        if let Some(v) = vm_id {
            validate_name("vm_id", v)?;
        }
        let mut out = Vec::new();
        for slot in self.slots(vm_id) {
            let live = slot.read().await;
            out.push(tokio::task::block_in_place(|| self.view(&live)));
        }
        Ok(out)
    }

    /// Deletes a region: durable first, then every fd of the agent is closed.
    pub async fn delete_region(
        &self,
        key: &RegionKey,
        actor: &str,
        idem: Option<Idempotency>,
    ) -> Result<RegionView, AgentError> {
        validate_name("vm_id", &key.vm_id)?;
        validate_name("name", &key.name)?;
        let _m = self.membership.lock().await;
        let slot = self.slot(key)?;
        let mut live = slot.write().await;
        let view = tokio::task::block_in_place(|| self.view(&live));
        let mut ops = vec![WriteOp::DeleteRegion(key.clone())];
        if let Some(i) = &idem {
            ops.push(save_request(i, &view));
        }
        let ev = self.event(
            EventKind::RegionDeleted,
            Some(key),
            "region deleted".into(),
            actor,
        );
        self.commit(ops, vec![ev]).await?;
        self.regions.lock().expect("region map lock").remove(key);
        // Close the fd and mapping now: a held guest_memfd keeps its whole KVM VM alive.
        live.file = None;
        drop(live);
        let vm_unused = !self
            .regions
            .lock()
            .expect("region map lock")
            .keys()
            .any(|k| k.vm_id == key.vm_id);
        if vm_unused {
            self.vms.lock().expect("vm map lock").remove(&key.vm_id);
        }
        Ok(view)
    }

    /// Sets a range's policy: validate, commit the new intent, then apply it and read it back.
    #[allow(clippy::too_many_arguments)]
    pub async fn set_policy(
        &self,
        key: &RegionKey,
        offset: u64,
        length: u64,
        policy: Policy,
        migrate: bool,
        expected_generation: u64,
        actor: &str,
        idem: Option<Idempotency>,
    ) -> Result<SetPolicyOutcome, AgentError> {
        validate_name("vm_id", &key.vm_id)?;
        validate_name("name", &key.name)?;
        self.check_policy(&policy)?;
        let slot = self.slot(key)?;
        let mut live = slot.write().await;
        // A concurrent call with the same request id is caught when its request record conflicts
        // at commit (below), so the common path reads nothing here.
        let page = live.intent.page_size(self.page);
        let (offset, length) = resolve_span(offset, length, live.intent.size_bytes, page)?;
        if expected_generation != 0 && expected_generation != live.intent.generation {
            // A concurrent retry that committed first moved the generation on: its answer applies.
            if let Some(i) = &idem
                && self.store.request(&i.request_id).await?.is_some()
            {
                return Err(AgentError::DuplicateRequest(i.request_id.clone()));
            }
            return Err(AgentError::GenerationConflict {
                key: key.clone(),
                expected: expected_generation,
                actual: live.intent.generation,
            });
        }
        if live.intent.status == RegionStatus::Lost {
            return Err(AgentError::FailedPrecondition(format!(
                "region {key} is lost: its file did not survive; delete and recreate it"
            )));
        }
        if migrate && live.intent.backend == Backend::GuestMemfd {
            let resident =
                tokio::task::block_in_place(|| resident_pages(&live, offset, length, page));
            if resident > 0 {
                return Err(AgentError::FailedPrecondition(format!(
                    "{resident} pages of this range are already allocated, and guest_memfd pages cannot migrate between nodes; \
                     set the policy without migrate to govern only unallocated pages, or free the range (the VM must not use it) \
                     or recreate the region and populate it again"
                )));
            }
        }
        let mut ranges = live.intent.ranges.clone();
        ranges.apply(offset, length, policy);
        self.check_range_count(key, &ranges)?;
        let generation = live.intent.generation + 1;
        let mut next = live.intent.clone();
        next.ranges = ranges.clone();
        next.generation = generation;
        let mut ops = vec![WriteOp::SaveRanges {
            key: key.clone(),
            generation,
            ranges,
        }];
        if let Some(i) = &idem {
            let pending = LiveRegion {
                intent: next.clone(),
                file: None,
                errors: HashMap::new(),
            };
            ops.push(save_request(i, &self.view_without_kernel(&pending)));
        }
        let ev = self.event(
            EventKind::PolicyApplied,
            Some(key),
            format!(
                "policy {policy} on [{offset:#x}, {:#x}) at generation {generation}{}",
                offset + length,
                if migrate { " with migrate" } else { "" }
            ),
            actor,
        );
        match self.commit(ops, vec![ev]).await {
            // Only the request record can conflict here (ranges are replaced, not added to): a
            // concurrent call with this id committed first, and nothing of this one was written.
            Err(AgentError::Store(StoreError::Conflict)) if idem.is_some() => {
                return Err(AgentError::DuplicateRequest(
                    idem.map(|i| i.request_id.clone()).unwrap_or_default(),
                ));
            }
            r => r?,
        }
        live.intent = next;
        let (moved, failed) =
            tokio::task::block_in_place(|| self.apply_range(&mut live, offset, length, migrate));
        Ok(SetPolicyOutcome {
            region: tokio::task::block_in_place(|| self.view(&live)),
            pages_migrated: moved,
            pages_migrate_failed: failed,
        })
    }

    /// Applies the intent over `[offset, offset+length)` to the kernel. With `migrate`, moves
    /// resident pages (memfd). Returns (pages moved, pages that failed to move). Blocking.
    fn apply_range(
        &self,
        live: &mut LiveRegion,
        offset: u64,
        length: u64,
        migrate: bool,
    ) -> (u64, u64) {
        if live.intent.strategy != Strategy::SharedPolicy {
            return (0, 0);
        }
        let page = live.intent.page_size(self.page);
        let Some(fd) = live.file.as_ref().map(|f| f.fd.as_fd()) else {
            return (0, 0);
        };
        let mut moved = 0;
        let mut failed = 0;
        for r in live.intent.ranges.clipped(offset, offset + length) {
            let window = match Mapping::window(fd, r.offset, r.length) {
                Ok(w) => w,
                Err(e) => {
                    live.errors.insert(r.offset, format!("mmap: {}", e.desc()));
                    continue;
                }
            };
            let mapping = &window;
            let mut flags = 0;
            let mut before = Vec::new();
            if migrate {
                // mbind moves only pages mapped in this process: map the resident ones first.
                before = placement::map_resident(fd, mapping, r.offset, r.length, page);
                flags = kernel::mempolicy::MPOL_MF_MOVE;
                if kernel::pidfd::have_cap_sys_nice() {
                    // Pages the VMM also maps are shared; MOVE alone skips them.
                    flags |= kernel::mempolicy::MPOL_MF_MOVE_ALL;
                }
            }
            let result = bind_file_range(mapping, r.offset, r.length, &r.policy, flags);
            // Errors are recorded per range of the intent that contains this piece.
            let owner = live
                .intent
                .ranges
                .ranges()
                .iter()
                .find(|x| x.offset <= r.offset && r.end() <= x.end())
                .map_or(r.offset, |x| x.offset);
            match result {
                Ok(()) => {
                    live.errors.remove(&owner);
                }
                Err(e) => {
                    live.errors.insert(owner, format!("mbind: {}", e.desc()));
                }
            }
            if migrate {
                let after = placement::nodes_of(mapping, r.offset, r.length, page);
                for (b, a) in before.iter().zip(after.iter()) {
                    if *b < 0 {
                        continue;
                    }
                    match r.policy.allows(*a as u32) {
                        Some(false) => failed += 1,
                        _ if a != b => moved += 1,
                        _ => {}
                    }
                }
                let _ = mapping.unmap_pages(r.offset, r.length);
            }
        }
        (moved, failed)
    }

    /// Compares every range's intent with the kernel and re-applies what drifted.
    pub async fn reconcile(
        &self,
        vm_id: Option<&str>,
        actor: &str,
    ) -> Result<ReconcileReport, AgentError> {
        if let Some(v) = vm_id {
            validate_name("vm_id", v)?;
        }
        let mut report = ReconcileReport::default();
        for slot in self.slots(vm_id) {
            report.regions += 1;
            // Most passes find nothing: check under a read lock, on this task (two short
            // get_mempolicy calls per range), and take the write lock only for a region that
            // drifted, where the check runs again.
            if let Some(checked) = self.in_sync(&*slot.read().await) {
                report.checked += checked;
                continue;
            }
            let mut live = slot.write().await;
            let events = tokio::task::block_in_place(|| {
                self.reconcile_region(&mut live, &mut report, actor)
            });
            drop(live);
            if !events.is_empty() {
                self.commit(vec![], events).await?;
            }
        }
        use std::sync::atomic::Ordering::Relaxed;
        self.counters
            .drifted
            .fetch_add(report.drifted as u64, Relaxed);
        self.counters
            .reapplied
            .fetch_add(report.reapplied as u64, Relaxed);
        Ok(report)
    }

    /// The number of ranges checked when every range of a region reads back from the kernel as
    /// intended, or `None` when one does not. Counts as [`Self::reconcile_region`] does.
    fn in_sync(&self, live: &LiveRegion) -> Option<u32> {
        let ranges = live.intent.ranges.ranges();
        if live.intent.strategy != Strategy::SharedPolicy
            || live.intent.status == RegionStatus::Lost
        {
            return Some(ranges.len() as u32);
        }
        let Some(mapping) = live.file.as_ref().and_then(|f| f.mapping.as_ref()) else {
            return Some(0);
        };
        let page = live.intent.page_size(self.page);
        ranges
            .iter()
            .all(|r| observe(mapping, r, page) == Some(r.policy))
            .then_some(ranges.len() as u32)
    }

    fn reconcile_region(
        &self,
        live: &mut LiveRegion,
        report: &mut ReconcileReport,
        actor: &str,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        if live.intent.strategy != Strategy::SharedPolicy
            || live.intent.status == RegionStatus::Lost
        {
            report.checked += live.intent.ranges.ranges().len() as u32;
            return events;
        }
        let page = live.intent.page_size(self.page);
        let key = live.intent.key.clone();
        let ranges: Vec<RangeIntent> = live.intent.ranges.ranges().to_vec();
        let Some(file) = live.file.as_ref() else {
            return events;
        };
        let Some(mapping) = file.mapping.as_ref() else {
            return events;
        };
        let mut errors = Vec::new();
        for r in ranges {
            report.checked += 1;
            let observed = observe(mapping, &r, page);
            if observed == Some(r.policy) {
                continue;
            }
            report.drifted += 1;
            events.push(self.event(
                EventKind::DriftFound,
                Some(&key),
                format!(
                    "range [{:#x}, {:#x}) intended {} but the kernel reports {}",
                    r.offset,
                    r.end(),
                    r.policy,
                    observed.map_or("nothing".into(), |p| p.to_string())
                ),
                actor,
            ));
            // Re-bind through a fresh window, verify through the long-lived mapping.
            let ok = Mapping::window(file.fd.as_fd(), r.offset, r.length)
                .and_then(|w| bind_file_range(&w, r.offset, r.length, &r.policy, 0))
                .is_ok()
                && observe(mapping, &r, page) == Some(r.policy);
            if ok {
                report.reapplied += 1;
                errors.push((r.offset, None));
                events.push(self.event(
                    EventKind::Reapplied,
                    Some(&key),
                    format!(
                        "range [{:#x}, {:#x}) re-bound to {}",
                        r.offset,
                        r.end(),
                        r.policy
                    ),
                    actor,
                ));
            } else {
                report.failed += 1;
                errors.push((r.offset, Some("re-applying the policy failed".to_string())));
            }
        }
        for (o, e) in errors {
            match e {
                Some(e) => live.errors.insert(o, e),
                None => live.errors.remove(&o),
            };
        }
        events
    }

    /// Records that `holder` acquired the region's fd, so the agent can take it back after a
    /// restart.
    pub(crate) async fn record_holder(
        &self,
        key: &RegionKey,
        holder: Holder,
        actor: &str,
    ) -> Result<RegionView, AgentError> {
        let slot = self.slot(key)?;
        let mut live = slot.write().await;
        let file_id = live.intent.file_id;
        let ev = self.event(
            EventKind::Handoff,
            Some(key),
            format!("fd handed to pid {}", holder.pid),
            actor,
        );
        self.commit(
            vec![WriteOp::SaveHolder {
                key: key.clone(),
                holder: Some(holder),
                file_id,
            }],
            vec![ev],
        )
        .await?;
        live.intent.holder = Some(holder);
        self.counters
            .handoffs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(tokio::task::block_in_place(|| self.view(&live)))
    }

    /// Runs `f` with the region's fd (and VM fd), e.g. to send them on the handoff socket.
    pub(crate) async fn with_fds<T>(
        &self,
        key: &RegionKey,
        f: impl FnOnce(
            &RegionIntent,
            std::os::fd::BorrowedFd<'_>,
            Option<std::os::fd::BorrowedFd<'_>>,
        ) -> T,
    ) -> Result<T, AgentError> {
        let slot = self.slot(key)?;
        let live = slot.read().await;
        let Some(file) = live.file.as_ref() else {
            return Err(AgentError::FailedPrecondition(format!(
                "region {key} is lost: its file did not survive; delete and recreate it"
            )));
        };
        let vm = file.vm.as_ref().map(|v| v.as_fd());
        Ok(f(&live.intent, file.fd.as_fd(), vm))
    }

    /// Takes a file a VMM made and makes it a region: durable first, then mapped and bound.
    pub(crate) async fn adopt(
        &self,
        key: RegionKey,
        backend: Backend,
        size_bytes: u64,
        fd: OwnedFd,
        holder: Holder,
        actor: &str,
    ) -> Result<RegionView, AgentError> {
        validate_name("vm_id", &key.vm_id)?;
        validate_name("name", &key.name)?;
        let st = nix::sys::stat::fstat(&fd).map_err(kerr("fstat"))?;
        // guest_memfd reports its size too; a region larger than its file would fault SIGBUS.
        let file_size = st.st_size as u64;
        if file_size != size_bytes {
            return Err(AgentError::InvalidArgument(format!(
                "size_bytes {size_bytes} does not match the file's size {file_size}"
            )));
        }
        if size_bytes == 0
            || !size_bytes.is_multiple_of(self.page)
            || size_bytes > self.limits.max_region_bytes
        {
            return Err(DomainError::BadSize {
                size: size_bytes,
                max: self.limits.max_region_bytes,
            }
            .into());
        }
        let _m = self.membership.lock().await;
        if self
            .regions
            .lock()
            .expect("region map lock")
            .contains_key(&key)
        {
            return Err(AgentError::AlreadyExists(key));
        }
        let mapping = Mapping::new(fd.as_fd(), size_bytes).map_err(|e| {
            AgentError::InvalidArgument(format!(
                "the fd handed in cannot be mapped shared for {size_bytes} bytes: {}",
                e.desc()
            ))
        })?;
        let strategy = match backend {
            Backend::GuestMemfd if self.caps.guest_memfd_shared_policy => Strategy::SharedPolicy,
            Backend::GuestMemfd => Strategy::TaskPolicy,
            b => self.strategy_for(b),
        };
        let intent = RegionIntent {
            key: key.clone(),
            uid: new_uid(),
            backend,
            size_bytes,
            hugepage_size_bytes: 0,
            generation: 1,
            strategy,
            ranges: RangeMap::new(size_bytes),
            created_unix: unix_now(),
            status: RegionStatus::Active,
            holder: Some(holder),
            file_id: Some((st.st_dev, st.st_ino)),
            adopted: true,
        };
        let ev = self.event(
            EventKind::RegionAdopted,
            Some(&key),
            format!(
                "adopted a {} file of {size_bytes} bytes from pid {}",
                backend.as_str(),
                holder.pid
            ),
            actor,
        );
        self.commit(vec![WriteOp::InsertRegion(intent.clone())], vec![ev])
            .await?;
        let live = LiveRegion {
            intent,
            file: Some(RegionFile {
                fd,
                mapping: Some(mapping),
                vm: None,
            }),
            errors: HashMap::new(),
        };
        let view = self.view(&live);
        self.regions
            .lock()
            .expect("region map lock")
            .insert(key, Arc::new(RwLock::new(live)));
        Ok(view)
    }
}

fn save_request(i: &Idempotency, view: &RegionView) -> WriteOp {
    WriteOp::SaveRequest {
        request_id: i.request_id.clone(),
        method: i.method,
        fingerprint: i.fingerprint.clone(),
        response: (i.encode)(view),
    }
}

/// Binds a file range's shared policy through `binder`, a fresh window mapping exactly that
/// range (never the agent's long-lived mapping):
/// - the kernel skips mbind on a VMA whose own policy already equals the new one, so re-binding
///   through the long-lived mapping would leave in place a policy someone changed through another
///   mapping;
/// - when mbind merges a VMA with an equal-policy neighbour it sets the policy over the merged
///   span, so a window wider than the range could overwrite its neighbours' policies;
/// - a fresh VMA has no policy, which equals DEFAULT, so DEFAULT goes through LOCAL first.
///
/// The long-lived mapping also stays one VMA however many ranges there are.
fn bind_file_range(
    binder: &Mapping,
    offset: u64,
    length: u64,
    policy: &Policy,
    flags: u32,
) -> Result<(), Errno> {
    if policy.mode == PolicyMode::Default {
        binder.mbind(
            offset,
            length,
            &Policy::new(PolicyMode::Local, crate::domain::NodeSet::new()),
            0,
        )?;
    }
    binder.mbind(offset, length, policy, flags)
}

/// Reads the policy the kernel holds for a range at its first and last page; `None` when they
/// differ or cannot be read.
fn observe(mapping: &Mapping, r: &RangeIntent, page: u64) -> Option<Policy> {
    let first = mapping.policy_at(r.offset).ok().flatten()?;
    if r.length > page {
        let last = mapping.policy_at(r.end() - page).ok().flatten()?;
        if last != first {
            return None;
        }
    }
    Some(first)
}

fn resident_pages(live: &LiveRegion, offset: u64, length: u64, page: u64) -> u64 {
    live.file
        .as_ref()
        .and_then(|f| {
            placement::allocated(f.fd.as_fd(), f.mapping.as_ref()?, offset, length, page).ok()
        })
        .map_or(0, |v| v.iter().filter(|b| **b).count() as u64)
}

fn new_uid() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
