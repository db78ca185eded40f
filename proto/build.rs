//! Compiles proto/memplace/v1 with protox (no system protoc) and tonic-prost-build, and writes the
//! file descriptor set that the server's reflection service serves.

use std::{env, path::PathBuf};

/// The messages memplacectl prints.
const SERIALIZED: &[&str] = &[
    "Policy",
    "Range",
    "Region",
    "HugepagePool",
    "NumaNode",
    "Capabilities",
    "GetNodeInfoResponse",
    "NodePages",
    "PopulateSummary",
    "GetPlacementResponse",
    "RangePlacement",
    "ReconcileResponse",
    "WatchEventsResponse",
];

/// Field serde attributes: how each enum is spelled, what is not printed.
const FIELD_SERDE: &[(&str, &str)] = &[
    (
        "Policy.mode",
        r#"serialize_with = "crate::names::ser::policy_mode""#,
    ),
    (
        "Range.state",
        r#"serialize_with = "crate::names::ser::range_state""#,
    ),
    (
        "Range.governs",
        r#"serialize_with = "crate::names::ser::governs""#,
    ),
    ("Range.check", "skip"),
    (
        "Region.backend",
        r#"serialize_with = "crate::names::ser::backend""#,
    ),
    (
        "Region.strategy",
        r#"serialize_with = "crate::names::ser::strategy""#,
    ),
    (
        "Region.status",
        r#"serialize_with = "crate::names::ser::region_status""#,
    ),
    ("Region.hugepage_size_bytes", "skip"),
    ("Region.created_unix", "skip"),
    (
        "NumaNode.cpus",
        r#"serialize_with = "crate::names::ser::node_list""#,
    ),
    (
        "Capabilities.guest_memfd_interleave_exact",
        r#"serialize_with = "crate::names::ser::bool_or_unknown""#,
    ),
    (
        "WatchEventsResponse.kind",
        r#"serialize_with = "crate::names::ser::event_kind""#,
    ),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "memplace/v1/types.proto",
        "memplace/v1/agent.proto",
        "memplace/v1/handoff.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("memplace_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    let mut config = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true);
    // With the `serde` feature, the answers memplacectl prints derive Serialize, in the shape its
    // `--output json|yaml` has always had: enums by their short names (see src/names.rs), fields
    // that the CLI never printed skipped.
    for t in SERIALIZED {
        config = config.type_attribute(
            format!(".memplace.v1.{t}"),
            r#"#[cfg_attr(feature = "serde", derive(serde::Serialize))]"#,
        );
    }
    for (field, attr) in FIELD_SERDE {
        config = config.field_attribute(
            format!(".memplace.v1.{field}"),
            format!(r#"#[cfg_attr(feature = "serde", serde({attr}))]"#),
        );
    }
    config.compile_fds(fds)?;
    Ok(())
}
