//! The gRPC edge: each handler converts its request ([`crate::convert`]), runs mutations through
//! `idempotency`, calls the engine, and maps errors to `tonic::Status` in one function,
//! [`status_of`]. It never calls the kernel module; the engine does.

mod events;
mod idempotency;
mod paging;

use crate::convert::{
    backend_from_pb, node_info_to_pb, node_pages, placement_to_pb, policy_from_pb, region_to_pb,
};
use crate::domain::{DomainError, RegionKey, VmId};
use crate::engine::{
    Agent, AgentError, CreateRequest, PopulateProgress, PopulateRequest, RegionView,
    SetPolicyOutcome, SetPolicyRequest,
};
use crate::metrics::Metrics;
use events::EventWatch;
use idempotency::idempotent;
use memplace_proto::v1 as pb;
use memplace_proto::v1::node_agent_service_server::NodeAgentService;
use nix::errno::Errno;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

/// The agent's version, reported by GetNodeInfo.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The gRPC service.
#[derive(Clone, Debug)]
pub struct NodeAgent {
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
}

impl NodeAgent {
    /// Serves `agent`, recording placement reads and reconcile passes in `metrics`.
    pub fn new(agent: Arc<Agent>, metrics: Arc<Metrics>) -> Self {
        Self { agent, metrics }
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

/// Kernel errno to gRPC code (see [`crate::engine::ErrorCode::of_errno`]).
pub fn code_of_errno(errno: Errno) -> Code {
    crate::engine::ErrorCode::of_errno(errno).grpc()
}

fn invalid(e: impl Into<DomainError>) -> Status {
    status_of(AgentError::Invalid(e.into()))
}

/// A region key from a request, checked once here.
fn key(vm_id: &str, name: &str) -> Result<RegionKey, Status> {
    RegionKey::parse(vm_id, name).map_err(invalid)
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
        Ok(Response::new(node_info_to_pb(
            &topo,
            self.agent.features(),
            VERSION,
            self.agent.page_size(),
        )))
    }

    async fn create_region(
        &self,
        req: Request<pb::CreateRegionRequest>,
    ) -> Result<Response<pb::CreateRegionResponse>, Status> {
        let who = caller(&req);
        let agent = self.agent.clone();
        idempotent(&self.agent, req.into_inner(), |r, record| async move {
            let backend = backend_from_pb(r.backend)?;
            let mut policies = Vec::with_capacity(r.policies.len());
            for p in &r.policies {
                policies.push((p.offset, p.length, policy_from_pb(p.policy.as_ref())?));
            }
            let token = agent.vm_token(&r.vm_id);
            let to_pb = move |v: &RegionView| pb::CreateRegionResponse {
                region: Some(region_to_pb(v)),
                handoff_token: token.clone(),
            };
            let idem = record.map(|rec| rec.answer(to_pb.clone()));
            tracing::info!(vm_id = %r.vm_id, name = %r.name, request_id = %r.request_id, caller = %who, size = r.size_bytes, "CreateRegion");
            let key = RegionKey::parse(&r.vm_id, &r.name)?;
            let create = CreateRequest {
                key,
                size_bytes: r.size_bytes,
                backend,
                hugepage_size_bytes: r.hugepage_size_bytes,
                policies,
            };
            let view = agent.create_region(create, &who, idem).await?;
            Ok(to_pb(&view))
        })
        .await
        .map(Response::new)
    }

    async fn get_region(
        &self,
        req: Request<pb::GetRegionRequest>,
    ) -> Result<Response<pb::GetRegionResponse>, Status> {
        let r = req.into_inner();
        let v = self
            .agent
            .get_region(&key(&r.vm_id, &r.name)?, r.fresh)
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
        let vm = vm_filter(&r.vm_id)?;
        let page = paging::page_request(&r.vm_id, r.page_size, &r.page_token)?;
        // Each region is converted as soon as its view is made, so a page never holds its
        // views (about 5 KiB a region of 16 ranges) beside its messages.
        let (regions, more) = self
            .agent
            .list_regions_page(vm.as_ref(), page.after.as_ref(), page.size, |v| {
                region_to_pb(&v)
            })
            .await
            .map_err(status_of)?;
        let next_page_token = match regions.last() {
            Some(last) if more => paging::next_page_token(&r.vm_id, &last.vm_id, &last.name),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListRegionsResponse {
            regions,
            next_page_token,
        }))
    }

    async fn delete_region(
        &self,
        req: Request<pb::DeleteRegionRequest>,
    ) -> Result<Response<pb::DeleteRegionResponse>, Status> {
        let who = caller(&req);
        let agent = self.agent.clone();
        idempotent(&self.agent, req.into_inner(), |r, record| async move {
            let idem = record.map(|rec| rec.answer(delete_answer));
            tracing::info!(vm_id = %r.vm_id, name = %r.name, request_id = %r.request_id, caller = %who, "DeleteRegion");
            let key = RegionKey::parse(&r.vm_id, &r.name)?;
            let v = agent.delete_region(&key, &who, idem).await?;
            Ok(delete_answer(&v))
        })
        .await
        .map(Response::new)
    }

