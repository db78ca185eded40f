//! The agent's stored event log, read through WatchEvents.

use memplace_client::{Client, pb};

/// Every stored event after sequence `after` (of one VM if `vm` is not empty), oldest first,
/// read without following; checked to be in strictly increasing sequence order.
pub async fn stored_events(c: &mut Client, vm: &str, after: u64) -> Vec<pb::WatchEventsResponse> {
    let mut s = c
        .watch_events(pb::WatchEventsRequest {
            vm_id: vm.into(),
            after_sequence: after,
            no_follow: true,
        })
        .await
        .expect("WatchEvents");
    let mut out = Vec::new();
    while let Some(e) = s.message().await.expect("event stream") {
        out.push(e);
    }
    let mut last = after;
    for e in &out {
        assert!(
            e.sequence > last,
            "event sequences must strictly increase: {} after {last}",
            e.sequence
        );
        last = e.sequence;
    }
    out
}

/// The sequence of the newest stored event (of one VM if `vm` is not empty), 0 if none.
pub async fn last_sequence(c: &mut Client, vm: &str) -> u64 {
    stored_events(c, vm, 0)
        .await
        .last()
        .map_or(0, |e| e.sequence)
}
