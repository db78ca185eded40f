//! The gRPC edge: proto ↔ domain conversion, idempotency records, and the one mapping from
//! errors to `tonic::Status`. It never calls the kernel module; the engine does.

use crate::domain::{Backend, DomainError, Event, NodeSet, Policy, PolicyMode, RegionKey};
use crate::reconcile::{
    Agent, AgentError, CreateRequest, Idempotency, NodeCount, Placement, PopulateProgress,
    PopulateRequest, RangeState, RegionView,
};
use memplace_proto::v1 as pb;
use memplace_proto::v1::node_agent_service_server::NodeAgentService;
use nix::errno::Errno;
use prost::Message;
use sha2::Digest;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

/// The agent's version, reported by GetNodeInfo.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Longest request_id accepted.
const MAX_REQUEST_ID: usize = 128;
/// Most nodes accepted in one policy (the kernel's MAX_NUMNODES).
const MAX_POLICY_NODES: usize = crate::domain::MAX_NODES as usize;

/// The gRPC service.
#[derive(Clone, Debug)]
pub struct NodeAgent {
    agent: Arc<Agent>,
}

impl NodeAgent {
    /// Serves `agent`.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

/// Who is calling, for audit: set by the auth layer as a request extension.
#[derive(Clone, Debug)]
pub struct Caller(pub String);

fn caller<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<Caller>()
        .map(|c| c.0.clone())
        .unwrap_or_else(|| "unknown".into())
}

/// Engine errors to gRPC status: the code is [`AgentError::code`], the one mapping both edges use.
pub fn status_of(e: AgentError) -> Status {
    Status::new(e.code().grpc(), e.to_string())
}

/// Kernel errno to gRPC code (see [`crate::reconcile::ErrorCode::of_errno`]).
pub fn code_of_errno(errno: Errno) -> Code {
    crate::reconcile::ErrorCode::of_errno(errno).grpc()
}

fn invalid(e: impl Into<DomainError>) -> Status {
    status_of(AgentError::Invalid(e.into()))
}

/// Converts an API policy, rejecting unknown modes and node ids out of range.
pub fn policy_from_pb(p: Option<&pb::Policy>) -> Result<Policy, Status> {
    let p = p.ok_or_else(|| Status::invalid_argument("policy is required"))?;
    let mode = match pb::PolicyMode::try_from(p.mode) {
        Ok(pb::PolicyMode::Default) => PolicyMode::Default,
        Ok(pb::PolicyMode::Bind) => PolicyMode::Bind,
        Ok(pb::PolicyMode::Preferred) => PolicyMode::Preferred,
        Ok(pb::PolicyMode::Interleave) => PolicyMode::Interleave,
        Ok(pb::PolicyMode::PreferredMany) => PolicyMode::PreferredMany,
        Ok(pb::PolicyMode::WeightedInterleave) => PolicyMode::WeightedInterleave,
        Ok(pb::PolicyMode::Local) => PolicyMode::Local,
        Ok(pb::PolicyMode::Unspecified) => {
            return Err(Status::invalid_argument(
                "policy mode is POLICY_MODE_UNSPECIFIED: set one of DEFAULT, BIND, PREFERRED, INTERLEAVE, PREFERRED_MANY, WEIGHTED_INTERLEAVE, LOCAL",
            ));
        }
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "policy mode {} is not a known PolicyMode value",
                p.mode
            )));
        }
    };
    if p.nodes.len() > MAX_POLICY_NODES {
        return Err(Status::invalid_argument(format!(
            "policy lists {} nodes; at most {MAX_POLICY_NODES} are possible",
            p.nodes.len()
        )));
    }
    let nodes = NodeSet::from_ids(p.nodes.iter().copied()).map_err(invalid)?;
    let policy = Policy {
        mode,
        nodes,
        static_nodes: p.static_nodes,
        relative_nodes: p.relative_nodes,
    };
    policy.validate().map_err(invalid)?;
    Ok(policy)
}

