//! SIGKILL under load, 50 times. 32 clients create, re-police and delete their own regions
//! concurrently while the agent is killed at a random moment. After each restart:
//! - every acknowledged mutation is there: retried with its request_id it returns the same answer;
//! - the one request each client had in flight is wholly present or wholly absent: the region's
//!   rows and the stored answer agree, and the retry either replays or does it now;
//! - each region's intent is exactly what the acknowledged requests made it;
//! - after Reconcile the kernel's observed policy of every range equals the stored intent;
//! - the agent holds no more fds than its regions need.

mod common;

use common::{AgentProc, MIB};
use memplace_client::{Client, pb};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::Duration;

const CLIENTS: usize = 32;
const ROUNDS: usize = 50;
const REGION: u64 = 4 * MIB;
const PAGES: u64 = REGION / 4096;
const NAMES: [&str; 2] = ["r0", "r1"];

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

/// The agent's open fds by kind: memfd files, the state database files, and everything else
/// (sockets, epoll, eventfd, pipes).
fn fds(pid: u32) -> (usize, usize, Vec<String>) {
    let (mut memfds, mut db, mut other) = (0, 0, Vec::new());
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(target) = std::fs::read_link(e.unwrap().path()) else {
            continue;
        };
        let t = target.display().to_string();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_mutations_survive_sigkill_and_in_flight_ones_are_all_or_nothing() {
    let mut agent = AgentProc::start();
    let mut logs: Vec<ClientLog> = (0..CLIENTS).map(|_| ClientLog::default()).collect();
    let mut rng = rand::rng();
    let (mut acked_checked, mut in_flight_present, mut in_flight_absent) = (0, 0, 0);
    let (mut ranges_checked, mut regions_checked) = (0, 0);
    let mut fd_overhead: Option<usize> = None;
    let mut fds_checked = 0;
    for round in 0..ROUNDS {
        // Load, then SIGKILL at a random moment.
        let tasks: Vec<_> = logs
            .drain(..)
            .enumerate()
            .map(|(t, log)| tokio::spawn(load(t, round, agent.socket(), log)))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
        agent.kill();
        for task in tasks {
            logs.push(task.await.expect("client task"));
        }
        agent.spawn();
        let mut c = agent.client().await;
        c.retries = 0;

        for (t, log) in logs.iter_mut().enumerate() {
            // The request in flight: wholly there (its rows and its stored answer agree) or
            // wholly absent (the region is as the acknowledged requests left it).
            if let Some(op) = log.in_flight.take() {
                let before = log.model.get(op.name()).cloned();
                let now = c
                    .get_region(&vm(t), op.name())
                    .await
                    .ok()
                    .map(|r| shape(&r));
                let retried = send(&mut c, &op)
                    .await
                    .unwrap_or_else(|e| panic!("client {t}: retrying {op:?}: {e:?}"));
                if now == before {
                    in_flight_absent += 1;
                } else {
                    match (&retried, &now) {
                        (Answer::Region(s), Some(n)) => assert_eq!(
                            s, n,
                            "client {t}: {op:?} is half-written: stored answer and rows differ"
                        ),
                        (Answer::Deleted(_), None) => {}
                        _ => panic!("client {t}: {op:?} left {now:?}, retry answered {retried:?}"),
                    }
                    in_flight_present += 1;
                }
                apply(&mut log.model, &op, &retried);
                log.acked.push((op, retried));
            }
            // Every acknowledged mutation answers the same when retried.
            for (op, answer) in &log.acked {
                let again = send(&mut c, op)
                    .await
                    .unwrap_or_else(|e| panic!("client {t}: retrying acked {op:?}: {e:?}"));
                assert_eq!(&again, answer, "client {t}: {op:?} answered differently");
                acked_checked += 1;
            }
            // The regions are exactly what the acknowledged requests made them.
            let stored: HashMap<String, Shape> = c
                .list_regions(&vm(t))
                .await
                .unwrap()
                .iter()
                .map(|r| (r.name.clone(), shape(r)))
                .collect();
            assert_eq!(stored, log.model, "client {t} after round {round}");
        }

        // The kernel agrees with the database after a reconcile.
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
    println!(
        "{ROUNDS} SIGKILL rounds with {CLIENTS} clients: {acked_checked} acknowledged mutations \
         retried, {in_flight_present} in-flight found whole, {in_flight_absent} found absent, \
         {regions_checked} regions and {ranges_checked} ranges matched the kernel, fds checked \
         {fds_checked} times (other fds {})",
        fd_overhead.unwrap_or(0)
    );
    assert!(acked_checked > 0 && regions_checked > 0);
}
