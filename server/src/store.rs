//! Durable state in SQLite: the intent of every region, idempotency records and the event log.
//! The only code that touches sqlx.
//!
//! Writes go through one writer task that owns the write connection. It takes every job waiting
//! in its queue, runs each in its own savepoint inside one transaction, commits once (WAL,
//! `synchronous=FULL`), and only then answers each job: group commit. A job's failure rolls back
//! only its savepoint. No caller learns of success before its data is on disk.

use crate::domain::{
    Backend, Event, EventKind, Holder, NodeSet, Policy, PolicyMode, RangeIntent, RangeMap,
    RegionIntent, RegionKey, RegionStatus, Strategy,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool};
use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Events kept in the log; older ones are dropped.
pub const EVENT_LOG_LIMIT: i64 = 10_000;
/// Jobs taken into one transaction at most.
const MAX_BATCH: usize = 256;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // Variant fields are described by the variant's message.
pub enum StoreError {
    /// The database could not be opened or checked.
    #[error("state database {path} cannot be used: {reason}")]
    Open { path: PathBuf, reason: String },
    /// Another process holds the database lock past the busy timeout.
    #[error("state database is locked by another process")]
    Locked,
    /// The disk is full.
    #[error("state database disk is full")]
    Full,
    /// Any other database error.
    #[error("state database error: {0}")]
    Sql(String),
    /// A row violates a rule of the schema.
    #[error("stored row is invalid: {0}")]
    Corrupt(String),
    /// The writer task has stopped.
    #[error("state writer is not running")]
    WriterGone,
    /// A unique key already exists.
    #[error("already exists")]
    Conflict,
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            let code = db.code().unwrap_or_default();
            // SQLite primary result codes: 5 BUSY, 6 LOCKED, 13 FULL; 1555/2067 unique violations.
            let primary = code.parse::<i32>().unwrap_or(0) & 0xff;
            return match primary {
                5 | 6 => StoreError::Locked,
                13 => StoreError::Full,
                19 if db.is_unique_violation() => StoreError::Conflict,
                _ => StoreError::Sql(db.message().to_string()),
            };
        }
        StoreError::Sql(e.to_string())
    }
}

/// One change to durable state.
#[derive(Clone, Debug)]
pub enum WriteOp {
    /// Insert a new region with its ranges.
    InsertRegion(RegionIntent),
    /// Replace a region's ranges and generation.
    SaveRanges {
        /// The region.
        key: RegionKey,
        /// Its new generation.
        generation: u64,
        /// Its ranges.
        ranges: RangeMap,
    },
    /// Delete a region and its ranges.
    DeleteRegion(RegionKey),
    /// Record the holder and file identity of a region.
    SaveHolder {
        /// The region.
        key: RegionKey,
        /// The holder.
        holder: Option<Holder>,
        /// (st_dev, st_ino) of the file.
        file_id: Option<(u64, u64)>,
    },
    /// Set a region's status.
    SaveStatus(RegionKey, RegionStatus),
    /// Record the first answer to a request id.
    SaveRequest {
        /// The id.
        request_id: String,
        /// The method.
        method: &'static str,
        /// A digest of the request, to spot an id reused for a different request.
        fingerprint: Vec<u8>,
        /// The encoded response.
        response: Vec<u8>,
    },
    /// Append an event (its sequence is returned).
    AppendEvent(Event),
    /// Set a meta value unless it is already set.
    InitMeta {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
}

struct Job {
    ops: Vec<WriteOp>,
    reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
}

/// Commit statistics, for metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitStats {
    /// Transactions committed.
    pub commits: u64,
    /// Jobs committed.
    pub jobs: u64,
}

/// The state database.
#[derive(Clone, Debug)]
pub struct Store {
    readers: SqlitePool,
    writer: mpsc::Sender<Job>,
    path: PathBuf,
    commit_observer: Option<fn(Duration, usize)>,
    known_requests: KnownRequests,
}

/// Hashes of every request id in the `requests` table, kept beside it so that the idempotency
/// look-up every mutation makes costs no database read for a new id (almost every request). The
/// writer adds a committed job's ids before it answers the job; a hash collision only costs the
/// read it would have made anyway.
#[derive(Clone, Debug, Default)]
struct KnownRequests(Arc<Mutex<HashSet<u64>>>);

