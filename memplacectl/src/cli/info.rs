//! `memplacectl info` and `health`.

use super::render::{self, human};
use super::{Cli, Output, connect};
use memplace_client::{Client, ClientError, pb};

/// `info`: nodes, distances and the kernel's capabilities.
pub(crate) async fn info(c: &mut Client, out: Output) -> Result<(), ClientError> {
    let mut i = c.node_info().await?;
    let caps = i.capabilities.get_or_insert_with(Default::default).clone();
    render::print(out, &i, || info_table(&i, &caps));
    Ok(())
}

fn info_table(i: &pb::GetNodeInfoResponse, caps: &pb::Capabilities) {
    println!(
        "memplaced {}  kernel {}  page size {}",
        i.agent_version,
        caps.kernel_release,
        human(i.page_size_bytes)
    );
    println!();
    let ids: Vec<String> = i.nodes.iter().map(|n| format!("{:>4}", n.id)).collect();
    println!(
        "{:<5} {:<10} {:>12} {:>12} {:<8} distances {}",
        "NODE",
        "CPUS",
        "TOTAL",
        "FREE",
        "ALLOWED",
        ids.join("")
    );
    for n in &i.nodes {
        let d: Vec<String> = n.distances.iter().map(|d| format!("{d:>4}")).collect();
        println!(
            "{:<5} {:<10} {:>12} {:>12} {:<8}           {}",
            n.id,
            render::node_list(&n.cpus),
            human(n.memory_total_bytes),
            human(n.memory_free_bytes),
            if n.allowed { "yes" } else { "no" },
            d.join("")
        );
    }
    println!();
    let yn = |b: bool| if b { "yes" } else { "no" };
    println!(
        "KVM usable                 {}{}",
        yn(caps.kvm_usable),
        if caps.kvm_error.is_empty() {
            String::new()
        } else {
            format!(" ({})", caps.kvm_error)
        }
    );
    println!(
        "guest_memfd                {} (flags {:#x})",
        yn(caps.guest_memfd_supported),
        caps.guest_memfd_flags
    );
    println!(
        "guest_memfd shared policy  {}{}",
        yn(caps.guest_memfd_shared_policy),
        if caps.guest_memfd_shared_policy {
            ""
        } else {
            "  -> guest_memfd uses the task-policy strategy"
        }
    );
    println!(
        "memfd shared policy        {}",
        yn(caps.memfd_shared_policy)
    );
    println!(
        "hugetlb shared policy      {}",
        yn(caps.hugetlb_shared_policy)
    );
    println!(
        "preferred-many             {}",
        yn(caps.preferred_many_supported)
    );
    println!(
        "weighted-interleave        {}",
        yn(caps.weighted_interleave_supported)
    );
    println!(
        "fd recovery (pidfd_getfd)  {}",
        yn(caps.pidfd_getfd_supported)
    );
    println!(
        "guest_memfd interleave     {}  ({})",
        match caps.guest_memfd_interleave_exact {
            Some(true) => "exact",
            Some(false) => "NOT exact",
            None => "unknown",
        },
        caps.guest_memfd_interleave_note
    );
}

/// `health`: whether the agent is serving (grpc.health.v1).
pub(crate) async fn health(cli: &Cli, out: Output) -> Result<(), ClientError> {
    let c = connect(cli).await?;
    let mut h = tonic_health_client(c.channel());
    let r = h
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    if r.status == 1 {
        #[derive(serde::Serialize)]
        struct Serving {
            status: &'static str,
        }
        render::print(out, &Serving { status: "SERVING" }, || println!("SERVING"));
        return Ok(());
    }
    Err(ClientError::Invalid(format!(
        "not serving (status {})",
        r.status
    )))
}

use tonic_health_shim::{HealthCheckRequest, tonic_health_client};

/// A minimal grpc.health.v1 client, so the CLI needs no extra generated code.
mod tonic_health_shim {
    use tonic::codegen::http;
    /// grpc.health.v1.HealthCheckRequest.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HealthCheckRequest {
        /// Service name; empty for the whole server.
        #[prost(string, tag = "1")]
        pub service: String,
    }
    /// grpc.health.v1.HealthCheckResponse.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HealthCheckResponse {
        /// 1 = SERVING.
        #[prost(int32, tag = "1")]
        pub status: i32,
    }
    /// The client.
    pub struct Health(tonic::client::Grpc<tonic::transport::Channel>);
    /// Makes a client on a channel.
    pub fn tonic_health_client(ch: tonic::transport::Channel) -> Health {
        Health(tonic::client::Grpc::new(ch))
    }
    impl Health {
        /// grpc.health.v1.Health/Check.
        pub async fn check(
            &mut self,
            req: HealthCheckRequest,
        ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
            self.0
                .ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let codec = tonic_prost::ProstCodec::default();
            let path = http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
            self.0.unary(tonic::Request::new(req), path, codec).await
        }
    }
}
