//! What an operator watches: the Prometheus endpoint, parsed by the Python prometheus_client
//! parser after real activity, and the JSON log lines of mutations.

mod common;

use common::events::stored_events;
use common::metrics::scrape;
use common::net::free_port;
use common::sqlite;
use common::wait;
use common::{AgentProc, MIB, policy, whole};
use memplace_client::handoff::Handoff;
use memplace_client::pb;
use memplace_server::domain::{NodeSet, Policy, PolicyMode};
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};

/// One parsed sample.
struct Sample {
    name: String,
    labels: serde_json::Map<String, Value>,
    value: f64,
}

/// Parses exposition text with `prometheus_client.parser.text_string_to_metric_families`.
fn parse_with_python(text: &str) -> Vec<Sample> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/parse_metrics.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed to parse the metrics (apt-get install python3)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Python prometheus_client parser rejected /metrics (is prometheus_client installed? \
         python3 -m pip install prometheus_client): {}\n---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.into_iter()
        .map(|s| Sample {
            name: s["name"].as_str().unwrap().to_string(),
            labels: s["labels"].as_object().unwrap().clone(),
            value: s["value"].as_f64().unwrap(),
        })
        .collect()
}

/// The value of the sample `name` whose labels include `labels`; panics with the neighbours if
/// there is none.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).and_then(|x| x.as_str()) == Some(*v))
        })
        .collect();
    match found.as_slice() {
        [one] => one.value,
        [] => panic!(
            "no sample {name}{labels:?}; samples of that name: {:?}",
            samples
                .iter()
                .filter(|s| s.name == name)
                .map(|s| (&s.labels, s.value))
                .collect::<Vec<_>>()
        ),
        many => panic!("{} samples match {name}{labels:?}", many.len()),
    }
}

const AGENT: &str = "memplace.v1.NodeAgentService/";

