//! A `MAP_SHARED` mapping of a guest memory file, owned for its whole life: mmap in the
//! constructor, munmap in `Drop`. Every method takes byte offsets and checks them, so no caller
//! ever holds a raw pointer.

use super::mempolicy;
use crate::policy::Policy;
use nix::errno::Errno;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

const MADV_POPULATE_READ: i32 = 22;
const MADV_POPULATE_WRITE: i32 = 23;

// userfaultfd uAPI (linux/userfaultfd.h); libc lacks these.
const UFFD_API: u64 = 0xAA;
/// Handle only faults from user mode (5.11+). The probe's faults come from madvise, in kernel
/// mode, so they fail either way; this flag lets a process without CAP_SYS_PTRACE open one when
/// vm.unprivileged_userfaultfd is 0.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
/// move_pages takes page lists; query in batches of this many pages.
const QUERY_BATCH: usize = 4096;

/// A shared mapping of a file, or of a window of it. Methods take offsets in the file.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// The file offset the mapping starts at (0 for anonymous mappings).
    base: u64,
}

// SAFETY: the mapping is plain shared memory with no thread affinity. Mapping never hands out
// references into it; reads and writes are volatile raw-pointer accesses, and the kernel
// serializes policy changes on the VMA.
unsafe impl Send for Mapping {}
// SAFETY: as above: &Mapping methods only pass addresses to syscalls or copy bytes with volatile
// loads and stores through raw pointers (`volatile_load`/`volatile_store`), never through
// references. No Rust object lives in the mapping, the compiler may not assume its bytes are
// unchanged between accesses, and a concurrent writer (another thread, a guest or a VMM) can only
// make a copy see old or new words: the contract rust-vmm's vm-memory relies on for guest memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, read-write and shared, without reserving swap or
    /// huge pages (the file's own allocation decides that).
    pub fn new(fd: BorrowedFd<'_>, len: u64) -> Result<Self, Errno> {
        Self::window(fd, 0, len)
    }

    /// Maps `[offset, offset+len)` of `fd` alone. A window that covers one range has no
    /// neighbouring VMAs the kernel could merge it with, so mbind through it changes exactly
    /// that range of the file's shared policy. `offset` must be page-aligned (huge-page aligned
    /// for hugetlbfs).
    pub fn window(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<Self, Errno> {
        let len_usize = usize::try_from(len).map_err(|_| Errno::EOVERFLOW)?;
        let file_offset = libc::off_t::try_from(offset).map_err(|_| Errno::EOVERFLOW)?;
        if len_usize == 0 {
            return Err(Errno::EINVAL);
        }
        // SAFETY: a fresh mapping at a kernel-chosen address cannot alias any Rust object; `fd` is
        // a live descriptor for the duration of the call.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Errno::EINVAL)?;
        Ok(Self {
            ptr,
            len: len_usize,
            base: offset,
        })
    }

    /// An anonymous private mapping, for capability probes and benchmarks.
    pub fn anonymous(len: u64) -> Result<Self, Errno> {
        let len_usize = usize::try_from(len).map_err(|_| Errno::EOVERFLOW)?;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Errno::EINVAL)?;
        Ok(Self {
            ptr,
            len: len_usize,
            base: 0,
        })
    }

    /// The mapped length.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the mapping is empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of file offset `offset`, checking `[offset, offset+len)` is mapped here.
    fn addr(&self, offset: u64, len: u64) -> Result<usize, Errno> {
        let rel = offset.checked_sub(self.base).ok_or(Errno::EINVAL)?;
        let end = rel.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > self.len as u64 {
            return Err(Errno::EINVAL);
        }
        Ok(self.ptr.as_ptr() as usize + rel as usize)
    }

    /// Applies `policy` to `[offset, offset+len)` with mbind. For a file with a shared policy this
    /// binds the file's range, for anyone's later allocations.
    pub fn mbind(&self, offset: u64, len: u64, policy: &Policy, flags: u32) -> Result<(), Errno> {
        let addr = self.addr(offset, len)?;
        // SAFETY: `addr` checked `[addr, addr+len)` lies inside this mapping, which stays mapped
        // while `self` lives; mbind changes only its policy and page placement, never contents.
        unsafe { mempolicy::mbind_raw(addr, len as usize, policy, flags) }
    }

    /// The policy the kernel reports at `offset` (get_mempolicy(MPOL_F_ADDR)). `Ok(None)` for a
    /// mode this build does not know.
    pub fn policy_at(&self, offset: u64) -> Result<Option<Policy>, Errno> {
        let addr = self.addr(offset, 1)?;
        let (mode, mask) = mempolicy::policy_at_raw(addr)?;
        Ok(mempolicy::decode(mode, mask))
    }

    fn madvise(&self, offset: u64, len: u64, advice: i32) -> Result<(), Errno> {
        let addr = self.addr(offset, len)?;
        // SAFETY: the range lies inside this mapping; the advices used here (populate, dontneed on
        // a shared file mapping) never change file contents or free memory Rust refers to.
        let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) };
        if ret != 0 {
            return Err(Errno::last());
        }
        Ok(())
    }

    /// Maps already-present pages of the range into this process without writing (read faults).
    /// On a hole this allocates, so callers pass only resident runs.
    pub fn populate_read(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.madvise(offset, len, MADV_POPULATE_READ)
    }

    /// Makes faults on holes of `[offset, offset+len)` fail instead of allocating, for as long as
    /// the returned userfaultfd is open (missing-page mode with `UFFD_FEATURE_SIGBUS`): a read
    /// fault on an allocated page maps it, one on a hole fails with EFAULT (MADV_POPULATE_READ)
    /// and allocates nothing. Pages already mapped here are unaffected. A direct read of a hole
    /// through this mapping would raise SIGBUS, so use it only on a mapping made for probing.
    pub fn fail_faults_on_holes(&self, offset: u64, len: u64) -> Result<OwnedFd, Errno> {
        let start = self.addr(offset, len)? as u64;
        let open = |flags: libc::c_int| {
            // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
            super::check(unsafe { libc::syscall(libc::SYS_userfaultfd, flags) })
        };
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let raw = match open(flags | UFFD_USER_MODE_ONLY) {
            // Before 5.11 the flag is unknown.
            Err(Errno::EINVAL) => open(flags)?,
            r => r?,
        };
        // SAFETY: userfaultfd returned a new descriptor that nothing else owns.
        let uffd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_SIGBUS,
            ioctls: 0,
        };
        // SAFETY: `api` is a live, correctly laid out struct uffdio_api the kernel reads and writes.
        super::check(unsafe {
            libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi)
        } as libc::c_long)?;
        let mut reg = UffdioRegister {
            start,
            len,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: `reg` is a live struct uffdio_register the kernel reads and writes; its range lies
        // inside this mapping. Registering changes only how faults there are handled, and ends
        // when the fd closes or the mapping goes.
        super::check(unsafe {
            libc::ioctl(
                uffd.as_raw_fd(),
                UFFDIO_REGISTER,
                &mut reg as *mut UffdioRegister,
            )
        } as libc::c_long)?;
        Ok(uffd)
    }

    /// Write-faults every page of the range, allocating as a VMM's prefault does.
    pub fn populate_write(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.madvise(offset, len, MADV_POPULATE_WRITE)
    }

    /// Drops this process's page-table entries for the range. The file keeps its pages.
    pub fn unmap_pages(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.madvise(offset, len, libc::MADV_DONTNEED)
    }

    /// The node of each page of `[offset, offset+len)` (pages of `page` bytes) as move_pages
    /// reports it for this process: the node id, or a negative errno for a page not mapped here.
    pub fn page_nodes(&self, offset: u64, len: u64, page: u64) -> Result<Vec<i32>, Errno> {
        let base = self.addr(offset, len)?;
        let n = (len / page) as usize;
        let mut out = vec![0i32; n];
        let mut addrs = Vec::with_capacity(QUERY_BATCH.min(n));
        for (i, chunk) in out.chunks_mut(QUERY_BATCH).enumerate() {
            addrs.clear();
            let first = i * QUERY_BATCH;
            addrs.extend((0..chunk.len()).map(|j| base + (first + j) * page as usize));
            mempolicy::query_nodes_raw(&addrs, chunk)?;
        }
        Ok(out)
    }

    /// The node of the page at each of `offsets` as move_pages reports it for this process: the
    /// node id, or a negative errno for a page not mapped here.
    pub fn nodes_at(&self, offsets: &[u64]) -> Result<Vec<i32>, Errno> {
        let addrs = offsets
            .iter()
            .map(|o| self.addr(*o, 1))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = vec![0i32; addrs.len()];
        for (a, s) in addrs.chunks(QUERY_BATCH).zip(out.chunks_mut(QUERY_BATCH)) {
            mempolicy::query_nodes_raw(a, s)?;
        }
        Ok(out)
    }

    /// Copies `data` into the mapping at `offset`. The mapping is memory a running guest or VMM
    /// may write at the same moment, so every store is volatile (as rust-vmm's vm-memory does):
    /// the compiler may not elide, merge or invent accesses to it, and no Rust reference into it
    /// is ever formed. Aligned runs go a machine word at a time.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let addr = self.addr(offset, data.len() as u64)?;
        // SAFETY: `[addr, addr+data.len())` lies inside this live mapping (checked by `addr`) and
        // cannot overlap `data`, which is a Rust slice; the mapping is never referenced, only
        // accessed through raw pointers.
        unsafe { volatile_store(addr as *mut u8, data) };
        Ok(())
    }

    /// Copies `out.len()` bytes from the mapping at `offset`, with volatile loads (see
    /// [`Mapping::write`]). Bytes the guest changes during the copy may be seen old or new, a
    /// word at a time; the copy is never undefined behaviour.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), Errno> {
        let addr = self.addr(offset, out.len() as u64)?;
        // SAFETY: `[addr, addr+out.len())` lies inside this live mapping (checked by `addr`) and
        // cannot overlap `out`; the mapping is never referenced, only accessed through raw pointers.
        unsafe { volatile_load(addr as *const u8, out) };
        Ok(())
    }

    /// The start address, for KVM memslots (`userspace_addr`) only.
    pub fn guest_address(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped exactly once, here; no
        // reference into the mapping outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

const WORD: usize = std::mem::size_of::<usize>();

/// Stores `data` at `dst` with volatile writes: single bytes up to the first word boundary of
/// `dst`, then whole words, then the tail bytes.
///
/// # Safety
/// `[dst, dst+data.len())` must be valid for writes for the whole call and must not overlap
/// `data`. Other threads or processes may write it concurrently (shared guest memory).
unsafe fn volatile_store(dst: *mut u8, data: &[u8]) {
    let head = dst.align_offset(WORD).min(data.len());
    let (first, rest) = data.split_at(head);
    for (i, b) in first.iter().enumerate() {
        // SAFETY: `i < head <= data.len()`, inside the caller's range.
        unsafe { dst.add(i).write_volatile(*b) };
    }
    let mut words = rest.chunks_exact(WORD);
    // SAFETY: `head <= data.len()`, so this stays inside the caller's range.
    let mut at = unsafe { dst.add(head) };
    for w in &mut words {
        let v = usize::from_ne_bytes(w.try_into().expect("chunks_exact gives WORD bytes"));
        // SAFETY: `at` is word-aligned (past `head`) and the next WORD bytes lie inside the
        // caller's range, since `w` is a whole word of `rest`.
        unsafe {
            at.cast::<usize>().write_volatile(v);
            at = at.add(WORD);
        }
    }
    for (i, b) in words.remainder().iter().enumerate() {
        // SAFETY: the remainder's bytes are the last ones of the caller's range.
        unsafe { at.add(i).write_volatile(*b) };
    }
}

/// Loads `out.len()` bytes from `src` into `out` with volatile reads, in the same order of
/// bytes, words and tail as [`volatile_store`].
///
/// # Safety
/// `[src, src+out.len())` must be valid for reads for the whole call and must not overlap `out`.
/// Other threads or processes may write it concurrently (shared guest memory).
unsafe fn volatile_load(src: *const u8, out: &mut [u8]) {
    let head = src.align_offset(WORD).min(out.len());
    let (first, rest) = out.split_at_mut(head);
    for (i, b) in first.iter_mut().enumerate() {
        // SAFETY: `i < head <= out.len()`, inside the caller's range.
        *b = unsafe { src.add(i).read_volatile() };
    }
    let mut words = rest.chunks_exact_mut(WORD);
    // SAFETY: `head <= out.len()`, so this stays inside the caller's range.
    let mut at = unsafe { src.add(head) };
    for w in &mut words {
        // SAFETY: `at` is word-aligned (past `head`) and the next WORD bytes lie inside the
        // caller's range, since `w` is a whole word of `rest`.
        let v = unsafe { at.cast::<usize>().read_volatile() };
        w.copy_from_slice(&v.to_ne_bytes());
        // SAFETY: as above, still inside (or one past the end of) the caller's range.
        at = unsafe { at.add(WORD) };
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        // SAFETY: the remainder's bytes are the last ones of the caller's range.
        *b = unsafe { at.add(i).read_volatile() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every offset and length around word boundaries round-trips, and bytes outside the written
    /// range stay as they were (the head/word/tail split neither drops nor spills a byte).
    #[test]
    fn volatile_copies_round_trip_at_every_alignment() {
        let m = Mapping::anonymous(4096).unwrap();
        for offset in 0..(2 * WORD as u64 + 1) {
            for len in 0..(3 * WORD + 2) {
                m.write(0, &[0xEE; 128]).unwrap();
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(7).wrapping_add(1))
                    .collect();
                m.write(offset, &data).unwrap();
                let mut back = vec![0u8; len];
                m.read(offset, &mut back).unwrap();
                assert_eq!(back, data, "offset {offset} len {len}");
                let mut all = [0u8; 128];
                m.read(0, &mut all).unwrap();
                let o = offset as usize;
                assert!(
                    all[..o].iter().all(|b| *b == 0xEE),
                    "offset {offset} len {len}: head spilled"
                );
                assert!(
                    all[o + len..].iter().all(|b| *b == 0xEE),
                    "offset {offset} len {len}: tail spilled"
                );
            }
        }
        assert_eq!(m.write(4090, &[0; 7]), Err(Errno::EINVAL));
        assert_eq!(m.read(4096, &mut [0; 1]), Err(Errno::EINVAL));
    }

    /// Two threads share one mapping, as the agent and a VMM do: one writes whole words of one
    /// repeated byte while the other reads; every word read is one of the written patterns.
    #[test]
    fn concurrent_readers_see_whole_words() {
        let m = Mapping::anonymous(4096).unwrap();
        m.write(0, &[0; 64]).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..20_000u32 {
                    m.write(0, &[(i % 251) as u8; 64]).unwrap();
                }
            });
            let mut buf = [0u8; 64];
            for _ in 0..20_000 {
                m.read(0, &mut buf).unwrap();
                for w in buf.chunks(WORD) {
                    assert!(w.iter().all(|b| *b == w[0]), "torn word {w:?}");
                }
            }
        });
    }
}
