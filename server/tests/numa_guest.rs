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
//! Every check a guest must pass is declared in [`SCENARIO_CHECKS`] (and [`SELFTEST_CHECKS`]):
//! a declared check that does not report PASS fails the guest, so a section of the scenario that
//! stops early or never runs cannot go unnoticed, and so does a PASS that is not declared.
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

/// The guest_memfd cases of the whole suite, run on the host or in the newest-kernel guest.
#[path = "numa/gmem_cases.rs"]
mod gmem_cases;
/// What memplace does on each kernel of the matrix, checked against README.
#[path = "numa/kernel_matrix.rs"]
mod kernel_matrix;

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
/// scenario expects node 0 (and the kernel policy `bind:0`) where BIND puts the pages on the last
/// node, and the agent's placement check, the holder's numa_maps check and the kernel-policy check
/// must report FAIL (and nothing else), while the steps before them ([`SELFTEST_CHECKS`]) pass.
#[test]
fn deliberate_wrong_placement_fails() {
    let guest = Guest {
        name: "selftest-wrong-node",
        kernel: KernelKind::Lts,
        nodes: 2,
        kvm: false,
    };
    let run = boot_guest(&guest, "memplace.selftest=wrong-node");
    let problems = judge_selftest(&run);
    assert!(
        problems.is_empty(),
        "{}: wanted QEMU to end normally with exactly the deliberate failures:\n  {}\nfailed {:?}; \
         passed {:?}\nlast lines of {}:\n{}",
        run.what,
        problems.join("\n  "),
        run.report.failed,
        run.report.passed,
        run.log.display(),
        tail(&run.text, LOG_TAIL_LINES)
    );
}

/// What is wrong with the self-test guest's run (none: it failed exactly as it must): QEMU must
/// have ended normally (a guest killed at the timeout, or a boot that failed, proves nothing even
/// with the right failures printed), exactly the deliberate failures and the checks before them,
/// and each failure naming the node counts or the policy it wanted.
fn judge_selftest(run: &GuestRun) -> Vec<String> {
    let mut problems: Vec<String> = boot_status_problem(run.status).into_iter().collect();
    let expected_pass: Vec<String> = SELFTEST_CHECKS.iter().map(|&c| c.to_owned()).collect();
    problems.extend(judge(&run.report, &expected_pass, SELFTEST_FAILURES));
    for f in &run.report.failed {
        let named = if failure_name(f).ends_with("-kernel-policy") {
            f.contains("want 'bind:0'")
        } else {
            f.contains("holds")
        };
        if !named {
            problems.push(format!(
                "the failure {f:?} names neither the node counts nor the policy wanted"
            ));
        }
    }
    problems
}

/// The checks that the self-test guest must pass: everything before the deliberate failures.
const SELFTEST_CHECKS: &[&str] = &[
    "agent-start",
    "agent-on-node0",
    "bind-one-node-create",
    "bind-one-node-populate",
    "bind-one-node-hold",
];
/// The checks that the self-test guest must fail, and no others.
const SELFTEST_FAILURES: &[&str] = &[
    "bind-one-node-agent",
    "bind-one-node-numa-maps",
    "bind-one-node-kernel-policy",
];

/// What decides which checks a guest runs.
#[derive(Clone, Copy, Debug)]
struct Setup {
    nodes: u32,
    kvm: bool,
}

/// One group of checks that `init.sh` or `scenario.sh` reports as PASS, and the guests that run it.
/// Each group is headed by a comment naming the scenario section that prints it.
struct CheckGroup {
    /// Whether a guest runs the group.
    runs_on: fn(Setup) -> bool,
    /// Check names. `{n}` makes one name per node (0 to nodes - 1); `{last}` is the last node.
    names: &'static [&'static str],
}

