//! `memplacectl region create|get|list|delete`.

use super::render::{self, enum_name, human, print_region_table};
use super::{Output, parse_size};
use clap::Subcommand;
use memplace_client::{Client, ClientError, pb};
use serde::Serialize;

#[derive(Subcommand, Debug)]
pub(crate) enum RegionCmd {
    /// Create a region.
    Create {
        /// VM id.
        vm: String,
        /// Region name.
        name: String,
        /// Size, e.g. 4G, 512M, 65536.
        #[arg(long)]
        size: String,
        /// Backend: memfd, guest-memfd or memfd-hugetlb.
        #[arg(long, default_value = "memfd")]
        backend: String,
        /// Huge page size for memfd-hugetlb, e.g. 2M.
        #[arg(long)]
        hugepage_size: Option<String>,
        /// Initial policy over the whole region, MODE[:NODES], e.g. bind:0-1.
        #[arg(long)]
        policy: Option<String>,
    },
    /// Show a region with intended and observed policies (as of the agent's last check; its
    /// time is printed).
    Get {
        /// VM id.
        vm: String,
        /// Region name.
        name: String,
        /// Read every range's policy from the kernel now instead of the last check.
        #[arg(long)]
        fresh: bool,
    },
    /// List regions.
    List {
        /// Only this VM.
        #[arg(long, default_value = "")]
        vm: String,
    },
    /// Delete a region and release its memory (once no VMM holds it).
    Delete {
        /// VM id.
        vm: String,
        /// Region name.
        name: String,
    },
}

/// A created region, as printed: the region and its VM's handoff token.
#[derive(Serialize)]
struct Created<'a> {
    #[serde(flatten)]
    region: &'a pb::Region,
    handoff_token: &'a str,
}

/// Runs a `region` command.
pub(crate) async fn run(c: &mut Client, cmd: RegionCmd, out: Output) -> Result<(), ClientError> {
    match cmd {
        RegionCmd::Create {
            vm,
            name,
            size,
            backend,
            hugepage_size,
            policy,
        } => {
            let mut policies = vec![];
            if let Some(p) = policy {
                let (m, n) = p.split_once(':').unwrap_or((p.as_str(), ""));
                policies.push(pb::RangePolicy {
                    offset: 0,
                    length: 0,
                    policy: Some(memplace_client::policy(memplace_client::parse_mode(m)?, n)?),
                });
            }
            let req = pb::CreateRegionRequest {
                vm_id: vm,
                name,
                size_bytes: parse_size(&size)?,
                backend: parse_backend(&backend)? as i32,
                hugepage_size_bytes: hugepage_size
                    .as_deref()
                    .map(parse_size)
                    .transpose()?
                    .unwrap_or(0),
                policies,
                request_id: memplace_client::new_request_id(),
            };
            let r = c.create_region_with(req).await?;
            let region = r.region.unwrap_or_default();
            let v = Created {
                region: &region,
                handoff_token: &r.handoff_token,
            };
            render::print(out, &v, || {
                print_region_table(&region);
                println!("handoff token: {}", r.handoff_token);
            });
        }
        RegionCmd::Get { vm, name, fresh } => {
            let r = c.get_region_with(&vm, &name, fresh).await?;
            render::print(out, &r, || print_region_table(&r));
        }
        RegionCmd::List { vm } => {
            let rs = c.list_regions(&vm).await?;
            render::print(out, &rs, || list_table(&rs));
        }
        RegionCmd::Delete { vm, name } => {
            let r = c.delete_region(&vm, &name).await?;
            render::print(out, &r, || println!("deleted {}/{}", r.vm_id, r.name));
        }
    }
    Ok(())
}

fn list_table(rs: &[pb::Region]) {
    println!(
        "{:<20} {:<16} {:<14} {:>10} {:<14} {:>4} {:<7} {:>6}",
        "VM", "NAME", "BACKEND", "SIZE", "STRATEGY", "GEN", "STATUS", "RANGES"
    );
    for r in rs {
        println!(
            "{:<20} {:<16} {:<14} {:>10} {:<14} {:>4} {:<7} {:>6}",
            r.vm_id,
            r.name,
            enum_name(r.backend().as_str_name(), "BACKEND_"),
            human(r.size_bytes),
            enum_name(r.strategy().as_str_name(), "STRATEGY_"),
            r.generation,
            enum_name(r.status().as_str_name(), "REGION_STATUS_"),
            r.ranges.len()
        );
    }
}

fn parse_backend(s: &str) -> Result<pb::Backend, ClientError> {
    match s.to_ascii_lowercase().replace('_', "-").as_str() {
        "memfd" => Ok(pb::Backend::Memfd),
        "guest-memfd" | "gmem" => Ok(pb::Backend::GuestMemfd),
        "memfd-hugetlb" | "hugetlb" => Ok(pb::Backend::MemfdHugetlb),
        _ => Err(ClientError::Invalid(format!(
            "unknown backend {s:?}: use memfd, guest-memfd or memfd-hugetlb"
        ))),
    }
}
