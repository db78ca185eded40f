//! Logs go to stderr: human-readable lines, or JSON. Colour codes only when stderr is a terminal,
//! so a file or journald receives plain text.

use crate::config::Config;
use std::io::IsTerminal;

/// Installs the global log subscriber for `cfg`.
pub(super) fn init(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if cfg.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