fn every_guest(_: Setup) -> bool {
    true
}
fn with_kvm(setup: Setup) -> bool {
    setup.kvm
}
fn without_kvm(setup: Setup) -> bool {
    !setup.kvm
}
/// BIND and PREFERRED_MANY over a pair of nodes tell the policy from local allocation only when
/// the pair leaves a node out (node 0, where the agent runs); on 2 nodes only the kernel's policy
/// is checked (scenario.sh, `PAIR_WANT`).
fn pair_leaves_a_node_out(setup: Setup) -> bool {
    setup.nodes > 2
}
fn four_nodes_or_more(setup: Setup) -> bool {
    setup.nodes >= 4
}
/// The nested QEMU section (scenario.sh, `nested_qemu_case`) runs on the 2-node guest without KVM
/// (the 6.12 kernel), whose initramfs holds the host's QEMU ([`NESTED_QEMU_FILES`]).
fn nested_qemu(setup: Setup) -> bool {
    setup.nodes == 2 && !setup.kvm
}

/// What the nested QEMU needs besides its binary and libraries (`build-initramfs.sh --file`): the
/// TCG accelerator module, and the firmware that `-machine pc -nodefaults` loads (Debian 12's
/// QEMU 7.2, package qemu-system-x86 with seabios).
const NESTED_QEMU_BIN: &str = "/usr/bin/qemu-system-x86_64";
const NESTED_QEMU_FILES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so",
    "/usr/share/qemu/kvmvapic.bin",
    "/usr/share/seabios/bios-256k.bin",
];

