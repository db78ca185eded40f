//! The Prometheus /metrics listener: plain HTTP/1, one path, stopped by the shutdown signal.

use crate::engine::Agent;
use crate::metrics::Metrics;
use std::sync::Arc;
use tokio::sync::watch;

/// Serves `metrics` on /metrics of `listener` until `stop` changes.
pub(super) async fn serve_metrics(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.changed() => return,
        };
        let Ok((stream, _)) = conn else { continue };
        let (agent, metrics) = (agent.clone(), metrics.clone());
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (agent, metrics) = (agent.clone(), metrics.clone());
                    async move {
                        let (status, body) = if req.uri().path() == "/metrics" {
                            metrics.refresh_regions(&agent).await;
                            (200, metrics.render())
                        } else {
                            (404, "not found: try /metrics\n".to_string())
                        };
                        http::Response::builder()
                            .status(status)
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
