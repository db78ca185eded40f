//! Capability probes run once at agent start. Every capability is found by trying it on the
//! running kernel, never assumed from a version number.

use super::files::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfdVm, create_memfd,
};
use super::mapping::Mapping;
use crate::domain::{NodeSet, Policy, PolicyMode};
use std::os::fd::{AsFd, OwnedFd};

/// What the running kernel can do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// /dev/kvm opens and a VM can be created.
    pub kvm_usable: bool,
    /// Why KVM is not usable.
    pub kvm_error: String,
    /// KVM_CAP_GUEST_MEMFD.
    pub guest_memfd_supported: bool,
    /// KVM_CAP_GUEST_MEMFD_FLAGS.
    pub guest_memfd_flags: u64,
    /// guest_memfd keeps a shared policy.
    pub guest_memfd_shared_policy: bool,
    /// memfd keeps a shared policy.
    pub memfd_shared_policy: bool,
    /// hugetlb memfd keeps a shared policy (only probed when a huge page can be had).
    pub hugetlb_shared_policy: bool,
    /// MPOL_PREFERRED_MANY accepted.
    pub preferred_many: bool,
    /// MPOL_WEIGHTED_INTERLEAVE accepted.
    pub weighted_interleave: bool,
    /// uname -r.
    pub kernel_release: String,
    /// CAP_SYS_PTRACE, so fds can be taken back from holders.
    pub pidfd_getfd: bool,
}

/// Runs every probe. `node` is a node the agent may allocate on.
pub fn probe(node: u32) -> Capabilities {
    let bind = Policy::new(
        PolicyMode::Bind,
        NodeSet::from_ids([node]).unwrap_or_default(),
    );
    let mut caps = Capabilities {
        kernel_release: super::kernel_release(),
        pidfd_getfd: super::pidfd::have_cap_sys_ptrace(),
        ..Default::default()
    };
    let page = super::page_size();
    if let Ok(fd) = create_memfd("probe", 2 * page, None) {
        caps.memfd_shared_policy = shared_policy(&fd, 2 * page, &bind);
    }
    caps.preferred_many = mode_accepted(PolicyMode::PreferredMany, &bind.nodes);
    caps.weighted_interleave = mode_accepted(PolicyMode::WeightedInterleave, &bind.nodes);
    match GuestMemfdVm::create() {
        Ok(vm) => {
            caps.kvm_usable = true;
            caps.guest_memfd_supported = vm.guest_memfd_supported();
            caps.guest_memfd_flags = vm.guest_memfd_flags();
            let flags =
                caps.guest_memfd_flags & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
            if caps.guest_memfd_supported
                && flags & GUEST_MEMFD_FLAG_MMAP != 0
                && let Ok(fd) = vm.create_guest_memfd(2 * page, flags)
            {
                caps.guest_memfd_shared_policy = shared_policy(&fd, 2 * page, &bind);
            }
        }
        Err(e) => caps.kvm_error = format!("/dev/kvm: {}", e.desc()),
    }
    let huge = 2 << 20;
    if let Ok(fd) = create_memfd("probe-huge", huge, Some(huge)) {
        caps.hugetlb_shared_policy = shared_policy(&fd, huge, &bind);
    }
    caps
}

/// The two-mapping probe: bind through mapping A, read back through a different mapping B. Reading
/// back through A would report A's VMA policy even where the file keeps none.
fn shared_policy(fd: &OwnedFd, len: u64, bind: &Policy) -> bool {
    let (Ok(a), Ok(b)) = (Mapping::new(fd.as_fd(), len), Mapping::new(fd.as_fd(), len)) else {
        return false;
    };
    if a.mbind(0, len, bind, 0).is_err() {
        return false;
    }
    matches!(b.policy_at(0), Ok(Some(p)) if p.mode == PolicyMode::Bind)
}

fn mode_accepted(mode: PolicyMode, nodes: &NodeSet) -> bool {
    let page = super::page_size();
    let Ok(m) = Mapping::anonymous(page) else {
        return false;
    };
    m.mbind(0, page, &Policy::new(mode, *nodes), 0).is_ok()
}