/// Every check a full scenario must pass, in the order the guest prints them. This is the one
/// place that declares them: the harness fails a guest on a declared check that did not pass
/// (a section that ended early or never ran) and on a passing check not declared here. A new
/// section of `scenario.sh` adds a group here, with the guests that run it.
const SCENARIO_CHECKS: &[CheckGroup] = &[
    // init: KVM modules
    CheckGroup {
        runs_on: with_kvm,
        names: &["insmod-irqbypass", "insmod-kvm", "insmod-kvm_amd"],
    },
    // sanity
    CheckGroup {
        runs_on: every_guest,
        names: &[
            "node-count",
            "nodes-populated",
            "numastat-columns",
            "cgroup2-mounted",
            "shmem-bind-node{n}",
            "shmem-interleave-all",
            "anon-bind-node{last}",
        ],
    },
    // sanity: KVM
    CheckGroup {
        runs_on: with_kvm,
        names: &["kvm-device", "kvm-amd-loaded"],
    },
    // sanity
    CheckGroup {
        runs_on: every_guest,
        names: &["memplaced-runs", "memplacectl-runs"],
    },
    // agent
    CheckGroup {
        runs_on: every_guest,
        names: &["agent-start", "agent-on-node0"],
    },
    // modes
    CheckGroup {
        runs_on: every_guest,
        names: &[
            "bind-one-node-create",
            "bind-one-node-populate",
            "bind-one-node-agent",
            "bind-one-node-hold",
            "bind-one-node-numa-maps",
            "bind-two-nodes-create",
            "bind-two-nodes-populate",
            "bind-two-nodes-hold",
            "bind-two-nodes-kernel-policy",
            "preferred-create",
            "preferred-policy",
            "preferred-populate",
            "preferred-agent",
            "preferred-hold",
            "preferred-numa-maps",
            "preferred-many-create",
            "preferred-many-populate",
            "preferred-many-hold",
            "preferred-many-kernel-policy",
            "interleave-2-create",
            "interleave-2-populate",
            "interleave-2-agent",
            "interleave-2-hold",
            "interleave-2-numa-maps",
            "weighted-interleave-weights",
            "weighted-interleave-create",
            "weighted-interleave-policy",
            "weighted-interleave-populate",
            "weighted-interleave-agent",
            "weighted-interleave-hold",
            "weighted-interleave-numa-maps",
        ],
    },
    // modes: placement on a pair that leaves node 0 out
    CheckGroup {
        runs_on: pair_leaves_a_node_out,
        names: &[
            "bind-two-nodes-agent",
            "bind-two-nodes-numa-maps",
            "preferred-many-agent",
            "preferred-many-numa-maps",
        ],
    },
    // modes: interleave over 4 nodes
    CheckGroup {
        runs_on: four_nodes_or_more,
        names: &[
            "interleave-4-create",
            "interleave-4-populate",
            "interleave-4-agent",
            "interleave-4-hold",
            "interleave-4-numa-maps",
        ],
    },
    // per-range
    CheckGroup {
        runs_on: every_guest,
        names: &[
            "per-range-vm-ranges-create",
            "per-range-vm-ranges-policy-a",
            "per-range-vm-ranges-policy-b",
            "per-range-vm-ranges-populate-a",
            "per-range-vm-ranges-populate-b",
            "per-range-vm-ranges-populate-c",
            "per-range-vm-ranges-agent",
            "per-range-vm-ranges-agent-a",
            "per-range-vm-ranges-agent-b",
            "per-range-vm-ranges-agent-c",
            "per-range-vm-ranges-hold-8M",
            "per-range-vm-ranges-numa-maps-a",
            "per-range-vm-ranges-held-agent",
            "per-range-vm-ranges-held-by-window",
            "per-range-vm-ranges-hold-all",
            "per-range-vm-ranges-numa-maps-all",
        ],
    },
    // migrate
    CheckGroup {
        runs_on: every_guest,
        names: &[
            "migrate-create",
            "migrate-populate",
            "migrate-hold",
            "migrate-before-numa-maps",
            "migrate-set-policy",
            "migrate-reported",
            "migrate-after-agent",
            "migrate-after-by-holder",
            "migrate-after-numa-maps",
            "migrate-after-half-agent",
            "migrate-after-half-by-window",
        ],
    },
    // capacity
    CheckGroup {
        runs_on: every_guest,
        names: &[
            "capacity-create",
            "capacity-refused",
            "capacity-nothing-allocated",
        ],
    },
    // cgroup
    CheckGroup {
        runs_on: every_guest,
        names: &[
            "cgroup-setup",
            "cgroup-create",
            "cgroup-populate",
            "cgroup-charged",
            "cgroup-placement",
        ],
    },
    // guest-memfd
    CheckGroup {
        runs_on: without_kvm,
        names: &["gmem-unsupported", "gmem-interleave-probe-unknown"],
    },
    // guest-memfd-interleave: the probe says exact on 7.x, and interleave alternates pages
    CheckGroup {
        runs_on: with_kvm,
        names: &[
            "gmem-interleave-probe-exact",
            "gmem-interleave-create",
            "gmem-interleave-policy",
            "gmem-interleave-no-warning",
            "gmem-interleave-populate",
            "gmem-interleave-agent",
        ],
    },
    // restart: before
    CheckGroup {
        runs_on: every_guest,
        names: &[
            "restart-create",
            "restart-populate-half",
            "restart-hold",
            "restart-before-numa-maps",
        ],
    },
    // restart: guest_memfd before
    CheckGroup {
        runs_on: with_kvm,
        names: &[
            "gmem-create",
            "gmem-shared-policy",
            "gmem-policy",
            "gmem-populate",
            "gmem-populate-agent",
            "gmem-hold",
            "gmem-holder-faults-numa-maps",
            "gmem-holder-faults-agent",
        ],
    },
    // restart: after
    CheckGroup {
        runs_on: every_guest,
        names: &[
            "restart-sigkill",
            "restart-agent-back",
            "restart-agent-on-node0",
            "restart-intent-intact",
            "restart-pages-intact",
            "restart-hold-more",
            "restart-new-pages-numa-maps",
            "restart-new-pages-agent",
        ],
    },
    // restart: guest_memfd after
    CheckGroup {
        runs_on: with_kvm,
        names: &[
            "gmem-intent-intact",
            "gmem-hold-after-restart",
            "gmem-populate-after-restart",
            "gmem-after-restart-agent",
            "gmem-hold-all-after-restart",
            "gmem-after-restart-numa-maps",
        ],
    },
    // guest-memfd-interleave-warning: an agent told the probe said "not exact"
    CheckGroup {
        runs_on: with_kvm,
        names: &[
            "gmem-il-warn-agent",
            "gmem-il-warn-info",
            "gmem-il-warn-create",
            "gmem-il-warn-policy",
            "gmem-il-warning",
            "gmem-il-warning-applied",
            "gmem-il-warning-event",
            "gmem-il-warn-bind",
            "gmem-il-bind-no-warning",
        ],
    },
    // guest-vmm: memplace-test-vmm runs real guest code on its adopted guest_memfd
    CheckGroup {
        runs_on: with_kvm,
        names: &[
            "vmm-agent-start",
            "vmm-start",
            "vmm-adopted",
            "vmm-agent-holds-gmem",
            "vmm-untouched-before-policy",
            "vmm-policy",
            "vmm-untouched-after-policy",
            "vmm-guest-pass-1",
            "vmm-pass-1-meminfo",
            "vmm-pass-1-agent",
            "vmm-agent-sigkill",
            "vmm-agent-back",
            "vmm-agent-holds-gmem-after-restart",
            "vmm-intent-intact",
            "vmm-guest-pass-2",
            "vmm-pass-2-meminfo",
            "vmm-pass-2-agent",
        ],
    },
    // confined-agent
    CheckGroup {
        runs_on: every_guest,
        names: &[
            "cpuset-setup",
            "agent-confined-start",
            "agent-confined-cpuset",
            "local-create",
            "local-populate",
            "local-agent",
            "local-hold",
            "local-numa-maps",
            "local-kernel-policy",
            "default-create",
            "default-populate",
            "default-agent",
            "default-hold",
            "default-numa-maps",
            "default-kernel-policy",
            "relative-create",
            "relative-policy",
            "relative-populate",
            "relative-agent",
            "relative-hold",
            "relative-numa-maps",
            "relative-kernel-policy",
            "relative-reported",
            "bind-outside-cpuset-refused",
            "static-create",
            "static-policy",
            "static-populate",
            "static-agent",
            "static-hold",
            "static-numa-maps",
            "static-kernel-policy",
            "static-reported",
        ],
    },
    // task-policy-agent
    CheckGroup {
        runs_on: every_guest,
        names: &[
            "agent-task-policy-start",
            "agent-task-policy-on-node0",
            "task-policy-create",
            "task-policy-strategy",
            "task-policy-populate",
            "task-policy-bind-agent",
            "task-policy-hold",
            "task-policy-bind-numa-maps",
            "per-range-vm-task-create",
            "per-range-vm-task-policy-a",
            "per-range-vm-task-policy-b",
            "per-range-vm-task-populate-a",
            "per-range-vm-task-populate-b",
            "per-range-vm-task-populate-c",
            "per-range-vm-task-agent",
            "per-range-vm-task-agent-a",
            "per-range-vm-task-agent-b",
            "per-range-vm-task-agent-c",
            "per-range-vm-task-hold-8M",
            "per-range-vm-task-numa-maps-a",
            "per-range-vm-task-held-agent",
            "per-range-vm-task-held-by-window",
            "per-range-vm-task-hold-all",
            "per-range-vm-task-numa-maps-all",
        ],
    },
    // nested-qemu
    CheckGroup {
        runs_on: nested_qemu,
        names: &[
            "nested-qemu-agent-start",
            "nested-qemu-create",
            "nested-qemu-start",
            "nested-qemu-numa-maps-node1",
            "nested-qemu-placement",
            "nested-qemu-pattern",
            "nested-qemu-migrate",
            "nested-qemu-migrated-numa-maps",
            "nested-qemu-migrated-placement",
            "nested-qemu-intact",
            "nested-qemu-drift-create",
            "nested-qemu-host-nodes-start",
            "nested-qemu-host-nodes-drift",
            "nested-qemu-reconcile",
            "nested-qemu-drift-event",
            "nested-qemu-repaired",
            "nested-qemu-attach-start",
            "nested-qemu-attach-before-node0",
            "nested-qemu-attach",
            "nested-qemu-attach-migrate",
            "nested-qemu-attach-numa-maps-node{last}",
            "nested-qemu-attach-placement-node{last}",
        ],
    },
];

