//! Bounded idempotency history. The writer prunes request records by age and by count,
//! a chunk at a time in its own transaction between batches, so no request waits behind a long
//! delete. A pruned record leaves a tombstone (a 64-bit digest of its id): a retry of that id is
//! refused as "record pruned" rather than run again. Tombstones are pruned by age and count in
//! turn; past them an id is unknown. Intents (regions, ranges) and events are never touched here.

use super::writer::exec;
use super::*;

/// Rows removed from one table in one pruning transaction at most.
const CHUNK: i64 = 2_000;

/// How long, and how many, request records and their tombstones are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Records older than this (seconds) are pruned.
    pub record_max_age_secs: u64,
    /// At most this many records are kept (the newest).
    pub record_max_count: u64,
    /// Tombstones older than this (seconds) are pruned.
    pub tombstone_max_age_secs: u64,
    /// At most this many tombstones are kept (the newest).
    pub tombstone_max_count: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            record_max_age_secs: 24 * 3600,
            record_max_count: 100_000,
            tombstone_max_age_secs: 30 * 24 * 3600,
            tombstone_max_count: 500_000,
        }
    }
}

/// The digest a tombstone keeps of a request id (and [`KnownRequests`] holds in memory): the
/// first 8 bytes of SHA-256, stable across builds and restarts.
pub(super) fn id_hash(request_id: &str) -> i64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(request_id.as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("SHA-256 has 32 bytes"))
}

/// What one pruning pass changed, for the in-memory set once it is committed.
#[derive(Debug, Default)]
pub(super) struct Pruned {
    /// Records turned into tombstones.
    pub records: usize,
    /// Digests whose tombstones were removed: these ids are now unknown.
    pub forgotten: Vec<i64>,
    /// Whether a chunk limit was reached (more is due).
    pub more: bool,
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One pruning pass in its own transaction: records past age or count become tombstones, then
/// tombstones past age or count go. Each step removes at most [`CHUNK`] rows.
pub(super) async fn prune(
    conn: &mut SqliteConnection,
    r: &Retention,
    now: i64,
) -> Result<Pruned, StoreError> {
    exec(conn, "BEGIN IMMEDIATE").await?;
    let done = match prune_in_tx(conn, r, now).await {
        Ok(p) => exec(conn, "COMMIT").await.map(|()| p),
        Err(e) => Err(e),
    };
    if done.is_err() {
        let _ = exec(conn, "ROLLBACK").await;
    }
    done
}

async fn prune_in_tx(
    conn: &mut SqliteConnection,
    r: &Retention,
    now: i64,
) -> Result<Pruned, StoreError> {
    let mut out = Pruned::default();
    let record_cutoff = now.saturating_sub(as_i64(r.record_max_age_secs));
    // Oldest first: by count (rowids grow with each insert), then by age.
    let mut ids: Vec<String> = sqlx::query_scalar(
        "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests WHERE rowid <= (SELECT max(rowid) FROM requests) - ? ORDER BY rowid LIMIT ?) RETURNING request_id",
    )
    .bind(as_i64(r.record_max_count))
    .bind(CHUNK)
    .fetch_all(&mut *conn)
    .await?;
    if (ids.len() as i64) < CHUNK {
        let by_age: Vec<String> = sqlx::query_scalar(
            "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests WHERE created_unix < ? LIMIT ?) RETURNING request_id",
        )
        .bind(record_cutoff)
        .bind(CHUNK - ids.len() as i64)
        .fetch_all(&mut *conn)
        .await?;
        ids.extend(by_age);
    }
    out.more |= ids.len() as i64 >= CHUNK;
    out.records = ids.len();
    if !ids.is_empty() {
        // Every tombstone in one statement (one round trip to sqlx's SQLite thread), in the
        // order the records were made: a JSON array of the digests.
        let hashes: Vec<i64> = ids.iter().map(|id| id_hash(id)).collect();
        let hashes = serde_json::to_string(&hashes).map_err(|e| StoreError::Sql(e.to_string()))?;
        sqlx::query(
            "INSERT INTO pruned_requests (id_hash, pruned_unix) SELECT value, ? FROM json_each(?) ORDER BY key",
        )
        .bind(now)
        .bind(hashes)
        .execute(&mut *conn)
        .await?;
    }
    let tomb_cutoff = now.saturating_sub(as_i64(r.tombstone_max_age_secs));
    let mut forgotten: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM pruned_requests WHERE seq IN (SELECT seq FROM pruned_requests WHERE seq <= (SELECT max(seq) FROM pruned_requests) - ? ORDER BY seq LIMIT ?) RETURNING id_hash",
    )
    .bind(as_i64(r.tombstone_max_count))
    .bind(CHUNK)
    .fetch_all(&mut *conn)
    .await?;
    if (forgotten.len() as i64) < CHUNK {
        let by_age: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM pruned_requests WHERE seq IN (SELECT seq FROM pruned_requests WHERE pruned_unix < ? LIMIT ?) RETURNING id_hash",
        )
        .bind(tomb_cutoff)
        .bind(CHUNK - forgotten.len() as i64)
        .fetch_all(&mut *conn)
        .await?;
        forgotten.extend(by_age);
    }
    out.more |= forgotten.len() as i64 >= CHUNK;
    out.forgotten = forgotten;
    Ok(out)
}

