//! Rows of the state database read back as domain values; a row that does not read is
//! [`StoreError::Corrupt`].

use super::StoreError;
use crate::domain::{
    Backend, Holder, NodeSet, Origin, Policy, PolicyMode, RangeIntent, RangeMap, RegionIntent,
    RegionKey, RegionStatus, Strategy,
};
use sqlx::Row;

pub(super) fn region_from_row(
    row: &sqlx::sqlite::SqliteRow,
    key: RegionKey,
    ranges: Vec<RangeIntent>,
) -> Result<RegionIntent, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("region {key}: {what}"));
    let backend: String = row.try_get("backend")?;
    let strategy: String = row.try_get("strategy")?;
    let status: String = row.try_get("status")?;
    let origin: String = row.try_get("origin")?;
    let size = row.try_get::<i64, _>("size_bytes")? as u64;
    let holder = match (
        row.try_get::<Option<i64>, _>("holder_pid")?,
        row.try_get::<Option<i64>, _>("holder_start_time")?,
    ) {
        (Some(pid), Some(start)) => Some(Holder {
            pid: pid as i32,
            start_time: start as u64,
        }),
        _ => None,
    };
    let file_id = match (
        row.try_get::<Option<i64>, _>("file_dev")?,
        row.try_get::<Option<i64>, _>("file_ino")?,
    ) {
        (Some(d), Some(i)) => Some((d as u64, i as u64)),
        _ => None,
    };
    Ok(RegionIntent {
        uid: row.try_get("uid")?,
        backend: Backend::parse(&backend).ok_or_else(|| corrupt("backend"))?,
        size_bytes: size,
        hugepage_size_bytes: row.try_get::<i64, _>("hugepage_size_bytes")? as u64,
        generation: row.try_get::<i64, _>("generation")? as u64,
        strategy: Strategy::parse(&strategy).ok_or_else(|| corrupt("strategy"))?,
        ranges: RangeMap::from_ranges(size, ranges)
            .ok_or_else(|| corrupt("ranges do not tile it"))?,
        created_unix: row.try_get("created_unix")?,
        status: RegionStatus::parse(&status).ok_or_else(|| corrupt("status"))?,
        holder,
        file_id,
        origin: Origin::parse(&origin).ok_or_else(|| corrupt("origin"))?,
        guest_cell: row
            .try_get::<Option<i64>, _>("guest_cell")?
            .map(|c| u32::try_from(c).map_err(|_| corrupt("guest_cell")))
            .transpose()?,
        key,
    })
}

/// A stored range as `load_regions` aggregates it: offset, length, mode, nodes, static_nodes,
/// relative_nodes, placed.
type RangeColumns = (i64, i64, String, String, i64, i64, i64);

/// A region's ranges from their JSON aggregate, in offset order.
pub(super) fn ranges_from_json(json: &str) -> Result<Vec<RangeIntent>, String> {
    let rows: Vec<RangeColumns> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut ranges = rows
        .into_iter()
        .map(
            |(offset, length, mode, nodes, static_nodes, relative_nodes, placed)| {
                Ok(RangeIntent {
                    offset: offset as u64,
                    length: length as u64,
                    policy: Policy {
                        mode: PolicyMode::parse(&mode).ok_or(format!("policy mode {mode:?}"))?,
                        nodes: NodeSet::parse_list(&nodes)
                            .map_err(|_| format!("node list {nodes:?}"))?,
                        static_nodes: static_nodes != 0,
                        relative_nodes: relative_nodes != 0,
                    },
                    placed: placed != 0,
                })
            },
        )
        .collect::<Result<Vec<_>, String>>()?;
    ranges.sort_by_key(|r| r.offset);
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_come_back_from_their_json_aggregate_in_offset_order() {
        let json = r#"[[8192,4096,"bind","0-2,5",1,0,1],[0,8192,"weighted-interleave","1",0,1,0]]"#;
        let r = ranges_from_json(json).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].offset, r[0].length), (0, 8192));
        assert_eq!(r[0].policy.mode, PolicyMode::WeightedInterleave);
        assert!(r[0].policy.relative_nodes && !r[0].placed);
        assert_eq!(r[1].policy.nodes, NodeSet::parse_list("0-2,5").unwrap());
        assert!(r[1].policy.static_nodes && r[1].placed);
        assert!(ranges_from_json(r#"[[0,4096,"sideways","0",0,0,0]]"#).is_err());
        assert!(ranges_from_json("[]").unwrap().is_empty());
    }
}
