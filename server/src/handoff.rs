//! The handoff socket for VMMs: `<runtime-dir>/handoff.sock`, SOCK_SEQPACKET. Each request and
//! each response is one packet holding one `memplace.v1` protobuf message; fds ride in
//! SCM_RIGHTS on the same packet. Peers are checked by SO_PEERCRED uid, and tokens compare in
//! constant time.
//!
//! Connections are few and short, so each gets a plain thread that blocks on its socket and
//! calls into the engine through the runtime handle.
//!
//! What KVM allows shapes the requests: a VM fd answers only in the process that created it, and a
//! guest_memfd binds only to the VM it was created on. So acquire sends the region's file alone
//! (a guest_memfd the agent made can be mapped by the VMM, not bound to its memslots), a VMM that
//! backs guest memory with guest_memfd creates the file and hands it in with adopt, and attach_vm
//! is refused with that explanation where the kernel refuses the VM fd.

pub mod token;

use crate::domain::{Backend, Holder, RegionKey};
use crate::kernel::{fdpass, pidfd};
use crate::reconcile::{Agent, AgentError};
use memplace_proto::v1 as pb;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, accept4, bind, listen, socket,
};
use prost::Message;
use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

/// How /proc names a KVM VM fd.
const KVM_VM_LINK: &str = "anon_inode:kvm-vm";

/// Binds the handoff socket at `path` with `mode`.
pub fn bind_socket(path: &Path, mode: u32) -> std::io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    listen(
        &fd,
        nix::sys::socket::Backlog::new(64).map_err(std::io::Error::from)?,
    )?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    Ok(fd)
}

/// Serves the handoff socket until the process exits.
pub fn serve(
    listener: OwnedFd,
    agent: Arc<Agent>,
    allowed_uids: HashSet<u32>,
    rt: tokio::runtime::Handle,
) {
    let allowed = Arc::new(allowed_uids);
    std::thread::Builder::new()
        .name("handoff-accept".into())
        .spawn(move || {
            loop {
                let conn = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    Ok(fd) => fd,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "handoff accept failed");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                };
                let conn = crate::kernel::owned(conn);
                let agent = agent.clone();
                let allowed = allowed.clone();
                let rt = rt.clone();
                let _ = std::thread::Builder::new()
                    .name("handoff-conn".into())
                    .spawn(move || serve_conn(conn, &agent, &allowed, &rt));
            }
        })
        .expect("spawning the handoff thread");
}

fn serve_conn(conn: OwnedFd, agent: &Agent, allowed: &HashSet<u32>, rt: &tokio::runtime::Handle) {
    let cred = match fdpass::peer_credentials(conn.as_fd()) {
        Ok(c) => c,
        Err(_) => return,
    };
    let actor = format!("uid:{} pid:{}", cred.uid(), cred.pid());
    loop {
        let packet = match fdpass::recv(conn.as_fd()) {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => return,
        };
        let (kind, vm_id, name) = describe(&packet.data);
        let (resp, fds) = if !allowed.contains(&cred.uid()) {
            (
                error(
                    pb::HandoffCode::PermissionDenied,
                    format!("uid {} may not use the handoff socket", cred.uid()),
                ),
                vec![],
            )
        } else {
            handle(agent, rt, packet, cred.pid(), &actor)
        };
        let code = pb::HandoffCode::try_from(resp.code).unwrap_or(pb::HandoffCode::Unspecified);
        crate::metrics::metrics()
            .handoffs
            .get_or_create(&crate::metrics::MethodCode {
                method: kind.into(),
                code: code.as_str_name().to_string(),
            })
            .inc();
        tracing::info!(%vm_id, %name, caller = %actor, code = code.as_str_name(), detail = %resp.message, "handoff {kind}");
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let resp = pb::HandoffResponse {
            fd_count: borrowed.len() as u32,
            ..resp
        };
        if fdpass::send(conn.as_fd(), &resp.encode_to_vec(), &borrowed).is_err() {
            return;
        }
    }
}

