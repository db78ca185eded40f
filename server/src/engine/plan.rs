//! What to do to a region, decided from its intent and what the kernel shows.
//!
//! The decisions are pure functions: [`plan`] (Reconcile: which ranges to report as drifted and
//! re-bind, which regions to skip), [`plan_recovery`] (a restart: take the file back, recreate
//! it, or mark the region lost) and [`plan_migrate`] (SetPolicy with migrate on guest_memfd).
//! What they decide from is read through [`Syscalls`], the engine's one kernel interface, so the
//! same cases run against the fake kernel (unit tests below) and the real one (the contract suite,
//! `engine/syscalls/contract.rs`), and [`execute`] carries a plan out through the same trait.
//! This module imports only the domain and `syscalls`: nothing in the engine imports back.

use super::syscalls::Syscalls;
use crate::domain::{Backend, Policy, RangeIntent, RegionIntent, RegionStatus, Strategy};
use nix::errno::Errno;

/// Sample points per range for drift detection, besides its first and last page.
pub const DRIFT_SAMPLES: u64 = 512;

/// The offsets at which a range's shared policy is read: its first page, every `stride` bytes
/// after it, and its last page. The stride is the range's length over [`DRIFT_SAMPLES`], rounded
/// up to whole pages, so a range of up to that many pages is read at every page and any foreign
/// sub-range at least one stride long contains a sample.
pub fn sample_offsets(r: &RangeIntent, page: u64) -> impl Iterator<Item = u64> {
    let pages = (r.length / page).max(1);
    let stride = pages.div_ceil(DRIFT_SAMPLES) * page;
    let last = r.end().saturating_sub(page).max(r.offset);
    (r.offset..r.end())
        .step_by(stride as usize)
        .chain((!(last - r.offset).is_multiple_of(stride)).then_some(last))
}

/// Whether [`sample_offsets`] reads every page of a range (a range of up to [`DRIFT_SAMPLES`]
/// pages): then its samples are the whole of what the kernel holds over it, and a range that
/// reads its intent at every sample has no foreign change anywhere.
pub fn samples_every_page(r: &RangeIntent, page: u64) -> bool {
    (r.length / page).max(1) <= DRIFT_SAMPLES
}

/// Where a range's policy was found not to be its intent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drift {
    /// The first sampled offset that differs.
    pub offset: u64,
    /// What the kernel reports there; `None` when it cannot be read.
    pub found: Option<Policy>,
}

impl Drift {
    /// What was found, for messages.
    pub fn found_text(&self) -> String {
        self.found
            .map_or("nothing readable".into(), |p| p.to_string())
    }
}

/// The first sample of a range whose policy, as the kernel reports it, is not the range's
/// intent; `None` when every sample matches.
pub fn find_drift(k: &impl Syscalls, r: &RangeIntent, page: u64) -> Option<Drift> {
    first_drift(k, r, sample_offsets(r, page))
}

/// [`find_drift`] at the range's first and last page only.
pub fn find_drift_at_ends(k: &impl Syscalls, r: &RangeIntent, page: u64) -> Option<Drift> {
    let last = r.end().saturating_sub(page).max(r.offset);
    first_drift(k, r, [r.offset, last].into_iter())
}

fn first_drift(
    k: &impl Syscalls,
    r: &RangeIntent,
    mut offsets: impl Iterator<Item = u64>,
) -> Option<Drift> {
    offsets.find_map(|offset| {
        let found = k.policy_at(offset);
        (found != Some(r.policy)).then_some(Drift { offset, found })
    })
}

/// The policy the kernel holds over a range as far as its samples tell: the intent when every
/// sample matches, else what the first differing sample reports (`None` when unreadable).
pub fn policy_seen(k: &impl Syscalls, r: &RangeIntent, page: u64) -> Option<Policy> {
    match find_drift(k, r, page) {
        None => Some(r.policy),
        Some(d) => d.found,
    }
}

/// Sample points when reading a whole file's policies at adoption (see [`observed_ranges`]).
pub const ADOPT_SAMPLES: u64 = 4096;

