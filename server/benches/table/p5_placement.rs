//! P5: GetPlacement of a populated memfd against numastat -p on a process mapping it, in two
//! rows: `P5`, a region this process holds and maps (the agent counts from its numa_maps), and
//! `P5-fallback`, a region of the same size no process maps (the agent counts itself).

use crate::common::AgentProc;
use crate::judge::{P5_FALLBACK_GOAL, P5_HELD_GOAL};
use crate::report::*;
use memplace_client::handoff::Handoff;
use memplace_client::{Client, pb};
use memplace_server::kernel::{self, Mapping};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// P5: GetPlacement of a populated memfd against numastat -p on a process mapping it.

/// An agent with a populated memfd region of `size` on node 0 that this process holds and maps
/// (so numastat -p has a process whose page tables hold every page), and a second one, `cold`,
/// populated the same way that no process maps (never handed off): the agent, a client, the
/// mapping and the fd of the held one.
async fn p5_setup(size: u64) -> (AgentProc, Client, Mapping, Arc<OwnedFd>) {
    let (agent, _) = crate::start_agent(&["--reconcile-interval-secs", "0"]);
    let mut c = agent.client().await;
    let created = c
        .create_region("p5", "ram", size, pb::Backend::Memfd, vec![])
        .await
        .expect("CreateRegion");
    c.set_policy("p5", "ram", 0, 0, pb_policy(pb::PolicyMode::Bind), false)
        .await
        .expect("SetPolicy");
    let req = pb::PopulateRequest {
        vm_id: "p5".into(),
        name: "ram".into(),
        offset: 0,
        length: 0,
        threads: 2,
        cgroup: String::new(),
        verify: false,
    };
    c.populate(req.clone(), |_, _| {}).await.expect("Populate");
    c.create_region("p5", "cold", size, pb::Backend::Memfd, vec![])
        .await
        .expect("CreateRegion");
    c.set_policy("p5", "cold", 0, 0, pb_policy(pb::PolicyMode::Bind), false)
        .await
        .expect("SetPolicy");
    c.populate(
        pb::PopulateRequest {
            name: "cold".into(),
            ..req
        },
        |_, _| {},
    )
    .await
    .expect("Populate");
    // This process is the VMM: it acquires the file and maps all of it, so numastat -p has a
    // process whose page tables hold every page.
    let held = Handoff::connect(agent.handoff_socket())
        .and_then(|h| h.acquire("p5", "ram", &created.handoff_token))
        .expect("acquire");
    let map = Mapping::new(held.fd.as_fd(), size).expect("mmap");
    map.populate_write(0, size).expect("touch");
    let held_fd = Arc::new(held.fd);
    (agent, c, map, held_fd)
}

/// `numastat -p` on this process: its time and the "Total" column (MB).
fn numastat() -> (Duration, String) {
    let me = std::process::id().to_string();
    let t = Instant::now();
    let out = Command::new("numastat")
        .args(["-p", &me])
        .output()
        .expect("numastat (apt-get install numactl)");
    let took = t.elapsed();
    assert!(out.status.success(), "numastat failed");
    let mb = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("Total"))
        .unwrap_or_default()
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string();
    (took, mb)
}

/// The agent's methods called directly in the bench on the held region's fd, each timed: the
/// holder path (this process's numa_maps joined with its maps), the fallback
/// (`residency::count_nodes`), and the previous method (read-fault everything into a fresh
/// mapping, then move_pages). Returns their times and what each got wrong.
async fn p5_direct(fd: Arc<OwnedFd>, size: u64, pid: i32) -> ([Duration; 3], Vec<String>) {
    let page = kernel::page_size();
    let mut wrong = Vec::new();
    let f = fd.clone();
    let (d_held, counts) = blocking(move || {
        let t = Instant::now();
        let file_id = kernel::fd_file_id(f.as_fd()).expect("fstat");
        let holder =
            kernel::residency::holder_mappings(pid, file_id, &[(0, size)]).expect("holder maps");
        let counts =
            kernel::residency::count_nodes_held(f.as_fd(), size, 0, size, page, Some(&holder))
                .expect("count_nodes_held");
        (t.elapsed(), counts)
    })
    .await;
    if counts.nodes.get(&0).copied() != Some(size / page) || counts.counted_from != Some(pid) {
        wrong.push(format!("count_nodes_held: {counts:?}"));
    }
    let f = fd.clone();
    let (d_direct, counts) = blocking(move || {
        let t = Instant::now();
        let counts =
            kernel::residency::count_nodes(f.as_fd(), size, 0, size, page).expect("count_nodes");
        (t.elapsed(), counts)
    })
    .await;
    if counts.nodes.get(&0).copied() != Some(size / page) {
        wrong.push(format!("count_nodes: {counts:?}"));
    }
    let d_old = blocking(move || {
        let t = Instant::now();
        let fresh = Mapping::new(fd.as_fd(), size).expect("mmap");
        fresh.populate_read(0, size).expect("MADV_POPULATE_READ");
        let nodes = fresh.page_nodes(0, size, page).expect("move_pages");
        let took = t.elapsed();
        assert!(nodes.iter().all(|&n| n == 0), "a page is not on node 0");
        took
    })
    .await;
    ([d_held, d_direct, d_old], wrong)
}

