//! Guest memory files: memfd (plain and hugetlb) and KVM guest_memfd, plus the KVM VM a
//! guest_memfd belongs to.

use super::check;
use kvm_bindings::{kvm_create_guest_memfd, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VmFd};
use nix::errno::Errno;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use super::Mapping;

/// `GUEST_MEMFD_FLAG_MMAP`: the file can be mmapped (kvm-bindings lacks the constant).
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: pages start shared, so a host mapping can touch them.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 2;
/// `KVM_CAP_GUEST_MEMFD`.
pub const KVM_CAP_GUEST_MEMFD: u64 = 234;
/// `KVM_CAP_GUEST_MEMFD_FLAGS`: the mask of supported flags.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;
/// `KVM_MEM_GUEST_MEMFD` memslot flag.
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
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

/// A KVM VM, created by the agent or handed in by a VMM, on which guest_memfd files are created.
///
/// The memslots bound with [`GuestMemfdVm::bind_memslot`] keep their host mappings alive: the VM
/// holds a reference to each, and on drop deletes its memslots before letting the mappings go. So
/// no guest access can reach memory that was unmapped, even through a vCPU or a duplicate of the
/// VM fd that outlives this value.
#[derive(Debug)]
pub struct GuestMemfdVm {
    vm: VmFd,
    /// The memslots this value bound, with the mappings backing their shared pages.
    memslots: Mutex<Vec<(u32, Arc<Mapping>)>>,
}

impl GuestMemfdVm {
    /// Opens /dev/kvm and creates a VM of the default type.
    pub fn create() -> Result<Self, Errno> {
        let kvm = Kvm::new().map_err(|e| Errno::from_raw(e.errno()))?;
        let vm = kvm.create_vm().map_err(|e| Errno::from_raw(e.errno()))?;
        Ok(Self::wrap(vm))
    }

    /// Wraps a VM fd handed in by a VMM, after checking it is one (KVM_CHECK_EXTENSION answers).
    pub fn from_fd(fd: OwnedFd) -> Result<Self, Errno> {
        let kvm = Kvm::new().map_err(|e| Errno::from_raw(e.errno()))?;
        // The VM takes ownership of the descriptor.
        let raw = {
            use std::os::fd::IntoRawFd;
            fd.into_raw_fd()
        };
        // SAFETY: `raw` is an open descriptor we own (from OwnedFd::into_raw_fd); VmFd takes
        // ownership and closes it on drop. A non-KVM fd is rejected just below.
        let vm =
            unsafe { kvm.create_vmfd_from_rawfd(raw) }.map_err(|e| Errno::from_raw(e.errno()))?;
        let vm = Self::wrap(vm);
        if vm.vm.check_extension_raw(KVM_CAP_GUEST_MEMFD as _) < 0 {
            return Err(Errno::EBADF);
        }
        // KVM_CHECK_EXTENSION on a non-KVM fd fails with ENOTTY, which the raw check reports as
        // 0 or negative; require a real answer for a capability every VM reports.
        if vm.vm.check_extension_raw(1 /* KVM_CAP_IRQCHIP */) <= 0 {
            return Err(Errno::EBADF);
        }
        Ok(vm)
    }

    fn wrap(vm: VmFd) -> Self {
        Self {
            vm,
            memslots: Mutex::new(Vec::new()),
        }
    }

    /// KVM_CAP_GUEST_MEMFD on this VM.
    pub fn guest_memfd_supported(&self) -> bool {
        self.vm.check_extension_raw(KVM_CAP_GUEST_MEMFD as _) > 0
    }

