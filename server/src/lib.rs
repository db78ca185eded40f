//! memplace's agent library: `memplaced` is a thin binary over [`app::run`].
//!
//! Modules, in dependency order: [`domain`] (vocabulary, no I/O), [`kernel`] (the `memplace-sys`
//! crate: every syscall and all unsafe code; this crate forbids it), [`topology`] (sysfs),
//! [`store`] (SQLite), [`reconcile`] (the engine), [`convert`] (proto ↔ domain, for both edges),
//! [`handoff`] (the VMM fd socket), [`api`] (gRPC edge), and [`auth`], [`config`], [`metrics`],
//! [`app`] (wiring). [`failpoint`] holds the crash test's kill points (feature `failpoints`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod convert;
pub mod domain;
pub mod failpoint;
pub mod handoff;
pub use memplace_sys as kernel;
pub mod engine;
pub mod metrics;
pub mod shed;
pub mod store;
pub mod tls;
pub mod topology;