/// Converts a domain policy.
pub fn policy_to_pb(p: &Policy) -> pb::Policy {
    pb::Policy {
        mode: match p.mode {
            PolicyMode::Default => pb::PolicyMode::Default,
            PolicyMode::Bind => pb::PolicyMode::Bind,
            PolicyMode::Preferred => pb::PolicyMode::Preferred,
            PolicyMode::Interleave => pb::PolicyMode::Interleave,
            PolicyMode::PreferredMany => pb::PolicyMode::PreferredMany,
            PolicyMode::WeightedInterleave => pb::PolicyMode::WeightedInterleave,
            PolicyMode::Local => pb::PolicyMode::Local,
        } as i32,
        nodes: p.nodes.iter().collect(),
        static_nodes: p.static_nodes,
        relative_nodes: p.relative_nodes,
    }
}

/// Converts an API backend.
pub fn backend_from_pb(b: i32) -> Result<Backend, Status> {
    match pb::Backend::try_from(b) {
        Ok(pb::Backend::GuestMemfd) => Ok(Backend::GuestMemfd),
        Ok(pb::Backend::Memfd) => Ok(Backend::Memfd),
        Ok(pb::Backend::MemfdHugetlb) => Ok(Backend::MemfdHugetlb),
        Ok(pb::Backend::Unspecified) => Err(Status::invalid_argument(
            "backend is BACKEND_UNSPECIFIED: set BACKEND_GUEST_MEMFD, BACKEND_MEMFD or BACKEND_MEMFD_HUGETLB",
        )),
        Err(_) => Err(Status::invalid_argument(format!(
            "backend {b} is not a known Backend value"
        ))),
    }
}

fn backend_to_pb(b: Backend) -> pb::Backend {
    match b {
        Backend::GuestMemfd => pb::Backend::GuestMemfd,
        Backend::Memfd => pb::Backend::Memfd,
        Backend::MemfdHugetlb => pb::Backend::MemfdHugetlb,
    }
}

/// Converts a region view.
pub fn region_to_pb(v: &RegionView) -> pb::Region {
    use crate::domain::{RegionStatus, Strategy};
    let i = &v.intent;
    pb::Region {
        vm_id: i.key.vm_id.clone(),
        name: i.key.name.clone(),
        uid: i.uid.clone(),
        backend: backend_to_pb(i.backend) as i32,
        size_bytes: i.size_bytes,
        generation: i.generation,
        strategy: match i.strategy {
            Strategy::SharedPolicy => pb::Strategy::SharedPolicy,
            Strategy::TaskPolicy => pb::Strategy::TaskPolicy,
        } as i32,
        ranges: v
            .ranges
            .iter()
            .map(|r| pb::Range {
                offset: r.intent.offset,
                length: r.intent.length,
                intended: Some(policy_to_pb(&r.intent.policy)),
                observed: r.observed.as_ref().map(policy_to_pb),
                state: match r.state {
                    RangeState::Applied => pb::RangeState::Applied,
                    RangeState::Pending => pb::RangeState::Pending,
                    RangeState::Failed => pb::RangeState::Failed,
                    RangeState::Drifted => pb::RangeState::Drifted,
                    RangeState::Unverified => pb::RangeState::Unverified,
                } as i32,
                last_error: r.last_error.clone(),
                check: r.check.map(|c| pb::RangeCheck {
                    pages_total: c.pages_total,
                    pages_allocated: c.pages_allocated,
                    pages_sampled: c.pages_sampled,
                    pages_sampled_misplaced: c.pages_sampled_misplaced,
                    pages_sampled_unknown: c.pages_sampled_unknown,
                }),
                governs: match i.strategy {
                    Strategy::SharedPolicy => pb::Governs::FutureAllocations,
                    Strategy::TaskPolicy => pb::Governs::AgentAllocationsOnly,
                } as i32,
            })
            .collect(),
        hugepage_size_bytes: i.hugepage_size_bytes,
        status: match i.status {
            RegionStatus::Active => pb::RegionStatus::Active,
            RegionStatus::Lost => pb::RegionStatus::Lost,
        } as i32,
        page_size_bytes: v.page_size,
        created_unix: i.created_unix,
        holder_pid: i.holder.map_or(0, |h| h.pid),
    }
}

