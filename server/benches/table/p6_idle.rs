//! P6: the idle agent's RSS and CPU with P4's regions, at the default reconcile interval and at 1 s.

use crate::common::AgentProc;
use crate::report::*;
use std::time::{Duration, Instant};

/// The idle agent's RSS and CPU over `samples` windows of `window` seconds each.
pub(crate) async fn p6_idle(
    agent: &AgentProc,
    n: u64,
    interval: u64,
    window: u64,
    samples: usize,
    id: &'static str,
) -> Row {
    println!(
        "{id}: idle agent with {n} regions, reconcile every {interval} s, {samples} windows of {window} s"
    );
    let pid = agent.pid() as i32;
    let hz = clock_ticks();
    let mut cpu_pct = Series::new("CPU", "%");
    let mut rss = Series::new("RSS max", "MiB");
    let mut cpu_total = 0.0;
    let mut wall_total = 0.0;
    for _ in 0..samples {
        let cpu0 = proc_cpu_ticks(pid);
        let t = Instant::now();
        let mut rss_max = proc_rss(pid);
        while t.elapsed() < Duration::from_secs(window) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            rss_max = rss_max.max(proc_rss(pid));
        }
        let wall = t.elapsed().as_secs_f64();
        let cpu = (proc_cpu_ticks(pid) - cpu0) as f64 / hz as f64;
        cpu_total += cpu;
        wall_total += wall;
        cpu_pct.samples.push(cpu / wall * 100.0);
        rss.samples.push(rss_max as f64 / MIB as f64);
    }
    let rss_end = proc_rss(pid);
    let mib = |k: &str| proc_status(pid, k) as f64 / MIB as f64;
    let passes = wall_total / interval as f64;
    let per_range_us = cpu_total / passes / (n * RANGES) as f64 * 1e6;
    Row {
        id,
        what: format!("idle agent, {n} regions x {RANGES} ranges, reconcile every {interval} s"),
        measured: format!("RSS max {}, CPU {}", rss.show(), cpu_pct.show()),
        against: "-".into(),
        ratio: "-".into(),
        goal: "RSS <= 32 MiB, CPU <= 0.5 %",
        met: rss.max() <= 32.0 && cpu_pct.median() <= 0.5,
        notes: vec![
            format!(
                "RSS at end {:.1} MiB (anon {:.1}, file {:.1}, shmem {:.1}; VmRSS sampled every 0.5 s), {} threads; CPU {cpu_total:.2} s of utime+stime in {wall_total:.1} s",
                rss_end as f64 / MIB as f64,
                mib("RssAnon:"),
                mib("RssFile:"),
                mib("RssShmem:"),
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .map_or(String::new(), |t| t.trim().to_string()),
            ),
            format!(
                "about {passes:.0} periodic passes: {:.1} ms of CPU per pass, {per_range_us:.2} us per range (CPU / passes / {} ranges)",
                cpu_total / passes * 1e3,
                n * RANGES
            ),
        ],
        series: vec![cpu_pct, rss],
    }
}
