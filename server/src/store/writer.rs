//! The one writer: a dedicated OS thread that owns the write connection (rusqlite, the same
//! bundled SQLite as sqlx's readers), commits queued jobs in groups (see the module above), then
//! answers each job. A whole batch runs in one synchronous call on this thread: no statement is a
//! round trip to another thread.

use super::*;
use rusqlite::{Connection, params};

/// Opens the write connection on its own thread and runs the writer there. Returns once the
/// connection is open and set up (or failed to be).
pub(super) async fn start_writer(
    path: &Path,
    busy: Duration,
    rx: mpsc::Receiver<Job>,
    known_requests: KnownRequests,
    retention: Retention,
) -> Result<(), String> {
    let (ready, opened) = oneshot::channel();
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("memplace-writer".into())
        .spawn(move || match open_writer(&path, busy) {
            Ok(conn) => {
                let _ = ready.send(Ok(()));
                writer_loop(conn, rx, known_requests, retention);
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        })
        .map_err(|e| format!("starting the writer thread: {e}"))?;
    opened
        .await
        .map_err(|_| "the writer thread ended before it opened the database".to_string())?
}

/// The write connection: WAL, `synchronous=FULL` (a commit is on disk when COMMIT returns),
/// foreign keys enforced, waiting up to `busy` for another process's lock.
fn open_writer(path: &Path, busy: Duration) -> Result<Connection, String> {
    let sql = |e: rusqlite::Error| e.to_string();
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    conn.busy_timeout(busy).map_err(sql)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("journal_mode is {mode}, not wal"));
    }
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
        .map_err(sql)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// How often an idle agent prunes request records: a ticker sends the writer an empty job.
const PRUNE_PERIOD: Duration = Duration::from_secs(30);
/// A busy writer prunes after this many batches (or [`PRUNE_PERIOD`], whichever comes first).
const PRUNE_EVERY_BATCHES: u32 = 64;

/// Wakes the writer every [`PRUNE_PERIOD`] with an empty job, so records age out on an idle
/// agent too. Holds only a weak sender: the writer still ends when the store is dropped.
pub(super) fn start_prune_ticker(tx: &mpsc::Sender<Job>) {
    let weak = tx.downgrade();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PRUNE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(tx) = weak.upgrade() else { return };
            let (reply, _) = oneshot::channel();
            if tx.send(Job { ops: vec![], reply }).await.is_err() {
                return;
            }
        }
    });
}

/// Prunes request records when due, after the batch's answers went out.
struct Pruner {
    retention: Retention,
    batches: u32,
    last: Instant,
    more: bool,
}

impl Pruner {
    /// `ticked`: the batch holds the ticker's empty job, which always prunes.
    fn after_batch(&mut self, conn: &Connection, known: &KnownRequests, ticked: bool) {
        self.batches += 1;
        if !(ticked
            || self.more
            || self.batches >= PRUNE_EVERY_BATCHES
            || self.last.elapsed() >= PRUNE_PERIOD)
        {
            return;
        }
        self.batches = 0;
        self.last = Instant::now();
        match prune::prune(conn, &self.retention, unix_now()) {
            Ok(p) => {
                // Only now, with the tombstones' removal committed, may a lookup skip the
                // database for these ids.
                known.forget(&p.forgotten);
                self.more = p.more;
                if p.records > 0 || !p.forgotten.is_empty() {
                    tracing::debug!(
                        records = p.records,
                        forgotten = p.forgotten.len(),
                        "pruned request records"
                    );
                }
            }
            Err(e) => {
                self.more = false;
                tracing::warn!("pruning request records failed (retried later): {e}");
            }
        }
    }
}

fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    known_requests: KnownRequests,
    retention: Retention,
) {
    let mut pruner = Pruner {
        retention,
        batches: 0,
        last: Instant::now(),
        more: true,
    };
    let mut since_trim = 0u32;
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let ticked = jobs.iter().any(|j| j.ops.is_empty());
        let results = commit_batch(&conn, &jobs);
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
        pruner.after_batch(&conn, &known_requests, ticked);
        since_trim += 1;
        if since_trim >= 256 {
            since_trim = 0;
            let _ = conn
                .prepare_cached(
                    "DELETE FROM events WHERE sequence <= (SELECT max(sequence) FROM events) - ?",
                )
                .and_then(|mut s| s.execute([EVENT_LOG_LIMIT]));
        }
    }
}

