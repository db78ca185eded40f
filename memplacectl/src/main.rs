//! `memplacectl`: the command line of memplace.
//!
//! Exit codes: 0 success; 1 a local error (bad input, connection failure, handoff refusal); 2 bad
//! usage; and 10 + the gRPC code when the agent refuses, printing the agent's message (11 =
//! CANCELLED, 13 = INVALID_ARGUMENT, 14 = DEADLINE_EXCEEDED, 15 = NOT_FOUND, 16 = ALREADY_EXISTS,
//! 17 = PERMISSION_DENIED, 18 = RESOURCE_EXHAUSTED, 19 = FAILED_PRECONDITION, 20 = ABORTED,
//! 23 = INTERNAL, 24 = UNAVAILABLE, 25 = DATA_LOSS).
//!
//! Every read command takes `--output table|json|yaml`. JSON is one pretty-printed document
//! (for `events`, one compact object per line), with field names and enum spellings that stay
//! stable for scripts.

#![forbid(unsafe_code)]

mod cli;

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memplacectl: {e}");
            match e.code() {
                Some(code) => ExitCode::from(10 + code as u8),
                None => ExitCode::from(1),
            }
        }
    }
}
