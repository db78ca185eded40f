//! The agent's SQLite file through the sqlite3 CLI (a separate process, as an operator would).

use super::lines::Lines;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// `sqlite3 -readonly FLAGS... DB SQL`, which must succeed; its stdout.
pub fn query(db: &Path, flags: &[&str], sql: &str) -> String {
    sqlite3(db, &[&["-readonly"], flags].concat(), sql)
}

/// `sqlite3 FLAGS... DB SQL` that may write (behind the agent's back), which must succeed; its
/// stdout.
pub fn write(db: &Path, flags: &[&str], sql: &str) -> String {
    sqlite3(db, flags, sql)
}

fn sqlite3(db: &Path, flags: &[&str], sql: &str) -> String {
    let o = Command::new("sqlite3")
        .args(flags)
        .arg(db)
        .arg(sql)
        .output()
        .expect("running the sqlite3 CLI (apt-get install sqlite3; .ci/test installs it)");
    assert!(o.status.success(), "sqlite3 {sql:?}: {o:?}");
    String::from_utf8(o.stdout).expect("sqlite3 output is UTF-8")
}

/// The sqlite3 CLI inside `BEGIN EXCLUSIVE` on `db`, holding the database's write lock until
/// dropped.
pub struct Locker {
    child: Child,
}

impl Locker {
    pub fn hold(db: &Path) -> Self {
        let mut child = Command::new("sqlite3")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sqlite3 CLI");
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(stdin, "BEGIN EXCLUSIVE;").unwrap();
        writeln!(stdin, "SELECT 'locked';").unwrap();
        stdin.flush().unwrap();
        let line = Lines::of(&mut child).wait_for("\"locked\" answer to BEGIN EXCLUSIVE", |_| true);
        assert_eq!(line.trim(), "locked");
        Self { child }
    }
}

impl Drop for Locker {
    fn drop(&mut self) {
        if let Some(mut s) = self.child.stdin.take() {
            let _ = writeln!(s, "ROLLBACK;");
        }
        let _ = self.child.wait();
    }
}