/// Runs one statement without parameters (transaction and savepoint control).
pub(super) fn exec(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Runs each job in a savepoint of one transaction, commits, and returns each job's outcome. If
/// the commit itself fails, every job fails: nothing of the batch is on disk.
fn commit_batch(conn: &Connection, jobs: &[Job]) -> Vec<Result<Vec<u64>, StoreError>> {
    let fail_all = |e: StoreError| {
        let _ = exec(conn, "ROLLBACK");
        jobs.iter().map(|_| Err(clone_err(&e))).collect()
    };
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        return fail_all(e);
    }
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        if let Err(e) = exec(conn, "SAVEPOINT job") {
            return fail_all(e);
        }
        let r = apply_ops(conn, &job.ops);
        // A full disk, a lock or an I/O error (SQLite may answer these by rolling back the
        // whole transaction) fails the whole batch: the jobs before it may already be undone, so none
        // may be acknowledged.
        if let Err(e @ (StoreError::Full | StoreError::Locked | StoreError::Sql(_))) = &r {
            return fail_all(clone_err(e));
        }
        // The job's own error is what its caller needs; only its savepoint is undone.
        let closed = match &r {
            Ok(_) => exec(conn, "RELEASE job"),
            Err(_) => exec(conn, "ROLLBACK TO job").and_then(|()| exec(conn, "RELEASE job")),
        };
        if let Err(e) = closed {
            return fail_all(e);
        }
        results.push(r);
    }
    if let Err(e) = exec(conn, "COMMIT") {
        return fail_all(e);
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

fn apply_ops(conn: &Connection, ops: &[WriteOp]) -> Result<Vec<u64>, StoreError> {
    let mut seqs = Vec::new();
    for op in ops {
        match op {
            WriteOp::InsertRegion(r) => {
                conn.prepare_cached(
                    "INSERT INTO regions (vm_id, name, uid, backend, size_bytes, hugepage_size_bytes, generation, strategy, created_unix, status, origin, holder_pid, holder_start_time, file_dev, file_ino, guest_cell) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                )?
                .execute(params![
                    r.key.vm_id,
                    r.key.name,
                    r.uid,
                    r.backend.as_str(),
                    r.size_bytes as i64,
                    r.hugepage_size_bytes as i64,
                    r.generation as i64,
                    r.strategy.as_str(),
                    r.created_unix,
                    r.status.as_str(),
                    r.origin.as_str(),
                    r.holder.map(|h| h.pid as i64),
                    r.holder.map(|h| h.start_time as i64),
                    r.file_id.map(|f| f.0 as i64),
                    r.file_id.map(|f| f.1 as i64),
                    r.guest_cell.map(i64::from),
                ])?;
                insert_ranges(conn, &r.key, &r.ranges)?;
            }
            WriteOp::SaveRanges {
                key,
                generation,
                ranges,
            } => {
                let n = conn
                    .prepare_cached(
                        "UPDATE regions SET generation = ? WHERE vm_id = ? AND name = ?",
                    )?
                    .execute(params![*generation as i64, key.vm_id, key.name])?;
                if n != 1 {
                    return Err(StoreError::Corrupt(format!("region {key} is not stored")));
                }
                conn.prepare_cached("DELETE FROM ranges WHERE vm_id = ? AND name = ?")?
                    .execute(params![key.vm_id, key.name])?;
                insert_ranges(conn, key, ranges)?;
            }
            WriteOp::DeleteRegion(key) => {
                conn.prepare_cached("DELETE FROM regions WHERE vm_id = ? AND name = ?")?
                    .execute(params![key.vm_id, key.name])?;
            }
            WriteOp::SaveHolder {
                key,
                holder,
                file_id,
            } => {
                conn.prepare_cached(
                    "UPDATE regions SET holder_pid = ?, holder_start_time = ?, file_dev = ?, file_ino = ? WHERE vm_id = ? AND name = ?",
                )?
                .execute(params![
                    holder.map(|h| h.pid as i64),
                    holder.map(|h| h.start_time as i64),
                    file_id.map(|f| f.0 as i64),
                    file_id.map(|f| f.1 as i64),
                    key.vm_id,
                    key.name,
                ])?;
            }
            WriteOp::SaveStatus(key, status) => {
                conn.prepare_cached("UPDATE regions SET status = ? WHERE vm_id = ? AND name = ?")?
                    .execute(params![status.as_str(), key.vm_id, key.name])?;
            }
            WriteOp::SaveRequest {
                request_id,
                method,
                fingerprint,
                response,
            } => {
                // An id whose record was pruned is taken: a retry that checked before the
                // pruning must not run as new (its caller re-reads and finds the tombstone).
                if prune::is_pruned(conn, request_id)? {
                    return Err(StoreError::Conflict);
                }
                conn.prepare_cached(
                    "INSERT INTO requests (request_id, method, fingerprint, response, created_unix) VALUES (?,?,?,?,?)",
                )?
                .execute(params![request_id, method, fingerprint, response, unix_now()])?;
            }
            WriteOp::InitMeta { key, value } => {
                conn.prepare_cached("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)")?
                    .execute(params![key, value])?;
            }
            WriteOp::AppendEvent(e) => {
                conn.prepare_cached(
                    "INSERT INTO events (time_unix_ms, kind, vm_id, name, message, actor) VALUES (?,?,?,?,?,?)",
                )?
                .execute(params![
                    e.time_unix_ms,
                    e.kind as i32 as i64,
                    e.vm_id,
                    e.name,
                    e.message,
                    e.actor,
                ])?;
                // `sequence` is the rowid.
                seqs.push(conn.last_insert_rowid() as u64);
            }
        }
    }
    Ok(seqs)
}

/// Inserts a region's ranges, one execution of a prepared statement each (a call into SQLite on
/// this thread, so batching them into multi-row statements would save nothing).
fn insert_ranges(conn: &Connection, key: &RegionKey, ranges: &RangeMap) -> Result<(), StoreError> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO ranges (vm_id, name, offset_bytes, length_bytes, mode, nodes, static_nodes, relative_nodes, placed) VALUES (?,?,?,?,?,?,?,?,?)",
    )?;
    for r in ranges.ranges() {
        insert.execute(params![
            key.vm_id,
            key.name,
            r.offset as i64,
            r.length as i64,
            r.policy.mode.as_str(),
            r.policy.nodes.to_string(),
            r.policy.static_nodes as i64,
            r.policy.relative_nodes as i64,
            r.placed as i64,
        ])?;
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
        // Recovery appends thousands in one job.
        let n = 300;
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

    fn meta(key: &str) -> WriteOp {
        WriteOp::InitMeta {
            key: key.into(),
            value: vec![1],
        }
    }

    fn request(id: &str) -> WriteOp {
        WriteOp::SaveRequest {
            request_id: id.into(),
            method: "SetPolicy",
            fingerprint: vec![1],
            response: vec![2],
        }
    }

    fn job(ops: Vec<WriteOp>) -> Job {
        Job {
            ops,
            reply: oneshot::channel().0,
        }
    }

    /// One batch, run by the writer's own function on a connection of its own: each job's error
    /// undoes only that job, and the jobs around it commit.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_failing_job_undoes_only_its_own_savepoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path, Duration::from_secs(1)).await.unwrap();
        let conn = open_writer(&path, Duration::from_secs(1)).unwrap();
        // A commit is durable when COMMIT returns (FULL = 2), and ranges follow their region.
        let pragma = |name: &str| -> i64 {
            conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(pragma("synchronous"), 2);
        assert_eq!(pragma("foreign_keys"), 1);
        let unknown = RegionKey::parse("vm", "r").unwrap();
        let jobs = vec![
            job(vec![meta("a")]),
            job(vec![request("x")]),
            // The same request id again: a conflict, and its first op is undone with it.
            job(vec![meta("c"), request("x")]),
            // A region that is not stored.
            job(vec![
                meta("d"),
                WriteOp::SaveRanges {
                    key: unknown,
                    generation: 2,
                    ranges: RangeMap::new(4096),
                },
            ]),
            job(vec![meta("e")]),
        ];
        let results = commit_batch(&conn, &jobs);
        assert_eq!(results.len(), 5);
        assert!(results[0].is_ok() && results[1].is_ok() && results[4].is_ok());
        assert!(
            matches!(results[2], Err(StoreError::Conflict)),
            "{:?}",
            results[2]
        );
        assert!(
            matches!(results[3], Err(StoreError::Corrupt(_))),
            "{:?}",
            results[3]
        );
        for (key, stored) in [("a", true), ("c", false), ("d", false), ("e", true)] {
            assert_eq!(
                store.meta(key).await.unwrap().is_some(),
                stored,
                "meta {key}"
            );
        }
        assert_eq!(store.counts().await.unwrap().0, 1, "one request record");
    }

    /// An SQL error other than a job's own conflict fails every job of the batch, those before it
    /// included, and nothing of the batch is written.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_sql_error_fails_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path, Duration::from_secs(1)).await.unwrap();
        let conn = open_writer(&path, Duration::from_secs(1)).unwrap();
        conn.execute_batch(
            "INSERT INTO regions (vm_id, name, uid, backend, size_bytes, generation, strategy, created_unix, status, origin) \
             VALUES ('vm', 'r', 'u', 'memfd', 4096, 1, 'shared-policy', 0, 'active', 'agent')",
        )
        .unwrap();
        let key = RegionKey::parse("vm", "r").unwrap();
        let jobs = vec![
            job(vec![meta("a"), request("x")]),
            // Generation 0 breaks the table's CHECK: not this job's own conflict.
            job(vec![WriteOp::SaveRanges {
                key,
                generation: 0,
                ranges: RangeMap::new(4096),
            }]),
            job(vec![meta("c")]),
        ];
        let results = commit_batch(&conn, &jobs);
        assert_eq!(results.len(), 3);
        assert!(
            results.iter().all(|r| matches!(r, Err(StoreError::Sql(_)))),
            "{results:?}"
        );
        for key in ["a", "c"] {
            assert!(store.meta(key).await.unwrap().is_none(), "meta {key}");
        }
        assert_eq!(store.counts().await.unwrap().0, 0, "no request record");
        // The connection is usable again: the next batch commits.
        assert!(commit_batch(&conn, &[job(vec![meta("f")])])[0].is_ok());
        assert!(store.meta("f").await.unwrap().is_some());
    }

    /// A lock another connection holds past the busy timeout fails every job, and they are
    /// answered `Locked`.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_held_lock_fails_every_job_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path, Duration::from_secs(1)).await.unwrap();
        let conn = open_writer(&path, Duration::from_millis(50)).unwrap();
        let other = open_writer(&path, Duration::from_millis(50)).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let jobs = vec![job(vec![meta("a")]), job(vec![meta("b")])];
        let results = commit_batch(&conn, &jobs);
        assert!(
            results.iter().all(|r| matches!(r, Err(StoreError::Locked))),
            "{results:?}"
        );
        other.execute_batch("ROLLBACK").unwrap();
        assert!(store.meta("a").await.unwrap().is_none());
    }

    /// A run of holder updates in one job (a restart recreates a file per region): every region gets
    /// its own holder and file identity, a region named twice in the run gets the later one (as
    /// one statement each would give), and a region not stored is left out, as before.
    #[tokio::test(flavor = "multi_thread")]
    async fn holder_updates_in_one_job_each_reach_their_region() {
        use crate::domain::{Backend, Holder, RegionStatus, Strategy};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), Duration::from_secs(1))
            .await
            .unwrap();
        let n = 266;
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
                    origin: crate::domain::Origin::Agent,
                    guest_cell: None,
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
