//! A region the agent made, after the processes holding it exit (the agent learns each exit from
//! a pidfd): while another process still has the file open that one becomes the holder; when the
//! last one is gone the memory is kept for `release_agent_regions_after` (for a VMM that
//! restarts) and then given back, or kept until deleted with `keep`. The holders are real
//! `memplacectl hold` processes that acquire the file on the handoff socket and touch its pages.
//! (A file a VMM made is released at once: vmm_attach.rs, with QEMU.)

mod common;

use common::events::stored_events;
use common::holder::HolderProc;
use common::procfs::{memfd_allocated_bytes, node_meminfo};
use common::{AgentProc, MIB, ctl_path, policy, whole};
use memplace_client::{Client, pb};
use std::process::Command;
use std::time::{Duration, Instant};

const SIZE: u64 = 32 * MIB;

/// `memplacectl hold VM NAME` touching the whole region.
fn hold(agent: &AgentProc, name: &str, token: &str) -> HolderProc {
    let mut cmd = Command::new(ctl_path());
    cmd.args(["hold", "vm1", name, "--token", token, "--handoff-socket"])
        .arg(agent.handoff_socket())
        .args(["--touch", "32M", "--pattern", "5"]);
    let mut h = HolderProc::spawn(cmd);
    h.expect_line("holding ");
    h
}

async fn create(c: &mut Client, name: &str) -> String {
    c.create_region(
        "vm1",
        name,
        SIZE,
        pb::Backend::Memfd,
        whole(policy(pb::PolicyMode::Bind, &[0])),
    )
    .await
    .unwrap()
    .handoff_token
}

/// Waits (at most 30 s) until an event of `kind` on region `name` whose message contains `text`
/// is stored; returns its message.
async fn wait_event(c: &mut Client, name: &str, kind: pb::EventKind, text: &str) -> String {
    let t = Instant::now();
    loop {
        let evs = stored_events(c, "vm1", 0).await;
        if let Some(e) = evs
            .iter()
            .find(|e| e.kind() == kind && e.name == name && e.message.contains(text))
        {
            return e.message.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no {kind:?} event on {name} saying {text:?} within 30 s: {evs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_holder_gone_an_agent_region_is_released_after_the_keep_time() {
    let agent = AgentProc::start_with(&["--release-agent-regions-after", "1"]);
    let mut c = agent.client().await;
    let token = create(&mut c, "ram").await;
    let r = c.get_region("vm1", "ram").await.unwrap();
    assert_eq!(r.origin(), pb::RegionOrigin::Agent, "{r:?}");
    let mut first = hold(&agent, "ram", &token);
    let mut second = hold(&agent, "ram", &token);
    let r = c.get_region("vm1", "ram").await.unwrap();
    assert_eq!(r.holder_pid, second.pid(), "{r:?}");
    assert_eq!(memfd_allocated_bytes(agent.pid(), "vm1", "ram"), SIZE);

    // The recorded holder exits while another process still has the file: that one holds it now.
    let second_pid = second.pid();
    second.kill();
    let m = wait_event(
        &mut c,
        "ram",
        pb::EventKind::HolderLost,
        &format!("pid {second_pid} exited; pid {} still holds", first.pid()),
    )
    .await;
    let r = c.get_region("vm1", "ram").await.unwrap();
    assert_eq!(r.holder_pid, first.pid(), "{m}: {r:?}");
    assert_eq!(r.status(), pb::RegionStatus::Active, "{r:?}");

    // The last holder exits: kept one second for a VMM that restarts, then given back.
    let shmem = node_meminfo("Shmem");
    let first_pid = first.pid();
    first.kill();
    wait_event(
        &mut c,
        "ram",
        pb::EventKind::HolderLost,
        &format!("pid {first_pid} exited; the agent keeps the memory 1 s"),
    )
    .await;
    let m = wait_event(&mut c, "ram", pb::EventKind::RegionReleased, "given back").await;
    let r = c.get_region("vm1", "ram").await.unwrap();
    assert_eq!(r.status(), pb::RegionStatus::Released, "{m}: {r:?}");
    let agent_memfds = common::procfs::fds_like(agent.pid() as i32, "memplace:vm1/ram");
    assert!(agent_memfds.is_empty(), "{agent_memfds:?}");
    let freed = shmem.saturating_sub(node_meminfo("Shmem"));
    assert!(
        freed + 2 * MIB >= SIZE,
        "the nodes' Shmem dropped by {freed} bytes, not by the region's {SIZE}"
    );
    let e = c
        .set_policy(
            "vm1",
            "ram",
            0,
            0,
            policy(pb::PolicyMode::Preferred, &[0]),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::FailedPrecondition), "{e:?}");
    c.delete_region("vm1", "ram").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_keep_an_agent_region_outlives_its_last_holder() {
    let agent = AgentProc::start_with(&["--release-agent-regions-after", "keep"]);
    let mut c = agent.client().await;
    let token = create(&mut c, "ram").await;
    let mut h = hold(&agent, "ram", &token);
    let pid = h.pid();
    h.kill();
    wait_event(
        &mut c,
        "ram",
        pb::EventKind::HolderLost,
        &format!("pid {pid} exited; the agent keeps the memory for a VMM that acquires it again (release_agent_regions_after = keep)"),
    )
    .await;
    let r = c.get_region("vm1", "ram").await.unwrap();
    assert_eq!(r.status(), pb::RegionStatus::Active, "{r:?}");
    // The guest's data is still there for the next VMM: every page the holder touched.
    assert_eq!(memfd_allocated_bytes(agent.pid(), "vm1", "ram"), SIZE);
    let mut again = hold(&agent, "ram", &token);
    let r = c.get_region("vm1", "ram").await.unwrap();
    assert_eq!(r.holder_pid, again.pid(), "{r:?}");
    again.kill();
}
