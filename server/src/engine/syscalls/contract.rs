//! The engine's contract with the kernel: the same cases run against the fake kernel and against
//! the real one on this machine (memfd and guest_memfd files, mbind and get_mempolicy on node 0),
//! through the engine's own code: the planner (Reconcile's drift and re-bind, migrate), SetPolicy's
//! span binds, recovery's and create's whole-region binds, attach's read-back of what a VMM set,
//! and populate's allocation under a task policy. A case passes on the fake only if the fake
//! behaves as the kernel does, so an engine test against the fake says something about the agent.

use super::fake::FakeKernel;
use super::*;
use crate::domain::{
    Backend, NodeSet, PolicyMode, RangeMap, RegionIntent, RegionKey, RegionStatus, Strategy,
};
use crate::engine::apply::{ApplyErrors, apply_span, bind_all};
use crate::engine::plan::*;
use crate::kernel::{self, GuestMemfdVm, Mapping};
use std::os::fd::{AsFd, OwnedFd};

/// Makes files for the cases.
trait Harness {
    type File: Syscalls;
    /// A new, empty file of `pages` pages: a memfd, or a guest_memfd that can be mapped.
    fn file(&self, backend: Backend, pages: u64) -> Self::File;
    /// Allocates `[offset, offset+length)` of the file.
    fn allocate(&self, f: &Self::File, offset: u64, length: u64);
}

struct Fake;

impl Harness for Fake {
    type File = FakeKernel;
    fn file(&self, _: Backend, pages: u64) -> FakeKernel {
        FakeKernel::new(pages, kernel::page_size())
    }
    fn allocate(&self, f: &FakeKernel, offset: u64, length: u64) {
        let page = kernel::page_size();
        for o in (offset..offset + length).step_by(page as usize) {
            f.allocated.borrow_mut().insert(o, true);
        }
    }
}

struct Real;

/// A real file with the agent's kind of mapping, seen through [`RealFile`].
struct TestFile {
    mapping: Mapping,
    fd: OwnedFd,
    _vm: Option<GuestMemfdVm>,
}

impl Syscalls for TestFile {
    fn policy_at(&self, offset: u64) -> Option<Policy> {
        self.kernel().policy_at(offset)
    }
    fn bind(&self, offset: u64, length: u64, policy: &Policy) -> Result<(), Errno> {
        self.kernel().bind(offset, length, policy)
    }
    fn bind_each(&self, ranges: &[(u64, u64, Policy)]) -> Vec<Result<(), Errno>> {
        self.kernel().bind_each(ranges)
    }
    fn bind_moving(&self, offset: u64, length: u64, policy: &Policy) -> Result<Moved, Errno> {
        self.kernel().bind_moving(offset, length, policy)
    }
    fn allocated_pages(&self, offset: u64, length: u64) -> Result<u64, Errno> {
        self.kernel().allocated_pages(offset, length)
    }
    fn set_task_policy(&self, policy: &Policy) -> Result<(), Errno> {
        self.kernel().set_task_policy(policy)
    }
    fn allocate(&self, offset: u64, length: u64) -> Result<(), Errno> {
        self.kernel().allocate(offset, length)
    }
}

impl TestFile {
    fn kernel(&self) -> RealFile<'_> {
        RealFile {
            fd: self.fd.as_fd(),
            mapping: Some(&self.mapping),
            page: kernel::page_size(),
        }
    }
}

impl Harness for Real {
    type File = TestFile;
    fn file(&self, backend: Backend, pages: u64) -> TestFile {
        let size = pages * kernel::page_size();
        let (fd, vm) = match backend {
            Backend::GuestMemfd => {
                let vm = GuestMemfdVm::create()
                    .expect("the contract tests need /dev/kvm: creating a KVM VM failed");
                let flags = kernel::files::GUEST_MEMFD_FLAG_MMAP
                    | kernel::files::GUEST_MEMFD_FLAG_INIT_SHARED;
                let fd = vm
                    .create_guest_memfd(size, flags)
                    .expect("the contract tests need guest_memfd with MMAP|INIT_SHARED");
                (fd, Some(vm))
            }
            _ => (
                kernel::create_memfd("contract", size, None).expect("memfd_create"),
                None,
            ),
        };
        let mapping = Mapping::new(fd.as_fd(), size).expect("mmap");
        TestFile {
            mapping,
            fd,
            _vm: vm,
        }
    }
    fn allocate(&self, f: &TestFile, offset: u64, length: u64) {
        kernel::fallocate(f.fd.as_fd(), offset, length, false).expect("fallocate");
    }
}