/// The ranges of a file as the kernel's shared policy shows them now, so a file brought in from a
/// VMM starts with the placement it already has as its intent (attach and adopt change nothing).
///
/// The file is read at its first page, every `stride` pages (its pages over [`ADOPT_SAMPLES`],
/// rounded up) and its last page; where two neighbouring samples differ, the boundary is found
/// by bisection, to the page. A file of up to [`ADOPT_SAMPLES`] pages is read at every page; in a
/// larger one a foreign run shorter than a stride between two samples that agree is not seen (as
/// with drift). `None` when some sample cannot be read.
pub fn observed_ranges(k: &impl Syscalls, size: u64, page: u64) -> Option<Vec<RangeIntent>> {
    let pages = (size / page).max(1);
    let stride = pages.div_ceil(ADOPT_SAMPLES);
    let at = |p: u64| k.policy_at(p * page);
    // (first page, policy) of each run, in order.
    let mut runs: Vec<(u64, Policy)> = vec![(0, at(0)?)];
    let mut prev = 0;
    let mut next = stride.min(pages - 1);
    while next > prev {
        let want = at(next)?;
        let (mut from, mut from_policy) = (prev, runs.last().map(|r| r.1)?);
        while from_policy != want {
            // Invariant: page `lo` reads `from_policy`, page `hi` does not.
            let (mut lo, mut hi) = (from, next);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if at(mid)? == from_policy {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            from = hi;
            from_policy = at(hi)?;
            runs.push((hi, from_policy));
        }
        prev = next;
        next = (next + stride).min(pages - 1);
    }
    let ends = runs.iter().skip(1).map(|r| r.0 * page).chain([size]);
    Some(
        runs.iter()
            .zip(ends)
            .map(|(&(first, policy), end)| RangeIntent {
                offset: first * page,
                length: end - first * page,
                policy,
                placed: false,
            })
            .collect(),
    )
}

/// What the agent holds of a region's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileState {
    /// No file (lost, or it could not be recreated).
    Missing,
    /// A file the agent cannot map (a guest_memfd without MMAP): no policy can be read.
    Unmapped,
    /// A file with the agent's mapping.
    Mapped,
}

/// What the kernel showed of a region, read before planning ([`observe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The agent's file.
    pub file: FileState,
    /// For a mapped shared-policy region, per range of the intent in order, the first sample
    /// that differs from it; empty otherwise.
    pub drift: Vec<Option<Drift>>,
}

/// Reads what [`plan`] decides from: the drift of every range, where the region has a mapped
/// file placed through the kernel's shared policy.
pub fn observe(
    k: Option<&impl Syscalls>,
    intent: &RegionIntent,
    file: FileState,
    page: u64,
) -> Observed {
    let drift = match k {
        Some(k)
            if file == FileState::Mapped
                && intent.status.has_file()
                && intent.strategy == Strategy::SharedPolicy =>
        {
            intent
                .ranges
                .ranges()
                .iter()
                .map(|r| find_drift(k, r, page))
                .collect()
        }
        _ => Vec::new(),
    };
    Observed { file, drift }
}

/// Why a region's ranges were not checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The region is lost: no file, nothing to check.
    Lost,
    /// The agent holds no mapping of the file, so no policy can be read.
    Unmapped,
    /// Placed by task policy: the file holds no policy to compare.
    TaskPolicy,
}

/// How a re-bound range is verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// At every sample: a drift was seen, and its repair must show.
    Samples,
    /// At the range's first and last page: a range too large to read at every page, whose
    /// samples read its intent; the bind replaced the whole span or failed.
    Ends,
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing in this region is checked; its `ranges` are counted under `why`.
    Skip {
        /// Why.
        why: Skip,
        /// How many ranges.
        ranges: u32,
    },
    /// Report that the range's policy is not its intent.
    ReportDrift {
        /// The range.
        range: RangeIntent,
        /// Where and what.
        drift: Drift,
    },
    /// Nothing to do: the range read its intent at every page ([`samples_every_page`]).
    Keep {
        /// The range.
        range: RangeIntent,
    },
    /// Re-bind the whole range to its intent, then verify it.
    Rebind {
        /// The range.
        range: RangeIntent,
        /// How to verify.
        verify: Verify,
    },
}

