//! What the agent holds of a region (file, mapping, intent, per-range errors) and the views the
//! API returns, read from the kernel.

use super::placement;
use super::plan::{Drift, find_drift_at_ends, policy_seen};
use super::syscalls::RealFile;
use crate::domain::{Policy, RangeIntent, RegionIntent, Strategy};
use crate::kernel::{GuestMemfdVm, Mapping};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use tokio::sync::RwLock;

/// The agent's open file of a region.
#[derive(Debug)]
pub(crate) struct RegionFile {
    /// What GetPlacement's counts keep mapped in `mapping` between calls
    /// (see [`super::placement::Census`]).
    pub(crate) census: std::sync::Mutex<super::placement::Census>,
    pub(crate) fd: OwnedFd,
    /// The agent's own shared mapping; None where the file cannot be mapped.
    pub(crate) mapping: Option<Mapping>,
    /// The VM a guest_memfd belongs to, when the agent has its fd.
    pub(crate) vm: Option<Arc<GuestMemfdVm>>,
}

/// One live region: durable intent plus the agent's handles, and per-range apply errors.
#[derive(Debug)]
pub(crate) struct LiveRegion {
    pub(crate) intent: RegionIntent,
    pub(crate) file: Option<RegionFile>,
    /// Last apply error by range offset; cleared on success.
    pub(crate) errors: HashMap<u64, String>,
    /// The last full check of the shared policy; `None` until one is made.
    pub(crate) checked: Option<LastCheck>,
}

/// A live region's lock. Owned guards (`read_owned`, `write_owned`) carry a region into
/// [`Agent::blocking`] and back.
pub(crate) type Slot = Arc<RwLock<LiveRegion>>;

/// Where a range stands against the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeState {
    /// The kernel reports the intent.
    Applied,
    /// Not in force yet.
    Pending,
    /// The last apply failed.
    Failed,
    /// The kernel reports something else.
    Drifted,
    /// A task-policy range Populate placed, whose pages' nodes the kernel could not show (no
    /// mapping, or the read failed).
    Unverified,
}

/// A range with what the kernel reports.
#[derive(Clone, Debug)]
pub struct RangeView {
    /// Intent.
    pub intent: RangeIntent,
    /// Observed from the kernel.
    pub observed: Option<Policy>,
    /// State.
    pub state: RangeState,
    /// Last error.
    pub last_error: String,
    /// What the kernel showed of a task-policy range's pages when this view was made.
    pub check: Option<placement::RangeCheck>,
}

/// A region with observed state, as the API returns it.
#[derive(Clone, Debug)]
pub struct RegionView {
    /// Durable intent.
    pub intent: RegionIntent,
    /// Ranges with observed policies.
    pub ranges: Vec<RangeView>,
    /// Page size of the file.
    pub page_size: u64,
    /// When the kernel was read for `ranges`' observed policies (Unix milliseconds): the last
    /// check's time where the view answers from it.
    pub observed_at_unix_ms: i64,
}

/// What the last full kernel check of a region's shared-policy ranges found: when, and the policy
/// the kernel showed over each range then (`None`: unreadable). Written by the reconcile pass
/// (what it read before re-binding), by CreateRegion's and SetPolicy's read-back, by a restart's
/// read-back (`recover.rs`), and by a GetRegion with `fresh`; GetRegion and ListRegions answer
/// from it.
#[derive(Clone, Debug, Default)]
pub(crate) struct LastCheck {
    /// When the kernel was read, Unix milliseconds.
    pub(crate) at_unix_ms: i64,
    /// Each range read, as its intent was then, with what the kernel showed over it.
    pub(crate) ranges: Vec<(RangeIntent, Option<Policy>)>,
}

impl LastCheck {
    /// What this check saw over `r`, if it read a range with exactly that span and intent.
    fn seen(&self, r: &RangeIntent) -> Option<Option<Policy>> {
        self.ranges
            .iter()
            .find(|(c, _)| c.offset == r.offset && c.length == r.length && c.policy == r.policy)
            .map(|(_, p)| *p)
    }
}