fn key(vm_id: &str, name: &str) -> RegionKey {
    RegionKey {
        vm_id: vm_id.to_string(),
        name: name.to_string(),
    }
}

fn check_request_id(id: &str) -> Result<(), Status> {
    if id.len() > MAX_REQUEST_ID || id.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(Status::invalid_argument(format!(
            "request_id must be at most {MAX_REQUEST_ID} printable ASCII characters"
        )));
    }
    Ok(())
}

/// The digest of a request without its request_id: what a retry must repeat.
fn fingerprint<M: Message>(method: &str, msg: &M) -> Vec<u8> {
    let mut h = sha2::Sha256::new();
    h.update(method.as_bytes());
    h.update(msg.encode_to_vec());
    h.finalize().to_vec()
}

/// The stored first answer to a request id, if any. A request id used for a different request is
/// an error.
async fn replay<R: Message + Default>(
    agent: &Agent,
    request_id: &str,
    method: &str,
    print: &[u8],
) -> Result<Option<R>, Status> {
    if request_id.is_empty() {
        return Ok(None);
    }
    let Some(stored) = agent
        .store()
        .request(request_id)
        .await
        .map_err(|e| status_of(e.into()))?
    else {
        return Ok(None);
    };
    if stored.method != method || stored.fingerprint != print {
        return Err(status_of(AgentError::RequestIdReused(
            request_id.to_string(),
        )));
    }
    R::decode(stored.response.as_slice())
        .map(Some)
        .map_err(|e| {
            Status::internal(format!(
                "stored response for {request_id:?} is unreadable: {e}"
            ))
        })
}

fn node_pages(n: &[NodeCount]) -> Vec<pb::NodePages> {
    n.iter()
        .map(|c| pb::NodePages {
            node: c.node,
            pages: c.pages,
        })
        .collect()
}

fn placement_to_pb(p: &Placement) -> pb::GetPlacementResponse {
    pb::GetPlacementResponse {
        nodes: node_pages(&p.nodes()),
        pages_not_present: p.total(|r| r.not_present),
        pages_misplaced: p.total(|r| r.misplaced),
        pages_unknown: p.total(|r| r.unknown),
        page_size_bytes: p.page_size,
        ranges: p
            .ranges
            .iter()
            .map(|r| pb::RangePlacement {
                offset: r.offset,
                length: r.length,
                nodes: node_pages(&r.nodes),
                pages_not_present: r.not_present,
                pages_misplaced: r.misplaced,
                pages_unknown: r.unknown,
            })
            .collect(),
    }
}

/// Converts an event.
pub fn event_to_pb(e: &Event) -> pb::WatchEventsResponse {
    pb::WatchEventsResponse {
        sequence: e.sequence,
        time_unix_ms: e.time_unix_ms,
        kind: e.kind as i32,
        vm_id: e.vm_id.clone(),
        name: e.name.clone(),
        message: e.message.clone(),
        actor: e.actor.clone(),
    }
}

/// Runs a mutation on its own task, so a client that cancels (or a request deadline that fires)
/// cannot stop it between its durable commit and the kernel change that follows: once started,
/// a mutation finishes, whether or not anyone waits for the answer.
async fn run_to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work)
        .await
        .map_err(|e| Status::internal(format!("mutation task failed: {e}")))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How often Populate reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

