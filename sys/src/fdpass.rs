//! One-packet messages with fds in SCM_RIGHTS over a SOCK_SEQPACKET Unix socket, for the handoff
//! socket: each packet carries exactly one protobuf message.

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, UnixCredentials, getsockopt, recvmsg, sendmsg,
    sockopt,
};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The largest packet accepted.
pub const MAX_PACKET: usize = 64 * 1024;
/// The most fds accepted in one packet; more are closed and the packet is refused.
pub const MAX_FDS: usize = 4;
/// The most fds the kernel passes in one message (SCM_MAX_FD). Receive space is sized for this
/// many, so SCM_RIGHTS is never cut short: the kernel would install the fds that fit and set
/// MSG_CTRUNC, and nix then refuses to walk the control messages, which would leak those fds.
const SCM_MAX_FD: usize = 253;

/// A received packet.
#[derive(Debug)]
pub struct Packet {
    /// The payload.
    pub data: Vec<u8>,
    /// The fds it carried, owned.
    pub fds: Vec<OwnedFd>,
    /// Whether the payload was cut short or more than [`MAX_FDS`] fds came (all are closed).
    pub truncated: bool,
}

/// Accepts one connection on a listening socket, close-on-exec and non-blocking (the agent waits
/// on it through its async runtime, and [`recv`] and [`send`] then answer `EAGAIN` instead of
/// waiting), and returns the connection's descriptor, owned. `EAGAIN`, `EINTR` and the other
/// accept errors are returned to the caller.
pub fn accept(listener: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    use nix::sys::socket::SockFlag;
    let fd = nix::sys::socket::accept4(
        listener.as_raw_fd(),
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    // SAFETY: accept4 just returned this descriptor to this process; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one packet with `fds` in SCM_RIGHTS (`EAGAIN` on a full non-blocking socket: nothing
/// was sent).
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(data)];
    let cmsgs = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives one packet. Returns `Ok(None)` at end of stream (`EAGAIN` on a non-blocking socket
/// with nothing to read).
pub fn recv(sock: BorrowedFd<'_>) -> Result<Option<Packet>, Errno> {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(list) = c {
            for fd in list {
                // SAFETY: the kernel installed these descriptors in this process for this message;
                // nothing else owns them.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
        || fds.len() > MAX_FDS;
    let n = msg.bytes;
    // A SOCK_SEQPACKET read gives 0 bytes both for an empty packet (a valid, empty protobuf
    // message) and at end of stream; only the hang-up state tells them apart.
    if n == 0 && fds.is_empty() && !truncated && peer_hung_up(sock) {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some(Packet {
        data: buf,
        fds,
        truncated,
    }))
}

/// Whether the peer has closed or shut down its end.
fn peer_hung_up(sock: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd that outlives the call, and nfds is 1; a zero timeout
    // does not block.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r < 0 || p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

/// The peer's credentials (SO_PEERCRED).
pub fn peer_credentials(sock: BorrowedFd<'_>) -> Result<UnixCredentials, Errno> {
    getsockopt(&sock, sockopt::PeerCredentials)
}

/// What /proc/self/fd names the file behind `fd` (e.g. `anon_inode:kvm-vm`, `/memfd:x (deleted)`).
pub fn link_of(fd: BorrowedFd<'_>) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .ok()?
        .into_os_string()
        .into_string()
        .ok()
}

/// What kind of memory file an fd handed in is, as far as the kernel tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// shmem or hugetlbfs (a memfd, or a tmpfs file): answers F_GET_SEALS.
    Memfd,
    /// A guest_memfd: an anonymous inode before 6.19, its own pseudo-filesystem from 6.19.
    GuestMemfd,
    /// Anything else.
    Other,
}

/// `anon_inodefs`, where guest_memfd lives before 6.19.
const ANON_INODE_FS_MAGIC: libc::c_long = 0x0904_1934;
/// The guest_memfd pseudo-filesystem of 6.19+ ("GMEM").
const GUEST_MEMFD_MAGIC: libc::c_long = 0x474d_454d;

/// Classifies a file handed in. A guest_memfd is told by its filesystem and by refusing
/// F_GET_SEALS (other anonymous inodes cannot be mapped as memory, which adopt also requires).
pub fn file_kind(fd: BorrowedFd<'_>) -> FileKind {
    if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GET_SEALS).is_ok() {
        return FileKind::Memfd;
    }
    match nix::sys::statfs::fstatfs(fd).map(|s| s.filesystem_type().0 as libc::c_long) {
        Ok(ANON_INODE_FS_MAGIC | GUEST_MEMFD_MAGIC) => FileKind::GuestMemfd,
        _ => FileKind::Other,
    }
}

/// A non-blocking SOCK_SEQPACKET socket (the listener, or a connection from [`accept`]) that
/// waits through tokio's reactor: the handoff socket's listener and connections are tasks, not
/// threads. Must be made inside a tokio runtime.
#[cfg(feature = "tokio")]
pub struct AsyncSeqpacket(tokio::io::unix::AsyncFd<OwnedFd>);

#[cfg(feature = "tokio")]
impl AsyncSeqpacket {
    /// Registers `sock`, which must be non-blocking, with the runtime's reactor.
    pub fn new(sock: OwnedFd) -> std::io::Result<Self> {
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and refers to the
        // same socket for the AsyncFd's whole life, and OwnedFd::as_raw_fd always returns it.
        let afd =
            unsafe { tokio::io::unix::AsyncFd::register(sock) }.map_err(std::io::Error::from)?;
        Ok(Self(afd))
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.get_ref().as_fd()
    }

    /// Runs `op` on the socket once it is ready for `interest`, again after each `EAGAIN`.
    async fn when_ready<R>(
        &self,
        interest: tokio::io::Interest,
        mut op: impl FnMut(BorrowedFd<'_>) -> Result<R, Errno>,
    ) -> Result<R, Errno> {
        use std::os::fd::AsFd;
        let errno = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        loop {
            let mut ready = self.0.ready(interest).await.map_err(errno)?;
            match ready.try_io(|s| op(s.get_ref().as_fd()).map_err(std::io::Error::from)) {
                Ok(r) => return r.map_err(errno),
                // EAGAIN: the readiness was stale and is cleared; wait for the next.
                Err(_would_block) => continue,
            }
        }
    }

    /// Waits for a connection on a listener and accepts it (see [`accept`]).
    pub async fn accept(&self) -> Result<OwnedFd, Errno> {
        self.when_ready(tokio::io::Interest::READABLE, accept).await
    }

    /// Waits for one packet (see [`recv`]).
    pub async fn recv(&self) -> Result<Option<Packet>, Errno> {
        self.when_ready(tokio::io::Interest::READABLE, recv).await
    }

    /// Sends one packet, waiting for room (see [`send`]).
    pub async fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
        self.when_ready(tokio::io::Interest::WRITABLE, |s| send(s, data, fds))
            .await
    }
}
