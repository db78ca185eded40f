//! Proto ↔ domain conversion, shared by both edges: the gRPC service ([`crate::api`]) and the
//! handoff socket ([`crate::handoff`]). Caller input that does not convert is an
//! [`AgentError`] of the invalid-argument kind, so each edge maps it to its code the same way it
//! maps the engine's errors.

use crate::domain::{Backend, Event, NodeSet, Origin, Policy, PolicyMode, RegionStatus, Strategy};
use crate::engine::{AgentError, NodeCount, Placement, RangeState, RegionView};
use crate::kernel::probe::Features;
use crate::topology::Topology;
use memplace_proto::v1 as pb;

/// Most nodes accepted in one policy (the kernel's MAX_NUMNODES).
const MAX_POLICY_NODES: usize = crate::domain::MAX_NODES as usize;

fn invalid(message: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument(message.into())
}

/// Converts an API policy, rejecting unknown modes and node ids out of range.
pub fn policy_from_pb(p: Option<&pb::Policy>) -> Result<Policy, AgentError> {
    let p = p.ok_or_else(|| invalid("policy is required"))?;
    let mode = match pb::PolicyMode::try_from(p.mode) {
        Ok(pb::PolicyMode::Default) => PolicyMode::Default,
        Ok(pb::PolicyMode::Bind) => PolicyMode::Bind,
        Ok(pb::PolicyMode::Preferred) => PolicyMode::Preferred,
        Ok(pb::PolicyMode::Interleave) => PolicyMode::Interleave,
        Ok(pb::PolicyMode::PreferredMany) => PolicyMode::PreferredMany,
        Ok(pb::PolicyMode::WeightedInterleave) => PolicyMode::WeightedInterleave,
        Ok(pb::PolicyMode::Local) => PolicyMode::Local,
        Ok(pb::PolicyMode::Unspecified) => {
            return Err(invalid(
                "policy mode is POLICY_MODE_UNSPECIFIED: set one of DEFAULT, BIND, PREFERRED, INTERLEAVE, PREFERRED_MANY, WEIGHTED_INTERLEAVE, LOCAL",
            ));
        }
        Err(_) => {
            return Err(invalid(format!(
                "policy mode {} is not a known PolicyMode value",
                p.mode
            )));
        }
    };
    if p.nodes.len() > MAX_POLICY_NODES {
        return Err(invalid(format!(
            "policy lists {} nodes; at most {MAX_POLICY_NODES} are possible",
            p.nodes.len()
        )));
    }
    let nodes = NodeSet::from_ids(p.nodes.iter().copied())?;
    let policy = Policy {
        mode,
        nodes,
        static_nodes: p.static_nodes,
        relative_nodes: p.relative_nodes,
    };
    policy.validate()?;
    Ok(policy)
}

/// Converts a domain policy.
pub fn policy_to_pb(p: &Policy) -> pb::Policy {
    pb::Policy {
        mode: match p.mode {
            PolicyMode::Default => pb::PolicyMode::Default,
            PolicyMode::Bind => pb::PolicyMode::Bind,
            PolicyMode::Preferred => pb::PolicyMode::Preferred,
            PolicyMode::Interleave => pb::PolicyMode::Interleave,
            PolicyMode::PreferredMany => pb::PolicyMode::PreferredMany,
            PolicyMode::WeightedInterleave => pb::PolicyMode::WeightedInterleave,
            PolicyMode::Local => pb::PolicyMode::Local,
        } as i32,
        nodes: p.nodes.iter().collect(),
        static_nodes: p.static_nodes,
        relative_nodes: p.relative_nodes,
    }
}

/// Converts an API backend.
pub fn backend_from_pb(b: i32) -> Result<Backend, AgentError> {
    match pb::Backend::try_from(b) {
        Ok(pb::Backend::GuestMemfd) => Ok(Backend::GuestMemfd),
        Ok(pb::Backend::Memfd) => Ok(Backend::Memfd),
        Ok(pb::Backend::MemfdHugetlb) => Ok(Backend::MemfdHugetlb),
        Ok(pb::Backend::Unspecified) => Err(invalid(
            "backend is BACKEND_UNSPECIFIED: set BACKEND_GUEST_MEMFD, BACKEND_MEMFD or BACKEND_MEMFD_HUGETLB",
        )),
        Err(_) => Err(invalid(format!("backend {b} is not a known Backend value"))),
    }
}

fn backend_to_pb(b: Backend) -> pb::Backend {
    match b {
        Backend::GuestMemfd => pb::Backend::GuestMemfd,
        Backend::Memfd => pb::Backend::Memfd,
        Backend::MemfdHugetlb => pb::Backend::MemfdHugetlb,
    }
}