/// The two P5 rows: `P5` (held) and `P5-fallback` (no holder).
pub(crate) async fn p5(size: u64) -> Vec<Row> {
    let n = samples();
    println!(
        "P5: GetPlacement of a populated {} memfd (held, and one no process maps), {n} samples interleaved with numastat -p",
        gib(size)
    );
    let (agent, mut c, map, held_fd) = p5_setup(size).await;
    let page = kernel::page_size();
    let pid = std::process::id() as i32;
    let mut gp = Series::new("agent GetPlacement", "ms");
    let mut gp_cold = Series::new("agent GetPlacement, no holder", "ms");
    let mut ns = Series::new("numastat -p", "ms");
    let mut held = Series::new("holder's numa_maps in the bench", "ms");
    let mut direct = Series::new("residency::count_nodes in the bench", "ms");
    let mut old = Series::new("fault-in and move_pages in the bench", "ms");
    let mut wrong = Vec::new();
    let mut numastat_mb = String::new();
    let mut first_cold = Series::new(
        "agent GetPlacement, no holder, first count (census empty)",
        "ms",
    );
    for round in 0..=n {
        let t = Instant::now();
        let p = c.placement("p5", "ram", 0, 0).await.expect("GetPlacement");
        let d = t.elapsed();
        let (all, on0) = crate::p1_populate::on0(&p.nodes);
        if on0 != size / page || all != on0 {
            wrong.push(format!("GetPlacement found {on0} of {all} pages on node 0"));
        }
        let pids: Vec<i32> = p.ranges.iter().map(|r| r.counted_from_pid).collect();
        wrong.extend(crate::judge::p5_ranges_problem(&pids, pid));
        let (d_ns, mb) = numastat();
        numastat_mb = mb;
        let t = Instant::now();
        let p = c.placement("p5", "cold", 0, 0).await.expect("GetPlacement");
        let d_cold = t.elapsed();
        let (all, on0) = crate::p1_populate::on0(&p.nodes);
        let pids: Vec<i32> = p.ranges.iter().map(|r| r.counted_from_pid).collect();
        wrong.extend(crate::judge::p5_fallback_problem(
            on0,
            all,
            size / page,
            &pids,
        ));
        let ([d_held, d_direct, d_old], w) = p5_direct(held_fd.clone(), size, pid).await;
        wrong.extend(w);
        if round == 0 {
            first_cold.push_ms(d_cold);
        }
        if round > 0 {
            gp.push_ms(d);
            gp_cold.push_ms(d_cold);
            ns.push_ms(d_ns);
            held.push_ms(d_held);
            direct.push_ms(d_direct);
            old.push_ms(d_old);
        }
    }
    drop(map);
    drop(held_fd);
    c.delete_region("p5", "ram").await.expect("DeleteRegion");
    c.delete_region("p5", "cold").await.expect("DeleteRegion");
    drop(agent);
    let fallback = p5_fallback_row(size, [gp_cold, first_cold], &ns, wrong.is_empty());
    let held_row = p5_row(size, [gp, ns, held, direct, old], wrong, numastat_mb);
    vec![held_row, fallback]
}

/// P5-fallback: GetPlacement of the region no process maps, against the same numastat -p samples
/// (of the held region, same size). `correct` is whether every answer of both rows was.
fn p5_fallback_row(size: u64, [gp_cold, first]: [Series; 2], ns: &Series, correct: bool) -> Row {
    let ratio = ns.median() / gp_cold.median();
    Row {
        id: "P5-fallback",
        what: format!(
            "GetPlacement, {} populated memfd no process maps (the agent counts)",
            gib(size)
        ),
        measured: gp_cold.show(),
        against: format!("numastat -p {} (of the held region, same size)", ns.show()),
        ratio: format!("{ratio:.2}x"),
        goal: ">= 0.5x",
        met: correct && crate::judge::p5_met(ns.median(), gp_cold.median(), P5_FALLBACK_GOAL),
        notes: vec![format!(
            "counts after the first ask move_pages about the pages the agent's mapping kept from the first (the census, placement_map_max_bytes); the first count of the region, which read-faulted every page into it, took {} ({:.2}x numastat's median)",
            first.show(),
            ns.median() / first.median()
        )],
        series: vec![gp_cold, first],
    }
}

fn p5_row(size: u64, series: [Series; 5], wrong: Vec<String>, numastat_mb: String) -> Row {
    let page = kernel::page_size();
    let [gp, ns, held, direct, old] = series;
    let ratio = ns.median() / gp.median();
    let correct = wrong.is_empty();
    Row {
        id: "P5",
        what: format!(
            "GetPlacement, {} populated memfd a VMM maps (counted from its numa_maps)",
            gib(size)
        ),
        measured: gp.show(),
        against: format!("numastat -p {}", ns.show()),
        ratio: format!("{ratio:.2}x"),
        goal: ">= 1x",
        met: correct && crate::judge::p5_met(ns.median(), gp.median(), P5_HELD_GOAL),
        notes: vec![
            format!(
                "GetPlacement counted every one of {} pages on node 0, from this process's page tables for the held region and by itself for the other ({}); numastat total {numastat_mb} MB for the bench process (which maps the held region)",
                size / page,
                if correct {
                    "verified".to_string()
                } else {
                    format!("WRONG: {}", wrong.join("; "))
                }
            ),
            format!(
                "GetPlacement counted from the holder's page tables (this process maps every page): its method called directly in the bench (maps, numa_maps up to the mapping's line, maps again; no page cache walk, every page being mapped): {}",
                held.show()
            ),
            format!(
                "a count through a transient window, called directly in the bench (cachestat, read-fault the allocated runs into a window, move_pages; what a count costs when nothing is kept): {}",
                direct.show()
            ),
            format!(
                "the previous method (read-fault the whole file into a fresh mapping, then move_pages for every page), called directly in the bench: {}",
                old.show()
            ),
        ],
        series: vec![gp, ns, held, direct, old],
    }
}
