//! Test support shared by the integration tests and the bench table (`benches/table/main.rs`
//! includes this module with `#[path]`): the real `memplaced` binary on a temp socket and a temp
//! state dir (agent: AgentProc), the workspace's other binaries, and in submodules what several
//! test files need: events (the stored event log), holder (processes holding a region's file),
//! lines (a child's output on threads), metrics (/metrics), net (loopback ports), procfs (/proc),
//! qemu (the real-VMM tests' guest), readme (documented commands), sqlite (the state file through
//! the sqlite3 CLI), tls (test certificates), wait (deadlines for waits).
//!
//! Every test binary compiles all of it (`mod common;`), so unused items are allowed here.
#![allow(dead_code)]

pub mod agent;
pub mod events;
pub mod holder;
pub mod lines;
pub mod metrics;
pub mod net;
pub mod procfs;
pub mod qemu;
pub mod readme;
pub mod sqlite;
pub mod tls;
pub mod wait;

// Not every test binary starts an agent.
#[allow(unused_imports)]
pub use agent::AgentProc;

use memplace_client::pb;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A binary of the workspace, built beside memplaced (the test command builds the workspace).
fn sibling(name: &str) -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_memplaced"));
    let p = exe.with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

/// The memplacectl binary.
pub fn ctl_path() -> PathBuf {
    sibling("memplacectl")
}

/// `memplace-test-standin` (the testsupport crate's stand-in VMM processes).
pub fn standin_path() -> PathBuf {
    sibling("memplace-test-standin")
}

pub fn policy(mode: pb::PolicyMode, nodes: &[u32]) -> pb::Policy {
    pb::Policy {
        mode: mode as i32,
        nodes: nodes.to_vec(),
        static_nodes: false,
        relative_nodes: false,
    }
}

pub const MIB: u64 = 1 << 20;

/// Exit code, stdout and stderr of one command run to its end.
pub struct Run {
    pub code: i32,
    pub out: String,
    pub err: String,
}

impl Run {
    pub fn of(cmd: &mut Command) -> Run {
        let o = cmd.output().expect("running memplacectl");
        Run {
            code: o.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&o.stdout).into(),
            err: String::from_utf8_lossy(&o.stderr).into(),
        }
    }

    /// Asserts success and returns stdout.
    pub fn ok(self) -> String {
        assert_eq!(self.code, 0, "stderr: {}\nstdout: {}", self.err, self.out);
        self.out
    }

    /// Asserts success and returns stdout parsed as JSON.
    pub fn json(self) -> serde_json::Value {
        let out = self.ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }
}

/// One range over the whole region with policy `p`, as CreateRegion takes it.
pub fn whole(p: pb::Policy) -> Vec<pb::RangePolicy> {
    vec![pb::RangePolicy {
        offset: 0,
        length: 0,
        policy: Some(p),
    }]
}