/// Unix milliseconds now.
pub(crate) fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How a view reads the shared policy of each range.
#[derive(Clone, Copy, Debug)]
enum Read {
    /// From the last check ([`LiveRegion::checked`]); a range it did not read is read now.
    LastCheck,
    /// From the kernel now, every range at its samples; a range inside `applied`, which this
    /// call just bound, at its first and last page.
    Now { applied: Option<(u64, u64)> },
}

impl LiveRegion {
    /// A view without reading the kernel: every range pending. Used for stored first answers.
    pub(crate) fn view_without_kernel(&self, base_page: u64) -> RegionView {
        let live = self;
        RegionView {
            ranges: live
                .intent
                .ranges
                .ranges()
                .iter()
                .map(|r| RangeView {
                    intent: *r,
                    observed: None,
                    state: RangeState::Pending,
                    last_error: String::new(),
                    check: None,
                })
                .collect(),
            page_size: live.intent.page_size(base_page),
            observed_at_unix_ms: 0,
            intent: live.intent.clone(),
        }
    }

    /// A view from the last check (see [`LastCheck`]): no kernel call for a shared-policy range
    /// the last check read. A range it did not read (none made yet, e.g. after a restart until
    /// the first pass) and every task-policy range are read now. Blocking unless
    /// [`Self::answers_from_check`].
    pub(crate) fn view(&self, base_page: u64) -> RegionView {
        self.view_with(base_page, Read::LastCheck).0
    }

    /// Whether [`Self::view`] needs no kernel call: a shared-policy region with a mapped file
    /// whose last check read every current range (or a region without a file).
    pub(crate) fn answers_from_check(&self) -> bool {
        let Some(file) = &self.file else {
            return true;
        };
        if self.intent.strategy != Strategy::SharedPolicy || file.mapping.is_none() {
            return false;
        }
        self.checked.as_ref().is_some_and(|c| {
            self.intent
                .ranges
                .ranges()
                .iter()
                .all(|r| c.seen(r).is_some())
        })
    }

    /// A view read from the kernel now (every range sampled), kept as the region's last check.
    /// Blocking.
    pub(crate) fn fresh_view(&mut self, base_page: u64) -> RegionView {
        self.fresh_view_after(base_page, None)
    }

    /// [`Self::fresh_view`] right after this call bound `applied` (start, end): a range inside it
    /// whose mbind just succeeded is read back at its first and last page only; every other range
    /// is sampled in full (drift elsewhere is still seen). Blocking.
    pub(crate) fn fresh_view_after(
        &mut self,
        base_page: u64,
        applied: Option<(u64, u64)>,
    ) -> RegionView {
        let (view, check) = self.view_with(base_page, Read::Now { applied });
        if check.is_some() {
            self.checked = check;
        }
        view
    }

    /// Records what a reconcile pass read before it re-bound: per range of the intent in order,
    /// the first differing sample (`drifts`, empty when nothing was read). Ranges in `failed`
    /// (their re-bind did not read back) are left out, so views read them again.
    pub(crate) fn record_pass(&mut self, drifts: &[Option<Drift>], failed: &[u64], at: i64) {
        if drifts.is_empty() {
            return;
        }
        let ranges = self
            .intent
            .ranges
            .ranges()
            .iter()
            .zip(drifts)
            .filter(|(r, _)| !failed.contains(&r.offset))
            .map(|(r, d)| (*r, d.map_or(Some(r.policy), |d| d.found)))
            .collect();
        self.checked = Some(LastCheck {
            at_unix_ms: at,
            ranges,
        });
    }

