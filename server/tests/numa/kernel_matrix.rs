//! The kernel matrix: what memplace does on each kernel a fleet runs. Included by `numa_guest.rs`.
//!
//! A fleet mixes kernels: Debian 12's default 6.1 (no guest_memfd), the 6.12 LTS (guest_memfd only
//! for confidential VM types, so none for memplace), and the newest 7.x (guest_memfd with its shared
//! policy). Each boots as a 2-node guest with KVM under TCG and runs `matrix.sh`: the probe and the
//! strategy per backend, one BIND with populate and placement, one restart, and a guest_memfd
//! region placed or refused with its reason. The rows it prints make README's table "What memplace
//! does on each kernel", which [`kernel_matrix_matches_readme`] compares with this run: a change in
//! what any kernel does fails the suite until README says so.

use super::gmem_cases::log;
use super::{
    Guest, KernelKind, LOG_TAIL_LINES, NUMA_DIR, Payload, boot_guest_with, boot_status_problem,
    tail,
};
use std::path::Path;

/// The checks `matrix.sh` reports as PASS on every kernel, besides the KVM modules' insmod lines.
const MATRIX_CHECKS: &[&str] = &[
    "matrix-kvm",
    "matrix-agent-start",
    "matrix-probe",
    "matrix-memfd",
    "matrix-gmem",
    "matrix-restart",
];

/// The table's rows, in order, with their labels. Every kernel must report every row.
const MATRIX_ROWS: &[(&str, &str)] = &[
    ("kvm-usable", "KVM usable by the agent"),
    ("guest-memfd", "guest_memfd for ordinary VMs (mmap)"),
    (
        "guest-memfd-shared-policy",
        "guest_memfd shared policy (mbind through any mapping)",
    ),
    (
        "guest-memfd-interleave-exact",
        "guest_memfd interleave by page offset",
    ),
    ("gmem-strategy", "strategy of a guest_memfd region"),
    (
        "gmem-bind-populate-placement",
        "guest_memfd BIND + Populate + GetPlacement",
    ),
    ("memfd-shared-policy", "memfd shared policy"),
    ("memfd-strategy", "strategy of a memfd region"),
    (
        "memfd-bind-populate-placement",
        "memfd BIND + Populate + GetPlacement (2 nodes)",
    ),
    ("restart-sigkill", "agent SIGKILL and restart"),
    ("hugetlb-shared-policy", "hugetlb shared policy"),
    ("preferred-many", "MPOL_PREFERRED_MANY"),
    ("weighted-interleave", "MPOL_WEIGHTED_INTERLEAVE"),
    ("pidfd-getfd", "pidfd_getfd (take fds back after a restart)"),
];

/// The kernels, in the table's column order, with their column headings.
const MATRIX_KERNELS: &[(KernelKind, &str, &str)] = &[
    (KernelKind::Old, "matrix-6.1", "6.1 (bookworm)"),
    (KernelKind::Lts, "matrix-6.12", "6.12 (LTS)"),
    (KernelKind::New, "matrix-7.x", "newest (7.x)"),
];

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
const BEGIN: &str = "<!-- kernel-matrix:begin -->";
const END: &str = "<!-- kernel-matrix:end -->";