/// What a packet asks, for the log line and metrics: kind, vm_id and name (empty if unknown).
fn describe(data: &[u8]) -> (&'static str, String, String) {
    use pb::handoff_request::Request as R;
    match pb::HandoffRequest::decode(data).map(|r| r.request) {
        Ok(Some(R::Acquire(a))) => ("acquire", a.vm_id, a.name),
        Ok(Some(R::Adopt(a))) => ("adopt", a.vm_id, a.name),
        Ok(Some(R::AttachVm(a))) => ("attach_vm", a.vm_id, String::new()),
        Ok(None) | Err(_) => ("malformed", String::new(), String::new()),
    }
}

fn error(code: pb::HandoffCode, message: String) -> pb::HandoffResponse {
    pb::HandoffResponse {
        code: code as i32,
        message,
        region: None,
        fd_count: 0,
    }
}

/// Checks a request's vm_id and that its token is that VM's (in constant time).
fn admit(agent: &Agent, vm_id: &str, token: &str) -> Result<(), Box<pb::HandoffResponse>> {
    if let Err(e) = crate::domain::validate_name("vm_id", vm_id) {
        return Err(Box::new(error(
            pb::HandoffCode::InvalidArgument,
            e.to_string(),
        )));
    }
    if !agent.check_token(vm_id, token) {
        return Err(Box::new(error(
            pb::HandoffCode::PermissionDenied,
            format!("wrong handoff token for VM {vm_id}"),
        )));
    }
    Ok(())
}

pub(crate) fn code_of(e: &AgentError) -> pb::HandoffCode {
    e.code().handoff()
}

