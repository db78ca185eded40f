//! The vocabulary of memplace: node sets, policies, ranges and regions. Pure data and validation,
//! no I/O, so every rule here is unit-tested without a kernel. Node sets and policies live in
//! `memplace-sys` (the kernel calls take them) and are re-exported here.

use std::fmt;

pub use memplace_sys::policy::{MAX_NODES, NodeSet, Policy, PolicyError, PolicyMode};

/// Validation failures of caller input. Each message tells the caller what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[allow(missing_docs)] // Variant fields are described by the variant's message.
pub enum DomainError {
    /// A node set or policy the kernel would refuse, or nodes the agent cannot use.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A name or id outside `[A-Za-z0-9._-]{1,63}`.
    #[error("{what} {value:?} is invalid: use 1 to 63 characters of A-Z a-z 0-9 . _ -")]
    BadName { what: &'static str, value: String },
    /// Mode unset or unknown.
    #[error("policy mode is unspecified or unknown")]
    BadMode,
    /// Unaligned offset or length.
    #[error("{what} {value} is not a multiple of the page size {page}")]
    Unaligned {
        what: &'static str,
        value: u64,
        page: u64,
    },
    /// A range past the end.
    #[error("range offset {offset} length {length} is outside the region of {size} bytes")]
    OutOfBounds { offset: u64, length: u64, size: u64 },
    /// Region size 0 or too large.
    #[error("size_bytes {size} is invalid: it must be above 0 and at most {max}")]
    BadSize { size: u64, max: u64 },
}

/// What kind of file holds a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// KVM guest_memfd.
    GuestMemfd,
    /// memfd (shmem).
    Memfd,
    /// memfd on hugetlbfs.
    MemfdHugetlb,
}

impl Backend {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GuestMemfd => "guest_memfd",
            Self::Memfd => "memfd",
            Self::MemfdHugetlb => "memfd_hugetlb",
        }
    }

    /// Parses [`Backend::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::GuestMemfd, Self::Memfd, Self::MemfdHugetlb]
            .into_iter()
            .find(|b| b.as_str() == s)
    }
}

/// How pages are made to follow a range's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// mbind through the agent's mapping sets the file's shared policy.
    SharedPolicy,
    /// The agent allocates pages from a thread whose task policy is the range's policy.
    TaskPolicy,
}

impl Strategy {
    /// The database and report spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SharedPolicy => "shared-policy",
            Self::TaskPolicy => "task-policy",
        }
    }

    /// Parses [`Strategy::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::SharedPolicy, Self::TaskPolicy]
            .into_iter()
            .find(|b| b.as_str() == s)
    }
}

/// Checks a `vm_id` or region name.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), DomainError> {
    let ok = (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DomainError::BadName {
            what,
            value: value.chars().take(80).collect(),
        })
    }
}

/// One effective range with its intended policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeIntent {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes, never 0.
    pub length: u64,
    /// The policy.
    pub policy: Policy,
    /// For task-policy regions: whether memplace has allocated every page of this range under the
    /// policy. Reset by any policy change over the range.
    pub placed: bool,
}

impl RangeIntent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Resolves `offset`/`length` (0 = to the end) against a region, checking alignment and bounds.
pub fn resolve_span(
    offset: u64,
    length: u64,
    size: u64,
    page: u64,
) -> Result<(u64, u64), DomainError> {
    if !offset.is_multiple_of(page) {
        return Err(DomainError::Unaligned {
            what: "offset",
            value: offset,
            page,
        });
    }
    if !length.is_multiple_of(page) {
        return Err(DomainError::Unaligned {
            what: "length",
            value: length,
            page,
        });
    }
    let resolved = if length == 0 {
        size.checked_sub(offset).filter(|l| *l > 0)
    } else {
        offset
            .checked_add(length)
            .filter(|end| *end <= size)
            .map(|_| length)
    };
    resolved
        .map(|l| (offset, l))
        .ok_or(DomainError::OutOfBounds {
            offset,
            length,
            size,
        })
}

