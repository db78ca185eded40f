//! The domain's rules, unit-tested without a kernel.

use super::*;

fn nodes(ids: &[u32]) -> NodeSet {
    NodeSet::from_ids(ids.iter().copied()).unwrap()
}

fn bind(ids: &[u32]) -> Policy {
    Policy::new(PolicyMode::Bind, nodes(ids))
}

#[test]
fn node_list_round_trips() {
    let s = NodeSet::parse_list("0-3,5, 7-8").unwrap();
    assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 5, 7, 8]);
    assert_eq!(s.to_string(), "0-3,5,7-8");
    assert!(NodeSet::parse_list("").unwrap().is_empty());
    assert!(NodeSet::parse_list("3-1").is_err());
    assert!(NodeSet::parse_list("a").is_err());
    assert!(NodeSet::parse_list("1-").is_err());
    assert_eq!(
        NodeSet::parse_list("1023-1024"),
        Err(DomainError::NodeOutOfRange(1024))
    );
    assert!(NodeSet::parse_list("1023").unwrap().contains(1023));
}

#[test]
fn policy_validation_matches_kernel_rules() {
    assert!(Policy::DEFAULT.validate().is_ok());
    assert_eq!(
        Policy::new(PolicyMode::Default, nodes(&[0])).validate(),
        Err(DomainError::NodesNotAllowed(PolicyMode::Default))
    );
    assert_eq!(
        Policy::new(PolicyMode::Local, nodes(&[0])).validate(),
        Err(DomainError::NodesNotAllowed(PolicyMode::Local))
    );
    for m in [
        PolicyMode::Bind,
        PolicyMode::Interleave,
        PolicyMode::PreferredMany,
        PolicyMode::WeightedInterleave,
        PolicyMode::Preferred,
    ] {
        assert_eq!(
            Policy::new(m, NodeSet::new()).validate(),
            Err(DomainError::NodesRequired(m))
        );
        assert!(Policy::new(m, nodes(&[0])).validate().is_ok());
    }
    assert_eq!(
        Policy::new(PolicyMode::Preferred, nodes(&[0, 1])).validate(),
        Err(DomainError::PreferredOneNode)
    );
    let mut p = bind(&[0]);
    p.static_nodes = true;
    p.relative_nodes = true;
    assert_eq!(p.validate(), Err(DomainError::StaticAndRelative));
    let mut p = Policy::DEFAULT;
    p.static_nodes = true;
    assert_eq!(p.validate(), Err(DomainError::FlagsWithoutNodes));
}

#[test]
fn usable_nodes_are_checked_unless_relative() {
    let usable = nodes(&[0, 1]);
    assert!(bind(&[1]).check_usable(&usable).is_ok());
    assert!(matches!(
        bind(&[2]).check_usable(&usable),
        Err(DomainError::NodeNotUsable { node: 2, .. })
    ));
    let mut p = bind(&[5]);
    p.relative_nodes = true;
    assert!(p.check_usable(&usable).is_ok());
}

#[test]
fn names_are_checked() {
    assert!(validate_name("vm_id", "vm-1.a_B").is_ok());
    assert!(validate_name("vm_id", "").is_err());
    assert!(validate_name("vm_id", &"a".repeat(64)).is_err());
    assert!(validate_name("vm_id", &"a".repeat(63)).is_ok());
    assert!(validate_name("vm_id", "a/b").is_err());
    assert!(validate_name("vm_id", "é").is_err());
    assert!(validate_name("vm_id", "a b").is_err());
}

#[test]
fn spans_resolve_and_reject() {
    let p = 4096;
    assert_eq!(resolve_span(0, 0, 8 * p, p), Ok((0, 8 * p)));
    assert_eq!(resolve_span(p, 0, 8 * p, p), Ok((p, 7 * p)));
    assert_eq!(resolve_span(p, 2 * p, 8 * p, p), Ok((p, 2 * p)));
    assert!(resolve_span(1, p, 8 * p, p).is_err());
    assert!(resolve_span(0, 1, 8 * p, p).is_err());
    assert!(resolve_span(8 * p, 0, 8 * p, p).is_err());
    assert!(resolve_span(7 * p, 2 * p, 8 * p, p).is_err());
    assert!(resolve_span(u64::MAX - (p - 1), p, 8 * p, p).is_err());
}

#[test]
fn apply_splits_and_merges() {
    let p = 4096;
    let mut m = RangeMap::new(16 * p);
    assert!(m.apply(4 * p, 4 * p, bind(&[0])));
    let got: Vec<_> = m
        .ranges()
        .iter()
        .map(|r| (r.offset / p, r.length / p))
        .collect();
    assert_eq!(got, vec![(0, 4), (4, 4), (8, 8)]);
    // Overlapping the tail of the bound range and the next default range.
    assert!(m.apply(6 * p, 4 * p, bind(&[1])));
    let got: Vec<_> = m
        .ranges()
        .iter()
        .map(|r| (r.offset / p, r.length / p))
        .collect();
    assert_eq!(got, vec![(0, 4), (4, 2), (6, 4), (10, 6)]);
    // Setting the same policy again changes nothing.
    assert!(!m.apply(6 * p, 4 * p, bind(&[1])));
    // Restoring default everywhere merges back into one range.
    assert!(m.apply(0, 16 * p, Policy::DEFAULT));
    assert_eq!(m.ranges().len(), 1);
    assert_eq!(m.size(), 16 * p);
    // Adjacent equal ranges merge.
    m.apply(0, 4 * p, bind(&[0]));
    m.apply(4 * p, 4 * p, bind(&[0]));
    let got: Vec<_> = m
        .ranges()
        .iter()
        .map(|r| (r.offset / p, r.length / p))
        .collect();
    assert_eq!(got, vec![(0, 8), (8, 8)]);
}

#[test]
fn placed_survives_only_unchanged_policy() {
    let p = 4096;
    let mut m = RangeMap::new(8 * p);
    m.apply(0, 8 * p, bind(&[0]));
    m.mark_placed(0, 4 * p);
    assert_eq!(m.ranges().len(), 2);
    assert!(m.ranges()[0].placed && !m.ranges()[1].placed);
    m.apply(0, 2 * p, bind(&[0]));
    assert!(m.ranges()[0].placed);
    m.apply(0, 2 * p, bind(&[1]));
    assert!(!m.ranges()[0].placed);
    assert!(m.ranges()[1].placed);
    m.mark_placed(0, 8 * p);
    assert!(m.ranges().iter().all(|r| r.placed));
}

#[test]
fn from_ranges_checks_tiling() {
    let r = |o, l| RangeIntent {
        offset: o,
        length: l,
        policy: Policy::DEFAULT,
        placed: false,
    };
    assert!(RangeMap::from_ranges(10, vec![r(5, 5), r(0, 5)]).is_some());
    assert!(RangeMap::from_ranges(10, vec![r(0, 5)]).is_none());
    assert!(RangeMap::from_ranges(10, vec![r(0, 6), r(5, 5)]).is_none());
}

#[test]
fn clipped_cuts_at_bounds() {
    let p = 4096;
    let mut m = RangeMap::new(8 * p);
    m.apply(2 * p, 4 * p, bind(&[0]));
    let c = m.clipped(p, 3 * p);
    assert_eq!(c.len(), 2);
    assert_eq!((c[0].offset, c[0].length), (p, p));
    assert_eq!((c[1].offset, c[1].length), (2 * p, p));
}
