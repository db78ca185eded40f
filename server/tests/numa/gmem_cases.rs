//! The guest_memfd cases: tests that need a kernel whose KVM makes guest_memfd, run wherever one
//! exists. Included by `numa_guest.rs`, whose guest harness it uses.
//!
//! Hosts differ: one host's KVM makes guest_memfd, the next answers `KVM_CAP_GUEST_MEMFD` with 0.
//! So every test that needs guest_memfd is marked `#[ignore = "guest_memfd case: ..."]` and declared
//! in [`GMEM_CASES`]; a plain `cargo test` lists it as ignored, with that reason. The runner test
//! [`guest_memfd_cases_run_where_a_kernel_has_guest_memfd`] then runs every declared case, one at
//! a time, as `BINARY --ignored --exact NAME`:
//! - on the host, when the host's KVM makes guest_memfd;
//! - otherwise inside the newest Debian kernel (>= 6.19) with KVM under TCG (`-cpu max`), which has
//!   guest_memfd and its shared policy, with the test binaries packed at their build paths.
//!
//! [`choose_site`] is the one place that decides; `MEMPLACE_GMEM_SITE=guest` sends the cases to the
//! guest even where the host could run them, and `=host` fails where it cannot. The run prints
//! where each case ran. It fails when a declared case ran nowhere or failed, when the source marks a
//! test `#[ignore]` that is not declared here (or declares one that is not marked), and when a
//! declared name matches no test of its binary.

use super::{
    Guest, KernelKind, LOG_TAIL_LINES, NUMA_DIR, Payload, SerialReport, boot_guest_with,
    boot_status_problem, failure_name, tail,
};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every guest_memfd case: (test binary, full test name). Binaries are integration test targets
/// of memplace-server, or `memplace_server` / `memplace_sys` for the libraries' unit tests.
const GMEM_CASES: &[(&str, &str)] = &[
    (
        "bad_input",
        "generated_bad_requests_are_refused_and_change_nothing",
    ),
    (
        "core_agent",
        "every_mode_reads_back_from_the_kernel_and_survives_sigkill",
    ),
    (
        "engine_checks",
        "a_task_policy_range_is_applied_only_while_the_kernel_shows_it",
    ),
    (
        "engine_checks",
        "a_vm_attach_without_its_audit_event_is_refused",
    ),
    ("engine_checks", "reconcile_counts_only_what_it_read_back"),
    (
        "handoff_recovery",
        "a_guest_memfd_belongs_to_the_vm_it_was_made_on",
    ),
    (
        "handoff_recovery",
        "a_recreated_guest_memfd_is_pending_again_on_disk",
    ),
    ("handoff_recovery", "deleting_a_region_releases_every_fd"),
    (
        "handoff_recovery",
        "guest_memfd_regions_stay_placed_through_twenty_sigkills",
    ),
    (
        "handoff_recovery",
        "test_vmm_runs_a_guest_on_its_adopted_guest_memfd",
    ),
    (
        "placement",
        "cancelled_populate_leaves_a_consistent_region_that_a_new_populate_completes",
    ),
    ("placement", "get_placement_allocates_nothing"),
    (
        "placement",
        "migrate_on_memfd_reports_and_guest_memfd_refuses_allocated_pages",
    ),
    (
        "placement",
        "placement_agrees_with_numa_maps_and_numastat_of_a_holder",
    ),
    (
        "placement",
        "populate_allocates_every_page_on_node0_and_streams_progress",
    ),
    (
        "placement",
        "populate_verifies_in_its_workers_or_answers_from_the_page_cache",
    ),
    (
        "placement",
        "populate_with_a_cgroup_charges_that_cgroup_not_the_agent",
    ),
    (
        "placement",
        "task_policy_ranges_are_applied_by_populate_and_pending_after_a_change",
    ),
    (
        "vmm_attach",
        "guest_memfds_and_a_memfd_mapped_without_an_fd_are_attached_and_recovered",
    ),
    (
        "memplace_sys",
        "kvm::tests::dropping_the_vm_deletes_its_memslots",
    ),
    (
        "memplace_server",
        "engine::syscalls::contract::migrate_contract_on_the_real_kernel",
    ),
];

