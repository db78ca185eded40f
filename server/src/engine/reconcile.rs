//! Reconcile: read each shared-policy range back from the kernel at sample points, report drift,
//! and re-bind every drifted range and every range too large to read at every page (a range read
//! at every page that shows its intent is left alone). What to do is decided by `plan::plan`;
//! this file runs the plan on each region and turns its steps into events, counters and per-range
//! errors.

use super::agent::{Agent, event};
use super::error::AgentError;
use super::live::LiveRegion;
use super::plan::{self, Done, FileState, Skip};
use super::syscalls::RealFile;
use crate::domain::{Event, EventKind, RegionKey, VmId};
use std::os::fd::AsFd;

/// Totals of a reconcile pass. Every range of every region visited lands in exactly one of
/// `checked`, `task_policy`, `lost` and `unmapped`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Regions visited.
    pub regions: u32,
    /// Shared-policy ranges whose policy was read back from the kernel.
    pub checked: u32,
    /// Ranges applied again: every drifted range, and every range of more than
    /// `plan::DRIFT_SAMPLES` pages (read at a stride, so re-bound on each pass).
    pub reapplied: u32,
    /// Ranges found drifted.
    pub drifted: u32,
    /// Ranges that failed.
    pub failed: u32,
    /// Task-policy ranges: the file holds no policy to compare, so they were not checked (their
    /// placement is read back by GetPlacement and a verified Populate).
    pub task_policy: u32,
    /// Ranges of lost regions: no file, nothing to check.
    pub lost: u32,
    /// Ranges of regions the agent holds no mapping of (a guest_memfd without MMAP, or a file
    /// that could not be recreated), so no policy could be read.
    pub unmapped: u32,
}

/// Regions reconciled in one call on the blocking pool (their locks are held for the call: about
/// 19 µs of CPU a region of 16 one-page ranges, more for ranges of over `plan::DRIFT_SAMPLES`
/// pages, which are read at up to 514 samples and re-bound).
const REGIONS_PER_CALL: usize = 16;

