//! The one writer: a task on a thread and runtime of its own that owns the write connection
//! (sqlx, like every read), commits queued jobs in groups (see the module above), then answers
//! each job.
//!
//! sqlx runs each connection's statements on a thread of its own, and every query is a round trip
//! to it. So a job goes as one query of several statements (sqlx binds the arguments of each
//! statement in turn and stops at the first error): its savepoint, then every statement of its
//! operations. A batch costs one round trip per job and one for the COMMIT, not one per statement.
//! The outcome of each statement comes back in order, and the checks a job needs (its region is
//! stored, its request id was not pruned) are read from them: a failed check rolls the job's
//! savepoint back like an error would.

use super::*;
use sqlx::sqlite::{SqliteArguments, SqliteQueryResult};
use sqlx::{Arguments, Either, Executor};
use tokio_stream::StreamExt;

/// Statements the write connection keeps prepared: one per shape of job seen lately.
const STATEMENT_CACHE: usize = 128;
/// A job's operations go in queries of at most this many: a long job (recovery writes thousands)
/// repeats a few shapes instead of making one giant statement of each length.
const OPS_PER_QUERY: usize = 16;
/// Ranges inserted by one statement at most (9 arguments each).
const RANGES_PER_INSERT: usize = 64;

/// Opens the write connection and starts the writer on its thread. Returns once the connection is
/// open and set up (or failed to be).
pub(super) async fn start_writer(
    path: &Path,
    busy: Duration,
    rx: mpsc::Receiver<Job>,
    known_requests: KnownRequests,
    retention: Retention,
) -> Result<(), String> {
    let conn = open_writer(path, busy).await?;
    // Its own thread and runtime: the wake-ups from sqlx's SQLite thread land here, not on the
    // workers that serve requests.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the writer's runtime: {e}"))?;
    std::thread::Builder::new()
        .name("memplace-writer".into())
        .spawn(move || rt.block_on(writer_loop(conn, rx, known_requests, retention)))
        .map_err(|e| format!("starting the writer thread: {e}"))?;
    Ok(())
}

/// The write connection: WAL, `synchronous=FULL` (a commit is on disk when COMMIT returns),
/// foreign keys enforced, waiting up to `busy` for another process's lock.
async fn open_writer(path: &Path, busy: Duration) -> Result<SqliteConnection, String> {
    let opts = options(path, busy).statement_cache_capacity(STATEMENT_CACHE);
    let mut conn = SqliteConnection::connect_with(&opts)
        .await
        .map_err(|e| e.to_string())?;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("journal_mode is {mode}, not wal"));
    }
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
    async fn after_batch(
        &mut self,
        conn: &mut SqliteConnection,
        known: &KnownRequests,
        ticked: bool,
    ) {
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
        match prune::prune(conn, &self.retention, unix_now()).await {
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

/// Waits for a job, then takes every other job already waiting, up to [`MAX_BATCH`] in all.
/// None once every sender is gone.
async fn take_batch(rx: &mut mpsc::Receiver<Job>) -> Option<Vec<Job>> {
    let mut jobs = vec![rx.recv().await?];
    while jobs.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(j) => jobs.push(j),
            Err(_) => break,
        }
    }
    Some(jobs)
}

