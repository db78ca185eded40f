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
