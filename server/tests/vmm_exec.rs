//! `memplacectl exec` against the real agent: a real VMM (Debian's QEMU 7.2 under TCG) runs a
//! guest on a region through three SIGKILLs of the agent, the fds and placeholders are checked
//! with a shell as PROGRAM, and bad input runs nothing.
//!
//! The QEMU test runs the first ```sh block of README.md's "Running VMs on memplace" section as
//! written, with `MEMPLACE_SOCKET`, `KERNEL` and `INITRD` set and `memplacectl` on PATH. The guest
//! is the Debian 6.12 cloud kernel (`tests/numa/fetch-kernels.sh`) with a busybox initramfs
//! (`tests/numa/build-initramfs.sh`) whose `/scenario.sh` is `tests/numa/ram-check.sh`: it writes
//! 32 MiB of random data into guest RAM and prints `RAMCHECK OK n` each time its checksum still
//! matches. The test fails, never skips, when QEMU, the kernel or busybox cannot be had, and its
//! waits have generous limits that only ever fail.

mod common;

use common::events::stored_events;
use common::lines::Lines;
use common::procfs::{alive, fds_like, file_id, parent_of};
use common::qemu::{lts_kernel, ram_check_initramfs};
use common::readme::first_sh_block;
use common::{AgentProc, MIB, Run, ctl_path, policy, whole};
use memplace_client::{Client, pb};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
/// Agent SIGKILLs while the guest runs.
const RESTARTS: usize = 3;
/// How long a wait for a guest line may take before the test fails. Only a failure waits this
/// long: a guest boots in seconds, but the machine may be busy.
const PATIENCE: Duration = Duration::from_secs(900);
/// What ram-check.sh writes into guest RAM.
const GUEST_DATA_MIB: u64 = 32;
const MEMFD_LINK: &str = "memfd:memplace:vm1/ram0";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// QEMU's output lines (common::lines::Lines); a guest check that failed fails the test at once.
struct Serial(Lines);

impl Serial {
    fn of(child: &mut Child) -> Serial {
        Serial(Lines::of(child))
    }

    fn tail(&self) -> String {
        self.0.tail(40)
    }

    /// A line just read: a guest check that failed fails the test.
    fn check(&self, line: &str) {
        assert!(
            !line.contains("RAMCHECK FAIL"),
            "the guest's RAM check failed:\n{}",
            self.tail()
        );
    }

    /// Reads every line already available.
    fn drain(&mut self) {
        while let Some(l) = self.0.try_next() {
            self.check(&l);
        }
    }

    /// Waits for a line that `want` accepts and returns it.
    fn wait(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.next_within(left) {
                Ok(l) => {
                    self.check(&l);
                    if want(&l) {
                        return l;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "no {what} within {} s; the last lines:\n{}",
                    PATIENCE.as_secs(),
                    self.tail()
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "QEMU's output ended before {what}; the last lines:\n{}",
                    self.tail()
                ),
            }
        }
    }

    /// The number of the newest `RAMCHECK OK n` line seen.
    fn last_ok(&self) -> u64 {
        self.0
            .seen
            .iter()
            .rev()
            .find_map(|l| ok_number(l))
            .unwrap_or(0)
    }
}

