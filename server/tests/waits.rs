//! The tests' deadlines (common::wait, common::lines): a wait for something that never comes
//! fails, and its failure names what it waited for. Each case runs its wait on another task and
//! gives it a generous guard of its own, so that a wait without a deadline fails here instead of
//! hanging the suite.

mod common;

use common::lines::Lines;
use common::wait;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long a case lets the wait under test take before it calls that wait unbounded.
const GUARD: Duration = Duration::from_secs(60);

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Runs `f` on a thread; the text it panicked with, or a failure if it returned or did not end
/// within GUARD.
fn panics_with(what: &str, f: impl FnOnce() + Send + 'static) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r.err().map(panic_text));
    });
    match rx.recv_timeout(GUARD) {
        Ok(Some(text)) => text,
        Ok(None) => panic!("{what} returned, but what it waited for never comes"),
        Err(_) => panic!("{what} was still waiting after {GUARD:?}: it has no deadline"),
    }
}

#[test]
fn a_line_that_never_comes_fails_naming_it_and_what_the_child_said() {
    let mut child = Command::new("sh")
        .args(["-c", "echo the-only-line; exec sleep 600"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh");
    let mut lines = Lines::of(&mut child);
    let text = panics_with("Lines::wait_for_within", move || {
        lines.wait_for_within("line two", Duration::from_secs(1), |l| l == "two");
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains("line two") && text.contains("the-only-line"),
        "the failure must name the line awaited and what was said: {text}"
    );
}

#[test]
fn output_that_closes_first_fails_naming_the_line() {
    let mut child = Command::new("sh")
        .args(["-c", "echo bye"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh");
    let mut lines = Lines::of(&mut child);
    let text = panics_with("Lines::wait_for", move || {
        lines.wait_for("hello line", |l| l == "hello");
    });
    let _ = child.wait();
    assert!(
        text.contains("closed") && text.contains("hello line") && text.contains("bye"),
        "{text}"
    );
}

#[test]
fn a_future_that_never_finishes_fails_naming_it() {
    let text = panics_with("wait::within", || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(wait::within(
                "the event that never comes",
                Duration::from_millis(200),
                std::future::pending::<()>(),
            ));
    });
    assert!(text.contains("the event that never comes"), "{text}");
}

#[test]
fn a_poll_that_never_succeeds_fails_naming_it() {
    let text = panics_with("wait::until", || {
        wait::until(
            "a state that never comes",
            Duration::from_millis(200),
            Duration::from_millis(10),
            || None::<()>,
        );
    });
    assert!(text.contains("a state that never comes"), "{text}");
    let text = panics_with("wait::until_async", || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(wait::until_async(
                "an async state that never comes",
                Duration::from_millis(200),
                Duration::from_millis(10),
                || async { None::<()> },
            ));
    });
    assert!(text.contains("an async state that never comes"), "{text}");
}
