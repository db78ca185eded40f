//! The KVM VM a guest_memfd belongs to: created by the agent, or handed in by a VMM. Only the few
//! VM ioctls memplace needs, issued directly (no kvm-ioctls), so the client can link this crate
//! without a VMM library. Running vCPUs is for test VMMs only: [`GuestMemfdVm::create_vcpu`]
//! exists with the `kvm` feature.

use nix::errno::Errno;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use crate::Mapping;

/// `GUEST_MEMFD_FLAG_MMAP`: the file can be mmapped.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: pages start shared, so a host mapping can touch them.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 2;
/// `KVM_CAP_GUEST_MEMFD`.
pub const KVM_CAP_GUEST_MEMFD: u64 = 234;
/// `KVM_CAP_GUEST_MEMFD_FLAGS`: the mask of supported flags.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;
/// `KVM_MEM_GUEST_MEMFD` memslot flag.
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
/// `KVM_CAP_IRQCHIP`, which every VM reports.
const KVM_CAP_IRQCHIP: u64 = 0;

// ioctl numbers from include/uapi/linux/kvm.h (asm-generic _IO/_IOW/_IOWR encoding).
const KVMIO: u64 = 0xAE;
const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const KVM_CREATE_VM: u64 = io(0x01);
const KVM_CHECK_EXTENSION: u64 = io(0x03);
/// `_IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)`.
const KVM_SET_USER_MEMORY_REGION2: u64 = ioc(1, 0x49, size_of::<MemoryRegion2>());
/// `_IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)`.
const KVM_CREATE_GUEST_MEMFD: u64 = ioc(3, 0xd4, size_of::<CreateGuestMemfd>());

/// `struct kvm_create_guest_memfd`.
#[repr(C)]
#[derive(Default)]
struct CreateGuestMemfd {
    size: u64,
    flags: u64,
    reserved: [u64; 6],
}

/// `struct kvm_userspace_memory_region2`.
#[repr(C)]
#[derive(Default)]
struct MemoryRegion2 {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
    guest_memfd_offset: u64,
    guest_memfd: u32,
    pad1: u32,
    pad2: [u64; 14],
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// A KVM VM, created by the agent or handed in by a VMM, on which guest_memfd files are created.
///
/// The memslots bound with [`GuestMemfdVm::bind_memslot`] keep their host mappings alive: the VM
/// holds a reference to each, and on drop deletes its memslots before letting the mappings go. So
/// no guest access can reach memory that was unmapped, even through a vCPU or a duplicate of the
/// VM fd that outlives this value.
#[derive(Debug)]
pub struct GuestMemfdVm {
    vm: OwnedFd,
    /// The memslots this value bound, with the mappings backing their shared pages.
    memslots: Mutex<Vec<(u32, Arc<Mapping>)>>,
}

impl GuestMemfdVm {
    /// Opens /dev/kvm and creates a VM of the default type.
    pub fn create() -> Result<Self, Errno> {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(io_errno)?;
        loop {
            // SAFETY: KVM_CREATE_VM takes an integer (the VM type, 0 = default) and no memory.
            let fd =
                unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0 as libc::c_ulong) };
            if fd >= 0 {
                // SAFETY: KVM_CREATE_VM returned a new descriptor that nothing else owns.
                return Ok(Self::wrap(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            match Errno::last() {
                Errno::EINTR => continue,
                e => return Err(e),
            }
        }
    }

    /// Wraps a VM fd handed in by a VMM, after checking it is one (KVM_CHECK_EXTENSION answers).
    pub fn from_fd(fd: OwnedFd) -> Result<Self, Errno> {
        let vm = Self::wrap(fd);
        if vm.check_extension(KVM_CAP_GUEST_MEMFD) < 0 {
            return Err(Errno::EBADF);
        }
        // KVM_CHECK_EXTENSION on a non-KVM fd fails with ENOTTY, which the raw check reports as
        // negative; require a real answer for a capability every VM reports.
        if vm.check_extension(KVM_CAP_IRQCHIP) <= 0 {
            return Err(Errno::EBADF);
        }
        Ok(vm)
    }

    fn wrap(vm: OwnedFd) -> Self {
        Self {
            vm,
            memslots: Mutex::new(Vec::new()),
        }
    }

    /// KVM_CHECK_EXTENSION: the kernel's answer, or -1 on error.
    fn check_extension(&self, cap: u64) -> i32 {
        // SAFETY: KVM_CHECK_EXTENSION takes an integer and no memory; on a descriptor that is not
        // a VM it fails (ENOTTY) without effect.
        unsafe {
            libc::ioctl(
                self.vm.as_raw_fd(),
                KVM_CHECK_EXTENSION as _,
                cap as libc::c_ulong,
            )
        }
    }

    /// KVM_CAP_GUEST_MEMFD on this VM.
    pub fn guest_memfd_supported(&self) -> bool {
        self.check_extension(KVM_CAP_GUEST_MEMFD) > 0
    }

    /// KVM_CAP_GUEST_MEMFD_FLAGS on this VM.
    pub fn guest_memfd_flags(&self) -> u64 {
        self.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS).max(0) as u64
    }

