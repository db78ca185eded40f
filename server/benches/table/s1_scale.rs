//! S1: scale curves. At each region count (100, 1,000 and 10,000 by default; 16 ranges of one page
//! each, memfd), one agent: restart held and unheld beside P4's raw loop, one reconcile pass's CPU
//! time, ListRegions latency (the whole listing, through every page of the client's default size)
//! and GetRegion latency, RSS, open fds and the database's size. Judged at the
//! largest count against issue 25's goals (`judge::s1_goals`); `plot_scale.py` draws the curves.

use crate::common::AgentProc;
use crate::judge::{ScaleFigures, s1_goals};
use crate::p4_restart::{FloorFiles, Restarts, create_regions, region_key, restarts};
use crate::report::*;
use memplace_server::kernel;
use prost::Message;
use std::time::Instant;

/// The region counts S1 measures.
fn counts() -> Vec<u64> {
    std::env::var("MEMPLACE_BENCH_SCALE")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1000, 10_000])
}

/// The figures at one region count.
struct Point {
    n: u64,
    restarts: Restarts,
    pass_cpu: Series,
    pass_wall: Series,
    list: Series,
    /// The agent's CPU time for one whole listing: a figure the machine's other load does not
    /// inflate the way it does the wall time.
    list_cpu: Series,
    get: Series,
    rss_created_mib: f64,
    rss_mib: f64,
    fds: usize,
    db_bytes: u64,
    /// The size of ListRegions' answers (the regions' encoded length, over every page).
    list_bytes: usize,
    /// The pages one whole listing took.
    list_pages: usize,
    create_secs: f64,
}

/// The agent's CPU time so far, in ns: the sum over its threads of /proc/PID/task/*/schedstat's
/// first field (time on CPU), exact to the ns where /proc/PID/stat counts 10 ms ticks.
fn cpu_ns(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Bytes of the files in a directory (the database, its WAL and shared-memory file).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    })
}

/// This process holds every region's fd (held restarts; the held floor runs on those fds, and the
/// unheld floor's files are closed before the held restarts): RLIMIT_NOFILE needs the largest
/// count and some more. It is raised where it can be (prlimit(1)); a container may refuse to
/// raise the hard limit, and then the bench runs with what it has.
fn raise_nofile(n: u64) {
    let want = (2 * n + 1024).max(65_536);
    let ok = std::process::Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string()])
        .arg(format!("--nofile={want}:{want}"))
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("  could not raise RLIMIT_NOFILE to {want} (prlimit); large counts may fail");
    }
}

async fn point(n: u64, samples: usize) -> Point {
    let size = RANGES * kernel::page_size(); // 16 ranges of one page
    let max = n.max(4096).to_string();
    // ListRegions answers in pages (about 500 bytes a region of 16 ranges, 1000 regions a page by
    // default), so the agent keeps gRPC's default message limit of 4 MiB.
    let (mut agent, _) =
        crate::start_agent(&["--reconcile-interval-secs", "0", "--max-regions", &max]);
    let t = Instant::now();
    let tokens = create_regions(&agent, n, size).await;
    let create_secs = t.elapsed().as_secs_f64();
    let pid = || agent.pid() as i32;
    let rss_created_mib = proc_rss(pid()) as f64 / MIB as f64;
    let floor_files = FloorFiles::none(n, size);
    let (restarts, holder) = restarts(&mut agent, &tokens, &floor_files, samples).await;
    drop(floor_files);
    let (pass_cpu, pass_wall, (list, list_cpu), get, (list_bytes, list_pages)) =
        latencies(&agent, n, samples).await;
    let pid = agent.pid() as i32;
    let p = Point {
        n,
        restarts,
        pass_cpu,
        pass_wall,
        list,
        list_cpu,
        get,
        rss_created_mib,
        rss_mib: proc_rss(pid) as f64 / MIB as f64,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()),
        db_bytes: dir_bytes(&agent.state_dir()),
        list_bytes,
        list_pages,
        create_secs,
    };
    drop(holder);
    p
}