#[tokio::test(flavor = "multi_thread")]
async fn metrics_carry_requests_regions_bytes_drift_and_handoffs() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = AgentProc::start_with(&["--metrics-addr", &addr]);
    let mut c = agent.client().await;

    // Activity: a region bound to node 0, populated, read, drifted behind the agent's back
    // through a VMM's mapping, reconciled; a refused request; a second region deleted.
    let created = c
        .create_region(
            "vm1",
            "ram0",
            64 * MIB,
            pb::Backend::Memfd,
            whole(policy(pb::PolicyMode::Bind, &[0])),
        )
        .await
        .unwrap();
    c.create_region("vm1", "scratch", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    c.delete_region("vm1", "scratch").await.unwrap();
    let summary = c
        .populate(
            pb::PopulateRequest {
                vm_id: "vm1".into(),
                name: "ram0".into(),
                ..Default::default()
            },
            |_, _| {},
        )
        .await
        .unwrap();
    assert_eq!(summary.bytes_done, 64 * MIB);
    c.placement("vm1", "ram0", 0, 0).await.unwrap();
    let missing = c.get_region("vm1", "nope").await.unwrap_err();
    assert_eq!(missing.code(), Some(tonic::Code::NotFound));

    let handoff = Handoff::connect(agent.handoff_socket()).unwrap();
    let held = handoff
        .acquire("vm1", "ram0", &created.handoff_token)
        .unwrap();
    let map = memplace_server::kernel::Mapping::new(
        std::os::fd::AsFd::as_fd(&held.fd),
        held.region.size_bytes,
    )
    .unwrap();
    let other = Policy {
        mode: PolicyMode::Preferred,
        nodes: NodeSet::from_ids([0]).unwrap(),
        static_nodes: false,
        relative_nodes: false,
    };
    // memfd keeps one shared policy: a VMM's mbind changes what the agent reads back.
    map.mbind(0, 16 * MIB, &other, 0).unwrap();
    let rep = c.reconcile("").await.unwrap();
    assert_eq!(rep.ranges_drifted, 1, "{rep:?}");

    let text = scrape(port);
    let s = parse_with_python(&text);

    // Requests by method and code, from the edge layer; streams counted when they end.
    let req = "memplace_requests_total";
    for (method, code, at_least) in [
        ("CreateRegion", "OK", 2.0),
        ("DeleteRegion", "OK", 1.0),
        ("Populate", "OK", 1.0),
        ("GetPlacement", "OK", 1.0),
        ("Reconcile", "OK", 1.0),
        ("GetRegion", "NOT_FOUND", 1.0),
    ] {
        let v = value(
            &s,
            req,
            &[("method", &format!("{AGENT}{method}")), ("code", code)],
        );
        assert!(v >= at_least, "{method} {code}: {v}");
    }
    // The latency histogram: counts match the requests, buckets are cumulative, sums positive.
    let create = &[("method", "memplace.v1.NodeAgentService/CreateRegion")][..];
    let count = value(&s, "memplace_request_duration_seconds_count", create);
    assert_eq!(count, 2.0);
    assert!(value(&s, "memplace_request_duration_seconds_sum", create) > 0.0);
    let buckets: Vec<(f64, f64)> = s
        .iter()
        .filter(|x| {
            x.name == "memplace_request_duration_seconds_bucket"
                && x.labels["method"] == create[0].1
        })
        .map(|x| {
            let le = x.labels["le"].as_str().unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, x.value)
        })
        .collect();
    assert!(buckets.len() > 5, "{buckets:?}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{buckets:?}"
    );
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count));

    // Regions by backend, strategy and status; bytes per node; lost regions.
    let regions = [
        ("backend", "memfd"),
        ("strategy", "shared-policy"),
        ("status", "active"),
    ];
    assert_eq!(value(&s, "memplace_regions", &regions), 1.0);
    assert_eq!(
        value(&s, "memplace_bytes_intended", &[("node", "0")]),
        (64 * MIB) as f64
    );
    assert_eq!(
        value(&s, "memplace_bytes_observed", &[("node", "0")]),
        (64 * MIB) as f64
    );
    assert_eq!(value(&s, "memplace_regions_lost", &[]), 0.0);
    // Drift found (and re-applied, as far as the engine managed) by the requested reconcile,
    // and its duration.
    assert_eq!(value(&s, "memplace_ranges_drifted_total", &[]), 1.0);
    assert_eq!(
        value(&s, "memplace_ranges_reapplied_total", &[]),
        f64::from(rep.ranges_reapplied)
    );
    assert_eq!(
        value(&s, "memplace_reconcile_duration_seconds_count", &[]),
        1.0
    );
    // Every mutation committed durably: create, create, delete at least.
    assert!(value(&s, "memplace_sqlite_commit_duration_seconds_count", &[]) >= 3.0);
    assert!(value(&s, "memplace_sqlite_commit_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(
        value(
            &s,
            "memplace_handoffs_total",
            &[("method", "acquire"), ("code", "HANDOFF_CODE_OK")]
        ),
        1.0
    );
    drop(map);

    // Deleting the region takes its bytes off both gauges at the next scrape.
    drop(held);
    c.delete_region("vm1", "ram0").await.unwrap();
    let s = parse_with_python(&scrape(port));
    for gauge in ["memplace_bytes_intended", "memplace_bytes_observed"] {
        assert!(
            !s.iter().any(|x| x.name == gauge && x.value != 0.0),
            "{gauge} still counts a deleted region"
        );
    }
}

