//! Load shedding: at most N requests in flight; the rest are refused at once with UNAVAILABLE,
//! so a flood never queues without bound or starves the reconcile loop. A request stays "in
//! flight" until its response body ends, so a streaming Populate holds its slot for as long as it
//! runs, not only until its response headers are sent.

use crate::metrics::Metrics;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::Semaphore;
use tonic::server::NamedService;
use tower::{Layer, Service};

/// Limits requests in flight.
#[derive(Clone, Debug)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    max: usize,
    metrics: Arc<Metrics>,
}

impl ShedLayer {
    /// At most `max` requests in flight; refusals are counted in `metrics`.
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            metrics,
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            permits: self.permits.clone(),
            max: self.max,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`ShedLayer`].
#[derive(Clone, Debug)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max: usize,
    metrics: Arc<Metrics>,
}

impl<S: NamedService> NamedService for Shed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.metrics.count_shed();
            let max = self.max;
            return Box::pin(async move {
                Ok(tonic::Status::unavailable(format!(
                    "the agent is at its limit of {max} requests in flight; retry with backoff"
                ))
                .into_http())
            });
        };
        let mut inner = self.inner.clone();
        std::mem::swap(&mut inner, &mut self.inner);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            // The permit moves into the body and is released when hyper drops the body: after
            // the last frame of a stream, or when the client goes away.
            Ok(resp.map(|body| {
                tonic::body::Body::new(http_body_util::BodyExt::map_err(
                    body,
                    move |e: tonic::Status| {
                        let _held = &permit;
                        e
                    },
                ))
            }))
        })
    }
}

/// tonic's message for a body its codec could not decode, as it appears percent-encoded in the
/// grpc-message header.
const DECODE_FAILURE: &str = "failed%20to%20decode%20Protobuf%20message";

/// Answers a request body that is not valid protobuf (truncated, bad wire type, invalid UTF-8)
/// with INVALID_ARGUMENT: tonic's codec reports it as INTERNAL, which would tell the caller the
/// agent is broken when the request is. Used with `tower::util::MapResponseLayer` right around
/// the services, where decode failures are produced.
pub fn decode_error_is_invalid_argument(
    mut resp: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let h = resp.headers();
    let internal = h.get("grpc-status").is_some_and(|v| v == "13");
    let decode = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.starts_with(DECODE_FAILURE));
    if internal && decode {
        resp.headers_mut().insert(
            "grpc-status",
            http::HeaderValue::from(tonic::Code::InvalidArgument as i32),
        );
    }
    resp
}
