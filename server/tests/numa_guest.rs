//! Multi-node NUMA tests: boots QEMU TCG guests with several NUMA nodes and runs
//! `tests/numa/scenario.sh` inside them, with memplaced and memplacectl packed into the initramfs.
//!
//! The host has one NUMA node, so placement across nodes can only be seen in a guest. The guests are
//! Debian's newest 6.12 kernel with 2 and with 4 nodes, and Debian's newest kernel from 6.19 on
//! (where guest_memfd has a shared memory policy) with 2 nodes and KVM inside the guest.
//!
//! Inside each guest `scenario.sh` runs the real memplaced and memplacectl: every policy mode, per-range
//! policies, live migration, the task-policy strategy, restarts, capacity refusals, cgroup
//! charging and (on the new kernel) guest_memfd's shared policy, each placement read both from the
//! agent and from a holder's numa_maps. `deliberate_wrong_placement_fails` proves those checks fail
//! when the expected node is wrong.
//!
//! These tests fail, never skip, when QEMU, the kernels or the binaries cannot be had.
//! `tests/numa/README.md` says how to run them and which environment variables they read.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

const NUMA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/numa");
const DEFAULT_NODE_MB: u32 = 512;
/// Log lines shown when a guest fails.
const LOG_TAIL_LINES: usize = 60;

/// Guests run one at a time: TCG is CPU-bound and a parallel boot only makes each one slower.
static GUEST_LOCK: Mutex<()> = Mutex::new(());
static KERNELS: OnceLock<Result<Kernels, String>> = OnceLock::new();

#[test]
fn lts_kernel_with_two_nodes() {
    run_guest(&Guest {
        name: "lts-2-nodes",
        kernel: KernelKind::Lts,
        nodes: 2,
        kvm: false,
    });
}

#[test]
fn lts_kernel_with_four_nodes() {
    run_guest(&Guest {
        name: "lts-4-nodes",
        kernel: KernelKind::Lts,
        nodes: 4,
        kvm: false,
    });
}

#[test]
fn new_kernel_with_two_nodes_and_kvm() {
    run_guest(&Guest {
        name: "new-2-nodes-kvm",
        kernel: KernelKind::New,
        nodes: 2,
        kvm: true,
    });
}

/// A deliberate wrong placement makes the suite fail: with `memplace.selftest=wrong-node` the
/// scenario expects node 0 where BIND puts the pages on the last node, and both the agent's
/// placement check and the holder's numa_maps check must report FAIL (and nothing else).
#[test]
fn deliberate_wrong_placement_fails() {
    let guest = Guest {
        name: "selftest-wrong-node",
        kernel: KernelKind::Lts,
        nodes: 2,
        kvm: false,
    };
    let run = boot_guest(&guest, "memplace.selftest=wrong-node");
    let failed: Vec<&str> = run
        .report
        .failed
        .iter()
        .map(|f| f.split_whitespace().next().unwrap_or_default())
        .collect();
    assert!(
        run.report.done && failed == ["bind-one-node-agent", "bind-one-node-numa-maps"],
        "{}: wanted exactly the two deliberate failures, got {:?}; passed {:?}\nlast lines of {}:\n{}",
        run.what,
        run.report.failed,
        run.report.passed,
        run.log.display(),
        tail(&run.text, LOG_TAIL_LINES)
    );
    assert!(
        run.report.failed.iter().all(|f| f.contains("holds")),
        "the failures must name the node counts: {:?}",
        run.report.failed
    );
}

enum KernelKind {
    /// The newest Debian 6.12 cloud kernel: no shared policy on guest_memfd.
    Lts,
    /// The newest Debian cloud kernel from 6.19 on, with its KVM modules.
    New,
}

struct Guest {
    name: &'static str,
    kernel: KernelKind,
    nodes: u32,
    kvm: bool,
}

/// What `fetch-kernels.sh` prints.
struct Kernels {
    lts_version: String,
    lts_vmlinuz: PathBuf,
    new_version: String,
    new_vmlinuz: PathBuf,
    new_modules: PathBuf,
}