/// Handles one request; returns the response and the fds to send with it. Fds that arrived with
/// the request are dropped (closed) unless the request takes them.
fn handle(
    agent: &Agent,
    rt: &tokio::runtime::Handle,
    packet: fdpass::Packet,
    pid: i32,
    actor: &str,
) -> (pb::HandoffResponse, Vec<OwnedFd>) {
    use pb::handoff_request::Request as R;
    if packet.truncated {
        return (
            error(
                pb::HandoffCode::InvalidArgument,
                format!(
                    "packet too large: at most {} bytes and {} fds",
                    fdpass::MAX_PACKET,
                    fdpass::MAX_FDS
                ),
            ),
            vec![],
        );
    }
    let req = match pb::HandoffRequest::decode(packet.data.as_slice()) {
        Ok(r) => r,
        Err(e) => {
            return (
                error(
                    pb::HandoffCode::InvalidArgument,
                    format!("malformed HandoffRequest: {e}"),
                ),
                vec![],
            );
        }
    };
    let mut fds = packet.fds;
    let expect_fds = |n: usize, what: &str| -> Result<(), Box<pb::HandoffResponse>> {
        if fds.len() != n {
            return Err(Box::new(error(
                pb::HandoffCode::InvalidArgument,
                format!(
                    "{what} takes exactly {n} fd(s) in SCM_RIGHTS, got {}",
                    fds.len()
                ),
            )));
        }
        Ok(())
    };
    let start_time = pidfd::start_time(pid).unwrap_or(0);
    let holder = Holder { pid, start_time };
    match req.request {
        None => (
            error(
                pb::HandoffCode::InvalidArgument,
                "empty HandoffRequest: set acquire, adopt or attach_vm".into(),
            ),
            vec![],
        ),
        Some(R::Acquire(a)) => {
            if let Err(r) = expect_fds(0, "acquire") {
                return (*r, vec![]);
            }
            if let Err(e) = crate::domain::validate_name("name", &a.name) {
                return (
                    error(pb::HandoffCode::InvalidArgument, e.to_string()),
                    vec![],
                );
            }
            if let Err(r) = admit(agent, &a.vm_id, &a.token) {
                return (*r, vec![]);
            }
            let key = RegionKey {
                vm_id: a.vm_id,
                name: a.name,
            };
            // Dup the fd under the region lock, record the holder durably, then send: after a
            // crash the agent looks for the file in the recorded holder. The agent's VM fd is not
            // sent: KVM refuses VM ioctls from any process but the VM's creator (EIO), so it would
            // be of no use to the VMM.
            let dup = rt.block_on(agent.with_fds(&key, |_, fd, _vm| fd.try_clone_to_owned()));
            let fd = match dup {
                Ok(Ok(fd)) => fd,
                Ok(Err(e)) => {
                    return (
                        error(pb::HandoffCode::Internal, format!("dup: {e}")),
                        vec![],
                    );
                }
                Err(e) => return (error(code_of(&e), e.to_string()), vec![]),
            };
            match rt.block_on(agent.record_holder(&key, holder, actor)) {
                Ok(view) => (
                    pb::HandoffResponse {
                        code: pb::HandoffCode::Ok as i32,
                        message: String::new(),
                        region: Some(crate::api::region_to_pb(&view)),
                        fd_count: 0,
                    },
                    vec![fd],
                ),
                Err(e) => (error(code_of(&e), e.to_string()), vec![]),
            }
        }
        Some(R::Adopt(a)) => {
            if let Err(r) = expect_fds(1, "adopt") {
                return (*r, vec![]);
            }
            if let Err(r) = admit(agent, &a.vm_id, &a.token) {
                return (*r, vec![]);
            }
            let backend = match crate::api::backend_from_pb(a.backend) {
                Ok(b) => b,
                Err(s) => {
                    return (
                        error(pb::HandoffCode::InvalidArgument, s.message().to_string()),
                        vec![],
                    );
                }
            };
            let Some(fd) = fds.pop() else {
                return (
                    error(pb::HandoffCode::Internal, "the fd vanished".into()),
                    vec![],
                );
            };
            let kind = fdpass::file_kind(fd.as_fd());
            let fits = match backend {
                Backend::Memfd | Backend::MemfdHugetlb => kind == fdpass::FileKind::Memfd,
                Backend::GuestMemfd => kind == fdpass::FileKind::GuestMemfd,
            };
            if !fits {
                return (
                    error(
                        pb::HandoffCode::InvalidArgument,
                        format!(
                            "the fd handed in is not a {} file (it looks like {kind:?})",
                            backend.as_str()
                        ),
                    ),
                    vec![],
                );
            }
            let key = RegionKey {
                vm_id: a.vm_id,
                name: a.name,
            };
            match rt.block_on(agent.adopt(key, backend, a.size_bytes, fd, holder, actor)) {
                Ok(view) => (
                    pb::HandoffResponse {
                        code: pb::HandoffCode::Ok as i32,
                        message: String::new(),
                        region: Some(crate::api::region_to_pb(&view)),
                        fd_count: 0,
                    },
                    vec![],
                ),
                Err(e) => (error(code_of(&e), e.to_string()), vec![]),
            }
        }
        Some(R::AttachVm(a)) => {
            if let Err(r) = expect_fds(1, "attach_vm") {
                return (*r, vec![]);
            }
            if let Err(r) = admit(agent, &a.vm_id, &a.token) {
                return (*r, vec![]);
            }
            let Some(fd) = fds.pop() else {
                return (
                    error(pb::HandoffCode::Internal, "the fd vanished".into()),
                    vec![],
                );
            };
            let is_vm = fdpass::link_of(fd.as_fd()).is_some_and(|l| l == KVM_VM_LINK);
            // The audit event is durable before the VM is used; without it nothing is attached.
            match rt.block_on(agent.attach_vm_audited(
                &a.vm_id,
                fd,
                format!("VM fd attached by pid {pid}"),
                actor,
            )) {
                Ok(()) => (
                    pb::HandoffResponse {
                        code: pb::HandoffCode::Ok as i32,
                        message: String::new(),
                        region: None,
                        fd_count: 0,
                    },
                    vec![],
                ),
                Err(AgentError::InvalidArgument(_)) if is_vm => (
                    error(
                        pb::HandoffCode::FailedPrecondition,
                        "a KVM VM fd answers only in the process that created it: the kernel \
                         refuses VM ioctls from any other process (EIO), so the agent cannot \
                         create guest_memfd files on this VM; create the guest_memfd in the VMM \
                         and hand it in with adopt"
                            .into(),
                    ),
                    vec![],
                ),
                Err(e) => (error(code_of(&e), e.to_string()), vec![]),
            }
        }
    }
}
