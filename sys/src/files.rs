//! Guest memory files: memfd (plain and hugetlb) and KVM guest_memfd (created on a VM, see
//! [`crate::kvm`]), and which of their pages are allocated.

use super::check;
use nix::errno::Errno;
use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

pub use crate::kvm::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfdVm, KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS, KVM_MEM_GUEST_MEMFD,
};

const MFD_HUGE_SHIFT: u32 = 26;

/// Creates a memfd of `size` bytes; with `hugepage` set, on hugetlbfs pages of that size.
pub fn create_memfd(name: &str, size: u64, hugepage: Option<u64>) -> Result<OwnedFd, Errno> {
    let cname = CString::new(format!("memplace:{name}")).map_err(|_| Errno::EINVAL)?;
    let mut flags = libc::MFD_CLOEXEC;
    if let Some(hp) = hugepage {
        if !hp.is_power_of_two() {
            return Err(Errno::EINVAL);
        }
        flags |= libc::MFD_HUGETLB | (hp.trailing_zeros() << MFD_HUGE_SHIFT);
    }
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let fd = check(unsafe { libc::memfd_create(cname.as_ptr(), flags) } as libc::c_long)?;
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    nix::unistd::ftruncate(&fd, i64::try_from(size).map_err(|_| Errno::EFBIG)?)?;
    Ok(fd)
}

/// fallocate(KEEP_SIZE) over a range, allocating its pages. With `punch`, frees them instead.
pub fn fallocate(fd: BorrowedFd<'_>, offset: u64, len: u64, punch: bool) -> Result<(), Errno> {
    let mut mode = libc::FALLOC_FL_KEEP_SIZE;
    if punch {
        mode |= libc::FALLOC_FL_PUNCH_HOLE;
    }
    loop {
        // SAFETY: fallocate has no memory-safety preconditions; `fd` is live for the call.
        let r = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    }
}

/// (st_dev, st_ino) of an open file: how a file is recognized in another process.
pub fn fd_file_id(fd: BorrowedFd<'_>) -> Result<(u64, u64), Errno> {
    let st = nix::sys::stat::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

const SYS_CACHESTAT: libc::c_long = 451;

/// Pages of the file in `[offset, offset+len)` held in its page cache (cachestat(2), 6.5+).
/// Unlike mincore and SEEK_DATA this counts pages that fallocate allocated but nobody has
/// touched yet, which shmem and guest_memfd keep "not uptodate".
pub fn cached_pages(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<u64, Errno> {
    let range = CachestatRange { off: offset, len };
    let mut cs = Cachestat::default();
    // SAFETY: `range` and `cs` are valid for the kernel to read and write for the call's duration.
    check(unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            &range as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0,
        )
    })?;
    Ok(cs.nr_cache)
}

/// Which pages of `[offset, offset+len)` are allocated, one bool per page of `page` bytes, found
/// by bisecting with [`cached_pages`]: cheap where runs are long, as after a populate.
pub fn allocated_map(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: u64,
    page: u64,
) -> Result<Vec<bool>, Errno> {
    let base = super::page_size();
    let mut out = vec![false; (len / page) as usize];
    let mut stack = vec![(offset, len)];
    while let Some((off, l)) = stack.pop() {
        let n = match cached_pages(fd, off, l) {
            // cachestat came with 6.5: older kernels (Debian 12's 6.1) say where data is instead.
            Err(Errno::ENOSYS) => return seek_allocated_map(fd, offset, len, page),
            r => r?,
        };
        if n == 0 {
            continue;
        }
        if n >= l / base || l <= page {
            let first = ((off - offset) / page) as usize;
            let count = (l / page).max(1) as usize;
            out[first..first + count].iter_mut().for_each(|b| *b = true);
            continue;
        }
        let half = (l / page / 2) * page;
        stack.push((off, half));
        stack.push((off + half, l - half));
    }
    Ok(out)
}