impl Agent {
    /// Compares every range's intent with the kernel, reports what drifted, and re-applies
    /// every shared-policy range that drifted or is too large to read at every page (see
    /// [`plan::plan`]).
    pub async fn reconcile(
        &self,
        vm_id: Option<&VmId>,
        actor: &str,
    ) -> Result<ReconcileReport, AgentError> {
        let mut report = ReconcileReport::default();
        let slots = self.slots(vm_id.map(VmId::as_str));
        let mut next = 0;
        while next < slots.len() {
            // Up to REGIONS_PER_CALL regions go to one blocking call (a pass over 1,000 regions
            // was 1,000 hand-offs to the blocking pool and back). Only the first is waited for:
            // the rest join only if their lock is free now, so no lock is held while waiting.
            let mut lives = vec![slots[next].clone().write_owned().await];
            next += 1;
            while lives.len() < REGIONS_PER_CALL
                && let Some(slot) = slots.get(next)
                && let Ok(live) = slot.clone().try_write_owned()
            {
                lives.push(live);
                next += 1;
            }
            let (base_page, who) = (self.page_size(), actor.to_string());
            let done = Agent::blocking(move || {
                lives
                    .into_iter()
                    .map(|mut live| {
                        let mut r = ReconcileReport::default();
                        let mut drifts = Vec::new();
                        let events =
                            reconcile_region(&mut live, &mut r, &mut drifts, base_page, &who);
                        (events, r, live.intent.key.clone(), drifts)
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
            let mut events = Vec::new();
            for (e, r, key, drifts) in done {
                report.regions += 1;
                report.add(&r);
                self.counters.count_range_drifts(&key, &drifts);
                events.extend(e);
            }
            if !events.is_empty() {
                self.commit(vec![], events).await?;
            }
        }
        use std::sync::atomic::Ordering::Relaxed;
        self.counters
            .drifted
            .fetch_add(report.drifted as u64, Relaxed);
        self.counters
            .reapplied
            .fetch_add(report.reapplied as u64, Relaxed);
        Ok(report)
    }
}

impl ReconcileReport {
    fn add(&mut self, o: &ReconcileReport) {
        self.checked += o.checked;
        self.reapplied += o.reapplied;
        self.drifted += o.drifted;
        self.failed += o.failed;
        self.task_policy += o.task_policy;
        self.lost += o.lost;
        self.unmapped += o.unmapped;
    }
}

/// Reconciles one region: observe, plan, execute (see [`plan::plan`]), then record what happened
/// as events, counts (the offsets of drifted ranges into `drifts`), per-range errors and the
/// region's last check (what the pass read, which GetRegion answers from). Blocking.
///
/// A range of up to `plan::DRIFT_SAMPLES` pages costs a get_mempolicy per page and nothing more
/// when it reads its intent; a larger one is read at a stride (a foreign change that covers at
/// least one stride is always seen) and re-bound through a fresh window, undoing a change
/// smaller than the stride without a drift event.
fn reconcile_region(
    live: &mut LiveRegion,
    report: &mut ReconcileReport,
    drifts: &mut Vec<u64>,
    base_page: u64,
    actor: &str,
) -> Vec<Event> {
    let page = live.intent.page_size(base_page);
    let key = live.intent.key.clone();
    let kernel = live.file.as_ref().and_then(|f| {
        Some(RealFile {
            fd: f.fd.as_fd(),
            mapping: Some(f.mapping.as_ref()?),
            page,
        })
    });
    let file = match (&live.file, &kernel) {
        (None, _) => FileState::Missing,
        (Some(_), None) => FileState::Unmapped,
        (Some(_), Some(_)) => FileState::Mapped,
    };
    let at = super::live::now_unix_ms();
    let observed = plan::observe(kernel.as_ref(), &live.intent, file, page);
    let actions = plan::plan(&live.intent, &observed, page);
    let done = plan::execute(kernel.as_ref(), &actions, page);
    let failed: Vec<u64> = done
        .iter()
        .filter_map(|d| match d {
            Done::Failed(r, _) => Some(r.offset),
            _ => None,
        })
        .collect();
    // What GetRegion answers until the next check: what this pass read, before it re-bound.
    live.record_pass(&observed.drift, &failed, at);
    let mut events = Vec::new();
    for d in done {
        match d {
            Done::Skipped(why, n) => match why {
                Skip::Lost => report.lost += n,
                Skip::Unmapped => report.unmapped += n,
                Skip::TaskPolicy => report.task_policy += n,
            },
            Done::Drifted(r, d) => {
                report.drifted += 1;
                drifts.push(r.offset);
                events.push(event(
                    EventKind::DriftFound,
                    Some(&key),
                    format!(
                        "range [{:#x}, {:#x}) intended {} but the kernel reports {} at offset {:#x}",
                        r.offset,
                        r.end(),
                        r.policy,
                        d.found_text(),
                        d.offset
                    ),
                    actor,
                ));
            }
            Done::Kept(r) => {
                report.checked += 1;
                live.errors.remove(&r.offset);
            }
            Done::Rebound(r, verify) => {
                report.checked += 1;
                report.reapplied += 1;
                live.errors.remove(&r.offset);
                if verify == plan::Verify::Samples {
                    events.push(rebound_event(&key, &r, actor));
                }
            }
            Done::Failed(r, why) => {
                report.checked += 1;
                report.failed += 1;
                events.push(event(
                    EventKind::VerifyFailed,
                    Some(&key),
                    format!("range [{:#x}, {:#x}): {why}", r.offset, r.end()),
                    actor,
                ));
                live.errors.insert(r.offset, why);
            }
        }
    }
    events
}

fn rebound_event(key: &RegionKey, r: &crate::domain::RangeIntent, actor: &str) -> Event {
    event(
        EventKind::Reapplied,
        Some(key),
        format!(
            "range [{:#x}, {:#x}) re-bound to {}",
            r.offset,
            r.end(),
            r.policy
        ),
        actor,
    )
}

#[cfg(test)]
mod tests {
    use crate::domain::{Policy, RangeIntent};
    use crate::engine::plan::sample_offsets;

    /// Samples: every page of a small range once, a stride of 1/512 of a large one, and always
    /// the last page.
    #[test]
    fn sample_offsets_cover_the_range() {
        let page = 4096;
        let r = |offset, pages| RangeIntent {
            offset,
            length: pages * page,
            policy: Policy::DEFAULT,
            placed: false,
        };
        let small: Vec<u64> = sample_offsets(&r(8 * page, 4), page).collect();
        assert_eq!(small, [8, 9, 10, 11].map(|p| p * page));
        assert_eq!(sample_offsets(&r(0, 1), page).collect::<Vec<_>>(), [0]);
        let big: Vec<u64> = sample_offsets(&r(0, 16384), page).collect();
        assert_eq!(big.len(), 513);
        assert_eq!(big[1], 32 * page);
        assert_eq!(*big.last().unwrap(), 16383 * page);
        let odd: Vec<u64> = sample_offsets(&r(0, 1000), page).collect();
        assert_eq!(odd.len(), 501);
        assert!(odd.windows(2).all(|w| w[1] - w[0] <= 2 * page));
        assert_eq!(*odd.last().unwrap(), 999 * page);
    }
}
