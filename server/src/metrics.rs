//! Prometheus metrics, served as text at /metrics on a loopback listener by default.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::OnceLock;

/// Labels of request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodCode {
    /// gRPC method.
    pub method: String,
    /// gRPC status code name.
    pub code: String,
}

/// Labels of per-method histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// gRPC method.
    pub method: String,
}

/// Labels of region counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    /// Backend.
    pub backend: String,
    /// Strategy.
    pub strategy: String,
    /// Status.
    pub status: String,
}

/// Labels of per-node byte gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    /// Node id.
    pub node: String,
}

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    /// Requests by method and code.
    pub requests: Family<MethodCode, Counter>,
    /// Latency by method.
    pub latency: Family<MethodLabel, Histogram>,
    /// Regions by backend, strategy and status.
    pub regions: Family<RegionLabels, Gauge>,
    /// Bytes whose intended policy names the node (hard node sets only).
    pub bytes_intended: Family<NodeLabel, Gauge>,
    /// Bytes observed on the node at the last reconcile.
    pub bytes_observed: Family<NodeLabel, Gauge>,
    /// Ranges found drifted.
    pub ranges_drifted: Counter,
    /// Ranges re-applied.
    pub ranges_reapplied: Counter,
    /// Reconcile pass duration.
    pub reconcile_seconds: Histogram,
    /// SQLite commit latency.
    pub commit_seconds: Histogram,
    /// Regions lost.
    pub regions_lost: Gauge,
    /// Handoffs by outcome.
    pub handoffs: Family<MethodCode, Counter>,
    /// Requests refused by the auth layer.
    pub denied: Counter,
    /// Requests shed by the concurrency limit.
    pub shed: Counter,
}

fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut registry = Registry::with_prefix("memplace");
        let m = Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_buckets),
            regions: Family::default(),
            bytes_intended: Family::default(),
            bytes_observed: Family::default(),
            ranges_drifted: Counter::default(),
            ranges_reapplied: Counter::default(),
            reconcile_seconds: latency_buckets(),
            commit_seconds: latency_buckets(),
            regions_lost: Gauge::default(),
            handoffs: Family::default(),
            denied: Counter::default(),
            shed: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "gRPC requests by method and code",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "gRPC request latency",
            m.latency.clone(),
        );
        registry.register(
            "regions",
            "Regions by backend, strategy and status",
            m.regions.clone(),
        );
        registry.register(
            "bytes_intended",
            "Bytes whose intended policy binds them to the node",
            m.bytes_intended.clone(),
        );
        registry.register(
            "bytes_observed",
            "Allocated bytes seen on the node at the last reconcile",
            m.bytes_observed.clone(),
        );
        registry.register(
            "ranges_drifted",
            "Ranges found drifted from intent",
            m.ranges_drifted.clone(),
        );
        registry.register(
            "ranges_reapplied",
            "Ranges whose policy was applied again",
            m.ranges_reapplied.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconcile passes",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "sqlite_commit_duration_seconds",
            "Latency of durable SQLite commits",
            m.commit_seconds.clone(),
        );
        registry.register(
            "regions_lost",
            "Regions whose file did not survive",
            m.regions_lost.clone(),
        );
        registry.register(
            "handoffs",
            "Handoff socket requests by kind and code",
            m.handoffs.clone(),
        );
        registry.register(
            "requests_denied",
            "Requests refused for lack of a role",
            m.denied.clone(),
        );
        registry.register(
            "requests_shed",
            "Requests refused by the concurrency limit",
            m.shed.clone(),
        );
        Metrics { registry, ..m }
    })
}

/// Counts a refused request.
pub fn count_denied() {
    metrics().denied.inc();
}

/// Records a commit latency.
pub fn observe_commit(d: std::time::Duration, _jobs: usize) {
    metrics().commit_seconds.observe(d.as_secs_f64());
}

/// The text exposition.
pub fn render() -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &metrics().registry);
    out
}

/// Recomputes region gauges and intended bytes per node from the engine's intent.
pub async fn refresh_regions(agent: &crate::reconcile::Agent) {
    use std::collections::HashMap;
    let Ok(regions) = agent.list_intents().await else {
        return;
    };
    let m = metrics();
    m.regions.clear();
    m.bytes_intended.clear();
    let mut per_node: HashMap<u32, i64> = HashMap::new();
    for r in &regions {
        m.regions
            .get_or_create(&RegionLabels {
                backend: r.backend.as_str().into(),
                strategy: r.strategy.as_str().into(),
                status: r.status.as_str().into(),
            })
            .inc();
        for range in r.ranges.ranges() {
            let n = range.policy.nodes.len() as i64;
            if n == 0 {
                continue;
            }
            for node in range.policy.nodes.iter() {
                *per_node.entry(node).or_default() += range.length as i64 / n;
            }
        }
    }
    for (node, bytes) in per_node {
        m.bytes_intended
            .get_or_create(&NodeLabel {
                node: node.to_string(),
            })
            .set(bytes);
    }
    m.regions_lost.set(
        regions
            .iter()
            .filter(|r| r.status == crate::domain::RegionStatus::Lost)
            .count() as i64,
    );
}

/// Records a reconcile pass and the engine's drift counters.
pub async fn observe_reconcile(agent: &crate::reconcile::Agent, took: std::time::Duration) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static SEEN_DRIFT: AtomicU64 = AtomicU64::new(0);
    static SEEN_REAPPLIED: AtomicU64 = AtomicU64::new(0);
    let m = metrics();
    m.reconcile_seconds.observe(took.as_secs_f64());
    let d = agent.counters.drifted.load(Relaxed);
    m.ranges_drifted
        .inc_by(d.saturating_sub(SEEN_DRIFT.swap(d, Relaxed)));
    let r = agent.counters.reapplied.load(Relaxed);
    m.ranges_reapplied
        .inc_by(r.saturating_sub(SEEN_REAPPLIED.swap(r, Relaxed)));
    refresh_regions(agent).await;
}
