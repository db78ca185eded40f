//! Durable state in SQLite: the intent of every region, idempotency records and the event log.
//! The only code that touches SQLite, all of it through sqlx.
//!
//! Writes go through one writer (a task on a thread of its own) that owns the write connection. It takes every job waiting
//! in its queue (up to `MAX_BATCH`), runs each in its own savepoint inside one transaction,
//! commits once (WAL, `synchronous=FULL`), and only then answers each job: group commit. A job's
//! failure rolls back only its savepoint; any other failure, the commit's included, fails every
//! job of the batch. No caller learns of success before its data is on disk. Opening (integrity
//! check, migrations) and every read go through a pool of read-only connections.

use crate::domain::{Event, EventKind, Holder, RangeMap, RegionIntent, RegionKey, RegionStatus};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

mod prune;
mod rows;
mod writer;

pub use prune::Retention;
use prune::id_hash;

use rows::{ranges_from_json, region_from_row};
use writer::start_writer;

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
    commit_observer: Option<CommitObserver>,
    known_requests: KnownRequests,
    retention: Retention,
}

/// Digests of every request id in the `requests` table or with a tombstone in
/// `pruned_requests`, kept beside them so that the idempotency look-up every mutation makes
/// costs no database read for a new id (almost every request). The writer adds a committed job's
/// ids before it answers the job, and removes an id only after the commit that removed its
/// tombstone, so the set is bounded by the two retention counts. A digest collision only costs
/// the read it would have made anyway (counts keep colliding ids apart).
#[derive(Clone, Debug, Default)]
struct KnownRequests(Arc<Mutex<HashMap<i64, u32>>>);

impl KnownRequests {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, u32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn insert_hash(&self, h: i64) {
        *self.lock().entry(h).or_insert(0) += 1;
    }
    fn insert(&self, request_id: &str) {
        self.insert_hash(id_hash(request_id));
    }
    /// Forgets one id per digest (its tombstone was pruned).
    fn forget(&self, hashes: &[i64]) {
        let mut m = self.lock();
        for h in hashes {
            if let Some(n) = m.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    m.remove(h);
                }
            }
        }
        // Give memory back after a burst (the map never shrinks by itself).
        if m.capacity() > 1024 && m.capacity() > 4 * m.len() {
            let keep = 2 * m.len();
            m.shrink_to(keep);
        }
    }
    fn may_contain(&self, request_id: &str) -> bool {
        self.lock().contains_key(&id_hash(request_id))
    }
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// What the idempotency look-up knows of a request id.
#[derive(Clone, Debug)]
pub enum RequestLookup {
    /// Never seen, or forgotten past its tombstone's retention: a new request.
    Unknown,
    /// Answered before; the record holds the first answer.
    Answered(StoredRequest),
    /// Answered before, but the record was pruned: the answer is gone and the request must not
    /// run again.
    Pruned,
}

/// Called with (commit latency, jobs in the batch) after each commit.
#[derive(Clone)]
struct CommitObserver(Arc<dyn Fn(Duration, usize) + Send + Sync>);

impl std::fmt::Debug for CommitObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitObserver")
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
        Self::open_with(path, busy, Retention::default()).await
    }

    /// [`Store::open`] with request records kept as `retention` says.
    pub async fn open_with(
        path: &Path,
        busy: Duration,
        retention: Retention,
    ) -> Result<Self, StoreError> {
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
        let tombstones: Vec<i64> = sqlx::query_scalar("SELECT id_hash FROM pruned_requests")
            .fetch_all(&mut conn)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        for h in tombstones {
            known_requests.insert_hash(h);
        }
        // The writer opens its own connection; this one is done.
        conn.close().await.map_err(|e| open_err(e.to_string()))?;
        let (tx, rx) = mpsc::channel(1024);
        start_writer(path, busy, rx, known_requests.clone(), retention)
            .await
            .map_err(open_err)?;
        writer::start_prune_ticker(&tx);
        Ok(Self {
            readers,
            writer: tx,
            path: path.to_path_buf(),
            commit_observer: None,
            known_requests,
            retention,
        })
    }

    /// Calls `f(commit latency, jobs in the batch)` after each commit.
    pub fn set_commit_observer(&mut self, f: impl Fn(Duration, usize) + Send + Sync + 'static) {
        self.commit_observer = Some(CommitObserver(Arc::new(f)));
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
        if let Some(f) = &self.commit_observer {
            (f.0)(start.elapsed(), 1);
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
        use tokio_stream::StreamExt;
        self.stream_regions().collect().await
    }

    /// [`Store::load_regions`] one region at a time, in the same order, as SQLite reads them: a
    /// restart starts on the first regions while the rest load.
    pub fn stream_regions(
        &self,
    ) -> impl tokio_stream::Stream<Item = Result<RegionIntent, StoreError>> + Send + '_ {
        use tokio_stream::StreamExt;
        sqlx::query(
            "SELECT r.*, (SELECT json_group_array(json_array(g.offset_bytes, g.length_bytes, g.mode, g.nodes, g.static_nodes, g.relative_nodes, g.placed)) FROM ranges g WHERE g.vm_id = r.vm_id AND g.name = r.name) AS ranges_json FROM regions r ORDER BY r.vm_id, r.name",
        )
        .fetch(&self.readers)
        .map(|row| {
            let row = row?;
            let (vm_id, name): (String, String) = (row.try_get("vm_id")?, row.try_get("name")?);
            let key = RegionKey::parse(&vm_id, &name)
                .map_err(|e| StoreError::Corrupt(format!("region {vm_id}/{name}: {e}")))?;
            let json: String = row.try_get("ranges_json")?;
            let ranges = ranges_from_json(&json)
                .map_err(|e| StoreError::Corrupt(format!("region {key}: ranges: {e}")))?;
            region_from_row(&row, key, ranges)
        })
    }

    /// How long and how many request records are kept.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Request ids the store remembers (records and tombstones): what its in-memory set holds.
    pub fn known_request_count(&self) -> usize {
        self.known_requests.len()
    }

    /// What is known of `request_id`: its record, a tombstone, or nothing.
    pub async fn lookup_request(&self, request_id: &str) -> Result<RequestLookup, StoreError> {
        if let Some(r) = self.request(request_id).await? {
            return Ok(RequestLookup::Answered(r));
        }
        if !self.known_requests.may_contain(request_id) {
            return Ok(RequestLookup::Unknown);
        }
        let tomb: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM pruned_requests WHERE id_hash = ? LIMIT 1")
                .bind(id_hash(request_id))
                .fetch_optional(&self.readers)
                .await?;
        Ok(match tomb {
            Some(_) => RequestLookup::Pruned,
            None => RequestLookup::Unknown,
        })
    }

    /// The idempotency record of `request_id`, if it is still kept.
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
