//! The client retries mutations on UNAVAILABLE with the same request_id, so the agent's
//! idempotency record turns a retry after a lost answer into the first answer. A stand-in
//! server on a Unix socket refuses the first two attempts of each call and records what came.

use memplace_client::{Client, ClientError, pb};
use pb::node_agent_service_server::{NodeAgentService, NodeAgentServiceServer};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Refuses the first `refusals` attempts of every call with UNAVAILABLE, recording the request
/// ids it saw.
#[derive(Clone, Default)]
struct Flaky {
    seen: Arc<Mutex<Vec<(String, String)>>>,
    refusals: usize,
}

impl Flaky {
    fn attempt(&self, method: &str, request_id: &str) -> Result<(), Status> {
        let mut seen = self.seen.lock().unwrap();
        seen.push((method.into(), request_id.into()));
        let n = seen.iter().filter(|(m, _)| m == method).count();
        if n <= self.refusals {
            return Err(Status::unavailable("restarting"));
        }
        Ok(())
    }
}

fn region(vm_id: &str, name: &str) -> pb::Region {
    pb::Region {
        vm_id: vm_id.into(),
        name: name.into(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl NodeAgentService for Flaky {
    async fn get_node_info(
        &self,
        _: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::GetNodeInfoResponse>, Status> {
        self.attempt("GetNodeInfo", "")?;
        Ok(Response::new(Default::default()))
    }
    async fn create_region(
        &self,
        r: Request<pb::CreateRegionRequest>,
    ) -> Result<Response<pb::CreateRegionResponse>, Status> {
        let r = r.into_inner();
        self.attempt("CreateRegion", &r.request_id)?;
        Ok(Response::new(pb::CreateRegionResponse {
            region: Some(region(&r.vm_id, &r.name)),
            handoff_token: "t".into(),
        }))
    }
    async fn get_region(
        &self,
        _: Request<pb::GetRegionRequest>,
    ) -> Result<Response<pb::GetRegionResponse>, Status> {
        Err(Status::not_found("no region"))
    }
    async fn list_regions(
        &self,
        _: Request<pb::ListRegionsRequest>,
    ) -> Result<Response<pb::ListRegionsResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn delete_region(
        &self,
        r: Request<pb::DeleteRegionRequest>,
    ) -> Result<Response<pb::DeleteRegionResponse>, Status> {
        let r = r.into_inner();
        self.attempt("DeleteRegion", &r.request_id)?;
        Ok(Response::new(pb::DeleteRegionResponse {
            region: Some(region(&r.vm_id, &r.name)),
        }))
    }
    async fn set_policy(
        &self,
        r: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        let r = r.into_inner();
        self.attempt("SetPolicy", &r.request_id)?;
        Ok(Response::new(Default::default()))
    }
    type PopulateStream = Stream<pb::PopulateResponse>;
    async fn populate(
        &self,
        _: Request<pb::PopulateRequest>,
    ) -> Result<Response<Self::PopulateStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn get_placement(
        &self,
        _: Request<pb::GetPlacementRequest>,
    ) -> Result<Response<pb::GetPlacementResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn reconcile(
        &self,
        _: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    type WatchEventsStream = Stream<pb::WatchEventsResponse>;
    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn issue_handoff_token(
        &self,
        _: Request<pb::IssueHandoffTokenRequest>,
    ) -> Result<Response<pb::IssueHandoffTokenResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn attach_process(
        &self,
        _: Request<pb::AttachProcessRequest>,
    ) -> Result<Response<pb::AttachProcessResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Serves `svc` on a fresh Unix socket and connects a client to it.
async fn serve(svc: Flaky, test: &str) -> (Client, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("memplace-client-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeAgentServiceServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    (Client::connect_unix(&path).await.unwrap(), dir)
}

#[tokio::test]
async fn mutations_retry_unavailable_with_the_same_request_id() {
    let svc = Flaky {
        refusals: 2,
        ..Default::default()
    };
    let seen = svc.seen.clone();
    let (mut c, dir) = serve(svc, "same-id").await;

    c.create_region("vm1", "ram0", 1 << 20, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    let policy = memplace_client::policy(pb::PolicyMode::Bind, "0").unwrap();
    c.set_policy("vm1", "ram0", 0, 0, policy, false)
        .await
        .unwrap();
    c.delete_region("vm1", "ram0").await.unwrap();
    c.node_info().await.unwrap();

    let seen = seen.lock().unwrap().clone();
    for method in ["CreateRegion", "SetPolicy", "DeleteRegion"] {
        let ids: Vec<&String> = seen
            .iter()
            .filter(|(m, _)| m == method)
            .map(|(_, id)| id)
            .collect();
        assert_eq!(
            ids.len(),
            3,
            "{method}: two refusals, then the answer: {seen:?}"
        );
        assert!(!ids[0].is_empty(), "{method} carried no request_id");
        assert!(ids.iter().all(|id| *id == ids[0]), "{method}: {ids:?}");
    }
    // Each call had its own id.
    let firsts: std::collections::HashSet<&String> = seen
        .iter()
        .filter(|(m, _)| m != "GetNodeInfo")
        .map(|(_, id)| id)
        .collect();
    assert_eq!(firsts.len(), 3);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn retries_give_up_and_other_codes_are_not_retried() {
    let svc = Flaky {
        refusals: 100,
        ..Default::default()
    };
    let seen = svc.seen.clone();
    let (mut c, dir) = serve(svc, "give-up").await;
    c.retries = 2;
    let e = c
        .create_region("vm1", "ram0", 1 << 20, pb::Backend::Memfd, vec![])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unavailable));
    assert_eq!(seen.lock().unwrap().len(), 3, "one try and two retries");
    // NOT_FOUND is an answer, not a failure to reach the agent: no retry, the message kept.
    let e = c.get_region("vm1", "nope").await.unwrap_err();
    assert!(matches!(&e, ClientError::Status(s) if s.code() == tonic::Code::NotFound));
    assert_eq!(e.to_string(), "no region");
    let _ = std::fs::remove_dir_all(dir);
}
