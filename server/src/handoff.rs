//! The handoff socket for VMMs: `<runtime-dir>/handoff.sock`, SOCK_SEQPACKET. Each request and
//! each response is one packet holding one `memplace.v1` protobuf message; fds ride in
//! SCM_RIGHTS on the same packet. Peers are checked by SO_PEERCRED uid, and tokens compare in
//! constant time.
//!
//! Connections are few and short, so each gets a plain thread that waits on its socket (and on
//! the stop pipe that the shutdown signal closes) and calls into the engine through the runtime
//! handle. `request` decodes and answers one request.
//!
//! What KVM allows shapes the requests: a VM fd answers only in the process that created it, and a
//! guest_memfd binds only to the VM it was created on. So acquire sends the region's file alone
//! (a guest_memfd the agent made can be mapped by the VMM, not bound to its memslots), a VMM that
//! backs guest memory with guest_memfd creates the file and hands it in with adopt, and attach_vm
//! is refused with that explanation where the kernel refuses the VM fd.

mod request;
pub mod token;

use crate::domain::VmId;
use crate::engine::{Agent, AgentError};
use crate::kernel::fdpass;
use crate::metrics::Metrics;
use memplace_proto::v1 as pb;
use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, listen, socket};
use prost::Message;
use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

/// How /proc names a KVM VM fd.
const KVM_VM_LINK: &str = "anon_inode:kvm-vm";

/// Binds the handoff socket at `path` with `mode`. The listener does not block: [`serve`] polls
/// it next to its stop pipe.
pub fn bind_socket(path: &Path, mode: u32) -> std::io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
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

/// Serves the handoff socket until `stop` changes (or its sender is gone): the same signal the
/// gRPC listeners follow. Each connection gets a plain thread of its own. At the signal the
/// listener closes, and each connection closes once its current request is answered; the
/// returned task ends when every handoff thread has.
pub fn serve(
    listener: OwnedFd,
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    allowed_uids: HashSet<u32>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // Dropping the write end wakes every handoff thread (POLLHUP on the read end).
    let (wake, woken) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let accept = Accept {
        listener,
        woken: Arc::new(woken),
        agent,
        metrics,
        allowed: Arc::new(allowed_uids),
        rt: tokio::runtime::Handle::current(),
    };
    let thread = std::thread::Builder::new()
        .name("handoff-accept".into())
        .spawn(move || accept.run())?;
    Ok(tokio::spawn(async move {
        let _ = stop.changed().await;
        drop(wake);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }))
}

/// What a handoff thread's wait ended with.
enum Wait {
    /// The socket has something to read.
    Ready,
    /// The stop pipe closed, or polling failed: the thread returns.
    Stop,
}

/// Waits until `fd` is readable or the stop pipe `woken` closes.
fn wait(fd: BorrowedFd<'_>, woken: BorrowedFd<'_>) -> Wait {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let mut fds = [
            PollFd::new(fd, PollFlags::POLLIN),
            PollFd::new(woken, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) if fds[1].any().unwrap_or(true) => return Wait::Stop,
            Ok(_) => return Wait::Ready,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "handoff socket: poll failed");
                return Wait::Stop;
            }
        }
    }
}

/// The accept loop's state: the listener, the stop pipe, and what connections need.
struct Accept {
    listener: OwnedFd,
    woken: Arc<OwnedFd>,
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    allowed: Arc<HashSet<u32>>,
    rt: tokio::runtime::Handle,
}

impl Accept {
    /// Accepts connections until the stop pipe closes, then waits for every connection's
    /// thread; the listener closes on return.
    fn run(self) {
        let mut conns: Vec<std::thread::JoinHandle<()>> = Vec::new();
        while let Wait::Ready = wait(self.listener.as_fd(), self.woken.as_fd()) {
            // The listener does not block; accepted sockets do not inherit O_NONBLOCK.
            let conn = match fdpass::accept(self.listener.as_fd()) {
                Ok(fd) => fd,
                Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "handoff accept failed");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            conns.retain(|c| !c.is_finished());
            let conn = Conn {
                fd: conn,
                woken: self.woken.clone(),
                agent: self.agent.clone(),
                metrics: self.metrics.clone(),
                allowed: self.allowed.clone(),
                rt: self.rt.clone(),
            };
            match std::thread::Builder::new()
                .name("handoff-conn".into())
                .spawn(move || conn.serve())
            {
                Ok(c) => conns.push(c),
                Err(e) => {
                    tracing::warn!(error = %e, "handoff connection dropped: no thread for it")
                }
            }
        }
        drop(self.listener);
        for c in conns {
            let _ = c.join();
        }
    }
}

/// One connection and what its thread needs.
struct Conn {
    fd: OwnedFd,
    woken: Arc<OwnedFd>,
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    allowed: Arc<HashSet<u32>>,
    rt: tokio::runtime::Handle,
}

impl Conn {
    /// Answers requests until the peer hangs up or the stop pipe closes.
    fn serve(self) {
        let (conn, agent, allowed, rt) = (&self.fd, &*self.agent, &*self.allowed, &self.rt);
        let cred = match fdpass::peer_credentials(conn.as_fd()) {
            Ok(c) => c,
            Err(_) => return,
        };
        let actor = format!("uid:{} pid:{}", cred.uid(), cred.pid());
        while let Wait::Ready = wait(conn.as_fd(), self.woken.as_fd()) {
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
                request::handle(agent, rt, packet, cred.pid(), &actor)
            };
            let code = pb::HandoffCode::try_from(resp.code).unwrap_or(pb::HandoffCode::Unspecified);
            self.metrics.count_handoff(kind, code.as_str_name());
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

/// A refusal: the response, sent without fds.
type Refusal = Box<pb::HandoffResponse>;

/// Checks a request's vm_id and that its token is that VM's; the checked id.
fn admit(agent: &Agent, vm_id: &str, token: &str) -> Result<VmId, Refusal> {
    let vm = VmId::parse(vm_id)
        .map_err(|e| Box::new(error(pb::HandoffCode::InvalidArgument, e.to_string())))?;
    authorize(agent, vm_id, token)?;
    Ok(vm)
}

/// Checks that a token is VM `vm_id`'s (in constant time); the vm_id is already checked.
fn authorize(agent: &Agent, vm_id: &str, token: &str) -> Result<(), Refusal> {
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