    /// The view, and (for `Read::Now` over a mapped shared-policy file) the check it made.
    fn view_with(&self, base_page: u64, read: Read) -> (RegionView, Option<LastCheck>) {
        let live = self;
        let mapping = live.file.as_ref().and_then(|f| f.mapping.as_ref());
        let page = live.intent.page_size(base_page);
        let shared = live.intent.strategy == Strategy::SharedPolicy;
        let now = now_unix_ms();
        let last = live
            .checked
            .as_ref()
            .filter(|_| matches!(read, Read::LastCheck));
        let mut from_last = false;
        let mut made = Vec::new();
        let ranges = live
            .intent
            .ranges
            .ranges()
            .iter()
            .map(|r| {
                let last_error = live.errors.get(&r.offset).cloned().unwrap_or_default();
                let observed =
                    live.file
                        .as_ref()
                        .zip(mapping)
                        .filter(|_| shared)
                        .and_then(|(f, m)| {
                            if let Some(seen) = last.and_then(|c| c.seen(r)) {
                                from_last = true;
                                return seen;
                            }
                            let k = RealFile {
                                fd: f.fd.as_fd(),
                                mapping: Some(m),
                                page,
                            };
                            let just_bound = last_error.is_empty()
                                && matches!(read, Read::Now { applied: Some((start, end)) }
                                if start <= r.offset && r.end() <= end);
                            let seen = if just_bound {
                                match find_drift_at_ends(&k, r, page) {
                                    None => Some(r.policy),
                                    Some(d) => d.found,
                                }
                            } else {
                                policy_seen(&k, r, page)
                            };
                            made.push((*r, seen));
                            seen
                        });
                range_view(live, r, observed, last_error, page)
            })
            .collect();
        let at = match last {
            Some(c) if from_last => c.at_unix_ms,
            _ => now,
        };
        let check = (matches!(read, Read::Now { .. }) && shared && mapping.is_some()).then_some(
            LastCheck {
                at_unix_ms: now,
                ranges: made,
            },
        );
        let view = RegionView {
            intent: live.intent.clone(),
            ranges,
            page_size: page,
            observed_at_unix_ms: at,
        };
        (view, check)
    }
}

/// One range's view from what was observed of its shared policy (task-policy ranges are read
/// here, from where their pages are). Blocking for a task-policy range.
fn range_view(
    live: &LiveRegion,
    r: &RangeIntent,
    observed: Option<Policy>,
    last_error: String,
    page: u64,
) -> RangeView {
    let shared = live.intent.strategy == Strategy::SharedPolicy;
    // A task-policy range's only effect is where its pages are: read it now.
    let check =
        live.file.as_ref().filter(|_| !shared).and_then(|f| {
            placement::check_range(f.fd.as_fd(), live.intent.size_bytes, r, page).ok()
        });
    let state = match live.intent.strategy {
        _ if live.file.is_none() => RangeState::Failed,
        Strategy::SharedPolicy => match observed {
            Some(p) if p == r.policy => RangeState::Applied,
            _ if !last_error.is_empty() => RangeState::Failed,
            Some(_) => RangeState::Drifted,
            None => RangeState::Pending,
        },
        Strategy::TaskPolicy if !last_error.is_empty() => RangeState::Failed,
        Strategy::TaskPolicy => task_state(r, check),
    };
    let last_error = if live.intent.status == crate::domain::RegionStatus::Released {
        "region released: the last process holding its file exited".to_string()
    } else if live.file.is_none() && last_error.is_empty() {
        "region lost: no process held its file while the agent was down".to_string()
    } else {
        last_error
    };
    RangeView {
        intent: *r,
        observed,
        state,
        last_error,
        check,
    }
}

/// The state of a task-policy range from what the kernel shows now (`check`, `None` when it
/// could not be read), never from the database alone: the stored `placed` says only that
/// Populate allocated the range under its policy once; pages punched since and faulted again by
/// someone else followed that someone's policy.
/// - Drifted: an allocated page sits on a node the policy does not allow.
/// - Pending: never placed, or not every page is allocated any more.
/// - Unverified: placed, but the kernel could not show where (some) pages are.
/// - Applied: placed, every page allocated, every sampled page on an allowed node (a DEFAULT
///   range asks for nothing, so it is always applied).
pub(crate) fn task_state(r: &RangeIntent, check: Option<placement::RangeCheck>) -> RangeState {
    if r.policy == Policy::DEFAULT {
        return RangeState::Applied;
    }
    match check {
        Some(c) if c.pages_sampled_misplaced > 0 => RangeState::Drifted,
        _ if !r.placed => RangeState::Pending,
        Some(c) if c.pages_allocated < c.pages_total => RangeState::Pending,
        Some(c) if c.pages_sampled_unknown == 0 => RangeState::Applied,
        _ => RangeState::Unverified,
    }
}