/// The results a guest printed on its serial console.
#[derive(Debug, Default, PartialEq)]
struct SerialReport {
    passed: Vec<String>,
    failed: Vec<String>,
    done: bool,
}

/// What one boot produced.
struct GuestRun {
    what: String,
    elapsed: std::time::Duration,
    status: std::process::ExitStatus,
    report: SerialReport,
    log: PathBuf,
    text: String,
}

fn run_guest(guest: &Guest) {
    let run = boot_guest(guest, "");
    let mut problems = Vec::new();
    match run.status.code() {
        Some(0) => {}
        Some(124) => problems.push("QEMU was killed at the timeout".to_owned()),
        _ => problems.push(format!("boot-guest.sh failed: {}", run.status)),
    }
    problems.extend(
        run.report
            .failed
            .iter()
            .map(|failure| format!("FAIL {failure}")),
    );
    if !run.report.done {
        problems.push("no MEMPLACE-DONE line: the guest did not finish the scenario".to_owned());
    }
    if run.report.passed.is_empty() {
        problems.push("no check passed".to_owned());
    }
    if !problems.is_empty() {
        panic!(
            "{} failed after {:.1} s:\n  {}\nlast lines of {}:\n{}",
            run.what,
            run.elapsed.as_secs_f64(),
            problems.join("\n  "),
            run.log.display(),
            tail(&run.text, LOG_TAIL_LINES)
        );
    }
    println!(
        "{}: {} checks passed in {:.1} s: {}",
        run.what,
        run.report.passed.len(),
        run.elapsed.as_secs_f64(),
        run.report.passed.join(" ")
    );
}

/// Builds the guest's initramfs, boots it with `append` added to the kernel command line, and
/// reads its serial log.
fn boot_guest(guest: &Guest, append: &str) -> GuestRun {
    let _one_at_a_time = GUEST_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let kernels = match KERNELS.get_or_init(fetch_kernels) {
        Ok(kernels) => kernels,
        Err(message) => panic!("{message}"),
    };
    let (version, vmlinuz, modules) = match guest.kernel {
        KernelKind::Lts => (&kernels.lts_version, &kernels.lts_vmlinuz, None),
        KernelKind::New => (
            &kernels.new_version,
            &kernels.new_vmlinuz,
            Some(&kernels.new_modules),
        ),
    };
    let nodes = env_number("MEMPLACE_NUMA_NODES").unwrap_or(guest.nodes);
    let node_mb = env_number("MEMPLACE_NUMA_NODE_MB").unwrap_or(DEFAULT_NODE_MB);
    let (memplaced, memplacectl, test_vmm) = memplace_binaries();

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("numa-guest")
        .join(guest.name);
    std::fs::create_dir_all(&dir).expect("create the guest's work directory");
    let initramfs = dir.join("initramfs.cpio");
    let log = dir.join("serial.log");

    let mut build = script("build-initramfs.sh");
    build
        .arg("--bin")
        .arg(&memplaced)
        .arg("--bin")
        .arg(&memplacectl)
        .arg("--bin")
        .arg(&test_vmm);
    if let Some(modules) = modules {
        build.arg("--modules").arg(modules);
    }
    run_script(build.arg(&initramfs), "build-initramfs.sh");

    let started = Instant::now();
    let mut boot = script("boot-guest.sh");
    boot.arg("--kernel")
        .arg(vmlinuz)
        .arg("--initrd")
        .arg(&initramfs)
        .arg("--log")
        .arg(&log);
    boot.arg("--nodes")
        .arg(nodes.to_string())
        .arg("--node-mb")
        .arg(node_mb.to_string());
    if guest.kvm {
        boot.arg("--kvm");
    }
    if !append.is_empty() {
        boot.arg("--append").arg(append);
    }
    let status = boot.status().expect("run boot-guest.sh");
    let elapsed = started.elapsed();

    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    GuestRun {
        what: format!(
            "guest {} (kernel {version}, {nodes} nodes of {node_mb} MiB)",
            guest.name
        ),
        elapsed,
        status,
        report: parse_serial_log(&text),
        log,
        text,
    }
}

