//! SIGKILL under load, 50 times. 32 clients create, re-police and delete their own regions
//! concurrently while the agent dies: at a random moment (SIGKILL), or at a kill point compiled
//! into the test build (feature `failpoints`, `memplace_server::failpoint`): right after the
//! SQLite commit and before the kernel change, or after the kernel change and before the reply,
//! of CreateRegion, SetPolicy and DeleteRegion. Each kill point must end the agent with its own
//! exit status, and each is hit several times.
//!
//! After each restart, before anything is retried or reconciled:
//! - the database (read by the sqlite3 CLI) holds the request record of every acknowledged
//!   mutation, with the answer the client got;
//! - the one request each client had in flight is wholly present (its record, and rows equal to
//!   its stored answer) or wholly absent (no record, rows as the acknowledged requests left them);
//!   a round killed at a kill point finds the killed request present;
//! - no request record exists that no client sent;
//! - each region's rows, and what GetRegion/ListRegions answer, are exactly what the client's
//!   acknowledged (and committed in-flight) requests made them;
//! - the kernel's observed policy of every range equals the stored intent (no Reconcile first):
//!   as GetRegion reports it, and for the regions of the first HOLDING clients, whose files this
//!   test holds (acquired through the handoff socket, as a VMM would) so that their memory and
//!   its policy outlive the agent, as read through the test's own new mapping of the file.
//!
//! Only then: the in-flight request is retried (a committed one answers as stored), every
//! acknowledged one is retried with its request_id and answers the same; after Reconcile the
//! kernel still matches, and the agent holds no more fds than its regions need.

// Without the `failpoints` feature only a failing stub of the test is built.
#![cfg_attr(not(feature = "failpoints"), allow(dead_code, unused_imports))]

mod common;

use common::procfs::fds_of;
use common::sqlite;
use common::{AgentProc, MIB};
use memplace_client::handoff::Handoff;
use memplace_client::{Client, pb};
use memplace_server::kernel::Mapping;
use prost::Message;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

const CLIENTS: usize = 32;
const ROUNDS: usize = 50;
const REGION: u64 = 4 * MIB;
const PAGES: u64 = REGION / 4096;
const NAMES: [&str; 2] = ["r0", "r1"];
/// Clients whose regions this test process holds, so their memory and the kernel's policy on it
/// outlive the agent (the others' files are recreated by each restart).
const HOLDING: usize = 16;

/// What a region must look like: its generation and intended ranges.
#[derive(Clone, Debug, PartialEq)]
struct Shape {
    uid: String,
    generation: u64,
    ranges: Vec<(u64, u64, Option<pb::Policy>)>,
}

fn shape(r: &pb::Region) -> Shape {
    Shape {
        uid: r.uid.clone(),
        generation: r.generation,
        ranges: r
            .ranges
            .iter()
            .map(|x| (x.offset, x.length, x.intended.clone()))
            .collect(),
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create(pb::CreateRegionRequest),
    Set(pb::SetPolicyRequest),
    Delete(pb::DeleteRegionRequest),
}

impl Op {
    fn name(&self) -> &str {
        match self {
            Op::Create(r) => &r.name,
            Op::Set(r) => &r.name,
            Op::Delete(r) => &r.name,
        }
    }
    fn request_id(&self) -> &str {
        match self {
            Op::Create(r) => &r.request_id,
            Op::Set(r) => &r.request_id,
            Op::Delete(r) => &r.request_id,
        }
    }
    /// The method name the agent stores with the request record.
    fn method(&self) -> &'static str {
        match self {
            Op::Create(_) => "CreateRegion",
            Op::Set(_) => "SetPolicy",
            Op::Delete(_) => "DeleteRegion",
        }
    }
}

/// The answer of a mutation, reduced to what must be the same on a retry.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    Region(Shape),
    Deleted(String),
}

async fn send(c: &mut Client, op: &Op) -> Result<Answer, tonic::Status> {
    let r = c.raw();
    Ok(match op {
        Op::Create(q) => Answer::Region(shape(
            &r.create_region(q.clone())
                .await?
                .into_inner()
                .region
                .unwrap(),
        )),
        Op::Set(q) => Answer::Region(shape(
            &r.set_policy(q.clone()).await?.into_inner().region.unwrap(),
        )),
        Op::Delete(q) => Answer::Deleted(
            r.delete_region(q.clone())
                .await?
                .into_inner()
                .region
                .unwrap()
                .uid,
        ),
    })
}

