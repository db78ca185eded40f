//! The gRPC edge's request metrics: a tower layer that counts each call by method and status
//! code and times it until its response body ends.

use super::{MethodCode, MethodLabel, Metrics};
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::server::NamedService;
use tower::{Layer, Service};

/// The `method` label of a request path: the known gRPC methods by name (`service/Method`), and
/// `unknown` for anything else, so a caller cannot grow the label set without bound.
fn method_label(path: &str) -> String {
    static KNOWN: OnceLock<HashSet<String>> = OnceLock::new();
    let known = KNOWN.get_or_init(|| {
        use prost::Message;
        let mut known = HashSet::new();
        for set in [
            memplace_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        known.insert(format!(
                            "{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        known.insert("grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into());
        known.insert("grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".into());
        known
    });
    let name = path.trim_start_matches('/');
    if known.contains(name) {
        name.to_string()
    } else {
        "unknown".to_string()
    }
}

/// The canonical name of a gRPC status code (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The grpc-status in a header map, if there is one.
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let v = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(v))
}

/// One request being measured: recorded exactly once, when its status is known, or as
/// CANCELLED if the response is dropped first (the client went away mid-stream).
struct CallTimer {
    metrics: Arc<Metrics>,
    method: String,
    start: Instant,
    done: bool,
}

impl CallTimer {
    fn finish(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &self.metrics;
        m.requests
            .get_or_create(&MethodCode {
                method: self.method.clone(),
                code: code_name(code).into(),
            })
            .inc();
        m.latency
            .get_or_create(&MethodLabel {
                method: self.method.clone(),
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// A response body that records its call when the trailers carrying grpc-status go by.
struct MeteredBody {
    inner: tonic::body::Body,
    timer: CallTimer,
}

impl hyper::body::Body for MeteredBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.timer.finish(code);
                }
            }
            Poll::Ready(Some(Err(s))) => this.timer.finish(s.code()),
            // A gRPC response that ends without a status is broken.
            Poll::Ready(None) => this.timer.finish(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The tower layer that counts gRPC requests by method and status code and times them, from
/// the first byte in to the status out (so a stream is timed to its end).
#[derive(Clone, Debug)]
pub struct RequestMetricsLayer {
    metrics: Arc<Metrics>,
}

impl RequestMetricsLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`RequestMetricsLayer`].
#[derive(Clone, Debug)]
pub struct RequestMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S: NamedService> NamedService for RequestMetrics<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for RequestMetrics<S>
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
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut timer = CallTimer {
            metrics: self.metrics.clone(),
            method: method_label(req.uri().path()),
            start: Instant::now(),
            done: false,
        };
        let mut inner = self.inner.clone();
        std::mem::swap(&mut inner, &mut self.inner);
        Box::pin(async move {
            let resp = match inner.call(req).await {
                Ok(r) => r,
                Err(e) => {
                    timer.finish(tonic::Code::Unknown);
                    return Err(e);
                }
            };
            // A refusal or an early error is "trailers-only": the status is in the headers.
            if let Some(code) = grpc_status(resp.headers()) {
                timer.finish(code);
                return Ok(resp);
            }
            let (parts, body) = resp.into_parts();
            if hyper::body::Body::is_end_stream(&body) {
                timer.finish(tonic::Code::Unknown);
            }
            let body = tonic::body::Body::new(MeteredBody { inner: body, timer });
            Ok(http::Response::from_parts(parts, body))
        })
    }
}