/// One reconcile pass (the Reconcile RPC over every region: its CPU time in the agent and its
/// wall time), ListRegions of every region (the client following every page of its default
/// size, timed from the first call to the last answer), and GetRegion (the median of 20 calls on
/// regions spread over the count), `samples` times each, interleaved; and the size of
/// ListRegions' answers and the number of pages.
async fn latencies(
    agent: &AgentProc,
    n: u64,
    samples: usize,
) -> (Series, Series, (Series, Series), Series, (usize, usize)) {
    let pid = agent.pid() as i32;
    let mut c = agent.client().await;
    let mk = |name: &str| {
        let mut s = Series::new(format!("{name} n={n}"), "ms");
        s.regions = Some(n);
        s
    };
    let (mut bytes, mut pages) = (0, 0);
    let (mut cpu, mut wall, mut list, mut list_cpu, mut get) = (
        mk("reconcile pass CPU"),
        mk("reconcile pass wall"),
        mk("ListRegions"),
        mk("ListRegions agent CPU"),
        mk("GetRegion"),
    );
    for _ in 0..samples {
        let c0 = cpu_ns(pid);
        let t = Instant::now();
        c.reconcile("").await.expect("Reconcile");
        wall.push_ms(t.elapsed());
        cpu.samples
            .push(cpu_ns(pid).saturating_sub(c0) as f64 / 1e6);
        let c0 = cpu_ns(pid);
        let t = Instant::now();
        let (all, p) = c.list_regions_paged("", 0).await.expect("ListRegions");
        list.push_ms(t.elapsed());
        list_cpu
            .samples
            .push(cpu_ns(pid).saturating_sub(c0) as f64 / 1e6);
        pages = p;
        assert_eq!(all.len() as u64, n, "ListRegions");
        bytes = all.iter().map(|r| r.encoded_len() + 3).sum();
        let mut one = Vec::new();
        for k in 0..20 {
            let (vm, name) = region_key(k * n / 20);
            let t = Instant::now();
            c.get_region(&vm, &name).await.expect("GetRegion");
            one.push(t.elapsed());
        }
        one.sort();
        get.push_ms(one[one.len() / 2]);
    }
    (cpu, wall, (list, list_cpu), get, (bytes, pages))
}

pub(crate) async fn s1() -> Row {
    let counts = counts();
    let samples = samples();
    let top = counts.iter().copied().max().unwrap_or(0);
    raise_nofile(top);
    println!(
        "S1: scale, {counts:?} memfd regions x {RANGES} one-page ranges, {samples} samples of each figure"
    );
    let mut points = Vec::new();
    for &n in &counts {
        let p = point(n, samples).await;
        println!(
            "  n={n}: created in {:.1} s; restart held {}, unheld {}; pass CPU {}; ListRegions {} in {} pages (agent CPU {}); GetRegion {}; RSS {:.1} MiB; {} fds; database {:.1} MiB",
            p.create_secs,
            p.restarts.held.show(),
            p.restarts.unheld.show(),
            p.pass_cpu.show(),
            p.list.show(),
            p.list_pages,
            p.list_cpu.show(),
            p.get.show(),
            p.rss_mib,
            p.fds,
            p.db_bytes as f64 / MIB as f64
        );
        points.push(p);
    }
    row(points)
}