/// Human-format logs written to a file (as systemd's journal or a log file receives them) are
/// plain text: no ANSI colour or style codes.
#[tokio::test(flavor = "multi_thread")]
async fn human_logs_to_a_file_carry_no_colour_codes() {
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    c.create_region_with(pb::CreateRegionRequest {
        vm_id: "vm8".into(),
        name: "ram0".into(),
        size_bytes: 4 * MIB,
        backend: pb::Backend::Memfd as i32,
        request_id: "req-plain-log-1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let log = std::fs::read(agent.log()).unwrap();
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("memplaced serving"), "{text}");
    assert!(text.contains("CreateRegion"), "{text}");
    assert!(text.contains("INFO"), "{text}");
    assert!(
        !log.contains(&0x1b),
        "an escape byte in a log written to a file: {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_name_vm_region_request_and_caller() {
    let agent = AgentProc::start_with(&["--log-format", "json"]);
    let mut c = agent.client().await;
    let req = pb::CreateRegionRequest {
        vm_id: "vm7".into(),
        name: "ram0".into(),
        size_bytes: 4 * MIB,
        backend: pb::Backend::Memfd as i32,
        request_id: "req-json-log-1".into(),
        ..Default::default()
    };
    let token = c.create_region_with(req).await.unwrap().handoff_token;
    let held = Handoff::connect(agent.handoff_socket())
        .unwrap()
        .acquire("vm7", "ram0", &token)
        .unwrap();
    drop(held);
    c.set_policy_with(pb::SetPolicyRequest {
        vm_id: "vm7".into(),
        name: "ram0".into(),
        policy: Some(policy(pb::PolicyMode::Bind, &[0])),
        request_id: "req-json-log-2".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_region_with(pb::DeleteRegionRequest {
        vm_id: "vm7".into(),
        name: "ram0".into(),
        request_id: "req-json-log-3".into(),
    })
    .await
    .unwrap();
    let log = std::fs::read_to_string(agent.log()).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    for (message, request_id) in [
        ("CreateRegion", "req-json-log-1"),
        ("SetPolicy", "req-json-log-2"),
        ("DeleteRegion", "req-json-log-3"),
    ] {
        let line = lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message} line in:\n{log}"));
        let f = &line["fields"];
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(f["vm_id"], "vm7", "{line}");
        assert_eq!(f["name"], "ram0", "{line}");
        assert_eq!(f["request_id"], request_id, "{line}");
        assert_eq!(
            f["caller"],
            format!("uid:{}", nix::unistd::getuid()),
            "{line}"
        );
        assert!(line["timestamp"].is_string(), "{line}");
    }
    // The VMM side is logged too, with the peer's uid and pid as the caller.
    let line = lines
        .iter()
        .find(|l| l["fields"]["message"] == "handoff acquire")
        .unwrap_or_else(|| panic!("no handoff line in:\n{log}"));
    let f = &line["fields"];
    assert_eq!(
        (&f["vm_id"], &f["name"]),
        (&"vm7".into(), &"ram0".into()),
        "{line}"
    );
    assert_eq!(f["code"], "HANDOFF_CODE_OK", "{line}");
    let me = format!("uid:{} pid:{}", nix::unistd::getuid(), std::process::id());
    assert_eq!(f["caller"], me, "{line}");
}

// ---------------------------------------------------------------------------------------------
// WatchEvents: every event, in order, exactly once, whatever the followers and writers do.

/// Reads a following stream up to and including the event with sequence `last`.
async fn follow_until(
    s: &mut tonic::Streaming<pb::WatchEventsResponse>,
    last: u64,
) -> Vec<pb::WatchEventsResponse> {
    let mut out = Vec::new();
    loop {
        let e = wait::within(
            &format!(
                "the follower's event {} (it had {} events up to sequence {last})",
                out.len() + 1,
                out.len()
            ),
            wait::PATIENCE,
            s.message(),
        )
        .await
        .unwrap_or_else(|st| panic!("the follower got an error after {} events: {st}", out.len()))
        .unwrap_or_else(|| panic!("the follower ended after {} events", out.len()));
        let seq = e.sequence;
        out.push(e);
        if seq >= last {
            return out;
        }
    }
}

/// `got` must be exactly `want`: the same events, in sequence order, none missing or repeated.
fn assert_same_events(
    what: &str,
    got: &[pb::WatchEventsResponse],
    want: &[pb::WatchEventsResponse],
) {
    let seqs = |v: &[pb::WatchEventsResponse]| v.iter().map(|e| e.sequence).collect::<Vec<_>>();
    if got != want {
        let (g, w) = (seqs(got), seqs(want));
        let missing: Vec<u64> = w.iter().filter(|s| !g.contains(s)).copied().collect();
        let extra: Vec<u64> = g.iter().filter(|s| !w.contains(s)).copied().collect();
        let unordered = g.windows(2).filter(|p| p[0] >= p[1]).count();
        panic!(
            "{what}: {} events streamed, {} in the log; {} missing (first {:?}), {} not in the log \
             ({:?}), {unordered} out of order",
            g.len(),
            w.len(),
            missing.len(),
            &missing[..missing.len().min(10)],
            extra.len(),
            &extra[..extra.len().min(10)],
        );
    }
}

/// A 63-character name (the longest valid one): long names make each event big, so fewer of them
/// fit in the transport's buffers and more pile up in the agent's live feed.
fn long_name(prefix: &str, i: usize) -> String {
    format!(
        "{prefix}-{i}-{}",
        "x".repeat(63 - prefix.len() - 2 - i.to_string().len())
    )
}

/// `writers` clients at once, each making `calls` SetPolicy calls (one event each) on its own region.
async fn set_policy_storm(c: &memplace_client::Client, vm: &str, writers: usize, calls: usize) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut c = c.clone();
        let (vm, name) = (vm.to_string(), long_name("region", w));
        tasks.push(tokio::spawn(async move {
            for i in 0..calls {
                let mode = if i % 2 == 0 {
                    pb::PolicyMode::Bind
                } else {
                    pb::PolicyMode::Interleave
                };
                c.set_policy(&vm, &name, 0, 4 * MIB, policy(mode, &[0]), false)
                    .await
                    .unwrap_or_else(|e| panic!("writer {w} call {i}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn create_regions(c: &mut memplace_client::Client, vm: &str, n: usize) {
    for w in 0..n {
        c.create_region(
            vm,
            &long_name("region", w),
            4 * MIB,
            pb::Backend::Memfd,
            vec![],
        )
        .await
        .unwrap();
    }
}

/// A client whose HTTP/2 windows are 64 KiB (the protocol's default; memplace's own client asks
/// for more), so the transport holds few events a follower has not read.
async fn small_window_client(socket: std::path::PathBuf) -> memplace_client::Client {
    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .expect("connect");
    memplace_client::Client::from_channel(channel)
}

/// A follower that stops reading while 9,000 events are committed falls far behind the live feed:
/// the feed holds 4,096, the agent's stream 256 and the transport under 2,000 of these events, so
/// well over a thousand more are only in the log. Once it reads again it must get every one of
/// them, in order, and then the live ones.
#[tokio::test(flavor = "multi_thread")]
async fn watch_events_follower_far_behind_gets_every_event() {
    const WRITERS: usize = 8;
    const CALLS: usize = 1125;
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    let vm = long_name("lagging-vm", 0);
    create_regions(&mut c, &vm, WRITERS).await;
    let start = stored_events(&mut c, "", 0).await.last().unwrap().sequence;
    // Subscribed once the call returns; then not read until every write is done.
    let mut follower = small_window_client(agent.socket())
        .await
        .watch_events(pb::WatchEventsRequest {
            vm_id: String::new(),
            after_sequence: start,
            no_follow: false,
        })
        .await
        .unwrap();
    set_policy_storm(&c, &vm, WRITERS, CALLS).await;
    // One last event with no concurrent writer, so even a stream that lost events reaches it.
    c.create_region(&vm, "marker", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    let log: Vec<_> = stored_events(&mut c, "", 0)
        .await
        .into_iter()
        .filter(|e| e.sequence > start)
        .collect();
    assert_eq!(
        log.len(),
        WRITERS * CALLS + 1,
        "one event per call, plus the marker"
    );
    let last = log.last().unwrap().sequence;
    let got = follow_until(&mut follower, last).await;
    assert_same_events("a follower that lagged", &got, &log);

    // It is live again: the next event arrives without any catching up to do.
    c.delete_region(&vm, "marker").await.unwrap();
    let next = wait::within(
        "the live follower's event for the marker's deletion",
        wait::PATIENCE,
        follower.message(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        (next.sequence, next.kind()),
        (last + 1, pb::EventKind::RegionDeleted)
    );
    println!(
        "{} events after falling behind the live feed, all in order",
        got.len()
    );
}

/// Sixteen clients commit at once (the store commits them in groups), while two followers read:
/// one of everything, one of a single VM. Each gets exactly the log, in sequence order, even
/// though concurrent commits broadcast their events in any order.
#[tokio::test(flavor = "multi_thread")]
async fn watch_events_with_concurrent_writers_misses_nothing() {
    const WRITERS: usize = 16;
    const CALLS: usize = 150;
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    let (vm_a, vm_b) = ("writers-a", "writers-b");
    create_regions(&mut c, vm_a, WRITERS / 2).await;
    create_regions(&mut c, vm_b, WRITERS / 2).await;
    let start = stored_events(&mut c, "", 0).await.last().unwrap().sequence;
    let mut followers = Vec::new();
    for vm in ["", vm_a] {
        let mut s = c
            .watch_events(pb::WatchEventsRequest {
                vm_id: vm.into(),
                after_sequence: start,
                no_follow: false,
            })
            .await
            .unwrap();
        // Read as fast as events come, into a channel the test drains afterwards.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(e)) = s.message().await {
                if tx.send(e).is_err() {
                    return;
                }
            }
        });
        followers.push((vm, rx));
    }
    let (a, b) = (c.clone(), c.clone());
    tokio::join!(
        set_policy_storm(&a, vm_a, WRITERS / 2, CALLS),
        set_policy_storm(&b, vm_b, WRITERS / 2, CALLS)
    );
    // The marker: alone, so even a follower that lost events gets it.
    c.create_region(vm_a, "marker", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    let log: Vec<_> = stored_events(&mut c, "", 0)
        .await
        .into_iter()
        .filter(|e| e.sequence > start)
        .collect();
    assert_eq!(log.len(), WRITERS * CALLS + 1);
    let last = log.last().unwrap().sequence;
    for (vm, mut rx) in followers {
        let mut got = Vec::new();
        while got
            .last()
            .is_none_or(|e: &pb::WatchEventsResponse| e.sequence < last)
        {
            let what = format!(
                "follower of {vm:?}: the event after sequence {} (up to {last})",
                got.last()
                    .map_or(0, |e: &pb::WatchEventsResponse| e.sequence)
            );
            got.push(
                wait::within(&what, wait::PATIENCE, rx.recv())
                    .await
                    .expect("the follower stream ended"),
            );
        }
        let want: Vec<_> = log
            .iter()
            .filter(|e| vm.is_empty() || e.vm_id == vm)
            .cloned()
            .collect();
        assert_same_events(&format!("follower of {vm:?}"), &got, &want);
    }
}

/// An event the log cannot give back ends a following stream with an error status, not a
/// silent end. A row of an unknown kind is written into the log behind the agent's back; the
/// follower sees the next event jump past it, reads the log, and must report the failure.
#[tokio::test(flavor = "multi_thread")]
async fn watch_events_reports_a_log_it_cannot_read() {
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    let start = stored_events(&mut c, "", 0).await.last().unwrap().sequence;
    let mut follower = c
        .watch_events(pb::WatchEventsRequest {
            vm_id: String::new(),
            after_sequence: start,
            no_follow: false,
        })
        .await
        .unwrap();
    let out = sqlite::write(
        &agent.state_dir().join("memplace.db"),
        &["-cmd", ".timeout 10000"],
        "INSERT INTO events (time_unix_ms, kind, vm_id, name, message, actor) \
         VALUES (0, 9999, '', '', 'not an event kind', 'test'); SELECT max(sequence) FROM events;",
    );
    let bad: u64 = out.trim().parse().unwrap();
    assert_eq!(bad, start + 1);
    c.create_region("vm", "r", 4 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    match wait::within(
        "the follower's error for the event it cannot read",
        wait::PATIENCE,
        follower.message(),
    )
    .await
    {
        Err(st) => {
            assert_eq!(st.code(), tonic::Code::Internal, "{st}");
            assert!(st.message().contains("event kind 9999"), "{st}");
        }
        Ok(m) => panic!("the follower skipped an event it could not read, and got {m:?}"),
    }
}

/// A stream that resumes behind the log's oldest event (the log keeps only the newest 10,000)
/// ends with OUT_OF_RANGE naming the missing sequences, instead of skipping them silently. The
/// pruning is done behind the agent's back, as the agent's own pruning deletes the oldest rows.
#[tokio::test(flavor = "multi_thread")]
async fn watch_events_resumed_behind_the_log_is_out_of_range() {
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    for i in 0..3 {
        c.create_region("vm", &format!("r{i}"), 4 * MIB, pb::Backend::Memfd, vec![])
            .await
            .unwrap();
    }
    let log = stored_events(&mut c, "", 0).await;
    assert!(log.len() >= 3, "{log:?}");
    let pruned_to = log[1].sequence;
    sqlite::write(
        &agent.state_dir().join("memplace.db"),
        &["-cmd", ".timeout 10000"],
        &format!("DELETE FROM events WHERE sequence <= {pruned_to}"),
    );
    let watch = |after: u64| pb::WatchEventsRequest {
        vm_id: String::new(),
        after_sequence: after,
        no_follow: true,
    };
    // Owed events are gone: an error, before any event.
    let mut s = c.watch_events(watch(log[0].sequence)).await.unwrap();
    match s.message().await {
        Err(st) => {
            assert_eq!(st.code(), tonic::Code::OutOfRange, "{st}");
            assert!(
                st.message()
                    .contains(&format!("events {}..{pruned_to}", log[0].sequence + 1)),
                "{st}"
            );
        }
        Ok(m) => panic!("a stream owed pruned events got {m:?}"),
    }
    // Resuming at the edge, or from 0, gets what the log holds, from its oldest event.
    for after in [pruned_to, 0] {
        let mut s = c.watch_events(watch(after)).await.unwrap();
        let first = s.message().await.unwrap().expect("an event");
        assert_eq!(first.sequence, pruned_to + 1, "after {after}");
    }
}
