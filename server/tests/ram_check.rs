//! tests/numa/ram-check.sh, the real-VMM tests' guest, run on the host under busybox sh (the
//! guest's shell) with a broken md5sum: a checksum it cannot have is a FAIL, never an OK. An empty
//! checksum compared with an empty checksum would otherwise report every check as passing.

mod common;

use common::lines::Lines;
use std::path::Path;
use std::process::{Command, Stdio};

const RAM_CHECK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/numa/ram-check.sh");

/// Runs ram-check.sh with `md5sum` as its md5sum until its first OK or FAIL line; returns that
/// line, and everything it said.
fn first_verdict(md5sum: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("md5sum");
    std::fs::write(&fake, format!("#!/bin/sh\n{md5sum}\n")).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox (Debian's busybox-static), the guest's shell, is not installed");
    let mut child = Command::new(busybox)
        .args(["sh", RAM_CHECK])
        .env("MEMPLACE_RAMCHECK_DIR", dir.path().join("ram"))
        .env("MEMPLACE_RAMCHECK_MB", "1")
        .env("MEMPLACE_RAMCHECK_MD5SUM", &fake)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("busybox sh ram-check.sh");
    let mut lines = Lines::of(&mut child);
    let verdict = lines.wait_for("first RAMCHECK OK or FAIL line", |l| {
        l.starts_with("RAMCHECK OK ") || l.starts_with("RAMCHECK FAIL ")
    });
    let _ = child.kill();
    let _ = child.wait();
    (verdict, lines.tail(20))
}

#[test]
fn an_empty_checksum_is_a_failure() {
    let (verdict, said) = first_verdict("exit 0");
    assert!(
        verdict.starts_with("RAMCHECK FAIL 0 "),
        "md5sum printed nothing, yet: {said}"
    );
}

#[test]
fn a_failing_md5sum_is_a_failure_even_when_it_prints_a_sum() {
    let (verdict, said) = first_verdict("echo 0123456789abcdef0123456789abcdef \"$1\"; exit 1");
    assert!(
        verdict.starts_with("RAMCHECK FAIL 0 "),
        "md5sum failed, yet: {said}"
    );
}

#[test]
fn a_working_md5sum_passes() {
    let (verdict, said) = first_verdict("exec md5sum \"$@\"");
    assert!(verdict.starts_with("RAMCHECK OK 1 "), "{said}");
}
