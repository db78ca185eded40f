//! The mempolicy syscalls (mbind, set_mempolicy, get_mempolicy, move_pages) on `libc::syscall`.
//! libc lacks several of the constants, so they are defined here from the kernel uAPI.

use super::check;
use crate::policy::{MAX_NODES, NodeSet, Policy, PolicyMode};
use nix::errno::Errno;

/// MPOL_* mode values from include/uapi/linux/mempolicy.h.
pub const MPOL_DEFAULT: i32 = 0;
/// Preferred node.
pub const MPOL_PREFERRED: i32 = 1;
/// Bind.
pub const MPOL_BIND: i32 = 2;
/// Interleave.
pub const MPOL_INTERLEAVE: i32 = 3;
/// Local.
pub const MPOL_LOCAL: i32 = 4;
/// Preferred many (5.15+).
pub const MPOL_PREFERRED_MANY: i32 = 5;
/// Weighted interleave (6.9+).
pub const MPOL_WEIGHTED_INTERLEAVE: i32 = 6;
/// Node-set flags carried in the mode word.
pub const MPOL_F_STATIC_NODES: i32 = 1 << 15;
/// Relative node ids.
pub const MPOL_F_RELATIVE_NODES: i32 = 1 << 14;
const MPOL_MODE_FLAGS: i32 = MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES | (1 << 13);

/// mbind flags.
pub const MPOL_MF_STRICT: u32 = 1;
/// Move pages mapped only by this process.
pub const MPOL_MF_MOVE: u32 = 2;
/// Move pages whoever maps them (CAP_SYS_NICE).
pub const MPOL_MF_MOVE_ALL: u32 = 4;

const MPOL_F_ADDR: libc::c_ulong = 2;
/// The kernel decrements maxnode before use in mbind/set_mempolicy, so pass bits + 1.
const SET_MAXNODE: libc::c_ulong = MAX_NODES as libc::c_ulong + 1;
/// get_mempolicy copies BITS_TO_LONGS(maxnode) words, so pass exactly the bits we have room for.
const GET_MAXNODE: libc::c_ulong = MAX_NODES as libc::c_ulong;
const WORDS: usize = MAX_NODES as usize / 64;

/// The kernel's encoding of a policy: mode word (with flags) and node mask.
pub fn encode(policy: &Policy) -> (i32, [u64; WORDS + 1]) {
    let mut mode = match policy.mode {
        PolicyMode::Default => MPOL_DEFAULT,
        PolicyMode::Bind => MPOL_BIND,
        PolicyMode::Preferred => MPOL_PREFERRED,
        PolicyMode::Interleave => MPOL_INTERLEAVE,
        PolicyMode::PreferredMany => MPOL_PREFERRED_MANY,
        PolicyMode::WeightedInterleave => MPOL_WEIGHTED_INTERLEAVE,
        PolicyMode::Local => MPOL_LOCAL,
    };
    if policy.static_nodes {
        mode |= MPOL_F_STATIC_NODES;
    }
    if policy.relative_nodes {
        mode |= MPOL_F_RELATIVE_NODES;
    }
    // One spare word: the kernel may read BITS_TO_LONGS(maxnode) words.
    let mut mask = [0u64; WORDS + 1];
    mask[..WORDS].copy_from_slice(policy.nodes.words());
    (mode, mask)
}

/// Decodes what get_mempolicy returned. `None` for a mode this build does not know.
pub fn decode(mode_word: i32, mask: [u64; WORDS]) -> Option<Policy> {
    let mode = match mode_word & !MPOL_MODE_FLAGS {
        MPOL_DEFAULT => PolicyMode::Default,
        MPOL_BIND => PolicyMode::Bind,
        MPOL_PREFERRED => PolicyMode::Preferred,
        MPOL_INTERLEAVE => PolicyMode::Interleave,
        MPOL_LOCAL => PolicyMode::Local,
        MPOL_PREFERRED_MANY => PolicyMode::PreferredMany,
        MPOL_WEIGHTED_INTERLEAVE => PolicyMode::WeightedInterleave,
        _ => return None,
    };
    let nodes = if mode.takes_nodes() {
        NodeSet::from_words(mask)
    } else {
        NodeSet::new()
    };
    Some(Policy {
        mode,
        nodes,
        static_nodes: mode_word & MPOL_F_STATIC_NODES != 0,
        relative_nodes: mode_word & MPOL_F_RELATIVE_NODES != 0,
    })
}

