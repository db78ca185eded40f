//! What every row shares: the environment's knobs, the samples of one side of a row (`Series`),
//! a row of the table (`Row`), /proc readings of the agent, and the printed and JSON table.

use memplace_client::pb;
use memplace_server::domain::{NodeSet, Policy, PolicyMode};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub(crate) const GIB: u64 = 1 << 30;
pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const RANGES: u64 = 16;

pub(crate) fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub(crate) fn samples() -> usize {
    env_u64("MEMPLACE_BENCH_SAMPLES", 5).max(1) as usize
}

pub(crate) fn selected(row: &str) -> bool {
    match std::env::var("MEMPLACE_BENCH_ONLY") {
        Ok(v) if !v.is_empty() => v.split(',').any(|r| r.trim().eq_ignore_ascii_case(row)),
        _ => true,
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn policy(mode: PolicyMode) -> Policy {
    let nodes = if mode.takes_nodes() {
        NodeSet::from_ids([0]).expect("node 0")
    } else {
        NodeSet::new()
    };
    Policy::new(mode, nodes)
}

pub(crate) fn pb_policy(mode: pb::PolicyMode) -> pb::Policy {
    pb::Policy {
        mode: mode as i32,
        nodes: vec![0],
        static_nodes: false,
        relative_nodes: false,
    }
}

/// A number with a precision that suits its size.
pub(crate) fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The samples of one side of a row, in the order taken.
#[derive(Clone, Debug)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) unit: &'static str,
    pub(crate) samples: Vec<f64>,
    /// Threads (P1).
    pub(crate) threads: Option<usize>,
    /// Bytes per sample (P1), so that throughput can be derived.
    pub(crate) bytes: Option<u64>,
    /// Regions the agent held when the samples were taken (S1).
    pub(crate) regions: Option<u64>,
}

impl Series {
    pub(crate) fn new(name: impl Into<String>, unit: &'static str) -> Self {
        Self {
            name: name.into(),
            unit,
            samples: Vec::new(),
            threads: None,
            bytes: None,
            regions: None,
        }
    }
    pub(crate) fn sorted(&self) -> Vec<f64> {
        let mut v = self.samples.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    pub(crate) fn median(&self) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    pub(crate) fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    pub(crate) fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
    /// `median unit (min-max, n)`.
    pub(crate) fn show(&self) -> String {
        format!(
            "{} {} ({}-{}, n={})",
            num(self.median()),
            self.unit,
            num(self.min()),
            num(self.max()),
            self.samples.len()
        )
    }
    pub(crate) fn push_ms(&mut self, d: Duration) {
        self.samples.push(ms(d));
    }
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "unit": self.unit,
            "samples": self.samples,
            "median": self.median(),
            "min": self.min(),
            "max": self.max(),
            "threads": self.threads,
            "bytes": self.bytes,
            "regions": self.regions,
        })
    }
}

/// One row of the table.
pub(crate) struct Row {
    pub(crate) id: &'static str,
    pub(crate) what: String,
    pub(crate) measured: String,
    pub(crate) against: String,
    pub(crate) ratio: String,
    pub(crate) goal: &'static str,
    pub(crate) met: bool,
    pub(crate) notes: Vec<String>,
    pub(crate) series: Vec<Series>,
}

pub(crate) fn gib(b: u64) -> String {
    if b >= GIB {
        format!("{} GiB", b / GIB)
    } else {
        format!("{} MiB", b / MIB)
    }
}

/// Runs a blocking closure off the runtime's workers.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("bench thread")
}

pub(crate) fn proc_rss(pid: i32) -> u64 {
    proc_status(pid, "VmRSS:")
}

/// A size field of /proc/PID/status, in bytes.
pub(crate) fn proc_status(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// utime + stime of a process, in clock ticks.
pub(crate) fn proc_cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0;
    };
    // Fields after the command name start at field 3; utime is 14, stime 15.
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

pub(crate) fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// The goal of a row that has none (P7: issue 25 sets none); its "met" column reads "-".
pub(crate) const NO_GOAL: &str = "-";

fn met_text(r: &Row) -> &'static str {
    match (r.goal == NO_GOAL, r.met) {
        (true, _) => "-",
        (false, true) => "yes",
        (false, false) => "**no**",
    }
}

pub(crate) fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| row | what | measured (median, min-max, samples) | floor / peer | ratio of medians | goal | met |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.id,
            r.what,
            r.measured,
            r.against,
            r.ratio,
            r.goal,
            met_text(r)
        );
    }
    println!();
    for r in rows {
        for n in &r.notes {
            println!("- {}: {n}", r.id);
        }
    }
}

/// Writes every row and sample to `target/bench-table.json`, next to the printed table.
pub(crate) fn write_json(header: &[String], rows: &[Row]) {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "id": r.id,
                "what": r.what,
                "measured": r.measured,
                "against": r.against,
                "ratio": r.ratio,
                "goal": r.goal,
                "met": (r.goal != NO_GOAL).then_some(r.met),
                "notes": r.notes,
                "series": r.series.iter().map(Series::json).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "header": header,
        "date_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "rows": rows,
    });
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().map_or_else(
        || PathBuf::from("bench-table.json"),
        |p| p.join("bench-table.json"),
    );
    match std::fs::write(
        &path,
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    ) {
        Ok(()) => println!("\nJSON: {}", path.display()),
        Err(e) => println!("\nJSON not written to {}: {e}", path.display()),
    }
}

/// Clients of P2 and P3, each with a region of its own.
pub(crate) const CLIENTS: usize = 32;
