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

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS.mmm` (UTC).
pub(crate) fn utc_time(unix_ms: i64) -> String {
    let (days, ms) = (
        unix_ms.div_euclid(86_400_000),
        unix_ms.rem_euclid(86_400_000),
    );
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
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

/// Whether stderr is a terminal, so a progress bar can redraw in place.
pub(crate) fn stderr_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
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