/// Reconcile's decision for one region.
///
/// A shmem file's shared policy is a tree of sub-ranges, and anyone who maps the file (a VMM
/// through /proc/PID/fd/N, QEMU's `host-nodes`) can mbind any page-aligned part of it. No
/// interface lists that tree: get_mempolicy reads one address. So drift is *detected* at sample
/// points ([`sample_offsets`]). A drifted range is re-bound over its whole span, which replaces
/// every sub-range of the tree in it. A range of up to [`DRIFT_SAMPLES`] pages is read at every
/// page, so when it reads its intent everywhere nothing in it changed and it is kept as it is (a
/// re-bind would change nothing). A larger range is read at a stride, so a change smaller than
/// the stride can fall between samples: such a range is re-bound on every pass regardless, and
/// the unseen change is undone without a drift report.
pub fn plan(intent: &RegionIntent, observed: &Observed, page: u64) -> Vec<Action> {
    let ranges = intent.ranges.ranges();
    let n = ranges.len() as u32;
    let skip = |why| vec![Action::Skip { why, ranges: n }];
    if intent.status == RegionStatus::Lost {
        return skip(Skip::Lost);
    }
    match observed.file {
        FileState::Missing => return skip(Skip::Unmapped),
        _ if intent.strategy != Strategy::SharedPolicy => return skip(Skip::TaskPolicy),
        FileState::Unmapped => return skip(Skip::Unmapped),
        FileState::Mapped => {}
    }
    let mut actions = Vec::new();
    for (i, range) in ranges.iter().enumerate() {
        let drift = observed.drift.get(i).copied().flatten();
        if let Some(drift) = drift {
            actions.push(Action::ReportDrift {
                range: *range,
                drift,
            });
        }
        actions.push(match drift {
            Some(_) => Action::Rebind {
                range: *range,
                verify: Verify::Samples,
            },
            None if samples_every_page(range, page) => Action::Keep { range: *range },
            None => Action::Rebind {
                range: *range,
                verify: Verify::Ends,
            },
        });
    }
    actions
}

/// Carries out one re-bind: bind the whole range, then read it back as `verify` says. `Ok` when
/// the kernel reports the intent afterwards, else why not.
pub fn rebind(
    k: &impl Syscalls,
    range: &RangeIntent,
    verify: Verify,
    page: u64,
) -> Result<(), String> {
    let bound = k.bind(range.offset, range.length, &range.policy);
    let after = match verify {
        Verify::Samples => find_drift(k, range, page),
        Verify::Ends => find_drift_at_ends(k, range, page),
    };
    match (bound, after) {
        (Ok(()), None) => Ok(()),
        (Err(e), _) => Err(format!("re-applying the policy failed: {}", e.desc())),
        (Ok(()), Some(d)) => Err(format!(
            "re-applied the policy, but the kernel reports {} at offset {:#x}",
            d.found_text(),
            d.offset
        )),
    }
}

/// What a plan did, step by step (the result of [`execute`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Done {
    /// Ranges skipped.
    Skipped(Skip, u32),
    /// A drift reported.
    Drifted(RangeIntent, Drift),
    /// A range that read its intent at every page, left as it is.
    Kept(RangeIntent),
    /// A range re-bound and verified (at every sample when a drift had been reported).
    Rebound(RangeIntent, Verify),
    /// A range whose re-bind failed or did not read back.
    Failed(RangeIntent, String),
}

/// Carries a plan out against a kernel.
pub fn execute(k: Option<&impl Syscalls>, actions: &[Action], page: u64) -> Vec<Done> {
    actions
        .iter()
        .map(|a| match (a, k) {
            (Action::Skip { why, ranges }, _) => Done::Skipped(*why, *ranges),
            (Action::ReportDrift { range, drift }, _) => Done::Drifted(*range, *drift),
            (Action::Keep { range }, _) => Done::Kept(*range),
            (Action::Rebind { range, verify }, Some(k)) => match rebind(k, range, *verify, page) {
                Ok(()) => Done::Rebound(*range, *verify),
                Err(why) => Done::Failed(*range, why),
            },
            (Action::Rebind { range, .. }, None) => {
                Done::Failed(*range, "the region has no file to bind".into())
            }
        })
        .collect()
}

/// What a restart does with a stored region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Lost or released before this restart: kept as it is until deleted.
    StillLost,
    /// Handed off without a recorded file identity: the file cannot be found in any process, and
    /// a VMM may still use it, so recreating it would give the region a second, empty file. Mark
    /// it lost.
    MarkLostNoIdentity,
    /// Handed off with its identity: take the file back from its holder (or any process that
    /// has it); if nobody has it, the memory is gone and the region is marked lost.
    TakeBack,
    /// Never handed off: no guest data can have been written; recreate the file, empty.
    Recreate,
}

