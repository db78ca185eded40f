//! memplacectl against the real agent: every subcommand, each output format, the exit codes
//! (10 + the gRPC code, with the agent's message), the environment variables, and `hold`.

mod common;

use common::lines::Lines;
use common::net::{free_port, wait_tcp};
use common::procfs::signal;
use common::tls::{ca, leaf};
use common::wait;
use common::{AgentProc, Run};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;
use tonic::Code;

fn ctl(agent: &AgentProc, args: &[&str]) -> Run {
    Run::of(agent.ctl().args(args))
}

/// The exit code memplacectl documents for a gRPC refusal.
fn refused(code: Code) -> i32 {
    10 + code as i32
}

#[test]
fn every_read_command_speaks_table_json_and_yaml() {
    let agent = AgentProc::start();
    let info = ctl(&agent, &["info"]).ok();
    assert!(
        info.contains("NODE") && info.contains("distances"),
        "{info}"
    );
    assert!(info.contains("memfd shared policy"), "{info}");
    let v = ctl(&agent, &["info", "-o", "json"]).json();
    assert_eq!(v["nodes"][0]["id"], 0);
    assert_eq!(v["nodes"][0]["distances"], serde_json::json!([10]));
    assert_eq!(v["capabilities"]["memfd_shared_policy"], true);
    let y = ctl(&agent, &["info", "--output", "yaml"]).ok();
    assert!(
        y.contains("agent_version:") && y.contains("capabilities:"),
        "{y}"
    );

    let created = ctl(
        &agent,
        &[
            "-o", "json", "region", "create", "vm1", "ram0", "--size", "16M", "--policy", "bind:0",
        ],
    )
    .json();
    assert_eq!(created["size_bytes"], 16 << 20);
    assert_eq!(created["backend"], "memfd");
    assert_eq!(created["strategy"], "shared-policy");
    assert_eq!(created["ranges"][0]["intended"]["mode"], "bind");
    assert_eq!(created["handoff_token"].as_str().unwrap().len(), 64);

    let table = ctl(&agent, &["region", "get", "vm1", "ram0"]).ok();
    assert!(
        table.contains("vm1/ram0") && table.contains("applied"),
        "{table}"
    );
    let got = ctl(&agent, &["region", "get", "vm1", "ram0", "-o", "json"]).json();
    assert_eq!(
        got["ranges"][0]["observed"]["nodes"],
        serde_json::json!([0])
    );
    let y = ctl(&agent, &["-o", "yaml", "region", "get", "vm1", "ram0"]).ok();
    assert!(y.contains("vm_id: vm1") && y.contains("mode: bind"), "{y}");
    // When the kernel was read, and a fresh read on request.
    assert!(table.contains("observed at "), "{table}");
    let last = got["observed_at_unix_ms"]
        .as_i64()
        .expect("observed_at_unix_ms");
    let fresh = ctl(
        &agent,
        &["region", "get", "vm1", "ram0", "--fresh", "-o", "json"],
    )
    .json();
    assert!(
        fresh["observed_at_unix_ms"].as_i64().unwrap() >= last,
        "{fresh}"
    );
    assert_eq!(fresh["ranges"][0]["state"], "applied", "{fresh}");

    ctl(&agent, &["region", "create", "vm2", "ram0", "--size", "4M"]).ok();
    let all = ctl(&agent, &["-o", "json", "region", "list"]).json();
    assert_eq!(all.as_array().unwrap().len(), 2);
    let vm2 = ctl(&agent, &["-o", "json", "region", "list", "--vm", "vm2"]).json();
    assert_eq!(vm2[0]["vm_id"], "vm2");
    assert_eq!(vm2.as_array().unwrap().len(), 1);
    let list = ctl(&agent, &["region", "list"]).ok();
    assert!(
        list.starts_with("VM ") && list.lines().count() == 3,
        "{list}"
    );

    // policy set: numactl node syntax and modes by name; the region table shows the split.
    let t = ctl(
        &agent,
        &[
            "policy",
            "set",
            "vm1",
            "ram0",
            "--offset",
            "8M",
            "--length",
            "4M",
            "--mode",
            "preferred",
            "--nodes",
            "0",
        ],
    )
    .ok();
    assert!(
        t.contains("preferred 0") && t.contains("generation 2"),
        "{t}"
    );
    let v = ctl(
        &agent,
        &[
            "-o",
            "json",
            "policy",
            "set",
            "vm1",
            "ram0",
            "--mode",
            "interleave",
            "--nodes",
            "0-0",
            "--expected-generation",
            "2",
        ],
    )
    .json();
    assert_eq!(v["generation"], 3);
    assert_eq!(v["ranges"][0]["intended"]["mode"], "interleave");

    // populate, then placement from the kernel.
    let p = ctl(&agent, &["-o", "json", "populate", "vm1", "ram0"]).json();
    assert_eq!(p["bytes_done"], 16 << 20);
    assert_eq!(p["cancelled"], false);
    // memplacectl verifies by default: the summary names the nodes.
    assert_eq!(p["verified"], true, "{p}");
    assert_eq!(p["nodes"][0]["pages"], 4096, "{p}");
    let t = ctl(&agent, &["populate", "vm2", "ram0", "--threads", "1"]).ok();
    assert!(t.contains("populated 4.0 MiB of 4.0 MiB"), "{t}");
    assert!(t.contains("node 0: 1024 pages"), "{t}");
    // --no-verify answers from the page cache: the bytes, no nodes.
    let p = ctl(
        &agent,
        &["-o", "json", "populate", "vm2", "ram0", "--no-verify"],
    )
    .json();
    assert_eq!(p["bytes_done"], 4 << 20, "{p}");
    assert_eq!(p["verified"], false, "{p}");
    assert_eq!(p["nodes"], serde_json::json!([]), "{p}");
    let pl = ctl(&agent, &["placement", "vm1", "ram0"]).ok();
    assert!(pl.contains("node 0") && pl.contains("100.0%"), "{pl}");
    // Nobody holds the file: the agent counted in its own window.
    assert!(pl.contains("counted from  the agent's window"), "{pl}");
    assert!(pl.contains("misplaced            0 pages"), "{pl}");
    let pl = ctl(&agent, &["-o", "json", "placement", "vm1", "ram0"]).json();
    assert_eq!(pl["nodes"][0]["pages"], (16 << 20) / 4096);
    assert_eq!(pl["pages_misplaced"], 0);

    // reconcile.
    let r = ctl(&agent, &["-o", "json", "reconcile"]).json();
    assert_eq!(r["regions_checked"], 2);
    assert_eq!(r["ranges_failed"], 0);
    let r = ctl(&agent, &["reconcile", "--vm", "vm2"]).ok();
    assert!(r.contains("in 1 regions"), "{r}");

    // events: a table, JSON lines, YAML documents.
    let ev = ctl(&agent, &["events", "--vm", "vm1"]).ok();
    assert!(
        ev.contains("region-created") && ev.contains("uid:0"),
        "{ev}"
    );
    let lines = ctl(&agent, &["-o", "json", "events"]).ok();
    let kinds: Vec<String> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .into()
        })
        .collect();
    for k in [
        "agent-started",
        "region-created",
        "policy-applied",
        "populated",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
    let y = ctl(&agent, &["-o", "yaml", "events", "--after", "1"]).ok();
    assert!(
        y.starts_with("---\n") && !y.contains("agent-started"),
        "{y}"
    );

    // token: the same token CreateRegion returned.
    let t = ctl(&agent, &["-o", "json", "token", "vm1"]).json();
    assert_eq!(t["handoff_token"], created["handoff_token"]);
    let t = ctl(&agent, &["token", "vm1"]).ok();
    assert_eq!(t.trim(), created["handoff_token"].as_str().unwrap());

    // health.
    assert_eq!(ctl(&agent, &["health"]).ok().trim(), "SERVING");
    assert_eq!(
        ctl(&agent, &["-o", "json", "health"]).json()["status"],
        "SERVING"
    );

    // delete.
    let d = ctl(&agent, &["region", "delete", "vm2", "ram0"]).ok();
    assert_eq!(d.trim(), "deleted vm2/ram0");
}

