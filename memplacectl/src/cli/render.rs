//! The one renderer of memplacectl. `json` and `yaml` print the serialized answer (the API's
//! messages derive Serialize with short enum names, see memplace_proto::names); the keys come out
//! sorted, as they always have. `table` runs the command's own layout.

use super::Output;
use memplace_client::pb;
pub(crate) use memplace_proto::names::{enum_name, mode_name, node_list};
use serde::Serialize;

/// Prints `v` as `out` asks: one pretty JSON document, one YAML document, or `table()`.
pub(crate) fn print<T: Serialize + ?Sized>(out: Output, v: &T, table: impl FnOnce()) {
    match out {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&value(v)).unwrap_or_default()
        ),
        Output::Yaml => print!("{}", serde_norway::to_string(&value(v)).unwrap_or_default()),
        Output::Table => table(),
    }
}

/// One item of a stream (`events`): one compact JSON object per line, so `--follow` output can
/// be read line by line, or one YAML document per item; `table()` for tables.
pub(crate) fn print_item<T: Serialize + ?Sized>(out: Output, v: &T, table: impl FnOnce()) {
    match out {
        Output::Json => println!("{}", value(v)),
        Output::Yaml => print!(
            "---\n{}",
            serde_norway::to_string(&value(v)).unwrap_or_default()
        ),
        Output::Table => table(),
    }
}

/// The answer as a JSON value: its object keys sorted (serde_json's map), so JSON and YAML list
/// fields in the same, stable order.
fn value<T: Serialize + ?Sized>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

pub(crate) fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Unix milliseconds as RFC 3339 in UTC, to the millisecond (`2026-12-07T11:41:43.123Z`).
pub(crate) fn utc_time(unix_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub(crate) fn policy_text(p: Option<&pb::Policy>) -> String {
    match p {
        None => "-".into(),
        Some(p) => {
            let mut s = mode_name(p.mode);
            if !p.nodes.is_empty() {
                s.push(' ');
                s.push_str(&node_list(&p.nodes));
            }
            if p.static_nodes {
                s.push_str(" static");
            }
            if p.relative_nodes {
                s.push_str(" relative");
            }
            s
        }
    }
}

pub(crate) fn print_region_table(r: &pb::Region) {
    println!(
        "{}/{}  {}  {}  {}  generation {}  {}",
        r.vm_id,
        r.name,
        enum_name(r.backend().as_str_name(), "BACKEND_"),
        human(r.size_bytes),
        enum_name(r.strategy().as_str_name(), "STRATEGY_"),
        r.generation,
        enum_name(r.status().as_str_name(), "REGION_STATUS_"),
    );
    if r.observed_at_unix_ms > 0 {
        println!("  observed at {} UTC", utc_time(r.observed_at_unix_ms));
    }
    println!(
        "  {:<14} {:<12} {:<24} {:<24} {:<9} note",
        "OFFSET", "LENGTH", "INTENDED", "OBSERVED", "STATE"
    );
    for x in &r.ranges {
        let note = if !x.last_error.is_empty() {
            x.last_error.clone()
        } else if x.governs() == pb::Governs::AgentAllocationsOnly {
            "binds only pages memplace allocates (task policy)".into()
        } else {
            String::new()
        };
        println!(
            "  {:<14} {:<12} {:<24} {:<24} {:<9} {}",
            format!("{:#x}", x.offset),
            human(x.length),
            policy_text(x.intended.as_ref()),
            policy_text(x.observed.as_ref()),
            enum_name(x.state().as_str_name(), "RANGE_STATE_"),
            note
        );
    }
}

/// Bold red when stdout is a terminal, plain text otherwise (pipes, files, tests).
pub(crate) fn alarm(text: &str) -> String {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        format!("\x1b[1;31m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}
