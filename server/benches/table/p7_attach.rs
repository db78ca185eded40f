//! P7-attach: `memplacectl attach VM --pid PID` on a running QEMU (Debian's qemu-system-x86_64,
//! TCG, `-machine none`) whose `memory-backend-memfd,share=on,prealloc=on` file of the populate
//! size (4 GiB unless memory is short) is fully allocated, against a floor measured in the same
//! run: what attaching must do at the least, `pidfd_open` + `pidfd_getfd` of QEMU's memfd fd +
//! one mbind of the whole file through a fresh mapping (and its munmap). The RPC alone
//! (AttachProcess through the Rust client on an open channel) and `memplacectl health` (the CLI's
//! process start, connect and one trivial RPC) are timed in the same rounds, so the CLI's time
//! splits into its own start and the RPC. Each attach makes a new region: it is deleted (untimed)
//! before the next sample, which leaves QEMU's memory as it was.

use crate::common::{AgentProc, ctl_path};
use crate::p2_setpolicy::SqliteFloor;
use crate::report::*;
use memplace_client::{Client, pb};
use memplace_server::domain::PolicyMode;
use memplace_server::kernel::{Mapping, pidfd};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The VM id the attached regions belong to.
const VM: &str = "p7a";
/// QEMU's name for its memfd (`/proc/PID/fd/N` reads `/memfd:memory-backend-memfd (deleted)`).
const QEMU_MEMFD: &str = "/memfd:memory-backend-memfd (deleted)";
/// How long QEMU may take to start and allocate its memory before the bench fails.
const QEMU_LIMIT: Duration = Duration::from_secs(600);

/// A paused QEMU with one memfd backend, killed on drop.
pub(crate) struct Qemu {
    child: Child,
    /// QEMU's fd number of its memfd.
    pub(crate) fd: i32,
    /// How long QEMU took from spawn until every byte of the memfd was allocated.
    pub(crate) ready_in: Duration,
}

