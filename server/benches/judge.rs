//! The bench table's judgements that a test can check without running the bench: included by
//! `benches/table.rs` and by `tests/bench_judgements.rs` (`#[path]`), so the test runs the very
//! code the bench runs.

use std::time::Duration;

/// The `p` quantile (0 to 1) of `sorted`, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// P2's p99 goal, in milliseconds.
pub const P2_P99_GOAL_MS: f64 = 10.0;
/// P2's throughput goal: this many times the sequential SQLite commit floor.
pub const P2_RATIO_GOAL: f64 = 1.5;

/// The p99 latency over every request of every sample (not a median of per-sample p99s, which a
/// sample full of slow requests cannot move).
pub fn p2_p99_over_all(samples: &[Vec<Duration>]) -> Duration {
    let mut all: Vec<Duration> = samples.iter().flatten().copied().collect();
    assert!(!all.is_empty(), "P2 measured no requests");
    all.sort();
    percentile(&all, 0.99)
}

/// Whether P2 met its goal: throughput at least [`P2_RATIO_GOAL`] times the floor, and the p99
/// over all requests ([`p2_p99_over_all`]) at most [`P2_P99_GOAL_MS`].
pub fn p2_met(ratio: f64, samples: &[Vec<Duration>]) -> bool {
    ratio >= P2_RATIO_GOAL && p2_p99_over_all(samples).as_secs_f64() * 1e3 <= P2_P99_GOAL_MS
}

/// What is wrong with P5's GetPlacement ranges, if anything: there must be at least one range,
/// and every range must be counted from the holder's page tables (`holder`, the bench process).
/// No ranges at all verifies nothing.
pub fn p5_ranges_problem(counted_from_pids: &[i32], holder: i32) -> Option<String> {
    if counted_from_pids.is_empty() {
        return Some("GetPlacement returned no ranges, so none was counted from the holder".into());
    }
    if counted_from_pids.iter().any(|&p| p != holder) {
        return Some(format!(
            "GetPlacement did not count from the holder (this process, {holder}): \
             {counted_from_pids:?}"
        ));
    }
    None
}
