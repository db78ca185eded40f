//! Bounded history under churn (issue 24): the real agent on a real SQLite file takes 200,000
//! SetPolicy calls with unique request ids and 10,000 create/delete cycles, with request records
//! kept by count (sets/40 records, sets/10 tombstones, so pruning is in steady state after the
//! warm-up quarter). The database file (with its WAL), the agent's RSS and its open fds read
//! after the warm-up and at the end must agree within the stated tolerances, and the three
//! tiers of a retry hold: a recent id replays its answer, a pruned one is refused with
//! FAILED_PRECONDITION and changes nothing, one past its tombstone runs as a new request.
//!
//! `MEMPLACE_CHURN_SETS` and `MEMPLACE_CHURN_CYCLES` scale the counts for a quick local run
//! (at least 20,000 sets); CI runs the full counts. The figures go to stderr (BENCHMARKS.md).

mod common;

use common::metrics::scrape;
use common::net::{free_port, wait_tcp};
use common::procfs::fd_count;
use common::sqlite;
use common::{AgentProc, MIB, policy};
use memplace_client::{Client, pb};
use std::time::Instant;
use tonic::Code;

/// Concurrent SetPolicy clients, one region each (group commit batches them).
const SETTERS: usize = 16;
/// Concurrent create/delete clients.
const CYCLERS: usize = 4;
/// Database file + WAL may grow this much from the warm-up reading to the end.
const DB_SLACK: f64 = 0.10;
const DB_SLACK_BYTES: u64 = 512 << 10;
/// RSS may grow this much (allocator noise, tokio's and SQLite's caches settling).
const RSS_SLACK: f64 = 0.15;
const RSS_SLACK_BYTES: u64 = 8 << 20;
/// Open fds may differ by this many (a tonic connection being re-established).
const FD_SLACK: usize = 2;

fn count(var: &str, full: u64) -> u64 {
    match std::env::var(var) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{var}={v:?} is not a count")),
        Err(_) => full,
    }
}

#[derive(Debug, Clone, Copy)]
struct Reading {
    db_bytes: u64,
    rss_bytes: u64,
    fds: usize,
    records: u64,
    tombstones: u64,
    /// The agent's own count of the request ids it remembers (memplace_request_ids_known).
    known_ids: u64,
}

fn reading(agent: &AgentProc, metrics_port: u16) -> Reading {
    let db = agent.state_dir().join("memplace.db");
    let size = |p: std::path::PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .expect("reading the agent's /proc status");
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    let n = |sql: &str| -> u64 {
        sqlite::query(&db, &[], sql)
            .trim()
            .parse()
            .expect("a row count")
    };
    Reading {
        db_bytes: size(db.clone()) + size(agent.state_dir().join("memplace.db-wal")),
        rss_bytes: rss_kib * 1024,
        fds: fd_count(agent.pid()),
        records: n("SELECT count(*) FROM requests"),
        tombstones: n("SELECT count(*) FROM pruned_requests"),
        known_ids: scrape(metrics_port)
            .lines()
            .find_map(|l| l.strip_prefix("memplace_request_ids_known "))
            .and_then(|v| v.trim().parse().ok())
            .expect("memplace_request_ids_known in /metrics"),
    }
}

fn set_request(region: usize, id: String) -> pb::SetPolicyRequest {
    pb::SetPolicyRequest {
        vm_id: "churn".into(),
        name: format!("r{region}"),
        policy: Some(policy(pb::PolicyMode::Bind, &[0])),
        request_id: id,
        ..Default::default()
    }
}

fn set_id(region: usize, i: u64) -> String {
    format!("set-{region}-{i}")
}

/// SetPolicy calls `from..to` of every setter, each with a unique request id.
async fn sets(c: &Client, from: u64, to: u64) {
    let mut tasks = Vec::new();
    for region in 0..SETTERS {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in from..to {
                c.set_policy_with(set_request(region, set_id(region, i)))
                    .await
                    .unwrap_or_else(|e| panic!("SetPolicy {}: {e}", set_id(region, i)));
            }
        }));
    }
    for t in tasks {
        t.await.expect("setter task");
    }
}