/// Writes a line of the run's record to stderr directly, past libtest's capture, so that CI's log
/// shows where every case ran even when the test passes.
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
pub(crate) use log;

/// The text every guest_memfd case's `#[ignore = ...]` starts with.
const IGNORE_REASON: &str = "guest_memfd case";

/// Where the guest_memfd cases run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Site {
    /// On this host: its KVM makes guest_memfd.
    Host,
    /// In the newest-kernel guest with KVM under TCG.
    Guest,
}

/// The one decision: `wanted` is `MEMPLACE_GMEM_SITE` (unset or `auto`, `host`, `guest`).
fn choose_site(host_makes_gmem: bool, wanted: Option<&str>) -> Result<Site, String> {
    match (wanted.unwrap_or("auto"), host_makes_gmem) {
        ("auto", true) | ("host", true) => Ok(Site::Host),
        ("auto", false) | ("guest", _) => Ok(Site::Guest),
        ("host", false) => Err(
            "MEMPLACE_GMEM_SITE=host, but this host's KVM makes no guest_memfd \
             (KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD) is 0 or /dev/kvm is missing)"
                .to_owned(),
        ),
        (other, _) => Err(format!(
            "MEMPLACE_GMEM_SITE={other}: want auto, host or guest"
        )),
    }
}

/// Whether this host's KVM makes guest_memfd: a VM answers KVM_CAP_GUEST_MEMFD with more than 0.
fn host_makes_gmem() -> bool {
    memplace_sys::kvm::GuestMemfdVm::create().is_ok_and(|vm| vm.guest_memfd_supported())
}

#[test]
fn choosing_the_site_follows_the_host_and_the_override() {
    assert_eq!(choose_site(true, None), Ok(Site::Host));
    assert_eq!(choose_site(false, None), Ok(Site::Guest));
    assert_eq!(choose_site(true, Some("auto")), Ok(Site::Host));
    assert_eq!(choose_site(false, Some("auto")), Ok(Site::Guest));
    assert_eq!(choose_site(true, Some("guest")), Ok(Site::Guest));
    assert_eq!(choose_site(false, Some("guest")), Ok(Site::Guest));
    assert_eq!(choose_site(true, Some("host")), Ok(Site::Host));
    assert!(choose_site(false, Some("host")).is_err());
    assert!(choose_site(true, Some("elsewhere")).is_err());
}