fn fetch_kernels() -> Result<Kernels, String> {
    let output = script("fetch-kernels.sh")
        .output()
        .map_err(|err| format!("cannot run fetch-kernels.sh: {err}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "fetch-kernels.sh failed ({}), so the NUMA guests cannot boot:\n{}",
            output.status,
            tail(&stderr, 30)
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
            .ok_or_else(|| {
                format!(
                    "fetch-kernels.sh printed no {key}:\n{stdout}\n{}",
                    tail(&stderr, 30)
                )
            })
    };
    Ok(Kernels {
        lts_version: value("lts_version")?,
        lts_vmlinuz: value("lts_vmlinuz")?.into(),
        new_version: value("new_version")?,
        new_vmlinuz: value("new_vmlinuz")?.into(),
        new_modules: value("new_modules")?.into(),
    })
}

/// memplaced comes with this crate's tests; memplacectl and memplace-test-vmm (the minimal VMM the
/// KVM guest runs a real guest with) are another crate's binaries, built beside it when the whole
/// workspace is built.
fn memplace_binaries() -> (PathBuf, PathBuf, PathBuf) {
    let memplaced = PathBuf::from(env!("CARGO_BIN_EXE_memplaced"));
    let sibling = |name: &str| {
        let path = memplaced.with_file_name(name);
        assert!(
            path.is_file(),
            "{name} is not built at {}: build the workspace first (cargo build --workspace)",
            path.display()
        );
        path
    };
    let memplacectl = sibling("memplacectl");
    let test_vmm = sibling("memplace-test-vmm");
    (memplaced, memplacectl, test_vmm)
}

fn script(name: &str) -> Command {
    let mut command = Command::new("bash");
    command.arg(Path::new(NUMA_DIR).join(name));
    command
}

fn run_script(command: &mut Command, name: &str) {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {name}: {err}"));
    assert!(
        output.status.success(),
        "{name} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn env_number(name: &str) -> Option<u32> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

/// Reads the check lines anywhere in a line, because kernel messages can share a console line.
fn parse_serial_log(log: &str) -> SerialReport {
    let mut report = SerialReport::default();
    for line in log.lines() {
        if let Some(at) = line.find("MEMPLACE-CHECK ") {
            let result = &line[at + "MEMPLACE-CHECK ".len()..];
            if let Some(name) = result.strip_prefix("PASS ") {
                report.passed.push(name.trim().to_owned());
            } else if let Some(failure) = result.strip_prefix("FAIL ") {
                report.failed.push(failure.trim().to_owned());
            } else {
                report.failed.push(format!("unreadable check line: {line}"));
            }
        }
        if line.contains("MEMPLACE-DONE") {
            report.done = true;
        }
    }
    report
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn serial_log_parsing_collects_passes_failures_and_done() {
    let log = "SeaBIOS\n\
               MEMPLACE-CHECK PASS node-count\n\
               [    1.2] some kernel line MEMPLACE-CHECK PASS shmem-bind-node1\n\
               MEMPLACE-CHECK FAIL kvm-device exit 1: no /dev/kvm\n\
               MEMPLACE-CHECK maybe\n\
               MEMPLACE-DONE\n";
    assert_eq!(
        parse_serial_log(log),
        SerialReport {
            passed: vec!["node-count".into(), "shmem-bind-node1".into()],
            failed: vec![
                "kvm-device exit 1: no /dev/kvm".into(),
                "unreadable check line: MEMPLACE-CHECK maybe".into()
            ],
            done: true,
        }
    );
}

#[test]
fn serial_log_parsing_notices_a_missing_done() {
    let report = parse_serial_log("MEMPLACE-CHECK PASS node-count\nKernel panic - not syncing\n");
    assert!(!report.done);
    assert!(report.failed.is_empty());
}