async fn writer_loop(
    mut conn: SqliteConnection,
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
    while let Some(jobs) = take_batch(&mut rx).await {
        let ticked = jobs.iter().any(|j| j.ops.is_empty());
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
        pruner.after_batch(&mut conn, &known_requests, ticked).await;
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
    let _ = conn.close().await;
}

/// Runs one statement without parameters (transaction and savepoint control).
pub(super) async fn exec(conn: &mut SqliteConnection, sql: &str) -> Result<(), StoreError> {
    sqlx::query(sql).execute(conn).await?;
    Ok(())
}

/// How a job's run ended, when it did not succeed.
enum Failed {
    /// The job's own error (a conflict, a region not stored): only its savepoint is undone.
    Job(StoreError),
    /// Anything else: the whole batch fails.
    Batch(StoreError),
}

/// Runs each job in a savepoint of one transaction, commits, and returns each job's outcome. If
/// the commit itself fails, every job fails: nothing of the batch is on disk.
async fn commit_batch(
    conn: &mut SqliteConnection,
    jobs: &[Job],
) -> Vec<Result<Vec<u64>, StoreError>> {
    let mut results = Vec::with_capacity(jobs.len());
    for (n, job) in jobs.iter().enumerate() {
        // The savepoint of the job before (kept, or rolled back to and empty) is released as this
        // job's opens, in the same round trip.
        let open = if n == 0 {
            "BEGIN IMMEDIATE"
        } else {
            "RELEASE job"
        };
        match run_job(conn, open, &job.ops).await {
            Ok(seqs) => results.push(Ok(seqs)),
            // The job's own error is what its caller needs; only its savepoint is undone.
            Err(Failed::Job(e)) => {
                if let Err(e) = exec(conn, "ROLLBACK TO job").await {
                    return fail_all(conn, jobs, e).await;
                }
                results.push(Err(e));
            }
            // A full disk, a lock or an I/O error (SQLite may answer these by rolling back the
            // whole transaction) fails the whole batch: the jobs before it may already be undone,
            // so none may be acknowledged.
            Err(Failed::Batch(e)) => return fail_all(conn, jobs, e).await,
        }
    }
    if let Err(e) = exec(conn, "COMMIT").await {
        return fail_all(conn, jobs, e).await;
    }
    results
}

/// Rolls the batch back and fails every job of it with `e`.
async fn fail_all(
    conn: &mut SqliteConnection,
    jobs: &[Job],
    e: StoreError,
) -> Vec<Result<Vec<u64>, StoreError>> {
    let _ = exec(conn, "ROLLBACK").await;
    jobs.iter().map(|_| Err(clone_err(&e))).collect()
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

/// What the writer reads from the outcome of one statement of a job's query.
enum Expect<'a> {
    /// Transaction or savepoint control: its failure fails the batch.
    Control,
    /// Nothing to check.
    Done,
    /// An update of this region, which must be stored (one row changed).
    Stored(&'a RegionKey),
    /// A request record, inserted unless its id has a tombstone (then a conflict).
    NotPruned,
    /// An event: its rowid is its sequence.
    Sequence,
}

/// One query of a job: several statements, their arguments in order, and what each one's outcome
/// must show.
struct Query<'a> {
    sql: String,
    args: SqliteArguments<'a>,
    expect: Vec<Expect<'a>>,
    /// An argument sqlx could not encode (none of these types can fail).
    bad_arg: Option<String>,
}

impl<'a> Query<'a> {
    fn new() -> Self {
        Self {
            sql: String::new(),
            args: SqliteArguments::default(),
            expect: Vec::new(),
            bad_arg: None,
        }
    }

    fn statement(&mut self, sql: &str, expect: Expect<'a>) -> &mut Self {
        self.sql.push_str(sql);
        self.sql.push_str(";\n");
        self.expect.push(expect);
        self
    }

    fn bind<T>(&mut self, value: T) -> &mut Self
    where
        T: sqlx::Encode<'a, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + 'a,
    {
        if let Err(e) = self.args.add(value) {
            self.bad_arg.get_or_insert(e.to_string());
        }
        self
    }

    /// Sends the query and reads every statement's outcome, adding the sequence of each event it
    /// appended to `seqs`.
    async fn run(self, conn: &mut SqliteConnection, seqs: &mut Vec<u64>) -> Result<(), Failed> {
        if let Some(e) = self.bad_arg {
            return Err(Failed::Batch(StoreError::Sql(e)));
        }
        let mut outcomes = conn.fetch_many(sqlx::query_with(&self.sql, self.args));
        let mut expect = self.expect.iter();
        let mut failed = None;
        while let Some(step) = outcomes.next().await {
            match step {
                Ok(Either::Left(done)) => {
                    let e = expect.next();
                    if failed.is_none() {
                        failed = check(e, &done, seqs);
                    }
                }
                // Rows are not asked for.
                Ok(Either::Right(_)) => {}
                Err(e) => {
                    // After a failed check the job is undone anyway: its savepoint's rollback
                    // fails the batch if SQLite ended the transaction.
                    if let Some(f) = failed {
                        return Err(Failed::Job(f));
                    }
                    let e = StoreError::from(e);
                    return Err(match (expect.next(), e) {
                        (Some(Expect::Control) | None, e) => Failed::Batch(e),
                        (_, StoreError::Conflict) => Failed::Job(StoreError::Conflict),
                        (_, e) => Failed::Batch(e),
                    });
                }
            }
        }
        failed.map_or(Ok(()), |f| Err(Failed::Job(f)))
    }
}

/// The job's own error that a statement's outcome shows, if any.
fn check(
    expect: Option<&Expect>,
    done: &SqliteQueryResult,
    seqs: &mut Vec<u64>,
) -> Option<StoreError> {
    match expect? {
        Expect::Stored(key) if done.rows_affected() != 1 => {
            Some(StoreError::Corrupt(format!("region {key} is not stored")))
        }
        // An id whose record was pruned is taken: a retry that checked before the pruning must
        // not run as new (its caller re-reads and finds the tombstone).
        Expect::NotPruned if done.rows_affected() != 1 => Some(StoreError::Conflict),
        // `sequence` is the rowid.
        Expect::Sequence => {
            seqs.push(done.last_insert_rowid() as u64);
            None
        }
        _ => None,
    }
}

/// Runs one job in its savepoint: `open` (the transaction's BEGIN, or the release of the savepoint
/// before), `SAVEPOINT job`, then every statement of its operations, a query per
/// [`OPS_PER_QUERY`] operations. The savepoint stays open for the next job (or COMMIT) to release.
async fn run_job(
    conn: &mut SqliteConnection,
    open: &str,
    ops: &[WriteOp],
) -> Result<Vec<u64>, Failed> {
    let mut seqs = Vec::new();
    let mut q = Query::new();
    q.statement(open, Expect::Control)
        .statement("SAVEPOINT job", Expect::Control);
    // An empty job (the prune ticker's) still opens its savepoint.
    let mut chunks = ops.chunks(OPS_PER_QUERY);
    let mut chunk = chunks.next().unwrap_or_default();
    loop {
        for op in chunk {
            add_op(&mut q, op);
        }
        q.run(conn, &mut seqs).await?;
        let Some(next) = chunks.next() else {
            return Ok(seqs);
        };
        chunk = next;
        q = Query::new();
    }
}

/// Adds the statements of one operation to `q`.
fn add_op<'a>(q: &mut Query<'a>, op: &'a WriteOp) {
    match op {
        WriteOp::InsertRegion(r) => {
            q.statement(
                "INSERT INTO regions (vm_id, name, uid, backend, size_bytes, hugepage_size_bytes, generation, strategy, created_unix, status, origin, holder_pid, holder_start_time, file_dev, file_ino, guest_cell) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                Expect::Done,
            )
            .bind(r.key.vm_id.as_str())
            .bind(r.key.name.as_str())
            .bind(r.uid.as_str())
            .bind(r.backend.as_str())
            .bind(r.size_bytes as i64)
            .bind(r.hugepage_size_bytes as i64)
            .bind(r.generation as i64)
            .bind(r.strategy.as_str())
            .bind(r.created_unix)
            .bind(r.status.as_str())
            .bind(r.origin.as_str())
            .bind(r.holder.map(|h| h.pid as i64))
            .bind(r.holder.map(|h| h.start_time as i64))
            .bind(r.file_id.map(|f| f.0 as i64))
            .bind(r.file_id.map(|f| f.1 as i64))
            .bind(r.guest_cell.map(i64::from));
            add_ranges(q, &r.key, &r.ranges);
        }
        WriteOp::SaveRanges {
            key,
            generation,
            ranges,
        } => {
            q.statement(
                "UPDATE regions SET generation = ? WHERE vm_id = ? AND name = ?",
                Expect::Stored(key),
            )
            .bind(*generation as i64)
            .bind(key.vm_id.as_str())
            .bind(key.name.as_str());
            q.statement(
                "DELETE FROM ranges WHERE vm_id = ? AND name = ?",
                Expect::Done,
            )
            .bind(key.vm_id.as_str())
            .bind(key.name.as_str());
            add_ranges(q, key, ranges);
        }
        WriteOp::DeleteRegion(key) => {
            q.statement(
                "DELETE FROM regions WHERE vm_id = ? AND name = ?",
                Expect::Done,
            )
            .bind(key.vm_id.as_str())
            .bind(key.name.as_str());
        }
        WriteOp::SaveHolder {
            key,
            holder,
            file_id,
        } => {
            q.statement(
                "UPDATE regions SET holder_pid = ?, holder_start_time = ?, file_dev = ?, file_ino = ? WHERE vm_id = ? AND name = ?",
                Expect::Done,
            )
            .bind(holder.map(|h| h.pid as i64))
            .bind(holder.map(|h| h.start_time as i64))
            .bind(file_id.map(|f| f.0 as i64))
            .bind(file_id.map(|f| f.1 as i64))
            .bind(key.vm_id.as_str())
            .bind(key.name.as_str());
        }
        WriteOp::SaveStatus(key, status) => {
            q.statement(
                "UPDATE regions SET status = ? WHERE vm_id = ? AND name = ?",
                Expect::Done,
            )
            .bind(status.as_str())
            .bind(key.vm_id.as_str())
            .bind(key.name.as_str());
        }
        WriteOp::SaveRequest {
            request_id,
            method,
            fingerprint,
            response,
        } => {
            q.statement(
                "INSERT INTO requests (request_id, method, fingerprint, response, created_unix) SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM pruned_requests WHERE id_hash = ?)",
                Expect::NotPruned,
            )
            .bind(request_id.as_str())
            .bind(*method)
            .bind(fingerprint.as_slice())
            .bind(response.as_slice())
            .bind(unix_now())
            .bind(id_hash(request_id));
        }
        WriteOp::InitMeta { key, value } => {
            q.statement(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                Expect::Done,
            )
            .bind(key.as_str())
            .bind(value.as_slice());
        }
        WriteOp::AppendEvent(e) => {
            q.statement(
                "INSERT INTO events (time_unix_ms, kind, vm_id, name, message, actor) VALUES (?,?,?,?,?,?)",
                Expect::Sequence,
            )
            .bind(e.time_unix_ms)
            .bind(e.kind as i32 as i64)
            .bind(e.vm_id.as_str())
            .bind(e.name.as_str())
            .bind(e.message.as_str())
            .bind(e.actor.as_str());
        }
    }
}

