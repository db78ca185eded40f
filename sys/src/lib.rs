//! memplace-sys: every syscall and every `unsafe` block of memplace lives in this crate:
//! mempolicy, memfd, guest_memfd and KVM, the agent's mappings, pidfd, and fd passing. The rest of
//! the code (the agent, the client, the test VMMs) sees safe types that own their fds and mappings
//! and take byte offsets, never raw pointers; those crates `#![forbid(unsafe_code)]`. The agent
//! re-exports this crate as `memplace_server::kernel`.
//!
//! All calls are synchronous and some block (fallocate, move_pages, mbind with MOVE); async callers
//! run them on blocking threads.
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod caps;
pub mod fdpass;
pub mod files;
pub mod kvm;
pub mod mapping;
mod maps;
pub mod mempolicy;
pub mod pidfd;
pub mod policy;
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

/// A descriptor of this process's own for the file open as descriptor `fd`, which the parent
/// passed with [`pass_fd_to_child`]. Returns `None` unless `fd` is open.
///
/// The returned descriptor is a duplicate (`F_DUPFD_CLOEXEC`): this function cannot know that
/// nothing else in the process owns descriptor `fd`, so it leaves `fd` itself alone rather than
/// take it over (and risk closing a descriptor some other owner still uses). Duplicating a
/// descriptor number reaches the same file as opening `/proc/self/fd/<fd>` does, which safe code
/// may always do; the caller owns the duplicate alone.
pub fn inherited_fd(fd: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table and installs a new descriptor; it
    // has no memory-safety preconditions and fails with EBADF when `fd` is not open.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return None;
    }
    // SAFETY: fcntl just created `dup` for this call; nothing else refers to it.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(dup) })
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
