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

/// A received packet.
#[derive(Debug)]
pub struct Packet {
    /// The payload.
    pub data: Vec<u8>,
    /// The fds it carried, owned.
    pub fds: Vec<OwnedFd>,
    /// Whether the payload or the fd list was cut short.
    pub truncated: bool,
}

/// Sends one packet with `fds` in SCM_RIGHTS.
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

/// Receives one packet. Returns `Ok(None)` at end of stream.
pub fn recv(sock: BorrowedFd<'_>) -> Result<Option<Packet>, Errno> {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
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
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let n = msg.bytes;
    if n == 0 && fds.is_empty() && !truncated {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some(Packet {
        data: buf,
        fds,
        truncated,
    }))
}

/// The peer's credentials (SO_PEERCRED).
pub fn peer_credentials(sock: BorrowedFd<'_>) -> Result<UnixCredentials, Errno> {
    getsockopt(&sock, sockopt::PeerCredentials)
}
