//! The gRPC listeners: one stack of services and tower layers, served on the Unix socket (plain)
//! and on TCP (mTLS when configured), both stopped by the shutdown signal.

use super::AppError;
use crate::api::NodeAgent;
use crate::auth::{AuthLayer, Roles};
use crate::config::Config;
use crate::engine::Agent;
use crate::metrics::{Metrics, RequestMetricsLayer};
use memplace_proto::v1::node_agent_service_server::NodeAgentServiceServer;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::ServerTlsConfig;

type Served = JoinHandle<Result<(), tonic::transport::Error>>;

/// The running gRPC servers.
pub(super) struct Serving {
    unix: Served,
    tcp: Option<Served>,
}

impl Serving {
    /// Waits for the servers to drain after the stop signal: in-flight requests get `grace` to
    /// finish. The Unix server's failure is the agent's.
    pub(super) async fn drain(self, grace: Duration) -> Result<(), AppError> {
        let drained = tokio::time::timeout(grace, self.unix).await;
        if let Some(t) = self.tcp {
            let _ = tokio::time::timeout(grace, t).await;
        }
        match drained {
            Ok(Ok(Ok(()))) | Err(_) => Ok(()),
            Ok(Ok(Err(e))) => Err(AppError::Serve(e.to_string())),
            Ok(Err(e)) => Err(AppError::Serve(e.to_string())),
        }
    }
}

/// Serves gRPC on the Unix socket that `bind_unix` binds once the services are ready (and on
/// `cfg.listen_tcp`, with `tls` if given) until `stop` changes.
pub(super) async fn serve(
    cfg: &Config,
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    tls: Option<ServerTlsConfig>,
    bind_unix: impl FnOnce() -> Result<tokio::net::UnixListener, AppError>,
    stop: watch::Receiver<bool>,
) -> Result<Serving, AppError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<NodeAgentServiceServer<NodeAgent>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(memplace_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| AppError::Serve(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| AppError::Serve(e.to_string()))?;
    let service = NodeAgentServiceServer::new(NodeAgent::new(agent, metrics.clone()))
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes);
    let auth = AuthLayer::new(roles(cfg), metrics.clone());
    // One shedding budget shared by the Unix and TCP listeners.
    let shed = crate::shed::ShedLayer::new(cfg.max_concurrent_requests, metrics.clone());
    let metered = RequestMetricsLayer::new(metrics);
    let timeout = Duration::from_secs(cfg.request_timeout_secs);
    // The same stack serves the Unix socket (plain) and TCP (mTLS when configured).
    let build = |server: tonic::transport::Server| {
        server
            // Outside everything: count and time every request, so refusals by the auth and
            // load-shedding layers below show up in memplace_requests with their codes too.
            .layer(metered.clone())
            // Then refuse callers without a role before they use any capacity.
            .layer(auth.clone())
            // Then shed load: a bounded number of requests in flight (a stream counts until it
            // ends), the rest refused at once with UNAVAILABLE rather than queued without bound.
            .layer(shed.clone())
            // Innermost, around the services where decoding happens: a body that is not valid
            // protobuf is the caller's error (INVALID_ARGUMENT), not the agent's (INTERNAL).
            .layer(tower::util::MapResponseLayer::new(
                crate::shed::decode_error_is_invalid_argument,
            ))
            // A deadline per request, enforced by tonic around the whole stack until the
            // response headers (unary calls; streams run until done or cancelled). Message size
            // is bounded by the service's max_decoding_message_size (RESOURCE_EXHAUSTED).
            .timeout(timeout)
            .add_service(health_service.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(service.clone())
    };
    let router = build(tonic::transport::Server::builder());
    let unix = bind_unix()?;
    let stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.changed().await;
    };

    let mut tcp = None;
    if let Some(addr) = cfg.listen_tcp {
        let router = match &tls {
            Some(tls) => {
                tracing::info!(%addr, "serving gRPC on TCP with mTLS");
                build(
                    tonic::transport::Server::builder()
                        .tls_config(tls.clone())
                        .map_err(|e| AppError::Serve(format!("TLS: {e}")))?,
                )
            }
            None => {
                tracing::warn!(%addr, "serving gRPC on TCP WITHOUT TLS (insecure_tcp): anyone who can reach this address is an admin");
                router.clone()
            }
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AppError::Bind(addr.to_string(), e))?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tcp = Some(tokio::spawn(
            router.serve_with_incoming_shutdown(incoming, stopped(stop.clone())),
        ));
    }
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(unix);
    let unix = tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped(stop)));
    Ok(Serving { unix, tcp })
}

/// Who may call what, from the configuration's uid, gid and certificate-name lists.
fn roles(cfg: &Config) -> Roles {
    Roles {
        admin_uids: cfg.admin_uids.iter().copied().collect(),
        viewer_uids: cfg.viewer_uids.iter().copied().collect(),
        admin_gids: cfg.admin_gids.iter().copied().collect(),
        viewer_gids: cfg.viewer_gids.iter().copied().collect(),
        admin_names: cfg.admin_names.iter().cloned().collect(),
        viewer_names: cfg.viewer_names.iter().cloned().collect(),
        insecure_tcp_admin: cfg.insecure_tcp,
    }
}
