//! P5: GetPlacement of a populated memfd against numastat -p on a process mapping it.

use crate::common::AgentProc;
use crate::report::*;
use memplace_client::handoff::Handoff;
use memplace_client::{Client, pb};
use memplace_server::kernel::{self, Mapping};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// P5: GetPlacement of a populated memfd against numastat -p on a process mapping it.

/// An agent with a populated memfd region of `size` on node 0 that this process holds and maps
/// (so numastat -p has a process whose page tables hold every page): the agent, a client, the
/// mapping and the fd.
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
    c.populate(req, |_, _| {}).await.expect("Populate");
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

pub(crate) async fn p5(size: u64) -> Row {
    let n = samples();
    println!(
        "P5: GetPlacement of a populated {} memfd, {n} samples interleaved with numastat -p",
        gib(size)
    );
    let (agent, mut c, map, held_fd) = p5_setup(size).await;

    let me = std::process::id().to_string();
    let numastat = || {
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
    };
    let page = kernel::page_size();
    let mut gp = Series::new("agent GetPlacement", "ms");
    let mut ns = Series::new("numastat -p", "ms");
    let mut held = Series::new("holder's numa_maps in the bench", "ms");
    let mut direct = Series::new("residency::count_nodes in the bench", "ms");
    let mut old = Series::new("fault-in and move_pages in the bench", "ms");
    let mut wrong = Vec::new();
    let mut numastat_mb = String::new();
    for round in 0..=n {
        let t = Instant::now();
        let p = c.placement("p5", "ram", 0, 0).await.expect("GetPlacement");
        let d = t.elapsed();
        let on0: u64 = p
            .nodes
            .iter()
            .filter(|x| x.node == 0)
            .map(|x| x.pages)
            .sum();
        let all: u64 = p.nodes.iter().map(|x| x.pages).sum();
        if on0 != size / page || all != on0 {
            wrong.push(format!("GetPlacement found {on0} of {all} pages on node 0"));
        }
        let pid = std::process::id() as i32;
        let pids: Vec<i32> = p.ranges.iter().map(|r| r.counted_from_pid).collect();
        wrong.extend(crate::judge::p5_ranges_problem(&pids, pid));
        let (d_ns, mb) = numastat();
        // The agent's method with a holder, called directly: this process's numa_maps joined with
        // its maps, then cachestat and the exactness check.
        let fd = held_fd.clone();
        let (d_held, counts) = blocking(move || {
            let t = Instant::now();
            let file_id = kernel::fd_file_id(fd.as_fd()).expect("fstat");
            let holder = kernel::residency::holder_mappings(pid, file_id, &[(0, size)])
                .expect("holder maps");
            let counts =
                kernel::residency::count_nodes_held(fd.as_fd(), size, 0, size, page, Some(&holder))
                    .expect("count_nodes_held");
            (t.elapsed(), counts)
        })
        .await;
        if counts.nodes.get(&0).copied() != Some(size / page) || counts.counted_from != Some(pid) {
            wrong.push(format!("count_nodes_held: {counts:?}"));
        }
        numastat_mb = mb;
        // The same kernel reads, done directly (the agent's kernel module, called in-process).
        let fd = held_fd.clone();
        let (d_direct, counts) = blocking(move || {
            let t = Instant::now();
            let counts = kernel::residency::count_nodes(fd.as_fd(), size, 0, size, page)
                .expect("count_nodes");
            (t.elapsed(), counts)
        })
        .await;
        if counts.nodes.get(&0).copied() != Some(size / page) {
            wrong.push(format!("count_nodes: {counts:?}"));
        }
        // The previous method: read-fault everything into a fresh mapping, then move_pages.
        let fd = held_fd.clone();
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
        if round > 0 {
            gp.push_ms(d);
            ns.push_ms(d_ns);
            held.push_ms(d_held);
            direct.push_ms(d_direct);
            old.push_ms(d_old);
        }
    }
    drop(map);
    drop(held_fd);
    c.delete_region("p5", "ram").await.expect("DeleteRegion");
    drop(agent);
    p5_row(size, [gp, ns, held, direct, old], wrong, numastat_mb)
}

fn p5_row(size: u64, series: [Series; 5], wrong: Vec<String>, numastat_mb: String) -> Row {
    let page = kernel::page_size();
    let [gp, ns, held, direct, old] = series;
    let ratio = ns.median() / gp.median();
    let correct = wrong.is_empty();
    Row {
        id: "P5",
        what: format!("GetPlacement, {} populated memfd", gib(size)),
        measured: gp.show(),
        against: format!("numastat -p {}", ns.show()),
        ratio: format!("{ratio:.2}x"),
        goal: ">= 0.5x",
        met: correct && ratio >= 0.5,
        notes: vec![
            format!(
                "GetPlacement counted every one of {} pages on node 0 ({}); numastat total {numastat_mb} MB for the bench process (which maps the region)",
                size / page,
                if correct {
                    "verified".to_string()
                } else {
                    format!("WRONG: {}", wrong.join("; "))
                }
            ),
            format!(
                "GetPlacement counted from the holder's page tables (this process maps every page): its method called directly in the bench (maps, numa_maps up to the mapping's line, maps again, cachestat): {}",
                held.show()
            ),
            format!(
                "the agent's fallback (no holder maps every page) called directly in the bench (cachestat, read-fault the allocated runs into a window, its numa_maps line): {}",
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
