//! The memplace benchmark table: every figure measured in one run beside its floor (the same
//! kernel or SQLite work done directly in a tight loop) or its peer (another program doing the
//! same job), and reported as a ratio. Every row takes at least five samples, interleaved with its
//! floor or peer (A B A B ...), and prints their median and spread (min to max). It starts the
//! real `memplaced` (release build) on a temp socket, talks to it with the real client, prints the
//! table and writes every sample as JSON to `target/bench-table.json`
//! (`server/benches/plot_p1.py` draws the P1 plot from it, `plot_scale.py` the S1 curves). Nothing here asserts speed: a missed
//! goal is printed as missed. See server/BENCHMARKS.md.
//!
//! Run: `cargo bench -p memplace-server --bench table`.
//!
//! One file per row (P2 and P3 share their agent and clients, P4 and P6 theirs, P7-attach and
//! P7-exec theirs): `p1_populate`, `p2_setpolicy`, `p3_getregion`, `p4_restart`, `p5_placement`,
//! `p6_idle`, `p7_attach`, `p7_exec`, `s1_scale`;
//! `report` holds the samples, rows and the printed and JSON table. The agent is started by the
//! integration tests' own harness (`server/tests/common/agent.rs`, included below with `#[path]`),
//! so the bench and the tests run the agent the same way.
//!
//! Environment (for development; the reported run uses the defaults):
//! - `MEMPLACE_BENCH_ONLY=P1,P4`: run only these rows (`P1` runs `P1` on memfd and, where the
//!   host's KVM has guest_memfd, `P1-gmem`; `P5` runs `P5` and `P5-fallback`; `P7` runs
//!   `P7-attach`, `P7-exec` and `P7-exec-qemu`; `P7-attach` and `P7-exec` (with its QEMU row)
//!   can be named alone).
//! - `MEMPLACE_BENCH_SAMPLES`: samples per side (default 5).
//! - `MEMPLACE_BENCH_POPULATE_BYTES`: size for P1, P5 and P7 (default 4 GiB, halved while free memory is short).
//! - `MEMPLACE_BENCH_P1_THREADS`: thread counts P1 sweeps (default `1,2,4`; the row is at 2).
//! - `MEMPLACE_BENCH_REGIONS`: regions for P4 and P6 (default 1000).
//! - `MEMPLACE_BENCH_IDLE_SECS`: length of one P6 window (default 30: one pass at the default interval).
//! - `MEMPLACE_BENCH_SECS`: duration of each P3 sample (default 2).
//! - `MEMPLACE_BENCH_REQUESTS`: SetPolicy requests per P2 client and sample (default 100: 32 clients).
//! - `MEMPLACE_BENCH_SCALE`: region counts S1 measures (default `100,1000,10000`).
#![forbid(unsafe_code)]

#[path = "../../tests/common/mod.rs"]
mod common;
mod judge;
mod p1_populate;
mod p2_setpolicy;
mod p3_getregion;
mod p4_restart;
mod p5_placement;
mod p6_idle;
mod p7_attach;
mod p7_exec;
mod report;
mod s1_scale;

use common::AgentProc;
use memplace_client::pb;
use memplace_server::kernel;
use report::{CLIENTS, GIB, MIB, Row, Series, env_u64, loadavg, meminfo, samples, selected};
use std::path::Path;

/// Starts the agent with its state under the target dir (on the disk the build uses, not /tmp);
/// returns it and the time until its socket accepted.
pub(crate) fn start_agent(args: &[&str]) -> (AgentProc, std::time::Duration) {
    AgentProc::start_in(Path::new(env!("CARGO_TARGET_TMPDIR")), args)
}

fn main() {
    // P7-exec runs this binary as its PROGRAM: the clock is read before anything else.
    let started = std::time::SystemTime::now();
    if std::env::var_os(p7_exec::STAMP).is_some() {
        p7_exec::stamp(started);
    }
    // `cargo bench` passes --bench; anything else (a test run of this target) does nothing.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("table: run with `cargo bench -p memplace-server --bench table`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (header, rows) = rt.block_on(run());
    report::print_table(&rows);
    report::write_json(&header, &rows);
}