/// n of a `RAMCHECK OK n <md5>` line.
fn ok_number(line: &str) -> Option<u64> {
    let rest = &line[line.find("RAMCHECK OK ")? + "RAMCHECK OK ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Kills QEMU (and the shell around it) when the test ends, passed or not.
struct Reaper {
    shell: Child,
    qemu: Option<i32>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(pid) = self.qemu {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

/// Pages of the region mapped by QEMU, per /proc/PID/numa_maps (its one mapping of the file).
fn qemu_mapped_pages(pid: i32) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).expect("numa_maps");
    let lines: Vec<&str> = maps.lines().filter(|l| l.contains(MEMFD_LINK)).collect();
    assert_eq!(
        lines.len(),
        1,
        "QEMU should map the region once: {lines:#?}"
    );
    assert!(
        lines[0].contains("kernelpagesize_kB=4"),
        "4 KiB pages expected: {}",
        lines[0]
    );
    lines[0]
        .split_whitespace()
        .filter_map(|f| {
            let (k, v) = f.split_once('=')?;
            k.strip_prefix('N')?.parse::<u32>().ok()?;
            v.parse::<u64>().ok()
        })
        .sum()
}

/// The region is ACTIVE, held by QEMU, and the agent has the very file QEMU maps.
async fn assert_held_by_qemu(
    c: &mut Client,
    agent: &AgentProc,
    qemu: i32,
    qemu_fd: i32,
    when: &str,
) {
    let r = c.get_region("vm1", "ram0").await.expect("GetRegion");
    assert_eq!(r.status(), pb::RegionStatus::Active, "{when}: {r:?}");
    assert_eq!(r.holder_pid, qemu, "{when}: the holder must be QEMU: {r:?}");
    let qemu_file = file_id(qemu, qemu_fd);
    let agent_files = fds_like(agent.pid() as i32, MEMFD_LINK);
    assert!(
        !agent_files.is_empty() && agent_files.iter().all(|(_, id)| *id == qemu_file),
        "{when}: the agent's fds of the region {agent_files:?} must be QEMU's file {qemu_file:?}"
    );
}

/// GetPlacement counts the guest's pages: at least the data the guest wrote, all on node 0 as the
/// policy says (where the host has another node), and between two readings of QEMU's numa_maps taken around it (the guest keeps
/// running, so its page count can only grow in between).
async fn assert_placement_counts_the_guest(c: &mut Client, qemu: i32, when: &str) -> u64 {
    let before = qemu_mapped_pages(qemu);
    let p = c
        .placement("vm1", "ram0", 0, 0)
        .await
        .expect("GetPlacement");
    let after = qemu_mapped_pages(qemu);
    let present: u64 = p.nodes.iter().map(|n| n.pages).sum();
    assert!(
        present >= GUEST_DATA_MIB * MIB / PAGE,
        "{when}: {present} pages present, fewer than the guest's {GUEST_DATA_MIB} MiB of data: {p:?}"
    );
    assert!(
        before <= present && present <= after,
        "{when}: GetPlacement counts {present} pages, QEMU's numa_maps {before} before and {after} after"
    );
    // Which node holds the pages can only be wrong where a second node exists; on a one-node host
    // the 2-node guest's nested-QEMU checks prove it (numa_guest.rs, `nested-qemu-*`).
    if common::procfs::memory_node_count() > 1 {
        assert!(
            p.nodes.iter().all(|n| n.node == 0 || n.pages == 0),
            "{when}: bind:0 puts every page on node 0: {p:?}"
        );
    }
    assert_eq!(
        (p.pages_misplaced, p.pages_unknown),
        (0, 0),
        "{when}: {p:?}"
    );
    present
}

// ---------------------------------------------------------------------------------------------
// QEMU
// ---------------------------------------------------------------------------------------------

/// README's QEMU block: `memplacectl exec` starts QEMU on region vm1/ram0 with
/// `mem-path={path:ram0}`. QEMU is the process memplacectl was (the recorded holder), the guest
/// writes its data into the region's file, and through three SIGKILLs of the agent the file comes
/// back from QEMU each time, GetPlacement counts the guest's pages and the guest's checks keep
/// passing.
#[tokio::test(flavor = "multi_thread")]
async fn qemu_started_by_exec_keeps_its_guest_through_agent_sigkills() {
    let block = first_sh_block("## Running VMs on memplace");
    assert!(
        block.contains("memplacectl exec vm1") && block.contains("mem-path={path:ram0},share=on"),
        "README's first block should start QEMU with memplacectl exec:\n{block}"
    );
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmm-exec");
    std::fs::create_dir_all(&dir).expect("work dir");
    let kernel = lts_kernel();
    let initrd = ram_check_initramfs(&dir);

    let mut agent = AgentProc::start();
    let bin_dir = ctl_path().parent().expect("bin dir").to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut shell = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{block}"))
        .env("PATH", path)
        .env("MEMPLACE_SOCKET", agent.socket())
        .env("KERNEL", &kernel)
        .env("INITRD", &initrd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running README's QEMU block");
    let mut serial = Serial::of(&mut shell);
    let mut reaper = Reaper { shell, qemu: None };

    let marker = serial.wait("the guest's RAMCHECK MARKER line", |l| {
        l.contains("RAMCHECK MARKER ")
    });
    let marker = marker[marker.find("MEMPLACE-GUEST-RAM-").expect("marker text")..]
        .trim()
        .to_string();

    // QEMU is the process memplacectl exec'd into: the holder the agent recorded at the acquire.
    let mut c = agent.client().await;
    let qemu = c
        .get_region("vm1", "ram0")
        .await
        .expect("GetRegion")
        .holder_pid;
    assert!(qemu > 0, "no holder recorded");
    reaper.qemu = Some(qemu);
    let exe = std::fs::read_link(format!("/proc/{qemu}/exe")).expect("QEMU's exe");
    assert!(
        exe.ends_with("qemu-system-x86_64"),
        "the holder pid {qemu} runs {}, not QEMU",
        exe.display()
    );
    // memplacectl ran as the shell's child (or, when bash execs a script's last command, as the
    // shell's process itself) and exec'd QEMU without a fork in between.
    let shell = reaper.shell.id() as i32;
    assert!(
        qemu == shell || parent_of(qemu) == shell,
        "QEMU (pid {qemu}, parent {}) must be the process memplacectl was, the shell's ({shell}) \
         child or the shell itself",
        parent_of(qemu)
    );
    let cmdline = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let qemu_fd: i32 = cmdline
        .split("mem-path=/proc/self/fd/")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no mem-path=/proc/self/fd/N in QEMU's command line: {cmdline}"));
    let link = std::fs::read_link(format!("/proc/{qemu}/fd/{qemu_fd}")).expect("QEMU's fd");
    assert!(
        link.display().to_string().contains(MEMFD_LINK),
        "QEMU's fd {qemu_fd} is {}, not the region",
        link.display()
    );

    serial.wait("the guest's RAMCHECK WROTE line", |l| {
        l.contains("RAMCHECK WROTE ")
    });
    serial.wait("a first RAMCHECK OK line", |l| ok_number(l).is_some());

    // The guest's RAM is the region's file: the marker the guest wrote is in it.
    let mut file = std::fs::File::open(format!("/proc/{qemu}/fd/{qemu_fd}")).expect("the region");
    let mut found = false;
    let mut carry: Vec<u8> = vec![];
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf).expect("reading the region");
        if n == 0 {
            break;
        }
        carry.extend_from_slice(&buf[..n]);
        if carry.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            found = true;
            break;
        }
        carry.drain(..carry.len().saturating_sub(marker.len()));
    }
    assert!(
        found,
        "the guest's marker {marker} is not in the region's file"
    );

    assert_held_by_qemu(&mut c, &agent, qemu, qemu_fd, "before any restart").await;
    assert_placement_counts_the_guest(&mut c, qemu, "before any restart").await;

    for round in 1..=RESTARTS {
        let when = format!("restart {round}");
        let seq = stored_events(&mut c, "", 0)
            .await
            .last()
            .map_or(0, |e| e.sequence);
        serial.drain();
        agent.kill();
        assert!(alive(qemu), "{when}: QEMU died with the agent");
        agent.spawn();
        c = agent.client().await;

        let new = stored_events(&mut c, "", seq).await;
        let about: Vec<_> = new
            .iter()
            .filter(|e| e.vm_id == "vm1" && e.name == "ram0")
            .map(|e| (e.kind(), e.message.clone()))
            .collect();
        assert!(
            about.contains(&(
                pb::EventKind::FdRecovered,
                format!("fd taken back from holder pid {qemu}")
            )),
            "{when}: the agent must take the file back from QEMU, the recorded holder: {about:#?}"
        );
        assert_held_by_qemu(&mut c, &agent, qemu, qemu_fd, &when).await;
        let pages = assert_placement_counts_the_guest(&mut c, qemu, &when).await;

        // Two new checks after the restart, so at least one ran wholly after it.
        serial.drain();
        let last = serial.last_ok();
        let l = serial.wait(&format!("RAMCHECK OK {} after {when}", last + 2), |l| {
            ok_number(l).is_some_and(|n| n >= last + 2)
        });
        println!(
            "{when}: QEMU pid {qemu} holds the region again, {pages} pages placed, guest: {l}"
        );
    }
    assert!(alive(qemu), "QEMU must still run");
    let oks = serial
        .0
        .seen
        .iter()
        .filter(|l| ok_number(l).is_some())
        .count();
    assert!(oks > 2 * RESTARTS, "{oks} OK lines");
    drop(reaper);
}