#[test]
fn guest_memfd_cases_run_where_a_kernel_has_guest_memfd() {
    let problems = source_matches_declaration();
    assert!(
        problems.is_empty(),
        "the guest_memfd cases in the source and GMEM_CASES disagree:\n  {}",
        problems.join("\n  ")
    );
    let binaries = case_binaries();
    let host = host_makes_gmem();
    let wanted = std::env::var("MEMPLACE_GMEM_SITE").ok();
    let site = choose_site(host, wanted.as_deref()).unwrap_or_else(|e| panic!("{e}"));
    log!(
        "guest_memfd cases: host KVM {} guest_memfd; MEMPLACE_GMEM_SITE={}; running {} cases {}",
        if host { "makes" } else { "makes no" },
        wanted.as_deref().unwrap_or("auto"),
        GMEM_CASES.len(),
        match site {
            Site::Host => "on the host",
            Site::Guest => "in the newest-kernel guest with KVM",
        }
    );
    let results = match site {
        Site::Host => run_on_host(&binaries),
        Site::Guest => run_in_guest(&binaries),
    };
    let mut problems = Vec::new();
    for ((_, name), result) in GMEM_CASES.iter().zip(&results) {
        match result {
            CaseResult::Passed(place) => log!("guest_memfd case {name}: PASS, ran {place}"),
            CaseResult::Failed(place, why) => {
                log!("guest_memfd case {name}: FAIL, ran {place}: {why}");
                problems.push(format!("{name} failed {place}: {why}"));
            }
            CaseResult::NotRun(why) => {
                log!("guest_memfd case {name}: RAN NOWHERE: {why}");
                problems.push(format!("{name} ran nowhere: {why}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} guest_memfd cases did not pass:\n  {}",
        problems.len(),
        GMEM_CASES.len(),
        problems.join("\n  ")
    );
}

/// What became of one case.
#[derive(Debug)]
enum CaseResult {
    /// Passed; where it ran.
    Passed(String),
    /// Failed; where it ran, and why.
    Failed(String, String),
    /// Never ran; why.
    NotRun(String),
}

/// The newest build of each binary named in [`GMEM_CASES`], beside memplaced in `target/*/deps`,
/// after checking each declared name is a test of it (`--list --ignored`).
fn case_binaries() -> Vec<PathBuf> {
    let deps = Path::new(env!("CARGO_BIN_EXE_memplaced"))
        .parent()
        .expect("memplaced has a directory")
        .join("deps");
    let mut found = Vec::new();
    for (binary, name) in GMEM_CASES {
        let path = newest_test_binary(&deps, binary);
        let listed = Command::new(&path)
            .args(["--list", "--ignored", "--format", "terse"])
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let text = String::from_utf8_lossy(&listed.stdout);
        assert!(
            text.lines().any(|l| l == format!("{name}: test")),
            "guest_memfd case {name} is not an ignored test of {} (`--list --ignored` shows:\n{text})",
            path.display()
        );
        found.push(path);
    }
    found
}

/// `deps/BINARY-HASH`, the newest if there are several (builds with other features).
fn newest_test_binary(deps: &Path, binary: &str) -> PathBuf {
    let prefix = format!("{binary}-");
    let entries = std::fs::read_dir(deps).unwrap_or_else(|e| panic!("{}: {e}", deps.display()));
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(&prefix).is_some_and(|hash| {
                hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())
            }) && e
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .unwrap_or_else(|| {
            panic!(
                "no test binary {binary} in {}: build every test first (cargo test --workspace --no-run)",
                deps.display()
            )
        })
}

/// Runs each case on this host, one at a time, from its package's directory as cargo would.
fn run_on_host(binaries: &[PathBuf]) -> Vec<CaseResult> {
    let place = format!("on the host (kernel {})", kernel_release());
    GMEM_CASES
        .iter()
        .zip(binaries)
        .map(|((binary, name), path)| {
            let dir = match *binary {
                "memplace_sys" => concat!(env!("CARGO_MANIFEST_DIR"), "/../sys"),
                _ => env!("CARGO_MANIFEST_DIR"),
            };
            let out = Command::new(path)
                .args(["--ignored", "--exact", name, "--test-threads=1"])
                .current_dir(dir)
                .output()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let stdout = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && stdout.contains("test result: ok. 1 passed") {
                CaseResult::Passed(place.clone())
            } else {
                CaseResult::Failed(
                    place.clone(),
                    format!(
                        "{}\n{}\n{}",
                        out.status,
                        tail(&stdout, 30),
                        tail(&String::from_utf8_lossy(&out.stderr), 30)
                    ),
                )
            }
        })
        .collect()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Boots the newest kernel with KVM (one node: the cases were written for a one-node host) and
/// runs every case there through `gmem-cases.sh`.
fn run_in_guest(binaries: &[PathBuf]) -> Vec<CaseResult> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("numa-guest/gmem-cases");
    std::fs::create_dir_all(&dir).expect("create the gmem-cases work directory");
    let list = dir.join("gmem-cases.list");
    let text: String = GMEM_CASES
        .iter()
        .zip(binaries)
        .map(|((_, name), path)| format!("{} {name}\n", path.display()))
        .collect();
    std::fs::write(&list, text).expect("write gmem-cases.list");

    let memplaced = PathBuf::from(env!("CARGO_BIN_EXE_memplaced"));
    let mut build: Vec<OsString> = vec![
        "--scenario".into(),
        Path::new(NUMA_DIR).join("gmem-cases.sh").into(),
    ];
    let unique: BTreeSet<&PathBuf> = binaries.iter().collect();
    let siblings = ["memplacectl", "memplace-test-vmm", "memplace-test-standin"]
        .map(|name| memplaced.with_file_name(name));
    for exe in unique.into_iter().chain(&siblings).chain([&memplaced]) {
        assert!(
            exe.is_file(),
            "{} is not built: build the workspace first",
            exe.display()
        );
        build.extend(["--exe".into(), exe.clone().into_os_string()]);
    }
    if let Ok(sqlite3) = which("sqlite3") {
        build.extend(["--bin".into(), sqlite3.into_os_string()]);
    }
    build.extend(["--data".into(), list.into_os_string()]);

    let guest = Guest {
        name: "gmem-cases",
        kernel: KernelKind::New,
        nodes: 1,
        kvm: true,
    };
    let run = boot_guest_with(
        &guest,
        "",
        &Payload {
            build_args: build,
            node_mb: Some(GMEM_GUEST_MB),
        },
    );
    let place = format!("in the guest ({})", run.what);
    let mut setup_problems: Vec<String> = Vec::new();
    setup_problems.extend(boot_status_problem(run.status));
    let setup_checks = [
        "insmod-irqbypass",
        "insmod-kvm",
        "insmod-kvm_amd",
        "gmem-guest-cgroup2-memory",
        "gmem-guest-kvm",
    ];
    for name in setup_checks {
        if !run.report.passed.iter().any(|p| p == name) {
            setup_problems.push(format!("guest setup check {name} did not pass"));
        }
    }
    for failure in &run.report.failed {
        if !failure_name(failure).starts_with("gmem-case:") {
            setup_problems.push(format!("FAIL {failure}"));
        }
    }
    if !run.report.done {
        setup_problems.push("no MEMPLACE-DONE line: the guest did not finish".to_owned());
    }
    log!(
        "gmem-cases guest: {} in {:.1} s, serial log {}",
        run.what,
        run.elapsed.as_secs_f64(),
        run.log.display()
    );
    if !setup_problems.is_empty() {
        println!(
            "gmem-cases guest problems:\n  {}\nlast lines:\n{}",
            setup_problems.join("\n  "),
            tail(&run.text, LOG_TAIL_LINES)
        );
    }
    let names: Vec<&str> = GMEM_CASES.iter().map(|(_, name)| *name).collect();
    case_results(&names, &run.report, &place, &setup_problems, &run.log)
}

/// What became of each of `names` in a guest's report: passed once (and the guest run had no
/// problem), failed, passed more than once, or never reported (ran nowhere).
fn case_results(
    names: &[&str],
    report: &SerialReport,
    place: &str,
    setup_problems: &[String],
    log: &Path,
) -> Vec<CaseResult> {
    names
        .iter()
        .map(|name| {
            let check = format!("gmem-case:{name}");
            let passes = report.passed.iter().filter(|p| **p == check).count();
            let failure = report.failed.iter().find(|f| failure_name(f) == check);
            match (passes, failure) {
                (1, None) if setup_problems.is_empty() => CaseResult::Passed(place.to_owned()),
                (1, None) => CaseResult::Failed(
                    place.to_owned(),
                    format!(
                        "passed, but the guest run had problems: {}",
                        setup_problems.join("; ")
                    ),
                ),
                (_, Some(f)) => CaseResult::Failed(
                    place.to_owned(),
                    format!("{f} (serial log {})", log.display()),
                ),
                (0, None) => CaseResult::NotRun(format!(
                    "the guest never reported it ({}; serial log {})",
                    if setup_problems.is_empty() {
                        "no other problem".to_owned()
                    } else {
                        setup_problems.join("; ")
                    },
                    log.display()
                )),
                (n, None) => {
                    CaseResult::Failed(place.to_owned(), format!("reported PASS {n} times"))
                }
            }
        })
        .collect()
}

#[test]
fn a_case_the_guest_never_reports_ran_nowhere() {
    let report = SerialReport {
        passed: vec![
            "gmem-case:a".into(),
            "gmem-case:c".into(),
            "gmem-case:c".into(),
        ],
        failed: vec!["gmem-case:b exit 101 after 3s".into()],
        done: true,
    };
    let log = Path::new("serial.log");
    let results = case_results(&["a", "b", "c", "d"], &report, "in the guest", &[], log);
    assert!(matches!(&results[0], CaseResult::Passed(p) if p == "in the guest"));
    assert!(matches!(&results[1], CaseResult::Failed(_, why) if why.contains("exit 101")));
    assert!(matches!(&results[2], CaseResult::Failed(_, why) if why.contains("2 times")));
    assert!(matches!(&results[3], CaseResult::NotRun(_)), "{results:?}");
    // A guest that had problems (a module did not load, the scenario aborted) passes nothing.
    let results = case_results(
        &["a"],
        &report,
        "in the guest",
        &["no MEMPLACE-DONE".into()],
        log,
    );
    assert!(matches!(&results[0], CaseResult::Failed(..)), "{results:?}");
}

/// The gmem-cases guest's memory, MiB: the packed test binaries, plus the largest case's 512 MiB
/// populate beside other regions.
const GMEM_GUEST_MB: u32 = 3072;

fn which(tool: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{tool} not on PATH"))
}

/// Compares the tests the source marks `#[ignore = "guest_memfd case..."]` with [`GMEM_CASES`].
/// Every `#[ignore]` in the workspace's Rust sources must be such a case: an ignored test is
/// otherwise a test that never runs.
fn source_matches_declaration() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut marked = BTreeSet::new();
    let mut problems = Vec::new();
    for file in rust_sources(&root) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let binary = binary_of(&root, &file);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let attr = line.trim_start();
            if !attr.starts_with("#[ignore") {
                continue;
            }
            let at = format!("{}:{}", file.display(), i + 1);
            if !attr.contains(&format!("\"{IGNORE_REASON}")) {
                problems.push(format!(
                    "{at}: an #[ignore] that is not a guest_memfd case (such a test never runs)"
                ));
                continue;
            }
            let name = lines[i + 1..].iter().find_map(|l| {
                l.split_once("fn ")
                    .map(|(_, rest)| rest.split('(').next().unwrap_or_default().trim().to_owned())
            });
            match (name, &binary) {
                (Some(name), Some(binary)) => {
                    marked.insert((binary.clone(), name));
                }
                _ => problems.push(format!(
                    "{at}: a guest_memfd case outside a known test binary"
                )),
            }
        }
    }
    let declared: BTreeSet<(String, String)> = GMEM_CASES
        .iter()
        .map(|(b, n)| (b.to_string(), n.rsplit("::").next().unwrap_or(n).to_owned()))
        .collect();
    for (binary, name) in marked.difference(&declared) {
        problems.push(format!(
            "{binary}: {name} is marked a guest_memfd case but not declared in GMEM_CASES"
        ));
    }
    for (binary, name) in declared.difference(&marked) {
        problems.push(format!("{binary}: {name} is declared in GMEM_CASES but not marked #[ignore = \"{IGNORE_REASON}: ...\"]"));
    }
    problems
}

/// The test binary a source file is compiled into, for the crates that hold guest_memfd cases.
fn binary_of(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).ok()?;
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    match parts
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["server", "tests", file] => file.strip_suffix(".rs").map(str::to_owned),
        ["server", "src", ..] => Some("memplace_server".to_owned()),
        ["sys", "src", ..] => Some("memplace_sys".to_owned()),
        _ => None,
    }
}

/// Every .rs file of the workspace's crates (not target/ or hidden directories).
fn rust_sources(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if name.ends_with(".rs") {
                out.push(path);
            }
        }
    }
    out
}
