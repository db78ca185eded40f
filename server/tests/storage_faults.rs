//! The state database failing under the real agent: a full disk during a SetPolicy commit (a
//! tiny tmpfs as the state dir), a lock held by another process (the sqlite3 CLI inside
//! `BEGIN EXCLUSIVE`), a corrupt file at start, and a schema from a newer memplace. Each must
//! leave the intent whole, the kernel unchanged, the file untouched, and say what is wrong.

mod common;

use common::sqlite::{self, Locker};
use common::{AgentProc, MIB, policy};
use memplace_client::pb::{self, PolicyMode as M};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use tonic::Code;

/// A tmpfs mounted on a directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount_on(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "mounting a tmpfs needs root (this test runs as root in CI)"
        );
        Self { dir }
    }
    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Fills the filesystem of `dir` until writes fail with ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", p.display()),
        }
    }
    // Whatever partial page is left.
    loop {
        match f.write(&[0u8; 512]) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = f.sync_all();
    p
}

/// (request records, regions, ranges), read by the sqlite3 CLI.
fn counts(db: &Path) -> String {
    sqlite::query(
        db,
        &[],
        "SELECT (SELECT count(*) FROM requests), (SELECT count(*) FROM regions), (SELECT count(*) FROM ranges), (SELECT group_concat(generation) FROM regions);",
    )
}

