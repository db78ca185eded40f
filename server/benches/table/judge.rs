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

/// P1's goal: the agent at least this many times the best one-file floor.
pub const P1_RATIO_GOAL: f64 = 0.9;

/// P1's floor: the faster of the one-file floors (1 thread, and the agent's thread count), in ms.
/// On memfd a second thread on one file can be slower than one, so the goal is judged against
/// whichever is faster, not only the one at the agent's thread count.
pub fn p1_best_one_file(one_thread_ms: f64, same_threads_ms: f64) -> f64 {
    one_thread_ms.min(same_threads_ms)
}

/// Whether P1 met its goal, given the best one-file floor over the agent (median over median).
pub fn p1_met(ratio_to_best_one_file: f64) -> bool {
    ratio_to_best_one_file >= P1_RATIO_GOAL
}

/// P5's goal with a holder (the agent counts from the numa_maps of a process mapping every page):
/// at least numastat -p's speed.
pub const P5_HELD_GOAL: f64 = 1.0;
/// P5-fallback's goal (no process maps the region; the agent counts itself): half numastat -p.
pub const P5_FALLBACK_GOAL: f64 = 0.5;

/// Whether a P5 row met `goal`: numastat -p's median over the agent's GetPlacement median.
pub fn p5_met(numastat_ms: f64, agent_ms: f64, goal: f64) -> bool {
    numastat_ms / agent_ms >= goal
}

/// What is wrong with P5-fallback's answer, if anything: every one of `pages` pages on node 0
/// (`on0` of `all` counted), at least one range, and no range counted from a process (a pid of
/// 0 is the agent's own count; a region nobody maps has no holder to count from).
pub fn p5_fallback_problem(
    on0: u64,
    all: u64,
    pages: u64,
    counted_from_pids: &[i32],
) -> Option<String> {
    if on0 != pages || all != on0 {
        return Some(format!(
            "GetPlacement without a holder found {on0} of {all} pages on node 0, {pages} expected"
        ));
    }
    if counted_from_pids.is_empty() {
        return Some("GetPlacement without a holder returned no ranges".into());
    }
    if counted_from_pids.iter().any(|&p| p != 0) {
        return Some(format!(
            "GetPlacement without a holder counted from a process: {counted_from_pids:?}"
        ));
    }
    None
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
    /// ListRegions latency (median) of the whole listing: every page, as the client follows
    /// them at its default page size, from the first call to the last answer; ms.
    pub list_ms: f64,
    /// The pages that listing took.
    pub list_pages: usize,
}

/// S1's goals: restart <= 1 s and <= 3x the raw loop, held and unheld; RSS <= 128 MiB; one pass
/// <= 1 % of one core at the interval; ListRegions <= 50 ms for the whole listing, every page.
/// Each goal's name, the figure as shown, and whether it is met.
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
            format!(
                "{:.1} ms for the whole listing ({} pages)",
                f.list_ms, f.list_pages
            ),
            f.list_ms <= 50.0,
        ),
    ]
}

// P7-attach and P7-exec (attach and exec cost) have no goal: issue 25 sets none, and no figure
// here would justify one, so they print their ratios to the floor and judge nothing
// (`report::NO_GOAL`).
