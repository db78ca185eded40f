//! Who may act, against the real binary: Unix socket roles by SO_PEERCRED uid and gid (a client
//! really runs as another uid), the handoff socket's uid check, TCP with mTLS (certificates made
//! here with rcgen: one CA, a server certificate, named client certificates, and one from another
//! CA that must be refused), insecure TCP refused unless asked for and then warned about, the
//! audit actor on every mutation, load shedding, the message size limit, and the capabilities
//! the agent keeps.

mod common;

use common::events::stored_events;
use common::net::{free_port, wait_tcp};
use common::tls::{CertKey, ca, leaf};
use common::{AgentProc, MIB, ctl_path, policy};
use memplace_client::{Client, pb};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const NOBODY: u32 = 65534;
const VIEWER: u32 = 65533;
const GROUP_ADMIN_UID: u32 = 65532;
const ADMIN_GID: u32 = 4242;

/// Lets other uids reach the sockets: the temp dir is 0700 by default.
fn open_dirs(agent: &AgentProc) {
    for d in [agent.dir.path(), &agent.runtime_dir()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// memplacectl as `uid`/`gid` against `agent`.
fn ctl_as(agent: &AgentProc, uid: u32, gid: u32, args: &[&str]) -> Output {
    Command::new(ctl_path())
        .arg("--socket")
        .arg(agent.socket())
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .expect("running memplacectl as another uid")
}

fn code_of(o: &Output) -> i32 {
    o.status.code().expect("memplacectl exited by signal")
}

#[tokio::test(flavor = "multi_thread")]
async fn unix_socket_roles_follow_the_peer_uid_and_gid() {
    let agent = AgentProc::start_with(&[
        "--socket-mode",
        "0666",
        "--viewer-uids",
        &VIEWER.to_string(),
        "--admin-gids",
        &ADMIN_GID.to_string(),
    ]);
    open_dirs(&agent);
    let mut root = agent.client().await;
    root.create_region("vm1", "ram0", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    let before = root.list_regions("").await.unwrap();

    // Nobody: no role at all, not even to read.
    let o = ctl_as(&agent, NOBODY, NOBODY, &["region", "list"]);
    assert_eq!(code_of(&o), 10 + Code::PermissionDenied as i32, "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("uid:65534 may not use this agent"),
        "{o:?}"
    );
    let o = ctl_as(&agent, NOBODY, NOBODY, &["info"]);
    assert_eq!(code_of(&o), 10 + Code::PermissionDenied as i32, "{o:?}");

    // A viewer reads, and every mutation is refused.
    for read in [
        vec!["info"],
        vec!["region", "list"],
        vec!["region", "get", "vm1", "ram0"],
        vec!["placement", "vm1", "ram0"],
    ] {
        let o = ctl_as(&agent, VIEWER, VIEWER, &read);
        assert_eq!(code_of(&o), 0, "viewer {read:?}: {o:?}");
    }
    for write in [
        vec![
            "region",
            "create",
            "vm2",
            "ram0",
            "--size",
            "4M",
            "--backend",
            "memfd",
        ],
        vec![
            "policy", "set", "vm1", "ram0", "--mode", "bind", "--nodes", "0",
        ],
        vec!["populate", "vm1", "ram0"],
        vec!["reconcile"],
        vec!["region", "delete", "vm1", "ram0"],
    ] {
        let o = ctl_as(&agent, VIEWER, VIEWER, &write);
        assert_eq!(
            code_of(&o),
            10 + Code::PermissionDenied as i32,
            "viewer {write:?}: {o:?}"
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("viewer role"),
            "{o:?}"
        );
    }
    assert_eq!(root.list_regions("").await.unwrap(), before);

    // A uid without a role whose primary gid is an admin group may mutate.
    let o = ctl_as(
        &agent,
        GROUP_ADMIN_UID,
        ADMIN_GID,
        &[
            "region",
            "create",
            "vm3",
            "ram0",
            "--size",
            "4M",
            "--backend",
            "memfd",
        ],
    );
    assert_eq!(code_of(&o), 0, "{o:?}");
    let events = stored_events(&mut root, "", 0).await;
    let created = events
        .iter()
        .find(|e| e.vm_id == "vm3" && e.kind == pb::EventKind::RegionCreated as i32)
        .expect("vm3 created event");
    assert_eq!(created.actor, format!("uid:{GROUP_ADMIN_UID}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn default_roles_admit_root_only() {
    let agent = AgentProc::start_with(&["--socket-mode", "0666"]);
    open_dirs(&agent);
    let o = ctl_as(&agent, VIEWER, VIEWER, &["info"]);
    assert_eq!(code_of(&o), 10 + Code::PermissionDenied as i32, "{o:?}");
    let o = agent.ctl().arg("info").output().unwrap();
    assert_eq!(code_of(&o), 0, "{o:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn handoff_refuses_uids_not_listed_and_bad_tokens() {
    let agent = AgentProc::start_with(&["--socket-mode", "0666"]);
    open_dirs(&agent);
    let mut c = agent.client().await;
    let r = c
        .create_region("vm1", "ram0", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    let token = r.handoff_token;
    let hold = |uid: u32, token: &str| {
        Command::new(ctl_path())
            .args(["hold", "vm1", "ram0", "--token", token, "--handoff-socket"])
            .arg(agent.handoff_socket())
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap()
    };
    let o = hold(NOBODY, &token);
    assert_ne!(code_of(&o), 0, "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("uid 65534 may not use the handoff socket"),
        "{o:?}"
    );
    // Root is allowed, but a token for another VM (or garbage) is refused.
    let other = c
        .create_region("vm2", "ram0", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap()
        .handoff_token;
    for bad in [other.as_str(), "x", &format!("{token}0")] {
        let o = hold(0, bad);
        assert_ne!(code_of(&o), 0, "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr)
                .to_lowercase()
                .contains("token"),
            "{o:?}"
        );
    }
    let g = c.get_region("vm1", "ram0").await.unwrap();
    assert_eq!(g.holder_pid, 0, "no refused peer became the holder");
}

// ---------------------------------------------------------------------------------------------
// mTLS

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    other_ca_pem: String,
}

async fn tls_client(port: u16, ca_pem: &str, id: Option<&CertKey>) -> Result<Client, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(id) = id {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(Client::from_channel(ch))
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_needs_mtls_and_certificate_names_map_to_roles() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_cert, ca_issuer) = ca("memplace test CA");
    let (other_ca_cert, other_issuer) = ca("some other CA");
    let server = leaf(&ca_issuer, &["localhost", "127.0.0.1"], "memplaced", true);
    let admin = leaf(&ca_issuer, &["ops-admin.example"], "ops-admin", false);
    let viewer = leaf(&ca_issuer, &[], "ops-viewer", false);
    let unnamed = leaf(&ca_issuer, &[], "someone-else", false);
    let foreign = leaf(&other_issuer, &[], "ops-admin", false);
    let pki = Pki {
        ca_pem: ca_cert.pem(),
        other_ca_pem: other_ca_cert.pem(),
        dir,
    };
    let w = |name: &str, text: &str| {
        let p = pki.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (cert, key, client_ca) = (
        w("server.pem", &server.cert),
        w("server.key", &server.key),
        w("ca.pem", &pki.ca_pem),
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = AgentProc::start_with(&[
        "--listen-tcp",
        &addr,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &client_ca,
        "--admin-names",
        "ops-admin",
        "--viewer-names",
        "ops-viewer",
    ]);
    wait_tcp(port);

    // Admin by CN (its SAN does not match; the CN does).
    let mut a = tls_client(port, &pki.ca_pem, Some(&admin)).await.unwrap();
    a.create_region("vm1", "ram0", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    let events = stored_events(&mut a, "", 0).await;
    let e = events
        .iter()
        .find(|e| e.kind == pb::EventKind::RegionCreated as i32)
        .unwrap();
    assert_eq!(e.actor, "cert:ops-admin");

    // Viewer reads; may not mutate.
    let mut v = tls_client(port, &pki.ca_pem, Some(&viewer)).await.unwrap();
    assert_eq!(v.list_regions("").await.unwrap().len(), 1);
    let err = v
        .create_region("vm2", "ram0", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");

    // Chains to the CA, but its names have no role.
    let mut u = tls_client(port, &pki.ca_pem, Some(&unnamed)).await.unwrap();
    let err = u.list_regions("").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("cert:someone-else"), "{err}");

    // Signed by another CA (with an admin CN): the handshake fails; nothing is served.
    let r = match tls_client(port, &pki.ca_pem, Some(&foreign)).await {
        Err(e) => Err(e),
        Ok(mut c) => c.list_regions("").await.map_err(|e| e.to_string()),
    };
    assert!(r.is_err(), "a certificate from another CA was accepted");
    // No client certificate at all.
    let r = match tls_client(port, &pki.ca_pem, None).await {
        Err(e) => Err(e),
        Ok(mut c) => c.list_regions("").await.map_err(|e| e.to_string()),
    };
    assert!(r.is_err(), "a client without a certificate was served");
    // Plain h2 to the TLS port.
    let r = match Client::connect_tcp(&format!("http://{addr}")).await {
        Err(e) => Err(e.to_string()),
        Ok(mut c) => c.list_regions("").await.map_err(|e| e.to_string()),
    };
    assert!(r.is_err(), "plaintext was served on the mTLS port");
    // A client that does not trust our CA refuses the server too (sanity of the setup).
    assert!(
        tls_client(port, &pki.other_ca_pem, Some(&admin))
            .await
            .is_err()
    );

    // memplacectl over mTLS: the viewer reads, and is refused a mutation.
    let (vc, vk) = (w("viewer.pem", &viewer.cert), w("viewer.key", &viewer.key));
    let ctl = |args: &[&str]| {
        Command::new(ctl_path())
            .args(["--addr", &format!("https://{addr}"), "--tls-ca", &client_ca])
            .args([
                "--tls-cert",
                &vc,
                "--tls-key",
                &vk,
                "--tls-domain",
                "localhost",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let o = ctl(&["region", "list"]);
    assert_eq!(code_of(&o), 0, "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("ram0"), "{o:?}");
    let o = ctl(&["region", "delete", "vm1", "ram0"]);
    assert_eq!(code_of(&o), 10 + Code::PermissionDenied as i32, "{o:?}");

    let mut root = agent.client().await;
    assert_eq!(root.list_regions("").await.unwrap().len(), 1);
}

#[test]
fn tcp_without_tls_is_refused_unless_insecure_and_then_warned_every_start() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let o = Command::new(env!("CARGO_BIN_EXE_memplaced"))
        .args(["--listen-tcp", &addr, "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .args(["--metrics-addr", "off"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("listen_tcp without TLS is refused"),
        "{o:?}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "refused before creating anything"
    );

    // Half a TLS configuration is refused too.
    let o = Command::new(env!("CARGO_BIN_EXE_memplaced"))
        .args(["--listen-tcp", &addr, "--tls-cert", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");

    let mut agent = AgentProc::start_with(&["--listen-tcp", &addr, "--insecure-tcp", "true"]);
    agent.restart();
    // The agent answers on its Unix socket before it logs the TCP listener's warning: wait for
    // the second start's line, then count.
    let log = common::wait::until(
        "the second start's WITHOUT TLS warning in the agent's log",
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(20),
        || {
            let log = std::fs::read_to_string(agent.log()).unwrap();
            (log.matches("WITHOUT TLS").count() >= 2).then_some(log)
        },
    );
    assert_eq!(
        log.matches("WITHOUT TLS").count(),
        2,
        "one warning per start: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn insecure_tcp_callers_are_admins_and_audited_by_address() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _agent = AgentProc::start_with(&["--listen-tcp", &addr, "--insecure-tcp", "true"]);
    wait_tcp(port);
    let mut c = Client::connect_tcp(&format!("http://{addr}"))
        .await
        .unwrap();
    c.create_region("vm1", "ram0", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    let events = stored_events(&mut c, "", 0).await;
    assert!(
        events.iter().any(|e| e.actor.starts_with("tcp:127.0.0.1:")),
        "{events:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Audit, limits, capabilities

/// Creates vm1/ram0, binds it to node 0 and populates it: a mutation of each kind the engine
/// applies to the kernel.
async fn create_bind_populate(c: &mut Client, threads: u32) {
    c.create_region("vm1", "ram0", 8 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    c.set_policy(
        "vm1",
        "ram0",
        0,
        0,
        policy(pb::PolicyMode::Bind, &[0]),
        false,
    )
    .await
    .unwrap();
    let req = pb::PopulateRequest {
        vm_id: "vm1".into(),
        name: "ram0".into(),
        threads,
        ..Default::default()
    };
    c.populate(req, |_, _| {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_mutation_records_its_actor() {
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    create_bind_populate(&mut c, 1).await;
    c.reconcile("").await.unwrap();
    c.delete_region("vm1", "ram0").await.unwrap();
    let events = stored_events(&mut c, "", 0).await;
    for kind in [
        pb::EventKind::RegionCreated,
        pb::EventKind::PolicyApplied,
        pb::EventKind::Populated,
        pb::EventKind::RegionDeleted,
    ] {
        let e = events
            .iter()
            .find(|e| e.kind == kind as i32)
            .unwrap_or_else(|| panic!("no {kind:?} event in {events:?}"));
        assert_eq!(e.actor, "uid:0", "{kind:?}: {e:?}");
    }
    assert!(
        events.iter().all(|e| !e.actor.is_empty()),
        "an event without an actor: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_beyond_the_concurrency_limit_are_shed_not_queued() {
    let agent = AgentProc::start_with(&["--max-concurrent-requests", "1"]);
    let mut c = agent.client().await;
    c.retries = 0;
    c.node_info().await.unwrap();
    // A following WatchEvents stream is a request in flight for as long as it is open.
    let watch = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap();
    let err = c.node_info().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(err.to_string().contains("limit of 1"), "{err}");
    let err = c
        .create_region("vm1", "ram0", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    drop(watch);
    // Once the stream is gone its slot frees (the server notices the reset asynchronously).
    let mut ok = false;
    for _ in 0..200 {
        if c.node_info().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok, "the slot of a closed stream was never released");
    assert!(c.list_regions("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_messages_are_refused_and_the_agent_lives() {
    let agent = AgentProc::start_with(&["--max-message-bytes", "4096"]);
    let mut c = agent.client().await;
    c.retries = 0;
    let mut big = pb::CreateRegionRequest {
        vm_id: "vm1".into(),
        name: "ram0".into(),
        size_bytes: 4 * MIB,
        backend: pb::Backend::Memfd as i32,
        ..Default::default()
    };
    big.request_id = "r".repeat(8192);
    let err = c.raw().create_region(big.clone()).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{err:?}"
    );
    // Many policies, each small: still one oversized message.
    big.request_id = String::new();
    big.policies = (0..2000)
        .map(|i| pb::RangePolicy {
            offset: i,
            length: 1,
            policy: Some(policy(pb::PolicyMode::Bind, &[0])),
        })
        .collect();
    let err = c.raw().create_region(big).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{err:?}"
    );
    assert!(c.list_regions("").await.unwrap().is_empty());
    c.node_info().await.unwrap();
}

fn cap_mask(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

/// Capability numbers (linux/capability.h).
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_MODULE: u32 = 16;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_NICE: u32 = 23;
const CAP_SETUID: u32 = 7;

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_keeps_only_the_capabilities_it_uses() {
    let agent = AgentProc::start();
    // Every thread (capabilities are per thread) shows the reduced sets.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", agent.pid())).unwrap();
    let mut threads = 0;
    for t in tasks {
        let tid: u32 = t.unwrap().file_name().to_str().unwrap().parse().unwrap();
        for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
            let m = cap_mask(tid, field);
            for gone in [CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_MODULE, CAP_SETUID] {
                assert_eq!(m & (1 << gone), 0, "thread {tid} {field} {m:#x} has {gone}");
            }
            for kept in [CAP_SYS_NICE, CAP_SYS_PTRACE, CAP_DAC_OVERRIDE] {
                assert_ne!(
                    m & (1 << kept),
                    0,
                    "thread {tid} {field} {m:#x} lacks {kept}"
                );
            }
        }
        threads += 1;
    }
    assert!(threads > 1, "a multi-threaded agent");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("NoNewPrivs:"))
            .map(|l| l.split_whitespace().nth(1).unwrap().to_string()),
        Some("1".into())
    );
    // And it still does its work: mbind, populate (a helper process), placement.
    let mut c = agent.client().await;
    create_bind_populate(&mut c, 2).await;
    let p = c.placement("vm1", "ram0", 0, 0).await.unwrap();
    assert_eq!(p.pages_misplaced, 0);
}

#[test]
fn missing_capabilities_are_named_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/memplace.sock");
    let log = dir.path().join("log");
    let mut child = Command::new("setpriv")
        .args(["--bounding-set", "-sys_nice,-sys_ptrace", "--"])
        .arg(env!("CARGO_BIN_EXE_memplaced"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .args(["--metrics-addr", "off"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("setpriv (util-linux)");
    let mut up = false;
    for _ in 0..1500 {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(up, "the agent starts without them: {text}");
    assert!(text.contains("no CAP_SYS_NICE"), "{text}");
    assert!(text.contains("no CAP_SYS_PTRACE"), "{text}");
}
