//! Ranges of a region and the policy each one intends: spans resolved against a region's size,
//! and the map that splits and merges them as policies are set.

use super::*;

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