    async fn set_policy(
        &self,
        req: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        let who = caller(&req);
        let agent = self.agent.clone();
        idempotent(&self.agent, req.into_inner(), |r, record| async move {
            let policy = policy_from_pb(r.policy.as_ref())?;
            // The warnings of a replay are the engine's, stored with the first answer.
            let idem = record.map(|rec| rec.answer(set_policy_answer));
            tracing::info!(vm_id = %r.vm_id, name = %r.name, request_id = %r.request_id, caller = %who, %policy, offset = r.offset, length = r.length, migrate = r.migrate, "SetPolicy");
            let req = SetPolicyRequest {
                key: RegionKey::parse(&r.vm_id, &r.name)?,
                offset: r.offset,
                length: r.length,
                policy,
                migrate: r.migrate,
                expected_generation: r.expected_generation,
            };
            let o = agent.set_policy(req, &who, idem).await?;
            Ok(set_policy_answer(&o))
        })
        .await
        .map(Response::new)
    }

    type PopulateStream = BoxStream<pb::PopulateResponse>;

    async fn populate(
        &self,
        req: Request<pb::PopulateRequest>,
    ) -> Result<Response<Self::PopulateStream>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        tracing::info!(vm_id = %r.vm_id, name = %r.name, caller = %who, offset = r.offset, length = r.length, threads = r.threads, cgroup = %r.cgroup, "Populate");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // A bad name is reported on the stream, like every other refusal of a populate.
        match RegionKey::parse(&r.vm_id, &r.name) {
            Ok(key) => {
                let request = PopulateRequest {
                    key,
                    offset: r.offset,
                    length: r.length,
                    threads: r.threads,
                    cgroup: (!r.cgroup.is_empty()).then(|| r.cgroup.clone().into()),
                    verify: r.verify,
                };
                tokio::spawn(populate_stream(
                    self.agent.clone(),
                    self.metrics.clone(),
                    request,
                    who,
                    tx,
                ));
            }
            Err(e) => {
                let _ = tx.send(Err(invalid(e))).await;
            }
        }
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
            .placement(&key(&r.vm_id, &r.name)?, r.offset, r.length)
            .await
            .map_err(status_of)?;
        let whole_region = r.offset == 0 && r.length == 0;
        if whole_region {
            let nodes = p.nodes().into_iter().map(|n| (n.node, n.pages));
            self.metrics
                .observe_placement(&r.vm_id, &r.name, p.page_size, nodes);
        }
        Ok(Response::new(placement_to_pb(&p)))
    }

    async fn reconcile(
        &self,
        req: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        tracing::info!(vm_id = %r.vm_id, caller = %who, "Reconcile");
        let vm = vm_filter(&r.vm_id)?;
        let start = std::time::Instant::now();
        let rep = self
            .agent
            .reconcile(vm.as_ref(), &who)
            .await
            .map_err(status_of)?;
        self.metrics.observe_reconcile(start.elapsed());
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
        let agent = self.agent.clone();
        idempotent(&self.agent, req.into_inner(), |r, record| async move {
            let idem = record.map(|rec| rec.answer(attach_answer));
            tracing::info!(vm_id = %r.vm_id, pid = r.pid, request_id = %r.request_id, caller = %who, "AttachProcess");
            let vm = VmId::parse(&r.vm_id)?;
            let v = agent.attach_process(&vm, r.pid, &who, idem).await?;
            Ok(attach_answer(&v))
        })
        .await
        .map(Response::new)
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

/// DeleteRegion's answer from the region as deleted (also its stored first answer).
fn delete_answer(v: &RegionView) -> pb::DeleteRegionResponse {
    pb::DeleteRegionResponse {
        region: Some(region_to_pb(v)),
    }
}

/// SetPolicy's answer from the engine's outcome (also its stored first answer).
fn set_policy_answer(o: &SetPolicyOutcome) -> pb::SetPolicyResponse {
    pb::SetPolicyResponse {
        region: Some(region_to_pb(&o.region)),
        pages_migrated: o.pages_migrated,
        pages_migrate_failed: o.pages_migrate_failed,
        warnings: o.warnings.clone(),
    }
}

/// AttachProcess's answer from the regions it took over (also its stored first answer).
fn attach_answer(v: &[RegionView]) -> pb::AttachProcessResponse {
    pb::AttachProcessResponse {
        regions: v.iter().map(region_to_pb).collect(),
    }
}

/// Runs one populate and streams its progress, then its summary or error, to `tx`.
async fn populate_stream(
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    request: PopulateRequest,
    who: String,
    tx: tokio::sync::mpsc::Sender<Result<pb::PopulateResponse, Status>>,
) {
    // A populate of the whole region reads where all its pages are: keep that for metrics.
    let whole_region = (request.offset == 0 && request.length == 0)
        .then(|| (request.key.vm_id.clone(), request.key.name.clone()));
    let progress = Arc::new(PopulateProgress::default());
    let p = progress.clone();
    let mut work = tokio::spawn(async move { agent.populate(request, &p, &who).await });
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
        metrics.observe_placement(vm_id, name, o.placement.page_size, nodes);
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
}

/// The VM a list or reconcile is limited to: none when `vm_id` is empty, else the checked id.
fn vm_filter(vm_id: &str) -> Result<Option<VmId>, Status> {
    if vm_id.is_empty() {
        return Ok(None);
    }
    VmId::parse(vm_id).map(Some).map_err(invalid)
}
