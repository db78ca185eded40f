//! The vocabulary of memplace: node sets, policies, ranges and regions. Pure data and validation,
//! no I/O, so every rule here is unit-tested without a kernel.

use std::fmt;

/// Node ids are below this bound (the kernel's MAX_NUMNODES on x86_64 is 1024).
pub const MAX_NODES: u32 = 1024;
const WORDS: usize = (MAX_NODES as usize) / 64;

/// Validation failures of caller input. Each message tells the caller what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[allow(missing_docs)] // Variant fields are described by the variant's message.
pub enum DomainError {
    /// A name or id outside `[A-Za-z0-9._-]{1,63}`.
    #[error("{what} {value:?} is invalid: use 1 to 63 characters of A-Z a-z 0-9 . _ -")]
    BadName { what: &'static str, value: String },
    /// Node id out of range.
    #[error("node {0} is out of range: node ids are below {MAX_NODES}")]
    NodeOutOfRange(u32),
    /// A mode that takes no nodes was given some.
    #[error("policy mode {0} takes no nodes, but nodes were given")]
    NodesNotAllowed(PolicyMode),
    /// A mode that needs nodes was given none.
    #[error("policy mode {0} needs at least one node")]
    NodesRequired(PolicyMode),
    /// PREFERRED names more than one node.
    #[error("policy mode preferred takes exactly one node; use preferred-many for several")]
    PreferredOneNode,
    /// Both node-set flags.
    #[error("static_nodes and relative_nodes cannot be combined")]
    StaticAndRelative,
    /// A node-set flag on a mode without nodes.
    #[error("static_nodes and relative_nodes apply only to modes with nodes")]
    FlagsWithoutNodes,
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
    /// A node the agent cannot place memory on.
    #[error(
        "node {node} is not usable here: it must be online, have memory and be in the agent's Mems_allowed ({allowed})"
    )]
    NodeNotUsable { node: u32, allowed: String },
    /// Bad node list text.
    #[error("node list {0:?} is invalid: use the numactl form, e.g. 0-3,5")]
    BadNodeList(String),
}

/// A set of NUMA node ids, the kernel's `nodemask_t`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NodeSet {
    bits: [u64; WORDS],
}

impl NodeSet {
    /// The empty set.
    pub const fn new() -> Self {
        Self { bits: [0; WORDS] }
    }

    /// A set from node ids, rejecting ids of `MAX_NODES` or more.
    pub fn from_ids(ids: impl IntoIterator<Item = u32>) -> Result<Self, DomainError> {
        let mut s = Self::new();
        for id in ids {
            s.insert(id)?;
        }
        Ok(s)
    }

    /// Adds a node.
    pub fn insert(&mut self, id: u32) -> Result<(), DomainError> {
        if id >= MAX_NODES {
            return Err(DomainError::NodeOutOfRange(id));
        }
        self.bits[(id / 64) as usize] |= 1 << (id % 64);
        Ok(())
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: u32) -> bool {
        id < MAX_NODES && self.bits[(id / 64) as usize] & (1 << (id % 64)) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Node ids in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..MAX_NODES).filter(move |i| self.contains(*i))
    }

    /// The kernel's bitmap words, for mbind and set_mempolicy.
    pub fn words(&self) -> &[u64; WORDS] {
        &self.bits
    }

    /// Builds a set from the kernel's bitmap words.
    pub fn from_words(words: [u64; WORDS]) -> Self {
        Self { bits: words }
    }

    /// Whether every node of `self` is in `other`.
    pub fn is_subset(&self, other: &NodeSet) -> bool {
        self.bits
            .iter()
            .zip(other.bits.iter())
            .all(|(a, b)| a & !b == 0)
    }

    /// Parses the numactl list syntax: `0-3,5`. Empty text is the empty set.
    pub fn parse_list(text: &str) -> Result<Self, DomainError> {
        let bad = || DomainError::BadNodeList(text.to_string());
        let mut s = Self::new();
        let text = text.trim();
        if text.is_empty() {
            return Ok(s);
        }
        for part in text.split(',') {
            let part = part.trim();
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let lo: u32 = lo.parse().map_err(|_| bad())?;
            let hi: u32 = hi.parse().map_err(|_| bad())?;
            if lo > hi {
                return Err(bad());
            }
            if hi >= MAX_NODES {
                return Err(DomainError::NodeOutOfRange(hi));
            }
            for id in lo..=hi {
                s.insert(id)?;
            }
        }
        Ok(s)
    }
}

impl fmt::Display for NodeSet {
    /// The numactl list syntax, e.g. `0-3,5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u32> = self.iter().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            let start = ids[i];
            let mut end = start;
            while i + 1 < ids.len() && ids[i + 1] == end + 1 {
                i += 1;
                end = ids[i];
            }
            out.push(if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            });
            i += 1;
        }
        f.write_str(&out.join(","))
    }
}