impl KnownRequests {
    fn hash(request_id: &str) -> u64 {
        let mut h = DefaultHasher::new();
        request_id.hash(&mut h);
        h.finish()
    }
    fn insert(&self, request_id: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Self::hash(request_id));
    }
    fn may_contain(&self, request_id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&Self::hash(request_id))
    }
}

/// A stored idempotency record.
#[derive(Clone, Debug)]
pub struct StoredRequest {
    /// The method it was for.
    pub method: String,
    /// The request digest.
    pub fingerprint: Vec<u8>,
    /// The encoded first response.
    pub response: Vec<u8>,
}

fn options(path: &Path, busy: Duration) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(busy)
}

impl Store {
    /// Opens (creating if absent) the database at `path`, checks its integrity, applies the
    /// embedded migrations, and refuses a database written by a newer memplace. A file that is not
    /// a healthy SQLite database is never overwritten.
    pub async fn open(path: &Path, busy: Duration) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.to_path_buf(),
            reason,
        };
        let mut conn = SqliteConnection::connect_with(&options(path, busy).create_if_missing(true))
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let check: String = sqlx::query_scalar("PRAGMA quick_check")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        if check != "ok" {
            return Err(open_err(format!("integrity check failed: {check}")));
        }
        let migrator = sqlx::migrate!("../migrations");
        let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        if let Some(applied) = applied_schema_version(&mut conn)
            .await
            .map_err(|e| open_err(e.to_string()))?
            && applied > known
        {
            return Err(open_err(format!(
                "it has schema version {applied}, newer than this memplace knows ({known}): \
                 run the memplace that wrote it, or restore a backup; the file was not changed"
            )));
        }
        migrator
            .run(&mut conn)
            .await
            .map_err(|e| open_err(format!("schema migration: {e}")))?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options(path, busy).read_only(true))
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let known_requests = KnownRequests::default();
        let ids: Vec<String> = sqlx::query_scalar("SELECT request_id FROM requests")
            .fetch_all(&mut conn)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        for id in &ids {
            known_requests.insert(id);
        }
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(writer_loop(conn, rx, known_requests.clone()));
        Ok(Self {
            readers,
            writer: tx,
            path: path.to_path_buf(),
            commit_observer: None,
            known_requests,
        })
    }

    /// Calls `f(commit latency, jobs in the batch)` after each commit.
    pub fn set_commit_observer(&mut self, f: fn(Duration, usize)) {
        self.commit_observer = Some(f);
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits `ops` atomically (all or nothing) and returns the sequence numbers of any events
    /// appended, in order. Returns only after the commit is durable.
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<Vec<u64>, StoreError> {
        let (reply, rx) = oneshot::channel();
        let start = Instant::now();
        self.writer
            .send(Job { ops, reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        let r = rx.await.map_err(|_| StoreError::WriterGone)?;
        if let Some(f) = self.commit_observer {
            f(start.elapsed(), 1);
        }
        r
    }

    /// A value of the meta table, set to `init()` first if absent.
    pub async fn meta_or_init(
        &self,
        key: &str,
        init: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        if let Some(v) = self.meta(key).await? {
            return Ok(v);
        }
        let value = init();
        self.write(vec![WriteOp::InitMeta {
            key: key.to_string(),
            value: value.clone(),
        }])
        .await?;
        Ok(self.meta(key).await?.unwrap_or(value))
    }

    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.readers)
            .await?)
    }

    /// Every region with its ranges. Each region's ranges come aggregated into one JSON column:
    /// a row per range (16,000 for 1,000 regions) made loading most of a restart's time, as each
    /// row is a message from sqlx's SQLite thread.
    pub async fn load_regions(&self) -> Result<Vec<RegionIntent>, StoreError> {
        let rows = sqlx::query(
            "SELECT r.*, (SELECT json_group_array(json_array(g.offset_bytes, g.length_bytes, g.mode, g.nodes, g.static_nodes, g.relative_nodes, g.placed)) FROM ranges g WHERE g.vm_id = r.vm_id AND g.name = r.name) AS ranges_json FROM regions r ORDER BY r.vm_id, r.name",
        )
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|row| {
                let key = RegionKey {
                    vm_id: row.try_get("vm_id")?,
                    name: row.try_get("name")?,
                };
                let json: String = row.try_get("ranges_json")?;
                let ranges = ranges_from_json(&json)
                    .map_err(|e| StoreError::Corrupt(format!("region {key}: ranges: {e}")))?;
                region_from_row(row, key, ranges)
            })
            .collect()
    }

    /// The idempotency record of `request_id`.
    pub async fn request(&self, request_id: &str) -> Result<Option<StoredRequest>, StoreError> {
        if !self.known_requests.may_contain(request_id) {
            return Ok(None);
        }
        let row =
            sqlx::query("SELECT method, fingerprint, response FROM requests WHERE request_id = ?")
                .bind(request_id)
                .fetch_optional(&self.readers)
                .await?;
        row.map(|r| {
            Ok(StoredRequest {
                method: r.try_get("method")?,
                fingerprint: r.try_get("fingerprint")?,
                response: r.try_get("response")?,
            })
        })
        .transpose()
    }

    /// Events after `after`, optionally of one VM, oldest first, at most `limit`.
    pub async fn events_after(
        &self,
        after: u64,
        vm_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM events WHERE sequence > ? AND (? IS NULL OR vm_id = ?) ORDER BY sequence LIMIT ?",
        )
        .bind(after as i64)
        .bind(vm_id)
        .bind(vm_id)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|r| {
                let kind: i64 = r.try_get("kind")?;
                Ok(Event {
                    sequence: r.try_get::<i64, _>("sequence")? as u64,
                    time_unix_ms: r.try_get("time_unix_ms")?,
                    kind: EventKind::from_i32(kind as i32)
                        .ok_or_else(|| StoreError::Corrupt(format!("event kind {kind}")))?,
                    vm_id: r.try_get("vm_id")?,
                    name: r.try_get("name")?,
                    message: r.try_get("message")?,
                    actor: r.try_get("actor")?,
                })
            })
            .collect()
    }

    /// Number of request records, regions and ranges: used by tests to prove "nothing changed".
    pub async fn counts(&self) -> Result<(i64, i64, i64), StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM requests), (SELECT count(*) FROM regions), (SELECT count(*) FROM ranges)",
        )
        .fetch_one(&self.readers)
        .await?;
        Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
    }
}