impl LiveRegion {
    /// The region's file as the planner sees it (`None` without a file). Its `allocated_pages`
    /// is an error when the kernel cannot tell: a caller that must refuse on allocated pages must
    /// not read that as "none".
    pub(crate) fn kernel(&self, page: u64) -> Option<RealFile<'_>> {
        self.file.as_ref().map(|f| RealFile {
            fd: f.fd.as_fd(),
            mapping: f.mapping.as_ref(),
            page,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Backend, PolicyMode, RangeMap, RegionKey, RegionStatus};
    use crate::engine::syscalls::Syscalls;
    use crate::kernel;
    use nix::errno::Errno;

    fn live_with(fd: OwnedFd, size: u64) -> LiveRegion {
        let key = RegionKey::parse("vm", "r").unwrap();
        LiveRegion {
            intent: RegionIntent {
                key,
                uid: super::super::new_uid(),
                backend: Backend::GuestMemfd,
                size_bytes: size,
                hugepage_size_bytes: 0,
                generation: 1,
                strategy: Strategy::TaskPolicy,
                ranges: RangeMap::new(size),
                created_unix: 0,
                status: RegionStatus::Active,
                holder: None,
                file_id: None,
                origin: crate::domain::Origin::Agent,
                guest_cell: None,
            },
            file: Some(RegionFile {
                census: Default::default(),
                fd,
                mapping: None,
                vm: None,
            }),
            errors: HashMap::new(),
            checked: None,
        }
    }

    /// When the kernel cannot say which pages are allocated, the count is an error, not 0 (0
    /// would let a guest_memfd migrate through, whose pages cannot move).
    #[test]
    fn resident_pages_fails_when_the_kernel_cannot_tell() {
        let resident_pages = |live: &LiveRegion, offset, length, page| {
            live.kernel(page)
                .ok_or(Errno::EBADF)?
                .allocated_pages(offset, length)
        };
        let page = kernel::page_size();
        // An O_PATH descriptor: cachestat refuses it (EBADF).
        let fd: OwnedFd = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open("/")
            .unwrap()
            .into();
        let live = live_with(fd, page);
        assert!(
            resident_pages(&live, 0, page, page).is_err(),
            "an unreadable allocation map must not count as no pages"
        );
        // A real file counts: nothing allocated, then one page.
        let fd = kernel::create_memfd("resident-test", 2 * page, None).unwrap();
        kernel::fallocate(fd.as_fd(), page, page, false).unwrap();
        let live = live_with(fd, 2 * page);
        assert_eq!(resident_pages(&live, 0, 2 * page, page), Ok(1));
    }

    use std::os::unix::fs::OpenOptionsExt;

    /// A task-policy range's state comes from the kernel's answer, not from `placed` alone.
    #[test]
    fn task_state_follows_the_kernel() {
        use placement::RangeCheck;
        let bind = Policy::new(
            PolicyMode::Bind,
            crate::domain::NodeSet::from_ids([1]).unwrap(),
        );
        let r = |placed| RangeIntent {
            offset: 0,
            length: 8 * 4096,
            policy: bind,
            placed,
        };
        let full = RangeCheck {
            pages_total: 8,
            pages_allocated: 8,
            pages_sampled: 8,
            ..Default::default()
        };
        assert_eq!(task_state(&r(true), Some(full)), RangeState::Applied);
        assert_eq!(task_state(&r(false), Some(full)), RangeState::Pending);
        assert_eq!(task_state(&r(true), None), RangeState::Unverified);
        let punched = RangeCheck {
            pages_allocated: 7,
            ..full
        };
        assert_eq!(task_state(&r(true), Some(punched)), RangeState::Pending);
        let elsewhere = RangeCheck {
            pages_sampled_misplaced: 1,
            ..full
        };
        assert_eq!(task_state(&r(true), Some(elsewhere)), RangeState::Drifted);
        assert_eq!(task_state(&r(false), Some(elsewhere)), RangeState::Drifted);
        let unknown = RangeCheck {
            pages_sampled_unknown: 1,
            ..full
        };
        assert_eq!(task_state(&r(true), Some(unknown)), RangeState::Unverified);
        let default = RangeIntent {
            policy: Policy::DEFAULT,
            ..r(false)
        };
        assert_eq!(task_state(&default, None), RangeState::Applied);
    }
}