impl Qemu {
    /// Starts QEMU with a `size` memfd backend it preallocates, and waits (at most
    /// [`QEMU_LIMIT`], named) until the file holds `size` allocated bytes.
    pub(crate) fn start(size: u64) -> Self {
        let t = Instant::now();
        let backend = format!("memory-backend-memfd,id=m0,size={size},share=on,prealloc=on");
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-display", "none", "-nodefaults"])
            .args(["-no-reboot", "-S", "-machine", "none", "-serial", "none"])
            .args(["-object", &backend])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 (Debian qemu-system-x86)");
        let mut q = Qemu {
            child,
            fd: -1,
            ready_in: Duration::ZERO,
        };
        let pid = q.pid();
        loop {
            if let Some(fd) = memfd_of(pid)
                && allocated(pid, fd) >= size
            {
                q.fd = fd;
                break;
            }
            if let Ok(Some(st)) = q.child.try_wait() {
                panic!("QEMU ({backend}) exited ({st}) before its memfd was allocated");
            }
            assert!(
                t.elapsed() < QEMU_LIMIT,
                "waited {QEMU_LIMIT:?} for QEMU to allocate its {} memfd, and it never did ({} allocated)",
                gib(size),
                memfd_of(pid).map_or(0, |fd| allocated(pid, fd))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q.ready_in = t.elapsed();
        q
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// QEMU's fd number of its memfd, once it has one.
fn memfd_of(pid: i32) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == QEMU_MEMFD))?
        .file_name()
        .to_str()?
        .parse()
        .ok()
}

/// Allocated bytes of fd `fd` of `pid` (st_blocks of the shmem file, which counts every page).
fn allocated(pid: i32, fd: i32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
        .map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
}

/// The floor: pidfd_open, pidfd_getfd of QEMU's memfd, a fresh mapping of the whole file, one
/// mbind (BIND 0, no page moves) and the munmap.
fn floor(pid: i32, fd: i32, size: u64) -> Duration {
    let t = Instant::now();
    let pfd = pidfd::open(pid).expect("pidfd_open on QEMU");
    let file = pidfd::getfd(&pfd, fd).expect("pidfd_getfd of QEMU's memfd");
    let map = Mapping::new(file.as_fd(), size).expect("mapping QEMU's memfd");
    map.mbind(0, size, &policy(PolicyMode::Bind), 0)
        .expect("mbind of QEMU's memfd");
    drop(map);
    drop(file);
    drop(pfd);
    t.elapsed()
}

/// What is wrong with an attach's answer, if anything: exactly one memfd region of `size` held
/// by QEMU.
fn problem(regions: &[pb::Region], size: u64, pid: i32) -> Option<String> {
    match regions {
        [r] if r.size_bytes == size && r.holder_pid == pid && r.backend() == pb::Backend::Memfd => {
            None
        }
        _ => Some(format!(
            "attach answered {regions:?}; one memfd region of {size} bytes held by pid {pid} expected"
        )),
    }
}

/// Deletes every region of [`VM`] (between samples, untimed).
async fn clear(c: &mut Client) {
    for r in c.list_regions(VM).await.expect("ListRegions") {
        c.delete_region(VM, &r.name).await.expect("DeleteRegion");
    }
}

/// `memplacectl --socket S ARGS`: its wall time (spawn to exit) and its stdout.
pub(crate) fn ctl_timed(agent: &AgentProc, args: &[&str]) -> (Duration, String) {
    let mut cmd = Command::new(ctl_path());
    cmd.arg("--socket").arg(agent.socket()).args(args);
    let t = Instant::now();
    let out = cmd
        .output()
        .expect("memplacectl (cargo build --release -p memplacectl)");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "memplacectl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (took, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The four sides of one round: floor, CLI attach, RPC attach, `memplacectl health`.
struct Sides {
    floor: Series,
    /// The floor plus one durable SQLite commit (what an attach must also do: record the region).
    durable: Series,
    db: SqliteFloor,
    cli: Series,
    rpc: Series,
    health: Series,
}

/// One round (floor, CLI, RPC, health); pushes the times when `keep` (not the warm-up).
async fn round(agent: &AgentProc, c: &mut Client, q: &Qemu, size: u64, s: &mut Sides, keep: bool) {
    let (pid, fd) = (q.pid(), q.fd);
    let f = blocking(move || floor(pid, fd, size)).await;
    let commit = s.db.commits(1).await;
    let pid_s = pid.to_string();
    let (cli, out) = ctl_timed(agent, &["-o", "json", "attach", VM, "--pid", &pid_s]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("attach -o json");
    assert_eq!(
        v["regions"].as_array().map(Vec::len),
        Some(1),
        "memplacectl attach answered {out}"
    );
    let listed = c.list_regions(VM).await.expect("ListRegions");
    if let Some(p) = problem(&listed, size, pid) {
        panic!("P7-attach: WRONG after memplacectl attach: {p}");
    }
    clear(c).await;
    let t = Instant::now();
    let r = c.attach_process(VM, pid).await.expect("AttachProcess");
    let rpc = t.elapsed();
    if let Some(p) = problem(&r.regions, size, pid) {
        panic!("P7-attach: WRONG: {p}");
    }
    clear(c).await;
    let (health, _) = ctl_timed(agent, &["health"]);
    if keep {
        s.floor.push_ms(f);
        s.durable.push_ms(f + commit);
        s.cli.push_ms(cli);
        s.rpc.push_ms(rpc);
        s.health.push_ms(health);
    }
}

/// P7-attach (see the module docs).
pub(crate) async fn p7_attach(agent: &AgentProc, size: u64) -> Row {
    println!(
        "P7-attach: QEMU -machine none with a {} memfd backend, prealloc=on",
        gib(size)
    );
    let q = blocking(move || Qemu::start(size)).await;
    println!(
        "P7-attach: QEMU pid {} allocated {} in {:.1} s (its memfd is fd {})",
        q.pid(),
        gib(allocated(q.pid(), q.fd)),
        q.ready_in.as_secs_f64(),
        q.fd
    );
    let mut c = agent.client().await;
    let mut s = Sides {
        floor: Series::new("floor: pidfd_open + pidfd_getfd + map + mbind", "ms"),
        durable: Series::new("floor + one WAL synchronous=FULL commit", "ms"),
        db: SqliteFloor::open(&agent.state_dir()).await,
        cli: Series::new("memplacectl attach", "ms"),
        rpc: Series::new("AttachProcess RPC", "ms"),
        health: Series::new("memplacectl health", "ms"),
    };
    // One warm-up round (page cache of memplacectl, the agent's first attach), not kept.
    round(agent, &mut c, &q, size, &mut s, false).await;
    for _ in 0..samples() {
        round(agent, &mut c, &q, size, &mut s, true).await;
    }
    let still = allocated(q.pid(), q.fd);
    assert_eq!(still, size, "QEMU's memfd lost pages during P7-attach");
    let ratio = |a: &Series| num(a.median() / s.floor.median());
    Row {
        id: "P7-attach",
        what: format!(
            "memplacectl attach, QEMU with a populated {} memfd",
            gib(size)
        ),
        measured: format!("CLI {}; RPC {}", s.cli.show(), s.rpc.show()),
        against: format!("{}; with one commit {}", s.floor.show(), s.durable.show()),
        ratio: format!(
            "CLI {}x, RPC {}x; RPC {}x the floor with one commit",
            ratio(&s.cli),
            ratio(&s.rpc),
            num(s.rpc.median() / s.durable.median())
        ),
        goal: NO_GOAL,
        met: true,
        notes: vec![
            format!(
                "floor: pidfd_open + pidfd_getfd of QEMU's fd {} + mmap of all {} + one mbind (BIND 0, no MOVE) + munmap, in the bench; the fd number is found once beforehand (the agent scans /proc/PID/fd and maps itself)",
                q.fd,
                gib(size)
            ),
            "floor with one commit: the floor plus one one-row WAL synchronous=FULL SQLite commit (P2's floor, in a database beside the agent's), since an attach must record its region durably before it answers".into(),
            format!(
                "where the CLI's time goes: memplacectl health (process start, connect, one trivial RPC) {}; the AttachProcess RPC alone on an open channel {}; CLI minus RPC {} ms",
                s.health.show(),
                s.rpc.show(),
                num(s.cli.median() - s.rpc.median())
            ),
            format!(
                "every attach answered one memfd region of {} held by QEMU (pid {}); it was deleted before the next sample; QEMU's file stayed fully allocated",
                gib(size),
                q.pid()
            ),
        ],
        series: vec![s.cli, s.rpc, s.floor, s.durable, s.health],
    }
}