/// The effective, non-overlapping, offset-ordered ranges of a region, covering all of it. Setting
/// a policy over part of a range splits it, as mbind does; adjacent equal ranges merge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeMap {
    ranges: Vec<RangeIntent>,
}

impl RangeMap {
    /// One DEFAULT range over `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            ranges: vec![RangeIntent {
                offset: 0,
                length: size,
                policy: Policy::DEFAULT,
                placed: false,
            }],
        }
    }

    /// Rebuilds a map from stored ranges, which must tile `[0, size)` exactly.
    pub fn from_ranges(size: u64, mut ranges: Vec<RangeIntent>) -> Option<Self> {
        ranges.sort_by_key(|r| r.offset);
        let mut at = 0;
        for r in &ranges {
            if r.offset != at || r.length == 0 {
                return None;
            }
            at = r.end();
        }
        (at == size).then_some(Self { ranges })
    }

    /// The ranges in offset order.
    pub fn ranges(&self) -> &[RangeIntent] {
        &self.ranges
    }

    /// The size covered.
    pub fn size(&self) -> u64 {
        self.ranges.last().map_or(0, |r| r.end())
    }

    /// Sets `policy` over `[offset, offset+length)`, which must lie inside the map. Returns
    /// whether anything changed.
    pub fn apply(&mut self, offset: u64, length: u64, policy: Policy) -> bool {
        let end = offset + length;
        let mut out = Vec::with_capacity(self.ranges.len() + 2);
        let mut changed = false;
        for r in &self.ranges {
            if r.end() <= offset || r.offset >= end {
                out.push(*r);
                continue;
            }
            if r.policy != policy {
                changed = true;
            }
            if r.offset < offset {
                out.push(RangeIntent {
                    length: offset - r.offset,
                    ..*r
                });
            }
            if r.end() > end {
                out.push(RangeIntent {
                    offset: end,
                    length: r.end() - end,
                    ..*r
                });
            }
        }
        let at = out.partition_point(|r| r.offset < offset);
        // A range that keeps its policy keeps its placed state; any change forgets it.
        let placed = !changed
            && self
                .ranges
                .iter()
                .filter(|r| r.offset < end && r.end() > offset)
                .all(|r| r.placed);
        out.insert(
            at,
            RangeIntent {
                offset,
                length,
                policy,
                placed,
            },
        );
        self.ranges = merge(out);
        changed
    }

    /// Marks every range fully inside `[offset, end)` as placed, splitting ranges at the bounds.
    pub fn mark_placed(&mut self, offset: u64, end: u64) {
        let mut out = Vec::with_capacity(self.ranges.len() + 2);
        for r in &self.ranges {
            let lo = r.offset.max(offset);
            let hi = r.end().min(end);
            // DEFAULT places nothing, so there is nothing to mark (and no reason to split).
            if lo >= hi || r.placed || r.policy == Policy::DEFAULT {
                out.push(*r);
                continue;
            }
            if r.offset < lo {
                out.push(RangeIntent {
                    length: lo - r.offset,
                    ..*r
                });
            }
            out.push(RangeIntent {
                offset: lo,
                length: hi - lo,
                placed: true,
                ..*r
            });
            if r.end() > hi {
                out.push(RangeIntent {
                    offset: hi,
                    length: r.end() - hi,
                    ..*r
                });
            }
        }
        self.ranges = merge(out);
    }

    /// The ranges that overlap `[offset, end)`, clipped to it.
    pub fn clipped(&self, offset: u64, end: u64) -> Vec<RangeIntent> {
        self.ranges
            .iter()
            .filter(|r| r.offset < end && r.end() > offset)
            .map(|r| {
                let lo = r.offset.max(offset);
                let hi = r.end().min(end);
                RangeIntent {
                    offset: lo,
                    length: hi - lo,
                    ..*r
                }
            })
            .collect()
    }
}

fn merge(ranges: Vec<RangeIntent>) -> Vec<RangeIntent> {
    let mut out: Vec<RangeIntent> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last)
                if last.end() == r.offset && last.policy == r.policy && last.placed == r.placed =>
            {
                last.length += r.length
            }
            _ => out.push(r),
        }
    }
    out
}

