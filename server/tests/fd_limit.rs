//! The agent at its open-file limit: every memfd region is one fd of the agent, so RLIMIT_NOFILE
//! bounds the regions it can hold. Lowered (prlimit(1) on the running agent) to a few fds above
//! what it has open, CreateRegion must be refused with RESOURCE_EXHAUSTED, naming the limit,
//! with nothing lost or half made: the regions created before stay, the refused one exists
//! nowhere (not in the agent, not after a restart), and a region freed makes room for another.

mod common;

use common::procfs::fd_count;
use common::{AgentProc, MIB};
use memplace_client::pb;
use std::process::Command;
use tonic::Code;

/// Headroom above the fds the agent has open when the limit is lowered: enough for a few regions,
/// few enough that the loop below reaches the limit quickly.
const HEADROOM: usize = 8;

#[tokio::test(flavor = "multi_thread")]
async fn create_region_at_the_fd_limit_is_refused_and_loses_nothing() {
    let mut agent = AgentProc::start();
    let mut c = agent.client().await;
    // One region first, so the database, its WAL and the connection's fds are all open.
    c.create_region("fdvm", "r0", MIB, pb::Backend::Memfd, vec![])
        .await
        .expect("first CreateRegion");
    let limit = fd_count(agent.pid()) + HEADROOM;
    let status = Command::new("prlimit")
        .args(["--pid", &agent.pid().to_string()])
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit(1) (util-linux)");
    assert!(status.success(), "prlimit --nofile={limit} failed");

    let mut created = vec!["r0".to_string()];
    let refused = loop {
        let name = format!("r{}", created.len());
        // The limit bounds fd numbers, not the count: fds the agent opened above it before it
        // was lowered stay open, and new ones fill the free numbers below it. Either way no more
        // than `limit` regions fit.
        assert!(
            created.len() <= limit,
            "the agent created {} regions under a limit of {limit} fds: the limit never bit",
            created.len()
        );
        match c
            .create_region("fdvm", &name, MIB, pb::Backend::Memfd, vec![])
            .await
        {
            Ok(_) => created.push(name),
            Err(e) => break (name, e),
        }
    };
    let (name, e) = refused;
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("memfd_create"),
        "the refusal names the call: {msg}"
    );

    // Nothing lost, nothing half made.
    let names = |regions: &[pb::Region]| {
        let mut v: Vec<String> = regions.iter().map(|r| r.name.clone()).collect();
        v.sort();
        v
    };
    let mut want = created.clone();
    want.sort();
    let listed = c
        .list_regions("fdvm")
        .await
        .expect("ListRegions at the limit");
    assert_eq!(names(&listed), want, "regions after the refusal");
    assert!(
        listed
            .iter()
            .all(|r| r.status == pb::RegionStatus::Active as i32)
    );
    let missing = c
        .get_region("fdvm", &name)
        .await
        .expect_err("refused region");
    assert_eq!(missing.code(), Some(Code::NotFound), "{missing:?}");

    // A region deleted gives its fd back, and the next CreateRegion fits.
    let first = created.remove(0);
    c.delete_region("fdvm", &first).await.expect("DeleteRegion");
    c.create_region("fdvm", &name, MIB, pb::Backend::Memfd, vec![])
        .await
        .expect("CreateRegion after a region was deleted");
    created.push(name);

    // And after a restart (the new agent has the test's limit) exactly those regions come back.
    agent.restart();
    let mut c = agent.client().await;
    let mut want = created;
    want.sort();
    let listed = c
        .list_regions("fdvm")
        .await
        .expect("ListRegions after restart");
    assert_eq!(names(&listed), want, "regions after the restart");
    assert!(
        listed
            .iter()
            .all(|r| r.status == pb::RegionStatus::Active as i32)
    );
}
