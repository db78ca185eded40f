//! Kill points for the crash test (`server/tests/crash_consistency.rs`): named places in a
//! mutation where a test can make the agent die, such as right after the SQLite commit and
//! before the kernel change, or after the kernel change and before the reply.
//!
//! The hook exists only in a build with the `failpoints` feature (the test command builds with
//! it). In any other build [`hit`] is empty and nothing reads the environment.
//!
//! With the feature, `MEMPLACE_FAILPOINT=NAME:N` makes the (N+1)-th pass through the kill point
//! `NAME` (and any later one) log a line naming the request and end the process at once with
//! exit status [`exit_status`]`(NAME)`, so a test can tell that this kill point, and no other
//! death, ended the agent, and which request it was in. Without the variable every kill point is
//! passed through.

/// Every kill point, in the order that gives each its exit status.
pub const POINTS: &[&str] = &[
    "CreateRegion.after-commit",
    "CreateRegion.before-reply",
    "SetPolicy.after-commit",
    "SetPolicy.before-reply",
    "DeleteRegion.after-commit",
    "DeleteRegion.before-reply",
];

/// The exit status of an agent ended by kill point `name` (None for an unknown name).
pub fn exit_status(name: &str) -> Option<i32> {
    POINTS
        .iter()
        .position(|p| *p == name)
        .map(|i| 100 + i as i32)
}

/// Reads `MEMPLACE_FAILPOINT` at start. A no-op without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn arm() -> Result<(), String> {
    Ok(())
}

/// Passes through kill point `name` in the mutation with `request_id`. Only a `failpoints` build
/// can end the process here.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &'static str, _request_id: &str) {}

/// The armed kill point, the number of passes to let through, and the passes so far.
#[cfg(feature = "failpoints")]
type Armed = Option<(String, u64, std::sync::atomic::AtomicU64)>;

#[cfg(feature = "failpoints")]
static ARMED: std::sync::OnceLock<Armed> = std::sync::OnceLock::new();

/// Reads `MEMPLACE_FAILPOINT` (`NAME` or `NAME:N`) at start; a malformed value is an error, so
/// a test cannot arm a kill point that will never fire.
#[cfg(feature = "failpoints")]
pub fn arm() -> Result<(), String> {
    let armed = match std::env::var("MEMPLACE_FAILPOINT") {
        Err(_) => None,
        Ok(spec) => {
            let (point, skip) = spec.split_once(':').unwrap_or((spec.as_str(), "0"));
            let skip = skip
                .parse()
                .map_err(|_| format!("MEMPLACE_FAILPOINT={spec:?}: {skip:?} is not a count"))?;
            if exit_status(point).is_none() {
                return Err(format!(
                    "MEMPLACE_FAILPOINT={spec:?}: no kill point {point:?} (there are {POINTS:?})"
                ));
            }
            Some((point.to_string(), skip, Default::default()))
        }
    };
    if let Some((point, skip, _)) = &armed {
        eprintln!("memplaced: kill point {point} armed after {skip} passes");
    }
    let _ = ARMED.set(armed);
    Ok(())
}

/// Passes through kill point `name` in the mutation with `request_id`; ends the process if
/// `MEMPLACE_FAILPOINT` armed it and its passes are used up, after logging the request id.
#[cfg(feature = "failpoints")]
pub fn hit(name: &'static str, request_id: &str) {
    use std::sync::atomic::Ordering;
    let Some(Some((point, skip, passes))) = ARMED.get() else {
        return;
    };
    if point != name || passes.fetch_add(1, Ordering::SeqCst) < *skip {
        return;
    }
    let status = exit_status(name).unwrap_or(1);
    eprintln!(
        "memplaced: kill point {name} hit by request {request_id:?}: exiting with status {status}"
    );
    std::process::exit(status);
}

/// A pause before a mutation is taken on (before its own task starts), for requests whose id
/// ends in a suffix: with the `failpoints` feature, `MEMPLACE_FAILPOINT_PAUSE=SUFFIX:MS` makes
/// such a request wait MS milliseconds there, so a test can abandon a call (its deadline passes)
/// before the agent takes it on, deterministically. A no-op in any other build.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn pause_before_take_on(_request_id: &str) {}

/// See the no-feature version.
#[cfg(feature = "failpoints")]
pub async fn pause_before_take_on(request_id: &str) {
    static PAUSE: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        let spec = std::env::var("MEMPLACE_FAILPOINT_PAUSE").ok()?;
        let (suffix, ms) = spec.rsplit_once(':')?;
        Some((suffix.to_string(), ms.parse().ok()?))
    });
    if let Some((suffix, ms)) = pause
        && !suffix.is_empty()
        && request_id.ends_with(suffix.as_str())
    {
        tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
    }
}