/// Create/delete cycles `from..to` of every cycler, with request ids.
async fn cycles(c: &Client, from: u64, to: u64) {
    let mut tasks = Vec::new();
    for k in 0..CYCLERS {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in from..to {
                let name = format!("c{k}");
                c.create_region_with(pb::CreateRegionRequest {
                    vm_id: "cycle".into(),
                    name: name.clone(),
                    size_bytes: 2 * MIB,
                    backend: pb::Backend::Memfd as i32,
                    request_id: format!("create-{k}-{i}"),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("create {k}/{i}: {e}"));
                c.delete_region_with(pb::DeleteRegionRequest {
                    vm_id: "cycle".into(),
                    name,
                    request_id: format!("delete-{k}-{i}"),
                })
                .await
                .unwrap_or_else(|e| panic!("delete {k}/{i}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("cycler task");
    }
}

fn grown_within(what: &str, warm: u64, end: u64, frac: f64, bytes: u64) {
    let limit = (warm as f64 * (1.0 + frac)) as u64 + bytes;
    assert!(
        end <= limit,
        "{what} grew from {warm} after the warm-up to {end} at the end (limit {limit}: +{:.0} % + {bytes})",
        frac * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_stays_bounded_under_churn() {
    let n_sets = count("MEMPLACE_CHURN_SETS", 200_000);
    let n_cycles = count("MEMPLACE_CHURN_CYCLES", 10_000);
    assert!(
        n_sets >= 20_000 && n_cycles >= 100,
        "MEMPLACE_CHURN_SETS must be at least 20000 and MEMPLACE_CHURN_CYCLES at least 100"
    );
    let (max_records, max_tombstones) = (n_sets / 40, n_sets / 10);
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let agent = AgentProc::start_with(&[
        "--metrics-addr",
        &metrics_addr,
        "--request-record-max-count",
        &max_records.to_string(),
        "--request-tombstone-max-count",
        &max_tombstones.to_string(),
    ]);
    wait_tcp(metrics_port);
    let mut c = agent.client().await;
    for region in 0..SETTERS {
        c.create_region(
            "churn",
            &format!("r{region}"),
            2 * MIB,
            pb::Backend::Memfd,
            vec![],
        )
        .await
        .expect("creating a churn region");
    }
    let per_setter = n_sets / SETTERS as u64;
    let per_cycler = n_cycles / CYCLERS as u64;
    let start = Instant::now();

    // Warm-up: a quarter of each, enough to fill records and tombstones to their limits.
    sets(&c, 0, per_setter / 4).await;
    cycles(&c, 0, per_cycler / 4).await;
    let warm = reading(&agent, metrics_port);
    let warm_at = start.elapsed();
    eprintln!("churn: after warm-up ({warm_at:?}): {warm:?}");
    // The rest: cycles, then sets, so the newest records and tombstones are all SetPolicy ids.
    cycles(&c, per_cycler / 4, per_cycler).await;
    sets(&c, per_setter / 4, per_setter).await;
    let end = reading(&agent, metrics_port);
    let took = start.elapsed();
    eprintln!(
        "churn: at the end ({took:?}, {} sets, {} cycles): {end:?}",
        per_setter * SETTERS as u64,
        per_cycler * CYCLERS as u64
    );

    // Pruning ran: rows are at their limits (plus what came in since the last pruning pass, at
    // most 64 batches of SETTERS jobs).
    let since_pass = 64 * SETTERS as u64;
    assert!(
        end.records <= max_records + since_pass,
        "{} request records, limit {max_records}",
        end.records
    );
    assert!(
        end.tombstones <= max_tombstones,
        "{} tombstones, limit {max_tombstones}",
        end.tombstones
    );
    // The in-memory set of request ids is bounded the same way.
    assert!(
        end.known_ids <= max_records + since_pass + max_tombstones,
        "the agent remembers {} request ids, limit {}",
        end.known_ids,
        max_records + max_tombstones
    );
    grown_within(
        "database + WAL bytes",
        warm.db_bytes,
        end.db_bytes,
        DB_SLACK,
        DB_SLACK_BYTES,
    );
    grown_within(
        "RSS bytes",
        warm.rss_bytes,
        end.rss_bytes,
        RSS_SLACK,
        RSS_SLACK_BYTES,
    );
    assert!(
        end.fds <= warm.fds + FD_SLACK,
        "open fds went from {} after the warm-up to {} at the end",
        warm.fds,
        end.fds
    );

    // The three tiers of a retry, on setter 0's ids (setters interleave, so setter 0's i-th
    // call is about SETTERS*(per_setter-i) from the newest).
    let gen_before = c.get_region("churn", "r0").await.unwrap().generation;
    let recent = set_request(0, set_id(0, per_setter - 1));
    let again = c
        .set_policy_with(recent)
        .await
        .expect("replaying a kept id");
    assert!(
        again.region.unwrap().generation < gen_before + 1,
        "a kept id's replay answers as the first call did"
    );
    let back = (max_records + max_tombstones * 3 / 4) / SETTERS as u64;
    let pruned_id = set_id(0, per_setter - back);
    let e = c
        .set_policy_with(set_request(0, pruned_id.clone()))
        .await
        .expect_err("a pruned id must be refused, not run again");
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{pruned_id}: {e}");
    assert!(e.to_string().contains("pruned"), "{e}");
    assert_eq!(
        c.get_region("churn", "r0").await.unwrap().generation,
        gen_before,
        "a refused retry changes nothing"
    );
    // The very first id is past its tombstone too: unknown, so it runs as a new request.
    let first = c
        .set_policy_with(set_request(0, set_id(0, 0)))
        .await
        .expect("an id past its tombstone runs as new");
    assert_eq!(first.region.unwrap().generation, gen_before + 1);
}

/// Age pruning on an idle agent: with records kept 1 s, the writer's periodic pass (every 30 s,
/// no traffic needed) prunes a SetPolicy's record; until then a retry replays the first answer,
/// after it the retry is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_age_out_on_an_idle_agent() {
    let agent = AgentProc::start_with(&["--request-record-max-age-secs", "1"]);
    let mut c = agent.client().await;
    c.create_region("churn", "r0", 2 * MIB, pb::Backend::Memfd, vec![])
        .await
        .expect("creating the region");
    let req = set_request(0, "aging-1".into());
    let first = c
        .set_policy_with(req.clone())
        .await
        .expect("the first call");
    let generation = first.region.unwrap().generation;
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    let refused = loop {
        match c.set_policy_with(req.clone()).await {
            Ok(again) => assert_eq!(
                again.region.unwrap().generation,
                generation,
                "a retry before pruning replays the first answer"
            ),
            Err(e) => break e,
        }
        assert!(
            Instant::now() < deadline,
            "the record of aging-1 (kept 1 s) was not pruned within 120 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
    assert!(refused.to_string().contains("pruned"), "{refused}");
    assert_eq!(
        c.get_region("churn", "r0").await.unwrap().generation,
        generation,
        "a refused retry changes nothing"
    );
}
