//! Every syscall and every `unsafe` block of memplace lives here: mempolicy, memfd, guest_memfd and
//! KVM, the agent's mappings, pidfd, and fd passing. The rest of the code sees safe types that own
//! their fds and mappings and take byte offsets, never raw pointers.
//!
//! All calls are synchronous and some block (fallocate, move_pages, mbind with MOVE); async callers
//! run them on blocking threads.
#![allow(unsafe_code)]

pub mod caps;
pub mod fdpass;
pub mod files;
pub mod mapping;
pub mod mempolicy;
pub mod pidfd;
pub mod probe;
pub mod procmem;
pub mod residency;

pub use files::{GuestMemfdVm, create_memfd, fallocate, fd_file_id};
pub use mapping::Mapping;

use nix::errno::Errno;

/// The base page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 { v as u64 } else { 4096 }
}

/// The kernel release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Turns a `-1`-on-error return into the errno.
fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

/// Arranges for `fd` to be open as descriptor `target` (without CLOEXEC) in the child that
/// `cmd` spawns, so a helper process can work on a region's file.
pub fn pass_fd_to_child(
    cmd: &mut std::process::Command,
    fd: std::os::fd::BorrowedFd<'_>,
    target: i32,
) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let src = fd.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls only dup2 and fcntl,
    // which are async-signal-safe; it touches no memory shared with the parent's threads.
    unsafe {
        cmd.pre_exec(move || {
            if src == target {
                let flags = libc::fcntl(target, libc::F_GETFD);
                if flags < 0 || libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(src, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Takes ownership of descriptor `fd` inherited from the parent (see [`pass_fd_to_child`]).
/// Returns `None` unless `fd` is open.
pub fn inherited_fd(fd: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the parent passed this descriptor for this process to own, and nothing else in this
    // process refers to it.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of a descriptor a syscall wrapper (such as nix's accept4) just returned.
pub fn owned(fd: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: callers pass a descriptor freshly returned by the kernel to this process, which
    // nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// Caps glibc's malloc at `arenas` arenas. By default glibc gives each thread that allocates
/// under contention an arena of its own (up to 8 per CPU), and memory freed into one stays
/// there: every tokio blocking thread would keep its own heap. Call it before starting threads.
/// A no-op where the C library is not glibc.
pub fn limit_malloc_arenas(arenas: i32) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable of the allocator; it takes plain integers and has no
    // memory-safety preconditions. Its failure (0) leaves the default, which is still correct.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = arenas;
}

/// Returns free heap memory to the kernel (glibc's `malloc_trim(0)`), for use after a burst of
/// transient allocations such as recovery. A no-op where the C library is not glibc.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory the allocator holds free; no live allocation moves.
    unsafe {
        libc::malloc_trim(0);
    }
}