    /// Creates a guest_memfd of `size` bytes on this VM.
    pub fn create_guest_memfd(&self, size: u64, flags: u64) -> Result<OwnedFd, Errno> {
        let mut req = CreateGuestMemfd {
            size,
            flags,
            ..Default::default()
        };
        // SAFETY: `req` is a valid kvm_create_guest_memfd for the kernel to read (and write) for
        // the call's duration.
        let fd = unsafe {
            libc::ioctl(
                self.vm.as_raw_fd(),
                KVM_CREATE_GUEST_MEMFD as _,
                &mut req as *mut CreateGuestMemfd,
            )
        };
        if fd < 0 {
            return Err(Errno::last());
        }
        // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Creates vCPU `id` on this VM, for a test VMM that runs guest code from the memslots it
    /// bound with [`GuestMemfdVm::bind_memslot`]. The agent itself never runs vCPUs.
    #[cfg(feature = "kvm")]
    pub fn create_vcpu(&self, id: u64) -> Result<kvm_ioctls::VcpuFd, Errno> {
        use std::os::fd::IntoRawFd;
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| Errno::from_raw(e.errno()))?;
        let dup = self.vm.try_clone().map_err(io_errno)?;
        // SAFETY: `dup` is a fresh duplicate of the VM fd that this call owns; the VmFd takes it
        // over and closes it on drop. The vCPU keeps the VM alive on its own.
        let vm = unsafe { kvm.create_vmfd_from_rawfd(dup.into_raw_fd()) }
            .map_err(|e| Errno::from_raw(e.errno()))?;
        vm.create_vcpu(id).map_err(|e| Errno::from_raw(e.errno()))
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
        let region = MemoryRegion2 {
            slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr,
            memory_size: mapping.len(),
            userspace_addr: mapping.guest_address(),
            guest_memfd_offset: 0,
            guest_memfd: gmem.as_raw_fd() as u32,
            ..Default::default()
        };
        let mut slots = self.memslots.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: the memslot's userspace range is exactly `mapping`, which the VM keeps alive
        // (in `memslots`, under the lock taken above) until Drop has deleted the memslot.
        unsafe { self.set_memory_region(&region) }?;
        slots.push((slot, mapping));
        Ok(())
    }

    /// KVM_SET_USER_MEMORY_REGION2.
    ///
    /// # Safety
    /// The region's userspace range must stay mapped (and not be reused for anything else) for as
    /// long as the VM may use the memslot.
    unsafe fn set_memory_region(&self, region: &MemoryRegion2) -> Result<(), Errno> {
        // SAFETY: `region` is a valid kvm_userspace_memory_region2 for the kernel to read for the
        // call's duration; the caller vouches for the range it names.
        let r = unsafe {
            libc::ioctl(
                self.vm.as_raw_fd(),
                KVM_SET_USER_MEMORY_REGION2 as _,
                region as *const MemoryRegion2,
            )
        };
        if r < 0 { Err(Errno::last()) } else { Ok(()) }
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
            let region = MemoryRegion2 {
                slot,
                ..Default::default()
            };
            // SAFETY: deleting a memslot stops KVM from using its userspace range; it names no
            // new range for the kernel to access.
            match unsafe { self.set_memory_region(&region) } {
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
        self.vm.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written uAPI structs and ioctl numbers match kvm-bindings' and kvm-ioctls'.
    #[test]
    fn uapi_layout_matches_kvm_bindings() {
        assert_eq!(
            size_of::<MemoryRegion2>(),
            size_of::<kvm_bindings::kvm_userspace_memory_region2>()
        );
        assert_eq!(
            size_of::<CreateGuestMemfd>(),
            size_of::<kvm_bindings::kvm_create_guest_memfd>()
        );
        assert_eq!(KVM_CREATE_VM, 0xAE01);
        assert_eq!(KVM_CHECK_EXTENSION, 0xAE03);
        assert_eq!(KVM_SET_USER_MEMORY_REGION2, 0x40A0_AE49);
        assert_eq!(KVM_CREATE_GUEST_MEMFD, 0xC040_AED4);
    }

    /// A descriptor that is not a KVM VM is refused.
    #[test]
    fn from_fd_refuses_a_file_that_is_not_a_vm() {
        let memfd = crate::create_memfd("not-a-vm", 4096, None).unwrap();
        assert_eq!(GuestMemfdVm::from_fd(memfd).err(), Some(Errno::EBADF));
    }

    /// The VM deletes the memslots it bound when dropped, so a duplicate of the VM fd that lives
    /// on (as a vCPU fd would) can no longer reach the mapping, which is then unmapped.
    #[test]
    #[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
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
