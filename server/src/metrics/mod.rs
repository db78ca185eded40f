//! Prometheus metrics, served as text at /metrics on a loopback listener by default.
//!
//! One [`Metrics`] per agent (no process globals). Requests are counted by
//! [`RequestMetricsLayer`] at the edge of the gRPC server; the engine's counters (drift counts
//! included) are copied in at each scrape; per-node bytes come from the intent (intended) and from
//! the last whole-region placement read of each region (observed), so a scrape never walks guest
//! memory.

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::{HashMap, HashSet};

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

/// Labels of a region's range.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RangeLabels {
    /// The VM.
    pub vm_id: String,
    /// The region.
    pub name: String,
    /// The range's byte offset.
    pub offset: String,
}

/// Every metric of one agent, owned: `app::run` makes one and hands an `Arc` of it to the gRPC
/// layers, the handoff socket, the store's commit observer and the /metrics listener, so two
/// agents in one process count apart.
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
    /// Allocated bytes on the node, summed over each region's last whole-region placement read
    /// (GetPlacement or Populate of the whole region). Reading placement walks every page, so
    /// neither a scrape nor a reconcile pass does it.
    pub bytes_observed: Family<NodeLabel, Gauge>,
    /// Ranges found drifted.
    pub ranges_drifted: Counter,
    /// Ranges re-applied.
    pub ranges_reapplied: Counter,
    /// Drifts found per region and range.
    pub range_drifts: Family<RangeLabels, Counter>,
    /// Reconcile pass duration.
    pub reconcile_seconds: Histogram,
    /// SQLite commit latency.
    pub commit_seconds: Histogram,
    /// Regions lost.
    pub regions_lost: Gauge,
    /// Regions released after their last holder exited.
    pub regions_released: Counter,
    /// Request ids the store keeps in memory (records and tombstones of pruned ones).
    pub request_ids_known: Gauge,
    /// Handoffs by outcome.
    pub handoffs: Family<MethodCode, Counter>,
    /// Requests refused by the auth layer.
    pub denied: Counter,
    /// Requests shed by the concurrency limit.
    pub shed: Counter,
    /// Each region's bytes per node as last read from the kernel over the whole region.
    observed: Mutex<ObservedBytes>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// Bytes per node of each region (by vm_id and name), as last read over the whole region.
