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

use crate::common::{AgentProc, ctl_path};
use crate::p7_attach::ctl_timed;
use crate::report::*;
use memplace_client::pb;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
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
/// spawn to PROGRAM's stamp, and the rest of its output.
fn time_to_stamp(mut cmd: Command) -> (Duration, String) {
    cmd.env(STAMP, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let wall = SystemTime::now();
    let mono = Instant::now();
    let mut child = cmd.spawn().expect("spawning PROGRAM");
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
    (took, rest)
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

/// P7-exec (see the module docs), on a memfd region of `size` (not populated: acquiring does not
/// touch pages).
pub(crate) async fn p7_exec(agent: &AgentProc, size: u64) -> Row {
    let mut c = agent.client().await;
    c.create_region(VM, NAME, size, pb::Backend::Memfd, vec![])
        .await
        .expect("CreateRegion");
    let mut plain = Series::new("plain spawn to PROGRAM's main", "ms");
    let mut exec = Series::new("memplacectl exec to PROGRAM's main", "ms");
    let mut health = Series::new("memplacectl health", "ms");
    let want = format!("/memfd:memplace:{VM}/{NAME} (deleted) {size}");
    let mut handed = String::new();
    // The first round warms the page cache (both binaries) and is not kept.
    for i in 0..=samples() {
        let p = blocking(|| time_to_stamp(Command::new(program()))).await;
        let cmd = through_ctl(agent);
        let (e, rest) = blocking(move || time_to_stamp(cmd)).await;
        let fd_line = rest.lines().find(|l| l.starts_with("fd ")).unwrap_or("");
        assert!(
            fd_line.ends_with(&want),
            "P7-exec: WRONG: PROGRAM under memplacectl exec saw {fd_line:?}, not {want:?}"
        );
        handed = fd_line.to_string();
        let (h, _) = ctl_timed(agent, &["health"]);
        if i > 0 {
            plain.push_ms(p.0);
            exec.push_ms(e);
            health.push_ms(h);
        }
    }
    let holder = c.get_region(VM, NAME).await.expect("GetRegion").holder_pid;
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
                "memplacectl health (the CLI's process start, connect, one trivial RPC) {}; exec adds IssueHandoffToken, ListRegions, one handoff acquire and the exec of PROGRAM to that",
                health.show()
            ),
            format!(
                "PROGRAM under memplacectl exec was handed `{handed}` (fd, file, size); the agent's last recorded holder: pid {holder}"
            ),
        ],
        series: vec![exec, plain, health],
    }
}
