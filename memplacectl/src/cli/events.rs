//! `memplacectl events` and `token`.

use super::Output;
use super::render::{self, enum_name, utc_time};
use memplace_client::{Client, ClientError, pb};
use serde::Serialize;

/// `events`: the event log; with `follow`, keep streaming.
pub(crate) async fn events(
    c: &mut Client,
    vm: String,
    after: u64,
    follow: bool,
    out: Output,
) -> Result<(), ClientError> {
    let mut s = c
        .watch_events(pb::WatchEventsRequest {
            vm_id: vm,
            after_sequence: after,
            no_follow: !follow,
        })
        .await?;
    if out == Output::Table {
        println!(
            "{:>6}  {:<23}  {:<15} {:<24} {:<9} MESSAGE",
            "SEQ", "TIME (UTC)", "KIND", "REGION", "ACTOR"
        );
    }
    while let Some(e) = s.message().await? {
        render::print_item(out, &e, || {
            println!(
                "{:>6}  {:<23}  {:<15} {:<24} {:<9} {}",
                e.sequence,
                utc_time(e.time_unix_ms),
                enum_name(e.kind().as_str_name(), "EVENT_KIND_"),
                if e.vm_id.is_empty() {
                    "-".to_string()
                } else {
                    format!("{}/{}", e.vm_id, e.name)
                },
                e.actor,
                e.message,
            )
        });
    }
    Ok(())
}

/// `token`: the VM's handoff token.
pub(crate) async fn token(c: &mut Client, vm: String, out: Output) -> Result<(), ClientError> {
    #[derive(Serialize)]
    struct Token {
        vm_id: String,
        handoff_token: String,
    }
    let handoff_token = c.issue_handoff_token(&vm).await?;
    let v = Token {
        vm_id: vm,
        handoff_token,
    };
    render::print(out, &v, || println!("{}", v.handoff_token));
    Ok(())
}
