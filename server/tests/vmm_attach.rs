//! AttachProcess against real QEMU (Debian's qemu-system-x86_64, TCG): a VM started on its own
//! `memory-backend-memfd,share=on` is attached by pid while its guest runs, and from then on the
//! region is memplace's like any other: SetPolicy binds QEMU's file (read back through a fresh
//! mapping of QEMU's own fd), GetPlacement counts the guest's pages, Populate, Reconcile and
//! WatchEvents work, and after an agent SIGKILL the region comes back ACTIVE, held by QEMU, with
//! the guest's own data checks still passing. Bad pids and QEMU without shared memory are refused
//! with a clear error and change nothing.
//!
//! The guest is Debian's 6.12 cloud kernel (tests/numa/fetch-kernels.sh, cached) and the busybox
//! initramfs of tests/numa/build-initramfs.sh whose /scenario.sh is tests/numa/ram-check.sh (as in
//! vmm_exec.rs): it writes random data into guest RAM and checks its md5 every few seconds on the
//! serial console. These tests fail, never skip, when QEMU or the kernel cannot be had.

mod common;

use common::events::stored_events;
use common::holder::HolderProc;
use common::procfs::{holds_inode, node_meminfo};
use common::qemu::{lts_kernel, ram_check_initramfs};
use common::sqlite;
use common::{AgentProc, MIB, ctl_path, policy, standin_path};
use memplace_client::pb;
use memplace_server::domain::{NodeSet, Policy, PolicyMode};
use memplace_server::kernel::Mapping;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

const GUEST_MB: u64 = 128;
/// Upper bound for a TCG boot on a busy machine; a boot that takes longer fails the test.
const BOOT_LIMIT: Duration = Duration::from_secs(600);

/// What the guest (tests/numa/ram-check.sh) writes into its RAM and keeps checking.
const GUEST_DATA_MIB: u64 = 24;

/// A QEMU process, killed on drop.
struct Qemu {
    child: Child,
    serial: PathBuf,
}