/// The names a full scenario on `setup` must report as PASS ([`SCENARIO_CHECKS`] expanded).
fn expected_checks(setup: Setup) -> Vec<String> {
    let last = setup.nodes.saturating_sub(1).to_string();
    let mut names = Vec::new();
    for group in SCENARIO_CHECKS.iter().filter(|g| (g.runs_on)(setup)) {
        for name in group.names {
            if name.contains("{n}") {
                names.extend((0..setup.nodes).map(|n| name.replace("{n}", &n.to_string())));
            } else {
                names.push(name.replace("{last}", &last));
            }
        }
    }
    names
}

/// Compares what a guest printed with what it must print: every name of `pass` passed exactly
/// once, nothing else passed, exactly the names of `fail` failed, and the scenario finished.
/// Returns one line per problem (none: the guest passed).
fn judge(report: &SerialReport, pass: &[String], fail: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    for name in pass {
        match report.passed.iter().filter(|p| *p == name).count() {
            1 => {}
            0 if report.failed.iter().any(|f| failure_name(f) == name) => {}
            0 => problems.push(format!(
                "missing check {name}: it never reported (its section ended early or did not run)"
            )),
            n => problems.push(format!("check {name} passed {n} times")),
        }
    }
    for name in &report.passed {
        if !pass.contains(name) {
            problems.push(format!(
                "undeclared check {name} passed: declare it in the expected list (SCENARIO_CHECKS in numa_guest.rs)"
            ));
        }
    }
    for failure in &report.failed {
        if !fail.contains(&failure_name(failure)) {
            problems.push(format!("FAIL {failure}"));
        }
    }
    for name in fail {
        if !report.failed.iter().any(|f| failure_name(f) == *name) {
            problems.push(format!(
                "check {name} should have failed, but did not report FAIL"
            ));
        }
    }
    if !report.done {
        problems.push("no MEMPLACE-DONE line: the guest did not finish the scenario".to_owned());
    }
    problems
}