#[test]
fn kernel_matrix_matches_readme() {
    let mut columns = Vec::new();
    let mut problems = Vec::new();
    let mut versions = Vec::new();
    for (kind, name, heading) in MATRIX_KERNELS {
        let guest = Guest {
            name,
            kernel: *kind,
            nodes: 2,
            kvm: true,
        };
        let payload = Payload {
            build_args: vec![
                "--scenario".into(),
                Path::new(NUMA_DIR).join("matrix.sh").into(),
            ],
            node_mb: None,
        };
        // 6.1 panics at boot under TCG ("IO-APIC + timer doesn't work") without it; harmless on
        // the others.
        let run = boot_guest_with(&guest, "no_timer_check", &payload);
        log!(
            "{}: {:.1} s, serial log {}",
            run.what,
            run.elapsed.as_secs_f64(),
            run.log.display()
        );
        let mut here = Vec::new();
        here.extend(boot_status_problem(run.status));
        let expected: Vec<&str> = ["insmod-irqbypass", "insmod-kvm", "insmod-kvm_amd"]
            .into_iter()
            .chain(MATRIX_CHECKS.iter().copied())
            .collect();
        for name in &expected {
            if run.report.passed.iter().filter(|p| p == name).count() != 1 {
                here.push(format!("check {name} did not pass exactly once"));
            }
        }
        for failure in &run.report.failed {
            here.push(format!("FAIL {failure}"));
        }
        for passed in &run.report.passed {
            if !expected.contains(&passed.as_str()) {
                here.push(format!("undeclared check {passed} passed"));
            }
        }
        if !run.report.done {
            here.push("no MEMPLACE-DONE line".to_owned());
        }
        let rows = matrix_rows(&run.text);
        for (key, _) in MATRIX_ROWS {
            if !rows.iter().any(|(k, _)| k == key) {
                here.push(format!("row {key} was not reported"));
            }
        }
        versions.push(format!(
            "{heading}: kernel {}",
            rows.iter()
                .find(|(k, _)| k == "kernel-series")
                .map_or("?", |(_, v)| v.as_str())
        ));
        if !here.is_empty() {
            problems.push(format!(
                "{}:\n    {}\n  last lines:\n{}",
                run.what,
                here.join("\n    "),
                tail(&run.text, LOG_TAIL_LINES)
            ));
        }
        columns.push((*heading, rows));
    }
    let table = render_table(&columns);
    log!(
        "kernel matrix of this run ({}):\n{table}",
        versions.join("; ")
    );
    assert!(
        problems.is_empty(),
        "the kernel matrix guests failed:\n  {}",
        problems.join("\n  ")
    );
    let readme = std::fs::read_to_string(README).expect("read README.md");
    let documented = readme_table(&readme).unwrap_or_else(|e| panic!("{e}"));
    if documented.trim() != table.trim() {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-matrix.md");
        let _ = std::fs::write(&out, &table);
        panic!(
            "README's table \"What memplace does on each kernel\" differs from this run; put this run's table \
             (also in {}) between {BEGIN} and {END}:\n{table}\nREADME has:\n{documented}",
            out.display()
        );
    }
}

/// The `MEMPLACE-MATRIX KEY=VALUE` lines of a serial log, in order.
fn matrix_rows(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|line| {
            let at = line.find("MEMPLACE-MATRIX ")?;
            let (key, value) = line[at + "MEMPLACE-MATRIX ".len()..].split_once('=')?;
            Some((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// The Markdown table: one row per [`MATRIX_ROWS`], one column per kernel.
fn render_table(columns: &[(&str, Vec<(String, String)>)]) -> String {
    let mut out = String::from("| | ");
    out.push_str(
        &columns
            .iter()
            .map(|(h, _)| *h)
            .collect::<Vec<_>>()
            .join(" | "),
    );
    out.push_str(" |\n|---|");
    out.push_str(&"---|".repeat(columns.len()));
    out.push('\n');
    for (key, label) in MATRIX_ROWS {
        out.push_str(&format!("| {label} |"));
        for (_, rows) in columns {
            let value = rows
                .iter()
                .find(|(k, _)| k == key)
                .map_or("(not reported)", |(_, v)| v.as_str());
            out.push_str(&format!(" {value} |"));
        }
        out.push('\n');
    }
    out
}

/// The text between README's markers.
fn readme_table(readme: &str) -> Result<String, String> {
    let start = readme
        .find(BEGIN)
        .ok_or_else(|| format!("README.md has no {BEGIN} marker"))?;
    let end = readme
        .find(END)
        .ok_or_else(|| format!("README.md has no {END} marker"))?;
    Ok(readme[start + BEGIN.len()..end].trim().to_owned())
}

#[test]
fn the_table_is_rendered_from_the_rows_in_order() {
    let log = "x MEMPLACE-MATRIX guest-memfd=no\nMEMPLACE-MATRIX kvm-usable=yes\nnoise";
    let rows = matrix_rows(log);
    assert_eq!(
        rows,
        [
            ("guest-memfd".to_owned(), "no".to_owned()),
            ("kvm-usable".to_owned(), "yes".to_owned())
        ]
    );
    let table = render_table(&[("6.1", rows)]);
    assert!(table.starts_with("| | 6.1 |\n|---|---|\n| KVM usable by the agent | yes |\n"));
    assert!(table.contains("| guest_memfd for ordinary VMs (mmap) | no |"));
    assert!(table.contains("| MPOL_PREFERRED_MANY | (not reported) |"));
    assert!(readme_table("no markers").is_err());
    assert_eq!(
        readme_table(&format!("a {BEGIN}\n| t |\n{END} b")).unwrap(),
        "| t |"
    );
}
