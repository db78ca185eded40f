//! The domain's rules, unit-tested without a kernel.

use super::*;

fn nodes(ids: &[u32]) -> NodeSet {
    NodeSet::from_ids(ids.iter().copied()).unwrap()
}

fn bind(ids: &[u32]) -> Policy {
    Policy::new(PolicyMode::Bind, nodes(ids))
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

#[test]
fn keys_and_vm_ids_are_only_built_checked() {
    let vm = VmId::parse("vm-1").unwrap();
    assert_eq!(vm.as_str(), "vm-1");
    assert!(VmId::parse("a b").is_err());
    assert!(VmId::parse("").is_err());
    let k = RegionKey::in_vm(&vm, "ram").unwrap();
    assert_eq!(k, RegionKey::parse("vm-1", "ram").unwrap());
    assert!(RegionKey::in_vm(&vm, "a/b").is_err());
    assert!(RegionKey::parse("", "ram").is_err());
    assert_eq!(
        format!("{k:?}"),
        r#"RegionKey { vm_id: "vm-1", name: "ram" }"#
    );
}