#[test]
fn exit_codes_map_grpc_codes_and_print_the_agents_message() {
    let agent = AgentProc::start();
    ctl(&agent, &["region", "create", "vm1", "ram0", "--size", "4M"]).ok();

    let r = ctl(&agent, &["region", "get", "vm1", "nope"]);
    assert_eq!(r.code, refused(Code::NotFound), "{}", r.err);
    assert_eq!(r.err.trim(), "memplacectl: region vm1/nope not found");
    assert!(r.out.is_empty());

    let r = ctl(&agent, &["region", "create", "vm1", "ram0", "--size", "4M"]);
    assert_eq!(r.code, refused(Code::AlreadyExists), "{}", r.err);
    assert!(r.err.contains("already exists"), "{}", r.err);

    let r = ctl(
        &agent,
        &["region", "create", "vm1", "bad/name", "--size", "4M"],
    );
    assert_eq!(r.code, refused(Code::InvalidArgument), "{}", r.err);
    assert!(r.err.contains("name"), "{}", r.err);

    let r = ctl(
        &agent,
        &[
            "policy",
            "set",
            "vm1",
            "ram0",
            "--mode",
            "bind",
            "--nodes",
            "0",
            "--expected-generation",
            "7",
        ],
    );
    assert_eq!(r.code, refused(Code::Aborted), "{}", r.err);
    assert!(r.err.contains("generation"), "{}", r.err);

    // Local errors: bad input exits 1 before anything is sent; bad usage exits 2 (clap).
    let r = ctl(&agent, &["region", "create", "vm1", "x", "--size", "4Q"]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("unknown size unit"), "{}", r.err);
    let r = ctl(
        &agent,
        &[
            "policy", "set", "vm1", "ram0", "--mode", "scatter", "--nodes", "0",
        ],
    );
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("unknown policy mode"), "{}", r.err);
    let r = ctl(
        &agent,
        &[
            "policy", "set", "vm1", "ram0", "--mode", "bind", "--nodes", "3-1",
        ],
    );
    assert_eq!(r.code, 1, "{}", r.err);
    let r = ctl(&agent, &["region", "create", "vm1", "x"]);
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("--size"), "{}", r.err);
    let r = ctl(&agent, &["region", "list", "-o", "xml"]);
    assert_eq!(r.code, 2, "{}", r.err);

    // No agent there: a local error naming the socket.
    let mut c = Command::new(common::ctl_path());
    c.args(["--socket", "/nonexistent/memplace.sock", "info"]);
    let r = Run::of(&mut c);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("/nonexistent/memplace.sock"), "{}", r.err);
    // TLS options need each other.
    let r = ctl(&agent, &["--addr", "https://127.0.0.1:1", "info"]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("--tls-ca"), "{}", r.err);
}