type ObservedBytes = HashMap<(String, String), Vec<(u32, u64)>>;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, every counter at zero, with its own registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("memplace");
        let m = Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_buckets),
            regions: Family::default(),
            bytes_intended: Family::default(),
            bytes_observed: Family::default(),
            ranges_drifted: Counter::default(),
            ranges_reapplied: Counter::default(),
            range_drifts: Family::default(),
            reconcile_seconds: latency_buckets(),
            commit_seconds: latency_buckets(),
            regions_lost: Gauge::default(),
            regions_released: Counter::default(),
            request_ids_known: Gauge::default(),
            handoffs: Family::default(),
            denied: Counter::default(),
            shed: Counter::default(),
            observed: Mutex::default(),
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
            "Allocated bytes on the node as of each region's last whole-region GetPlacement or Populate",
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
            "range_drifts",
            "Drifts found by reconcile, by region (vm_id, name) and range (offset)",
            m.range_drifts.clone(),
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
            "request_ids_known",
            "Request ids the agent remembers, in memory and in SQLite: kept records plus tombstones of pruned ones (bounded by request_record_max_count + request_tombstone_max_count)",
            m.request_ids_known.clone(),
        );
        registry.register(
            "regions_lost",
            "Regions whose file did not survive",
            m.regions_lost.clone(),
        );
        registry.register(
            "regions_released",
            "Regions whose memory was given back when the last process holding the file exited",
            m.regions_released.clone(),
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
    }

    /// Counts a refused request.
    pub fn count_denied(&self) {
        self.denied.inc();
    }

    /// Counts a request shed by the concurrency limit.
    pub fn count_shed(&self) {
        self.shed.inc();
    }

    /// Counts a handoff request of `kind` answered with `code`.
    pub fn count_handoff(&self, kind: &str, code: &str) {
        self.handoffs
            .get_or_create(&MethodCode {
                method: kind.into(),
                code: code.into(),
            })
            .inc();
    }

    /// Records a commit latency.
    pub fn observe_commit(&self, d: std::time::Duration, _jobs: usize) {
        self.commit_seconds.observe(d.as_secs_f64());
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Records where a whole region's pages are (`(node, pages)` of `page_size` bytes), as a
    /// GetPlacement or Populate over the whole region just read them from the kernel.
    pub fn observe_placement(
        &self,
        vm_id: &str,
        name: &str,
        page_size: u64,
        nodes: impl IntoIterator<Item = (u32, u64)>,
    ) {
        let bytes = nodes
            .into_iter()
            .map(|(n, pages)| (n, pages.saturating_mul(page_size)))
            .collect();
        self.observed
            .lock()
            .insert((vm_id.to_string(), name.to_string()), bytes);
    }

    /// Recomputes region gauges and per-node bytes from the engine's intent, and copies the
    /// engine's counters in.
    pub async fn refresh_regions(&self, agent: &crate::engine::Agent) {
        self.request_ids_known
            .set(agent.store().known_request_count() as i64);
        let Ok(regions) = agent.list_intents().await else {
            return;
        };
        let m = self;
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
        m.bytes_observed.clear();
        {
            let mut o = self.observed.lock();
            // Forget regions that are gone, so a deleted region stops counting.
            let live: HashSet<(&str, &str)> = regions
                .iter()
                .map(|r| (r.key.vm_id.as_str(), r.key.name.as_str()))
                .collect();
            o.retain(|(vm, name), _| live.contains(&(vm.as_str(), name.as_str())));
            let mut per_node: HashMap<u32, u64> = HashMap::new();
            for (node, bytes) in o.values().flatten() {
                *per_node.entry(*node).or_default() += bytes;
            }
            for (node, bytes) in per_node {
                m.bytes_observed
                    .get_or_create(&NodeLabel {
                        node: node.to_string(),
                    })
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
        m.regions_lost.set(
            regions
                .iter()
                .filter(|r| r.status == crate::domain::RegionStatus::Lost)
                .count() as i64,
        );
        self.sync_counters(&agent.counters);
    }

    /// Brings the drift counters up to the engine's, which count every pass (periodic or
    /// requested). The engine counts; these counters only follow, so each `Metrics` catches up
    /// on its own.
    fn sync_counters(&self, counters: &crate::engine::AgentCounters) {
        use std::sync::atomic::Ordering::Relaxed;
        let follow = |c: &Counter, total: u64| {
            c.inc_by(total.saturating_sub(c.get()));
        };
        follow(&self.ranges_drifted, counters.drifted.load(Relaxed));
        follow(&self.ranges_reapplied, counters.reapplied.load(Relaxed));
        follow(
            &self.regions_released,
            counters.regions_released.load(Relaxed),
        );
        for ((key, offset), n) in counters.range_drifts() {
            let c = self.range_drifts.get_or_create(&RangeLabels {
                vm_id: key.vm_id,
                name: key.name,
                offset: offset.to_string(),
            });
            follow(&c, n);
        }
    }

    /// Records a reconcile pass, periodic or requested. The region gauges and drift counters are
    /// refreshed when scraped (copying every region's intent after each pass cost as much as the
    /// pass itself).
    pub fn observe_reconcile(&self, took: std::time::Duration) {
        self.reconcile_seconds.observe(took.as_secs_f64());
    }
}

mod layer;
pub use layer::{RequestMetrics, RequestMetricsLayer, code_name};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RegionKey;
    use crate::engine::AgentCounters;
    use std::sync::atomic::Ordering::Relaxed;

    /// The value of the sample `name` in a text exposition (0 when absent).
    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn two_metrics_count_apart() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.count_denied();
        a.count_denied();
        b.count_shed();
        a.count_handoff("acquire", "OK");
        a.observe_commit(std::time::Duration::from_millis(1), 1);
        let (ta, tb) = (a.render(), b.render());
        assert_eq!(sample(&ta, "memplace_requests_denied_total"), 2.0, "{ta}");
        assert_eq!(sample(&tb, "memplace_requests_denied_total"), 0.0, "{tb}");
        assert_eq!(sample(&ta, "memplace_requests_shed_total"), 0.0, "{ta}");
        assert_eq!(sample(&tb, "memplace_requests_shed_total"), 1.0, "{tb}");
        let handoff = r#"memplace_handoffs_total{method="acquire",code="OK"}"#;
        assert_eq!(sample(&ta, handoff), 1.0, "{ta}");
        assert!(!tb.contains(handoff), "{tb}");
        assert_eq!(
            sample(&ta, "memplace_sqlite_commit_duration_seconds_count"),
            1.0
        );
        assert_eq!(
            sample(&tb, "memplace_sqlite_commit_duration_seconds_count"),
            0.0
        );
    }

    /// Each `Metrics` follows the engine's counters on its own: a second one catches up to the
    /// same totals instead of seeing what the first already copied as nothing new.
    #[test]
    fn each_metrics_follows_the_engine_counters() {
        let counters = AgentCounters::default();
        counters.drifted.store(3, Relaxed);
        counters.reapplied.store(5, Relaxed);
        let key = RegionKey::parse("vm", "r").unwrap();
        counters.count_range_drifts(&key, &[4096, 4096, 0]);
        let (a, b) = (Metrics::new(), Metrics::new());
        a.sync_counters(&counters);
        a.sync_counters(&counters);
        let drift = r#"memplace_range_drifts_total{vm_id="vm",name="r",offset="4096"}"#;
        let ta = a.render();
        assert_eq!(sample(&ta, "memplace_ranges_drifted_total"), 3.0, "{ta}");
        assert_eq!(sample(&ta, "memplace_ranges_reapplied_total"), 5.0, "{ta}");
        assert_eq!(sample(&ta, drift), 2.0, "{ta}");
        let tb = b.render();
        assert_eq!(sample(&tb, "memplace_ranges_drifted_total"), 0.0, "{tb}");
        b.sync_counters(&counters);
        let tb = b.render();
        assert_eq!(sample(&tb, "memplace_ranges_drifted_total"), 3.0, "{tb}");
        assert_eq!(sample(&tb, drift), 2.0, "{tb}");
        counters.drifted.store(4, Relaxed);
        b.sync_counters(&counters);
        assert_eq!(sample(&b.render(), "memplace_ranges_drifted_total"), 4.0);
        assert_eq!(sample(&a.render(), "memplace_ranges_drifted_total"), 3.0);
    }
}
