//! P4: restart with 1,000 regions x 16 ranges, held and unheld, against the raw loop of the calls
//! recovery makes; then P6 (p6_idle.rs) on the same agent.

use crate::common::AgentProc;
use crate::p6_idle::p6_idle;
use crate::report::*;
use memplace_client::handoff::Handoff;
use memplace_client::{Client, pb};
use memplace_server::domain::PolicyMode;
use memplace_server::kernel::{self, Mapping};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// P4 and P6: restart with 1,000 regions x 16 ranges, then the idle agent's cost.

pub(crate) fn ranges_request(size: u64) -> Vec<pb::RangePolicy> {
    let step = size / RANGES;
    (0..RANGES)
        .map(|i| pb::RangePolicy {
            offset: i * step,
            length: step,
            policy: Some(pb_policy(if i % 2 == 0 {
                pb::PolicyMode::Bind
            } else {
                pb::PolicyMode::Interleave
            })),
        })
        .collect()
}

pub(crate) fn region_key(i: u64) -> (String, String) {
    // Four regions per VM, as a VMM with a few memory devices has.
    (format!("p4vm{}", i / 4), format!("ram{}", i % 4))
}

/// Regions that are active with all 16 ranges applied (the agent re-read each from the kernel).
pub(crate) async fn verified(c: &mut Client) -> (usize, usize) {
    let regions = c.list_regions("").await.expect("ListRegions");
    let good = regions
        .iter()
        .filter(|r| {
            r.status == pb::RegionStatus::Active as i32
                && r.ranges.len() == RANGES as usize
                && r.ranges
                    .iter()
                    .all(|x| x.state == pb::RangeState::Applied as i32)
        })
        .count();
    (good, regions.len())
}

pub(crate) async fn p4_p6(empty_start: &Series) -> Vec<Row> {
    let n = env_u64("MEMPLACE_BENCH_REGIONS", 1000);
    let samples = samples();
    let size = RANGES * 4 * kernel::page_size(); // 256 KiB: 16 ranges of 4 pages
    println!(
        "P4: {n} memfd regions x {RANGES} ranges ({} KiB each), {samples} restarts of each kind interleaved with the raw loop",
        size >> 10
    );
    let (mut agent, _) = crate::start_agent(&["--reconcile-interval-secs", "0"]);
    let tokens = create_regions(&agent, n, size).await;
    let mut c = agent.client().await;
    let (before, total) = verified(&mut c).await;
    println!("  created {total} regions, {before} with all ranges applied");

    let floor_files = FloorFiles::new(n, size);
    let (r, holder) = restarts(&mut agent, &tokens, &floor_files, samples).await;
    let p4 = p4_row(n, r, empty_start);
    let mut rows = vec![p4];
    if selected("P6") {
        rows.extend(p6_rows(&mut agent, n, samples, &floor_files).await);
    }
    drop(holder);
    rows
}

/// Creates `n` memfd regions of `size` with 16 ranges each (8 clients at a time); returns each
/// region's index and handoff token, in index order.
pub(crate) async fn create_regions(agent: &AgentProc, n: u64, size: u64) -> Vec<(u64, String)> {
    let mut tokens = Vec::with_capacity(n as usize);
    let mut tasks = tokio::task::JoinSet::new();
    let per = n.div_ceil(8);
    for w in 0..8 {
        let mut c = agent.client().await;
        tasks.spawn(async move {
            let mut out = Vec::new();
            for i in (w * per)..((w + 1) * per).min(n) {
                let (vm, name) = region_key(i);
                let r = c
                    .create_region(&vm, &name, size, pb::Backend::Memfd, ranges_request(size))
                    .await
                    .expect("CreateRegion");
                out.push((i, r.handoff_token));
            }
            out
        });
    }
    while let Some(r) = tasks.join_next().await {
        tokens.extend(r.expect("create task"));
    }
    tokens.sort();
    tokens
}

/// The floor: the calls recovery makes, in a tight loop, on files that already exist; and with
/// memfd_create first, as for files nobody holds.
pub(crate) struct FloorFiles {
    files: Arc<Vec<OwnedFd>>,
    /// Files the pass with memfd_create makes.
    n: usize,
    size: u64,
}

impl FloorFiles {
    /// `n` files of the bench's own.
    pub(crate) fn new(n: u64, size: u64) -> Self {
        let files = (0..n)
            .map(|i| kernel::create_memfd(&format!("floor{i}"), size, None).expect("memfd"))
            .collect();
        Self::of(files, n, size)
    }