/// Whether `request_id` has a tombstone (its record was pruned).
#[cfg(test)]
async fn is_pruned(conn: &mut SqliteConnection, request_id: &str) -> Result<bool, StoreError> {
    let row: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM pruned_requests WHERE id_hash = ? LIMIT 1")
            .bind(id_hash(request_id))
            .fetch_optional(conn)
            .await?;
    Ok(row.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(id: &str) -> WriteOp {
        WriteOp::SaveRequest {
            request_id: id.to_string(),
            method: "SetPolicy",
            fingerprint: vec![1],
            response: vec![2],
        }
    }

    fn state(l: RequestLookup) -> &'static str {
        match l {
            RequestLookup::Unknown => "unknown",
            RequestLookup::Answered(_) => "answered",
            RequestLookup::Pruned => "pruned",
        }
    }

    /// 70 keyed writes, one batch each, with room for 3 records and 20 tombstones. The writer
    /// prunes after its first batch and again after 64 more (batch 65): rowids 1..=62 become
    /// tombstones, of which the newest 20 (ids 43..=62) stay. The memory set and the tables agree,
    /// before and after a reopen, and a pruned id cannot be saved again.
    #[tokio::test(flavor = "multi_thread")]
    async fn records_become_tombstones_then_unknown_and_memory_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let retention = Retention {
            record_max_age_secs: 3600,
            record_max_count: 3,
            tombstone_max_age_secs: 3600,
            tombstone_max_count: 20,
        };
        let store = Store::open_with(&path, Duration::from_secs(1), retention)
            .await
            .unwrap();
        for i in 1..=70 {
            store.write(vec![save(&format!("id-{i}"))]).await.unwrap();
        }
        let check = |store: Store| async move {
            for (i, want) in [
                (1, "unknown"),
                (42, "unknown"),
                (43, "pruned"),
                (62, "pruned"),
                (63, "answered"),
                (70, "answered"),
                (71, "unknown"),
            ] {
                let got = state(store.lookup_request(&format!("id-{i}")).await.unwrap());
                assert_eq!(got, want, "id-{i}");
            }
            assert_eq!(store.known_request_count(), 8 + 20);
            store
        };
        let store = check(store).await;
        assert!(matches!(
            store.write(vec![save("id-50")]).await,
            Err(StoreError::Conflict)
        ));
        drop(store);
        let store = Store::open_with(&path, Duration::from_secs(1), retention)
            .await
            .unwrap();
        check(store).await;
    }

    /// Age pruning: records and tombstones older than their horizons go, whatever the counts.
    #[tokio::test(flavor = "multi_thread")]
    async fn age_prunes_records_then_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(Store::open(&path, Duration::from_secs(1)).await.unwrap());
        let mut conn = SqliteConnection::connect_with(&options(&path, Duration::from_secs(1)))
            .await
            .unwrap();
        for (i, created) in [(1, 100), (2, 200), (3, 300)] {
            sqlx::query("INSERT INTO requests VALUES (?, 'SetPolicy', x'01', x'02', ?)")
                .bind(format!("id-{i}"))
                .bind(created)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        let r = Retention {
            record_max_age_secs: 150,
            record_max_count: 1000,
            tombstone_max_age_secs: 50,
            tombstone_max_count: 1000,
        };
        // At 400: records before 250 go (ids 1, 2); their fresh tombstones stay.
        let p = prune(&mut conn, &r, 400).await.unwrap();
        assert_eq!((p.records, p.forgotten.len()), (2, 0));
        assert!(is_pruned(&mut conn, "id-1").await.unwrap());
        assert!(!is_pruned(&mut conn, "id-3").await.unwrap());
        // At 451: record 3 (300 < 301) goes; tombstones made at 400 (< 401) are forgotten.
        let p = prune(&mut conn, &r, 451).await.unwrap();
        assert_eq!(p.records, 1);
        assert_eq!(
            p.forgotten,
            vec![id_hash("id-1"), id_hash("id-2")],
            "the older tombstones"
        );
        assert!(!is_pruned(&mut conn, "id-1").await.unwrap());
        assert!(is_pruned(&mut conn, "id-3").await.unwrap());
    }
}
