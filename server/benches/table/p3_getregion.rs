//! P3: GetRegion with 32 clients against a tonic echo of the same Region.

use crate::common::AgentProc;
use crate::report::*;
use memplace_client::{Client, pb};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) async fn p3(agent: &AgentProc, clients: &[Client]) -> Row {
    let secs = env_u64("MEMPLACE_BENCH_SECS", 2);
    let n = samples();
    println!("P3: GetRegion, {CLIENTS} clients, {n} samples of {secs} s each side, interleaved");
    let mut c0 = clients[0].clone();
    let canned = c0.get_region("p2vm0", "ram").await.expect("GetRegion");
    let sock = agent.dir.path().join("echo.sock");
    let echo = EchoServer::start(&sock, canned);
    let mut echo_clients = Vec::new();
    for _ in 0..CLIENTS {
        echo_clients.push(Client::connect_unix(&sock).await.expect("echo connect"));
    }
    let d = Duration::from_secs(secs);
    let mut agent_rps = Series::new("agent GetRegion", "req/s");
    let mut echo_rps = Series::new("echo GetRegion", "req/s");
    // Warm-up.
    let _ = get_region_load(clients, Duration::from_millis(300)).await;
    let _ = get_region_load(&echo_clients, Duration::from_millis(300)).await;
    for _ in 0..n {
        agent_rps.samples.push(get_region_load(clients, d).await);
        echo_rps
            .samples
            .push(get_region_load(&echo_clients, d).await);
    }
    drop(echo);
    let ratio = agent_rps.median() / echo_rps.median();
    Row {
        id: "P3",
        what: format!("GetRegion, {CLIENTS} clients, Unix socket"),
        measured: agent_rps.show(),
        against: format!("tonic echo of the same Region: {}", echo_rps.show()),
        ratio: format!("{ratio:.2}x"),
        goal: ">= 0.5x",
        met: ratio >= 0.5,
        notes: vec![
            "echo: a NodeAgentService whose GetRegion returns a canned copy of the agent's answer, on its own 2-thread runtime, same client".into(),
        ],
        series: vec![agent_rps, echo_rps],
    }
}

pub(crate) async fn get_region_load(clients: &[Client], d: Duration) -> f64 {
    let deadline = Instant::now() + d;
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for (i, c) in clients.iter().enumerate() {
        let mut c = c.clone();
        tasks.spawn(async move {
            let vm = format!("p2vm{i}");
            let mut n = 0u64;
            while Instant::now() < deadline {
                c.get_region(&vm, "ram").await.expect("GetRegion");
                n += 1;
            }
            n
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r.expect("client task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// The P3 peer: a tonic server on a Unix socket that answers GetRegion with a canned region and
/// does nothing else, on its own runtime so it does not share the clients' threads.
pub(crate) struct EchoServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(sock: &Path, region: pb::Region) -> Self {
        use memplace_proto::v1::node_agent_service_server::NodeAgentServiceServer;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let sock = sock.to_path_buf();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("echo runtime");
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&sock).expect("echo bind");
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                let _ = ready_tx.send(());
                tonic::transport::Server::builder()
                    .add_service(NodeAgentServiceServer::new(Echo {
                        region: Arc::new(region),
                    }))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("echo serve");
            });
        });
        ready.recv().expect("echo ready");
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(crate) struct Echo {
    region: Arc<pb::Region>,
}

pub(crate) type EchoStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

pub(crate) fn unimplemented<T>() -> Result<tonic::Response<T>, tonic::Status> {
    Err(tonic::Status::unimplemented("echo serves GetRegion only"))
}

#[tonic::async_trait]
impl memplace_proto::v1::node_agent_service_server::NodeAgentService for Echo {
    async fn get_node_info(
        &self,
        _: tonic::Request<pb::GetNodeInfoRequest>,
    ) -> Result<tonic::Response<pb::GetNodeInfoResponse>, tonic::Status> {
        unimplemented()
    }
    async fn create_region(
        &self,
        _: tonic::Request<pb::CreateRegionRequest>,
    ) -> Result<tonic::Response<pb::CreateRegionResponse>, tonic::Status> {
        unimplemented()
    }
    async fn get_region(
        &self,
        req: tonic::Request<pb::GetRegionRequest>,
    ) -> Result<tonic::Response<pb::GetRegionResponse>, tonic::Status> {
        let r = req.into_inner();
        let mut region = (*self.region).clone();
        region.vm_id = r.vm_id;
        region.name = r.name;
        Ok(tonic::Response::new(pb::GetRegionResponse {
            region: Some(region),
        }))
    }
    async fn list_regions(
        &self,
        _: tonic::Request<pb::ListRegionsRequest>,
    ) -> Result<tonic::Response<pb::ListRegionsResponse>, tonic::Status> {
        unimplemented()
    }
    async fn delete_region(
        &self,
        _: tonic::Request<pb::DeleteRegionRequest>,
    ) -> Result<tonic::Response<pb::DeleteRegionResponse>, tonic::Status> {
        unimplemented()
    }
    async fn set_policy(
        &self,
        _: tonic::Request<pb::SetPolicyRequest>,
    ) -> Result<tonic::Response<pb::SetPolicyResponse>, tonic::Status> {
        unimplemented()
    }
    type PopulateStream = EchoStream<pb::PopulateResponse>;
    async fn populate(
        &self,
        _: tonic::Request<pb::PopulateRequest>,
    ) -> Result<tonic::Response<Self::PopulateStream>, tonic::Status> {
        unimplemented()
    }
    async fn get_placement(
        &self,
        _: tonic::Request<pb::GetPlacementRequest>,
    ) -> Result<tonic::Response<pb::GetPlacementResponse>, tonic::Status> {
        unimplemented()
    }
    async fn reconcile(
        &self,
        _: tonic::Request<pb::ReconcileRequest>,
    ) -> Result<tonic::Response<pb::ReconcileResponse>, tonic::Status> {
        unimplemented()
    }
    async fn issue_handoff_token(
        &self,
        _: tonic::Request<pb::IssueHandoffTokenRequest>,
    ) -> Result<tonic::Response<pb::IssueHandoffTokenResponse>, tonic::Status> {
        unimplemented()
    }
    async fn attach_process(
        &self,
        _: tonic::Request<pb::AttachProcessRequest>,
    ) -> Result<tonic::Response<pb::AttachProcessResponse>, tonic::Status> {
        unimplemented()
    }
    type WatchEventsStream = EchoStream<pb::WatchEventsResponse>;
    async fn watch_events(
        &self,
        _: tonic::Request<pb::WatchEventsRequest>,
    ) -> Result<tonic::Response<Self::WatchEventsStream>, tonic::Status> {
        unimplemented()
    }
}
