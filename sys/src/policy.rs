//! The NUMA vocabulary the kernel calls take: node sets, policy modes and policies. Pure data and
//! validation, no I/O; the agent's `domain` module re-exports them.

use std::fmt;

/// Node ids are below this bound (the kernel's MAX_NUMNODES on x86_64 is 1024).
pub const MAX_NODES: u32 = 1024;
const WORDS: usize = (MAX_NODES as usize) / 64;

/// Invalid node sets and policies. Each message tells the caller what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[allow(missing_docs)] // Variant fields are described by the variant's message.
pub enum PolicyError {
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
    pub fn from_ids(ids: impl IntoIterator<Item = u32>) -> Result<Self, PolicyError> {
        let mut s = Self::new();
        for id in ids {
            s.insert(id)?;
        }
        Ok(s)
    }

    /// Adds a node.
    pub fn insert(&mut self, id: u32) -> Result<(), PolicyError> {
        if id >= MAX_NODES {
            return Err(PolicyError::NodeOutOfRange(id));
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

    /// Node ids in increasing order. Walks the set bits of each word, not all `MAX_NODES` ids.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.bits.iter().enumerate().flat_map(|(w, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                Some(w as u32 * 64 + bit)
            })
        })
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
    pub fn parse_list(text: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::BadNodeList(text.to_string());
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
                return Err(PolicyError::NodeOutOfRange(hi));
            }
            for id in lo..=hi {
                s.insert(id)?;
            }
        }
        Ok(s)
    }
}

impl fmt::Display for NodeSet {
    /// The numactl list syntax, e.g. `0-3,5`. Written straight to the formatter: this runs for
    /// every log line, event and stored range of a SetPolicy.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids = self.iter().peekable();
        let mut first = true;
        while let Some(start) = ids.next() {
            let mut end = start;
            while ids.next_if_eq(&(end + 1)).is_some() {
                end += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
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
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.static_nodes && self.relative_nodes {
            return Err(PolicyError::StaticAndRelative);
        }
        if self.mode.takes_nodes() {
            if self.nodes.is_empty() {
                return Err(PolicyError::NodesRequired(self.mode));
            }
            if self.mode == PolicyMode::Preferred && self.nodes.len() != 1 {
                return Err(PolicyError::PreferredOneNode);
            }
        } else {
            if !self.nodes.is_empty() {
                return Err(PolicyError::NodesNotAllowed(self.mode));
            }
            if self.static_nodes || self.relative_nodes {
                return Err(PolicyError::FlagsWithoutNodes);
            }
        }
        Ok(())
    }

    /// Checks the nodes against those the agent may use. Relative node ids are folded onto the
    /// allowed set by the kernel, so any id is acceptable there.
    pub fn check_usable(&self, usable: &NodeSet) -> Result<(), PolicyError> {
        if self.relative_nodes {
            return Ok(());
        }
        match self.nodes.iter().find(|n| !usable.contains(*n)) {
            Some(node) => Err(PolicyError::NodeNotUsable {
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
            Err(PolicyError::NodeOutOfRange(1024))
        );
        assert!(NodeSet::parse_list("1023").unwrap().contains(1023));
    }

    #[test]
    fn node_ids_and_lists_are_right_across_word_boundaries() {
        let cases: &[&[u32]] = &[
            &[],
            &[0],
            &[63, 64],
            &[62, 63, 64, 65, 127, 128, 130],
            &[1, 3, 5, 200, 1022, 1023],
            &[511, 512, 513, 514, 1023],
        ];
        for ids in cases {
            let s = nodes(ids);
            let naive: Vec<u32> = (0..MAX_NODES).filter(|i| s.contains(*i)).collect();
            assert_eq!(s.iter().collect::<Vec<_>>(), naive, "{ids:?}");
            assert_eq!(naive, ids.to_vec());
            assert_eq!(NodeSet::parse_list(&s.to_string()).unwrap(), s, "{s}");
        }
        assert_eq!(
            nodes(&[62, 63, 64, 65, 127, 128, 130]).to_string(),
            "62-65,127-128,130"
        );
        assert_eq!(nodes(&[]).to_string(), "");
        let all = NodeSet::parse_list("0-1023").unwrap();
        assert_eq!(all.to_string(), "0-1023");
        assert_eq!(all.iter().count(), 1024);
    }

    #[test]
    fn policy_validation_matches_kernel_rules() {
        assert!(Policy::DEFAULT.validate().is_ok());
        assert_eq!(
            Policy::new(PolicyMode::Default, nodes(&[0])).validate(),
            Err(PolicyError::NodesNotAllowed(PolicyMode::Default))
        );
        assert_eq!(
            Policy::new(PolicyMode::Local, nodes(&[0])).validate(),
            Err(PolicyError::NodesNotAllowed(PolicyMode::Local))
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
                Err(PolicyError::NodesRequired(m))
            );
            assert!(Policy::new(m, nodes(&[0])).validate().is_ok());
        }
        assert_eq!(
            Policy::new(PolicyMode::Preferred, nodes(&[0, 1])).validate(),
            Err(PolicyError::PreferredOneNode)
        );
        let mut p = bind(&[0]);
        p.static_nodes = true;
        p.relative_nodes = true;
        assert_eq!(p.validate(), Err(PolicyError::StaticAndRelative));
        let mut p = Policy::DEFAULT;
        p.static_nodes = true;
        assert_eq!(p.validate(), Err(PolicyError::FlagsWithoutNodes));
    }

    #[test]
    fn usable_nodes_are_checked_unless_relative() {
        let usable = nodes(&[0, 1]);
        assert!(bind(&[1]).check_usable(&usable).is_ok());
        assert!(matches!(
            bind(&[2]).check_usable(&usable),
            Err(PolicyError::NodeNotUsable { node: 2, .. })
        ));
        let mut p = bind(&[5]);
        p.relative_nodes = true;
        assert!(p.check_usable(&usable).is_ok());
    }
}