/// One client's view: the regions its acknowledged requests made, the acknowledged requests of
/// this round, and the request it had in flight when the agent died.
#[derive(Default)]
struct ClientLog {
    model: HashMap<String, Shape>,
    acked: Vec<(Op, Answer)>,
    in_flight: Option<Op>,
    /// For the first HOLDING clients: the file of each region, acquired through the handoff
    /// socket (by name: the region's uid and the fd), as a VMM holds it.
    held: HashMap<String, (String, OwnedFd)>,
}

fn vm(t: usize) -> String {
    format!("c{t}")
}

fn random_policy(rng: &mut impl Rng) -> pb::Policy {
    use pb::PolicyMode as M;
    let (mode, nodes) = match rng.random_range(0..5) {
        0 => (M::Bind, vec![0]),
        1 => (M::Preferred, vec![0]),
        2 => (M::Interleave, vec![0]),
        3 => (M::Local, vec![]),
        _ => (M::Default, vec![]),
    };
    pb::Policy {
        mode: mode as i32,
        nodes,
        ..Default::default()
    }
}

fn next_op(t: usize, round: usize, step: usize, log: &ClientLog, rng: &mut impl Rng) -> Op {
    let name = NAMES[rng.random_range(0..NAMES.len())].to_string();
    let request_id = format!("t{t}-r{round}-s{step}");
    if !log.model.contains_key(&name) {
        return Op::Create(pb::CreateRegionRequest {
            vm_id: vm(t),
            name,
            size_bytes: REGION,
            backend: pb::Backend::Memfd as i32,
            request_id,
            ..Default::default()
        });
    }
    if rng.random_range(0..10) < 7 {
        let page = rng.random_range(0..PAGES);
        let pages = rng.random_range(1..=PAGES - page);
        Op::Set(pb::SetPolicyRequest {
            vm_id: vm(t),
            name,
            offset: page * 4096,
            length: pages * 4096,
            policy: Some(random_policy(rng)),
            request_id,
            ..Default::default()
        })
    } else {
        Op::Delete(pb::DeleteRegionRequest {
            vm_id: vm(t),
            name,
            request_id,
        })
    }
}

fn apply(model: &mut HashMap<String, Shape>, op: &Op, answer: &Answer) {
    match answer {
        Answer::Region(s) => {
            model.insert(op.name().to_string(), s.clone());
        }
        Answer::Deleted(_) => {
            model.remove(op.name());
        }
    }
}

/// Runs one client until the agent dies (or it has done 200 steps).
async fn load(t: usize, round: usize, socket: std::path::PathBuf, mut log: ClientLog) -> ClientLog {
    log.acked.clear();
    log.in_flight = None;
    let Ok(mut c) = Client::connect_unix(&socket).await else {
        return log;
    };
    c.retries = 0;
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    for step in 0..200 {
        let op = next_op(t, round, step, &log, &mut rng);
        log.in_flight = Some(op.clone());
        match send(&mut c, &op).await {
            Ok(answer) => {
                apply(&mut log.model, &op, &answer);
                log.acked.push((op, answer));
                log.in_flight = None;
            }
            Err(s) => {
                // Only the agent's death may stop a client: any refusal is a bug in the test or
                // the agent, and is reported.
                assert!(
                    matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                            | tonic::Code::Internal
                    ) && !s.message().contains("invalid"),
                    "client {t}: {op:?} refused: {s:?}"
                );
                return log;
            }
        }
    }
    log
}

/// How a round's agent dies.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// SIGKILL from the test after a random sleep.
    Sigkill,
    /// The agent ends itself at this kill point, after letting this many passes through.
    KillPoint(&'static str, u64),
}

/// Runs `sqlite3 -readonly -json` on the agent's database: one JSON object per row.
fn sql(agent: &AgentProc, query: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let out = sqlite::query(&agent.state_dir().join("memplace.db"), &["-json"], query);
    if out.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str::<Vec<serde_json::Map<String, serde_json::Value>>>(&out)
        .unwrap_or_else(|e| panic!("sqlite3 {query:?} printed {out:?}: {e}"))
}