// ---------------------------------------------------------------------------------------------
// Placeholders, fds and the holder
// ---------------------------------------------------------------------------------------------

/// The fds of this test process that a child inherits (no FD_CLOEXEC): the environment's, not
/// memplacectl's.
fn inherited_fds() -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc/self/fdinfo")
        .expect("fdinfo")
        .flatten()
    {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if flags & libc::O_CLOEXEC as u32 == 0 {
            out.insert(fd);
        }
    }
    out
}

/// What the shell PROGRAM of the fd test reports: its pid, its arguments and its fds (listed by a
/// child, `ls`, so the shell opens nothing of its own while they are read).
const REPORT: &str = r#"echo "pid $$"
for a in "$@"; do echo "arg $a"; done
ls -l "/proc/$$/fd""#;

struct Report {
    pid: u32,
    args: Vec<String>,
    fds: Vec<(i32, String)>,
}

fn report_of(out: &str) -> Report {
    let mut r = Report {
        pid: 0,
        args: vec![],
        fds: vec![],
    };
    for l in out.lines() {
        if let Some(p) = l.strip_prefix("pid ") {
            r.pid = p.parse().expect("pid");
        } else if let Some(a) = l.strip_prefix("arg ") {
            r.args.push(a.to_string());
        } else if let Some((name, target)) = l.split_once(" -> ") {
            // ls -l: "lrwx------ 1 root root 64 Nov 30 01:49 11 -> /memfd:... (deleted)"
            let n = name.split_whitespace().last().expect("fd name");
            r.fds.push((n.parse().expect("fd"), target.to_string()));
        }
    }
    r
}

