//! The VMM side of the handoff socket (`<runtime-dir>/handoff.sock`, SOCK_SEQPACKET): one
//! protobuf message per packet, fds in SCM_RIGHTS. Blocking calls, as a VMM's setup path is.

use crate::{ClientError, pb};
use memplace_sys::fdpass;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
use prost::Message;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// Default handoff socket.
pub const DEFAULT_HANDOFF_SOCKET: &str = "/run/memplace/handoff.sock";

/// A connection to the handoff socket.
///
/// ```no_run
/// # fn demo(token: &str) -> Result<(), memplace_client::ClientError> {
/// use memplace_client::handoff::{DEFAULT_HANDOFF_SOCKET, Handoff};
/// let h = Handoff::connect(DEFAULT_HANDOFF_SOCKET)?;
/// // `token` is CreateRegion's handoff_token for vm1.
/// let got = h.acquire("vm1", "ram0", token)?;
/// // mmap `got.fd` (got.region.size_bytes long) as guest RAM. A guest_memfd to bind to your
/// // VM's memslots must be created on that VM by you and handed in with `adopt` instead.
/// # let _ = got;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Handoff {
    sock: OwnedFd,
}

/// What acquire returns.
#[derive(Debug)]
pub struct Acquired {
    /// The region's file.
    pub fd: OwnedFd,
    /// A second fd, if the agent sends one. This agent does not: a KVM VM fd answers only in
    /// the process that created it (the kernel gives EIO to any other), so the agent's VM fd
    /// would be of no use to a VMM.
    pub vm_fd: Option<OwnedFd>,
    /// The region.
    pub region: pb::Region,
}

impl Handoff {
    /// Connects.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let err = |e: nix::errno::Errno| {
            ClientError::Handoff(format!("{}: {}", path.as_ref().display(), e.desc()))
        };
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(err)?;
        connect(
            sock.as_raw_fd(),
            &UnixAddr::new(path.as_ref()).map_err(err)?,
        )
        .map_err(err)?;
        Ok(Self { sock })
    }

    /// Sends one raw packet with fds and returns the reply and its fds. For tests of malformed
    /// input; use the typed calls otherwise.
    pub fn exchange_raw(
        &self,
        data: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(pb::HandoffResponse, Vec<OwnedFd>), ClientError> {
        fdpass::send(self.sock.as_fd(), data, fds)
            .map_err(|e| ClientError::Handoff(format!("send: {}", e.desc())))?;
        let p = fdpass::recv(self.sock.as_fd())
            .map_err(|e| ClientError::Handoff(format!("recv: {}", e.desc())))?
            .ok_or_else(|| ClientError::Handoff("the agent closed the connection".into()))?;
        let resp = pb::HandoffResponse::decode(p.data.as_slice())
            .map_err(|e| ClientError::Handoff(format!("malformed response: {e}")))?;
        Ok((resp, p.fds))
    }

    fn call(
        &self,
        req: pb::handoff_request::Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(pb::HandoffResponse, Vec<OwnedFd>), ClientError> {
        let msg = pb::HandoffRequest { request: Some(req) };
        let (resp, fds) = self.exchange_raw(&msg.encode_to_vec(), fds)?;
        if resp.code != pb::HandoffCode::Ok as i32 {
            let code = pb::HandoffCode::try_from(resp.code).map_or("UNKNOWN", |c| c.as_str_name());
            return Err(ClientError::Handoff(format!("{code}: {}", resp.message)));
        }
        Ok((resp, fds))
    }

    /// Acquires a region's fd (and VM fd) with the VM's handoff token.
    pub fn acquire(&self, vm_id: &str, name: &str, token: &str) -> Result<Acquired, ClientError> {
        let (resp, fds) = self.call(
            pb::handoff_request::Request::Acquire(pb::AcquireRequest {
                vm_id: vm_id.into(),
                name: name.into(),
                token: token.into(),
            }),
            &[],
        )?;
        let mut it = fds.into_iter();
        let fd = it
            .next()
            .ok_or_else(|| ClientError::Handoff("no fd in the reply".into()))?;
        Ok(Acquired {
            fd,
            vm_fd: it.next(),
            region: resp.region.unwrap_or_default(),
        })
    }

    /// Hands a file this process made to the agent, which creates region `name` for it. The
    /// file must be of `backend`'s kind and exactly `size_bytes` long. This is how a VMM that
    /// backs guest memory with guest_memfd works with the agent: a guest_memfd binds only to the
    /// VM it was created on, so the VMM creates it.
    pub fn adopt(
        &self,
        vm_id: &str,
        name: &str,
        backend: pb::Backend,
        size_bytes: u64,
        token: &str,
        fd: BorrowedFd<'_>,
    ) -> Result<pb::Region, ClientError> {
        let (resp, _) = self.call(
            pb::handoff_request::Request::Adopt(pb::AdoptRequest {
                vm_id: vm_id.into(),
                name: name.into(),
                backend: backend as i32,
                size_bytes,
                token: token.into(),
            }),
            &[fd],
        )?;
        Ok(resp.region.unwrap_or_default())
    }

    /// Hands this process's KVM VM fd to the agent for the VM's later guest_memfd regions.
    ///
    /// On the kernels known so far this is refused (FAILED_PRECONDITION): KVM answers VM ioctls
    /// only from the process that created the VM, so the agent cannot create guest_memfd files on
    /// it. Create the guest_memfd in the VMM and hand it in with [`Handoff::adopt`].
    pub fn attach_vm(
        &self,
        vm_id: &str,
        token: &str,
        vm_fd: BorrowedFd<'_>,
    ) -> Result<(), ClientError> {
        self.call(
            pb::handoff_request::Request::AttachVm(pb::AttachVmRequest {
                vm_id: vm_id.into(),
                token: token.into(),
            }),
            &[vm_fd],
        )?;
        Ok(())
    }
}