    /// No files of its own: the held floor runs on the files the bench holds for the agent (S1,
    /// where two sets of 10,000 fds would pass this process's RLIMIT_NOFILE).
    pub(crate) fn none(n: u64, size: u64) -> Self {
        Self::of(Vec::new(), n, size)
    }

    fn of(files: Vec<OwnedFd>, n: u64, size: u64) -> Self {
        Self {
            files: Arc::new(files),
            n: n as usize,
            size,
        }
    }

    /// One pass of the raw loop over every file (`create`: over new files made in the pass).
    pub(crate) async fn raw_loop(&self, create: bool) -> std::time::Duration {
        let files = self.files.clone();
        let (n, size) = (self.n, self.size);
        blocking(move || {
            let t = Instant::now();
            let maps = if create {
                let fresh: Vec<OwnedFd> = (0..n)
                    .map(|i| kernel::create_memfd(&format!("again{i}"), size, None).expect("memfd"))
                    .collect();
                let maps = remap_rebind_verify(fresh.iter().map(|f| f.as_fd()), size);
                let took = t.elapsed();
                drop(maps);
                drop(fresh);
                return took;
            } else {
                remap_rebind_verify(files.iter().map(|f| f.as_fd()), size)
            };
            let took = t.elapsed();
            drop(maps);
            took
        })
        .await
    }
}

/// The restart samples of one agent: unheld restarts interleaved with the raw loop with
/// memfd_create, then held ones interleaved with the raw loop.
pub(crate) struct Restarts {
    pub(crate) held: Series,
    pub(crate) floor: Series,
    pub(crate) unheld: Series,
    pub(crate) floor_create: Series,
    /// What was wrong after a restart (regions not all active and applied).
    pub(crate) bad: Vec<String>,
}

/// Restarts the agent `samples` times unheld, then makes this process the holder of every region
/// and restarts it `samples` times held. Returns the samples and the fds held (drop them to let
/// go). Without files of its own, the held floor runs on the fds held.
pub(crate) async fn restarts(
    agent: &mut AgentProc,
    tokens: &[(u64, String)],
    floor_files: &FloorFiles,
    samples: usize,
) -> (Restarts, Arc<Vec<OwnedFd>>) {
    let n = tokens.len();
    let mut unheld = Series::new("restart unheld", "ms");
    let mut floor_create = Series::new("raw loop with memfd_create", "ms");
    let mut held = Series::new("restart held", "ms");
    let mut floor = Series::new("raw loop", "ms");
    let mut bad = Vec::new();
    // Restarts with no holder: every file is recreated (memfd_create) and re-bound.
    for _ in 0..samples {
        agent.kill();
        unheld.push_ms(agent.spawn());
        let mut c = agent.client().await;
        let (ok, _) = verified(&mut c).await;
        if ok != n {
            bad.push(format!("unheld: {ok}/{n} regions ok"));
        }
        floor_create.push_ms(floor_files.raw_loop(true).await);
    }

    // This process becomes the VMM of every region: it holds all the fds, so a restart takes
    // each back with pidfd_getfd.
    let hand = Handoff::connect(agent.handoff_socket()).expect("handoff");
    let mut holder: Vec<OwnedFd> = Vec::with_capacity(tokens.len());
    for (i, token) in tokens {
        let (vm, name) = region_key(*i);
        holder.push(hand.acquire(&vm, &name, token).expect("acquire").fd);
    }
    let holder = Arc::new(holder);
    let on_held;
    let held_floor = if floor_files.files.is_empty() {
        on_held = FloorFiles {
            files: holder.clone(),
            n,
            size: floor_files.size,
        };
        &on_held
    } else {
        floor_files
    };
    for _ in 0..samples {
        agent.kill();
        held.push_ms(agent.spawn());
        let mut c = agent.client().await;
        let (ok, _) = verified(&mut c).await;
        if ok != n {
            bad.push(format!("held: {ok}/{n} regions ok"));
        }
        floor.push_ms(held_floor.raw_loop(false).await);
    }
    let r = Restarts {
        held,
        floor,
        unheld,
        floor_create,
        bad,
    };
    (r, holder)
}