/// The highest migration recorded in the database, if it has the migrations table.
async fn applied_schema_version(conn: &mut SqliteConnection) -> Result<Option<i64>, sqlx::Error> {
    let has_table: Option<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
    )
    .fetch_optional(&mut *conn)
    .await?;
    if has_table.is_none() {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(&mut *conn)
        .await
}

fn region_from_row(
    row: &sqlx::sqlite::SqliteRow,
    key: RegionKey,
    ranges: Vec<RangeIntent>,
) -> Result<RegionIntent, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("region {key}: {what}"));
    let backend: String = row.try_get("backend")?;
    let strategy: String = row.try_get("strategy")?;
    let status: String = row.try_get("status")?;
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
        status: if status == "lost" {
            RegionStatus::Lost
        } else {
            RegionStatus::Active
        },
        holder,
        file_id,
        adopted: row.try_get::<i64, _>("adopted")? != 0,
        key,
    })
}

/// A stored range as `load_regions` aggregates it: offset, length, mode, nodes, static_nodes,
/// relative_nodes, placed.
type RangeColumns = (i64, i64, String, String, i64, i64, i64);

/// A region's ranges from their JSON aggregate, in offset order.
fn ranges_from_json(json: &str) -> Result<Vec<RangeIntent>, String> {
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

async fn writer_loop(
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
            WriteOp::SaveHolder {
                key,
                holder,
                file_id,
            } => {
                sqlx::query(
                    "UPDATE regions SET holder_pid = ?, holder_start_time = ?, file_dev = ?, file_ino = ? WHERE vm_id = ? AND name = ?",
                )
                .bind(holder.map(|h| h.pid as i64))
                .bind(holder.map(|h| h.start_time as i64))
                .bind(file_id.map(|f| f.0 as i64))
                .bind(file_id.map(|f| f.1 as i64))
                .bind(&key.vm_id)
                .bind(&key.name)
                .execute(&mut *conn)
                .await?;
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

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
}
