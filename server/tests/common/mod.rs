//! Test support shared by the integration tests: the real `memplaced` binary on a temp socket and
//! a temp state dir (AgentProc), the workspace's other binaries, and in submodules what several
//! test files need: events (the stored event log), holder (processes holding a region's file),
//! lines (a child's output on threads), metrics (/metrics), net (loopback ports), procfs (/proc),
//! qemu (the real-VMM tests' guest), readme (documented commands), sqlite (the state file through
//! the sqlite3 CLI), tls (test certificates), wait (deadlines for waits).
//!
//! Every test binary compiles all of it (`mod common;`), so unused items are allowed here.
#![allow(dead_code)]

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

use memplace_client::{Client, pb};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running agent.
pub struct AgentProc {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub extra: Vec<String>,
}

impl AgentProc {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir().join("memplace.sock")
    }
    pub fn handoff_socket(&self) -> PathBuf {
        self.runtime_dir().join("handoff.sock")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("memplaced.log")
    }

    /// Starts an agent in a new temp dir.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let mut a = AgentProc {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        a.spawn();
        a
    }

    /// Starts the binary and waits for its socket to answer.
    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// Starts the binary with extra environment variables and waits for its socket to answer.
    pub fn spawn_with_env(&mut self, env: &[(&str, &str)]) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log file");
        // Test defaults, unless the test gives the flag itself (clap refuses a repeated flag).
        let mut defaults = vec![];
        for (flag, value) in [
            ("--metrics-addr", "off"),
            ("--reconcile-interval-secs", "0"),
        ] {
            if !self.extra.iter().any(|a| a == flag) {
                defaults.extend([flag, value]);
            }
        }
        let child = Command::new(env!("CARGO_BIN_EXE_memplaced"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--runtime-dir")
            .arg(self.runtime_dir())
            .args(&defaults)
            .args(&self.extra)
            .env("MEMPLACE_LOG_LEVEL", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning memplaced");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "memplaced exited early with {status}: {}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("memplaced did not open {} in 30 s", self.socket().display());
    }

    /// SIGKILL, no cleanup.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the agent to end by itself and returns how it ended; None if it is still
    /// running after `within` (a guard against hanging, not a measurement: it is left running).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub async fn client(&self) -> Client {
        Client::connect_unix(self.socket()).await.expect("connect")
    }

    /// memplacectl against this agent.
    pub fn ctl(&self) -> Command {
        let mut c = Command::new(ctl_path());
        c.arg("--socket").arg(self.socket());
        c
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

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