fn p4_row(n: u64, r: Restarts, empty_start: &Series) -> Row {
    let Restarts {
        held,
        floor,
        unheld,
        floor_create,
        bad,
    } = r;
    let ratio_held = held.median() / floor.median();
    let ratio_unheld = unheld.median() / floor_create.median();
    let correct = bad.is_empty();
    Row {
        id: "P4",
        what: format!("restart: {n} regions x {RANGES} ranges re-mapped, re-bound, verified"),
        measured: format!("held {}; unheld {}", held.show(), unheld.show()),
        against: format!(
            "raw loop {}; with memfd_create {}",
            floor.show(),
            floor_create.show()
        ),
        ratio: format!("held {ratio_held:.1}x, unheld {ratio_unheld:.1}x"),
        goal: "<= 3x raw loop and <= 1 s",
        met: correct
            && ratio_held <= 3.0
            && ratio_unheld <= 3.0
            && held.max() <= 1000.0
            && unheld.max() <= 1000.0,
        notes: vec![
            format!(
                "restart = SIGKILL, exec, until the gRPC socket accepts (regions are recovered before it binds); an empty agent starts in {}",
                empty_start.show()
            ),
            "held: this bench process holds all fds (acquired over the handoff socket), so each is taken back with pidfd_getfd; unheld: never handed off, so each file is recreated".into(),
            "raw loop per region: mmap, 16 mbind, a second mmap, 16 get_mempolicy (MPOL_F_ADDR), munmap of the first (the agent keeps an unbound mapping); \"with memfd_create\" adds memfd_create+ftruncate first".into(),
            if correct {
                format!("after every restart ListRegions showed all {n} regions active with {RANGES} applied ranges")
            } else {
                format!("WRONG: {}", bad.join("; "))
            },
        ],
        series: vec![held, floor, unheld, floor_create],
    }
}

/// P6 on P4's agent: the idle agent at the default reconcile interval, then at 1 s with one
/// Reconcile RPC beside the raw loop.
async fn p6_rows(
    agent: &mut AgentProc,
    n: u64,
    samples: usize,
    floor_files: &FloorFiles,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let window = env_u64("MEMPLACE_BENCH_IDLE_SECS", 30);
    // The default interval (30 s), then 1 s, which shows a pass's cost.
    let default = memplace_server::config::Config::default().reconcile_interval_secs;
    agent.extra = vec!["--reconcile-interval-secs".into(), default.to_string()];
    agent.kill();
    agent.spawn();
    rows.push(p6_idle(agent, n, 30, window, samples, "P6").await);
    agent.extra = vec!["--reconcile-interval-secs".into(), "1".into()];
    agent.kill();
    agent.spawn();
    let mut row = p6_idle(agent, n, 1, (window / 5).max(2), samples, "P6-1s").await;
    // One pass on demand: the Reconcile RPC over every region, beside the raw loop.
    let mut c = agent.client().await;
    let mut rpc = Series::new("Reconcile RPC, all regions", "ms");
    let mut raw = Series::new("raw loop", "ms");
    let mut checked = 0;
    for _ in 0..samples {
        let t = Instant::now();
        let rep = c.reconcile("").await.expect("Reconcile");
        rpc.push_ms(t.elapsed());
        checked = rep.ranges_checked;
        raw.push_ms(floor_files.raw_loop(false).await);
    }
    let ranges = (n * RANGES) as f64;
    row.notes.push(format!(
        "one reconcile pass on demand (Reconcile RPC, all {n} regions, {checked} ranges checked): {}, {:.2} us per range; the raw loop (map, bind, map, read back every range) {}, {:.2} us per range",
        rpc.show(),
        rpc.median() * 1e3 / ranges,
        raw.show(),
        raw.median() * 1e3 / ranges
    ));
    row.series.push(rpc);
    row.series.push(raw);
    rows.push(row);
    rows
}

/// Maps each file, binds its 16 ranges, maps it again and reads every range's policy back.
/// Returns the second mappings and unmaps the first, as the agent does (it binds through a
/// mapping it drops and keeps an unbound one). Keeping the bound ones instead, 16 VMAs each, would
/// pass `vm.max_map_count` (65,530) at S1's 10,000 regions.
pub(crate) fn remap_rebind_verify<'a>(
    files: impl Iterator<Item = std::os::fd::BorrowedFd<'a>>,
    size: u64,
) -> Vec<Mapping> {
    let step = size / RANGES;
    let mut maps = Vec::new();
    for fd in files {
        let m = Mapping::new(fd, size).expect("mmap");
        for r in 0..RANGES {
            let mode = if r % 2 == 0 {
                PolicyMode::Bind
            } else {
                PolicyMode::Interleave
            };
            m.mbind(r * step, step, &policy(mode), 0).expect("mbind");
        }
        let fresh = Mapping::new(fd, size).expect("mmap");
        for r in 0..RANGES {
            let got = fresh.policy_at(r * step).expect("get_mempolicy");
            assert!(got.is_some_and(|p| p.mode
                == if r % 2 == 0 {
                    PolicyMode::Bind
                } else {
                    PolicyMode::Interleave
                }));
        }
        drop(m);
        maps.push(fresh);
    }
    maps
}
