//! Property tests (proptest) over request validation and the range-split logic every SetPolicy
//! goes through. CI runs the default number of cases (256 per property); for a long run:
//! `PROPTEST_CASES=200000 cargo test --release -p memplace-server --test fuzz_domain`.
//!
//! RangeMap is checked against a model that keeps one (policy, placed) per page: after any
//! sequence of apply/mark_placed the ranges tile [0, size), no two neighbours are equal, and every
//! page's policy is the last one applied over it.

use memplace_server::domain::{
    DomainError, MAX_NODES, NodeSet, Policy, PolicyMode, RangeMap, resolve_span,
};
use proptest::prelude::*;

const PAGE: u64 = 4096;

fn mode() -> impl Strategy<Value = PolicyMode> {
    proptest::sample::select(PolicyMode::ALL.to_vec())
}

fn node_set(max_id: u32) -> impl Strategy<Value = NodeSet> {
    proptest::collection::vec(0..max_id, 0..6)
        .prop_map(|ids| NodeSet::from_ids(ids).expect("ids below MAX_NODES"))
}

fn policy() -> impl Strategy<Value = Policy> {
    (mode(), node_set(8), any::<bool>(), any::<bool>()).prop_map(|(mode, nodes, s, r)| Policy {
        mode,
        nodes,
        static_nodes: s,
        relative_nodes: r,
    })
}

#[derive(Clone, Debug)]
enum Op {
    Apply {
        page: u64,
        pages: u64,
        policy: Policy,
    },
    MarkPlaced {
        lo: u64,
        hi: u64,
    },
}

fn op(size_pages: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..size_pages, 1..=size_pages, policy()).prop_map(move |(page, pages, policy)| {
            let pages = pages.min(size_pages - page);
            Op::Apply { page, pages, policy }
        }),
        1 => (0..=size_pages, 0..=size_pages).prop_map(|(a, b)| Op::MarkPlaced {
            lo: a.min(b),
            hi: a.max(b),
        }),
    ]
}

fn check_invariants(map: &RangeMap, size: u64, model: &[(Policy, bool)]) {
    let ranges = map.ranges();
    assert!(!ranges.is_empty());
    let mut at = 0;
    for r in ranges {
        assert_eq!(r.offset, at, "ranges must tile without gaps: {ranges:?}");
        assert!(r.length > 0, "empty range: {ranges:?}");
        at = r.end();
    }
    assert_eq!(at, size, "ranges must end at the size: {ranges:?}");
    for w in ranges.windows(2) {
        assert!(
            !(w[0].policy == w[1].policy && w[0].placed == w[1].placed),
            "adjacent equal ranges were not merged: {ranges:?}"
        );
    }
    for (page, want) in model.iter().enumerate() {
        let off = page as u64 * PAGE;
        let r = ranges
            .iter()
            .find(|r| r.offset <= off && off < r.end())
            .expect("tiled");
        assert_eq!((r.policy, r.placed), *want, "page {page}: {ranges:?}");
    }
    assert_eq!(
        RangeMap::from_ranges(size, ranges.to_vec()).as_ref(),
        Some(map)
    );
}

proptest! {
    #[test]
    fn range_map_matches_a_per_page_model(
        (size_pages, ops) in (1u64..48).prop_flat_map(|n| (Just(n), proptest::collection::vec(op(n), 0..40)))
    ) {
        let size = size_pages * PAGE;
        let mut map = RangeMap::new(size);
        let mut model = vec![(Policy::DEFAULT, false); size_pages as usize];
        check_invariants(&map, size, &model);
        for op in ops {
            match op {
                Op::Apply { page, pages, policy } => {
                    let span = page as usize..(page + pages) as usize;
                    let changed = model[span.clone()].iter().any(|(p, _)| *p != policy);
                    let placed = !changed && model[span.clone()].iter().all(|(_, pl)| *pl);
                    for m in &mut model[span] {
                        *m = (policy, placed);
                    }
                    prop_assert_eq!(map.apply(page * PAGE, pages * PAGE, policy), changed);
                }
                Op::MarkPlaced { lo, hi } => {
                    for m in &mut model[lo as usize..hi as usize] {
                        if m.0 != Policy::DEFAULT {
                            m.1 = true;
                        }
                    }
                    map.mark_placed(lo * PAGE, hi * PAGE);
                }
            }
            check_invariants(&map, size, &model);
        }
    }

    #[test]
    fn validate_accepts_exactly_what_the_kernel_would(p in policy()) {
        let ok = p.validate().is_ok();
        let expect = !(p.static_nodes && p.relative_nodes)
            && if p.mode.takes_nodes() {
                !p.nodes.is_empty() && (p.mode != PolicyMode::Preferred || p.nodes.len() == 1)
            } else {
                p.nodes.is_empty() && !p.static_nodes && !p.relative_nodes
            };
        prop_assert_eq!(ok, expect, "{:?}", p);
        // The message of a refusal names the problem, never empty.
        if let Err(e) = p.validate() {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn resolve_span_never_overflows(
        offset in prop_oneof![any::<u64>(), (0u64..64).prop_map(|p| p * PAGE), Just(u64::MAX - PAGE + 1)],
        length in prop_oneof![any::<u64>(), (0u64..64).prop_map(|p| p * PAGE), Just(u64::MAX - PAGE + 1)],
        size_pages in 1u64..64,
    ) {
        let size = size_pages * PAGE;
        match resolve_span(offset, length, size, PAGE) {
            Ok((o, l)) => {
                prop_assert_eq!(o, offset);
                prop_assert!(l > 0);
                prop_assert!(o % PAGE == 0 && l % PAGE == 0);
                prop_assert!(o.checked_add(l).is_some_and(|end| end <= size));
                if length != 0 {
                    prop_assert_eq!(l, length);
                }
            }
            Err(DomainError::Unaligned { .. }) => {
                prop_assert!(offset % PAGE != 0 || length % PAGE != 0);
            }
            Err(DomainError::OutOfBounds { .. }) => {
                let fits = if length == 0 {
                    offset < size
                } else {
                    offset.checked_add(length).is_some_and(|e| e <= size)
                };
                prop_assert!(!fits);
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }

    #[test]
    fn node_lists_round_trip(set in node_set(MAX_NODES)) {
        let text = set.to_string();
        prop_assert_eq!(NodeSet::parse_list(&text).unwrap(), set);
    }

    #[test]
    fn node_list_parsing_never_panics_and_bounds_ids(text in "[0-9, \\-]{0,24}|\\PC{0,16}|[0-9]{1,12}(-[0-9]{1,12})?") {
        if let Ok(set) = NodeSet::parse_list(&text) {
            prop_assert!(set.iter().all(|n| n < MAX_NODES));
            prop_assert_eq!(NodeSet::parse_list(&set.to_string()).unwrap(), set);
        }
    }

    #[test]
    fn node_ids_at_or_above_the_limit_are_refused(id in MAX_NODES..u32::MAX) {
        prop_assert!(NodeSet::from_ids([id]).is_err());
        prop_assert!(NodeSet::parse_list(&id.to_string()).is_err());
        let range = format!("0-{}", id);
        prop_assert!(NodeSet::parse_list(&range).is_err());
    }
}
