//! The vocabulary of memplace: node sets, policies, ranges and regions. Pure data and validation,
//! no I/O, so every rule here is unit-tested without a kernel.

mod event;
mod nodes;
mod policy;
mod range;
mod region;
#[cfg(test)]
mod tests;

pub use event::{Event, EventKind};
pub use nodes::NodeSet;
pub use policy::{Policy, PolicyMode};
pub use range::{RangeIntent, RangeMap, resolve_span};
pub use region::{Backend, Holder, RegionIntent, RegionKey, RegionStatus, Strategy};

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
