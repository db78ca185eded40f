//! One handoff request: decoded, checked (fd count, names, token), and answered by the engine.
//! Fds that arrived with a request are dropped (closed) unless the request takes them. Every
//! refusal is an [`AgentError`]; [`super::refusal`] gives its code, once for all.

use super::{KVM_VM_LINK, refusal};
use crate::convert::{backend_from_pb, region_to_pb};
use crate::domain::{Backend, Holder, RegionKey, VmId};
use crate::engine::{Agent, AgentError};
use crate::kernel::{fdpass, pidfd};
use memplace_proto::v1 as pb;
use prost::Message;
use std::os::fd::{AsFd, OwnedFd};

/// A response and the fds to send with it.
pub(super) type Answer = (pb::HandoffResponse, Vec<OwnedFd>);

/// Who asks, and the engine that answers.
struct Peer<'a> {
    agent: &'a Agent,
    pid: i32,
    holder: Holder,
    actor: &'a str,
}

/// Handles one request packet from process `pid`.
pub(super) async fn handle(agent: &Agent, packet: fdpass::Packet, pid: i32, actor: &str) -> Answer {
    answer(agent, packet, pid, actor)
        .await
        .unwrap_or_else(|e| (refusal(&e), vec![]))
}

async fn answer(
    agent: &Agent,
    packet: fdpass::Packet,
    pid: i32,
    actor: &str,
) -> Result<Answer, AgentError> {
    use pb::handoff_request::Request as R;
    if packet.truncated {
        return Err(AgentError::InvalidArgument(format!(
            "packet too large: at most {} bytes and {} fds",
            fdpass::MAX_PACKET,
            fdpass::MAX_FDS
        )));
    }
    let req = pb::HandoffRequest::decode(packet.data.as_slice())
        .map_err(|e| AgentError::InvalidArgument(format!("malformed HandoffRequest: {e}")))?;
    let start_time = pidfd::start_time(pid).unwrap_or(0);
    let peer = Peer {
        agent,
        pid,
        holder: Holder { pid, start_time },
        actor,
    };
    let fds = packet.fds;
    match req.request {
        None => Err(AgentError::InvalidArgument(
            "empty HandoffRequest: set acquire, adopt or attach_vm".into(),
        )),
        Some(R::Acquire(a)) => peer.acquire(a, fds).await,
        Some(R::Adopt(a)) => peer.adopt(a, fds).await,
        Some(R::AttachVm(a)) => peer.attach_vm(a, fds).await,
    }
}

fn ok(region: Option<pb::Region>) -> pb::HandoffResponse {
    pb::HandoffResponse {
        code: pb::HandoffCode::Ok as i32,
        message: String::new(),
        region,
        fd_count: 0,
    }
}

/// Checks the number of fds before anything else about the request.
fn expect_fds(fds: &[OwnedFd], n: usize, what: &str) -> Result<(), AgentError> {
    if fds.len() != n {
        return Err(AgentError::InvalidArgument(format!(
            "{what} takes exactly {n} fd(s) in SCM_RIGHTS, got {}",
            fds.len()
        )));
    }
    Ok(())
}

/// The one fd of a request that takes one (after [`expect_fds`]).
fn one_fd(mut fds: Vec<OwnedFd>) -> Result<OwnedFd, AgentError> {
    fds.pop()
        .ok_or_else(|| AgentError::Internal("the fd vanished".into()))
}

/// Checks that a token is VM `vm_id`'s (in constant time); the vm_id is already checked.
fn authorize(agent: &Agent, vm_id: &str, token: &str) -> Result<(), AgentError> {
    if !agent.check_token(vm_id, token) {
        return Err(AgentError::PermissionDenied(format!(
            "wrong handoff token for VM {vm_id}"
        )));
    }
    Ok(())
}

/// Checks a request's vm_id and that its token is that VM's; the checked id.
fn admit(agent: &Agent, vm_id: &str, token: &str) -> Result<VmId, AgentError> {
    let vm = VmId::parse(vm_id)?;
    authorize(agent, vm_id, token)?;
    Ok(vm)
}

impl Peer<'_> {
    /// Sends a region's file to its VMM, which becomes its holder.
    async fn acquire(
        &self,
        a: pb::AcquireRequest,
        fds: Vec<OwnedFd>,
    ) -> Result<Answer, AgentError> {
        expect_fds(&fds, 0, "acquire")?;
        let key = RegionKey::parse(&a.vm_id, &a.name)?;
        authorize(self.agent, &key.vm_id, &a.token)?;
        // Dup the fd under the region lock, record the holder durably, then send: after a
        // crash the agent looks for the file in the recorded holder. The agent's VM fd is not
        // sent: KVM refuses VM ioctls from any process but the VM's creator (EIO), so it would
        // be of no use to the VMM.
        let fd = self
            .agent
            .with_fds(&key, |_, fd, _vm| fd.try_clone_to_owned())
            .await?
            .map_err(|e| AgentError::Internal(format!("dup: {e}")))?;
        let view = self
            .agent
            .record_holder(&key, self.holder, self.actor)
            .await?;
        Ok((ok(Some(region_to_pb(&view))), vec![fd]))
    }

    /// Takes a file the VMM made (a guest_memfd bound to its VM, or a memfd) as a region.
    async fn adopt(&self, a: pb::AdoptRequest, fds: Vec<OwnedFd>) -> Result<Answer, AgentError> {
        expect_fds(&fds, 1, "adopt")?;
        admit(self.agent, &a.vm_id, &a.token)?;
        let backend = backend_from_pb(a.backend)?;
        let fd = one_fd(fds)?;
        let kind = fdpass::file_kind(fd.as_fd());
        let fits = match backend {
            Backend::Memfd | Backend::MemfdHugetlb => kind == fdpass::FileKind::Memfd,
            Backend::GuestMemfd => kind == fdpass::FileKind::GuestMemfd,
        };
        if !fits {
            return Err(AgentError::InvalidArgument(format!(
                "the fd handed in is not a {} file (it looks like {kind:?})",
                backend.as_str()
            )));
        }
        let key = RegionKey::parse(&a.vm_id, &a.name)?;
        let view = self
            .agent
            .adopt(key, backend, a.size_bytes, fd, self.holder, self.actor)
            .await?;
        Ok((ok(Some(region_to_pb(&view))), vec![]))
    }

    /// Hands the agent the VMM's KVM VM fd (refused where the kernel refuses its use).
    async fn attach_vm(
        &self,
        a: pb::AttachVmRequest,
        fds: Vec<OwnedFd>,
    ) -> Result<Answer, AgentError> {
        expect_fds(&fds, 1, "attach_vm")?;
        let vm = admit(self.agent, &a.vm_id, &a.token)?;
        let fd = one_fd(fds)?;
        let is_vm = fdpass::link_of(fd.as_fd()).is_some_and(|l| l == KVM_VM_LINK);
        // The audit event is durable before the VM is used; without it nothing is attached.
        let attached = self
            .agent
            .attach_vm_audited(
                &vm,
                fd,
                format!("VM fd attached by pid {}", self.pid),
                self.actor,
            )
            .await;
        match attached {
            Ok(()) => Ok((ok(None), vec![])),
            Err(AgentError::InvalidArgument(_)) if is_vm => Err(AgentError::FailedPrecondition(
                "a KVM VM fd answers only in the process that created it: the kernel \
                 refuses VM ioctls from any other process (EIO), so the agent cannot \
                 create guest_memfd files on this VM; create the guest_memfd in the VMM \
                 and hand it in with adopt"
                    .into(),
            )),
            Err(e) => Err(e),
        }
    }
}