impl Qemu {
    fn start(args: &[&str], serial: PathBuf) -> Self {
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-display",
                "none",
                "-nodefaults",
                "-no-reboot",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("qemu-system-x86_64 (installed by .ci/test)");
        Qemu { child, serial }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits for a serial line starting with `prefix` (QEMU must keep running).
    fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) {
        let t = Instant::now();
        loop {
            let text = self.serial_text();
            if text.lines().any(&pred) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("QEMU exited ({st}) before {what}; serial:\n{text}");
            }
            assert!(
                t.elapsed() < BOOT_LIMIT,
                "no {what} within {BOOT_LIMIT:?}; serial:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Counts of the guest's good and bad checks so far.
    fn checks(&self) -> (usize, usize) {
        let text = self.serial_text();
        let ok = text
            .lines()
            .filter(|l| l.starts_with("RAMCHECK OK "))
            .count();
        let bad = text
            .lines()
            .filter(|l| l.starts_with("RAMCHECK FAIL "))
            .count();
        (ok, bad)
    }

    /// Waits until the guest has passed two more checks than `after`, and none failed.
    fn checks_keep_passing(&mut self, after: usize, when: &str) -> usize {
        let t = Instant::now();
        loop {
            let (ok, bad) = self.checks();
            assert_eq!(bad, 0, "{when}: the guest's data check failed");
            if ok >= after + 2 {
                return ok;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{when}: QEMU exited ({st}); serial:\n{}",
                    self.serial_text()
                );
            }
            assert!(
                t.elapsed() < BOOT_LIMIT,
                "{when}: the guest stopped checking; serial:\n{}",
                self.serial_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// QEMU started paused (-S) with a QMP socket; returns once QMP answered a command, which the
/// main loop handles only after the machine and its memory backends exist.
fn paused_qemu(dir: &Path, memory: &[&str]) -> Qemu {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let qmp = dir.join(format!("qmp-{n}.sock"));
    let _ = std::fs::remove_file(&qmp);
    let chardev = format!("unix:{},server=on,wait=off", qmp.display());
    let mut args = vec!["-S", "-qmp", &chardev, "-serial", "none"];
    args.extend_from_slice(memory);
    let mut q = Qemu::start(&args, dir.join("none"));
    let t = Instant::now();
    let stream = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&qmp) {
            break s;
        }
        if let Ok(Some(st)) = q.child.try_wait() {
            panic!("QEMU {memory:?} exited early: {st}");
        }
        assert!(t.elapsed() < BOOT_LIMIT, "QEMU opened no QMP socket");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Each read fails (naming what it waited for) rather than hang on a silent QMP.
    stream
        .set_read_timeout(Some(BOOT_LIMIT))
        .expect("a read timeout on QMP");
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    let mut read = |line: &mut String, what: &str| {
        let n = r.read_line(line).unwrap_or_else(|e| {
            panic!("QEMU {memory:?}: no {what} on QMP within {BOOT_LIMIT:?}: {e}")
        });
        assert!(n > 0, "QEMU {memory:?}: QMP closed before {what}");
    };
    read(&mut line, "greeting");
    for cmd in ["qmp_capabilities", "query-status"] {
        writeln!(w, "{{\"execute\":\"{cmd}\"}}").unwrap();
        loop {
            line.clear();
            read(&mut line, &format!("answer to {cmd}"));
            if line.contains("\"return\"") {
                break;
            }
        }
    }
    q
}

/// The fd number in `pid` of its memfd named `name`.
fn memfd_fd_of(pid: i32, name: &str) -> String {
    let want = format!("/memfd:{name} (deleted)");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy() == want)
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("pid {pid} holds no memfd {name}"))
        .file_name()
        .into_string()
        .unwrap()
}

/// The shared policy of QEMU's file at its first and last page, read through a mapping made now
/// of QEMU's own fd (through /proc/PID/fd/N: the same file, a new open, a new VMA).
fn policy_through_fresh_mapping(pid: i32, fd: &str, size: u64) -> (Option<Policy>, Option<Policy>) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .expect("opening QEMU's memfd");
    let m = Mapping::new(f.as_fd(), size).expect("mapping QEMU's memfd");
    (m.policy_at(0).unwrap(), m.policy_at(size - 4096).unwrap())
}

fn bind0() -> Policy {
    let mut n = NodeSet::new();
    n.insert(0).unwrap();
    Policy::new(PolicyMode::Bind, n)
}

fn ctl(agent: &AgentProc, args: &[&str]) -> Output {
    agent.ctl().args(args).output().expect("memplacectl")
}

fn code_of(o: &Output) -> i32 {
    o.status.code().expect("memplacectl exited by signal")
}

/// Row counts read by the sqlite3 CLI: requests, regions, ranges, events.
fn db_state(agent: &AgentProc) -> String {
    sqlite::query(
        &agent.state_dir().join("memplace.db"),
        &[],
        "SELECT (SELECT count(*) FROM requests), (SELECT count(*) FROM regions), (SELECT count(*) FROM ranges), (SELECT count(*) FROM events);",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_qemu_is_attached_placed_and_recovered() {
    let kernel = lts_kernel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = ram_check_initramfs(dir.path());
    let serial = dir.path().join("serial.log");
    let mem = format!("memory-backend-memfd,id=m0,size={GUEST_MB}M,share=on");
    let serial_arg = format!("file:{}", serial.display());
    let append = format!("console=ttyS0 quiet panic=-1 memplace.ramcheck_mb={GUEST_DATA_MIB}");
    let mut qemu = Qemu::start(
        &[
            "-m",
            &format!("{GUEST_MB}M"),
            "-object",
            &mem,
            "-machine",
            "memory-backend=m0",
            "-kernel",
            kernel.to_str().unwrap(),
            "-initrd",
            initrd.to_str().unwrap(),
            "-append",
            &append,
            "-serial",
            &serial_arg,
        ],
        serial,
    );
    qemu.wait_line("RAMCHECK WROTE", |l| l.starts_with("RAMCHECK WROTE "));
    let qpid = qemu.pid();
    let size = GUEST_MB * MIB;

    let mut agent = AgentProc::start();
    let mut c = agent.client().await;

    // Attach by pid with the CLI.
    let o = ctl(
        &agent,
        &["-o", "json", "attach", "vm1", "--pid", &qpid.to_string()],
    );
    assert_eq!(code_of(&o), 0, "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let regions = v["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 1, "{v}");
    let r = &regions[0];
    // Named after QEMU's backend id, the machine's only backend: guest cell 0.
    assert_eq!(r["name"], "m0", "{v}");
    assert_eq!(r["guest_cell"], 0, "{v}");
    assert_eq!(r["backend"], "memfd", "{v}");
    assert_eq!(r["size_bytes"], size, "{v}");
    assert_eq!(r["holder_pid"], qpid, "{v}");
    assert_eq!(r["status"], "active", "{v}");
    let name = "m0";
    let uid = c.get_region("vm1", name).await.unwrap().uid;

    // The same file again is the same region; a request id answers the same way twice.
    let again = c.attach_process("vm1", qpid).await.unwrap();
    assert_eq!(again.regions.len(), 1);
    assert_eq!(again.regions[0].uid, uid);
    let req = pb::AttachProcessRequest {
        vm_id: "vm1".into(),
        pid: qpid,
        request_id: "attach-1".into(),
    };
    let first = c
        .raw()
        .attach_process(req.clone())
        .await
        .unwrap()
        .into_inner();
    let second = c
        .raw()
        .attach_process(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second);
    let reused = c
        .raw()
        .attach_process(pb::AttachProcessRequest {
            vm_id: "vm2".into(),
            ..req
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    // The file belongs to vm1: another VM cannot take it.
    let other = c.attach_process("vm2", qpid).await.unwrap_err();
    assert_eq!(other.code(), Some(Code::FailedPrecondition), "{other:?}");
    assert_eq!(c.list_regions("").await.unwrap().len(), 1);

    // GetPlacement counts the guest's pages (it wrote GUEST_DATA_MIB of data plus its kernel).
    let p = c.placement("vm1", name, 0, 0).await.unwrap();
    let present: u64 = p.nodes.iter().map(|n| n.pages).sum();
    assert!(
        present >= GUEST_DATA_MIB * MIB / 4096,
        "only {present} pages present: {p:?}"
    );

    // SetPolicy binds QEMU's file: read through a fresh mapping of QEMU's own fd.
    let fd = memfd_fd_of(qpid, "memory-backend-memfd");
    let before = policy_through_fresh_mapping(qpid, &fd, size);
    assert_eq!(before, (Some(Policy::DEFAULT), Some(Policy::DEFAULT)));
    c.set_policy("vm1", name, 0, 0, policy(pb::PolicyMode::Bind, &[0]), true)
        .await
        .unwrap();
    assert_eq!(
        policy_through_fresh_mapping(qpid, &fd, size),
        (Some(bind0()), Some(bind0()))
    );

    // Populate the rest of the guest's RAM on node 0; nothing is left unallocated or misplaced.
    let summary = c
        .populate(
            pb::PopulateRequest {
                vm_id: "vm1".into(),
                name: name.into(),
                verify: true,
                ..Default::default()
            },
            |_, _| {},
        )
        .await
        .unwrap();
    assert_eq!(summary.bytes_done, size, "{summary:?}");
    let p = c.placement("vm1", name, 0, 0).await.unwrap();
    assert_eq!(p.pages_not_present, 0, "{p:?}");
    assert_eq!(p.pages_misplaced, 0, "{p:?}");
    assert_eq!(
        p.nodes,
        vec![pb::NodePages {
            node: 0,
            pages: size / 4096
        }]
    );

    // Someone else's mbind on the file (as QEMU's host-nodes would do) is drift, and repaired.
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{qpid}/fd/{fd}"))
            .unwrap();
        let m = Mapping::new(f.as_fd(), size).unwrap();
        let mut n = NodeSet::new();
        n.insert(0).unwrap();
        m.mbind(0, size, &Policy::new(PolicyMode::Preferred, n), 0)
            .unwrap();
    }
    let (first_page, _) = policy_through_fresh_mapping(qpid, &fd, size);
    assert_eq!(first_page.map(|p| p.mode), Some(PolicyMode::Preferred));
    let rec = c.reconcile("vm1").await.unwrap();
    assert_eq!(
        (rec.ranges_drifted, rec.ranges_reapplied),
        (1, 1),
        "{rec:?}"
    );
    assert_eq!(
        policy_through_fresh_mapping(qpid, &fd, size),
        (Some(bind0()), Some(bind0()))
    );

    let seen = qemu.checks_keep_passing(qemu.checks().0, "after attach");

    // SIGKILL the agent: the restarted agent takes QEMU's file back and the binding holds.
    agent.restart();
    let mut c = agent.client().await;
    let r = c.get_region("vm1", name).await.unwrap();
    assert_eq!(r.status(), pb::RegionStatus::Active, "{r:?}");
    assert_eq!(r.holder_pid, qpid, "{r:?}");
    assert_eq!(r.uid, uid);
    assert!(
        r.ranges
            .iter()
            .all(|x| x.state() == pb::RangeState::Applied),
        "{r:?}"
    );
    assert_eq!(
        policy_through_fresh_mapping(qpid, &fd, size),
        (Some(bind0()), Some(bind0()))
    );
    // The agent holds QEMU's file itself again: an fd of the same inode.
    let qemu_ino = std::fs::metadata(format!("/proc/{qpid}/fd/{fd}"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let agent_holds = std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
        .unwrap()
        .flatten()
        .any(|e| {
            std::fs::metadata(e.path())
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m) == qemu_ino)
                .unwrap_or(false)
        });
    assert!(
        agent_holds,
        "the restarted agent holds no fd of QEMU's file"
    );
    let p = c.placement("vm1", name, 0, 0).await.unwrap();
    assert_eq!(
        p.nodes,
        vec![pb::NodePages {
            node: 0,
            pages: size / 4096
        }]
    );

    let evs = stored_events(&mut c, "vm1", 0).await;
    let kinds: Vec<pb::EventKind> = evs.iter().map(|e| e.kind()).collect();
    let adopted = evs
        .iter()
        .find(|e| e.kind() == pb::EventKind::RegionAdopted)
        .unwrap_or_else(|| panic!("no attach event: {evs:#?}"));
    assert!(
        adopted.message.contains(&format!("from pid {qpid}")),
        "{adopted:?}"
    );
    for k in [
        pb::EventKind::PolicyApplied,
        pb::EventKind::Populated,
        pb::EventKind::DriftFound,
        pb::EventKind::Reapplied,
        pb::EventKind::FdRecovered,
    ] {
        assert!(kinds.contains(&k), "no {k:?} event: {kinds:?}");
    }
    qemu.checks_keep_passing(seen, "after the agent restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_pids_and_qemu_without_shared_memory_change_nothing() {
    const VIEWER: u32 = 65533;
    let agent = AgentProc::start_with(&["--socket-mode", "0666", "--viewer-uids", "65533"]);
    for d in [agent.dir.path(), &agent.runtime_dir()] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let mut c = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let anon = paused_qemu(dir.path(), &["-m", "64M"]);
    let private = paused_qemu(
        dir.path(),
        &[
            "-m",
            "64M",
            "-object",
            "memory-backend-memfd,id=m0,size=64M,share=off",
            "-machine",
            "memory-backend=m0",
        ],
    );
    let shared = paused_qemu(
        dir.path(),
        &[
            "-m",
            "64M",
            "-object",
            "memory-backend-memfd,id=m0,size=64M,share=on",
            "-machine",
            "memory-backend=m0",
        ],
    );
    let mut sleeper = Command::new("sleep").arg("1000").spawn().unwrap();
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id() as i32;
    dead.wait().unwrap();
    let pid_max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let apid = agent.pid() as i32;
    let thread = std::fs::read_dir(format!("/proc/{apid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|&t| t != apid)
        .expect("the agent has threads");

    let baseline = db_state(&agent);
    let cases: Vec<(&str, &str, i32, Code, &str)> = vec![
        ("pid 0", "vm1", 0, Code::InvalidArgument, "positive"),
        ("negative pid", "vm1", -4, Code::InvalidArgument, "positive"),
        ("pid 1", "vm1", 1, Code::InvalidArgument, "init"),
        (
            "the agent",
            "vm1",
            apid,
            Code::InvalidArgument,
            "agent itself",
        ),
        (
            "an agent thread",
            "vm1",
            thread,
            Code::InvalidArgument,
            "thread",
        ),
        (
            "a dead pid",
            "vm1",
            dead_pid,
            Code::NotFound,
            "no running process",
        ),
        (
            "an unknown pid",
            "vm1",
            pid_max + 1,
            Code::NotFound,
            "no running process",
        ),
        (
            "not a VMM",
            "vm1",
            sleeper.id() as i32,
            Code::FailedPrecondition,
            "no shared guest memory",
        ),
        (
            "QEMU with -m RAM",
            "vm1",
            anon.pid(),
            Code::FailedPrecondition,
            "share=on",
        ),
        (
            "QEMU with share=off",
            "vm1",
            private.pid(),
            Code::FailedPrecondition,
            "only privately",
        ),
        (
            "a bad vm_id",
            "vm/1",
            shared.pid(),
            Code::InvalidArgument,
            "vm_id",
        ),
    ];
    for (what, vm, pid, code, text) in cases {
        let e = c
            .raw()
            .attach_process(pb::AttachProcessRequest {
                vm_id: vm.into(),
                pid,
                request_id: format!("bad-{pid}"),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(e.message().contains(text), "{what}: {e:?}");
        assert_eq!(db_state(&agent), baseline, "{what} changed the state");
        assert!(c.list_regions("").await.unwrap().is_empty(), "{what}");
    }
    // The CLI exits 10 + the code, with the agent's message.
    for (pid, exit, text) in [
        (1, 13, "init"),
        (dead_pid, 15, "no running process"),
        (anon.pid(), 19, "memory-backend-memfd"),
    ] {
        let o = ctl(&agent, &["attach", "vm1", "--pid", &pid.to_string()]);
        assert_eq!(code_of(&o), exit, "{o:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(text), "{o:?}");
    }
    // Only admins may attach: a viewer is refused, even for a real VMM.
    let o = Command::new(ctl_path())
        .arg("--socket")
        .arg(agent.socket())
        .args(["attach", "vm1", "--pid", &shared.pid().to_string()])
        .uid(VIEWER)
        .gid(VIEWER)
        .output()
        .unwrap();
    assert_eq!(code_of(&o), 10 + Code::PermissionDenied as i32, "{o:?}");
    assert_eq!(db_state(&agent), baseline, "the viewer changed the state");
    assert!(c.list_regions("").await.unwrap().is_empty());
    // The help documents the errors.
    let o = ctl(&agent, &["attach", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    for word in [
        "share=on",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "gmem0",
        "host-nodes",
    ] {
        assert!(help.contains(word), "attach --help lacks {word}: {help}");
    }
    // And the shared one is attached.
    let r = c.attach_process("vm1", shared.pid()).await.unwrap();
    assert_eq!(r.regions.len(), 1, "{r:?}");
    assert_eq!(r.regions[0].size_bytes, 64 * MIB);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

const GMEM: u64 = 4 * MIB;

/// Attach changes nothing nobody asked for: QEMU bound its own backend (`host-nodes=0,
/// policy=bind`, as libvirt's `<numatune>` makes it do), so the attached region's intent is BIND 0
/// from the start, an event says what was kept, and two reconciles leave the file bound (read
/// through a fresh mapping of QEMU's own fd). Then SetPolicy, and only SetPolicy, changes it.
#[tokio::test(flavor = "multi_thread")]
async fn attach_keeps_the_placement_qemu_set() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let qemu = paused_qemu(
        dir.path(),
        &[
            "-m",
            "64M",
            "-object",
            "memory-backend-memfd,id=m0,size=64M,share=on,host-nodes=0,policy=bind",
            "-machine",
            "memory-backend=m0",
        ],
    );
    let qpid = qemu.pid();
    let fd = memfd_fd_of(qpid, "memory-backend-memfd");
    assert_eq!(
        policy_through_fresh_mapping(qpid, &fd, size),
        (Some(bind0()), Some(bind0())),
        "QEMU did not bind its backend"
    );
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    let a = c.attach_process("vm1", qpid).await.unwrap();
    assert_eq!(a.regions.len(), 1, "{a:?}");
    let name = a.regions[0].name.clone();
    let bind = policy(pb::PolicyMode::Bind, &[0]);
    let r = c.get_region("vm1", &name).await.unwrap();
    assert_eq!(r.ranges.len(), 1, "{r:?}");
    assert_eq!(r.ranges[0].intended.as_ref(), Some(&bind), "{r:?}");
    assert_eq!(r.ranges[0].state(), pb::RangeState::Applied, "{r:?}");
    let evs = stored_events(&mut c, "vm1", 0).await;
    let adopted = evs
        .iter()
        .find(|e| e.kind() == pb::EventKind::RegionAdopted)
        .unwrap_or_else(|| panic!("no attach event: {evs:#?}"));
    assert!(
        adopted
            .message
            .contains("kept the kernel's placement as intent: [0x0, 0x4000000) bind"),
        "{adopted:?}"
    );
    for pass in 1..=2 {
        let rec = c.reconcile("vm1").await.unwrap();
        assert_eq!(
            (rec.ranges_drifted, rec.ranges_reapplied),
            (0, 1),
            "pass {pass}: {rec:?}"
        );
        assert_eq!(
            policy_through_fresh_mapping(qpid, &fd, size),
            (Some(bind0()), Some(bind0())),
            "pass {pass}"
        );
    }
    c.set_policy(
        "vm1",
        &name,
        0,
        0,
        policy(pb::PolicyMode::Preferred, &[0]),
        false,
    )
    .await
    .unwrap();
    let (first, last) = policy_through_fresh_mapping(qpid, &fd, size);
    assert_eq!(
        (first.map(|p| p.mode), last.map(|p| p.mode)),
        (Some(PolicyMode::Preferred), Some(PolicyMode::Preferred))
    );
    c.reconcile("vm1").await.unwrap();
    let (first, _) = policy_through_fresh_mapping(qpid, &fd, size);
    assert_eq!(first.map(|p| p.mode), Some(PolicyMode::Preferred));
}

/// Regions are named after QEMU's memory backends and record the guest NUMA cell each backs,
/// where the kernel proves which memfd is which backend (the only backend and the only memfd of
/// its size, mapped whole): the 64 MiB cell 0 and 32 MiB cell 1 of a two-cell guest. Two cells
/// of equal size cannot be told apart, so they keep the memfd's names, no cell, and the attach
/// event says why.
#[tokio::test(flavor = "multi_thread")]
async fn regions_are_named_after_qemus_backends_where_the_kernel_proves_it() {
    let dir = tempfile::tempdir().unwrap();
    let two_cells = |size0: &str, size1: &str, total: &str| {
        paused_qemu(
            dir.path(),
            &[
                "-m",
                total,
                "-smp",
                "2",
                "-object",
                &format!("memory-backend-memfd,id=ram-node0,size={size0},share=on"),
                "-object",
                &format!("memory-backend-memfd,id=ram-node1,size={size1},share=on"),
                "-numa",
                "node,nodeid=0,cpus=0,memdev=ram-node0",
                "-numa",
                "node,nodeid=1,cpus=1,memdev=ram-node1",
            ],
        )
    };
    let mut agent = AgentProc::start();
    let mut c = agent.client().await;

    let q = two_cells("64M", "32M", "96M");
    let a = c.attach_process("vm1", q.pid()).await.unwrap();
    let mut got: Vec<(String, u64, Option<u32>)> = a
        .regions
        .iter()
        .map(|r| (r.name.clone(), r.size_bytes, r.guest_cell))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("ram-node0".to_string(), 64 * MIB, Some(0)),
            ("ram-node1".to_string(), 32 * MIB, Some(1)),
        ],
        "{a:?}"
    );
    let evs = stored_events(&mut c, "vm1", 0).await;
    let named = evs
        .iter()
        .find(|e| e.kind() == pb::EventKind::RegionAdopted && e.name == "ram-node1")
        .unwrap_or_else(|| panic!("no attach event for ram-node1: {evs:#?}"));
    assert!(
        named.message.contains(
            "named after QEMU memory backend ram-node1 (guest NUMA cell 1): the only memory-backend-memfd of 33554432 bytes"
        ),
        "{named:?}"
    );
    // Names and cells are durable: an agent restart reads them back.
    agent.restart();
    let mut c = agent.client().await;
    let r = c.get_region("vm1", "ram-node0").await.unwrap();
    assert_eq!(r.guest_cell, Some(0), "{r:?}");
    drop(q);

    let q = two_cells("32M", "32M", "64M");
    let a = c.attach_process("vm2", q.pid()).await.unwrap();
    let mut names: Vec<(String, Option<u32>)> = a
        .regions
        .iter()
        .map(|r| (r.name.clone(), r.guest_cell))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("memory-backend-memfd".to_string(), None),
            ("memory-backend-memfd-1".to_string(), None),
        ]
    );
    let evs = stored_events(&mut c, "vm2", 0).await;
    assert!(
        evs.iter().any(|e| e.kind() == pb::EventKind::RegionAdopted
            && e.message
                .contains("backends ram-node0, ram-node1 are all 33554432 bytes")),
        "{evs:#?}"
    );
}

/// When the VMM a file was attached from exits, the agent learns it from a pidfd and gives the
/// memory back: the region turns RELEASED (still RELEASED after an agent restart), a
/// REGION_RELEASED event names the pid, `memplace_regions_released_total` counts it, the agent
/// holds no fd of the file any more, and the node's Shmem and FilePages drop by the file's size.
#[tokio::test(flavor = "multi_thread")]
async fn an_attached_vmm_that_exits_gets_its_memory_released() {
    const SIZE_MIB: u64 = 512;
    let dir = tempfile::tempdir().unwrap();
    let mem = format!("memory-backend-memfd,id=m0,size={SIZE_MIB}M,share=on,prealloc=on");
    let mut qemu = paused_qemu(
        dir.path(),
        &[
            "-m",
            &format!("{SIZE_MIB}M"),
            "-object",
            &mem,
            "-machine",
            "memory-backend=m0",
        ],
    );
    let qpid = qemu.pid();
    let size = SIZE_MIB * MIB;
    let port = common::net::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut agent = AgentProc::start_with(&["--metrics-addr", &addr]);
    common::net::wait_tcp(port);
    let mut c = agent.client().await;
    let a = c.attach_process("vm1", qpid).await.unwrap();
    let name = a.regions[0].name.clone();
    assert_eq!(a.regions[0].origin(), pb::RegionOrigin::Attach, "{a:?}");
    let fd = memfd_fd_of(qpid, "memory-backend-memfd");
    let ino = std::fs::metadata(format!("/proc/{qpid}/fd/{fd}"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    assert!(
        holds_inode(agent.pid(), ino),
        "the agent holds no fd of QEMU's file"
    );
    let (shmem, file_pages) = (node_meminfo("Shmem"), node_meminfo("FilePages"));

    qemu.child.kill().unwrap();
    qemu.child.wait().unwrap();
    let t = Instant::now();
    let r = loop {
        let r = c.get_region("vm1", &name).await.unwrap();
        if r.status() == pb::RegionStatus::Released {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the region was not released within 30 s of QEMU's exit: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.origin(), pb::RegionOrigin::Attach, "{r:?}");
    assert!(
        !holds_inode(agent.pid(), ino),
        "the agent still holds QEMU's file after releasing it"
    );
    let (shmem_after, file_pages_after) = (node_meminfo("Shmem"), node_meminfo("FilePages"));
    assert!(
        shmem_after + size - 4 * MIB <= shmem,
        "Shmem went from {shmem} to {shmem_after}: the {size} bytes were not freed"
    );
    // FilePages also moves with the host's page cache (other builds and tests): half the file
    // is far above that noise over this short a time.
    assert!(
        file_pages_after + size / 2 <= file_pages,
        "FilePages went from {file_pages} to {file_pages_after}: the {size} bytes were not freed"
    );
    let evs = stored_events(&mut c, "vm1", 0).await;
    let released = evs
        .iter()
        .find(|e| e.kind() == pb::EventKind::RegionReleased)
        .unwrap_or_else(|| panic!("no REGION_RELEASED event: {evs:#?}"));
    assert!(
        released.message.contains(&format!("pid {qpid} exited")),
        "{released:?}"
    );
    let metrics = common::metrics::scrape(port);
    assert!(
        metrics
            .lines()
            .any(|l| l == "memplace_regions_released_total 1"),
        "{metrics}"
    );
    // Nothing can be placed on a released region, and it stays released across a restart.
    let e = c
        .set_policy(
            "vm1",
            &name,
            0,
            0,
            policy(pb::PolicyMode::Bind, &[0]),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e:?}");
    assert!(e.to_string().contains("released"), "{e}");
    agent.restart();
    let mut c = agent.client().await;
    let r = c.get_region("vm1", &name).await.unwrap();
    assert_eq!(r.status(), pb::RegionStatus::Released, "{r:?}");
    c.delete_region("vm1", &name).await.unwrap();
}

/// A stand-in VMM, `memplace-test-standin gmem-vmm`: a KVM VM of its own with two guest_memfds,
/// the first bound to memslot 0 through its mapping, the second only held as an fd; and a memfd
/// it maps shared and holds no fd for. It writes a pattern into all three and answers `check` on
/// stdin with `pattern ok` or `pattern BAD`.
fn gmem_vmm() -> HolderProc {
    let mut cmd = Command::new(standin_path());
    cmd.arg("gmem-vmm");
    let mut vmm = HolderProc::spawn(cmd);
    assert_eq!(vmm.expect_line("vmm: ").trim(), "vmm: ready");
    vmm
}

/// `check` to the gmem stand-in VMM: its answer.
fn check(vmm: &mut HolderProc) -> String {
    vmm.tell("check");
    vmm.expect_line("vmm: pattern").trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
async fn guest_memfds_and_a_memfd_mapped_without_an_fd_are_attached_and_recovered() {
    let mut vmm = gmem_vmm();
    let vpid = vmm.pid();
    let mut agent = AgentProc::start();
    let mut c = agent.client().await;
    let r = c.attach_process("vm3", vpid).await.unwrap();
    let mut got: Vec<(String, pb::Backend, u64, i32)> = r
        .regions
        .iter()
        .map(|x| (x.name.clone(), x.backend(), x.size_bytes, x.holder_pid))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("gmem0".to_string(), pb::Backend::GuestMemfd, GMEM, vpid),
            ("gmem1".to_string(), pb::Backend::GuestMemfd, GMEM, vpid),
            (
                "memplace-weird-name-1".to_string(),
                pb::Backend::Memfd,
                GMEM,
                vpid
            ),
        ]
    );
    let uids: Vec<String> = {
        let mut u: Vec<String> = r.regions.iter().map(|x| x.uid.clone()).collect();
        u.sort();
        u
    };
    // The VMM's written pages are counted where it wrote them; gmem1 is untouched.
    for (name, present) in [
        ("gmem0", GMEM / 4096),
        ("memplace-weird-name-1", GMEM / 4096),
        ("gmem1", 0),
    ] {
        let p = c.placement("vm3", name, 0, 0).await.unwrap();
        let n: u64 = p.nodes.iter().map(|n| n.pages).sum();
        assert_eq!(n, present, "{name}: {p:?}");
    }
    // gmem1 is placed by the agent like any guest_memfd region.
    c.set_policy(
        "vm3",
        "gmem1",
        0,
        0,
        policy(pb::PolicyMode::Bind, &[0]),
        false,
    )
    .await
    .unwrap();
    let s = c
        .populate(
            pb::PopulateRequest {
                vm_id: "vm3".into(),
                name: "gmem1".into(),
                verify: true,
                ..Default::default()
            },
            |_, _| {},
        )
        .await
        .unwrap();
    assert_eq!(s.bytes_done, GMEM, "{s:?}");
    let p = c.placement("vm3", "gmem1", 0, 0).await.unwrap();
    assert_eq!(
        p.nodes,
        vec![pb::NodePages {
            node: 0,
            pages: GMEM / 4096
        }]
    );

    agent.restart();
    let mut c = agent.client().await;
    for x in c.list_regions("vm3").await.unwrap() {
        assert_eq!(x.status(), pb::RegionStatus::Active, "{x:?}");
        assert_eq!(x.holder_pid, vpid, "{x:?}");
    }
    let recovered = stored_events(&mut c, "vm3", 0)
        .await
        .iter()
        .filter(|e| e.kind() == pb::EventKind::FdRecovered)
        .count();
    assert_eq!(recovered, 3);
    let p = c
        .placement("vm3", "memplace-weird-name-1", 0, 0)
        .await
        .unwrap();
    assert_eq!(
        p.nodes.iter().map(|n| n.pages).sum::<u64>(),
        GMEM / 4096,
        "{p:?}"
    );
    assert_eq!(check(&mut vmm), "vmm: pattern ok");
    // Attaching again finds the same three regions.
    let again = c.attach_process("vm3", vpid).await.unwrap();
    let mut u: Vec<String> = again.regions.iter().map(|x| x.uid.clone()).collect();
    u.sort();
    assert_eq!(u, uids);
    assert_eq!(c.list_regions("").await.unwrap().len(), 3);
}