/// Converts a region view.
pub fn region_to_pb(v: &RegionView) -> pb::Region {
    let i = &v.intent;
    pb::Region {
        vm_id: i.key.vm_id.clone(),
        name: i.key.name.clone(),
        uid: i.uid.clone(),
        backend: backend_to_pb(i.backend) as i32,
        size_bytes: i.size_bytes,
        generation: i.generation,
        strategy: match i.strategy {
            Strategy::SharedPolicy => pb::Strategy::SharedPolicy,
            Strategy::TaskPolicy => pb::Strategy::TaskPolicy,
        } as i32,
        ranges: v
            .ranges
            .iter()
            .map(|r| pb::Range {
                offset: r.intent.offset,
                length: r.intent.length,
                intended: Some(policy_to_pb(&r.intent.policy)),
                observed: r.observed.as_ref().map(policy_to_pb),
                state: match r.state {
                    RangeState::Applied => pb::RangeState::Applied,
                    RangeState::Pending => pb::RangeState::Pending,
                    RangeState::Failed => pb::RangeState::Failed,
                    RangeState::Drifted => pb::RangeState::Drifted,
                    RangeState::Unverified => pb::RangeState::Unverified,
                } as i32,
                last_error: r.last_error.clone(),
                check: r.check.map(|c| pb::RangeCheck {
                    pages_total: c.pages_total,
                    pages_allocated: c.pages_allocated,
                    pages_sampled: c.pages_sampled,
                    pages_sampled_misplaced: c.pages_sampled_misplaced,
                    pages_sampled_unknown: c.pages_sampled_unknown,
                }),
                governs: match i.strategy {
                    Strategy::SharedPolicy => pb::Governs::FutureAllocations,
                    Strategy::TaskPolicy => pb::Governs::AgentAllocationsOnly,
                } as i32,
            })
            .collect(),
        hugepage_size_bytes: i.hugepage_size_bytes,
        status: match i.status {
            RegionStatus::Active => pb::RegionStatus::Active,
            RegionStatus::Lost => pb::RegionStatus::Lost,
            RegionStatus::Released => pb::RegionStatus::Released,
        } as i32,
        page_size_bytes: v.page_size,
        created_unix: i.created_unix,
        observed_at_unix_ms: v.observed_at_unix_ms,
        holder_pid: i.holder.map_or(0, |h| h.pid),
        origin: match i.origin {
            Origin::Agent => pb::RegionOrigin::Agent,
            Origin::Attach => pb::RegionOrigin::Attach,
            Origin::Adopt => pb::RegionOrigin::Adopt,
        } as i32,
        guest_cell: i.guest_cell,
    }
}

/// Converts page counts per node.
pub fn node_pages(n: &[NodeCount]) -> Vec<pb::NodePages> {
    n.iter()
        .map(|c| pb::NodePages {
            node: c.node,
            pages: c.pages,
        })
        .collect()
}

/// Converts a placement reading.
pub fn placement_to_pb(p: &Placement) -> pb::GetPlacementResponse {
    pb::GetPlacementResponse {
        nodes: node_pages(&p.nodes()),
        pages_not_present: p.total(|r| r.not_present),
        pages_misplaced: p.total(|r| r.misplaced),
        pages_unknown: p.total(|r| r.unknown),
        page_size_bytes: p.page_size,
        ranges: p
            .ranges
            .iter()
            .map(|r| pb::RangePlacement {
                offset: r.offset,
                length: r.length,
                nodes: node_pages(&r.nodes),
                pages_not_present: r.not_present,
                pages_misplaced: r.misplaced,
                pages_unknown: r.unknown,
                counted_from_pid: r.counted_from.unwrap_or(0),
            })
            .collect(),
    }
}

/// Converts an event.
pub fn event_to_pb(e: &Event) -> pb::WatchEventsResponse {
    pb::WatchEventsResponse {
        sequence: e.sequence,
        time_unix_ms: e.time_unix_ms,
        kind: e.kind as i32,
        vm_id: e.vm_id.clone(),
        name: e.name.clone(),
        message: e.message.clone(),
        actor: e.actor.clone(),
    }
}

/// Converts what GetNodeInfo reports: the host's nodes and the kernel's capabilities.
pub fn node_info_to_pb(
    topo: &Topology,
    c: &Features,
    agent_version: &str,
    page_size: u64,
) -> pb::GetNodeInfoResponse {
    pb::GetNodeInfoResponse {
        nodes: topo
            .nodes
            .iter()
            .map(|n| pb::NumaNode {
                id: n.id,
                cpus: n.cpus.clone(),
                memory_total_bytes: n.mem_total,
                memory_free_bytes: n.mem_free,
                distances: n.distances.clone(),
                hugepages: n
                    .hugepages
                    .iter()
                    .map(|h| pb::HugepagePool {
                        page_size_bytes: h.page_size,
                        total_pages: h.total,
                        free_pages: h.free,
                    })
                    .collect(),
                allowed: topo.usable.contains(n.id),
            })
            .collect(),
        capabilities: Some(pb::Capabilities {
            kvm_usable: c.kvm_usable,
            guest_memfd_supported: c.guest_memfd_supported,
            guest_memfd_flags: c.guest_memfd_flags,
            guest_memfd_shared_policy: c.guest_memfd_shared_policy,
            memfd_shared_policy: c.memfd_shared_policy,
            preferred_many_supported: c.preferred_many,
            weighted_interleave_supported: c.weighted_interleave,
            kernel_release: c.kernel_release.clone(),
            kvm_error: c.kvm_error.clone(),
            hugetlb_shared_policy: c.hugetlb_shared_policy,
            pidfd_getfd_supported: c.pidfd_getfd,
            guest_memfd_interleave_exact: c.guest_memfd_interleave_exact,
            guest_memfd_interleave_note: c.guest_memfd_interleave_note.clone(),
        }),
        agent_version: agent_version.to_string(),
        page_size_bytes: page_size,
    }
}