async fn run() -> (Vec<String>, Vec<Row>) {
    let mut header = vec!["memplace benchmark table".to_string()];
    header.push(format!(
        "machine: kernel {}, {} cpus, {} GiB RAM ({:.1} GiB available), load average {} at start, memplaced {}",
        kernel::kernel_release(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        meminfo("MemTotal:") / GIB,
        meminfo("MemAvailable:") as f64 / GIB as f64,
        loadavg(),
        env!("CARGO_BIN_EXE_memplaced"),
    ));
    let mut empty_start = Series::new("empty agent start", "ms");
    for _ in 0..samples() {
        let (empty, t) = start_agent(&["--reconcile-interval-secs", "0"]);
        drop(empty);
        empty_start.push_ms(t);
    }
    header.push(format!(
        "empty agent start (exec, database open, probes, bind): {}",
        empty_start.show()
    ));
    header.push(format!("samples per side: {}", samples()));
    for h in &header {
        println!("{h}");
    }
    let mut rows = Vec::new();
    let size = populate_size();
    if selected("P1") {
        let (files, which) = p1_populate::p1_files();
        println!("P1: file types measured: {which}");
        for file in files {
            rows.push(p1_populate::p1(size, file, &which).await);
        }
    }
    if selected("P2") || selected("P3") {
        let (p2, p3) = p2_p3().await;
        rows.extend(p2);
        rows.extend(p3);
    }
    if selected("P5") {
        rows.extend(p5_placement::p5(size).await);
    }
    if selected("P4") || selected("P6") {
        rows.extend(p4_restart::p4_p6(&empty_start).await);
    }
    if selected("S1") {
        rows.push(s1_scale::s1().await);
    }
    rows.extend(p7(size).await);
    header.push(format!("load average at end {}", loadavg()));
    println!("{}", header[header.len() - 1]);
    (header, rows)
}

/// P7-attach and P7-exec on one agent (`P7` selects both).
async fn p7(size: u64) -> Vec<Row> {
    let attach = selected("P7") || selected("P7-attach");
    let exec = selected("P7") || selected("P7-exec");
    if !attach && !exec {
        return Vec::new();
    }
    let (agent, _) = crate::start_agent(&["--reconcile-interval-secs", "0"]);
    let mut rows = Vec::new();
    if attach {
        rows.push(p7_attach::p7_attach(&agent, size).await);
    }
    if exec {
        rows.push(p7_exec::p7_exec(&agent, size).await);
        rows.push(p7_exec::p7_exec_qemu(&agent).await);
    }
    rows
}

/// 4 GiB unless memory is short: each side of P1 and P5 needs the size once, plus headroom. The
/// agent's Populate refuses a size above the node's free memory (page cache counts as used), so
/// `MemFree` must hold it too.
fn populate_size() -> u64 {
    let mut size = env_u64("MEMPLACE_BENCH_POPULATE_BYTES", 4 * GIB);
    while size > 256 * MIB
        && (meminfo("MemAvailable:") < size + 2 * GIB || meminfo("MemFree:") < size + 512 * MIB)
    {
        size /= 2;
    }
    size
}

/// P2 and P3: durable SetPolicy and GetRegion with [`CLIENTS`] clients, on one agent with a
/// region per client.
async fn p2_p3() -> (Option<Row>, Option<Row>) {
    let (agent, _) = crate::start_agent(&["--reconcile-interval-secs", "0"]);
    let mut c = agent.client().await;
    for i in 0..CLIENTS {
        c.create_region(
            &format!("p2vm{i}"),
            "ram",
            2 * MIB,
            pb::Backend::Memfd,
            vec![],
        )
        .await
        .expect("CreateRegion");
    }
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(agent.client().await);
    }
    let p2 = if selected("P2") {
        Some(p2_setpolicy::p2(&agent, &mut clients).await)
    } else {
        None
    };
    let p3 = if selected("P3") {
        Some(p3_getregion::p3(&agent, &clients).await)
    } else {
        None
    };
    (p2, p3)
}
