//! P7-exec: the time `memplacectl exec VM --region NAME -- PROGRAM {fd:NAME}` adds before
//! PROGRAM's first instruction, against a plain spawn of the same PROGRAM.
//!
//! "First instruction" is measured as the first statement of PROGRAM's `main`: PROGRAM is this
//! bench binary run with [`STAMP`] set, whose `main` reads the clock before anything else and
//! prints it ([`stamp`]); only then does it look at the fd it was given. The time is from just
//! before the bench spawns (the plain PROGRAM, or memplacectl) to that reading, so both sides
//! include the same fork, exec, dynamic linking and Rust start of PROGRAM, and the exec side adds
//! memplacectl's own start, its connect, IssueHandoffToken, ListRegions, the handoff acquire and
//! its exec of PROGRAM. The clock both processes read is CLOCK_REALTIME (`SystemTime`, the one a
//! process can read without `unsafe`; the bench forbids it); every sample is checked against the
//! bench's own CLOCK_MONOTONIC (`Instant`) from the spawn to reading PROGRAM's line, which it
//! cannot exceed, so a clock step shows as a failure, never as a figure.
//!
//! P7-exec-qemu does the same with QEMU (TCG, `pc`, 256 MiB) as PROGRAM, on a region through
//! `{path:NAME}` against QEMU on a memfd of its own, timed to the first line its guest prints
//! (SeaBIOS's banner on the debug console, read from QEMU's stdout by the bench): QEMU's own start
//! dwarfs exec's cost there, which is what that row shows.

use crate::common::events::{last_sequence, stored_events};
use crate::common::wait::PATIENCE;
use crate::common::{AgentProc, ctl_path};
use crate::p7_attach::ctl_timed;
use crate::report::*;
use memplace_client::handoff::Handoff;
use memplace_client::{Client, pb};
use memplace_server::kernel;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The environment variable that makes this binary print its start time and exit.
pub(crate) const STAMP: &str = "MEMPLACE_BENCH_STAMP";
const VM: &str = "p7x";
const NAME: &str = "ram0";

/// PROGRAM's side, called first thing in `main` when [`STAMP`] is set: prints `stamp NS` (the
/// time `main` started, ns since the epoch) and, when its first argument is an fd number, the
/// file behind it (`fd N LINK SIZE`), then exits.
pub(crate) fn stamp(started: SystemTime) -> ! {
    let ns = started
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    println!("stamp {ns}");
    if let Some(fd) = std::env::args().nth(1).filter(|a| a.parse::<u32>().is_ok()) {
        let path = format!("/proc/self/fd/{fd}");
        let link =
            std::fs::read_link(&path).map_or_else(|e| e.to_string(), |l| l.display().to_string());
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        println!("fd {fd} {link} {size}");
    }
    std::process::exit(0);
}

/// Spawns `cmd` (PROGRAM, or memplacectl exec of it) and returns the time from just before the
/// spawn to PROGRAM's stamp, the rest of its output, and its pid.
fn time_to_stamp(mut cmd: Command) -> (Duration, String, u32) {
    cmd.env(STAMP, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let wall = SystemTime::now();
    let mono = Instant::now();
    let mut child = cmd.spawn().expect("spawning PROGRAM");
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    // PROGRAM prints at once and exits; memplacectl exits non-zero, printing nothing, if it fails.
    out.read_line(&mut first).expect("PROGRAM's stamp line");
    let bound = mono.elapsed();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    let st = child.wait().expect("waiting for PROGRAM");
    assert!(st.success(), "PROGRAM {cmd:?} failed ({st}): {first}{rest}");
    let ns: u128 = first
        .strip_prefix("stamp ")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("PROGRAM printed {first:?}, not its stamp"));
    let since = wall.duration_since(UNIX_EPOCH).expect("clock").as_nanos();
    let took = Duration::from_nanos(ns.saturating_sub(since) as u64);
    assert!(
        ns >= since && took <= bound,
        "the realtime clock moved during a P7-exec sample: stamp {ns} ns, spawn at {since} ns, \
         {took:?} by it against {bound:?} by the monotonic clock; run again"
    );
    (took, rest, pid)
}

/// PROGRAM: this bench binary.
fn program() -> OsString {
    std::env::current_exe()
        .expect("the bench binary's path")
        .into_os_string()
}