/// How a figure grows from one count to the next: the exponent k of f ~ n^k (1 is linear).
fn growth(points: &[Point], f: impl Fn(&Point) -> f64) -> String {
    points
        .windows(2)
        .map(|w| {
            let k = (f(&w[1]) / f(&w[0])).ln() / (w[1].n as f64 / w[0].n as f64).ln();
            format!("{}->{}: n^{k:.2}", w[0].n, w[1].n)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn row(points: Vec<Point>) -> Row {
    let interval = memplace_server::config::Config::default().reconcile_interval_secs;
    let Some(top) = points.iter().max_by_key(|p| p.n) else {
        return Row {
            id: "S1",
            what: "scale: no region counts".into(),
            measured: "-".into(),
            against: "-".into(),
            ratio: "-".into(),
            goal: "-",
            met: false,
            notes: vec![],
            series: vec![],
        };
    };
    let r = &top.restarts;
    let figures = ScaleFigures {
        held_ms: r.held.median(),
        unheld_ms: r.unheld.median(),
        held_ratio: r.held.median() / r.floor.median(),
        unheld_ratio: r.unheld.median() / r.floor_create.median(),
        rss_mib: top.rss_mib.max(top.rss_created_mib),
        pass_cpu_ms: top.pass_cpu.median(),
        interval_secs: interval,
        list_ms: top.list.median(),
        list_pages: top.list_pages,
    };
    let goals = s1_goals(&figures);
    let verdicts: Vec<String> = goals
        .iter()
        .map(|(g, shown, met)| format!("{g}: {shown} {}", if *met { "PASS" } else { "short" }))
        .collect();
    let correct = points.iter().all(|p| p.restarts.bad.is_empty());
    let mut notes = vec![format!("at {}: {}", top.n, verdicts.join("; "))];
    notes.extend(points_notes(&points, interval));
    if !correct {
        let bad: Vec<String> = points.iter().flat_map(|p| p.restarts.bad.clone()).collect();
        notes.push(format!("WRONG: {}", bad.join("; ")));
    }
    Row {
        id: "S1",
        what: format!(
            "scale: {} memfd regions x {RANGES} ranges",
            points
                .iter()
                .map(|p| p.n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        measured: format!(
            "at {}: restart held {}, unheld {}; pass CPU {}; ListRegions {}; RSS {:.1} MiB",
            top.n,
            r.held.show(),
            r.unheld.show(),
            top.pass_cpu.show(),
            top.list.show(),
            figures.rss_mib
        ),
        against: format!(
            "raw loop {}; with memfd_create {}",
            r.floor.show(),
            r.floor_create.show()
        ),
        ratio: format!(
            "held {:.1}x, unheld {:.1}x",
            figures.held_ratio, figures.unheld_ratio
        ),
        goal: "at 10,000: restart <= 1 s and <= 3x raw loop; RSS <= 128 MiB; pass <= 1 % of a core; ListRegions <= 50 ms",
        met: correct && goals.iter().all(|g| g.2),
        notes,
        series: points.into_iter().flat_map(point_series).collect(),
    }
}

/// Each count's figures per region, and how each grows with the count.
fn points_notes(points: &[Point], interval: u64) -> Vec<String> {
    let mut notes: Vec<String> = points
        .iter()
        .map(|p| {
            let n = p.n as f64;
            format!(
                "n={}: created in {:.1} s; restart held {:.1} us/region, unheld {:.1}; raw loop {:.1}, with memfd_create {:.1}; pass CPU {:.1} us/region ({:.4} % of a core every {interval} s), wall {}; ListRegions {:.1} us/region in {} pages (agent CPU {:.1} us/region), answers {:.2} MiB ({} B/region); GetRegion {}; RSS {:.1} MiB after creation, {:.1} MiB after the held restarts ({:.1} KiB/region); {} fds; database {:.2} MiB ({:.0} B/region)",
                p.n,
                p.create_secs,
                p.restarts.held.median() * 1e3 / n,
                p.restarts.unheld.median() * 1e3 / n,
                p.restarts.floor.median() * 1e3 / n,
                p.restarts.floor_create.median() * 1e3 / n,
                p.pass_cpu.median() * 1e3 / n,
                p.pass_cpu.median() / (interval as f64 * 1e3) * 100.0,
                p.pass_wall.show(),
                p.list.median() * 1e3 / n,
                p.list_pages,
                p.list_cpu.median() * 1e3 / n,
                p.list_bytes as f64 / MIB as f64,
                p.list_bytes / p.n as usize,
                p.get.show(),
                p.rss_created_mib,
                p.rss_mib,
                p.rss_mib * 1024.0 / n,
                p.fds,
                p.db_bytes as f64 / MIB as f64,
                p.db_bytes as f64 / n
            )
        })
        .collect();
    notes.push(format!(
        "growth (f ~ n^k; 1 is linear): restart held {}; unheld {}; pass CPU {}; ListRegions {}; GetRegion {}; RSS {}",
        growth(points, |p| p.restarts.held.median()),
        growth(points, |p| p.restarts.unheld.median()),
        growth(points, |p| p.pass_cpu.median()),
        growth(points, |p| p.list.median()),
        growth(points, |p| p.get.median()),
        growth(points, |p| p.rss_mib),
    ));
    notes
}

/// A count's series, each tagged with the count; the single readings (RSS, fds, database size)
/// as one-sample series.
fn point_series(p: Point) -> Vec<Series> {
    let n = p.n;
    let one = |name: &str, unit: &'static str, v: f64| {
        let mut s = Series::new(format!("{name} n={n}"), unit);
        s.samples.push(v);
        s
    };
    let Restarts {
        held,
        floor,
        unheld,
        floor_create,
        ..
    } = p.restarts;
    let mut out = vec![
        held,
        floor,
        unheld,
        floor_create,
        p.pass_cpu,
        p.pass_wall,
        p.list,
        p.list_cpu,
        p.get,
        one("RSS after creation", "MiB", p.rss_created_mib),
        one("RSS", "MiB", p.rss_mib),
        one("open fds", "fds", p.fds as f64),
        one("database", "MiB", p.db_bytes as f64 / MIB as f64),
        one("create all regions", "s", p.create_secs),
        one(
            "ListRegions answers",
            "MiB",
            p.list_bytes as f64 / MIB as f64,
        ),
    ];
    for s in &mut out {
        if !s.name.ends_with(&format!(" n={n}")) {
            s.name = format!("{} n={n}", s.name);
        }
        s.regions = Some(n);
    }
    out
}