fn ranges_of(r: &pb::Region) -> Vec<(u64, u64, Option<pb::Policy>, Option<pb::Policy>)> {
    r.ranges
        .iter()
        .map(|x| (x.offset, x.length, x.intended.clone(), x.observed.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_the_commit_and_changes_nothing() {
    // The agent's own state dir is the tmpfs.
    let mut agent = AgentProc {
        child: None,
        dir: tempfile::tempdir().unwrap(),
        extra: vec![],
    };
    let fs = Tmpfs::mount_on(agent.state_dir(), "2m");
    let dir = fs.path().to_path_buf();
    agent.spawn();
    let db = agent.state_dir().join("memplace.db");
    let mut c = agent.client().await;
    c.retries = 0;
    c.create_region("vm1", "ram0", 16 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    c.set_policy("vm1", "ram0", 0, 0, policy(M::Bind, &[0]), false)
        .await
        .unwrap();

    let filler = fill(&dir);
    // The WAL may still have room from earlier commits; each SetPolicy appends to it, so keep
    // going (splitting the region so every commit writes more) until the disk refuses one.
    let modes = [M::Preferred, M::Interleave, M::Bind];
    let mut refused = None;
    let mut last_ok = c.get_region("vm1", "ram0").await.unwrap();
    for i in 0..200u64 {
        let before = c.get_region("vm1", "ram0").await.unwrap();
        let db_before = counts(&db);
        let off = (i % 16) * MIB;
        let r = c
            .set_policy(
                "vm1",
                "ram0",
                off,
                MIB,
                policy(modes[i as usize % 3], &[0]),
                false,
            )
            .await;
        match r {
            Ok(resp) => last_ok = resp.region.unwrap(),
            Err(e) => {
                refused = Some((e, before, db_before));
                break;
            }
        }
    }
    let (err, before, db_before) = refused.expect("the full disk never refused a SetPolicy");
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("disk is full"), "{err}");
    // Not half-written: intent, generation and the kernel's policy are as before the refusal.
    let after = c.get_region("vm1", "ram0").await.unwrap();
    assert_eq!(after.generation, before.generation);
    assert_eq!(ranges_of(&after), ranges_of(&before));
    assert_eq!(after.generation, last_ok.generation);
    assert_eq!(counts(&db), db_before);
    // Reads keep being served while the disk is full.
    c.node_info().await.unwrap();
    assert_eq!(c.list_regions("").await.unwrap().len(), 1);
    c.placement("vm1", "ram0", 0, 0).await.unwrap();

    // Space again: writes work again, and the agent never restarted.
    std::fs::remove_file(filler).unwrap();
    let r = c
        .set_policy("vm1", "ram0", 0, 0, policy(M::Interleave, &[0]), false)
        .await
        .unwrap()
        .region
        .unwrap();
    assert_eq!(r.generation, before.generation + 1);
    assert!(
        r.ranges
            .iter()
            .all(|x| x.observed.as_ref().map(|p| p.mode) == Some(M::Interleave as i32)),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_locked_database_waits_a_bounded_time_then_answers_unavailable() {
    let agent = AgentProc::start();
    let db = agent.state_dir().join("memplace.db");
    let mut c = agent.client().await;
    c.retries = 0;
    let token = c
        .create_region("vm1", "ram0", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap()
        .handoff_token;
    let before = c.get_region("vm1", "ram0").await.unwrap();
    let db_before = counts(&db);
    {
        let _lock = Locker::hold(&db);
        let err = c
            .set_policy("vm1", "ram0", 0, 0, policy(M::Preferred, &[0]), false)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
        assert!(err.to_string().contains("locked"), "{err}");
        let err = c
            .create_region("vm2", "ram0", 4 * MIB, pb::Backend::Memfd, vec![])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
        // The handoff socket answers the same failure with the same code (an acquire records
        // its holder, a write).
        let h = memplace_client::handoff::Handoff::connect(agent.handoff_socket()).unwrap();
        let err = h.acquire("vm1", "ram0", &token).unwrap_err().to_string();
        assert!(err.contains("HANDOFF_CODE_UNAVAILABLE: "), "{err}");
        assert!(err.contains("locked"), "{err}");
        // Reads go on (WAL readers do not wait for the writer's lock).
        let now = c.get_region("vm1", "ram0").await.unwrap();
        assert_eq!(ranges_of(&now), ranges_of(&before));
        assert_eq!(c.list_regions("").await.unwrap().len(), 1);
    }
    assert_eq!(counts(&db), db_before, "nothing was written");
    // Released: the same mutation succeeds.
    let r = c
        .set_policy("vm1", "ram0", 0, 0, policy(M::Preferred, &[0]), false)
        .await
        .unwrap()
        .region
        .unwrap();
    assert_eq!(r.generation, before.generation + 1);
    assert_eq!(c.list_regions("").await.unwrap().len(), 1);
}

/// Starts memplaced on `state` expecting it to refuse; returns its stderr.
fn start_refused(state: &Path) -> String {
    let run_dir = tempfile::tempdir().unwrap();
    let run = run_dir.path();
    let o = Command::new(env!("CARGO_BIN_EXE_memplaced"))
        .arg("--state-dir")
        .arg(state)
        .arg("--runtime-dir")
        .arg(run)
        .args(["--metrics-addr", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "memplaced started on a bad database: {err}"
    );
    assert!(
        !run.join("memplace.sock").exists(),
        "a refused start must not serve"
    );
    err
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_database_is_refused_by_name_and_never_overwritten() {
    let mut agent = AgentProc::start();
    let mut c = agent.client().await;
    for i in 0..20 {
        c.create_region(&format!("vm{i}"), "ram0", MIB, pb::Backend::Memfd, vec![])
            .await
            .unwrap();
    }
    drop(c);
    agent.kill();
    let state = agent.state_dir();
    let db = state.join("memplace.db");
    // Fold the WAL into the main file so the damage below hits live pages.
    sqlite::write(&db, &[], "PRAGMA wal_checkpoint(TRUNCATE);");

    // 1: garbage over a page in the middle of a real database.
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() >= 4 * 4096, "{} bytes", bytes.len());
    for b in &mut bytes[2 * 4096..3 * 4096] {
        *b = 0xee;
    }
    std::fs::write(&db, &bytes).unwrap();
    let err = start_refused(&state);
    assert!(err.contains(&db.display().to_string()), "{err}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        bytes,
        "the corrupt file was changed"
    );

    // 2: not a database at all.
    let junk: Vec<u8> = (0..40_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&db, &junk).unwrap();
    let _ = std::fs::remove_file(state.join("memplace.db-wal"));
    let _ = std::fs::remove_file(state.join("memplace.db-shm"));
    let err = start_refused(&state);
    assert!(err.contains(&db.display().to_string()), "{err}");
    assert!(err.contains("cannot be used"), "{err}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        junk,
        "the junk file was changed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_from_a_newer_memplace_is_refused() {
    let mut agent = AgentProc::start();
    agent.kill();
    let state = agent.state_dir();
    let db = state.join("memplace.db");
    sqlite::write(
        &db,
        &[],
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (9999, 'from the future', 1, x'00', 0); PRAGMA wal_checkpoint(TRUNCATE);",
    );
    let before = std::fs::read(&db).unwrap();
    let err = start_refused(&state);
    assert!(err.contains(&db.display().to_string()), "{err}");
    assert!(err.contains("schema version 9999"), "{err}");
    assert!(err.contains("newer than this memplace knows"), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), before);

    // Removing the future row (the operator's fix) lets it start again.
    sqlite::write(
        &db,
        &[],
        "DELETE FROM _sqlx_migrations WHERE version = 9999;",
    );
    agent.spawn();
    agent.client().await.node_info().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_its_deadline_is_cut_off_and_reconcile_converges() {
    // The lock outlasts the 1 s request deadline (the store waits up to 5 s for it).
    let agent = AgentProc::start_with(&["--request-timeout-secs", "1"]);
    let db = agent.state_dir().join("memplace.db");
    let mut c = agent.client().await;
    c.retries = 0;
    c.create_region("vm1", "ram0", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    let before = c.get_region("vm1", "ram0").await.unwrap();
    let err = {
        let _lock = Locker::hold(&db);
        c.set_policy("vm1", "ram0", 0, 0, policy(M::Interleave, &[0]), false)
            .await
            .unwrap_err()
    };
    assert!(
        matches!(err.code(), Some(Code::Cancelled | Code::DeadlineExceeded)),
        "{err}"
    );
    assert!(err.to_string().to_lowercase().contains("timeout"), "{err}");
    // Whether or not the abandoned commit landed, the region is whole and, after a reconcile,
    // the kernel follows the stored intent.
    c.reconcile("").await.unwrap();
    let after = c.get_region("vm1", "ram0").await.unwrap();
    assert!(
        after.generation == before.generation || after.generation == before.generation + 1,
        "{after:?}"
    );
    for r in &after.ranges {
        assert_eq!(r.observed, r.intended, "{after:?}");
    }
    c.node_info().await.unwrap();
}
