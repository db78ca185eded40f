//! The handoff socket for VMMs: `<runtime-dir>/handoff.sock`, SOCK_SEQPACKET. Each request and
//! each response is one packet holding one `memplace.v1` protobuf message; fds ride in
//! SCM_RIGHTS on the same packet. Peers are checked by SO_PEERCRED uid, and tokens compare in
//! constant time.
//!
//! Connections are tasks on the agent's runtime, waiting on their sockets through tokio's reactor
//! ([`AsyncFd`]) and on the shutdown signal. At most [`MAX_CONNECTIONS`] are served at once; a
//! connection over the bound gets its first request answered RESOURCE_EXHAUSTED (see
//! [`MAX_CONNECTIONS`]). `request` decodes and answers one request; every refusal is an
//! [`AgentError`], whose code ([`AgentError::code`]) is the handoff code, as for gRPC.
//!
//! What KVM allows shapes the requests: a VM fd answers only in the process that created it, and a
//! guest_memfd binds only to the VM it was created on. So acquire sends the region's file alone
//! (a guest_memfd the agent made can be mapped by the VMM, not bound to its memslots), a VMM that
//! backs guest memory with guest_memfd creates the file and hands it in with adopt, and attach_vm
//! is refused with that explanation where the kernel refuses the VM fd.

mod request;
pub mod token;

use crate::engine::{Agent, AgentError};
use crate::kernel::fdpass;
use crate::metrics::Metrics;
use fdpass::AsyncSeqpacket;
use memplace_proto::v1 as pb;
use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, listen, socket};
use prost::Message;
use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

/// How /proc names a KVM VM fd.
const KVM_VM_LINK: &str = "anon_inode:kvm-vm";

/// The most handoff connections served at once. A VMM holds its connection only while it
/// acquires or adopts its regions, so a few dozen cover every VM a host starts at once. A
/// connection over the bound is not served: its first request is answered RESOURCE_EXHAUSTED
/// ("retry once one closes") and the connection closed; the agent waits [`REFUSE_WAIT`] at most
/// for that request. As many refusals run at once at most; a connection beyond those is closed
/// at once (the client reads that the agent closed the connection).
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection over [`MAX_CONNECTIONS`] may take to send the request to refuse.
const REFUSE_WAIT: Duration = Duration::from_secs(5);

/// Binds the handoff socket at `path` with `mode`. The listener does not block: [`serve`] waits
/// on it through the runtime.
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

/// What every connection needs.
struct Shared {
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    allowed: HashSet<u32>,
}

/// Serves the handoff socket until `stop` changes (or its sender is gone): the same signal the
/// gRPC listeners follow. Each connection is a task, at most `max_connections` at once (the agent
/// uses [`MAX_CONNECTIONS`]). At the signal the listener closes, and each connection closes once
/// its current request is answered; the returned task ends when every connection's has.
pub fn serve(
    listener: OwnedFd,
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    allowed_uids: HashSet<u32>,
    max_connections: usize,
    stop: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = AsyncSeqpacket::new(listener)?;
    let shared = Arc::new(Shared {
        agent,
        metrics,
        allowed: allowed_uids,
    });
    Ok(tokio::spawn(accept_loop(
        listener,
        shared,
        max_connections,
        stop,
    )))
}

