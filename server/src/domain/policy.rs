//! Memory policies: a mode and its nodes, checked against the kernel's rules.

use super::*;
use std::fmt;

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
