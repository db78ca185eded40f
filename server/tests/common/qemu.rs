//! The guest kernel and scripts that the real-VMM tests (vmm_exec, vmm_attach) boot QEMU with.

use std::path::{Path, PathBuf};
use std::process::Command;

/// server/tests/numa: the guest scripts.
pub const NUMA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/numa");

/// `bash tests/numa/NAME`.
pub fn script(name: &str) -> Command {
    let mut c = Command::new("bash");
    c.arg(Path::new(NUMA_DIR).join(name));
    c
}

/// The Debian 6.12 cloud kernel that fetch-kernels.sh caches (fetched on the first run).
pub fn lts_kernel() -> PathBuf {
    let o = script("fetch-kernels.sh")
        .output()
        .expect("running fetch-kernels.sh");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "fetch-kernels.sh failed ({}), so the QEMU guest cannot boot:\n{err}",
        o.status
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let path = out
        .lines()
        .find_map(|l| l.strip_prefix("lts_vmlinuz="))
        .unwrap_or_else(|| panic!("fetch-kernels.sh printed no lts_vmlinuz:\n{out}\n{err}"));
    PathBuf::from(path.trim())
}

/// The busybox initramfs of build-initramfs.sh whose /scenario.sh is ram-check.sh: random data
/// in guest RAM, checked again and again (`RAMCHECK` lines on the console; kernel argument
/// memplace.ramcheck_mb=N sets the amount).
pub fn ram_check_initramfs(dir: &Path) -> PathBuf {
    let out = dir.join("ram-check.cpio");
    let o = script("build-initramfs.sh")
        .arg("--scenario")
        .arg(Path::new(NUMA_DIR).join("ram-check.sh"))
        .arg(&out)
        .output()
        .expect("running build-initramfs.sh");
    assert!(
        o.status.success(),
        "build-initramfs.sh failed ({}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    out
}