/// Accepts connections until the stop signal, then waits for every connection's task; the
/// listener closes first.
async fn accept_loop(
    listener: AsyncSeqpacket,
    shared: Arc<Shared>,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
) {
    let served = Arc::new(Semaphore::new(max_connections));
    let refusing = Arc::new(Semaphore::new(max_connections));
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => r,
        };
        let fd = match accepted {
            Ok(fd) => fd,
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(e) => {
                // Out of fds, most likely: let some close before accepting again.
                tracing::warn!(error = %e, "handoff accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let conn = match AsyncSeqpacket::new(fd) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "handoff connection dropped: cannot wait on it");
                continue;
            }
        };
        if let Ok(permit) = served.clone().try_acquire_owned() {
            conns.spawn(serve_conn(conn, shared.clone(), stop.clone(), permit));
        } else if let Ok(permit) = refusing.clone().try_acquire_owned() {
            let refuse = refuse_conn(conn, shared.clone(), max_connections, permit);
            let mut stop = stop.clone();
            conns.spawn(async move {
                tokio::select! {
                    _ = stop.changed() => {}
                    _ = refuse => {}
                }
            });
        } else {
            tracing::warn!(
                max_connections,
                "handoff connection closed at once: the agent serves and refuses as many as it may"
            );
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Sends `resp` with `fds` on `conn`; false when the peer is gone.
async fn send(conn: &AsyncSeqpacket, resp: pb::HandoffResponse, fds: &[OwnedFd]) -> bool {
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let data = pb::HandoffResponse {
        fd_count: borrowed.len() as u32,
        ..resp
    }
    .encode_to_vec();
    conn.send(&data, &borrowed).await.is_ok()
}

/// Answers requests on one connection until the peer hangs up or the stop signal; holds one of
/// the [`MAX_CONNECTIONS`] permits meanwhile.
async fn serve_conn(
    conn: AsyncSeqpacket,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let Ok(cred) = fdpass::peer_credentials(conn.fd()) else {
        return;
    };
    let actor = format!("uid:{} pid:{}", cred.uid(), cred.pid());
    loop {
        let packet = tokio::select! {
            _ = stop.changed() => return,
            p = conn.recv() => match p {
                Ok(Some(p)) => p,
                Ok(None) | Err(_) => return,
            },
        };
        let (kind, vm_id, name) = describe(&packet.data);
        // Once read, a request is answered: the stop signal waits for it.
        let (resp, fds) = if shared.allowed.contains(&cred.uid()) {
            request::handle(&shared.agent, packet, cred.pid(), &actor).await
        } else {
            let e = AgentError::PermissionDenied(format!(
                "uid {} may not use the handoff socket",
                cred.uid()
            ));
            (refusal(&e), vec![])
        };
        let code = pb::HandoffCode::try_from(resp.code).unwrap_or(pb::HandoffCode::Unspecified);
        shared.metrics.count_handoff(kind, code.as_str_name());
        tracing::info!(%vm_id, %name, caller = %actor, code = code.as_str_name(), detail = %resp.message, "handoff {kind}");
        if !send(&conn, resp, &fds).await {
            return;
        }
    }
}

/// Answers the first request of a connection over the bound RESOURCE_EXHAUSTED and closes it
/// (after [`REFUSE_WAIT`] without a request, closes it unanswered).
async fn refuse_conn(
    conn: AsyncSeqpacket,
    shared: Arc<Shared>,
    max_connections: usize,
    _permit: OwnedSemaphorePermit,
) {
    let Ok(Ok(Some(packet))) = tokio::time::timeout(REFUSE_WAIT, conn.recv()).await else {
        return;
    };
    let (kind, ..) = describe(&packet.data);
    drop(packet);
    let e = AgentError::ResourceExhausted(format!(
        "the handoff socket serves at most {max_connections} connections at once and all are \
         taken: the request was not run; retry once a connection closes"
    ));
    let resp = refusal(&e);
    let code = pb::HandoffCode::try_from(resp.code).unwrap_or(pb::HandoffCode::Unspecified);
    shared.metrics.count_handoff(kind, code.as_str_name());
    tracing::warn!(
        max_connections,
        "handoff {kind} refused: too many connections"
    );
    send(&conn, resp, &[]).await;
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

/// The response to a refused request: the code is [`AgentError::code`], the one mapping both
/// edges use, and the message is the error's.
pub(crate) fn refusal(e: &AgentError) -> pb::HandoffResponse {
    pb::HandoffResponse {
        code: e.code().handoff() as i32,
        message: e.to_string(),
        region: None,
        fd_count: 0,
    }
}
