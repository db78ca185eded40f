//! One handoff request: decoded, checked (fd count, names, token), and answered by the engine.
//! Fds that arrived with a request are dropped (closed) unless the request takes them.

use super::{KVM_VM_LINK, Refusal, admit, authorize, code_of, error};
use crate::convert::{backend_from_pb, region_to_pb};
use crate::domain::{Backend, Holder, RegionKey};
use crate::engine::{Agent, AgentError};
use crate::kernel::{fdpass, pidfd};
use memplace_proto::v1 as pb;
use prost::Message;
use std::os::fd::{AsFd, OwnedFd};

/// A response and the fds to send with it.
pub(super) type Answer = (pb::HandoffResponse, Vec<OwnedFd>);

/// Who asks, and how to reach the engine.
struct Peer<'a> {
    agent: &'a Agent,
    rt: &'a tokio::runtime::Handle,
    pid: i32,
    holder: Holder,
    actor: &'a str,
}

/// Handles one request packet from process `pid`.
pub(super) fn handle(
    agent: &Agent,
    rt: &tokio::runtime::Handle,
    packet: fdpass::Packet,
    pid: i32,
    actor: &str,
) -> Answer {
    use pb::handoff_request::Request as R;
    let answered = || -> Result<Answer, Refusal> {
        if packet.truncated {
            return Err(refuse(
                pb::HandoffCode::InvalidArgument,
                format!(
                    "packet too large: at most {} bytes and {} fds",
                    fdpass::MAX_PACKET,
                    fdpass::MAX_FDS
                ),
            ));
        }
        let req = pb::HandoffRequest::decode(packet.data.as_slice()).map_err(|e| {
            refuse(
                pb::HandoffCode::InvalidArgument,
                format!("malformed HandoffRequest: {e}"),
            )
        })?;
        let start_time = pidfd::start_time(pid).unwrap_or(0);
        let peer = Peer {
            agent,
            rt,
            pid,
            holder: Holder { pid, start_time },
            actor,
        };
        let fds = packet.fds;
        match req.request {
            None => Err(refuse(
                pb::HandoffCode::InvalidArgument,
                "empty HandoffRequest: set acquire, adopt or attach_vm".into(),
            )),
            Some(R::Acquire(a)) => peer.acquire(a, fds),
            Some(R::Adopt(a)) => peer.adopt(a, fds),
            Some(R::AttachVm(a)) => peer.attach_vm(a, fds),
        }
    };
    answered().unwrap_or_else(|r| (*r, vec![]))
}

fn refuse(code: pb::HandoffCode, message: String) -> Refusal {
    Box::new(error(code, message))
}

fn failed(e: &AgentError) -> Refusal {
    refuse(code_of(e), e.to_string())
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
fn expect_fds(fds: &[OwnedFd], n: usize, what: &str) -> Result<(), Refusal> {
    if fds.len() != n {
        return Err(refuse(
            pb::HandoffCode::InvalidArgument,
            format!(
                "{what} takes exactly {n} fd(s) in SCM_RIGHTS, got {}",
                fds.len()
            ),
        ));
    }
    Ok(())
}

/// The one fd of a request that takes one (after [`expect_fds`]).
fn one_fd(mut fds: Vec<OwnedFd>) -> Result<OwnedFd, Refusal> {
    fds.pop()
        .ok_or_else(|| refuse(pb::HandoffCode::Internal, "the fd vanished".into()))
}

impl Peer<'_> {
    /// Sends a region's file to its VMM, which becomes its holder.
    fn acquire(&self, a: pb::AcquireRequest, fds: Vec<OwnedFd>) -> Result<Answer, Refusal> {
        expect_fds(&fds, 0, "acquire")?;
        let key = RegionKey::parse(&a.vm_id, &a.name)
            .map_err(|e| refuse(pb::HandoffCode::InvalidArgument, e.to_string()))?;
        authorize(self.agent, &key.vm_id, &a.token)?;
        // Dup the fd under the region lock, record the holder durably, then send: after a
        // crash the agent looks for the file in the recorded holder. The agent's VM fd is not
        // sent: KVM refuses VM ioctls from any process but the VM's creator (EIO), so it would
        // be of no use to the VMM.
        let dup = self.rt.block_on(
            self.agent
                .with_fds(&key, |_, fd, _vm| fd.try_clone_to_owned()),
        );
        let fd = match dup {
            Ok(Ok(fd)) => fd,
            Ok(Err(e)) => return Err(refuse(pb::HandoffCode::Internal, format!("dup: {e}"))),
            Err(e) => return Err(failed(&e)),
        };
        let view = self
            .rt
            .block_on(self.agent.record_holder(&key, self.holder, self.actor))
            .map_err(|e| failed(&e))?;
        Ok((ok(Some(region_to_pb(&view))), vec![fd]))
    }

    /// Takes a file the VMM made (a guest_memfd bound to its VM, or a memfd) as a region.
    fn adopt(&self, a: pb::AdoptRequest, fds: Vec<OwnedFd>) -> Result<Answer, Refusal> {
        expect_fds(&fds, 1, "adopt")?;
        admit(self.agent, &a.vm_id, &a.token)?;
        let backend = backend_from_pb(a.backend)
            .map_err(|e| refuse(pb::HandoffCode::InvalidArgument, e.to_string()))?;
        let fd = one_fd(fds)?;
        let kind = fdpass::file_kind(fd.as_fd());
        let fits = match backend {
            Backend::Memfd | Backend::MemfdHugetlb => kind == fdpass::FileKind::Memfd,
            Backend::GuestMemfd => kind == fdpass::FileKind::GuestMemfd,
        };
        if !fits {
            return Err(refuse(
                pb::HandoffCode::InvalidArgument,
                format!(
                    "the fd handed in is not a {} file (it looks like {kind:?})",
                    backend.as_str()
                ),
            ));
        }
        let key = RegionKey::parse(&a.vm_id, &a.name).map_err(|e| failed(&e.into()))?;
        let view = self
            .rt
            .block_on(
                self.agent
                    .adopt(key, backend, a.size_bytes, fd, self.holder, self.actor),
            )
            .map_err(|e| failed(&e))?;
        Ok((ok(Some(region_to_pb(&view))), vec![]))
    }

    /// Hands the agent the VMM's KVM VM fd (refused where the kernel refuses its use).
    fn attach_vm(&self, a: pb::AttachVmRequest, fds: Vec<OwnedFd>) -> Result<Answer, Refusal> {
        expect_fds(&fds, 1, "attach_vm")?;
        let vm = admit(self.agent, &a.vm_id, &a.token)?;
        let fd = one_fd(fds)?;
        let is_vm = fdpass::link_of(fd.as_fd()).is_some_and(|l| l == KVM_VM_LINK);
        // The audit event is durable before the VM is used; without it nothing is attached.
        match self.rt.block_on(self.agent.attach_vm_audited(
            &vm,
            fd,
            format!("VM fd attached by pid {}", self.pid),
            self.actor,
        )) {
            Ok(()) => Ok((ok(None), vec![])),
            Err(AgentError::InvalidArgument(_)) if is_vm => Err(refuse(
                pb::HandoffCode::FailedPrecondition,
                "a KVM VM fd answers only in the process that created it: the kernel \
                 refuses VM ioctls from any other process (EIO), so the agent cannot \
                 create guest_memfd files on this VM; create the guest_memfd in the VMM \
                 and hand it in with adopt"
                    .into(),
            )),
            Err(e) => Err(failed(&e)),
        }
    }
}