/// The check name of a FAIL line's text ("NAME DETAIL...").
fn failure_name(failure: &str) -> &str {
    failure.split_whitespace().next().unwrap_or_default()
}

#[derive(Clone, Copy)]
enum KernelKind {
    /// Debian 12's default 6.1 cloud kernel: no guest_memfd.
    Old,
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
    old_version: String,
    old_vmlinuz: PathBuf,
    old_modules: PathBuf,
    lts_version: String,
    lts_vmlinuz: PathBuf,
    lts_modules: PathBuf,
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
    setup: Setup,
    elapsed: std::time::Duration,
    status: std::process::ExitStatus,
    report: SerialReport,
    log: PathBuf,
    text: String,
}

fn run_guest(guest: &Guest) {
    let run = boot_guest(guest, "");
    let mut problems = Vec::new();
    problems.extend(boot_status_problem(run.status));
    problems.extend(judge(&run.report, &expected_checks(run.setup), &[]));
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

/// What boot-guest.sh's exit status says went wrong, if anything: 0 is a guest that powered off,
/// 124 one that was killed at the timeout, anything else a failed boot.
fn boot_status_problem(status: std::process::ExitStatus) -> Option<String> {
    match status.code() {
        Some(0) => None,
        Some(124) => Some("QEMU was killed at the timeout".to_owned()),
        _ => Some(format!("boot-guest.sh failed: {status}")),
    }
}

/// What a guest carries besides the scenario's defaults.
#[derive(Default)]
struct Payload {
    /// Extra arguments to build-initramfs.sh (before OUT), e.g. another `--scenario`.
    build_args: Vec<std::ffi::OsString>,
    /// Memory per node, MiB, instead of the default.
    node_mb: Option<u32>,
}

/// Builds the guest's initramfs, boots it with `append` added to the kernel command line, and
/// reads its serial log.
fn boot_guest(guest: &Guest, append: &str) -> GuestRun {
    boot_guest_with(guest, append, &Payload::default())
}

/// [`boot_guest`] with a [`Payload`].
fn boot_guest_with(guest: &Guest, append: &str, payload: &Payload) -> GuestRun {
    let _one_at_a_time = GUEST_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let kernels = match KERNELS.get_or_init(fetch_kernels) {
        Ok(kernels) => kernels,
        Err(message) => panic!("{message}"),
    };
    let (version, vmlinuz, kvm_modules) = match guest.kernel {
        KernelKind::Old => (
            &kernels.old_version,
            &kernels.old_vmlinuz,
            &kernels.old_modules,
        ),
        KernelKind::Lts => (
            &kernels.lts_version,
            &kernels.lts_vmlinuz,
            &kernels.lts_modules,
        ),
        KernelKind::New => (
            &kernels.new_version,
            &kernels.new_vmlinuz,
            &kernels.new_modules,
        ),
    };
    // The KVM modules come along only where the guest is to have KVM.
    let modules = guest.kvm.then_some(kvm_modules);
    let nodes =
        guest_nodes(guest, env_number("MEMPLACE_NUMA_NODES")).unwrap_or_else(|e| panic!("{e}"));
    let node_mb = payload
        .node_mb
        .or_else(|| env_number("MEMPLACE_NUMA_NODE_MB"))
        .unwrap_or(DEFAULT_NODE_MB);
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
    if nested_qemu(Setup {
        nodes,
        kvm: guest.kvm,
    }) {
        build.arg("--bin").arg(NESTED_QEMU_BIN);
        for file in NESTED_QEMU_FILES {
            build.arg("--file").arg(file);
        }
    }
    build.args(&payload.build_args);
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
        setup: Setup {
            nodes,
            kvm: guest.kvm,
        },
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
        old_version: value("old_version")?,
        old_vmlinuz: value("old_vmlinuz")?.into(),
        old_modules: value("old_modules")?.into(),
        lts_version: value("lts_version")?,
        lts_vmlinuz: value("lts_vmlinuz")?.into(),
        lts_modules: value("lts_modules")?.into(),
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

/// The node count a guest boots with: its declared `nodes`, or `MEMPLACE_NUMA_NODES` (`over`) if
/// set. An override below the declared count is refused: it would drop the checks that need those
/// nodes (a 4-node guest run on 2 nodes passes without ever interleaving over 4). An override above
/// it is said aloud, with the declared guest's checks the bigger guest does not run.
fn guest_nodes(guest: &Guest, over: Option<u32>) -> Result<u32, String> {
    let Some(nodes) = over else {
        return Ok(guest.nodes);
    };
    if nodes < guest.nodes {
        return Err(format!(
            "MEMPLACE_NUMA_NODES={nodes} is below the {} nodes guest {} is declared with; it would \
             drop the checks that need them. Unset it, or set it to {} or more",
            guest.nodes, guest.name, guest.nodes
        ));
    }
    if nodes != guest.nodes {
        let setup = |nodes| Setup {
            nodes,
            kvm: guest.kvm,
        };
        let now = expected_checks(setup(nodes));
        let dropped: Vec<String> = expected_checks(setup(guest.nodes))
            .into_iter()
            .filter(|c| !now.contains(c))
            .collect();
        println!(
            "MEMPLACE_NUMA_NODES={nodes}: guest {} boots with {nodes} nodes instead of its declared \
             {}; checks of the declared guest it does not run: {}",
            guest.name,
            guest.nodes,
            if dropped.is_empty() {
                "none".to_owned()
            } else {
                dropped.join(" ")
            }
        );
    }
    Ok(nodes)
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

/// What `numa/helpers-selftest.sh` must report: every helper passes on a right answer...
const HELPER_SELFTEST_PASS: &[&str] = &[
    "populate-ok",
    "set-policy-ok",
    "region-create-ok",
    "expect-region-ok",
    "expect-placement-ok",
    "expect-placement-with-ranges-ok",
    "expect-counted-from-ok",
    "expect-placement-two-ranges-ok",
    "expect-exit-ok",
    "deletes-wait-ok",
    "agent-pin-ok",
    "agent-on-node0-ok",
];
/// ...and fails when memplacectl fails or its answer is wrong.
const HELPER_SELFTEST_FAIL: &[&str] = &[
    "populate-fails",
    "set-policy-fails",
    "set-policy-without-ranges-fails",
    "region-create-fails",
    "region-create-without-token-fails",
    "expect-region-fails",
    "expect-region-wrong-value-fails",
    "expect-placement-wrong-node-fails",
    "expect-placement-fails",
    "expect-placement-unknown-fails",
    "expect-counted-from-wrong-pid-fails",
    "expect-counted-from-extra-range-fails",
    "expect-counted-from-missing-field-fails",
    "expect-counted-from-unlisted-range-fails",
    "expect-exit-fails",
    "check-set-e-fails",
    "step-pipefail-fails",
    "deletes-wait-fails",
    "agent-on-node1-fails",
    "holder-gone",
    "agent-stop-gone-fails",
];

/// The guest helpers, on the host under the same busybox sh as in the guests, with a stand-in
/// memplacectl: a step whose memplacectl call fails reports FAIL (populate and set_policy once
/// reported PASS whatever happened), and so does every check given a wrong answer.
#[test]
fn guest_helpers_fail_when_memplacectl_fails() {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox is missing: install busybox-static (fetch-kernels.sh does, as root)"
    );
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("numa-helpers-selftest");
    let _ = std::fs::remove_dir_all(&dir);
    // Node 0 stands for the first CPU this test may run on, node 1 for a CPU it is not on.
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let allowed = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/self/status")
        .trim();
    let first_cpu: String = allowed.chars().take_while(char::is_ascii_digit).collect();
    for (node, cpus) in [("node0", first_cpu.as_str()), ("node1", "4095")] {
        std::fs::create_dir_all(dir.join("sys").join(node)).expect("create the stand-in sysfs");
        std::fs::write(
            dir.join("sys").join(node).join("cpulist"),
            format!("{cpus}\n"),
        )
        .expect("write a stand-in cpulist");
    }
    let output = Command::new(busybox)
        .arg("sh")
        .arg(Path::new(NUMA_DIR).join("helpers-selftest.sh"))
        .env("MEMPLACE_WORK", dir.join("work"))
        .env("MEMPLACE_NODE_SYS", dir.join("sys"))
        .output()
        .expect("run helpers-selftest.sh");
    let text = String::from_utf8_lossy(&output.stdout);
    let report = parse_serial_log(&text);
    let pass: Vec<String> = HELPER_SELFTEST_PASS.iter().map(|&c| c.to_owned()).collect();
    let problems = judge(&report, &pass, HELPER_SELFTEST_FAIL);
    assert!(
        output.status.success() && problems.is_empty(),
        "helpers-selftest.sh ({}):\n  {}\nstdout:\n{text}\nstderr:\n{}",
        output.status,
        problems.join("\n  "),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn report_of(passed: &[&str], failed: &[&str], done: bool) -> SerialReport {
    SerialReport {
        passed: passed.iter().map(|&p| p.to_owned()).collect(),
        failed: failed
            .iter()
            .map(|&f| format!("{f} exit 1: detail"))
            .collect(),
        done,
    }
}

#[test]
fn judging_wants_every_declared_check_once_and_nothing_else() {
    let pass = vec!["a".to_owned(), "b".to_owned()];
    assert!(judge(&report_of(&["a", "b"], &[], true), &pass, &[]).is_empty());
    // A section that ended early: b never reported.
    let missing = judge(&report_of(&["a"], &[], true), &pass, &[]);
    assert!(
        missing.len() == 1 && missing[0].starts_with("missing check b"),
        "{missing:?}"
    );
    // A check nobody declared, a check that ran twice, a failure, no MEMPLACE-DONE.
    assert_eq!(
        judge(&report_of(&["a", "b", "c"], &[], true), &pass, &[]).len(),
        1
    );
    assert_eq!(
        judge(&report_of(&["a", "b", "b"], &[], true), &pass, &[]).len(),
        1
    );
    let failed = judge(&report_of(&["a"], &["b"], true), &pass, &[]);
    assert!(
        failed.len() == 1 && failed[0].starts_with("FAIL b"),
        "{failed:?}"
    );
    assert_eq!(
        judge(&report_of(&["a", "b"], &[], false), &pass, &[]).len(),
        1
    );
    // Expected failures: exactly those.
    assert!(judge(&report_of(&["a", "b"], &["x"], true), &pass, &["x"]).is_empty());
    assert_eq!(
        judge(&report_of(&["a", "b"], &[], true), &pass, &["x"]).len(),
        1
    );
}

#[test]
fn the_self_test_wants_its_failures_from_a_guest_that_ended_normally() {
    use std::os::unix::process::ExitStatusExt;
    let run = |exit: i32| GuestRun {
        what: "selftest".to_owned(),
        setup: Setup {
            nodes: 2,
            kvm: false,
        },
        elapsed: std::time::Duration::ZERO,
        // A wait status: the exit code sits in the second byte.
        status: std::process::ExitStatus::from_raw(exit << 8),
        report: SerialReport {
            passed: SELFTEST_CHECKS.iter().map(|&c| c.to_owned()).collect(),
            failed: vec![
                "bind-one-node-agent node 0 holds 0 pages".to_owned(),
                "bind-one-node-numa-maps node 0 holds 0 pages".to_owned(),
                "bind-one-node-kernel-policy want 'bind:0', got 'bind:1'".to_owned(),
            ],
            done: true,
        },
        log: PathBuf::from("serial.log"),
        text: String::new(),
    };
    assert_eq!(judge_selftest(&run(0)), Vec::<String>::new());
    for (exit, says) in [(124, "timeout"), (1, "failed")] {
        let problems = judge_selftest(&run(exit));
        assert!(
            problems.len() == 1 && problems[0].contains(says),
            "exit {exit}: {problems:?}"
        );
    }
}

#[test]
fn a_node_override_cannot_shrink_a_guest() {
    let four = Guest {
        name: "lts-4-nodes",
        kernel: KernelKind::Lts,
        nodes: 4,
        kvm: false,
    };
    assert_eq!(guest_nodes(&four, None), Ok(4));
    assert_eq!(guest_nodes(&four, Some(4)), Ok(4));
    assert_eq!(guest_nodes(&four, Some(6)), Ok(6));
    for fewer in [0, 1, 2, 3] {
        let err = guest_nodes(&four, Some(fewer)).expect_err("an override below 4 nodes");
        assert!(
            err.contains(&format!("MEMPLACE_NUMA_NODES={fewer}"))
                && err.contains("lts-4-nodes")
                && err.contains("4 nodes"),
            "{err}"
        );
    }
}

#[test]
fn expected_checks_follow_the_guest() {
    let two = expected_checks(Setup {
        nodes: 2,
        kvm: false,
    });
    let four = expected_checks(Setup {
        nodes: 4,
        kvm: false,
    });
    let kvm = expected_checks(Setup {
        nodes: 2,
        kvm: true,
    });
    for list in [&two, &four, &kvm] {
        let mut sorted = list.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), list.len(), "a check is declared twice");
        assert!(list.iter().all(|name| !name.contains('{')));
    }
    let has = |list: &[String], name: &str| list.iter().any(|n| n == name);
    // On 2 nodes the pair is every node: only the kernel's policy is checked.
    assert!(has(&two, "bind-two-nodes-kernel-policy") && !has(&two, "bind-two-nodes-agent"));
    assert!(has(&four, "bind-two-nodes-agent") && has(&four, "preferred-many-numa-maps"));
    assert!(has(&four, "interleave-4-numa-maps") && !has(&two, "interleave-4-numa-maps"));
    assert!(has(&four, "shmem-bind-node3") && has(&four, "anon-bind-node3"));
    assert!(has(&two, "anon-bind-node1") && !has(&two, "shmem-bind-node2"));
    assert!(has(&kvm, "gmem-after-restart-numa-maps") && has(&kvm, "insmod-kvm_amd"));
    assert!(!has(&kvm, "gmem-unsupported") && has(&two, "gmem-unsupported"));
    // The nested QEMU runs on the 2-node guest without KVM only.
    assert!(has(&two, "nested-qemu-migrated-numa-maps") && !has(&four, "nested-qemu-start"));
    assert!(!has(&kvm, "nested-qemu-start"));
}