fn policy(mode: PolicyMode) -> Policy {
    let nodes = match mode {
        PolicyMode::Default | PolicyMode::Local => NodeSet::new(),
        _ => NodeSet::from_ids([0]).expect("node 0"),
    };
    Policy::new(mode, nodes)
}

/// A memfd region's intent of `pages` pages with these ranges (first page, pages, policy).
pub(crate) fn memfd_region(pages: u64, ranges: &[(u64, u64, Policy)]) -> RegionIntent {
    let page = kernel::page_size();
    let mut map = RangeMap::new(pages * page);
    for (o, l, p) in ranges {
        map.apply(o * page, l * page, *p);
    }
    RegionIntent {
        key: RegionKey::parse("vm", "contract").unwrap(),
        uid: String::new(),
        backend: Backend::Memfd,
        size_bytes: pages * page,
        hugepage_size_bytes: 0,
        generation: 1,
        strategy: Strategy::SharedPolicy,
        ranges: map,
        created_unix: 0,
        status: RegionStatus::Active,
        holder: None,
        file_id: None,
        origin: crate::domain::Origin::Agent,
        guest_cell: None,
    }
}

/// One reconcile case: a region's intent, what someone else did to the file first (foreign
/// binds, in pages), and the drift the planner must see per range (`None`, or the page and the
/// mode the kernel reports there).
struct DriftCase {
    name: &'static str,
    intent: &'static [(u64, u64, PolicyMode)],
    bind_intent_first: bool,
    foreign: &'static [(u64, u64, PolicyMode)],
    want: &'static [Option<(u64, PolicyMode)>],
}

const PAGES: u64 = 8;

const DRIFT_CASES: &[DriftCase] = &[
    DriftCase {
        name: "never bound: BIND reads DEFAULT at its first page",
        intent: &[(0, 4, PolicyMode::Bind)],
        bind_intent_first: false,
        foreign: &[],
        want: &[Some((0, PolicyMode::Default)), None],
    },
    DriftCase {
        name: "in sync: nothing drifted",
        intent: &[(0, 4, PolicyMode::Bind), (4, 4, PolicyMode::Preferred)],
        bind_intent_first: true,
        foreign: &[],
        want: &[None, None],
    },
    DriftCase {
        name: "a foreign PREFERRED on one page inside a BIND range",
        intent: &[(0, 4, PolicyMode::Bind)],
        bind_intent_first: true,
        foreign: &[(2, 1, PolicyMode::Preferred)],
        want: &[Some((2, PolicyMode::Preferred)), None],
    },
    DriftCase {
        name: "a foreign INTERLEAVE over the tail of a DEFAULT range",
        intent: &[(0, 4, PolicyMode::Bind)],
        bind_intent_first: true,
        foreign: &[(6, 2, PolicyMode::Interleave)],
        want: &[None, Some((6, PolicyMode::Interleave))],
    },
    DriftCase {
        name: "a foreign LOCAL over two ranges",
        intent: &[(0, 2, PolicyMode::Bind), (2, 2, PolicyMode::Interleave)],
        bind_intent_first: true,
        foreign: &[(1, 2, PolicyMode::Local)],
        want: &[
            Some((1, PolicyMode::Local)),
            Some((2, PolicyMode::Local)),
            None,
        ],
    },
];

/// Every drift case: observe, plan, execute, observe again.
fn drift_contract(h: &impl Harness) {
    let page = kernel::page_size();
    for case in DRIFT_CASES {
        let ranges: Vec<_> = case
            .intent
            .iter()
            .map(|(o, l, m)| (*o, *l, policy(*m)))
            .collect();
        let intent = memfd_region(PAGES, &ranges);
        let f = h.file(Backend::Memfd, PAGES);
        if case.bind_intent_first {
            for r in intent.ranges.ranges() {
                f.bind(r.offset, r.length, &r.policy).expect(case.name);
            }
        }
        for (o, l, m) in case.foreign {
            f.bind(o * page, l * page, &policy(*m)).expect(case.name);
        }
        let observed = observe(Some(&f), &intent, FileState::Mapped, page);
        let want: Vec<Option<Drift>> = case
            .want
            .iter()
            .map(|w| {
                w.map(|(p, m)| Drift {
                    offset: p * page,
                    found: Some(policy(m)),
                })
            })
            .collect();
        assert_eq!(observed.drift, want, "{}: observed", case.name);
        let actions = plan(&intent, &observed, page);
        // Every range here is read at every page: re-bound when it drifted, else kept.
        let rebinds = actions
            .iter()
            .filter(|a| matches!(a, Action::Rebind { .. }))
            .count();
        let kept = actions
            .iter()
            .filter(|a| matches!(a, Action::Keep { .. }))
            .count();
        assert_eq!(
            (rebinds, rebinds + kept),
            (want.iter().flatten().count(), intent.ranges.ranges().len()),
            "{}: re-bound, and every range",
            case.name
        );
        let reports = actions
            .iter()
            .filter(|a| matches!(a, Action::ReportDrift { .. }))
            .count();
        assert_eq!(
            reports,
            want.iter().flatten().count(),
            "{}: reports",
            case.name
        );
        for done in execute(Some(&f), &actions, page) {
            assert!(
                matches!(done, Done::Rebound(..) | Done::Drifted(..) | Done::Kept(..)),
                "{}: {done:?}",
                case.name
            );
        }
        let after = observe(Some(&f), &intent, FileState::Mapped, page);
        assert!(
            after.drift.iter().all(Option::is_none),
            "{}: after the plan ran: {:?}",
            case.name,
            after.drift
        );
    }
}