/// Sets the calling thread's task policy. Allocations by this thread (fallocate, faults) follow
/// it where the file has no shared policy.
pub fn set_thread_policy(policy: &Policy) -> Result<(), Errno> {
    let (mode, mask) = encode(policy);
    let mask_ptr = if policy.mode.takes_nodes() {
        mask.as_ptr()
    } else {
        std::ptr::null()
    };
    // SAFETY: `mask` outlives the call and holds WORDS+1 words, at least the
    // BITS_TO_LONGS(SET_MAXNODE - 1) words the kernel reads; a null mask is allowed for modes
    // without nodes.
    check(unsafe { libc::syscall(libc::SYS_set_mempolicy, mode, mask_ptr, SET_MAXNODE) })?;
    Ok(())
}

/// mbind over `[addr, addr+len)`. Only [`super::Mapping`] calls this, with a range it owns.
///
/// # Safety
/// `[addr, addr+len)` must lie inside a live mapping the caller owns for the whole call. mbind on
/// an arbitrary range could rebind (and with `MPOL_MF_MOVE` migrate) memory that other code in
/// this process owns, such as the heap or a stack.
pub(super) unsafe fn mbind_raw(
    addr: usize,
    len: usize,
    policy: &Policy,
    flags: u32,
) -> Result<(), Errno> {
    let (mode, mask) = encode(policy);
    let mask_ptr = if policy.mode.takes_nodes() {
        mask.as_ptr()
    } else {
        std::ptr::null()
    };
    // SAFETY: by this fn's contract the range lies inside a live mapping the caller owns (mbind
    // changes only policy metadata and page placement, never contents); `mask` outlives the call
    // and is large enough.
    check(unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            mode,
            mask_ptr,
            SET_MAXNODE,
            flags,
        )
    })?;
    Ok(())
}

/// The policy in force at `addr` (a VMA's, or the file's shared policy), as raw mode word and mask.
pub(super) fn policy_at_raw(addr: usize) -> Result<(i32, [u64; WORDS]), Errno> {
    let mut mode: libc::c_int = 0;
    let mut mask = [0u64; WORDS];
    // SAFETY: `mode` and `mask` are valid for writes; GET_MAXNODE bits fit `mask` exactly; `addr`
    // is only used by the kernel to look up a VMA.
    check(unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            GET_MAXNODE,
            addr,
            MPOL_F_ADDR,
        )
    })?;
    Ok((mode, mask))
}

/// move_pages(0, ..., nodes = NULL): the node of each page mapped in this process, or a negative
/// errno (-ENOENT not mapped, -EFAULT no VMA).
pub(super) fn query_nodes_raw(addrs: &[usize], status: &mut [i32]) -> Result<(), Errno> {
    assert_eq!(addrs.len(), status.len());
    // SAFETY: `addrs` and `status` have the same length, passed as count; with a null node array
    // the kernel only reads `addrs` and writes `status`.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            addrs.len() as libc::c_ulong,
            addrs.as_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0,
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        for mode in PolicyMode::ALL {
            let nodes = if mode.takes_nodes() {
                NodeSet::from_ids([0, 3, 1023]).unwrap()
            } else {
                NodeSet::new()
            };
            let mut p = Policy::new(mode, nodes);
            p.static_nodes = mode.takes_nodes();
            let (m, mask) = encode(&p);
            let mut w = [0u64; WORDS];
            w.copy_from_slice(&mask[..WORDS]);
            assert_eq!(decode(m, w), Some(p));
        }
        assert_eq!(decode(42, [0; WORDS]), None);
    }
}
