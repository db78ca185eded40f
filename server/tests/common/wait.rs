//! Deadlines for the tests' waits. Every wait for something that may never come (a line from a
//! child, an event on a following stream, a state polled in a loop) goes through one of these, so
//! that a hang becomes a failure naming what was awaited. The limits are guards against hanging,
//! not measurements: nothing passes or fails for being quick.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long a test waits for something that should come promptly (an event after the call that
/// causes it, a child's first line) before it fails.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Awaits `fut`; panics naming `what` if it has not finished within `limit`.
pub async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("waited {limit:?} for {what}, and it never came"),
    }
}

/// Calls `probe` every `every` until it returns Some; panics naming `what` once `limit` has
/// passed.
pub fn until<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "waited {limit:?} for {what}, and it never came"
        );
        std::thread::sleep(every);
    }
}

/// The async form of [`until`]: `probe` is awaited each time.
pub async fn until_async<T, F: Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "waited {limit:?} for {what}, and it never came"
        );
        tokio::time::sleep(every).await;
    }
}
