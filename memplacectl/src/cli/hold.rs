//! `memplacectl hold`: a stand-in VMM that acquires a region's fd on the handoff socket, maps
//! it, optionally touches it, and waits for a signal.

use super::parse_size;
use clap::Args;
use memplace_client::ClientError;
use memplace_client::handoff::{DEFAULT_HANDOFF_SOCKET, Handoff};
use std::io::Write;

#[derive(Args, Debug)]
pub(crate) struct HoldArgs {
    /// VM id.
    pub(crate) vm: String,
    /// Region name.
    pub(crate) name: String,
    /// The VM's handoff token.
    #[arg(long, env = "MEMPLACE_HANDOFF_TOKEN")]
    pub(crate) token: String,
    /// Handoff socket.
    #[arg(long, env = "MEMPLACE_HANDOFF_SOCKET", default_value = DEFAULT_HANDOFF_SOCKET)]
    pub(crate) handoff_socket: String,
    /// Write-fault this many bytes from offset 0 (e.g. 64M), as a guest would.
    #[arg(long)]
    pub(crate) touch: Option<String>,
    /// Write a pattern derived from SEED over the touched bytes; on SIGUSR1, verify it and print
    /// "pattern ok" or "pattern BAD".
    #[arg(long)]
    pub(crate) pattern: Option<u64>,
    /// For guest_memfd: bind memslot 0 of the VM fd that came with the region to it, proving
    /// the file belongs to that VM. Fails with this agent, which sends no VM fd: a KVM VM fd
    /// answers only in the process that created it (the kernel returns EIO to any other).
    #[arg(long)]
    pub(crate) bind_memslot: bool,
}

pub(crate) fn hold(h: &HoldArgs) -> Result<(), ClientError> {
    use memplace_sys::{GuestMemfdVm, Mapping};
    use std::os::fd::AsFd;
    let conn = Handoff::connect(&h.handoff_socket)?;
    let got = conn.acquire(&h.vm, &h.name, &h.token)?;
    let size = got.region.size_bytes;
    let map = std::sync::Arc::new(
        Mapping::new(got.fd.as_fd(), size)
            .map_err(|e| ClientError::Handoff(format!("mmap: {}", e.desc())))?,
    );
    let touch = h
        .touch
        .as_deref()
        .map(parse_size)
        .transpose()?
        .unwrap_or(0)
        .min(size);
    let page = memplace_sys::page_size();
    let pattern_byte =
        |seed: u64, off: u64| ((off / page).wrapping_mul(31).wrapping_add(seed) & 0xff) as u8;
    if touch > 0 {
        map.populate_write(0, touch.div_ceil(page) * page)
            .map_err(|e| ClientError::Handoff(format!("touching memory: {}", e.desc())))?;
        if let Some(seed) = h.pattern {
            let mut off = 0;
            while off < touch {
                map.write(off, &[pattern_byte(seed, off)])
                    .map_err(|e| ClientError::Handoff(e.desc().into()))?;
                off += page;
            }
        }
    }
    let mut _vm = None;
    if h.bind_memslot {
        let vm_fd = got.vm_fd.ok_or_else(|| {
            ClientError::Handoff(
                "no VM fd came with the region: a KVM VM fd answers only in the process that \
                     created it, and a guest_memfd binds only to the VM it was created on, so a \
                     guest_memfd the agent made cannot back a memslot of this VMM's VM; create it \
                     in the VMM and hand it in with adopt"
                    .into(),
            )
        })?;
        let vm = GuestMemfdVm::from_fd(vm_fd)
            .map_err(|e| ClientError::Handoff(format!("VM fd: {}", e.desc())))?;
        vm.bind_memslot(0, 0, map.clone(), got.fd.as_fd())
            .map_err(|e| {
                ClientError::Handoff(format!(
                    "binding memslot 0 to the guest_memfd: {}",
                    e.desc()
                ))
            })?;
        println!("memslot bound");
        _vm = Some(vm);
    }
    // `run` is already on the multi-threaded runtime: block this worker in place rather than
    // starting a second runtime. The signal handlers exist before "holding" is printed, so a
    // caller that waits for that line may signal at once.
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).map_err(|e| ClientError::Handoff(e.to_string()))?;
            let mut int = signal(SignalKind::interrupt()).map_err(|e| ClientError::Handoff(e.to_string()))?;
            let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| ClientError::Handoff(e.to_string()))?;
            println!(
                "holding {}/{} ({} bytes) pid {}",
                h.vm,
                h.name,
                size,
                std::process::id()
            );
            let _ = std::io::stdout().flush();
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = usr1.recv() => {
                        let ok = match h.pattern {
                            Some(seed) => {
                                let mut off = 0;
                                let mut good = true;
                                let mut b = [0u8; 1];
                                while off < touch {
                                    if map.read(off, &mut b).is_err() || b[0] != pattern_byte(seed, off) { good = false; break; }
                                    off += page;
                                }
                                good
                            }
                            None => true,
                        };
                        println!("pattern {}", if ok { "ok" } else { "BAD" });
                        let _ = std::io::stdout().flush();
                    }
                }
            }
            Ok::<_, ClientError>(())
        })
    })?;
    drop(map);
    Ok(())
}
