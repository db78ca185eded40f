//! `memplacectl policy set`.

use super::render::{self, print_region_table};
use super::{Output, SpanArgs, parse_size};
use clap::Subcommand;
use memplace_client::{Client, ClientError, pb};
use serde::Serialize;

#[derive(Subcommand, Debug)]
pub(crate) enum PolicyCmd {
    /// Set the policy of a byte range.
    Set {
        #[command(flatten)]
        span: SpanArgs,
        /// Mode: default, bind, preferred, interleave, preferred-many, weighted-interleave, local.
        #[arg(long)]
        mode: String,
        /// Nodes in numactl syntax, e.g. 0-3,5.
        #[arg(long, default_value = "")]
        nodes: String,
        /// Move already-allocated pages (memfd).
        #[arg(long)]
        migrate: bool,
        /// MPOL_F_STATIC_NODES.
        #[arg(long = "static")]
        static_nodes: bool,
        /// MPOL_F_RELATIVE_NODES.
        #[arg(long = "relative")]
        relative_nodes: bool,
        /// Fail unless the region is at this generation.
        #[arg(long, default_value_t = 0)]
        expected_generation: u64,
    },
}

/// A policy change, as printed: the region and what the migration did.
#[derive(Serialize)]
struct PolicySet<'a> {
    #[serde(flatten)]
    region: &'a pb::Region,
    pages_migrated: u64,
    pages_migrate_failed: u64,
    warnings: &'a [String],
}

/// Runs a `policy` command.
pub(crate) async fn run(c: &mut Client, cmd: PolicyCmd, out: Output) -> Result<(), ClientError> {
    let PolicyCmd::Set {
        span,
        mode,
        nodes: n,
        migrate,
        static_nodes,
        relative_nodes,
        expected_generation,
    } = cmd;
    let mut p = memplace_client::policy(memplace_client::parse_mode(&mode)?, &n)?;
    p.static_nodes = static_nodes;
    p.relative_nodes = relative_nodes;
    let r = c
        .set_policy_with(pb::SetPolicyRequest {
            vm_id: span.vm.clone(),
            name: span.name.clone(),
            offset: parse_size(&span.offset)?,
            length: parse_size(&span.length)?,
            policy: Some(p),
            migrate,
            expected_generation,
            request_id: memplace_client::new_request_id(),
        })
        .await?;
    let region = r.region.unwrap_or_default();
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let v = PolicySet {
        region: &region,
        pages_migrated: r.pages_migrated,
        pages_migrate_failed: r.pages_migrate_failed,
        warnings: &r.warnings,
    };
    render::print(out, &v, || {
        print_region_table(&region);
        if migrate {
            println!(
                "pages migrated: {}  failed: {}",
                r.pages_migrated, r.pages_migrate_failed
            );
        }
    });
    Ok(())
}
