//! The one writer task: it owns the write connection and commits queued jobs in groups (see the
//! module above), then answers each job.

use super::*;

pub(super) async fn writer_loop(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Job>,
    known_requests: KnownRequests,
) {
    let mut since_trim = 0u32;
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let results = commit_batch(&mut conn, &jobs).await;
        // Before any answer: a retry that arrives after the acknowledgement must find its id.
        for (job, r) in jobs.iter().zip(&results) {
            if r.is_ok() {
                for op in &job.ops {
                    if let WriteOp::SaveRequest { request_id, .. } = op {
                        known_requests.insert(request_id);
                    }
                }
            }
        }
        for (job, r) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(r);
        }
        since_trim += 1;
        if since_trim >= 256 {
            since_trim = 0;
            let _ = sqlx::query(
                "DELETE FROM events WHERE sequence <= (SELECT max(sequence) FROM events) - ?",
            )
            .bind(EVENT_LOG_LIMIT)
            .execute(&mut conn)
            .await;
        }
    }
}

/// Runs each job in a savepoint of one transaction, commits, and returns each job's outcome. If
/// the commit itself fails, every job fails: nothing of the batch is on disk.
///
/// Every statement is a round trip to sqlx's SQLite worker thread, so the transaction and
/// savepoint statements between two jobs go as one multi-statement query.
async fn commit_batch(
    conn: &mut SqliteConnection,
    jobs: &[Job],
) -> Vec<Result<Vec<u64>, StoreError>> {
    let fail_all = |e: StoreError| jobs.iter().map(|_| Err(clone_err(&e))).collect();
    if let Err(e) = sqlx::query("BEGIN IMMEDIATE; SAVEPOINT job")
        .execute(&mut *conn)
        .await
    {
        let e = StoreError::from(e);
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        return fail_all(e);
    }
    let mut results = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        let last = i + 1 == jobs.len();
        let r = apply_ops(conn, &job.ops).await;
        // A full disk, a lock or an I/O error (SQLite may answer these by rolling back the
        // whole transaction) fails the whole batch: the jobs before it may already be undone, so none
        // may be acknowledged.
        if let Err(e @ (StoreError::Full | StoreError::Locked | StoreError::Sql(_))) = &r {
            let e = clone_err(e);
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            return fail_all(e);
        }
        // The job's own error is what its caller needs; only its savepoint is undone.
        let close = match (&r, last) {
            (Ok(_), false) => "RELEASE job; SAVEPOINT job",
            (Ok(_), true) => "RELEASE job; COMMIT",
            (Err(_), false) => "ROLLBACK TO job; RELEASE job; SAVEPOINT job",
            (Err(_), true) => "ROLLBACK TO job; RELEASE job; COMMIT",
        };
        if let Err(e) = sqlx::query(close).execute(&mut *conn).await {
            let e = StoreError::from(e);
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            return fail_all(e);
        }
        results.push(r);
    }
    results
}

fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Locked => StoreError::Locked,
        StoreError::Full => StoreError::Full,
        StoreError::Conflict => StoreError::Conflict,
        StoreError::WriterGone => StoreError::WriterGone,
        other => StoreError::Sql(other.to_string()),
    }
}