/// [`allocated_map`] for kernels without cachestat (before 6.5): the extents `lseek(SEEK_DATA)`
/// and `SEEK_HOLE` report, which for shmem are exactly its allocated pages (in memory or in swap).
/// The seeks go through a file description of its own (a reopen of /proc/self/fd/N), so the
/// offset of the description the agent shares with a VMM never moves. hugetlbfs answers
/// EOPNOTSUPP, as cachestat does there, so the caller probes it instead.
pub fn seek_allocated_map(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: u64,
    page: u64,
) -> Result<Vec<bool>, Errno> {
    use nix::sys::statfs::{HUGETLBFS_MAGIC, fstatfs};
    use nix::unistd::{Whence, lseek};
    if fstatfs(fd)?.filesystem_type() == HUGETLBFS_MAGIC {
        return Err(Errno::EOPNOTSUPP);
    }
    let own = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let end = offset + len;
    let mut out = vec![false; (len / page) as usize];
    let mut at = offset;
    while at < end {
        let data = match lseek(
            &own,
            i64::try_from(at).map_err(|_| Errno::EFBIG)?,
            Whence::SeekData,
        ) {
            Ok(d) => d as u64,
            // No data at or after `at`.
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = lseek(&own, data as i64, Whence::SeekHole)? as u64;
        let (from, to) = (data.max(offset), hole.min(end));
        let first = ((from - offset) / page) as usize;
        let last = (to - offset).div_ceil(page) as usize;
        let last = last.min(out.len());
        out[first..last].iter_mut().for_each(|b| *b = true);
        at = hole;
    }
    Ok(out)
}

/// Which huge pages of `[offset, offset+len)` of a hugetlbfs file of `file_len` bytes are
/// allocated, without allocating any. hugetlbfs has no cachestat, and mincore sees only pages
/// mapped in this process, so a page that fallocate allocated would read as a hole. Instead each
/// page is read-faulted through a temporary mapping whose holes fail rather than allocate (see
/// [`super::Mapping::fail_faults_on_holes`]).
pub fn hugetlb_allocated_map(
    fd: BorrowedFd<'_>,
    file_len: u64,
    offset: u64,
    len: u64,
    page: u64,
) -> Result<Vec<bool>, Errno> {
    let probe = super::Mapping::new(fd, file_len)?;
    let _guard = probe.fail_faults_on_holes(offset, len)?;
    (0..len / page)
        .map(|i| match probe.populate_read(offset + i * page, page) {
            Ok(()) => Ok(true),
            Err(Errno::EFAULT) => Ok(false),
            Err(e) => Err(e),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The hole probe works on any file that userfaultfd supports, so shmem stands in for
    /// hugetlbfs here (whose pool a unit test cannot count on).
    #[test]
    fn probing_for_holes_finds_allocated_pages_and_allocates_none() {
        let page = super::super::page_size();
        let fd = create_memfd("probe-test", 8 * page, None).unwrap();
        fallocate(fd.as_fd(), page, page, false).unwrap();
        fallocate(fd.as_fd(), 5 * page, 2 * page, false).unwrap();
        let map = hugetlb_allocated_map(fd.as_fd(), 8 * page, 0, 8 * page, page).unwrap();
        assert_eq!(
            map,
            [false, true, false, false, false, true, true, false],
            "fallocated pages, which nobody mapped, are found"
        );
        assert_eq!(
            cached_pages(fd.as_fd(), 0, 8 * page).unwrap(),
            3,
            "the probe allocated nothing"
        );
        assert_eq!(allocated_map(fd.as_fd(), 0, 8 * page, page).unwrap(), map);
        assert_eq!(
            seek_allocated_map(fd.as_fd(), 0, 8 * page, page).unwrap(),
            map,
            "the pre-6.5 method agrees with cachestat"
        );
        assert_eq!(
            seek_allocated_map(fd.as_fd(), 2 * page, 4 * page, page).unwrap(),
            map[2..6],
            "and within a sub-range"
        );
    }
}
