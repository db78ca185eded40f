//! The planner's contract: the same cases run against the fake kernel and against the real one
//! on this machine (memfd and guest_memfd files, mbind and get_mempolicy on node 0). A case
//! passes on the fake only if the fake behaves as the kernel does, so a planner test against the
//! fake says something about the agent.

use super::fake::FakeKernel;
use super::*;
use crate::domain::{NodeSet, PolicyMode, RangeMap, RegionKey};
use crate::kernel::{self, GuestMemfdVm, Mapping};
use std::os::fd::{AsFd, OwnedFd};

/// Makes files for the cases.
trait Harness {
    type File: RangeKernel;
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

/// A real file with the agent's kind of mapping.
struct RealFile {
    mapping: Mapping,
    fd: OwnedFd,
    _vm: Option<GuestMemfdVm>,
}

impl RangeKernel for RealFile {
    fn policy_at(&self, offset: u64) -> Option<Policy> {
        self.kernel().policy_at(offset)
    }
    fn bind(&self, offset: u64, length: u64, policy: &Policy) -> Result<(), Errno> {
        self.kernel().bind(offset, length, policy)
    }
    fn allocated_pages(&self, offset: u64, length: u64) -> Result<u64, Errno> {
        self.kernel().allocated_pages(offset, length)
    }
}

impl RealFile {
    fn kernel(&self) -> super::FileKernel<'_> {
        super::FileKernel {
            fd: self.fd.as_fd(),
            mapping: Some(&self.mapping),
            page: kernel::page_size(),
        }
    }
}

impl Harness for Real {
    type File = RealFile;
    fn file(&self, backend: Backend, pages: u64) -> RealFile {
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
        RealFile {
            mapping,
            fd,
            _vm: vm,
        }
    }
    fn allocate(&self, f: &RealFile, offset: u64, length: u64) {
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
        let actions = plan(&intent, &observed);
        let rebinds = actions
            .iter()
            .filter(|a| matches!(a, Action::Rebind { .. }))
            .count();
        assert_eq!(
            rebinds,
            intent.ranges.ranges().len(),
            "{}: every range",
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
                matches!(done, Done::Rebound(..) | Done::Drifted(..)),
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
fn drift_contract_on_the_fake_kernel() {
    drift_contract(&Fake);
}

#[test]
fn drift_contract_on_the_real_kernel() {
    drift_contract(&Real);
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