async fn apply_ops(conn: &mut SqliteConnection, ops: &[WriteOp]) -> Result<Vec<u64>, StoreError> {
    let mut seqs = Vec::new();
    let mut rest = ops;
    while let Some((op, tail)) = rest.split_first() {
        rest = tail;
        match op {
            WriteOp::InsertRegion(r) => {
                sqlx::query(
                    "INSERT INTO regions (vm_id, name, uid, backend, size_bytes, hugepage_size_bytes, generation, strategy, created_unix, status, adopted, holder_pid, holder_start_time, file_dev, file_ino) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                )
                .bind(&r.key.vm_id)
                .bind(&r.key.name)
                .bind(&r.uid)
                .bind(r.backend.as_str())
                .bind(r.size_bytes as i64)
                .bind(r.hugepage_size_bytes as i64)
                .bind(r.generation as i64)
                .bind(r.strategy.as_str())
                .bind(r.created_unix)
                .bind(r.status.as_str())
                .bind(r.adopted as i64)
                .bind(r.holder.map(|h| h.pid as i64))
                .bind(r.holder.map(|h| h.start_time as i64))
                .bind(r.file_id.map(|f| f.0 as i64))
                .bind(r.file_id.map(|f| f.1 as i64))
                .execute(&mut *conn)
                .await?;
                insert_ranges(conn, &r.key, &r.ranges).await?;
            }
            WriteOp::SaveRanges {
                key,
                generation,
                ranges,
            } => {
                let n =
                    sqlx::query("UPDATE regions SET generation = ? WHERE vm_id = ? AND name = ?")
                        .bind(*generation as i64)
                        .bind(&key.vm_id)
                        .bind(&key.name)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                if n != 1 {
                    return Err(StoreError::Corrupt(format!("region {key} is not stored")));
                }
                replace_ranges(conn, key, ranges).await?;
            }
            WriteOp::DeleteRegion(key) => {
                sqlx::query("DELETE FROM regions WHERE vm_id = ? AND name = ?")
                    .bind(&key.vm_id)
                    .bind(&key.name)
                    .execute(&mut *conn)
                    .await?;
            }
            WriteOp::SaveHolder { .. } => {
                // A run of holder updates (a restart recreates a file per region) goes to SQLite
                // at once.
                let mut run = vec![op];
                while run.len() < HOLDERS_PER_UPDATE
                    && let Some((next @ WriteOp::SaveHolder { .. }, tail)) = rest.split_first()
                {
                    run.push(next);
                    rest = tail;
                }
                save_holders(conn, &run).await?;
            }
            WriteOp::SaveStatus(key, status) => {
                sqlx::query("UPDATE regions SET status = ? WHERE vm_id = ? AND name = ?")
                    .bind(status.as_str())
                    .bind(&key.vm_id)
                    .bind(&key.name)
                    .execute(&mut *conn)
                    .await?;
            }
            WriteOp::SaveRequest {
                request_id,
                method,
                fingerprint,
                response,
            } => {
                sqlx::query(
                    "INSERT INTO requests (request_id, method, fingerprint, response, created_unix) VALUES (?,?,?,?,?)",
                )
                .bind(request_id)
                .bind(*method)
                .bind(fingerprint)
                .bind(response)
                .bind(unix_now())
                .execute(&mut *conn)
                .await?;
            }
            WriteOp::InitMeta { key, value } => {
                sqlx::query("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)")
                    .bind(key)
                    .bind(value)
                    .execute(&mut *conn)
                    .await?;
            }
            WriteOp::AppendEvent(first) => {
                // A run of events (recovery appends thousands) goes as one multi-row INSERT.
                let mut run = vec![first];
                while run.len() < EVENTS_PER_INSERT
                    && let Some((WriteOp::AppendEvent(e), tail)) = rest.split_first()
                {
                    run.push(e);
                    rest = tail;
                }
                seqs.extend(append_events(conn, &run).await?);
            }
        }
    }
    Ok(seqs)
}

/// Holder updates sent to SQLite at once: 6 parameters each.
const HOLDERS_PER_UPDATE: usize = 256;

/// Records the holder and file identity of each region of `ops` (all `SaveHolder`), in order, in
/// one round trip to sqlx's SQLite thread: one UPDATE per region, sent as one
/// multi-statement query (sqlx binds the parameters to the statements in order). A join of the
/// regions with a VALUES list cost SQLite more than the separate UPDATEs.
async fn save_holders(conn: &mut SqliteConnection, ops: &[&WriteOp]) -> Result<(), StoreError> {
    const ONE: &str = "UPDATE regions SET holder_pid = ?, holder_start_time = ?, file_dev = ?, file_ino = ? WHERE vm_id = ? AND name = ?;";
    let sql = ONE.repeat(ops.len());
    let mut q = sqlx::query(&sql);
    for op in ops {
        if let WriteOp::SaveHolder {
            key,
            holder,
            file_id,
        } = op
        {
            q = q
                .bind(holder.map(|h| h.pid as i64))
                .bind(holder.map(|h| h.start_time as i64))
                .bind(file_id.map(|f| f.0 as i64))
                .bind(file_id.map(|f| f.1 as i64))
                .bind(&key.vm_id)
                .bind(&key.name);
        }
    }
    q.execute(&mut *conn).await?;
    Ok(())
}

/// Events written per INSERT statement: 6 parameters each.
const EVENTS_PER_INSERT: usize = 256;

/// Appends events with one INSERT and returns their sequence numbers in the order given.
async fn append_events(
    conn: &mut SqliteConnection,
    events: &[&Event],
) -> Result<Vec<u64>, StoreError> {
    let mut sql = String::from(
        "INSERT INTO events (time_unix_ms, kind, vm_id, name, message, actor) VALUES ",
    );
    sql.push_str(&vec!["(?,?,?,?,?,?)"; events.len()].join(","));
    sql.push_str(" RETURNING sequence");
    let mut q = sqlx::query_scalar::<_, i64>(&sql);
    for e in events {
        q = q
            .bind(e.time_unix_ms)
            .bind(e.kind as i32 as i64)
            .bind(&e.vm_id)
            .bind(&e.name)
            .bind(&e.message)
            .bind(&e.actor);
    }
    // RETURNING gives rows in no set order, but sequences are assigned in VALUES order.
    let mut seqs: Vec<u64> = q
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|s| s as u64)
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// Ranges written per INSERT statement: 9 parameters each, well under SQLite's 32,766.
const RANGES_PER_INSERT: usize = 256;

async fn insert_ranges(
    conn: &mut SqliteConnection,
    key: &RegionKey,
    ranges: &RangeMap,
) -> Result<(), StoreError> {
    write_ranges(conn, key, ranges, false).await
}

/// Replaces a region's stored ranges: the delete and the first rows go as one query.
async fn replace_ranges(
    conn: &mut SqliteConnection,
    key: &RegionKey,
    ranges: &RangeMap,
) -> Result<(), StoreError> {
    write_ranges(conn, key, ranges, true).await
}

/// Inserts a region's ranges with multi-row INSERTs (one round trip to the SQLite thread per
/// [`RANGES_PER_INSERT`] ranges), first deleting its old ones when `replace`.
async fn write_ranges(
    conn: &mut SqliteConnection,
    key: &RegionKey,
    ranges: &RangeMap,
    replace: bool,
) -> Result<(), StoreError> {
    const INSERT: &str = "INSERT INTO ranges (vm_id, name, offset_bytes, length_bytes, mode, nodes, static_nodes, relative_nodes, placed) VALUES ";
    const ROW: &str = "(?,?,?,?,?,?,?,?,?)";
    let all = ranges.ranges();
    let mut delete_first = replace;
    for (i, batch) in all.chunks(RANGES_PER_INSERT).enumerate() {
        let mut sql = String::new();
        if delete_first && i == 0 {
            sql.push_str("DELETE FROM ranges WHERE vm_id = ? AND name = ?; ");
        }
        sql.push_str(INSERT);
        sql.push_str(&vec![ROW; batch.len()].join(","));
        let mut q = sqlx::query(&sql);
        if delete_first && i == 0 {
            q = q.bind(&key.vm_id).bind(&key.name);
            delete_first = false;
        }
        for r in batch {
            q = q
                .bind(&key.vm_id)
                .bind(&key.name)
                .bind(r.offset as i64)
                .bind(r.length as i64)
                .bind(r.policy.mode.as_str())
                .bind(r.policy.nodes.to_string())
                .bind(r.policy.static_nodes as i64)
                .bind(r.policy.relative_nodes as i64)
                .bind(r.placed as i64);
        }
        q.execute(&mut *conn).await?;
    }
    if delete_first {
        // No ranges at all (a RangeMap always tiles its region, so this is defensive).
        sqlx::query("DELETE FROM ranges WHERE vm_id = ? AND name = ?")
            .bind(&key.vm_id)
            .bind(&key.name)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn events_appended_in_one_job_get_increasing_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), Duration::from_secs(1))
            .await
            .unwrap();
        let event = |i: usize| Event {
            sequence: 0,
            time_unix_ms: i as i64,
            kind: EventKind::Reapplied,
            vm_id: format!("vm{i}"),
            name: "r".into(),
            message: format!("event {i}"),
            actor: "test".into(),
        };
        // More than one INSERT's worth.
        let n = EVENTS_PER_INSERT + 10;
        let seqs = store
            .write((0..n).map(|i| WriteOp::AppendEvent(event(i))).collect())
            .await
            .unwrap();
        assert_eq!(seqs.len(), n);
        assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]), "{seqs:?}");
        let stored = store.events_after(0, None, n as i64).await.unwrap();
        assert_eq!(stored.len(), n);
        for (i, (e, seq)) in stored.iter().zip(&seqs).enumerate() {
            assert_eq!(
                e.sequence, *seq,
                "the i-th event appended has the i-th sequence"
            );
            assert_eq!(e.message, format!("event {i}"));
        }
    }

    /// A run of holder updates goes as one statement per `HOLDERS_PER_UPDATE`: every region gets
    /// its own holder and file identity, a region named twice in the run gets the later one (as
    /// one statement each would give), and a region not stored is left out, as before.
    #[tokio::test(flavor = "multi_thread")]
    async fn holder_updates_in_one_job_each_reach_their_region() {
        use crate::domain::{Backend, Holder, RegionStatus, Strategy};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), Duration::from_secs(1))
            .await
            .unwrap();
        let n = HOLDERS_PER_UPDATE + 10;
        let key = |i: usize| RegionKey::parse(&format!("vm{}", i % 7), &format!("r{i}")).unwrap();
        let inserts = (0..n)
            .map(|i| {
                WriteOp::InsertRegion(RegionIntent {
                    key: key(i),
                    uid: format!("uid{i}"),
                    backend: Backend::Memfd,
                    size_bytes: 4096,
                    hugepage_size_bytes: 0,
                    generation: 1,
                    strategy: Strategy::SharedPolicy,
                    ranges: RangeMap::new(4096),
                    created_unix: 0,
                    status: RegionStatus::Active,
                    holder: Some(Holder {
                        pid: 1,
                        start_time: 1,
                    }),
                    file_id: Some((1, 1)),
                    adopted: false,
                })
            })
            .collect();
        store.write(inserts).await.unwrap();
        let holder = |i: usize| {
            (!i.is_multiple_of(3)).then_some(Holder {
                pid: 1000 + i as i32,
                start_time: 2000 + i as u64,
            })
        };
        let mut ops: Vec<WriteOp> = (0..n)
            .map(|i| WriteOp::SaveHolder {
                key: key(i),
                holder: holder(i),
                file_id: Some((10, 100 + i as u64)),
            })
            .collect();
        // Region 5 again, later in the same run: the later update wins.
        ops.insert(
            7,
            WriteOp::SaveHolder {
                key: key(5),
                holder: None,
                file_id: Some((11, 5)),
            },
        );
        // A region that is not stored changes nothing.
        ops.insert(
            9,
            WriteOp::SaveHolder {
                key: RegionKey::parse("vm-none", "r").unwrap(),
                holder: holder(1),
                file_id: None,
            },
        );
        store.write(ops).await.unwrap();
        let stored = store.load_regions().await.unwrap();
        assert_eq!(stored.len(), n);
        for r in &stored {
            let i: usize = r.key.name[1..].parse().unwrap();
            let want = if i == 5 {
                (None, Some((11, 5)))
            } else {
                (holder(i), Some((10, 100 + i as u64)))
            };
            assert_eq!((r.holder, r.file_id), want, "region {}", r.key);
        }
    }
}