#[test]
fn environment_selects_the_agent() {
    let agent = AgentProc::start();
    let mut c = Command::new(common::ctl_path());
    c.env("MEMPLACE_SOCKET", agent.socket())
        .args(["-o", "json", "info"]);
    let v = Run::of(&mut c).json();
    assert_eq!(v["nodes"][0]["id"], 0);
}

#[test]
fn events_follow_streams_new_events() {
    let agent = AgentProc::start();
    let mut follow = agent
        .ctl()
        .args(["-o", "json", "events", "--follow", "--vm", "vmf"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Lines::of(&mut follow);
    ctl(&agent, &["region", "create", "vmf", "ram0", "--size", "4M"]).ok();
    let l = lines.wait_for("region-created event", |l| l.contains("region-created"));
    let v: Value = serde_json::from_str(&l).unwrap();
    assert_eq!(
        (v["vm_id"].as_str(), v["name"].as_str()),
        (Some("vmf"), Some("ram0"))
    );
    ctl(&agent, &["region", "delete", "vmf", "ram0"]).ok();
    lines.wait_for("region-deleted event", |l| l.contains("region-deleted"));
    // Still following: it has not exited.
    assert!(follow.try_wait().unwrap().is_none());
    signal(follow.id() as i32, "TERM");
    follow.wait().unwrap();
}

#[test]
fn hold_is_a_stand_in_vmm() {
    let agent = AgentProc::start();
    let created = ctl(
        &agent,
        &[
            "-o", "json", "region", "create", "vmh", "ram0", "--size", "8M", "--policy", "bind:0",
        ],
    )
    .json();
    let token = created["handoff_token"].as_str().unwrap().to_string();
    let mut hold = agent
        .ctl()
        .args(["hold", "vmh", "ram0", "--touch", "2M", "--pattern", "7"])
        .arg("--handoff-socket")
        .arg(agent.handoff_socket())
        .env("MEMPLACE_HANDOFF_TOKEN", &token)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Lines::of(&mut hold);
    let l = lines.wait_for("\"holding\" line", |l| l.starts_with("holding"));
    assert!(
        l.contains("vmh/ram0") && l.contains(&hold.id().to_string()),
        "{l}"
    );
    let got = ctl(&agent, &["-o", "json", "region", "get", "vmh", "ram0"]).json();
    assert_eq!(got["holder_pid"], hold.id());
    // The touched pages were allocated by the holder's faults, under the region's policy.
    let pl = ctl(&agent, &["-o", "json", "placement", "vmh", "ram0"]).json();
    assert_eq!(pl["nodes"][0]["pages"], (2 << 20) / 4096);
    // The holder maps the whole file and faulted every allocated page: counted from its page
    // tables, and the table says so.
    assert_eq!(pl["ranges"][0]["counted_from_pid"], hold.id(), "{pl}");
    let table = ctl(&agent, &["placement", "vmh", "ram0"]).ok();
    assert!(
        table.contains(&format!(
            "counted from  the holder's page tables (pid {})",
            hold.id()
        )),
        "{table}"
    );
    signal(hold.id() as i32, "USR1");
    assert_eq!(
        lines.wait_for("\"pattern\" answer", |l| l.starts_with("pattern")),
        "pattern ok"
    );
    // A wrong token is refused by the handoff socket: a local error (exit 1) with its code.
    let r = Run::of(&mut {
        let mut c = agent.ctl();
        c.args(["hold", "vmh", "ram0", "--token", "00"])
            .arg("--handoff-socket")
            .arg(agent.handoff_socket());
        c
    });
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("PERMISSION_DENIED"), "{}", r.err);
    signal(hold.id() as i32, "TERM");
    assert!(hold.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_cancels_a_populate_and_the_agent_stops() {
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    // Interrupt once pages are arriving. If the populate wins the race and finishes first, try
    // again with a region twice as large: the point is what a cancel does, not how fast.
    for (attempt, gib) in [1u64, 2, 4].into_iter().enumerate() {
        let name = format!("big{attempt}");
        let size = format!("{gib}G");
        ctl(&agent, &["region", "create", "vmc", &name, "--size", &size]).ok();
        let mut pop = agent
            .ctl()
            .args(["populate", "vmc", &name, "--threads", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait::until_async(
            "the populate's first pages (or its end)",
            wait::PATIENCE,
            Duration::from_millis(5),
            || {
                let mut c = c.clone();
                let done = pop.try_wait().unwrap().is_some();
                let name = name.clone();
                async move {
                    let p = c.placement("vmc", &name, 0, 0).await.unwrap();
                    (done || p.nodes.iter().map(|n| n.pages).sum::<u64>() > 0).then_some(())
                }
            },
        )
        .await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pop.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let out = pop.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.code() == Some(0) {
            // Finished before the signal arrived.
            ctl(&agent, &["region", "delete", "vmc", &name]).ok();
            continue;
        }
        assert_eq!(out.status.code(), Some(refused(Code::Cancelled)), "{err}");
        assert!(err.contains("cancelled"), "{err}");
        // The agent saw the stream go and stopped: its populate event says so, and the region
        // is not fully allocated.
        let mut events = c
            .watch_events(memplace_client::pb::WatchEventsRequest {
                vm_id: "vmc".into(),
                after_sequence: 0,
                no_follow: false,
            })
            .await
            .unwrap();
        wait::within(
            "the cancelled populate's POPULATED event",
            wait::PATIENCE,
            async {
                loop {
                    let e = events
                        .message()
                        .await
                        .unwrap()
                        .expect("the event stream ended");
                    if e.name == name && e.kind() == memplace_client::pb::EventKind::Populated {
                        assert!(e.message.contains("(cancelled)"), "{}", e.message);
                        break;
                    }
                }
            },
        )
        .await;
        let p = c.placement("vmc", &name, 0, 0).await.unwrap();
        assert!(p.pages_not_present > 0, "{p:?}");
        ctl(&agent, &["region", "delete", "vmc", &name]).ok();
        return;
    }
    panic!("every populate finished before Ctrl-C reached it, even 4 GiB");
}

#[test]
fn mtls_over_tcp_with_certificate_roles() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_cert, issuer) = ca("memplacectl test CA");
    let ca_pem = ca_cert.pem();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let ca_file = write("ca.pem", &ca_pem);
    let c = leaf(&issuer, &["localhost"], "memplaced", true);
    let (server_cert, server_key) = (write("server.pem", &c.cert), write("server.key", &c.key));
    let c = leaf(&issuer, &[], "ops-admin", false);
    let (admin_cert, admin_key) = (write("admin.pem", &c.cert), write("admin.key", &c.key));
    let c = leaf(&issuer, &[], "nobody", false);
    let (nobody_cert, nobody_key) = (write("nobody.pem", &c.cert), write("nobody.key", &c.key));

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let agent = AgentProc::start_with(&[
        "--listen-tcp",
        &listen,
        "--tls-cert",
        &server_cert,
        "--tls-key",
        &server_key,
        "--tls-client-ca",
        &ca_file,
        "--admin-names",
        "ops-admin",
    ]);
    wait_tcp(port);
    let addr = format!("https://127.0.0.1:{port}");
    let over_tls = |cert: &str, key: &str, args: &[&str]| {
        let mut c = Command::new(common::ctl_path());
        c.args([
            "--addr",
            &addr,
            "--tls-ca",
            &ca_file,
            "--tls-domain",
            "localhost",
        ])
        .args(["--tls-cert", cert, "--tls-key", key])
        .args(args);
        Run::of(&mut c)
    };
    let v = over_tls(
        &admin_cert,
        &admin_key,
        &[
            "-o", "json", "region", "create", "vmt", "ram0", "--size", "4M",
        ],
    )
    .json();
    assert_eq!(v["vm_id"], "vmt");
    // The audit actor is the certificate's name.
    let ev = ctl(&agent, &["-o", "json", "events", "--vm", "vmt"]).ok();
    assert!(ev.contains("ops-admin"), "{ev}");
    // A certificate from the right CA without a role is refused by the agent.
    let r = over_tls(&nobody_cert, &nobody_key, &["region", "list"]);
    assert_eq!(r.code, refused(Code::PermissionDenied), "{}", r.err);
    assert!(r.err.contains("nobody"), "{}", r.err);
    // The same options from the environment.
    let mut c = Command::new(common::ctl_path());
    c.env("MEMPLACE_ADDR", &addr)
        .env("MEMPLACE_TLS_CA", &ca_file)
        .env("MEMPLACE_TLS_CERT", &admin_cert)
        .env("MEMPLACE_TLS_KEY", &admin_key)
        .env("MEMPLACE_TLS_DOMAIN", "localhost")
        .args(["-o", "json", "region", "list"]);
    assert_eq!(Run::of(&mut c).json()[0]["name"], "ram0");
}
