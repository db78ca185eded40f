//! Processes that hold a region's file: `memplacectl hold` and the stand-in VMMs of
//! `memplace-test-standin`, driven through stdin and their output lines.

use super::lines::Lines;
use super::procfs::signal;
use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

/// A separate process holding a region's file (`memplacectl hold`, a stand-in VMM), its stdout and
/// stderr read line by line; killed on drop.
pub struct HolderProc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub lines: Lines,
}

impl HolderProc {
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning a holder");
        HolderProc {
            stdin: child.stdin.take(),
            lines: Lines::of(&mut child),
            child,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The next line that starts with `prefix` (or fails, with everything the holder said).
    pub fn expect_line(&mut self, prefix: &str) -> String {
        loop {
            match self.lines.next_within(Duration::from_secs(30)) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "holder pid {} never said {prefix:?}; it said: {:#?} (exit: {:?})",
                    self.pid(),
                    self.lines.seen,
                    self.child.try_wait()
                ),
            }
        }
    }

    /// SIGUSR1 to `memplacectl hold`: it verifies its pattern and answers.
    pub fn pattern_after_sigusr1(&mut self) -> String {
        signal(self.pid(), "USR1");
        self.expect_line("pattern ")
    }

    /// A command line to the stand-in VMM.
    pub fn tell(&mut self, cmd: &str) {
        let s = self.stdin.as_mut().expect("stdin");
        writeln!(s, "{cmd}").expect("writing to the VMM");
        s.flush().expect("flush");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HolderProc {
    fn drop(&mut self) {
        self.kill();
    }
}