/// Adds a region's ranges to `q`: one statement per [`RANGES_PER_INSERT`] ranges.
fn add_ranges<'a>(q: &mut Query<'a>, key: &'a RegionKey, ranges: &'a RangeMap) {
    for chunk in ranges.ranges().chunks(RANGES_PER_INSERT) {
        let mut sql = String::from(
            "INSERT INTO ranges (vm_id, name, offset_bytes, length_bytes, mode, nodes, static_nodes, relative_nodes, placed) VALUES ",
        );
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 { "" } else { "," });
            sql.push_str("(?,?,?,?,?,?,?,?,?)");
        }
        q.statement(&sql, Expect::Done);
        for r in chunk {
            q.bind(key.vm_id.as_str())
                .bind(key.name.as_str())
                .bind(r.offset as i64)
                .bind(r.length as i64)
                .bind(r.policy.mode.as_str())
                .bind(r.policy.nodes.to_string())
                .bind(r.policy.static_nodes as i64)
                .bind(r.policy.relative_nodes as i64)
                .bind(r.placed as i64);
        }
    }
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

    /// The writer takes every job already waiting, up to [`MAX_BATCH`], into one batch.
    #[tokio::test]
    async fn a_batch_takes_every_waiting_job_up_to_the_limit() {
        let (tx, mut rx) = mpsc::channel(1024);
        for _ in 0..MAX_BATCH + 44 {
            tx.send(job(vec![meta("a")])).await.unwrap();
        }
        assert_eq!(take_batch(&mut rx).await.unwrap().len(), MAX_BATCH);
        assert_eq!(take_batch(&mut rx).await.unwrap().len(), 44);
        tx.send(job(vec![])).await.unwrap();
        assert_eq!(take_batch(&mut rx).await.unwrap().len(), 1);
        drop(tx);
        assert!(take_batch(&mut rx).await.is_none());
    }

    /// Through the running writer: jobs that queue while a batch waits for the lock are committed
    /// together in the next one, and none is answered before that commit returns. A trigger makes
    /// one job's row break a deferred foreign key, so every statement succeeds and the COMMIT
    /// itself fails: then no job of that batch is acknowledged, its neighbours included, and
    /// nothing of it is written.
    #[tokio::test(flavor = "multi_thread")]
    async fn no_job_is_answered_before_its_batch_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path, Duration::from_secs(10)).await.unwrap();
        let mut other = open_writer(&path, Duration::from_secs(10)).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE boom_parent (id INTEGER PRIMARY KEY);
             CREATE TABLE boom (parent INTEGER REFERENCES boom_parent (id) DEFERRABLE INITIALLY DEFERRED);
             CREATE TRIGGER boom_on_meta AFTER INSERT ON meta WHEN NEW.key = 'boom'
             BEGIN INSERT INTO boom VALUES (1); END;",
        )
        .execute(&mut other)
        .await
        .unwrap();
        let write = |keys: &[&str]| {
            let (store, ops) = (store.clone(), keys.iter().map(|k| meta(k)).collect());
            tokio::spawn(async move { store.write(ops).await })
        };
        // Another connection holds the write lock: the writer's first batch waits in BEGIN.
        exec(&mut other, "BEGIN IMMEDIATE").await.unwrap();
        let first = write(&["first"]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let queued = [write(&["a"]), write(&["boom"]), write(&["c"])];
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!first.is_finished() && queued.iter().all(|j| !j.is_finished()));
        exec(&mut other, "ROLLBACK").await.unwrap();
        assert!(first.await.unwrap().is_ok());
        for (j, key) in queued.into_iter().zip(["a", "boom", "c"]) {
            let r = j.await.unwrap();
            assert!(matches!(r, Err(StoreError::Sql(_))), "{key}: {r:?}");
            assert!(store.meta(key).await.unwrap().is_none(), "meta {key}");
        }
        assert!(store.meta("first").await.unwrap().is_some());
        // Alone, the failing job fails the same way; the writer goes on.
        assert!(store.write(vec![meta("boom")]).await.is_err());
        store.write(vec![meta("after")]).await.unwrap();
        assert!(store.meta("after").await.unwrap().is_some());
    }

    /// One batch, run by the writer's own function on a connection of its own: each job's error
    /// undoes only that job, and the jobs around it commit.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_failing_job_undoes_only_its_own_savepoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path, Duration::from_secs(1)).await.unwrap();
        let mut conn = open_writer(&path, Duration::from_secs(1)).await.unwrap();
        // A commit is durable when COMMIT returns (WAL, FULL = 2), ranges follow their region,
        // and another process's lock is waited for.
        for (pragma, want) in [
            ("journal_mode", "wal"),
            ("synchronous", "2"),
            ("foreign_keys", "1"),
            ("busy_timeout", "1000"),
        ] {
            let row = sqlx::query(&format!("PRAGMA {pragma}"))
                .fetch_one(&mut conn)
                .await
                .unwrap();
            let got: String = row
                .try_get::<String, _>(0)
                .or_else(|_| row.try_get::<i64, _>(0).map(|v| v.to_string()))
                .unwrap();
            assert_eq!(got, want, "PRAGMA {pragma}");
        }
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
        let results = commit_batch(&mut conn, &jobs).await;
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
        let mut conn = open_writer(&path, Duration::from_secs(1)).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO regions (vm_id, name, uid, backend, size_bytes, generation, strategy, created_unix, status, origin) \
             VALUES ('vm', 'r', 'u', 'memfd', 4096, 1, 'shared-policy', 0, 'active', 'agent')",
        )
        .execute(&mut conn)
        .await
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
        let results = commit_batch(&mut conn, &jobs).await;
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
        assert!(commit_batch(&mut conn, &[job(vec![meta("f")])]).await[0].is_ok());
        assert!(store.meta("f").await.unwrap().is_some());
    }

    /// A lock another connection holds past the busy timeout fails every job, and they are
    /// answered `Locked`.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_held_lock_fails_every_job_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path, Duration::from_secs(1)).await.unwrap();
        let mut conn = open_writer(&path, Duration::from_millis(50)).await.unwrap();
        let mut other = open_writer(&path, Duration::from_millis(50)).await.unwrap();
        exec(&mut other, "BEGIN IMMEDIATE").await.unwrap();
        let jobs = vec![job(vec![meta("a")]), job(vec![meta("b")])];
        let results = commit_batch(&mut conn, &jobs).await;
        assert!(
            results.iter().all(|r| matches!(r, Err(StoreError::Locked))),
            "{results:?}"
        );
        exec(&mut other, "ROLLBACK").await.unwrap();
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