impl fmt::Debug for NodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeSet({self})")
    }
}

/// The mempolicy modes memplace supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyMode {
    /// No policy: allocations follow the allocating task.
    Default,
    /// Only the given nodes.
    Bind,
    /// One preferred node.
    Preferred,
    /// Round-robin over the nodes.
    Interleave,
    /// Any of the preferred nodes.
    PreferredMany,
    /// Weighted round-robin.
    WeightedInterleave,
    /// The allocating CPU's node.
    Local,
}

impl PolicyMode {
    /// Every mode, for tests and listings.
    pub const ALL: [PolicyMode; 7] = [
        Self::Default,
        Self::Bind,
        Self::Preferred,
        Self::Interleave,
        Self::PreferredMany,
        Self::WeightedInterleave,
        Self::Local,
    ];

    /// Whether the mode takes a node set.
    pub fn takes_nodes(self) -> bool {
        !matches!(self, Self::Default | Self::Local)
    }

    /// Whether pages must be on the mode's nodes, so a page elsewhere is misplaced. PREFERRED and
    /// PREFERRED_MANY may fall back to other nodes by design.
    pub fn nodes_are_hard(self) -> bool {
        matches!(
            self,
            Self::Bind | Self::Interleave | Self::WeightedInterleave
        )
    }

    /// A short lower-case name, as the CLI and the database spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Bind => "bind",
            Self::Preferred => "preferred",
            Self::Interleave => "interleave",
            Self::PreferredMany => "preferred-many",
            Self::WeightedInterleave => "weighted-interleave",
            Self::Local => "local",
        }
    }

    /// Parses [`PolicyMode::as_str`] (also accepting `_` for `-`).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.to_ascii_lowercase().replace('_', "-");
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

impl fmt::Display for PolicyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A NUMA memory policy, as mbind(2) and set_mempolicy(2) take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    /// The mode.
    pub mode: PolicyMode,
    /// The node set; empty for DEFAULT and LOCAL.
    pub nodes: NodeSet,
    /// MPOL_F_STATIC_NODES.
    pub static_nodes: bool,
    /// MPOL_F_RELATIVE_NODES.
    pub relative_nodes: bool,
}

impl Policy {
    /// The policy of a range nobody set: DEFAULT.
    pub const DEFAULT: Policy = Policy {
        mode: PolicyMode::Default,
        nodes: NodeSet::new(),
        static_nodes: false,
        relative_nodes: false,
    };

    /// A policy without flags.
    pub fn new(mode: PolicyMode, nodes: NodeSet) -> Self {
        Self {
            mode,
            nodes,
            static_nodes: false,
            relative_nodes: false,
        }
    }

    /// Checks the mode against the node set and flags, as the kernel would, but with messages.
    pub fn validate(&self) -> Result<(), DomainError> {
        if self.static_nodes && self.relative_nodes {
            return Err(DomainError::StaticAndRelative);
        }
        if self.mode.takes_nodes() {
            if self.nodes.is_empty() {
                return Err(DomainError::NodesRequired(self.mode));
            }
            if self.mode == PolicyMode::Preferred && self.nodes.len() != 1 {
                return Err(DomainError::PreferredOneNode);
            }
        } else {
            if !self.nodes.is_empty() {
                return Err(DomainError::NodesNotAllowed(self.mode));
            }
            if self.static_nodes || self.relative_nodes {
                return Err(DomainError::FlagsWithoutNodes);
            }
        }
        Ok(())
    }

    /// Checks the nodes against those the agent may use. Relative node ids are folded onto the
    /// allowed set by the kernel, so any id is acceptable there.
    pub fn check_usable(&self, usable: &NodeSet) -> Result<(), DomainError> {
        if self.relative_nodes {
            return Ok(());
        }
        match self.nodes.iter().find(|n| !usable.contains(*n)) {
            Some(node) => Err(DomainError::NodeNotUsable {
                node,
                allowed: usable.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Whether a page on `node` is where this policy allows. `None` when the policy does not pin
    /// pages to a set (DEFAULT, LOCAL, PREFERRED*, relative node sets).
    pub fn allows(&self, node: u32) -> Option<bool> {
        if !self.mode.nodes_are_hard() || self.relative_nodes {
            return None;
        }
        Some(self.nodes.contains(node))
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mode)?;
        if self.mode.takes_nodes() {
            write!(f, " {}", self.nodes)?;
        }
        if self.static_nodes {
            f.write_str(" static")?;
        }
        if self.relative_nodes {
            f.write_str(" relative")?;
        }
        Ok(())
    }
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

impl RegionKey {
    /// A key from caller input: both names are checked here, once, at the edge.
    pub fn parse(vm_id: &str, name: &str) -> Result<Self, DomainError> {
        validate_name("vm_id", vm_id)?;
        validate_name("name", name)?;
        Ok(Self {
            vm_id: vm_id.to_string(),
            name: name.to_string(),
        })
    }
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
}
