//! An orchestrator's flow against memplace, end to end, for a guest with two NUMA nodes:
//!
//! 1. read the host's nodes (GetNodeInfo) and pick a host node for each guest node: the allowed
//!    nodes in turn, so on a one-node host both guest nodes land on node 0;
//! 2. create one region per guest node, bound to its host node from the start (CreateRegion);
//! 3. populate each, so every page is allocated on that node before the guest boots (Populate);
//! 4. verify from the kernel that every page is where it should be (GetPlacement);
//! 5. hand the fds to the VMM: here this process acquires them on the handoff socket with the
//!    VM's token, as a VMM would, and checks each file's size.
//!
//! It prints one JSON summary on stdout and exits non-zero if any step fails or a page is off
//! its node.
//!
//! ```sh
//! cargo run -p memplace-client --example orchestrator -- \
//!     --socket /run/memplace/memplace.sock --handoff-socket /run/memplace/handoff.sock --vm vm1
//! ```

use memplace_client::handoff::{DEFAULT_HANDOFF_SOCKET, Handoff};
use memplace_client::{Client, ClientError, DEFAULT_SOCKET, pb};
use serde_json::json;
use std::process::ExitCode;

/// Guest NUMA nodes of the example VM.
const GUEST_NODES: u32 = 2;

struct Options {
    socket: String,
    handoff_socket: String,
    vm: String,
    node_bytes: u64,
    backend: pb::Backend,
    cleanup: bool,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        socket: std::env::var("MEMPLACE_SOCKET").unwrap_or_else(|_| DEFAULT_SOCKET.into()),
        handoff_socket: DEFAULT_HANDOFF_SOCKET.into(),
        vm: "vm1".into(),
        node_bytes: 64 << 20,
        backend: pb::Backend::Memfd,
        cleanup: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--socket" => o.socket = value()?,
            "--handoff-socket" => o.handoff_socket = value()?,
            "--vm" => o.vm = value()?,
            "--node-mib" => {
                let mib: u64 = value()?.parse().map_err(|e| format!("--node-mib: {e}"))?;
                o.node_bytes = mib << 20;
            }
            "--backend" => {
                o.backend = match value()?.as_str() {
                    "memfd" => pb::Backend::Memfd,
                    "guest-memfd" => pb::Backend::GuestMemfd,
                    b => return Err(format!("--backend {b}: use memfd or guest-memfd")),
                }
            }
            "--cleanup" => o.cleanup = true,
            _ => {
                return Err(format!(
                    "unknown argument {a}; see the header of client/examples/orchestrator.rs"
                ));
            }
        }
    }
    Ok(o)
}

async fn run(o: &Options) -> Result<serde_json::Value, ClientError> {
    let mut c = Client::connect_unix(&o.socket).await?;

    // 1. Host nodes the agent may place memory on, in id order.
    let info = c.node_info().await?;
    let host: Vec<u32> = info
        .nodes
        .iter()
        .filter(|n| n.allowed)
        .map(|n| n.id)
        .collect();
    if host.is_empty() {
        return Err(ClientError::Invalid(
            "the agent reports no allowed node".into(),
        ));
    }
    let plan: Vec<(u32, u32)> = (0..GUEST_NODES)
        .map(|g| (g, host[g as usize % host.len()]))
        .collect();
    eprintln!("plan: guest node -> host node {plan:?}");

    let mut regions = Vec::new();
    let mut token = String::new();
    for &(guest, node) in &plan {
        let name = format!("ram-node{guest}");
        // 2. Create, bound from the start: the intent is durable before the answer.
        let created = c
            .create_region(
                &o.vm,
                &name,
                o.node_bytes,
                o.backend,
                vec![pb::RangePolicy {
                    offset: 0,
                    length: 0,
                    policy: Some(memplace_client::policy(
                        pb::PolicyMode::Bind,
                        &node.to_string(),
                    )?),
                }],
            )
            .await?;
        token = created.handoff_token;

        // 3. Populate: allocate every page on the bound node.
        let summary = c
            .populate(
                pb::PopulateRequest {
                    vm_id: o.vm.clone(),
                    name: name.clone(),
                    ..Default::default()
                },
                |done, total| eprintln!("{name}: {done}/{total} bytes"),
            )
            .await?;
        if summary.bytes_done != o.node_bytes {
            return Err(ClientError::Invalid(format!(
                "{name}: populated {} of {} bytes",
                summary.bytes_done, o.node_bytes
            )));
        }

        // 4. Verify from the kernel: every page allocated, all on `node`, none misplaced.
        let p = c.placement(&o.vm, &name, 0, 0).await?;
        let on_node: u64 = p
            .nodes
            .iter()
            .filter(|n| n.node == node)
            .map(|n| n.pages)
            .sum();
        let pages = o.node_bytes / p.page_size_bytes;
        if on_node != pages || p.pages_misplaced != 0 || p.pages_not_present != 0 {
            return Err(ClientError::Invalid(format!(
                "{name}: {on_node} of {pages} pages on node {node}, {} misplaced, {} not allocated",
                p.pages_misplaced, p.pages_not_present
            )));
        }
        regions.push((guest, node, name, pages));
    }

    // 5. Hand the fds to the VMM: acquire each with the VM's token, as the VMM would.
    let handoff = Handoff::connect(&o.handoff_socket)?;
    let mut out = Vec::new();
    let mut held = Vec::new();
    for (guest, node, name, pages) in &regions {
        let got = handoff.acquire(&o.vm, name, &token)?;
        let file = std::fs::File::from(got.fd);
        let size = file
            .metadata()
            .map_err(|e| ClientError::Handoff(format!("fstat of {name}'s fd: {e}")))?
            .len();
        if size != o.node_bytes {
            return Err(ClientError::Handoff(format!(
                "{name}: the fd is {size} bytes, not {}",
                o.node_bytes
            )));
        }
        out.push(json!({
            "guest_node": guest, "host_node": node, "region": name,
            "size_bytes": size, "pages_on_node": pages, "holder_pid": got.region.holder_pid,
        }));
        held.push(file);
    }
    if o.cleanup {
        // A VMM would keep the files for the guest's life; the example lets go and deletes.
        drop(held);
        for (_, _, name, _) in &regions {
            c.delete_region(&o.vm, name).await?;
        }
    }
    Ok(json!({ "vm_id": o.vm, "regions": out, "cleaned_up": o.cleanup }))
}

#[tokio::main]
async fn main() -> ExitCode {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("orchestrator: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&o).await {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("orchestrator: {e}");
            ExitCode::FAILURE
        }
    }
}
