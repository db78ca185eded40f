//! Capability probes run once at agent start. Every capability is found by trying it on the
//! running kernel, never assumed from a version number.

use super::files::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfdVm, create_memfd,
};
use super::mapping::Mapping;
use crate::policy::{NodeSet, Policy, PolicyMode};
use std::os::fd::{AsFd, OwnedFd};

/// What the running kernel can do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Features {
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
    /// Interleave on guest_memfd alternates pages by file offset (7.2+; 6.19 to 7.1 take the
    /// interleave index from the inode). None: not known, see `guest_memfd_interleave_note`.
    pub guest_memfd_interleave_exact: Option<bool>,
    /// What the guest_memfd interleave probe found, or why it did not run.
    pub guest_memfd_interleave_note: String,
}

/// Pages of the guest_memfd interleave probe file.
const INTERLEAVE_PROBE_PAGES: u64 = 16;

/// Runs every probe. `usable` are the nodes the agent may allocate on, in order: the first is
/// used by the single-node probes, the first two by the guest_memfd interleave probe.
pub fn probe(usable: &[u32]) -> Features {
    let node = usable.first().copied().unwrap_or(0);
    let bind = Policy::new(
        PolicyMode::Bind,
        NodeSet::from_ids([node]).unwrap_or_default(),
    );
    let mut features = Features {
        kernel_release: super::kernel_release(),
        pidfd_getfd: super::pidfd::have_cap_sys_ptrace(),
        ..Default::default()
    };
    let page = super::page_size();
    if let Ok(fd) = create_memfd("probe", 2 * page, None) {
        features.memfd_shared_policy = shared_policy(&fd, 2 * page, &bind);
    }
    features.preferred_many = mode_accepted(PolicyMode::PreferredMany, &bind.nodes);
    features.weighted_interleave = mode_accepted(PolicyMode::WeightedInterleave, &bind.nodes);
    match GuestMemfdVm::create() {
        Ok(vm) => {
            features.kvm_usable = true;
            features.guest_memfd_supported = vm.guest_memfd_supported();
            features.guest_memfd_flags = vm.guest_memfd_flags();
            let flags =
                features.guest_memfd_flags & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
            if features.guest_memfd_supported
                && flags & GUEST_MEMFD_FLAG_MMAP != 0
                && let Ok(fd) = vm.create_guest_memfd(2 * page, flags)
            {
                features.guest_memfd_shared_policy = shared_policy(&fd, 2 * page, &bind);
            }
            let (exact, note) = if !features.guest_memfd_shared_policy {
                (
                    None,
                    "not probed: guest_memfd keeps no shared policy on this kernel".to_string(),
                )
            } else {
                guest_memfd_interleave(&vm, flags, usable)
            };
            features.guest_memfd_interleave_exact = exact;
            features.guest_memfd_interleave_note = note;
        }
        Err(e) => {
            features.kvm_error = format!("/dev/kvm: {}", e.desc());
            features.guest_memfd_interleave_note = "not probed: KVM is not usable".to_string();
        }
    }
    let huge = 2 << 20;
    if let Ok(fd) = create_memfd("probe-huge", huge, Some(huge)) {
        features.hugetlb_shared_policy = shared_policy(&fd, huge, &bind);
    }
    features
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

/// Interleaves a small guest_memfd over the first two `usable` nodes through one mapping, faults
/// it through another (so allocation follows the file's shared policy, as a guest's faults do)
/// and judges where its pages landed with [`interleave_exact`].
fn guest_memfd_interleave(vm: &GuestMemfdVm, flags: u64, usable: &[u32]) -> (Option<bool>, String) {
    let Some(set) = usable.get(..2) else {
        return (
            None,
            format!(
                "not probed: needs two NUMA nodes the agent may use, has {}",
                usable.len()
            ),
        );
    };
    let not_probed =
        |what: &str, e: nix::errno::Errno| (None, format!("not probed: {what}: {}", e.desc()));
    let page = super::page_size();
    let len = INTERLEAVE_PROBE_PAGES * page;
    let fd = match vm.create_guest_memfd(len, flags) {
        Ok(fd) => fd,
        Err(e) => return not_probed("KVM_CREATE_GUEST_MEMFD", e),
    };
    let (a, b) = match (Mapping::new(fd.as_fd(), len), Mapping::new(fd.as_fd(), len)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return not_probed("mmap", e),
    };
    let Ok(nodes) = NodeSet::from_ids(set.iter().copied()) else {
        return (None, format!("not probed: bad nodes {set:?}"));
    };
    if let Err(e) = a.mbind(0, len, &Policy::new(PolicyMode::Interleave, nodes), 0) {
        return not_probed("mbind INTERLEAVE", e);
    }
    if let Err(e) = b.populate_write(0, len) {
        return not_probed("faulting the probe pages", e);
    }
    let observed = match b.page_nodes(0, len, page) {
        Ok(o) => o,
        Err(e) => return not_probed("move_pages", e),
    };
    match interleave_exact(&observed, set) {
        Ok(true) => (
            Some(true),
            format!(
                "{INTERLEAVE_PROBE_PAGES} guest_memfd pages interleaved over nodes {},{} alternate by page offset",
                set[0], set[1]
            ),
        ),
        Ok(false) => (
            Some(false),
            format!(
                "{INTERLEAVE_PROBE_PAGES} guest_memfd pages interleaved over nodes {},{} landed on nodes {observed:?}, \
                 not alternating by page offset (kernels 6.19 to 7.1 take the interleave index from the inode)",
                set[0], set[1]
            ),
        ),
        Err(why) => (None, format!("not probed: {why}")),
    }
}

/// Judges where the pages of a file interleaved over `nodes` landed: `observed[i]` is page i's
/// node (negative: not present, as move_pages reports). Exact means every page is on a node of
/// the set, and each page is on the set's next node after the previous page's (cyclically, from
/// whichever node the first page got), so the pages alternate by offset. A page outside the set
/// or out of turn gives false; a page not present or too few pages make the count unusable.
pub fn interleave_exact(observed: &[i32], nodes: &[u32]) -> Result<bool, String> {
    if nodes.len() < 2 {
        return Err(format!(
            "interleave over {} node(s) proves nothing",
            nodes.len()
        ));
    }
    if observed.len() < 2 * nodes.len() {
        return Err(format!(
            "{} pages are too few to judge interleave over {} nodes",
            observed.len(),
            nodes.len()
        ));
    }
    let mut turn = Vec::with_capacity(observed.len());
    for (i, &n) in observed.iter().enumerate() {
        if n < 0 {
            return Err(format!("probe page {i} is not present (status {n})"));
        }
        match nodes.iter().position(|&x| i64::from(x) == i64::from(n)) {
            Some(p) => turn.push(p),
            None => return Ok(false),
        }
    }
    Ok(turn.windows(2).all(|w| w[1] == (w[0] + 1) % nodes.len()))
}

#[cfg(test)]
mod tests {
    use super::interleave_exact;

    #[test]
    fn alternation_by_offset_is_exact_from_either_node() {
        assert_eq!(
            interleave_exact(&[0, 1, 0, 1, 0, 1, 0, 1], &[0, 1]),
            Ok(true)
        );
        assert_eq!(interleave_exact(&[1, 0, 1, 0, 1, 0], &[0, 1]), Ok(true));
        assert_eq!(interleave_exact(&[3, 1, 3, 1], &[1, 3]), Ok(true));
        assert_eq!(interleave_exact(&[2, 0, 1, 2, 0, 1], &[0, 1, 2]), Ok(true));
    }

    #[test]
    fn pages_out_of_turn_are_not_exact() {
        // 6.19 to 7.1: the index comes from the inode, so consecutive pages share a node.
        assert_eq!(interleave_exact(&[1, 1, 1, 1, 1, 1], &[0, 1]), Ok(false));
        assert_eq!(
            interleave_exact(&[0, 0, 1, 1, 0, 0, 1, 1], &[0, 1]),
            Ok(false)
        );
        // Even counts are not enough: the order must follow the offset.
        assert_eq!(
            interleave_exact(&[0, 1, 1, 0, 0, 1, 1, 0], &[0, 1]),
            Ok(false)
        );
        // Reverse order over three nodes.
        assert_eq!(interleave_exact(&[0, 2, 1, 0, 2, 1], &[0, 1, 2]), Ok(false));
        // A page on a node outside the set.
        assert_eq!(interleave_exact(&[0, 1, 2, 1], &[0, 1]), Ok(false));
        // One page out of turn at the end.
        assert_eq!(
            interleave_exact(&[0, 1, 0, 1, 0, 1, 0, 0], &[0, 1]),
            Ok(false)
        );
    }

    #[test]
    fn an_unusable_count_is_an_error_not_an_answer() {
        assert!(interleave_exact(&[0, 1, 0, -2, 0, 1], &[0, 1]).is_err());
        assert!(interleave_exact(&[0, 1, -14, 1], &[0, 1]).is_err());
        assert!(interleave_exact(&[0, 1, 0], &[0, 1]).is_err());
        assert!(interleave_exact(&[0, 0, 0, 0], &[0]).is_err());
        assert!(interleave_exact(&[], &[0, 1]).is_err());
    }
}