/// The exec side: memplacectl exec with the region's fd.
fn through_ctl(agent: &AgentProc) -> Command {
    let mut cmd = Command::new(ctl_path());
    cmd.arg("--socket")
        .arg(agent.socket())
        .args(["exec", VM, "--region", NAME, "--"])
        .arg(program())
        .arg(format!("{{fd:{NAME}}}"));
    cmd
}

/// Waits until the agent has handled the exit of holder `pid` (the VMM memplacectl exec became):
/// its HOLDER_LOST event of [`VM`] after sequence `after`, which it records. The agent holds the
/// region's lock while it scans every process's open files for another holder, so that no sample
/// overlaps that work. Returns how long after the call the event was stored.
/// Fails naming the event after [`PATIENCE`].
async fn holder_exit_handled(c: &mut Client, pid: u32, after: &mut u64) -> Duration {
    let t = Instant::now();
    let want = format!("pid {pid} exited");
    loop {
        for e in stored_events(c, VM, *after).await {
            *after = e.sequence;
            if e.kind() == pb::EventKind::HolderLost && e.message.contains(&want) {
                return t.elapsed();
            }
        }
        assert!(
            t.elapsed() < PATIENCE,
            "waited {PATIENCE:?} for the agent's HOLDER_LOST event for pid {pid}, and it never came"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The sides of one P7-exec round.
struct Sides {
    plain: Series,
    exec: Series,
    health: Series,
    token: Series,
    list: Series,
    acquire: Series,
    /// PROGRAM's exit until the agent stored its HOLDER_LOST event.
    exit: Series,
    /// The last event sequence read.
    after: u64,
}

/// memplacectl exec's steps done by the bench on an open channel: IssueHandoffToken,
/// ListRegions, and a handoff connect + acquire (the bench is briefly the holder).
async fn steps(agent: &AgentProc, c: &mut Client) -> (Duration, Duration, Duration) {
    let t = Instant::now();
    let token = c.issue_handoff_token(VM).await.expect("IssueHandoffToken");
    let token_took = t.elapsed();
    let t = Instant::now();
    let listed = c.list_regions(VM).await.expect("ListRegions");
    let list_took = t.elapsed();
    assert!(listed.iter().any(|r| r.name == NAME), "{listed:?}");
    let socket = agent.handoff_socket();
    let (acquire_took, fd) = blocking(move || {
        let t = Instant::now();
        let got = Handoff::connect(&socket)
            .and_then(|h| h.acquire(VM, NAME, &token))
            .expect("handoff acquire");
        (t.elapsed(), got.fd)
    })
    .await;
    drop(fd);
    (token_took, list_took, acquire_took)
}

/// One round: plain spawn, memplacectl exec, memplacectl health and exec's steps in-process;
/// returns what PROGRAM under memplacectl exec was handed. Keeps the times when `keep`.
async fn round(agent: &AgentProc, c: &mut Client, size: u64, s: &mut Sides, keep: bool) -> String {
    let want = format!("/memfd:memplace:{VM}/{NAME} (deleted) {size}");
    let (p, _, _) = blocking(|| time_to_stamp(Command::new(program()))).await;
    let cmd = through_ctl(agent);
    let (e, rest, vmm) = blocking(move || time_to_stamp(cmd)).await;
    let exit = holder_exit_handled(c, vmm, &mut s.after).await;
    let fd_line = rest.lines().find(|l| l.starts_with("fd ")).unwrap_or("");
    assert!(
        fd_line.ends_with(&want),
        "P7-exec: WRONG: PROGRAM under memplacectl exec saw {fd_line:?}, not {want:?}"
    );
    let (h, _) = ctl_timed(agent, &["health"]);
    let (token, list, acquire) = steps(agent, c).await;
    if keep {
        s.plain.push_ms(p);
        s.exec.push_ms(e);
        s.health.push_ms(h);
        s.token.push_ms(token);
        s.list.push_ms(list);
        s.acquire.push_ms(acquire);
        s.exit.push_ms(exit);
    }
    fd_line.to_string()
}

/// P7-exec (see the module docs), on a memfd region of `size` (not populated: acquiring does not
/// touch pages).
pub(crate) async fn p7_exec(agent: &AgentProc, size: u64) -> Row {
    let mut c = agent.client().await;
    c.create_region(VM, NAME, size, pb::Backend::Memfd, vec![])
        .await
        .expect("CreateRegion");
    let mut s = Sides {
        plain: Series::new("plain spawn to PROGRAM's main", "ms"),
        exec: Series::new("memplacectl exec to PROGRAM's main", "ms"),
        health: Series::new("memplacectl health", "ms"),
        token: Series::new("IssueHandoffToken RPC", "ms"),
        list: Series::new("ListRegions RPC", "ms"),
        acquire: Series::new("handoff connect + acquire", "ms"),
        exit: Series::new("PROGRAM's exit to the agent's HOLDER_LOST event", "ms"),
        after: 0,
    };
    // The first round warms the page cache (both binaries) and is not kept.
    let mut handed = round(agent, &mut c, size, &mut s, false).await;
    for _ in 0..samples() {
        handed = round(agent, &mut c, size, &mut s, true).await;
    }
    let holder = c.get_region(VM, NAME).await.expect("GetRegion").holder_pid;
    let Sides {
        plain,
        exec,
        health,
        token,
        list,
        acquire,
        exit,
        ..
    } = s;
    Row {
        id: "P7-exec",
        what: format!("memplacectl exec on one {} memfd region, to PROGRAM's main", gib(size)),
        measured: exec.show(),
        against: format!("plain spawn {}", plain.show()),
        ratio: format!(
            "{}x; adds {} ms",
            num(exec.median() / plain.median()),
            num(exec.median() - plain.median())
        ),
        goal: NO_GOAL,
        met: true,
        notes: vec![
            "PROGRAM is the bench binary, which prints CLOCK_REALTIME as the first statement of main; timed from just before the bench spawns it (or memplacectl) to that reading, each sample bounded by the bench's monotonic clock".into(),
            format!(
                "where exec's time goes: memplacectl health (the CLI's process start, connect, one trivial RPC) {}; its steps done by the bench on an open channel: IssueHandoffToken {}, ListRegions {}, handoff connect + acquire {}",
                health.show(),
                token.show(),
                list.show(),
                acquire.show()
            ),
            format!(
                "after each exec'd PROGRAM exits the bench waits for the agent's HOLDER_LOST event before the next step, so no sample overlaps that work (the agent scans every process's open files for another holder, holding the region's lock): {} from PROGRAM's exit",
                exit.show()
            ),
            format!(
                "PROGRAM under memplacectl exec was handed `{handed}` (fd, file, size); the holder the agent recorded last is pid {holder} (the bench is {}: its own acquire came last)",
                std::process::id()
            ),
        ],
        series: vec![exec, plain, health, token, list, acquire, exit],
    }
}

// ---------------------------------------------------------------------------------------------
// P7-exec-qemu: the same with QEMU as PROGRAM, to the first line its guest prints.

/// Guest RAM of the QEMU side.
const QEMU_RAM: u64 = 256 * MIB;
const QEMU_NAME: &str = "qram";
/// How long QEMU may take to print SeaBIOS's first line before the bench fails.
const QEMU_LIMIT: Duration = Duration::from_secs(120);

/// QEMU (TCG, `pc`) on `memory` with SeaBIOS's debug console (port 0x402) on stdout.
fn qemu_args(memory: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "-accel",
        "tcg",
        "-display",
        "none",
        "-nodefaults",
        "-no-reboot",
        "-chardev",
        "stdio,id=bios",
        "-device",
        "isa-debugcon,iobase=0x402,chardev=bios",
        "-m",
        "256M",
        "-machine",
        "pc,memory-backend=m0",
        "-object",
    ]
    .map(String::from)
    .to_vec();
    a.push(memory.to_string());
    a
}

/// Spawns `cmd` (QEMU, or memplacectl exec of it), times until the first line on its stdout
/// (SeaBIOS's banner: the guest's first output), then kills it. Returns the time, the line and
/// the pid.
fn time_to_first_line(mut cmd: Command) -> (Duration, String, u32) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let t = Instant::now();
    let mut child = cmd.spawn().expect("spawning QEMU");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send((t.elapsed(), line));
    });
    let got = rx.recv_timeout(QEMU_LIMIT);
    let _ = child.kill();
    let st = child.wait();
    let (took, line) = got.unwrap_or_else(|_| {
        panic!("waited {QEMU_LIMIT:?} for QEMU's first debugcon line, and it never came ({st:?})")
    });
    assert!(
        line.starts_with("SeaBIOS"),
        "QEMU {cmd:?} printed {line:?} first, not SeaBIOS's banner ({st:?})"
    );
    (took, line, pid)
}

