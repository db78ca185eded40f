//! The bench table's judgements that a test can check without running the bench: included by
//! `benches/table/main.rs` and by `tests/bench_judgements.rs` (`#[path]`), so the test runs the very
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

/// S1's figures at its largest region count, as judged against issue 25's goals at 10,000.
#[derive(Clone, Debug)]
pub struct ScaleFigures {
    /// Restart time (median), held and unheld, in ms.
    pub held_ms: f64,
    pub unheld_ms: f64,
    /// Each over its raw loop (median over median).
    pub held_ratio: f64,
    pub unheld_ratio: f64,
    /// The agent's RSS, MiB (the largest reading).
    pub rss_mib: f64,
    /// One reconcile pass's CPU time (median), ms, and the reconcile interval it is spread over, s.
    pub pass_cpu_ms: f64,
    pub interval_secs: u64,
    /// ListRegions latency (median), ms.
    pub list_ms: f64,
}

/// S1's goals: restart <= 1 s and <= 3x the raw loop, held and unheld; RSS <= 128 MiB; one pass
/// <= 1 % of one core at the interval; ListRegions <= 50 ms. Each goal's name, the figure as
/// shown, and whether it is met.
pub fn s1_goals(f: &ScaleFigures) -> Vec<(&'static str, String, bool)> {
    let share = f.pass_cpu_ms / (f.interval_secs.max(1) as f64 * 1e3) * 100.0;
    vec![
        (
            "restart <= 1 s",
            format!("held {:.0} ms, unheld {:.0} ms", f.held_ms, f.unheld_ms),
            f.held_ms <= 1000.0 && f.unheld_ms <= 1000.0,
        ),
        (
            "restart <= 3x raw loop",
            format!("held {:.1}x, unheld {:.1}x", f.held_ratio, f.unheld_ratio),
            f.held_ratio <= 3.0 && f.unheld_ratio <= 3.0,
        ),
        (
            "RSS <= 128 MiB",
            format!("{:.1} MiB", f.rss_mib),
            f.rss_mib <= 128.0,
        ),
        (
            "pass <= 1 % of a core",
            format!(
                "{:.1} ms per {} s = {share:.3} %",
                f.pass_cpu_ms, f.interval_secs
            ),
            share <= 1.0,
        ),
        (
            "ListRegions <= 50 ms",
            format!("{:.1} ms", f.list_ms),
            f.list_ms <= 50.0,
        ),
    ]
}