#[tonic::async_trait]
impl NodeAgentService for NodeAgent {
    async fn get_node_info(
        &self,
        _req: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::GetNodeInfoResponse>, Status> {
        let agent = self.agent.clone();
        let topo = tokio::task::spawn_blocking(move || agent.topology())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let c = self.agent.capabilities();
        Ok(Response::new(pb::GetNodeInfoResponse {
            nodes: topo
                .nodes
                .iter()
                .map(|n| pb::NumaNode {
                    id: n.id,
                    cpus: n.cpus.clone(),
                    memory_total_bytes: n.mem_total,
                    memory_free_bytes: n.mem_free,
                    distances: n.distances.clone(),
                    hugepages: n
                        .hugepages
                        .iter()
                        .map(|h| pb::HugepagePool {
                            page_size_bytes: h.page_size,
                            total_pages: h.total,
                            free_pages: h.free,
                        })
                        .collect(),
                    allowed: topo.usable.contains(n.id),
                })
                .collect(),
            capabilities: Some(pb::Capabilities {
                kvm_usable: c.kvm_usable,
                guest_memfd_supported: c.guest_memfd_supported,
                guest_memfd_flags: c.guest_memfd_flags,
                guest_memfd_shared_policy: c.guest_memfd_shared_policy,
                memfd_shared_policy: c.memfd_shared_policy,
                preferred_many_supported: c.preferred_many,
                weighted_interleave_supported: c.weighted_interleave,
                kernel_release: c.kernel_release.clone(),
                kvm_error: c.kvm_error.clone(),
                hugetlb_shared_policy: c.hugetlb_shared_policy,
                pidfd_getfd_supported: c.pidfd_getfd,
                guest_memfd_interleave_exact: c.guest_memfd_interleave_exact,
                guest_memfd_interleave_note: c.guest_memfd_interleave_note.clone(),
            }),
            agent_version: VERSION.to_string(),
            page_size_bytes: self.agent.page_size(),
        }))
    }

    async fn create_region(
        &self,
        req: Request<pb::CreateRegionRequest>,
    ) -> Result<Response<pb::CreateRegionResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        check_request_id(&r.request_id)?;
        let print = fingerprint(
            "CreateRegion",
            &pb::CreateRegionRequest {
                request_id: String::new(),
                ..r.clone()
            },
        );
        if let Some(first) = replay(&self.agent, &r.request_id, "CreateRegion", &print).await? {
            return Ok(Response::new(first));
        }
        let backend = backend_from_pb(r.backend)?;
        let mut policies = Vec::with_capacity(r.policies.len());
        for p in &r.policies {
            policies.push((p.offset, p.length, policy_from_pb(p.policy.as_ref())?));
        }
        let token = self.agent.vm_token(&r.vm_id);
        let stored_token = token.clone();
        let idem = (!r.request_id.is_empty()).then(|| Idempotency {
            request_id: r.request_id.clone(),
            method: "CreateRegion",
            fingerprint: print.clone(),
            encode: Box::new(move |v: &RegionView| {
                pb::CreateRegionResponse {
                    region: Some(region_to_pb(v)),
                    handoff_token: stored_token.clone(),
                }
                .encode_to_vec()
            }),
        });
        let k = key(&r.vm_id, &r.name);
        tracing::info!(vm_id = %r.vm_id, name = %r.name, request_id = %r.request_id, caller = %who, size = r.size_bytes, "CreateRegion");
        let agent = self.agent.clone();
        let create = CreateRequest {
            key: k,
            size_bytes: r.size_bytes,
            backend,
            hugepage_size_bytes: r.hugepage_size_bytes,
            policies,
        };
        let result =
            run_to_completion(async move { agent.create_region(create, &who, idem).await }).await?;
        if result.is_ok() {
            crate::failpoint::hit("CreateRegion.before-reply", &r.request_id);
        }
        match result {
            Ok(view) => Ok(Response::new(pb::CreateRegionResponse {
                region: Some(region_to_pb(&view)),
                handoff_token: token,
            })),
            // A concurrent retry of the same request_id won the race: answer as it did.
            Err(e @ AgentError::AlreadyExists(_)) => {
                match replay(&self.agent, &r.request_id, "CreateRegion", &print).await? {
                    Some(first) => Ok(Response::new(first)),
                    None => Err(status_of(e)),
                }
            }
            Err(e) => Err(status_of(e)),
        }
    }