/// P7-exec-qemu: QEMU on a memfd of its own against QEMU through memplacectl exec on a region
/// of the same size, each to SeaBIOS's first line.
pub(crate) async fn p7_exec_qemu(agent: &AgentProc) -> Row {
    let mut c = agent.client().await;
    c.create_region(VM, QEMU_NAME, QEMU_RAM, pb::Backend::Memfd, vec![])
        .await
        .expect("CreateRegion");
    let mut plain = Series::new("QEMU, memory-backend-memfd, to SeaBIOS's banner", "ms");
    let mut exec = Series::new(
        "memplacectl exec QEMU, {path:qram}, to SeaBIOS's banner",
        "ms",
    );
    let own = format!("memory-backend-memfd,id=m0,size={QEMU_RAM},share=on");
    let region =
        format!("memory-backend-file,id=m0,size={QEMU_RAM},mem-path={{path:{QEMU_NAME}}},share=on");
    // The control: QEMU on a memory-backend-file of a memfd of the bench's, by path, as
    // memplacectl exec gives it one (only the file's owner differs).
    let mine = kernel::create_memfd("p7-control", QEMU_RAM, None).expect("memfd_create");
    let mine_path = format!("/proc/{}/fd/{}", std::process::id(), mine.as_raw_fd());
    let file = region.replace(&format!("{{path:{QEMU_NAME}}}"), &mine_path);
    let mut control = Series::new("QEMU, memory-backend-file of a memfd by path", "ms");
    let mut exited = Series::new("QEMU's exit to the agent's HOLDER_LOST event", "ms");
    let mut after = last_sequence(&mut c, VM).await;
    let mut banner = String::new();
    for i in 0..=samples() {
        let mut q = Command::new("qemu-system-x86_64");
        q.args(qemu_args(&own));
        let (p, _, _) = blocking(move || time_to_first_line(q)).await;
        let mut q = Command::new("qemu-system-x86_64");
        q.args(qemu_args(&file));
        let (f, _, _) = blocking(move || time_to_first_line(q)).await;
        let mut e = Command::new(ctl_path());
        e.arg("--socket")
            .arg(agent.socket())
            .args([
                "exec",
                VM,
                "--region",
                QEMU_NAME,
                "--",
                "qemu-system-x86_64",
            ])
            .args(qemu_args(&region));
        let (x, line, vmm) = blocking(move || time_to_first_line(e)).await;
        let exit = holder_exit_handled(&mut c, vmm, &mut after).await;
        banner = line.trim().to_string();
        if i > 0 {
            plain.push_ms(p);
            control.push_ms(f);
            exec.push_ms(x);
            exited.push_ms(exit);
        }
    }
    drop(mine);
    Row {
        id: "P7-exec-qemu",
        what: format!(
            "memplacectl exec of QEMU (TCG, pc, {}) to its guest's first output",
            gib(QEMU_RAM)
        ),
        measured: exec.show(),
        against: format!("QEMU on its own memfd {}", plain.show()),
        ratio: format!(
            "{}x; adds {} ms",
            num(exec.median() / plain.median()),
            num(exec.median() - plain.median())
        ),
        goal: NO_GOAL,
        met: true,
        notes: vec![
            format!(
                "from just before the spawn to the first line on QEMU's stdout, SeaBIOS's debug console (`{banner}`); QEMU is killed after it; every side reads the pipe the same way"
            ),
            format!(
                "control: QEMU with the exec side's memory-backend-file on a memfd of the bench's by path ({mine_path}), no memplacectl: {}; exec over it {}x, adds {} ms",
                control.show(),
                num(exec.median() / control.median()),
                num(exec.median() - control.median())
            ),
            format!(
                "after each QEMU under memplacectl exec is killed, the bench waits for the agent's HOLDER_LOST event: {} from its exit",
                exited.show()
            ),
        ],
        series: vec![exec, plain, control, exited],
    }
}