fn text(row: &serde_json::Map<String, serde_json::Value>, col: &str) -> String {
    row[col]
        .as_str()
        .unwrap_or_else(|| panic!("column {col} of {row:?} is not text"))
        .to_string()
}

fn int(row: &serde_json::Map<String, serde_json::Value>, col: &str) -> u64 {
    row[col]
        .as_u64()
        .unwrap_or_else(|| panic!("column {col} of {row:?} is not a non-negative integer"))
}

/// A policy as the database spells it (mode name, numactl node list), in API form.
fn policy_from_db(row: &serde_json::Map<String, serde_json::Value>) -> pb::Policy {
    use pb::PolicyMode as M;
    let mode = match text(row, "mode").as_str() {
        "default" => M::Default,
        "bind" => M::Bind,
        "preferred" => M::Preferred,
        "interleave" => M::Interleave,
        "preferred-many" => M::PreferredMany,
        "weighted-interleave" => M::WeightedInterleave,
        "local" => M::Local,
        other => panic!("unknown stored policy mode {other:?} in {row:?}"),
    };
    let mut nodes = Vec::new();
    for part in text(row, "nodes").split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) = (a.parse().unwrap(), b.parse().unwrap());
        nodes.extend(a..=b);
    }
    pb::Policy {
        mode: mode as i32,
        nodes,
        static_nodes: int(row, "static_nodes") != 0,
        relative_nodes: int(row, "relative_nodes") != 0,
    }
}

type Key = (String, String);

/// Every region's shape as the database holds it, by (vm_id, name), and its recorded holder pid.
/// Every region must be active.
fn db_regions(agent: &AgentProc) -> (HashMap<Key, Shape>, HashMap<Key, Option<u64>>) {
    let mut out = HashMap::new();
    let mut holders = HashMap::new();
    for row in sql(
        agent,
        "SELECT vm_id, name, uid, generation, status, holder_pid FROM regions",
    ) {
        assert_eq!(text(&row, "status"), "active", "stored region {row:?}");
        holders.insert(
            (text(&row, "vm_id"), text(&row, "name")),
            row["holder_pid"].as_u64(),
        );
        out.insert(
            (text(&row, "vm_id"), text(&row, "name")),
            Shape {
                uid: text(&row, "uid"),
                generation: int(&row, "generation"),
                ranges: Vec::new(),
            },
        );
    }
    for row in sql(
        agent,
        "SELECT vm_id, name, offset_bytes, length_bytes, mode, nodes, static_nodes, \
         relative_nodes FROM ranges ORDER BY vm_id, name, offset_bytes",
    ) {
        let key = (text(&row, "vm_id"), text(&row, "name"));
        let region = out
            .get_mut(&key)
            .unwrap_or_else(|| panic!("stored range without its region: {row:?}"));
        region.ranges.push((
            int(&row, "offset_bytes"),
            int(&row, "length_bytes"),
            Some(policy_from_db(&row)),
        ));
    }
    (out, holders)
}

/// The stored request records of one round, by request_id: the method and the stored answer.
fn db_requests(agent: &AgentProc, round: usize) -> HashMap<String, (String, Answer)> {
    let mut out = HashMap::new();
    for row in sql(
        agent,
        &format!(
            "SELECT request_id, method, hex(response) AS response FROM requests \
             WHERE request_id LIKE 't%-r{round}-s%'"
        ),
    ) {
        let hex = text(&row, "response");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let method = text(&row, "method");
        let region = match method.as_str() {
            "CreateRegion" => pb::CreateRegionResponse::decode(bytes.as_slice()).map(|r| r.region),
            "SetPolicy" => pb::SetPolicyResponse::decode(bytes.as_slice()).map(|r| r.region),
            "DeleteRegion" => pb::DeleteRegionResponse::decode(bytes.as_slice()).map(|r| r.region),
            other => panic!("request record of unknown method {other:?}: {row:?}"),
        }
        .unwrap_or_else(|e| panic!("stored answer of {row:?} does not decode: {e}"))
        .unwrap_or_else(|| panic!("stored answer of {row:?} has no region"));
        let answer = if method == "DeleteRegion" {
            Answer::Deleted(region.uid)
        } else {
            Answer::Region(shape(&region))
        };
        out.insert(text(&row, "request_id"), (method, answer));
    }
    out
}

