//! Sets of NUMA node ids, as the kernel reads them (`nodemask_t`) and as people write them.

use super::*;
use std::fmt;

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
