//! The vocabulary of memplace: node sets, policies, ranges and regions. Pure data and validation,
//! no I/O, so every rule here is unit-tested without a kernel. Node sets and policies live in
//! `memplace-sys` (the kernel calls take them) and are re-exported here.

mod event;
mod range;
mod region;
#[cfg(test)]
mod tests;

pub use event::{Event, EventKind};
pub use memplace_sys::policy::{MAX_NODES, NodeSet, Policy, PolicyError, PolicyMode};
pub use range::{RangeIntent, RangeMap, resolve_span};
pub use region::{Backend, Holder, Origin, RegionIntent, RegionKey, RegionStatus, Strategy, VmId};

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