/// Identifies a region.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionKey {
    /// The VM.
    pub vm_id: String,
    /// The region within the VM.
    pub name: String,
}

impl fmt::Display for RegionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vm_id, self.name)
    }
}

/// Whether the agent holds a region's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionStatus {
    /// Held and mapped.
    Active,
    /// Gone after a restart with no holder; intent kept until deleted.
    Lost,
}

impl RegionStatus {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Lost => "lost",
        }
    }
}

/// Who holds a region's fd besides the agent, recorded at handoff so the agent can take the fd
/// back after its own restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The process id.
    pub pid: i32,
    /// Field 22 of /proc/PID/stat, so a reused pid is not mistaken for the holder.
    pub start_time: u64,
}

/// The durable intent of one region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionIntent {
    /// Identity.
    pub key: RegionKey,
    /// A unique id.
    pub uid: String,
    /// File kind.
    pub backend: Backend,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Huge page size, or 0.
    pub hugepage_size_bytes: u64,
    /// Bumped by each change of intent.
    pub generation: u64,
    /// Placement strategy, chosen at creation from probed capabilities.
    pub strategy: Strategy,
    /// Per-range policies.
    pub ranges: RangeMap,
    /// Creation time, Unix seconds.
    pub created_unix: i64,
    /// Held or lost.
    pub status: RegionStatus,
    /// The last process that acquired the fd.
    pub holder: Option<Holder>,
    /// (st_dev, st_ino) of the file, to find it in a holder after a restart.
    pub file_id: Option<(u64, u64)>,
    /// Whether the file was handed in by a VMM (adopt) rather than created by the agent.
    pub adopted: bool,
}

impl RegionIntent {
    /// The file's page size.
    pub fn page_size(&self, base_page: u64) -> u64 {
        if self.backend == Backend::MemfdHugetlb {
            self.hugepage_size_bytes
        } else {
            base_page
        }
    }
}

/// What happened, for the event log. The numbers are the API's `EventKind` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum EventKind {
    /// The agent started.
    AgentStarted = 1,
    /// A region was created.
    RegionCreated = 2,
    /// A region was deleted.
    RegionDeleted = 3,
    /// A policy was applied.
    PolicyApplied = 4,
    /// Drift found.
    DriftFound = 5,
    /// Re-applied after drift or a new mapping.
    Reapplied = 6,
    /// A holder went away.
    HolderLost = 7,
    /// A region's file could not be recovered.
    RegionLost = 8,
    /// A region was populated.
    Populated = 9,
    /// A VMM acquired a region's fd.
    Handoff = 10,
    /// A region's fd was taken back from its holder.
    FdRecovered = 11,
    /// A VMM handed in its own file.
    RegionAdopted = 12,
    /// A VMM attached its VM fd.
    VmAttached = 13,
    /// A policy was applied that will not place pages as asked.
    PolicyWarning = 14,
    /// A range's policy could not be applied or read back as intended.
    VerifyFailed = 15,
}

impl EventKind {
    /// The kind with API number `v`.
    pub fn from_i32(v: i32) -> Option<Self> {
        use EventKind::*;
        [
            AgentStarted,
            RegionCreated,
            RegionDeleted,
            PolicyApplied,
            DriftFound,
            Reapplied,
            HolderLost,
            RegionLost,
            Populated,
            Handoff,
            FdRecovered,
            RegionAdopted,
            VmAttached,
            PolicyWarning,
            VerifyFailed,
        ]
        .into_iter()
        .find(|k| *k as i32 == v)
    }
}

/// One entry of the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Sequence number, assigned by the store.
    pub sequence: u64,
    /// Unix milliseconds.
    pub time_unix_ms: i64,
    /// What happened.
    pub kind: EventKind,
    /// The VM, or empty.
    pub vm_id: String,
    /// The region, or empty.
    pub name: String,
    /// For a person.
    pub message: String,
    /// Who caused it.
    pub actor: String,
}

#[cfg(test)]
mod tests {
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
}