/// Migrate on guest_memfd: refused over allocated pages, allowed over a range with none; memfd
/// always migrates. Run on files of both backends.
fn migrate_contract(h: &impl Harness) {
    let page = kernel::page_size();
    for backend in [Backend::Memfd, Backend::GuestMemfd] {
        let f = h.file(backend, PAGES);
        assert_eq!(
            f.allocated_pages(0, PAGES * page),
            Ok(0),
            "{backend:?}: empty"
        );
        assert_eq!(plan_migrate(backend, &f, 0, PAGES * page), Migrate::Go);
        h.allocate(&f, page, 2 * page);
        assert_eq!(f.allocated_pages(0, PAGES * page), Ok(2), "{backend:?}");
        let want = match backend {
            Backend::GuestMemfd => Migrate::RefuseAllocated(2),
            _ => Migrate::Go,
        };
        assert_eq!(plan_migrate(backend, &f, 0, 4 * page), want, "{backend:?}");
        assert_eq!(
            plan_migrate(backend, &f, 4 * page, 4 * page),
            Migrate::Go,
            "{backend:?}: nothing allocated there"
        );
    }
}

#[test]
fn migrate_contract_on_the_fake_kernel() {
    migrate_contract(&Fake);
}

#[test]
#[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
fn migrate_contract_on_the_real_kernel() {
    migrate_contract(&Real);
}

/// The policy each page reads back, for comparing a whole file.
fn read_all(f: &impl Syscalls, pages: u64) -> Vec<Option<Policy>> {
    let page = kernel::page_size();
    (0..pages).map(|p| f.policy_at(p * page)).collect()
}

/// What each page should read: `ranges` (first page, pages, mode) over a `base` everywhere else.
fn expect(pages: u64, base: PolicyMode, ranges: &[(u64, u64, PolicyMode)]) -> Vec<Option<Policy>> {
    let mut want = vec![Some(policy(base)); pages as usize];
    for (o, l, m) in ranges {
        for p in *o..o + l {
            want[p as usize] = Some(policy(*m));
        }
    }
    want
}

fn intent_of(ranges: &[(u64, u64, PolicyMode)]) -> RegionIntent {
    let ranges: Vec<_> = ranges
        .iter()
        .map(|(o, l, m)| (*o, *l, policy(*m)))
        .collect();
    memfd_region(PAGES, &ranges)
}

/// SetPolicy's binds (`apply_span`): a span cut across three ranges binds exactly the clipped
/// pieces and leaves the file's policy outside the span as it was; with migrate, allocated pages
/// already on an allowed node stay (node 0 is the only node here), and the policy reads back.
fn setpolicy_contract(h: &impl Harness) {
    let page = kernel::page_size();
    let layout = [
        (0, 2, PolicyMode::Preferred),
        (2, 4, PolicyMode::Bind),
        (6, 2, PolicyMode::Default),
    ];
    let intent = intent_of(&layout);
    let f = h.file(Backend::Memfd, PAGES);
    f.bind(0, PAGES * page, &policy(PolicyMode::Interleave))
        .expect("the foreign bind");
    let mut errors = ApplyErrors::new();
    let moved = apply_span(&f, &intent, &mut errors, page, 6 * page, false);
    assert_eq!(moved, (0, 0), "without migrate nothing moves");
    assert!(errors.is_empty(), "{errors:?}");
    let mut want = expect(
        PAGES,
        PolicyMode::Interleave,
        &[(1, 1, PolicyMode::Preferred)],
    );
    want[2..6].fill(Some(policy(PolicyMode::Bind)));
    want[6] = Some(policy(PolicyMode::Default));
    assert_eq!(read_all(&f, PAGES), want, "only the span [1, 7) is bound");
    h.allocate(&f, page, 3 * page);
    let moved = apply_span(&f, &intent, &mut errors, 0, PAGES * page, true);
    assert_eq!(moved, (0, 0), "every allocated page is on node 0 already");
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        read_all(&f, PAGES),
        expect(PAGES, PolicyMode::Default, &layout)
    );
}

