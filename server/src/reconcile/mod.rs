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
    /// The strategy of every new region, when the configuration forces one (`force_strategy`);
    /// `None` picks per backend from the probed capabilities.
    pub force_strategy: Option<Strategy>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_regions: 4096,
            max_ranges_per_region: 256,
            max_region_bytes: 1 << 40,
            force_strategy: None,
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
    /// A task-policy range Populate placed, whose pages' nodes the kernel could not show (no
    /// mapping, or the read failed).
    Unverified,
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
    /// What the kernel showed of a task-policy range's pages when this view was made.
    pub check: Option<placement::RangeCheck>,
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
    /// The policy was applied but will not place pages as asked (see [`policy_warning`]).
    pub warnings: Vec<String>,
}

/// Why a policy applied to a region will not place its pages as asked, if it will not: INTERLEAVE
/// or WEIGHTED_INTERLEAVE over several nodes on a guest_memfd region placed through the kernel's
/// shared policy, where the start-up probe did not find interleave on guest_memfd exact (kernels
/// 6.19 to 7.1 take the interleave index from the inode, not the page offset). The agent applies
/// the policy anyway (pages still go to the named nodes, only not alternating by offset), and says
/// so in SetPolicy's answer and in a POLICY_WARNING event.
pub fn policy_warning(
    backend: Backend,
    strategy: Strategy,
    policy: &Policy,
    caps: &Capabilities,
) -> Option<String> {
    let interleave = matches!(
        policy.mode,
        PolicyMode::Interleave | PolicyMode::WeightedInterleave
    );
    if backend != Backend::GuestMemfd
        || strategy != Strategy::SharedPolicy
        || !interleave
        || policy.nodes.len() < 2
        || caps.guest_memfd_interleave_exact == Some(true)
    {
        return None;
    }
    let why = match caps.guest_memfd_interleave_exact {
        Some(_) => format!(
            "is not exact on kernel {}: it takes the interleave index of guest_memfd pages from the inode, \
             not from the page offset (fixed in 7.2), so the pages will not alternate over nodes {}",
            caps.kernel_release, policy.nodes
        ),
        None => format!(
            "could not be verified on kernel {} ({}); kernels 6.19 to 7.1 do not alternate the pages by offset",
            caps.kernel_release, caps.guest_memfd_interleave_note
        ),
    };
    Some(format!(
        "{} on guest_memfd {why}; the policy was applied as asked",
        policy.mode.as_str()
    ))
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

/// Totals of a reconcile pass. Every range of every region visited lands in exactly one of
/// `checked`, `task_policy`, `lost` and `unmapped`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Regions visited.
    pub regions: u32,
    /// Shared-policy ranges whose policy was read back from the kernel.
    pub checked: u32,
    /// Ranges applied again (every checked range is re-bound on each pass).
    pub reapplied: u32,
    /// Ranges found drifted.
    pub drifted: u32,
    /// Ranges that failed.
    pub failed: u32,
    /// Task-policy ranges: the file holds no policy to compare, so they were not checked (their
    /// placement is read back by GetPlacement and a verified Populate).
    pub task_policy: u32,
    /// Ranges of lost regions: no file, nothing to check.
    pub lost: u32,
    /// Ranges of regions the agent holds no mapping of (a guest_memfd without MMAP, or a file
    /// that could not be recreated), so no policy could be read.
    pub unmapped: u32,
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
        policy.check_usable(&self.topology.usable())?;
        Ok(())
    }

    fn strategy_for(&self, backend: Backend) -> Strategy {
        // The `force_strategy` config key (tests prove the task-policy path on memfd in
        // multi-node guests, where KVM is absent).
        if let Some(s) = self.limits.force_strategy {
            return s;
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
        let vm = vm_of_fd(fd)?;
        self.vms
            .lock()
            .expect("vm map lock")
            .insert(vm_id.to_string(), Arc::new(vm));
        Ok(())
    }

    /// [`Self::attach_vm`] with its audit event: the event is durable before the VM is used, and
    /// when it cannot be written nothing is attached and the error is returned.
    pub async fn attach_vm_audited(
        &self,
        vm_id: &str,
        fd: OwnedFd,
        message: String,
        actor: &str,
    ) -> Result<(), AgentError> {
        let vm = vm_of_fd(fd)?;
        let key = RegionKey {
            vm_id: vm_id.to_string(),
            name: String::new(),
        };
        self.emit(EventKind::VmAttached, Some(&key), message, actor)
            .await?;
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
        // The identity is how a restarted agent finds the file in a VMM: without it a handed-off
        // file could not be taken back, so no region is created without one.
        intent.file_id = Some(kernel::fd_file_id(file.fd.as_fd()).map_err(kerr("fstat"))?);
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
        crate::failpoint::hit(
            "CreateRegion.after-commit",
            idem.as_ref().map_or("", |i| i.request_id.as_str()),
        );
        let (applied, view) = tokio::task::block_in_place(|| {
            let applied = self.apply_all(&mut live);
            (applied, self.view(&live))
        });
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
                    check: None,
                })
                .collect(),
            page_size: live.intent.page_size(self.page),
            intent: live.intent.clone(),
        }
    }

    /// A view with each range's policy read from the kernel now.
    fn view(&self, live: &LiveRegion) -> RegionView {
        self.view_after(live, None)
    }

    /// [`Self::view`] right after this call bound `applied` (start, end): a range inside it whose
    /// mbind just succeeded is read back at its first and last page only; every other range is
    /// sampled in full as [`Self::view`] does (drift elsewhere is still seen).
    fn view_after(&self, live: &LiveRegion, applied: Option<(u64, u64)>) -> RegionView {
        let mapping = live.file.as_ref().and_then(|f| f.mapping.as_ref());
        let page = live.intent.page_size(self.page);
        let shared = live.intent.strategy == Strategy::SharedPolicy;
        let ranges = live
            .intent
            .ranges
            .ranges()
            .iter()
            .map(|r| {
                let last_error = live.errors.get(&r.offset).cloned().unwrap_or_default();
                let just_bound = last_error.is_empty()
                    && applied.is_some_and(|(start, end)| start <= r.offset && r.end() <= end);
                let observed = mapping.filter(|_| shared).and_then(|m| {
                    if just_bound {
                        observe_at_ends(m, r, page)
                    } else {
                        observe(m, r, page)
                    }
                });
                // A task-policy range's only effect is where its pages are: read it now.
                let check = live.file.as_ref().filter(|_| !shared).and_then(|f| {
                    placement::check_range(f.fd.as_fd(), live.intent.size_bytes, r, page).ok()
                });
                let state = match live.intent.strategy {
                    _ if live.file.is_none() => RangeState::Failed,
                    Strategy::SharedPolicy => match observed {
                        Some(p) if p == r.policy => RangeState::Applied,
                        _ if !last_error.is_empty() => RangeState::Failed,
                        Some(_) => RangeState::Drifted,
                        None => RangeState::Pending,
                    },
                    Strategy::TaskPolicy if !last_error.is_empty() => RangeState::Failed,
                    Strategy::TaskPolicy => task_state(r, check),
                };
                let last_error = if live.file.is_none() && last_error.is_empty() {
                    "region lost: no process held its file while the agent was down".to_string()
                } else {
                    last_error
                };
                RangeView {
                    intent: *r,
                    observed,
                    state,
                    last_error,
                    check,
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
        crate::failpoint::hit(
            "DeleteRegion.after-commit",
            idem.as_ref().map_or("", |i| i.request_id.as_str()),
        );
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
                tokio::task::block_in_place(|| resident_pages(&live, offset, length, page))
                    .map_err(|e| {
                        AgentError::FailedPrecondition(format!(
                            "cannot tell whether pages of this range are allocated ({}), and guest_memfd pages cannot migrate between nodes; \
                             set the policy without migrate",
                            e.desc()
                        ))
                    })?;
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
        let warnings: Vec<String> = policy_warning(
            live.intent.backend,
            live.intent.strategy,
            &policy,
            &self.caps,
        )
        .into_iter()
        .collect();
        let mut events = vec![ev];
        for w in &warnings {
            events.push(self.event(
                EventKind::PolicyWarning,
                Some(key),
                format!("[{offset:#x}, {:#x}): {w}", offset + length),
                actor,
            ));
        }
        match self.commit(ops, events).await {
            // Only the request record can conflict here (ranges are replaced, not added to): a
            // concurrent call with this id committed first, and nothing of this one was written.
            Err(AgentError::Store(StoreError::Conflict)) if idem.is_some() => {
                return Err(AgentError::DuplicateRequest(
                    idem.map(|i| i.request_id.clone()).unwrap_or_default(),
                ));
            }
            r => r?,
        }
        crate::failpoint::hit(
            "SetPolicy.after-commit",
            idem.as_ref().map_or("", |i| i.request_id.as_str()),
        );
        live.intent = next;
        let (moved, failed) =
            tokio::task::block_in_place(|| self.apply_range(&mut live, offset, length, migrate));
        Ok(SetPolicyOutcome {
            region: tokio::task::block_in_place(|| {
                self.view_after(&live, Some((offset, offset + length)))
            }),
            pages_migrated: moved,
            pages_migrate_failed: failed,
            warnings,
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

    /// Compares every range's intent with the kernel, reports what drifted, and re-applies
    /// every shared-policy range (see [`Self::reconcile_region`]).
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

    /// Reconciles one region. Blocking.
    ///
    /// A shmem file's shared policy is a tree of sub-ranges, and anyone who maps the file (a VMM
    /// through /proc/PID/fd/N, QEMU's `host-nodes`) can mbind any page-aligned part of it. No
    /// interface lists that tree: get_mempolicy reads one address. So:
    /// - drift is *detected* by reading the policy at sample points of each range (its first and
    ///   last page and a stride, see [`sample_offsets`]); a foreign change that covers at least
    ///   one stride is always seen, one smaller may fall between samples;
    /// - every range is *repaired* regardless, by re-binding its whole span on every pass (about
    ///   2 µs of mbind through a fresh window), which replaces every sub-range of the tree in it.
    ///
    /// A change too small to be sampled is thus undone by the next pass without a drift event;
    /// reading every page instead would cost a get_mempolicy per page on every pass.
    fn reconcile_region(
        &self,
        live: &mut LiveRegion,
        report: &mut ReconcileReport,
        actor: &str,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let n = live.intent.ranges.ranges().len() as u32;
        if live.intent.status == RegionStatus::Lost || live.file.is_none() {
            if live.intent.status == RegionStatus::Lost {
                report.lost += n;
            } else {
                report.unmapped += n;
            }
            return events;
        }
        if live.intent.strategy != Strategy::SharedPolicy {
            report.task_policy += n;
            return events;
        }
        let page = live.intent.page_size(self.page);
        let key = live.intent.key.clone();
        let ranges: Vec<RangeIntent> = live.intent.ranges.ranges().to_vec();
        let Some(file) = live.file.as_ref() else {
            return events;
        };
        let Some(mapping) = file.mapping.as_ref() else {
            report.unmapped += n;
            return events;
        };
        let mut errors = Vec::new();
        for r in ranges {
            report.checked += 1;
            let drift = find_drift(mapping, &r, page);
            if let Some(d) = &drift {
                report.drifted += 1;
                crate::metrics::count_range_drift(&key.vm_id, &key.name, r.offset);
                events.push(self.event(
                    EventKind::DriftFound,
                    Some(&key),
                    format!(
                        "range [{:#x}, {:#x}) intended {} but the kernel reports {} at offset {:#x}",
                        r.offset,
                        r.end(),
                        r.policy,
                        d.found.map_or("nothing readable".into(), |p| p.to_string()),
                        d.offset
                    ),
                    actor,
                ));
            }
            // Re-bind the whole range through a fresh window, verify through the long-lived
            // mapping: at every sample where a drift was seen (the repair must show), else at
            // the range's ends (the bind replaced the whole span or failed; this keeps a pass
            // over a range that did not drift to about 8 µs).
            let bound = Mapping::window(file.fd.as_fd(), r.offset, r.length)
                .and_then(|w| bind_file_range(&w, r.offset, r.length, &r.policy, 0));
            let after = if drift.is_some() {
                find_drift(mapping, &r, page)
            } else {
                find_drift_at_ends(mapping, &r, page)
            };
            let why = match (bound, after) {
                (Ok(()), None) => None,
                (Err(e), _) => Some(format!("re-applying the policy failed: {}", e.desc())),
                (Ok(()), Some(d)) => Some(format!(
                    "re-applied the policy, but the kernel reports {} at offset {:#x}",
                    d.found.map_or("nothing readable".into(), |p| p.to_string()),
                    d.offset
                )),
            };
            match why {
                None => {
                    report.reapplied += 1;
                    errors.push((r.offset, None));
                    if drift.is_some() {
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
                    }
                }
                Some(why) => {
                    report.failed += 1;
                    events.push(self.event(
                        EventKind::VerifyFailed,
                        Some(&key),
                        format!("range [{:#x}, {:#x}): {why}", r.offset, r.end()),
                        actor,
                    ));
                    errors.push((r.offset, Some(why)));
                }
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
        let view = tokio::task::block_in_place(|| self.view(&live));
        self.regions
            .lock()
            .expect("region map lock")
            .insert(key, Arc::new(RwLock::new(live)));
        Ok(view)
    }
}

/// The state of a task-policy range from what the kernel shows now (`check`, `None` when it
/// could not be read), never from the database alone: the stored `placed` says only that
/// Populate allocated the range under its policy once; pages punched since and faulted again by
/// someone else followed that someone's policy.
/// - Drifted: an allocated page sits on a node the policy does not allow.
/// - Pending: never placed, or not every page is allocated any more.
/// - Unverified: placed, but the kernel could not show where (some) pages are.
/// - Applied: placed, every page allocated, every sampled page on an allowed node (a DEFAULT
///   range asks for nothing, so it is always applied).
fn task_state(r: &RangeIntent, check: Option<placement::RangeCheck>) -> RangeState {
    if r.policy == Policy::DEFAULT {
        return RangeState::Applied;
    }
    match check {
        Some(c) if c.pages_sampled_misplaced > 0 => RangeState::Drifted,
        _ if !r.placed => RangeState::Pending,
        Some(c) if c.pages_allocated < c.pages_total => RangeState::Pending,
        Some(c) if c.pages_sampled_unknown == 0 => RangeState::Applied,
        _ => RangeState::Unverified,
    }
}

fn vm_of_fd(fd: OwnedFd) -> Result<GuestMemfdVm, AgentError> {
    GuestMemfdVm::from_fd(fd)
        .map_err(|_| AgentError::InvalidArgument("the fd handed in is not a KVM VM fd".into()))
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

/// Sample points per range for drift detection, besides its first and last page.
const DRIFT_SAMPLES: u64 = 512;

/// The offsets at which a range's shared policy is read: its first page, every `stride` bytes
/// after it, and its last page. The stride is the range's length over [`DRIFT_SAMPLES`], rounded
/// up to whole pages, so a range of up to that many pages is read at every page and any foreign
/// sub-range at least one stride long contains a sample.
fn sample_offsets(r: &RangeIntent, page: u64) -> impl Iterator<Item = u64> {
    let pages = (r.length / page).max(1);
    let stride = pages.div_ceil(DRIFT_SAMPLES) * page;
    let last = r.end().saturating_sub(page).max(r.offset);
    (r.offset..r.end())
        .step_by(stride as usize)
        .chain((!(last - r.offset).is_multiple_of(stride)).then_some(last))
}

/// Where a range's policy was found not to be its intent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Drift {
    /// The first sampled offset that differs.
    offset: u64,
    /// What the kernel reports there; `None` when it cannot be read.
    found: Option<Policy>,
}

/// The first sample of a range whose policy, as the kernel reports it, is not the range's
/// intent; `None` when every sample matches.
fn find_drift(mapping: &Mapping, r: &RangeIntent, page: u64) -> Option<Drift> {
    sample_offsets(r, page).find_map(|offset| {
        let found = mapping.policy_at(offset).ok().flatten();
        (found != Some(r.policy)).then_some(Drift { offset, found })
    })
}

/// [`find_drift`] at the range's first and last page only.
fn find_drift_at_ends(mapping: &Mapping, r: &RangeIntent, page: u64) -> Option<Drift> {
    let last = r.end().saturating_sub(page).max(r.offset);
    [r.offset, last].into_iter().find_map(|offset| {
        let found = mapping.policy_at(offset).ok().flatten();
        (found != Some(r.policy)).then_some(Drift { offset, found })
    })
}

/// The policy the kernel holds over a range as far as its samples tell: the intent when every
/// sample matches, else what the first differing sample reports (`None` when unreadable).
fn observe(mapping: &Mapping, r: &RangeIntent, page: u64) -> Option<Policy> {
    match find_drift(mapping, r, page) {
        None => Some(r.policy),
        Some(d) => d.found,
    }
}

/// [`observe`] at the range's first and last page only.
fn observe_at_ends(mapping: &Mapping, r: &RangeIntent, page: u64) -> Option<Policy> {
    match find_drift_at_ends(mapping, r, page) {
        None => Some(r.policy),
        Some(d) => d.found,
    }
}

/// Pages of `[offset, offset+length)` allocated in the region's file, from the kernel. An error
/// when the kernel cannot tell: a caller that must refuse on allocated pages must not read that
/// as "none".
fn resident_pages(live: &LiveRegion, offset: u64, length: u64, page: u64) -> Result<u64, Errno> {
    let Some(f) = live.file.as_ref() else {
        return Err(Errno::EBADF);
    };
    let map = match f.mapping.as_ref() {
        Some(m) => placement::allocated(f.fd.as_fd(), m, offset, length, page)?,
        None => kernel::files::allocated_map(f.fd.as_fd(), offset, length, page)?,
    };
    Ok(map.iter().filter(|b| **b).count() as u64)
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

#[cfg(test)]
mod policy_warning_tests {
    use super::{Capabilities, policy_warning};
    use crate::domain::{Backend, NodeSet, Policy, PolicyMode, Strategy};

    fn caps(exact: Option<bool>) -> Capabilities {
        Capabilities {
            kernel_release: "7.0.4-cloud-amd64".into(),
            guest_memfd_interleave_exact: exact,
            guest_memfd_interleave_note:
                "not probed: needs two NUMA nodes the agent may use, has 1".into(),
            ..Default::default()
        }
    }

    fn policy(mode: PolicyMode, nodes: &[u32]) -> Policy {
        Policy::new(
            mode,
            NodeSet::from_ids(nodes.iter().copied()).expect("nodes"),
        )
    }

    #[test]
    fn interleave_on_guest_memfd_warns_where_the_probe_found_it_inexact() {
        let il = policy(PolicyMode::Interleave, &[0, 1]);
        let w = policy_warning(
            Backend::GuestMemfd,
            Strategy::SharedPolicy,
            &il,
            &caps(Some(false)),
        )
        .expect("a warning");
        assert!(
            w.contains("interleave on guest_memfd is not exact on kernel 7.0.4"),
            "{w}"
        );
        assert!(w.contains("applied as asked"), "{w}");
        let wil = policy(PolicyMode::WeightedInterleave, &[0, 1]);
        assert!(
            policy_warning(
                Backend::GuestMemfd,
                Strategy::SharedPolicy,
                &wil,
                &caps(Some(false))
            )
            .is_some()
        );
        // Not known: still warned, with the probe's reason.
        let w = policy_warning(
            Backend::GuestMemfd,
            Strategy::SharedPolicy,
            &il,
            &caps(None),
        )
        .expect("a warning");
        assert!(
            w.contains("could not be verified") && w.contains("needs two NUMA nodes"),
            "{w}"
        );
    }

    #[test]
    fn no_warning_where_interleave_is_exact_or_not_at_stake() {
        let il = policy(PolicyMode::Interleave, &[0, 1]);
        let inexact = caps(Some(false));
        // Exact (7.2+).
        assert_eq!(
            policy_warning(
                Backend::GuestMemfd,
                Strategy::SharedPolicy,
                &il,
                &caps(Some(true))
            ),
            None
        );
        // memfd interleaves by offset; task-policy placement is the agent's own allocation.
        assert_eq!(
            policy_warning(Backend::Memfd, Strategy::SharedPolicy, &il, &inexact),
            None
        );
        assert_eq!(
            policy_warning(Backend::GuestMemfd, Strategy::TaskPolicy, &il, &inexact),
            None
        );
        // Other modes, and interleave over one node.
        for p in [
            policy(PolicyMode::Bind, &[0, 1]),
            policy(PolicyMode::PreferredMany, &[0, 1]),
            policy(PolicyMode::Interleave, &[1]),
        ] {
            assert_eq!(
                policy_warning(Backend::GuestMemfd, Strategy::SharedPolicy, &p, &inexact),
                None,
                "{p}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live_with(fd: OwnedFd, size: u64) -> LiveRegion {
        let key = RegionKey {
            vm_id: "vm".into(),
            name: "r".into(),
        };
        LiveRegion {
            intent: RegionIntent {
                key,
                uid: new_uid(),
                backend: Backend::GuestMemfd,
                size_bytes: size,
                hugepage_size_bytes: 0,
                generation: 1,
                strategy: Strategy::TaskPolicy,
                ranges: RangeMap::new(size),
                created_unix: 0,
                status: RegionStatus::Active,
                holder: None,
                file_id: None,
                adopted: false,
            },
            file: Some(RegionFile {
                fd,
                mapping: None,
                vm: None,
            }),
            errors: HashMap::new(),
        }
    }

    /// When the kernel cannot say which pages are allocated, the count is an error, not 0 (0
    /// would let a guest_memfd migrate through, whose pages cannot move).
    #[test]
    fn resident_pages_fails_when_the_kernel_cannot_tell() {
        let page = kernel::page_size();
        // An O_PATH descriptor: cachestat refuses it (EBADF).
        let fd: OwnedFd = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open("/")
            .unwrap()
            .into();
        let live = live_with(fd, page);
        assert!(
            resident_pages(&live, 0, page, page).is_err(),
            "an unreadable allocation map must not count as no pages"
        );
        // A real file counts: nothing allocated, then one page.
        let fd = kernel::create_memfd("resident-test", 2 * page, None).unwrap();
        kernel::fallocate(fd.as_fd(), page, page, false).unwrap();
        let live = live_with(fd, 2 * page);
        assert_eq!(resident_pages(&live, 0, 2 * page, page), Ok(1));
    }

    use std::os::unix::fs::OpenOptionsExt;

    /// Samples: every page of a small range once, a stride of 1/512 of a large one, and always
    /// the last page.
    #[test]
    fn sample_offsets_cover_the_range() {
        let page = 4096;
        let r = |offset, pages| RangeIntent {
            offset,
            length: pages * page,
            policy: Policy::DEFAULT,
            placed: false,
        };
        let small: Vec<u64> = sample_offsets(&r(8 * page, 4), page).collect();
        assert_eq!(small, [8, 9, 10, 11].map(|p| p * page));
        assert_eq!(sample_offsets(&r(0, 1), page).collect::<Vec<_>>(), [0]);
        let big: Vec<u64> = sample_offsets(&r(0, 16384), page).collect();
        assert_eq!(big.len(), 513);
        assert_eq!(big[1], 32 * page);
        assert_eq!(*big.last().unwrap(), 16383 * page);
        let odd: Vec<u64> = sample_offsets(&r(0, 1000), page).collect();
        assert_eq!(odd.len(), 501);
        assert!(odd.windows(2).all(|w| w[1] - w[0] <= 2 * page));
        assert_eq!(*odd.last().unwrap(), 999 * page);
    }

    /// A task-policy range's state comes from the kernel's answer, not from `placed` alone.
    #[test]
    fn task_state_follows_the_kernel() {
        use placement::RangeCheck;
        let bind = Policy::new(
            PolicyMode::Bind,
            crate::domain::NodeSet::from_ids([1]).unwrap(),
        );
        let r = |placed| RangeIntent {
            offset: 0,
            length: 8 * 4096,
            policy: bind,
            placed,
        };
        let full = RangeCheck {
            pages_total: 8,
            pages_allocated: 8,
            pages_sampled: 8,
            ..Default::default()
        };
        assert_eq!(task_state(&r(true), Some(full)), RangeState::Applied);
        assert_eq!(task_state(&r(false), Some(full)), RangeState::Pending);
        assert_eq!(task_state(&r(true), None), RangeState::Unverified);
        let punched = RangeCheck {
            pages_allocated: 7,
            ..full
        };
        assert_eq!(task_state(&r(true), Some(punched)), RangeState::Pending);
        let elsewhere = RangeCheck {
            pages_sampled_misplaced: 1,
            ..full
        };
        assert_eq!(task_state(&r(true), Some(elsewhere)), RangeState::Drifted);
        assert_eq!(task_state(&r(false), Some(elsewhere)), RangeState::Drifted);
        let unknown = RangeCheck {
            pages_sampled_unknown: 1,
            ..full
        };
        assert_eq!(task_state(&r(true), Some(unknown)), RangeState::Unverified);
        let default = RangeIntent {
            policy: Policy::DEFAULT,
            ..r(false)
        };
        assert_eq!(task_state(&default, None), RangeState::Applied);
    }
}