    async fn get_region(
        &self,
        req: Request<pb::GetRegionRequest>,
    ) -> Result<Response<pb::GetRegionResponse>, Status> {
        let r = req.into_inner();
        let v = self
            .agent
            .get_region(&key(&r.vm_id, &r.name))
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::GetRegionResponse {
            region: Some(region_to_pb(&v)),
        }))
    }

    async fn list_regions(
        &self,
        req: Request<pb::ListRegionsRequest>,
    ) -> Result<Response<pb::ListRegionsResponse>, Status> {
        let r = req.into_inner();
        let vm = (!r.vm_id.is_empty()).then_some(r.vm_id.as_str());
        let v = self.agent.list_regions(vm).await.map_err(status_of)?;
        Ok(Response::new(pb::ListRegionsResponse {
            regions: v.iter().map(region_to_pb).collect(),
        }))
    }

    async fn delete_region(
        &self,
        req: Request<pb::DeleteRegionRequest>,
    ) -> Result<Response<pb::DeleteRegionResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        check_request_id(&r.request_id)?;
        let print = fingerprint(
            "DeleteRegion",
            &pb::DeleteRegionRequest {
                request_id: String::new(),
                ..r.clone()
            },
        );
        if let Some(first) = replay(&self.agent, &r.request_id, "DeleteRegion", &print).await? {
            return Ok(Response::new(first));
        }
        let idem = (!r.request_id.is_empty()).then(|| Idempotency {
            request_id: r.request_id.clone(),
            method: "DeleteRegion",
            fingerprint: print.clone(),
            encode: Box::new(|v: &RegionView| {
                pb::DeleteRegionResponse {
                    region: Some(region_to_pb(v)),
                }
                .encode_to_vec()
            }),
        });
        tracing::info!(vm_id = %r.vm_id, name = %r.name, request_id = %r.request_id, caller = %who, "DeleteRegion");
        let agent = self.agent.clone();
        let k = key(&r.vm_id, &r.name);
        let result =
            run_to_completion(async move { agent.delete_region(&k, &who, idem).await }).await?;
        if result.is_ok() {
            crate::failpoint::hit("DeleteRegion.before-reply", &r.request_id);
        }
        match result {
            Ok(v) => Ok(Response::new(pb::DeleteRegionResponse {
                region: Some(region_to_pb(&v)),
            })),
            Err(e @ AgentError::NotFound(_)) => {
                match replay(&self.agent, &r.request_id, "DeleteRegion", &print).await? {
                    Some(first) => Ok(Response::new(first)),
                    None => Err(status_of(e)),
                }
            }
            Err(e) => Err(status_of(e)),
        }
    }

    async fn set_policy(
        &self,
        req: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        check_request_id(&r.request_id)?;
        let print = fingerprint(
            "SetPolicy",
            &pb::SetPolicyRequest {
                request_id: String::new(),
                ..r.clone()
            },
        );
        if let Some(first) = replay(&self.agent, &r.request_id, "SetPolicy", &print).await? {
            return Ok(Response::new(first));
        }
        let policy = policy_from_pb(r.policy.as_ref())?;
        let caps = self.agent.capabilities().clone();
        let idem = (!r.request_id.is_empty()).then(|| Idempotency {
            request_id: r.request_id.clone(),
            method: "SetPolicy",
            fingerprint: print.clone(),
            encode: Box::new(move |v: &RegionView| {
                pb::SetPolicyResponse {
                    region: Some(region_to_pb(v)),
                    pages_migrated: 0,
                    pages_migrate_failed: 0,
                    warnings: crate::reconcile::policy_warning(
                        v.intent.backend,
                        v.intent.strategy,
                        &policy,
                        &caps,
                    )
                    .into_iter()
                    .collect(),
                }
                .encode_to_vec()
            }),
        });
        tracing::info!(vm_id = %r.vm_id, name = %r.name, request_id = %r.request_id, caller = %who, %policy, offset = r.offset, length = r.length, migrate = r.migrate, "SetPolicy");
        let agent = self.agent.clone();
        let (k, offset, length, migrate, expected) = (
            key(&r.vm_id, &r.name),
            r.offset,
            r.length,
            r.migrate,
            r.expected_generation,
        );
        let result = run_to_completion(async move {
            agent
                .set_policy(&k, offset, length, policy, migrate, expected, &who, idem)
                .await
        })
        .await?;
        if result.is_ok() {
            crate::failpoint::hit("SetPolicy.before-reply", &r.request_id);
        }
        match result {
            Ok(o) => Ok(Response::new(pb::SetPolicyResponse {
                region: Some(region_to_pb(&o.region)),
                pages_migrated: o.pages_migrated,
                pages_migrate_failed: o.pages_migrate_failed,
                warnings: o.warnings,
            })),
            Err(AgentError::DuplicateRequest(_)) => {
                match replay(&self.agent, &r.request_id, "SetPolicy", &print).await? {
                    Some(first) => Ok(Response::new(first)),
                    None => Err(Status::internal("request record vanished")),
                }
            }
            Err(e) => Err(status_of(e)),
        }
    }

    type PopulateStream = BoxStream<pb::PopulateResponse>;

    async fn populate(
        &self,
        req: Request<pb::PopulateRequest>,
    ) -> Result<Response<Self::PopulateStream>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let request = PopulateRequest {
            key: key(&r.vm_id, &r.name),
            offset: r.offset,
            length: r.length,
            threads: r.threads,
            cgroup: (!r.cgroup.is_empty()).then(|| r.cgroup.clone().into()),
            verify: r.verify,
        };
        tracing::info!(vm_id = %r.vm_id, name = %r.name, caller = %who, offset = r.offset, length = r.length, threads = r.threads, cgroup = %r.cgroup, "Populate");
        // A populate of the whole region reads where all its pages are: keep that for metrics.
        let whole_region = (r.offset == 0 && r.length == 0).then(|| (r.vm_id.clone(), r.name));
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let progress = Arc::new(PopulateProgress::default());
        let agent = self.agent.clone();
        let p = progress.clone();
        let mut work = tokio::spawn(async move { agent.populate(request, &p, &who).await });
        tokio::spawn(async move {
            let progress_msg = |p: &PopulateProgress| pb::PopulateResponse {
                event: Some(pb::populate_response::Event::Progress(
                    pb::PopulateProgress {
                        bytes_done: p.done.load(Ordering::Relaxed),
                        bytes_total: p.total.load(Ordering::Relaxed),
                    },
                )),
            };
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            tick.tick().await;
            let mut reported = false;
            let outcome = loop {
                tokio::select! {
                    r = &mut work => break r,
                    // The first chunk is reported at once: a fast populate may end before a tick.
                    _ = progress.advanced.notified(), if !reported => {
                        reported = true;
                        if tx.send(Ok(progress_msg(&progress))).await.is_err() {
                            progress.cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    _ = tick.tick() => {
                        reported = true;
                        if tx.send(Ok(progress_msg(&progress))).await.is_err() {
                            progress.cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    _ = tx.closed() => {
                        progress.cancel.store(true, Ordering::Relaxed);
                        // Nobody listens any more (closed() stays ready): just wait for the end.
                        break (&mut work).await;
                    }
                }
            };
            if let (Some((vm_id, name)), Ok(Ok(o))) = (&whole_region, &outcome)
                && o.verified
            {
                let nodes = o.placement.nodes().into_iter().map(|n| (n.node, n.pages));
                crate::metrics::observe_placement(vm_id, name, o.placement.page_size, nodes);
            }
            let msg = match outcome {
                Ok(Ok(o)) => Ok(pb::PopulateResponse {
                    event: Some(pb::populate_response::Event::Summary(pb::PopulateSummary {
                        bytes_done: o.bytes_done,
                        bytes_total: o.bytes_total,
                        nodes: node_pages(&o.placement.nodes()),
                        elapsed_seconds: o.elapsed_seconds,
                        cancelled: o.cancelled,
                        threads: o.threads,
                        verified: o.verified,
                    })),
                }),
                Ok(Err(e)) => Err(status_of(e)),
                Err(e) => Err(Status::internal(format!("populate task: {e}"))),
            };
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_placement(
        &self,
        req: Request<pb::GetPlacementRequest>,
    ) -> Result<Response<pb::GetPlacementResponse>, Status> {
        let r = req.into_inner();
        let p = self
            .agent
            .placement(&key(&r.vm_id, &r.name), r.offset, r.length)
            .await
            .map_err(status_of)?;
        let whole_region = r.offset == 0 && r.length == 0;
        if whole_region {
            let nodes = p.nodes().into_iter().map(|n| (n.node, n.pages));
            crate::metrics::observe_placement(&r.vm_id, &r.name, p.page_size, nodes);
        }
        Ok(Response::new(placement_to_pb(&p)))
    }

    async fn reconcile(
        &self,
        req: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let vm = (!r.vm_id.is_empty()).then_some(r.vm_id.as_str());
        tracing::info!(vm_id = %r.vm_id, caller = %who, "Reconcile");
        let start = std::time::Instant::now();
        let rep = self.agent.reconcile(vm, &who).await.map_err(status_of)?;
        crate::metrics::observe_reconcile(start.elapsed());
        Ok(Response::new(pb::ReconcileResponse {
            ranges_checked: rep.checked,
            ranges_reapplied: rep.reapplied,
            ranges_drifted: rep.drifted,
            ranges_failed: rep.failed,
            regions_checked: rep.regions,
            ranges_task_policy: rep.task_policy,
            ranges_lost: rep.lost,
            ranges_unmapped: rep.unmapped,
        }))
    }

    async fn issue_handoff_token(
        &self,
        req: Request<pb::IssueHandoffTokenRequest>,
    ) -> Result<Response<pb::IssueHandoffTokenResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        crate::domain::validate_name("vm_id", &r.vm_id).map_err(invalid)?;
        tracing::info!(vm_id = %r.vm_id, caller = %who, "IssueHandoffToken");
        Ok(Response::new(pb::IssueHandoffTokenResponse {
            handoff_token: self.agent.vm_token(&r.vm_id),
        }))
    }

    async fn attach_process(
        &self,
        req: Request<pb::AttachProcessRequest>,
    ) -> Result<Response<pb::AttachProcessResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        check_request_id(&r.request_id)?;
        let unkeyed = pb::AttachProcessRequest {
            request_id: String::new(),
            ..r.clone()
        };
        let print = fingerprint("AttachProcess", &unkeyed);
        if let Some(first) = replay(&self.agent, &r.request_id, "AttachProcess", &print).await? {
            return Ok(Response::new(first));
        }
        let idem = (!r.request_id.is_empty()).then(|| crate::reconcile::AttachIdempotency {
            request_id: r.request_id.clone(),
            fingerprint: print.clone(),
            encode: Box::new(|v: &[RegionView]| {
                pb::AttachProcessResponse {
                    regions: v.iter().map(region_to_pb).collect(),
                }
                .encode_to_vec()
            }),
        });
        tracing::info!(vm_id = %r.vm_id, pid = r.pid, request_id = %r.request_id, caller = %who, "AttachProcess");
        let agent = self.agent.clone();
        let (vm_id, pid) = (r.vm_id.clone(), r.pid);
        match run_to_completion(async move { agent.attach_process(&vm_id, pid, &who, idem).await })
            .await?
        {
            Ok(v) => Ok(Response::new(pb::AttachProcessResponse {
                regions: v.iter().map(region_to_pb).collect(),
            })),
            Err(e @ AgentError::DuplicateRequest(_)) => {
                match replay(&self.agent, &r.request_id, "AttachProcess", &print).await? {
                    Some(first) => Ok(Response::new(first)),
                    None => Err(status_of(e)),
                }
            }
            Err(e) => Err(status_of(e)),
        }
    }

    type WatchEventsStream = BoxStream<pb::WatchEventsResponse>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let r = req.into_inner();
        if !r.vm_id.is_empty() {
            crate::domain::validate_name("vm_id", &r.vm_id).map_err(invalid)?;
        }
        // Subscribe before reading the log, so nothing falls between replay and follow.
        let live = self.agent.subscribe();
        let agent = self.agent.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let vm = (!r.vm_id.is_empty()).then_some(r.vm_id);
            let watch = EventWatch {
                agent,
                vm,
                tx,
                cursor: r.after_sequence,
            };
            watch.run(live, r.no_follow).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Events read from the log per query.
const EVENT_PAGE: i64 = 1000;

/// One WatchEvents stream: every event after `cursor`, in sequence order, exactly once.
///
/// `cursor` is a sequence number of the whole log (not only of the watched VM): every event up
/// to it has been sent or filtered out. The live feed is only a fast path. Whenever it cannot
/// be trusted to hold the next event, the stream reads the log from `cursor` until it is caught
/// up. That happens when the feed lagged (it dropped events), and when an event arrives past
/// `cursor + 1`. Concurrent commits broadcast their events in any order, but an event's sequence
/// is assigned in commit order, so every earlier event is already in the log by then.
struct EventWatch {
    agent: Arc<Agent>,
    vm: Option<String>,
    tx: tokio::sync::mpsc::Sender<Result<pb::WatchEventsResponse, Status>>,
    cursor: u64,
}

/// Why a stream stopped.
enum WatchEnd {
    /// The client went away.
    Gone,
    /// The log could not be read; the client was sent the error.
    Failed,
}

impl EventWatch {
    async fn run(mut self, mut live: tokio::sync::broadcast::Receiver<Event>, no_follow: bool) {
        if self.catch_up().await.is_err() || no_follow {
            return;
        }
        loop {
            let step = match live.recv().await {
                Ok(e) if e.sequence <= self.cursor => Ok(()),
                Ok(e) if e.sequence == self.cursor + 1 => self.send(&e).await,
                // An event past the next one: the ones between are committed but either still
                // on their way through the feed or dropped from it. Read them from the log.
                Ok(_) => self.catch_up().await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.catch_up().await,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if step.is_err() {
                return;
            }
        }
    }

    /// Sends `e` if it is of the watched VM, and moves the cursor past it.
    async fn send(&mut self, e: &Event) -> Result<(), WatchEnd> {
        self.cursor = e.sequence;
        if self.vm.as_deref().is_some_and(|v| v != e.vm_id) {
            return Ok(());
        }
        self.tx
            .send(Ok(event_to_pb(e)))
            .await
            .map_err(|_| WatchEnd::Gone)
    }

    /// Reads the log after the cursor, page by page, until a page comes back empty.
    async fn catch_up(&mut self) -> Result<(), WatchEnd> {
        loop {
            let page = match self
                .agent
                .store()
                .events_after(self.cursor, None, EVENT_PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    let _ = self.tx.send(Err(status_of(e.into()))).await;
                    return Err(WatchEnd::Failed);
                }
            };
            let Some(first) = page.first() else {
                return Ok(());
            };
            // Sequences are contiguous (AUTOINCREMENT, rolled back with a failed commit), so a
            // first event past `cursor + 1` means the log dropped events this stream still owed:
            // it keeps only the newest EVENT_LOG_LIMIT. Say so, rather than skip them silently.
            // A stream that starts at 0 asked for "whatever the log holds", so nothing is owed.
            if self.cursor > 0 && first.sequence > self.cursor + 1 {
                let st = Status::out_of_range(format!(
                    "events {}..{} were dropped from the log before this stream read them (the log \
                     keeps the newest {}); list the current state, then watch again from sequence \
                     {} or 0",
                    self.cursor + 1,
                    first.sequence - 1,
                    crate::store::EVENT_LOG_LIMIT,
                    first.sequence - 1
                ));
                let _ = self.tx.send(Err(st)).await;
                return Err(WatchEnd::Failed);
            }
            for e in &page {
                self.send(e).await?;
            }
        }
    }
}