/// Recovery's and create's binds (`bind_all`): every range of the intent is bound in one call
/// over a file someone left under another policy, DEFAULT ranges between and after bound ones
/// included (the one-mapping path must not let a DEFAULT range clear its neighbours).
fn recovery_contract(h: &impl Harness) {
    let page = kernel::page_size();
    let layout = [
        (0, 1, PolicyMode::Bind),
        (1, 2, PolicyMode::Default),
        (3, 2, PolicyMode::Preferred),
        (5, 1, PolicyMode::Local),
        (6, 2, PolicyMode::Default),
    ];
    let intent = intent_of(&layout);
    let f = h.file(Backend::Memfd, PAGES);
    f.bind(0, PAGES * page, &policy(PolicyMode::Interleave))
        .expect("the foreign bind");
    let mut errors = ApplyErrors::new();
    assert_eq!(bind_all(&f, &intent, &mut errors), 5, "{errors:?}");
    assert_eq!(
        read_all(&f, PAGES),
        expect(PAGES, PolicyMode::Default, &layout)
    );
    // Binding again changes nothing.
    assert_eq!(bind_all(&f, &intent, &mut errors), 5);
    assert_eq!(
        read_all(&f, PAGES),
        expect(PAGES, PolicyMode::Default, &layout)
    );
}

/// Attach's read-back (`observed_ranges`): what a VMM bound becomes the intent to the page, and
/// binding that intent (as recovery would) leaves every page as the VMM set it.
fn attach_contract(h: &impl Harness) {
    let page = kernel::page_size();
    let f = h.file(Backend::Memfd, PAGES);
    let vmm = [(1, 3, PolicyMode::Bind), (5, 1, PolicyMode::Interleave)];
    for (o, l, m) in vmm {
        f.bind(o * page, l * page, &policy(m))
            .expect("the VMM's bind");
    }
    let seen = observed_ranges(&f, PAGES * page, page).expect("every page is readable");
    let got: Vec<_> = seen
        .iter()
        .map(|r| (r.offset / page, r.length / page, r.policy.mode))
        .collect();
    assert_eq!(
        got,
        [
            (0, 1, PolicyMode::Default),
            (1, 3, PolicyMode::Bind),
            (4, 1, PolicyMode::Default),
            (5, 1, PolicyMode::Interleave),
            (6, 2, PolicyMode::Default),
        ]
    );
    let before = read_all(&f, PAGES);
    let mut errors = ApplyErrors::new();
    assert_eq!(bind_all(&f, &intent_of(&got), &mut errors), 5, "{errors:?}");
    assert_eq!(read_all(&f, PAGES), before);
}

/// Populate's allocation under a task policy: the pages of the span are allocated, none outside
/// it, and allocating them again allocates nothing more. The task policy is the calling thread's,
/// so it is reset to DEFAULT before the case returns.
fn allocation_contract(h: &impl Harness) {
    let page = kernel::page_size();
    let f = h.file(Backend::Memfd, PAGES);
    f.set_task_policy(&policy(PolicyMode::Bind))
        .expect("set_mempolicy BIND on node 0");
    let allocated = f.allocate(2 * page, 3 * page);
    let again = f.allocate(2 * page, 3 * page);
    f.set_task_policy(&Policy::DEFAULT)
        .expect("set_mempolicy DEFAULT");
    assert_eq!((allocated, again), (Ok(()), Ok(())));
    assert_eq!(f.allocated_pages(0, PAGES * page), Ok(3));
    assert_eq!(f.allocated_pages(2 * page, 3 * page), Ok(3));
    assert_eq!(f.allocated_pages(5 * page, 3 * page), Ok(0));
}

/// Each contract case as two tests, one per kernel, so `cargo test -- --list` lists every case
/// on both: `contract::on_the_fake_kernel::NAME` and `contract::on_the_real_kernel::NAME`.
macro_rules! on_both_kernels {
    ($($name:ident => $case:ident),* $(,)?) => {
        mod on_the_fake_kernel {
            $(#[test]
            fn $name() {
                super::$case(&super::Fake);
            })*
        }
        mod on_the_real_kernel {
            $(#[test]
            fn $name() {
                super::$case(&super::Real);
            })*
        }
    };
}

on_both_kernels! {
    reconcile_reports_drift_and_rebinds => drift_contract,
    setpolicy_binds_exactly_its_span => setpolicy_contract,
    recovery_and_create_bind_every_range => recovery_contract,
    attach_reads_back_what_a_vmm_set => attach_contract,
    populate_allocates_under_a_task_policy => allocation_contract,
}