/// [`Recovery`] for a stored region.
pub fn plan_recovery(intent: &RegionIntent) -> Recovery {
    match (intent.status, intent.holder, intent.file_id) {
        (RegionStatus::Lost | RegionStatus::Released, _, _) => Recovery::StillLost,
        (_, Some(_), Some(_)) => Recovery::TakeBack,
        (_, Some(_), None) => Recovery::MarkLostNoIdentity,
        (_, None, _) => Recovery::Recreate,
    }
}

/// Whether a SetPolicy with migrate may go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Migrate {
    /// Migrate (memfd pages move; a guest_memfd range with no allocated page has none to move).
    Go,
    /// guest_memfd pages cannot move between nodes, and this many are allocated.
    RefuseAllocated(u64),
    /// guest_memfd, and the kernel cannot tell which pages are allocated.
    RefuseUnknown(Errno),
}

/// [`Migrate`] for a range of a region of `backend`.
pub fn plan_migrate(backend: Backend, k: &impl Syscalls, offset: u64, length: u64) -> Migrate {
    if backend != Backend::GuestMemfd {
        return Migrate::Go;
    }
    match k.allocated_pages(offset, length) {
        Ok(0) => Migrate::Go,
        Ok(n) => Migrate::RefuseAllocated(n),
        Err(e) => Migrate::RefuseUnknown(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Holder, NodeSet, PolicyMode, RangeMap, RegionKey};
    use crate::engine::syscalls::fake::FakeKernel;

    const PAGE: u64 = 4096;

    fn region(pages: u64, strategy: Strategy, ranges: &[(u64, u64, Policy)]) -> RegionIntent {
        let mut map = RangeMap::new(pages * PAGE);
        for (o, l, p) in ranges {
            map.apply(o * PAGE, l * PAGE, *p);
        }
        RegionIntent {
            key: RegionKey::parse("vm", "r").unwrap(),
            uid: String::new(),
            backend: Backend::Memfd,
            size_bytes: pages * PAGE,
            hugepage_size_bytes: 0,
            generation: 1,
            strategy,
            ranges: map,
            created_unix: 0,
            status: RegionStatus::Active,
            holder: None,
            file_id: None,
            origin: crate::domain::Origin::Agent,
            guest_cell: None,
        }
    }

    fn bind0() -> Policy {
        Policy::new(PolicyMode::Bind, NodeSet::from_ids([0]).unwrap())
    }

    /// Regions that are lost, fileless, unmapped or task-placed are skipped whole, whatever the
    /// kernel would say.
    #[test]
    fn regions_without_a_readable_shared_policy_are_skipped() {
        let k = FakeKernel::new(4, PAGE);
        let shared = region(4, Strategy::SharedPolicy, &[(0, 2, bind0())]);
        let task = region(4, Strategy::TaskPolicy, &[(0, 2, bind0())]);
        let mut lost = shared.clone();
        lost.status = RegionStatus::Lost;
        let cases = [
            (&lost, FileState::Missing, Skip::Lost),
            (&lost, FileState::Mapped, Skip::Lost),
            (&shared, FileState::Missing, Skip::Unmapped),
            (&shared, FileState::Unmapped, Skip::Unmapped),
            (&task, FileState::Mapped, Skip::TaskPolicy),
            (&task, FileState::Unmapped, Skip::TaskPolicy),
        ];
        for (intent, file, why) in cases {
            let observed = observe(Some(&k), intent, file, PAGE);
            assert!(observed.drift.is_empty(), "{why:?}: nothing read");
            assert_eq!(
                plan(intent, &observed, PAGE),
                [Action::Skip { why, ranges: 2 }],
                "{why:?} {file:?}"
            );
        }
    }

    /// Drift found on the fake kernel is reported, re-bound and verified at every sample; a range
    /// that did not drift and was read at every page is kept as it is. After execution the fake
    /// kernel holds the intent everywhere.
    #[test]
    fn drift_is_reported_and_rebound_and_a_range_read_whole_is_kept() {
        let k = FakeKernel::new(8, PAGE);
        let intent = region(8, Strategy::SharedPolicy, &[(0, 4, bind0())]);
        // The first range (BIND) was never bound: the kernel shows DEFAULT there. The second
        // (DEFAULT) reads DEFAULT: no drift.
        let observed = observe(Some(&k), &intent, FileState::Mapped, PAGE);
        let r = intent.ranges.ranges();
        assert_eq!(
            observed.drift,
            [
                Some(Drift {
                    offset: 0,
                    found: Some(Policy::DEFAULT)
                }),
                None
            ]
        );
        let actions = plan(&intent, &observed, PAGE);
        assert_eq!(
            actions,
            [
                Action::ReportDrift {
                    range: r[0],
                    drift: observed.drift[0].unwrap()
                },
                Action::Rebind {
                    range: r[0],
                    verify: Verify::Samples
                },
                Action::Keep { range: r[1] },
            ]
        );
        let done = execute(Some(&k), &actions, PAGE);
        assert!(
            matches!(done[1], Done::Rebound(_, Verify::Samples)),
            "{done:?}"
        );
        assert_eq!(done[2], Done::Kept(r[1]));
        let again = observe(Some(&k), &intent, FileState::Mapped, PAGE);
        assert_eq!(again.drift, [None, None], "the repair reads back");
    }

    /// A range of more than DRIFT_SAMPLES pages is read at a stride, so a change between two
    /// samples is not seen: it is re-bound on every pass (verified at its ends), which undoes
    /// that change. One of exactly DRIFT_SAMPLES pages is read at every page: a one-page change
    /// anywhere in it is found.
    #[test]
    fn a_range_read_at_a_stride_is_rebound_even_when_its_samples_agree() {
        let pages = 2 * DRIFT_SAMPLES + 2;
        let k = FakeKernel::new(pages, PAGE);
        let whole = DRIFT_SAMPLES;
        let inter = Policy::new(PolicyMode::Interleave, NodeSet::from_ids([0]).unwrap());
        let intent = region(
            pages,
            Strategy::SharedPolicy,
            &[(0, whole, bind0()), (whole, pages - whole, inter)],
        );
        let r = intent.ranges.ranges();
        assert_eq!(r.len(), 2);
        for x in r {
            k.bind(x.offset, x.length, &x.policy).unwrap();
        }
        assert!(samples_every_page(&r[0], PAGE) && !samples_every_page(&r[1], PAGE));
        // Off the second range's grid (stride 2 pages from its start): not sampled.
        let unseen = (whole + 1) * PAGE;
        assert!(sample_offsets(&r[1], PAGE).all(|o| o != unseen));
        let pref = Policy::new(PolicyMode::Preferred, NodeSet::from_ids([0]).unwrap());
        k.bind(unseen, PAGE, &pref).unwrap();
        let observed = observe(Some(&k), &intent, FileState::Mapped, PAGE);
        assert_eq!(observed.drift, [None, None], "not seen");
        let actions = plan(&intent, &observed, PAGE);
        assert_eq!(
            actions,
            [
                Action::Keep { range: r[0] },
                Action::Rebind {
                    range: r[1],
                    verify: Verify::Ends
                },
            ]
        );
        execute(Some(&k), &actions, PAGE);
        assert_eq!(
            k.policy_at(unseen),
            Some(inter),
            "undone without being seen"
        );
        // A one-page change in the middle of the range read at every page is seen.
        k.bind((whole / 2 + 1) * PAGE, PAGE, &pref).unwrap();
        let observed = observe(Some(&k), &intent, FileState::Mapped, PAGE);
        assert_eq!(
            observed.drift,
            [
                Some(Drift {
                    offset: (whole / 2 + 1) * PAGE,
                    found: Some(pref)
                }),
                None
            ]
        );
        let done = execute(Some(&k), &plan(&intent, &observed, PAGE), PAGE);
        assert!(
            matches!(done[1], Done::Rebound(_, Verify::Samples)),
            "{done:?}"
        );
        assert_eq!(k.policy_at((whole / 2 + 1) * PAGE), Some(bind0()));
    }

    /// A failing bind, or a policy that does not read back, is a failure with its reason.
    #[test]
    fn failed_rebinds_say_why() {
        let intent = region(4, Strategy::SharedPolicy, &[(0, 4, bind0())]);
        let mut k = FakeKernel::new(4, PAGE);
        k.bind_error = Some(Errno::ENOMEM);
        let actions = plan(
            &intent,
            &observe(Some(&k), &intent, FileState::Mapped, PAGE),
            PAGE,
        );
        let done = execute(Some(&k), &actions, PAGE);
        assert!(
            matches!(&done[1], Done::Failed(_, why) if why.contains("re-applying the policy failed")),
            "{done:?}"
        );
        let k = FakeKernel::new(4, PAGE);
        k.unreadable.borrow_mut().push(3 * PAGE);
        let done = execute(Some(&k), &actions, PAGE);
        assert!(
            matches!(&done[1], Done::Failed(_, why) if why.contains("nothing readable at offset 0x3000")),
            "{done:?}"
        );
    }

    /// Recovery: what a restart does with each kind of stored region.
    #[test]
    fn recovery_takes_back_recreates_or_marks_lost() {
        let base = region(1, Strategy::SharedPolicy, &[]);
        let holder = Holder {
            pid: 1,
            start_time: 1,
        };
        let with = |status, holder, file_id| RegionIntent {
            status,
            holder,
            file_id,
            ..base.clone()
        };
        let active = RegionStatus::Active;
        for (intent, want) in [
            (
                with(RegionStatus::Lost, Some(holder), Some((1, 2))),
                Recovery::StillLost,
            ),
            (with(active, Some(holder), Some((1, 2))), Recovery::TakeBack),
            (
                with(active, Some(holder), None),
                Recovery::MarkLostNoIdentity,
            ),
            (with(active, None, Some((1, 2))), Recovery::Recreate),
            (with(active, None, None), Recovery::Recreate),
        ] {
            assert_eq!(plan_recovery(&intent), want, "{intent:?}");
        }
    }

    /// Migrate on guest_memfd is refused over allocated pages, or when the kernel cannot tell.
    #[test]
    fn guest_memfd_migrate_needs_no_allocated_page() {
        let k = FakeKernel::new(4, PAGE);
        assert_eq!(
            plan_migrate(Backend::GuestMemfd, &k, 0, 4 * PAGE),
            Migrate::Go
        );
        k.allocated.borrow_mut().insert(2 * PAGE, true);
        assert_eq!(
            plan_migrate(Backend::GuestMemfd, &k, 0, 4 * PAGE),
            Migrate::RefuseAllocated(1)
        );
        assert_eq!(
            plan_migrate(Backend::GuestMemfd, &k, 0, 2 * PAGE),
            Migrate::Go
        );
        assert_eq!(plan_migrate(Backend::Memfd, &k, 0, 4 * PAGE), Migrate::Go);
        let mut k = FakeKernel::new(4, PAGE);
        k.residency_error = Some(Errno::EBADF);
        assert_eq!(
            plan_migrate(Backend::GuestMemfd, &k, 0, 4 * PAGE),
            Migrate::RefuseUnknown(Errno::EBADF)
        );
    }

    /// A file brought in is read as the kernel shows it: runs found to the page (also in a file
    /// larger than the sample count, by bisection between samples), an unreadable page is None.
    #[test]
    fn observed_ranges_follow_the_kernel_to_the_page() {
        let pref = Policy::new(PolicyMode::Preferred, NodeSet::from_ids([0]).unwrap());
        let k = FakeKernel::new(8, PAGE);
        let got = observed_ranges(&k, 8 * PAGE, PAGE).unwrap();
        assert_eq!(got, RangeMap::new(8 * PAGE).ranges());
        k.bind(PAGE, 2 * PAGE, &bind0()).unwrap();
        k.bind(7 * PAGE, PAGE, &pref).unwrap();
        let got = observed_ranges(&k, 8 * PAGE, PAGE).unwrap();
        let want = region(8, Strategy::SharedPolicy, &[(1, 2, bind0()), (7, 1, pref)]);
        assert_eq!(got, want.ranges.ranges());
        // Larger than ADOPT_SAMPLES pages: boundaries between samples, several in one stride.
        let pages = ADOPT_SAMPLES * 3 + 5;
        let k = FakeKernel::new(pages, PAGE);
        k.bind(0, (pages - 1000) * PAGE, &bind0()).unwrap();
        k.bind(101 * PAGE, 1000 * PAGE, &pref).unwrap();
        k.bind(1101 * PAGE, 2 * PAGE, &Policy::DEFAULT).unwrap();
        let got = observed_ranges(&k, pages * PAGE, PAGE).unwrap();
        let want = region(
            pages,
            Strategy::SharedPolicy,
            &[
                (0, pages - 1000, bind0()),
                (101, 1000, pref),
                (1101, 2, Policy::DEFAULT),
            ],
        );
        assert_eq!(got, want.ranges.ranges());
        k.unreadable.borrow_mut().push(0);
        assert_eq!(observed_ranges(&k, pages * PAGE, PAGE), None);
    }
}
