//! A state database written by the previous schema (migration 1: no origin, no released status,
//! no guest cell) opens in this agent: migration 2 rebuilds the regions table and keeps every
//! region and range. A region the VMM handed in (`adopted`) becomes origin ADOPT, the others
//! AGENT. The old file is made with the sqlite3 CLI from migrations/0001_init.sql, recorded as
//! applied with sqlx's checksum (SHA-384 of the file).

mod common;

use common::{AgentProc, sqlite};
use memplace_client::pb;
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn a_database_of_the_previous_schema_is_upgraded_with_its_regions() {
    let mut agent = AgentProc::start();
    agent.kill();
    let db = agent.state_dir().join("memplace.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let v1 = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/0001_init.sql");
    let o = Command::new("python3")
        .args([
            "-c",
            "import hashlib,sys; print(hashlib.sha384(open(sys.argv[1],'rb').read()).hexdigest())",
            v1,
        ])
        .output()
        .expect("python3");
    assert!(o.status.success(), "{o:?}");
    let checksum = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let schema = std::fs::read_to_string(v1).unwrap();
    sqlite::write(
        &db,
        &[],
        &format!(
            "PRAGMA foreign_keys = ON;
{schema}
             INSERT INTO regions (vm_id, name, uid, backend, size_bytes, generation, strategy, created_unix, status, adopted, holder_pid, holder_start_time, file_dev, file_ino)
               VALUES ('vm', 'handed', 'u1', 'memfd', 8192, 3, 'shared-policy', 0, 'active', 1, 2147483000, 1, 1, 1),
                      ('vm', 'made', 'u2', 'memfd', 4096, 1, 'shared-policy', 0, 'lost', 0, NULL, NULL, NULL, NULL);
             INSERT INTO ranges VALUES ('vm', 'handed', 0, 4096, 'bind', '0', 0, 0, 0),
                                       ('vm', 'handed', 4096, 4096, 'default', '', 0, 0, 0),
                                       ('vm', 'made', 0, 4096, 'preferred', '0', 0, 0, 0);
             CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
               installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL,
               checksum BLOB NOT NULL, execution_time BIGINT NOT NULL);
             INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
               VALUES (1, 'init', 1, x'{checksum}', 0);"
        ),
    );
    agent.spawn();
    let mut c = agent.client().await;
    let handed = c.get_region("vm", "handed").await.unwrap();
    assert_eq!(handed.origin(), pb::RegionOrigin::Adopt, "{handed:?}");
    // Its holder (a pid no process has) is gone, so the restart found no file: lost.
    assert_eq!(handed.status(), pb::RegionStatus::Lost, "{handed:?}");
    assert_eq!((handed.generation, handed.guest_cell), (3, None));
    let modes: Vec<_> = handed
        .ranges
        .iter()
        .map(|r| (r.offset, r.intended.as_ref().unwrap().mode()))
        .collect();
    assert_eq!(
        modes,
        [(0, pb::PolicyMode::Bind), (4096, pb::PolicyMode::Default)]
    );
    let made = c.get_region("vm", "made").await.unwrap();
    assert_eq!(made.origin(), pb::RegionOrigin::Agent, "{made:?}");
    assert_eq!(made.ranges.len(), 1);
    // Deleting a region still deletes its ranges (the rebuilt tables keep the foreign key).
    c.delete_region("vm", "handed").await.unwrap();
    let left = sqlite::query(&db, &[], "SELECT count(*) FROM ranges;");
    assert_eq!(left.trim(), "1");
}