/// Runs `memplacectl exec` with the REPORT shell as PROGRAM and returns its pid and report.
fn exec_report(agent: &AgentProc, exec_args: &[&str], args: &[&str]) -> (u32, Report) {
    let child = agent
        .ctl()
        .arg("exec")
        .args(exec_args)
        .args(["--", "sh", "-c", REPORT, "sh"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("memplacectl exec");
    let pid = child.id();
    let o = child.wait_with_output().expect("waiting for exec");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success(),
        "{}\nstdout: {out}\nstderr: {err}",
        o.status
    );
    (pid, report_of(&out))
}

/// `{fd:NAME}` and `{path:NAME}` become the acquired fds, open in PROGRAM, which runs in
/// memplacectl's own process and is recorded as each region's holder. memplacectl leaves no fd
/// of its own behind (its agent and handoff connections close at exec). `--region` selects.
#[tokio::test(flavor = "multi_thread")]
async fn exec_puts_the_region_fds_into_the_arguments_and_becomes_the_holder() {
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    for (name, size) in [("ram0", 8 * MIB), ("ram1", 4 * MIB)] {
        c.create_region("vmx", name, size, pb::Backend::Memfd, vec![])
            .await
            .expect("CreateRegion");
    }
    let inherited = inherited_fds();

    // Every region by default.
    let (pid, r) = exec_report(
        &agent,
        &["vmx"],
        &[
            "{fd:ram0}",
            "{path:ram1}",
            "x{fd:ram1}y",
            r#"{"qom-type":"x"}"#,
        ],
    );
    assert_eq!(r.pid, pid, "PROGRAM must run in memplacectl's own process");
    let fd_of = |name: &str| -> i32 {
        let want = format!("memfd:memplace:vmx/{name} ");
        let fds: Vec<i32> = r
            .fds
            .iter()
            .filter(|(_, t)| t.contains(&want))
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(
            fds.len(),
            1,
            "one fd of {name} expected in PROGRAM: {:?}",
            r.fds
        );
        fds[0]
    };
    let (f0, f1) = (fd_of("ram0"), fd_of("ram1"));
    assert_eq!(
        r.args,
        [
            f0.to_string(),
            format!("/proc/self/fd/{f1}"),
            format!("x{f1}y"),
            r#"{"qom-type":"x"}"#.to_string()
        ]
    );
    let strays: Vec<_> = r
        .fds
        .iter()
        .filter(|(n, _)| ![0, 1, 2, f0, f1].contains(n) && !inherited.contains(n))
        .collect();
    assert!(
        strays.is_empty(),
        "PROGRAM got fds beyond stdio and the regions: {strays:?}"
    );
    for name in ["ram0", "ram1"] {
        let g = c.get_region("vmx", name).await.expect("GetRegion");
        assert_eq!(g.holder_pid, pid as i32, "{name}: {g:?}");
    }

    // --region ram0: only ram0 is acquired; ram1 keeps its holder.
    let (pid2, r) = exec_report(&agent, &["vmx", "--region", "ram0"], &["{path:ram0}"]);
    assert_eq!(r.pid, pid2);
    let ram0: Vec<_> = r
        .fds
        .iter()
        .filter(|(_, t)| t.contains("vmx/ram0 "))
        .collect();
    assert_eq!(ram0.len(), 1, "{:?}", r.fds);
    assert_eq!(r.args, [format!("/proc/self/fd/{}", ram0[0].0)]);
    assert!(
        !r.fds.iter().any(|(_, t)| t.contains("vmx/ram1 ")),
        "ram1 was not asked for: {:?}",
        r.fds
    );
    assert_eq!(
        c.get_region("vmx", "ram0").await.unwrap().holder_pid,
        pid2 as i32
    );
    assert_eq!(
        c.get_region("vmx", "ram1").await.unwrap().holder_pid,
        pid as i32
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

/// A PROGRAM that creates `marker`, then the given arguments.
fn touching(marker: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "sh".to_string(),
        "-c".into(),
        r#"touch "$1""#.into(),
        "sh".into(),
        marker.display().to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// What a bad exec is, the arguments before `--`, PROGRAM and its arguments, the exit code and a
/// piece of the message.
type BadCase<'a> = (&'a str, Vec<&'a str>, Vec<String>, i32, &'a str);

fn exec_run(agent: &AgentProc, before: &[&str], program: &[String]) -> Run {
    Run::of(
        agent
            .ctl()
            .arg("exec")
            .args(before)
            .arg("--")
            .args(program)
            .stdin(Stdio::null()),
    )
}

/// Holders of a VM's regions, by name.
async fn holders(c: &mut Client, vm: &str) -> Vec<(String, i32)> {
    c.list_regions(vm)
        .await
        .expect("ListRegions")
        .into_iter()
        .map(|r| (r.name, r.holder_pid))
        .collect()
}

/// Unknown placeholders, unknown regions, a VM without regions, a LOST region, a refused
/// acquire, an unreachable handoff socket and a missing PROGRAM: each exits with its documented
/// code and a message, executes nothing (the marker PROGRAM would create stays absent) and, where
/// the check comes before the acquire, records no holder.
#[tokio::test(flavor = "multi_thread")]
async fn exec_refuses_bad_input_and_runs_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let marker = tmp.path().join("ran");
    let mut agent = AgentProc::start();
    let mut c = agent.client().await;
    for name in ["ram0", "ram1"] {
        c.create_region("vmb", name, 4 * MIB, pb::Backend::Memfd, vec![])
            .await
            .expect("CreateRegion");
    }
    let unheld = vec![("ram0".to_string(), 0), ("ram1".to_string(), 0)];

    // The control: the same PROGRAM does create the marker when the input is good.
    let r = exec_run(&agent, &["vmb"], &touching(&marker, &["{fd:ram0}"]));
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(marker.exists(), "the control run must create the marker");
    std::fs::remove_file(&marker).expect("rm marker");
    // A fresh VM for the refusals, so its regions have no holder.
    let mut regions = vec![];
    for name in ["ram0", "ram1"] {
        c.create_region("vmc", name, 4 * MIB, pb::Backend::Memfd, vec![])
            .await
            .expect("CreateRegion");
        regions.push(name);
    }

    let missing = "/nonexistent/memplace-test-program".to_string();
    let cases: Vec<BadCase> = vec![
        (
            "unknown placeholder",
            vec!["vmc"],
            touching(&marker, &["{size:ram0}"]),
            3,
            "unknown placeholder {size:ram0}",
        ),
        (
            "unclosed placeholder",
            vec!["vmc"],
            touching(&marker, &["mem-path={path:ram0"]),
            3,
            "no closing brace",
        ),
        (
            "placeholder of an unknown region",
            vec!["vmc"],
            touching(&marker, &["{path:nope}"]),
            3,
            r#"unknown placeholder {path:nope}: "nope" is not a region being acquired"#,
        ),
        (
            "placeholder of a region not selected",
            vec!["vmc", "--region", "ram0"],
            touching(&marker, &["{fd:ram1}"]),
            3,
            "add --region ram1",
        ),
        (
            "unknown region",
            vec!["vmc", "--region", "nope"],
            touching(&marker, &[]),
            4,
            r#"VM vmc has no region "nope" (its regions: ram0, ram1)"#,
        ),
        (
            "VM without regions",
            vec!["vm-empty"],
            touching(&marker, &[]),
            4,
            "VM vm-empty has no regions",
        ),
        (
            "bad VM id",
            vec!["bad/vm"],
            touching(&marker, &[]),
            10 + tonic::Code::InvalidArgument as i32,
            "vm_id",
        ),
        (
            "PROGRAM not found",
            vec!["vmc"],
            vec![missing.clone(), "{fd:ram0}".into()],
            127,
            "not found",
        ),
        (
            "unreachable handoff socket",
            vec!["vmc", "--handoff-socket", "/nonexistent/handoff.sock"],
            touching(&marker, &[]),
            1,
            "/nonexistent/handoff.sock",
        ),
    ];
    for (what, before, program, code, message) in &cases {
        let r = exec_run(&agent, before, program);
        assert_eq!(r.code, *code, "{what}: stderr {}\nstdout {}", r.err, r.out);
        assert!(
            r.err.starts_with("memplacectl exec: ") && r.err.contains(message),
            "{what}: {:?} should say {message:?}",
            r.err
        );
        assert!(!marker.exists(), "{what}: PROGRAM ran");
        assert_eq!(
            holders(&mut c, "vmc").await,
            unheld,
            "{what}: a holder was recorded"
        );
    }

    // A LOST region: held, then the holder dies while the agent is down.
    let token = c
        .create_region("vml", "gone", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .expect("CreateRegion")
        .handoff_token;
    let mut hold = agent
        .ctl()
        .args(["hold", "vml", "gone", "--touch", "1M", "--token", &token])
        .arg("--handoff-socket")
        .arg(agent.handoff_socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("hold");
    let line = Lines::of(&mut hold).wait_for("\"holding\" line", |_| true);
    assert!(line.starts_with("holding"), "{line}");
    agent.kill();
    hold.kill().expect("kill the holder");
    hold.wait().expect("reap the holder");
    agent.spawn();
    let mut c = agent.client().await;
    let g = c.get_region("vml", "gone").await.expect("GetRegion");
    assert_eq!(g.status(), pb::RegionStatus::Lost, "{g:?}");
    let r = exec_run(&agent, &["vml"], &touching(&marker, &["{fd:gone}"]));
    assert_eq!(r.code, 5, "LOST: {}", r.err);
    assert!(
        r.err.contains("region vml/gone is LOST") && r.err.contains("delete and recreate"),
        "{}",
        r.err
    );
    assert!(!marker.exists(), "LOST: PROGRAM ran");
    assert_eq!(holders(&mut c, "vmc").await, unheld);

    // A refused acquire: this uid may not use the handoff socket.
    let strict = AgentProc::start_with(&["--handoff-uids", "4242"]);
    let mut c = strict.client().await;
    c.create_region("vmr", "ram0", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .expect("CreateRegion");
    let r = exec_run(&strict, &["vmr"], &touching(&marker, &["{fd:ram0}"]));
    assert_eq!(r.code, 6, "refused acquire: {}", r.err);
    assert!(
        r.err.contains("acquiring vmr/ram0") && r.err.contains("PERMISSION_DENIED"),
        "{}",
        r.err
    );
    assert!(!marker.exists(), "refused acquire: PROGRAM ran");
    assert_eq!(
        holders(&mut c, "vmr").await,
        [("ram0".to_string(), 0)],
        "a refused acquire records no holder"
    );
}

/// `exec --help` documents the placeholders and every exit code.
#[test]
fn exec_help_documents_placeholders_and_exit_codes() {
    let o = Command::new(ctl_path())
        .args(["exec", "--help"])
        .output()
        .expect("memplacectl exec --help");
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for want in [
        "{fd:NAME}",
        "{path:NAME}",
        "/proc/self/fd/N",
        "mem-path={path:ram0},share=on",
        "--handoff-socket",
        "handoff.sock beside --socket",
        "host-nodes",
        "LOST",
    ] {
        assert!(help.contains(want), "exec --help lacks {want:?}:\n{help}");
    }
    for code in ["1 ", "2 ", "3 ", "4 ", "5 ", "6 ", "10+", "126", "127"] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(code)),
            "exec --help does not document exit code {code}:\n{help}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A VMM's own mbind on memplace memory
// ---------------------------------------------------------------------------------------------

/// QEMU's `host-nodes`/`policy` on a backend mbinds QEMU's own mapping, and on a shared file that
/// replaces memplace's shared policy for the range (README, "Running VMs on memplace"). memplace
/// must see it as drift (read from the kernel, before anything repairs it: periodic reconciles
/// are off), report it with an event naming the region and range, and the next Reconcile must
/// put its own policy back for every mapping of the file, QEMU's included. The witness is a
/// fresh mapping of QEMU's own fd, read with get_mempolicy. QEMU stays paused (`-S`): the
/// backend and its mbind are made at start, before any guest code would run.
#[tokio::test(flavor = "multi_thread")]
async fn qemu_host_nodes_on_a_region_is_drift_that_reconcile_repairs() {
    use memplace_server::domain::{NodeSet, Policy, PolicyMode};
    use memplace_server::kernel::mapping::Mapping;
    use std::os::fd::AsFd;

    let size = 64 * MIB;
    let agent = AgentProc::start_with(&["--reconcile-interval-secs", "0"]);
    let mut c = agent.client().await;
    c.create_region(
        "vm1",
        "ram0",
        size,
        pb::Backend::Memfd,
        whole(policy(pb::PolicyMode::Bind, &[0])),
    )
    .await
    .expect("CreateRegion");
    let start = stored_events(&mut c, "", 0)
        .await
        .last()
        .map_or(0, |e| e.sequence);

    let qemu_args: Vec<String> = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "none",
        "-m",
        "64M",
        "-object",
        "memory-backend-file,id=m0,size=64M,mem-path={path:ram0},share=on,host-nodes=0,policy=interleave",
        "-machine",
        "pc,memory-backend=m0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let shell = agent
        .ctl()
        .arg("exec")
        .arg("vm1")
        .arg("--")
        .args(&qemu_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("memplacectl exec");
    let qemu = shell.id() as i32;
    let _reaper = Reaper {
        shell,
        qemu: Some(qemu),
    };

    // Wait until QEMU (the process memplacectl became) has mapped the region; QEMU makes the
    // backend and calls mbind on it before it maps anything else of the guest.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let exe = std::fs::read_link(format!("/proc/{qemu}/exe")).ok();
        let maps = std::fs::read_to_string(format!("/proc/{qemu}/maps")).unwrap_or_default();
        let numa = std::fs::read_to_string(format!("/proc/{qemu}/numa_maps")).unwrap_or_default();
        if exe.is_some_and(|e| e.ends_with("qemu-system-x86_64"))
            && maps.contains(MEMFD_LINK)
            && numa
                .lines()
                .any(|l| l.contains("memplace:vm1/ram0") && l.contains("interleave"))
        {
            break;
        }
        assert!(
            alive(qemu),
            "QEMU (pid {qemu}) died before mapping the region"
        );
        assert!(
            Instant::now() < deadline,
            "QEMU never mapped the region with its interleave policy:\n{maps}\n{numa}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (qemu_fd, _) = *fds_like(qemu, MEMFD_LINK)
        .first()
        .expect("QEMU holds the region's fd");
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/{qemu}/fd/{qemu_fd}"))
        .expect("QEMU's fd");
    let bind0 = Policy::new(PolicyMode::Bind, NodeSet::from_ids([0]).unwrap());
    let interleave0 = Policy::new(PolicyMode::Interleave, NodeSet::from_ids([0]).unwrap());
    let fresh = |offset: u64| {
        Mapping::new(file.as_fd(), size)
            .expect("a fresh mapping of QEMU's fd")
            .policy_at(offset)
            .expect("get_mempolicy")
    };
    // The kernel: QEMU replaced memplace's policy on the file, for every mapping of it.
    assert_eq!(
        fresh(0),
        Some(interleave0),
        "QEMU's mbind did not reach the file"
    );
    assert_eq!(fresh(size - PAGE), Some(interleave0));

    // The agent sees it from the kernel when asked to read now, with no reconcile yet.
    let r = c
        .get_region_with("vm1", "ram0", true)
        .await
        .expect("GetRegion");
    assert_eq!(r.holder_pid, qemu, "{r:?}");
    assert_eq!(r.ranges[0].state(), pb::RangeState::Drifted, "{r:?}");
    assert_eq!(
        r.ranges[0].observed,
        Some(common::policy(pb::PolicyMode::Interleave, &[0])),
        "{r:?}"
    );

    let rep = c.reconcile("vm1").await.expect("Reconcile");
    assert_eq!(
        (rep.ranges_drifted, rep.ranges_reapplied, rep.ranges_failed),
        (1, 1, 0),
        "{rep:?}"
    );
    let evs = stored_events(&mut c, "", start).await;
    let drift = evs
        .iter()
        .find(|e| e.kind() == pb::EventKind::DriftFound)
        .unwrap_or_else(|| panic!("no drift event: {evs:?}"));
    assert_eq!((drift.vm_id.as_str(), drift.name.as_str()), ("vm1", "ram0"));
    assert!(
        drift.message.contains("[0x0, 0x4000000)") && drift.message.contains("interleave"),
        "the event names the range and QEMU's policy: {}",
        drift.message
    );
    // Repaired for QEMU's mapping too: a fresh mapping of QEMU's fd reads memplace's policy.
    assert_eq!(fresh(0), Some(bind0), "not repaired");
    assert_eq!(fresh(size / 2), Some(bind0));
    assert_eq!(fresh(size - PAGE), Some(bind0));
    let r = c
        .get_region_with("vm1", "ram0", true)
        .await
        .expect("GetRegion");
    assert_eq!(r.ranges[0].state(), pb::RangeState::Applied, "{r:?}");
    assert!(alive(qemu), "QEMU died");
}

/// README's two-node block, run as written (with `HOST_NODE_1=0`: this host has one node): QEMU
/// starts with two guest NUMA nodes, one backend per region, holds both regions, and each
/// backend fd is its region's file with the region's policy (read through a fresh mapping of
/// QEMU's own fd).
#[tokio::test(flavor = "multi_thread")]
async fn readme_two_node_topology_runs_qemu_on_two_regions() {
    use memplace_server::domain::{NodeSet, Policy, PolicyMode};
    use memplace_server::kernel::mapping::Mapping;
    use std::os::fd::AsFd;

    let block = first_sh_block("### Two guest NUMA nodes on two regions");
    assert!(
        block.contains("memdev=m1") && block.contains("{path:ram1}"),
        "README's two-node block:\n{block}"
    );
    let agent = AgentProc::start();
    let bin_dir = ctl_path().parent().expect("bin dir").to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let shell = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{block}"))
        .env("PATH", path)
        .env("MEMPLACE_SOCKET", agent.socket())
        .env("HOST_NODE_1", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running README's two-node block");
    let mut reaper = Reaper { shell, qemu: None };
    let mut c = agent.client().await;

    // Both regions are held by one process, and that process is QEMU with both regions mapped.
    let deadline = Instant::now() + PATIENCE;
    let qemu = loop {
        let held = holders(&mut c, "vm2").await;
        if held.len() == 2 && held[0].1 > 0 && held[0].1 == held[1].1 {
            let pid = held[0].1;
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            if exe.is_some_and(|e| e.ends_with("qemu-system-x86_64"))
                && maps.contains("memplace:vm2/ram0")
                && maps.contains("memplace:vm2/ram1")
            {
                break pid;
            }
        }
        if let Ok(Some(status)) = reaper.shell.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = reaper.shell.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("the block ended ({status}) before QEMU ran on both regions:\n{err}");
        }
        assert!(
            Instant::now() < deadline,
            "QEMU never held and mapped both regions: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    reaper.qemu = Some(qemu);
    let numa = std::fs::read_to_string(format!("/proc/{qemu}/cmdline"))
        .expect("cmdline")
        .replace('\0', " ");
    assert!(
        numa.contains("node,nodeid=1,cpus=1,memdev=m1"),
        "QEMU runs without the second guest node: {numa}"
    );
    let bind0 = Policy::new(PolicyMode::Bind, NodeSet::from_ids([0]).unwrap());
    let mut seen = BTreeSet::new();
    for name in ["ram0", "ram1"] {
        // The fd exec passed, and QEMU's own open() of /proc/self/fd/N: one file.
        let fds = fds_like(qemu, &format!("memfd:memplace:vm2/{name}"));
        assert!(!fds.is_empty(), "QEMU does not hold {name}");
        assert!(
            fds.iter().all(|(_, id)| *id == fds[0].1),
            "QEMU holds two different files named {name}: {fds:?}"
        );
        assert!(seen.insert(fds[0].1), "ram0 and ram1 are one file: {fds:?}");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .open(format!("/proc/{qemu}/fd/{}", fds[0].0))
            .expect("QEMU's fd");
        let fresh = Mapping::new(file.as_fd(), 128 * MIB).expect("a fresh mapping");
        assert_eq!(fresh.policy_at(0).unwrap(), Some(bind0), "{name}");
        assert_eq!(
            fresh.policy_at(128 * MIB - PAGE).unwrap(),
            Some(bind0),
            "{name}"
        );
        let r = c.get_region("vm2", name).await.expect("GetRegion");
        assert_eq!(r.holder_pid, qemu, "{r:?}");
        assert_eq!(r.ranges[0].state(), pb::RangeState::Applied, "{r:?}");
    }
}
