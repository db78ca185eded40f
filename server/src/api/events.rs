//! WatchEvents: the event log, replayed from a cursor and then followed live, each event
//! exactly once.

use super::status_of;
use crate::convert::event_to_pb;
use crate::domain::Event;
use crate::engine::Agent;
use memplace_proto::v1 as pb;
use std::sync::Arc;
use tonic::Status;

/// Events read from the log per query.
const EVENT_PAGE: i64 = 1000;

/// One WatchEvents stream: every event after `cursor`, in sequence order, exactly once.
///
/// `cursor` is a sequence number of the whole log (not only of the watched VM): every event up
/// to it has been sent or filtered out. The live feed is only a fast path. Whenever it cannot
/// be trusted to hold the next event, the stream reads the log from `cursor` until it is caught
/// up. That happens when the feed lagged (it dropped events), and when an event arrives past
/// `cursor + 1`. Concurrent commits broadcast their events in any order, but an event's sequence
/// is assigned in commit order, so every earlier event is already in the log by then.
pub(super) struct EventWatch {
    pub(super) agent: Arc<Agent>,
    pub(super) vm: Option<String>,
    pub(super) tx: tokio::sync::mpsc::Sender<Result<pb::WatchEventsResponse, Status>>,
    pub(super) cursor: u64,
}

/// Why a stream stopped.
enum WatchEnd {
    /// The client went away.
    Gone,
    /// The log could not be read; the client was sent the error.
    Failed,
}

impl EventWatch {
    pub(super) async fn run(
        mut self,
        mut live: tokio::sync::broadcast::Receiver<Event>,
        no_follow: bool,
    ) {
        if self.catch_up().await.is_err() || no_follow {
            return;
        }
        loop {
            let step = match live.recv().await {
                Ok(e) if e.sequence <= self.cursor => Ok(()),
                Ok(e) if e.sequence == self.cursor + 1 => self.send(&e).await,
                // An event past the next one: the ones between are committed but either still
                // on their way through the feed or dropped from it. Read them from the log.
                Ok(_) => self.catch_up().await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.catch_up().await,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if step.is_err() {
                return;
            }
        }
    }

    /// Sends `e` if it is of the watched VM, and moves the cursor past it.
    async fn send(&mut self, e: &Event) -> Result<(), WatchEnd> {
        self.cursor = e.sequence;
        if self.vm.as_deref().is_some_and(|v| v != e.vm_id) {
            return Ok(());
        }
        self.tx
            .send(Ok(event_to_pb(e)))
            .await
            .map_err(|_| WatchEnd::Gone)
    }

    /// Reads the log after the cursor, page by page, until a page comes back empty.
    async fn catch_up(&mut self) -> Result<(), WatchEnd> {
        loop {
            let page = match self
                .agent
                .store()
                .events_after(self.cursor, None, EVENT_PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    let _ = self.tx.send(Err(status_of(e.into()))).await;
                    return Err(WatchEnd::Failed);
                }
            };
            let Some(first) = page.first() else {
                return Ok(());
            };
            // Sequences are contiguous (AUTOINCREMENT, rolled back with a failed commit), so a
            // first event past `cursor + 1` means the log dropped events this stream still owed:
            // it keeps only the newest EVENT_LOG_LIMIT. Say so, rather than skip them silently.
            // A stream that starts at 0 asked for "whatever the log holds", so nothing is owed.
            if self.cursor > 0 && first.sequence > self.cursor + 1 {
                let st = Status::out_of_range(format!(
                    "events {}..{} were dropped from the log before this stream read them (the log \
                     keeps the newest {}); list the current state, then watch again from sequence \
                     {} or 0",
                    self.cursor + 1,
                    first.sequence - 1,
                    crate::store::EVENT_LOG_LIMIT,
                    first.sequence - 1
                ));
                let _ = self.tx.send(Err(st)).await;
                return Err(WatchEnd::Failed);
            }
            for e in &page {
                self.send(e).await?;
            }
        }
    }
}
