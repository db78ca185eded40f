//! A child process's output, line by line, read on threads so that a test can wait for one line
//! while the child keeps writing.

use std::io::{BufRead, BufReader, Read};
use std::process::Child;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::wait::PATIENCE;

/// The lines of a child's stdout and stderr (whichever were piped), and those read so far.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    /// Every line taken so far, in order.
    pub seen: Vec<String>,
}

impl Lines {
    /// Takes the child's piped stdout and stderr and reads them on threads.
    pub fn of(child: &mut Child) -> Lines {
        let (tx, rx) = mpsc::channel();
        let mut outs: Vec<Box<dyn Read + Send>> = vec![];
        if let Some(o) = child.stdout.take() {
            outs.push(Box::new(o));
        }
        if let Some(e) = child.stderr.take() {
            outs.push(Box::new(e));
        }
        assert!(
            !outs.is_empty(),
            "the child has neither stdout nor stderr piped"
        );
        for out in outs {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Lines { rx, seen: vec![] }
    }

    /// The next line within `within` (a guard against hanging), recorded in `seen`.
    pub fn next_within(&mut self, within: Duration) -> Result<String, RecvTimeoutError> {
        let l = self.rx.recv_timeout(within)?;
        self.seen.push(l.clone());
        Ok(l)
    }

    /// A line already read by the threads, if any, recorded in `seen`.
    pub fn try_next(&mut self) -> Option<String> {
        let l = self.rx.try_recv().ok()?;
        self.seen.push(l.clone());
        Some(l)
    }

    /// The next line that `want` accepts, within [`PATIENCE`]; panics naming `what` (and the
    /// lines seen) if the output closes first or the line does not come in time.
    pub fn wait_for(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        self.wait_for_within(what, PATIENCE, want)
    }

    /// [`Lines::wait_for`] with a limit of `limit`.
    pub fn wait_for_within(
        &mut self,
        what: &str,
        limit: Duration,
        want: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left) {
                Ok(l) if want(&l) => return l,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!(
                    "waited {limit:?} for the child's {what}, and it never came; it said:\n{}",
                    self.tail(40)
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "the child's output closed before its {what}; it said:\n{}",
                    self.tail(40)
                ),
            }
        }
    }

    /// The last `n` lines seen.
    pub fn tail(&self, n: usize) -> String {
        self.seen[self.seen.len().saturating_sub(n)..].join("\n")
    }
}
