//! The real `memplaced` on a temp socket and a temp state dir, for the integration tests and the
//! bench table alike (the bench includes `common/` with `#[path]`, so both start the agent with
//! this code).

use super::wait::PATIENCE;
use memplace_client::Client;
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
        Self::start_in_dir(tempfile::tempdir().expect("tempdir"), extra).0
    }

    /// Starts an agent in a new temp dir under `parent` (the bench keeps its state on the disk of
    /// the target dir); returns it and the time until its socket accepted.
    pub fn start_in(parent: &Path, extra: &[&str]) -> (Self, Duration) {
        let dir = tempfile::Builder::new()
            .prefix("agent")
            .tempdir_in(parent)
            .expect("tempdir");
        Self::start_in_dir(dir, extra)
    }

    fn start_in_dir(dir: tempfile::TempDir, extra: &[&str]) -> (Self, Duration) {
        let mut a = AgentProc {
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        let took = a.spawn();
        (a, took)
    }

    /// Starts the binary and waits for its socket to answer; returns the time from the spawn until
    /// the socket accepted (the agent recovers every region before it binds, so this is the
    /// restart time).
    pub fn spawn(&mut self) -> Duration {
        self.spawn_with_env(&[])
    }

    /// Starts the binary with extra environment variables and waits for its socket to answer;
    /// returns the time it took, as [`AgentProc::spawn`].
    pub fn spawn_with_env(&mut self, env: &[(&str, &str)]) -> Duration {
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
        let start = Instant::now();
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
        self.wait_ready(start)
    }

    /// Polls the socket every millisecond (the bench's restart times are read from this) until it
    /// accepts, for at most [`PATIENCE`].
    fn wait_ready(&mut self, start: Instant) -> Duration {
        while start.elapsed() < PATIENCE {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "memplaced exited early with {status}: {}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!(
            "waited {PATIENCE:?} for memplaced to accept on {}, and it never did",
            self.socket().display()
        );
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

    pub fn restart(&mut self) -> Duration {
        self.kill();
        self.spawn()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub async fn client(&self) -> Client {
        Client::connect_unix(self.socket()).await.expect("connect")
    }

    /// memplacectl against this agent.
    pub fn ctl(&self) -> Command {
        let mut c = Command::new(super::ctl_path());
        c.arg("--socket").arg(self.socket());
        c
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}
