//! Carrying a region's intent out to the kernel, through [`Syscalls`]: SetPolicy's span
//! ([`apply_span`], with or without migrate) and a whole region at create, recovery and attach
//! ([`apply_all`]). Written once against the trait, so the contract suite
//! (`syscalls/contract.rs`) runs these very functions on the fake kernel and the real one.

use super::live::LiveRegion;
use super::syscalls::{RealFile, Syscalls};
use crate::domain::{RegionIntent, Strategy};
use std::collections::HashMap;
use std::os::fd::AsFd;

/// Per-range apply errors, keyed by the offset of the range of the intent they belong to.
pub(crate) type ApplyErrors = HashMap<u64, String>;

/// The region's file as [`Syscalls`] when its intent is placed by shared policy, with the parts
/// of the live region the apply functions change.
fn split(
    live: &mut LiveRegion,
    base_page: u64,
) -> Option<(RealFile<'_>, &RegionIntent, &mut ApplyErrors)> {
    if live.intent.strategy != Strategy::SharedPolicy {
        return None;
    }
    let page = live.intent.page_size(base_page);
    let file = live.file.as_ref()?;
    let k = RealFile {
        fd: file.fd.as_fd(),
        mapping: file.mapping.as_ref(),
        page,
    };
    Some((k, &live.intent, &mut live.errors))
}

/// SetPolicy on a live region: [`apply_span`] over its file. Returns (pages moved, pages that
/// failed to move). Blocking.
pub(crate) fn apply_range(
    live: &mut LiveRegion,
    offset: u64,
    length: u64,
    migrate: bool,
    base_page: u64,
) -> (u64, u64) {
    match split(live, base_page) {
        Some((k, intent, errors)) => apply_span(&k, intent, errors, offset, length, migrate),
        None => (0, 0),
    }
}

/// Create, recovery and attach on a live region: [`bind_all`] over its file. Returns the number
/// of ranges bound. Blocking.
pub(crate) fn apply_all(live: &mut LiveRegion, base_page: u64) -> u32 {
    match split(live, base_page) {
        Some((k, intent, errors)) => bind_all(&k, intent, errors),
        None => 0,
    }
}

/// Binds the intent's ranges over `[offset, offset+length)` (clipped to the span), moving
/// allocated pages with `migrate`. Errors are recorded per range of the intent that contains the
/// piece, and a piece bound cleanly clears its range's error. Returns (pages moved, pages that
/// failed to move).
pub(crate) fn apply_span(
    k: &impl Syscalls,
    intent: &RegionIntent,
    errors: &mut ApplyErrors,
    offset: u64,
    length: u64,
    migrate: bool,
) -> (u64, u64) {
    let (mut moved, mut failed) = (0, 0);
    for r in intent.ranges.clipped(offset, offset + length) {
        let result = if migrate {
            k.bind_moving(r.offset, r.length, &r.policy).map(|m| {
                moved += m.moved;
                failed += m.failed;
            })
        } else {
            k.bind(r.offset, r.length, &r.policy)
        };
        let owner = intent
            .ranges
            .ranges()
            .iter()
            .find(|x| x.offset <= r.offset && r.end() <= x.end())
            .map_or(r.offset, |x| x.offset);
        match result {
            Ok(()) => {
                errors.remove(&owner);
            }
            Err(e) => {
                errors.insert(owner, format!("mbind: {}", e.desc()));
            }
        }
    }
    (moved, failed)
}

/// Binds every range of the intent, in order of offset ([`Syscalls::bind_each`]). Returns the
/// number bound; each failure is recorded at its range.
pub(crate) fn bind_all(k: &impl Syscalls, intent: &RegionIntent, errors: &mut ApplyErrors) -> u32 {
    let ranges: Vec<_> = intent
        .ranges
        .ranges()
        .iter()
        .map(|r| (r.offset, r.length, r.policy))
        .collect();
    let mut n = 0;
    for ((offset, _, _), bound) in ranges.iter().zip(k.bind_each(&ranges)) {
        match bound {
            Ok(()) => {
                errors.remove(offset);
                n += 1;
            }
            Err(e) => {
                errors.insert(*offset, format!("mbind: {}", e.desc()));
            }
        }
    }
    n
}