    /// KVM_CAP_GUEST_MEMFD_FLAGS on this VM.
    pub fn guest_memfd_flags(&self) -> u64 {
        self.vm
            .check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS as _)
            .max(0) as u64
    }

    /// Creates a guest_memfd of `size` bytes on this VM.
    pub fn create_guest_memfd(&self, size: u64, flags: u64) -> Result<OwnedFd, Errno> {
        let req = kvm_create_guest_memfd {
            size,
            flags,
            reserved: [0; 6],
        };
        let raw = self
            .vm
            .create_guest_memfd(req)
            .map_err(|e| Errno::from_raw(e.errno()))?;
        // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// Creates vCPU `id` on this VM, for a VMM (or a test VMM) that runs guest code from the
    /// memslots it bound with [`GuestMemfdVm::bind_memslot`]. The agent itself never runs vCPUs.
    pub fn create_vcpu(&self, id: u64) -> Result<kvm_ioctls::VcpuFd, Errno> {
        self.vm
            .create_vcpu(id)
            .map_err(|e| Errno::from_raw(e.errno()))
    }

    /// Binds memslot `slot` at `guest_phys_addr`, `mapping.len()` bytes long, backed by `gmem`
    /// from offset 0 (private pages) and by `mapping` (shared pages). Used to prove a guest_memfd
    /// belongs to this VM, and by test VMMs that run guest code. The VM keeps `mapping` alive
    /// until it has deleted the memslot again, when it is dropped.
    pub fn bind_memslot(
        &self,
        slot: u32,
        guest_phys_addr: u64,
        mapping: Arc<Mapping>,
        gmem: BorrowedFd<'_>,
    ) -> Result<(), Errno> {
        let region = kvm_userspace_memory_region2 {
            slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr,
            memory_size: mapping.len(),
            userspace_addr: mapping.guest_address(),
            guest_memfd_offset: 0,
            guest_memfd: gmem.as_raw_fd() as u32,
            pad1: 0,
            pad2: [0; 14],
        };
        let mut slots = self.memslots.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: the memslot's userspace range is exactly `mapping`, which the VM keeps alive
        // (in `memslots`, under the lock taken above) until Drop has deleted the memslot.
        unsafe { self.vm.set_user_memory_region2(region) }
            .map_err(|e| Errno::from_raw(e.errno()))?;
        slots.push((slot, mapping));
        Ok(())
    }
}

impl Drop for GuestMemfdVm {
    fn drop(&mut self) {
        let slots = std::mem::take(
            self.memslots
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for (slot, mapping) in slots {
            // A memslot of size 0 deletes the slot (the only change KVM allows on a guest_memfd
            // memslot).
            let region = kvm_userspace_memory_region2 {
                slot,
                ..Default::default()
            };
            // SAFETY: deleting a memslot stops KVM from using its userspace range; it adds no
            // new range for the kernel to access.
            match unsafe { self.vm.set_user_memory_region2(region) } {
                Ok(()) => drop(mapping),
                // The VM (kept open by a vCPU or a duplicate fd) may still reach the range:
                // never unmap it.
                Err(_) => std::mem::forget(mapping),
            }
        }
    }
}

impl AsFd for GuestMemfdVm {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the VmFd owns this descriptor and outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.vm.as_raw_fd()) }
    }
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
        let n = cached_pages(fd, off, l)?;
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
    }

    /// The VM deletes the memslots it bound when dropped, so a duplicate of the VM fd that lives
    /// on (as a vCPU fd would) can no longer reach the mapping, which is then unmapped.
    #[test]
    fn dropping_the_vm_deletes_its_memslots() {
        let Ok(vm) = GuestMemfdVm::create() else {
            panic!("this test needs /dev/kvm");
        };
        let page = super::super::page_size();
        let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        let gmem = vm
            .create_guest_memfd(4 * page, flags)
            .expect("this test needs guest_memfd with MMAP|INIT_SHARED");
        let map = Arc::new(Mapping::new(gmem.as_fd(), 4 * page).unwrap());
        vm.bind_memslot(0, 0, map.clone(), gmem.as_fd()).unwrap();
        let other = GuestMemfdVm::from_fd(vm.as_fd().try_clone_to_owned().unwrap()).unwrap();
        let map2 = Arc::new(Mapping::new(gmem.as_fd(), 4 * page).unwrap());
        assert_eq!(
            other.bind_memslot(0, 0, map2.clone(), gmem.as_fd()),
            Err(Errno::EINVAL),
            "slot 0 is bound (a guest_memfd memslot cannot be changed)"
        );
        assert_eq!(Arc::strong_count(&map), 2, "the VM holds the mapping");
        drop(vm);
        assert_eq!(Arc::strong_count(&map), 1, "the VM let the mapping go");
        other
            .bind_memslot(0, 0, map2, gmem.as_fd())
            .expect("the dropped VM deleted slot 0, so it can be bound again");
    }
}