/// The agent's open fds by kind: memfd files, the state database files, and everything else
/// (sockets, epoll, eventfd, pipes).
fn fds(pid: u32) -> (usize, usize, Vec<String>) {
    let (mut memfds, mut db, mut other) = (0, 0, Vec::new());
    for (t, _) in fds_of(pid) {
        if t.starts_with("/memfd:memplace:") {
            memfds += 1;
        } else if t.contains("memplace.db") {
            db += 1;
        } else {
            other.push(t);
        }
    }
    other.sort();
    (memfds, db, other)
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn acknowledged_mutations_survive_sigkill_and_in_flight_ones_are_all_or_nothing() {
    panic!(
        "this test needs the agent's kill points: run it with `--features memplace-server/failpoints` \
         (as .ci/test does), e.g. cargo test -p memplace-server --features failpoints --test crash_consistency"
    );
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_mutations_survive_sigkill_and_in_flight_ones_are_all_or_nothing() {
    use memplace_server::failpoint;
    let mut agent = AgentProc::start();
    let mut logs: Vec<ClientLog> = (0..CLIENTS).map(|_| ClientLog::default()).collect();
    let mut rng = rand::rng();
    // Checked before any retry: acknowledged mutations found in the database with their answer,
    // in-flight ones found committed or absent, regions compared with the database and the RPCs.
    let (mut acked_durable, mut in_flight_present, mut in_flight_absent) = (0, 0, 0);
    let (mut regions_durable, mut ranges_no_reconcile) = (0, 0);
    // After the retries.
    let mut acked_retried = 0;
    let (mut ranges_checked, mut regions_checked) = (0, 0);
    let mut fd_overhead: Option<usize> = None;
    let mut fds_checked = 0;
    let mut points_hit: HashMap<&'static str, usize> = HashMap::new();
    let mut sigkills = 0;
    let mut point_rounds = 0;
    let mut killed_committed = 0;
    let (mut acquired, mut held_ranges) = (0, 0);
    for round in 0..ROUNDS {
        // Three rounds in four die at a kill point (each point in turn), the fourth by SIGKILL.
        let death = if round % 4 == 3 {
            Death::Sigkill
        } else {
            let point = failpoint::POINTS[point_rounds % failpoint::POINTS.len()];
            point_rounds += 1;
            Death::KillPoint(point, rng.random_range(0..30))
        };
        // Where this round's agent log starts, to find the kill point's line.
        let log_start = std::fs::metadata(agent.log()).map_or(0, |m| m.len()) as usize;
        if let Death::KillPoint(point, skip) = death {
            // The agent that served the last checks is unarmed: its retries must not die.
            agent.kill();
            agent.spawn_with_env(&[("MEMPLACE_FAILPOINT", &format!("{point}:{skip}"))]);
        }
        let tasks: Vec<_> = logs
            .drain(..)
            .enumerate()
            .map(|(t, log)| tokio::spawn(load(t, round, agent.socket(), log)))
            .collect();
        match death {
            Death::Sigkill => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
                agent.kill();
                sigkills += 1;
                for task in tasks {
                    logs.push(task.await.expect("client task"));
                }
            }
            Death::KillPoint(point, skip) => {
                for task in tasks {
                    logs.push(task.await.expect("client task"));
                }
                // Every client has stopped: each saw the agent die, or ran all its steps.
                assert!(
                    logs.iter().any(|l| l.in_flight.is_some()),
                    "round {round}: kill point {point} (after {skip} passes) was never hit: \
                     every client ran all its steps"
                );
                let status = agent.wait_exit(Duration::from_secs(60)).unwrap_or_else(|| {
                    panic!("round {round}: clients saw the agent fail, but it still runs (kill point {point})")
                });
                assert_eq!(
                    status.code(),
                    failpoint::exit_status(point),
                    "round {round}: the agent did not end at kill point {point}: {status}"
                );
                *points_hit.entry(point).or_default() += 1;
            }
        }
        // The requests the kill point ended the agent in, as it logged them.
        let killed_in: Vec<String> = match death {
            Death::Sigkill => Vec::new(),
            Death::KillPoint(point, _) => {
                let log = std::fs::read(agent.log()).expect("agent log");
                let marker = format!("kill point {point} hit by request \"");
                let ids: Vec<String> = String::from_utf8_lossy(&log[log_start.min(log.len())..])
                    .lines()
                    .filter_map(|l| l.split_once(&marker))
                    .map(|(_, rest)| rest.split('"').next().unwrap_or_default().to_string())
                    .collect();
                assert!(
                    !ids.is_empty(),
                    "round {round}: the agent exited with the status of {point} but did not log it"
                );
                ids
            }
        };
        agent.spawn();
        let mut c = agent.client().await;
        c.retries = 0;
        let handoff = Handoff::connect(agent.handoff_socket()).expect("handoff socket");

        // 1. Before any retry or reconcile: the database against each client's model.
        let (stored, holders) = db_regions(&agent);
        let requests = db_requests(&agent, round);
        let mut sent = std::collections::HashSet::new();
        let mut killed_found = 0;
        let mut committed: Vec<Option<Answer>> = Vec::with_capacity(CLIENTS);
        let mut rows_seen = 0;
        for (t, log) in logs.iter().enumerate() {
            for (op, answer) in &log.acked {
                let (method, first) = requests.get(op.request_id()).unwrap_or_else(|| {
                    panic!("client {t}: acknowledged {op:?} has no request record: the acknowledgement was lost")
                });
                assert_eq!(method, op.method(), "client {t}: {op:?}");
                assert_eq!(
                    first, answer,
                    "client {t}: {op:?}: the stored answer differs from the acknowledged one"
                );
                sent.insert(op.request_id().to_string());
                acked_durable += 1;
            }
            // The request in flight: its record and its rows (checked below) together, or
            // neither.
            let mut expected = log.model.clone();
            let found = log.in_flight.as_ref().and_then(|op| {
                sent.insert(op.request_id().to_string());
                requests.get(op.request_id()).map(|(method, first)| {
                    assert_eq!(method, op.method(), "client {t}: {op:?}");
                    (op, first.clone())
                })
            });
            if let Some((op, first)) = &found {
                let before = log.model.get(op.name());
                match (op, first, before) {
                    (Op::Create(_), Answer::Region(s), None) => assert_eq!(s.generation, 1),
                    (Op::Set(_), Answer::Region(s), Some(b)) => assert!(
                        s.uid == b.uid && s.generation == b.generation + 1,
                        "client {t}: {op:?} stored {s:?} over {b:?}"
                    ),
                    (Op::Delete(_), Answer::Deleted(uid), Some(b)) => assert_eq!(uid, &b.uid),
                    _ => panic!("client {t}: {op:?} stored {first:?} over {before:?}"),
                }
                apply(&mut expected, op, first);
                in_flight_present += 1;
                if killed_in.iter().any(|id| id == op.request_id()) {
                    killed_found += 1;
                }
            } else if log.in_flight.is_some() {
                in_flight_absent += 1;
            }
            committed.push(found.map(|(_, a)| a));
            let rows: HashMap<String, Shape> = stored
                .iter()
                .filter(|((vm_id, _), _)| *vm_id == vm(t))
                .map(|((_, name), s)| (name.clone(), s.clone()))
                .collect();
            assert_eq!(
                rows, expected,
                "client {t} after round {round}: the database differs from what the client's \
                 acknowledged (and committed in-flight) requests made"
            );
            regions_durable += rows.len();
            rows_seen += rows.len();
            // The read-only RPCs answer the same.
            let listed: HashMap<String, Shape> = c
                .list_regions(&vm(t))
                .await
                .unwrap()
                .iter()
                .map(|r| (r.name.clone(), shape(r)))
                .collect();
            assert_eq!(
                listed, expected,
                "client {t} after round {round}: ListRegions"
            );
            for (name, s) in &expected {
                let got = c.get_region(&vm(t), name).await.unwrap();
                assert_eq!(
                    &shape(&got),
                    s,
                    "client {t} after round {round}: GetRegion {name}"
                );
            }
        }
        let unsent: Vec<_> = requests.keys().filter(|id| !sent.contains(*id)).collect();
        assert!(
            unsent.is_empty(),
            "round {round}: request records no client sent: {unsent:?}"
        );
        // The request a kill point (after the commit) ended the agent in was in flight, with
        // that kill point's method, and it is in the database.
        killed_committed += killed_found;
        if let Death::KillPoint(point, _) = death {
            assert_eq!(
                killed_found,
                killed_in.len(),
                "round {round}: the agent ended at {point}, after the commit of request(s) \
                 {killed_in:?}, but not all of them are in flight and in the database"
            );
            for id in &killed_in {
                let (method, _) = &requests[id];
                assert!(
                    point.starts_with(&format!("{method}.")),
                    "round {round}: kill point {point} hit in a {method} request {id}"
                );
            }
        }
        assert_eq!(
            stored.len(),
            rows_seen,
            "round {round}: the database holds regions of no client: {stored:?}"
        );

        // 2. The kernel, still before any retry or reconcile: recovery bound every range.
        let regions = c.list_regions("").await.unwrap();
        assert_eq!(
            regions.len(),
            stored.len(),
            "round {round}: regions listed vs stored"
        );
        for r in &regions {
            for x in &r.ranges {
                assert_eq!(
                    x.observed, x.intended,
                    "round {round}: {}/{} range {}+{}: after restart, before any retry or \
                     reconcile, the kernel differs from intent",
                    r.vm_id, r.name, x.offset, x.length
                );
                ranges_no_reconcile += 1;
            }
        }

        // The held files, read through a new mapping in this process: the memory outlived the
        // agent, and recovery bound each range of it as the database says (no reconcile first).
        for (t, log) in logs.iter_mut().take(HOLDING).enumerate() {
            // A region deleted (or deleted and made again) is no longer held.
            log.held.retain(|name, (uid, _)| {
                stored
                    .get(&(vm(t), name.clone()))
                    .is_some_and(|s| s.uid == *uid)
            });
            for (name, (_, fd)) in &log.held {
                let key = (vm(t), name.clone());
                assert_eq!(
                    holders[&key],
                    Some(u64::from(std::process::id())),
                    "round {round}: {key:?} is held by this test, the database says otherwise"
                );
                let m = Mapping::new(fd.as_fd(), REGION).expect("mapping a held file");
                for (offset, length, intended) in &stored[&key].ranges {
                    let intended = memplace_server::convert::policy_from_pb(intended.as_ref())
                        .expect("stored policy");
                    for at in [*offset, offset + length / 2, offset + length - 4096] {
                        let at = at / 4096 * 4096;
                        assert_eq!(
                            m.policy_at(at).expect("get_mempolicy on a held file"),
                            Some(intended),
                            "round {round}: held {key:?} at {at:#x} (range {offset}+{length}): \
                             after restart, before any retry or reconcile, the kernel differs \
                             from intent"
                        );
                    }
                    held_ranges += 1;
                }
            }
        }

        // 3. Retries: the in-flight request answers as stored (or is done now), and every
        // acknowledged one answers the same.
        for ((t, log), first) in logs.iter_mut().enumerate().zip(committed) {
            if let Some(op) = log.in_flight.take() {
                let retried = send(&mut c, &op)
                    .await
                    .unwrap_or_else(|e| panic!("client {t}: retrying {op:?}: {e:?}"));
                if let Some(first) = first {
                    assert_eq!(
                        retried, first,
                        "client {t}: committed in-flight {op:?} answered differently on retry"
                    );
                }
                apply(&mut log.model, &op, &retried);
                log.acked.push((op, retried));
            }
            for (op, answer) in &log.acked {
                let again = send(&mut c, op)
                    .await
                    .unwrap_or_else(|e| panic!("client {t}: retrying acked {op:?}: {e:?}"));
                assert_eq!(&again, answer, "client {t}: {op:?} answered differently");
                acked_retried += 1;
            }
            let listed: HashMap<String, Shape> = c
                .list_regions(&vm(t))
                .await
                .unwrap()
                .iter()
                .map(|r| (r.name.clone(), shape(r)))
                .collect();
            assert_eq!(
                listed, log.model,
                "client {t} after round {round} and retries"
            );
            // Hold every region of the holding clients, as a VMM would, before the next load.
            if t < HOLDING {
                log.held
                    .retain(|name, (uid, _)| log.model.get(name).is_some_and(|s| s.uid == *uid));
                for (name, s) in &log.model {
                    if log.held.contains_key(name) {
                        continue;
                    }
                    let token = c
                        .raw()
                        .issue_handoff_token(pb::IssueHandoffTokenRequest { vm_id: vm(t) })
                        .await
                        .unwrap()
                        .into_inner()
                        .handoff_token;
                    let got = handoff
                        .acquire(&vm(t), name, &token)
                        .unwrap_or_else(|e| panic!("client {t}: acquiring {name}: {e}"));
                    assert_eq!(got.region.uid, s.uid, "client {t}: acquired {name}");
                    log.held.insert(name.clone(), (s.uid.clone(), got.fd));
                    acquired += 1;
                }
            }
        }

        // 4. The kernel agrees with the database after a reconcile.
        c.reconcile("").await.unwrap();
        let regions = c.list_regions("").await.unwrap();
        for r in &regions {
            for x in &r.ranges {
                assert_eq!(
                    x.observed, x.intended,
                    "{}/{} range {}+{}: kernel differs from intent",
                    r.vm_id, r.name, x.offset, x.length
                );
                ranges_checked += 1;
            }
            regions_checked += 1;
        }

        // Fds: exactly one memfd per region, at most 3 per SQLite connection (db, wal, and a
        // journal), and no more sockets/pipes/anon inodes than the first round had once the
        // clients are gone.
        drop(c);
        drop(handoff);
        let pid = agent.pid();
        let mut seen = fds(pid);
        for _ in 0..100 {
            if fd_overhead.is_none_or(|base| seen.2.len() <= base) {
                break;
            }
            // Connection fds close asynchronously after the client hangs up.
            tokio::time::sleep(Duration::from_millis(20)).await;
            seen = fds(pid);
        }
        let (memfds, db, other) = seen;
        assert_eq!(memfds, regions.len(), "round {round}: one memfd per region");
        assert!(db <= 3 * 5, "round {round}: {db} database fds");
        match fd_overhead {
            None => fd_overhead = Some(other.len()),
            Some(base) => assert!(
                other.len() <= base,
                "round {round}: {} other fds, round 0 had {base}: {other:?}",
                other.len()
            ),
        }
        fds_checked += 1;
    }
    let hits: usize = points_hit.values().sum();
    let mut per_point: Vec<_> = points_hit
        .iter()
        .map(|(p, n)| format!("{p} x{n}"))
        .collect();
    per_point.sort();
    // Written to the process's stderr, not through `println!`, which the test harness captures
    // for a passing test: the README test command's log shows these counts on every run.
    let _ = writeln!(
        std::io::stderr(),
        "crash_consistency: {ROUNDS} rounds with {CLIENTS} clients: {sigkills} random SIGKILLs and {hits} kill \
         points hit ({}); the request each killed was found in flight and committed \
         {killed_committed} times.\n\
         Before any retry: {acked_durable} acknowledged mutations checked in the database, \
         {in_flight_present} in-flight found committed and {in_flight_absent} absent, \
         {regions_durable} regions matched the database, ListRegions and GetRegion, \
         {ranges_no_reconcile} ranges matched the kernel without a reconcile (GetRegion), \
         {held_ranges} ranges of files held by this test read back through its own mapping.\n\
         After: {acked_retried} acknowledged mutations retried with the same answer, \
         {regions_checked} regions and {ranges_checked} ranges matched the kernel after \
         Reconcile, {acquired} acquires, fds checked {fds_checked} times (other fds {})",
        per_point.join(", "),
        fd_overhead.unwrap_or(0)
    );
    assert_eq!(
        hits, point_rounds,
        "every kill-point round ended at its kill point"
    );
    for point in failpoint::POINTS {
        assert!(
            points_hit.get(point).copied().unwrap_or(0) >= 2,
            "kill point {point} was hit fewer than twice: {points_hit:?}"
        );
    }
    assert!(acked_durable > 0 && in_flight_present > 0 && regions_durable > 0);
    assert!(ranges_no_reconcile > 0 && held_ranges > 0 && regions_checked > 0);
}

/// A kill point that cannot fire (unknown name, bad count) stops the agent at start with a
/// message (`--check-config` checks it too), so the crash test cannot arm one by mistake.
#[cfg(feature = "failpoints")]
#[test]
fn a_malformed_kill_point_stops_the_agent_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for (spec, says) in [
        ("SetPolicy.after-comit:3", "no kill point"),
        ("SetPolicy.after-commit:x", "is not a count"),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_memplaced"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--runtime-dir")
            .arg(dir.path().join("run"))
            .args(["--metrics-addr", "off", "--check-config"])
            .env("MEMPLACE_FAILPOINT", spec)
            .output()
            .expect("running memplaced");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{spec}: {o:?}");
        assert!(err.contains(says), "{spec}: {err}");
    }
}
