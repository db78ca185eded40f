//! The memplace benchmark table: six figures, each measured in one run beside its floor (the same
//! kernel or SQLite work done directly in a tight loop) or its peer (another program doing the
//! same job), and reported as a ratio. It starts the real `memplaced` (release build) on a temp
//! socket, talks to it with the real client, and prints the table. Nothing here asserts: a missed
//! goal is printed as missed. See server/BENCHMARKS.md.
//!
//! Run: `cargo bench -p memplace-server --bench table`.
//!
//! Environment (for development; the reported run uses the defaults):
//! - `MEMPLACE_BENCH_ONLY=P1,P4`: run only these rows.
//! - `MEMPLACE_BENCH_POPULATE_BYTES`: size for P1 and P5 (default 4 GiB, halved while memory is short).
//! - `MEMPLACE_BENCH_REGIONS`: regions for P4 and P6 (default 1000).
//! - `MEMPLACE_BENCH_IDLE_SECS`: P6 duration (default 60).
//! - `MEMPLACE_BENCH_RECONCILE_SECS`: P6 reconcile interval (default 1).
//! - `MEMPLACE_BENCH_SECS`: duration of each P3 side (default 5).
//! - `MEMPLACE_BENCH_REQUESTS`: SetPolicy requests per P2 client (default 200).
#![forbid(unsafe_code)]

use memplace_client::handoff::Handoff;
use memplace_client::{Client, pb};
use memplace_server::domain::{NodeSet, Policy, PolicyMode};
use memplace_server::kernel::{self, GuestMemfdVm, Mapping, mempolicy};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const CLIENTS: usize = 32;
const RANGES: u64 = 16;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn selected(row: &str) -> bool {
    match std::env::var("MEMPLACE_BENCH_ONLY") {
        Ok(v) if !v.is_empty() => v.split(',').any(|r| r.trim().eq_ignore_ascii_case(row)),
        _ => true,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn policy(mode: PolicyMode) -> Policy {
    let nodes = if mode.takes_nodes() {
        NodeSet::from_ids([0]).expect("node 0")
    } else {
        NodeSet::new()
    };
    Policy::new(mode, nodes)
}

fn pb_policy(mode: pb::PolicyMode) -> pb::Policy {
    pb::Policy {
        mode: mode as i32,
        nodes: vec![0],
        static_nodes: false,
        relative_nodes: false,
    }
}

/// One row of the table.
struct Row {
    id: &'static str,
    what: String,
    measured: String,
    against: String,
    ratio: String,
    goal: &'static str,
    met: bool,
    notes: Vec<String>,
}

/// The real memplaced on a temp socket, with its state on the same disk as the target dir.
struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Agent {
    fn start(args: &[&str]) -> (Self, Duration) {
        let dir = tempfile::Builder::new()
            .prefix("bench")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("temp dir");
        let mut a = Agent {
            child: None,
            dir,
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        let t = a.spawn();
        (a, t)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn socket(&self) -> PathBuf {
        self.path().join("run/memplace.sock")
    }
    fn handoff_socket(&self) -> PathBuf {
        self.path().join("run/handoff.sock")
    }
    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Starts the binary; returns the time until its gRPC socket accepts (the agent recovers every
    /// region before it binds, so this is the restart time).
    fn spawn(&mut self) -> Duration {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("memplaced.log"))
            .expect("log file");
        let start = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_memplaced"))
            .arg("--state-dir")
            .arg(self.path().join("state"))
            .arg("--runtime-dir")
            .arg(self.path().join("run"))
            .args(["--metrics-addr", "off"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning memplaced");
        self.child = Some(child);
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                let log = std::fs::read_to_string(self.path().join("memplaced.log"));
                panic!("memplaced exited with {st}: {}", log.unwrap_or_default());
            }
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "memplaced did not open its socket in 120 s"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn client(&self) -> Client {
        Client::connect_unix(self.socket()).await.expect("connect")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn main() {
    // `cargo bench` passes --bench; anything else (a test run of this target) does nothing.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("table: run with `cargo bench -p memplace-server --bench table`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rows = rt.block_on(run());
    print_table(&rows);
}

async fn run() -> Vec<Row> {
    println!("memplace benchmark table");
    println!(
        "machine: kernel {}, {} cpus, {} GiB RAM ({:.1} GiB available), memplaced {}",
        kernel::kernel_release(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        meminfo("MemTotal:") / GIB,
        meminfo("MemAvailable:") as f64 / GIB as f64,
        env!("CARGO_BIN_EXE_memplaced"),
    );
    let (empty, empty_start) = Agent::start(&["--reconcile-interval-secs", "0"]);
    drop(empty);
    println!(
        "empty agent start (exec, database open, probes, bind): {:.1} ms",
        ms(empty_start)
    );
    let mut rows = Vec::new();
    let size = populate_size();
    if selected("P1") {
        rows.push(p1(size).await);
    }
    if selected("P2") || selected("P3") {
        let (p2, p3) = p2_p3().await;
        rows.extend(p2);
        rows.extend(p3);
    }
    if selected("P5") {
        rows.push(p5(size).await);
    }
    if selected("P4") || selected("P6") {
        rows.extend(p4_p6(empty_start).await);
    }
    rows
}

/// 4 GiB unless memory is short: each side of P1 and P5 needs the size once, plus headroom.
fn populate_size() -> u64 {
    let mut size = env_u64("MEMPLACE_BENCH_POPULATE_BYTES", 4 * GIB);
    while size > 256 * MIB && meminfo("MemAvailable:") < size + 2 * GIB {
        size /= 2;
    }
    size
}

fn gib(b: u64) -> String {
    if b >= GIB {
        format!("{} GiB", b / GIB)
    } else {
        format!("{} MiB", b / MIB)
    }
}

// ---------------------------------------------------------------------------------------------
// P1: Populate a guest_memfd through the API against fallocate and a VMM-style prefault.

async fn p1(size: u64) -> Row {
    println!(
        "P1: populate {} guest_memfd, BIND node 0, 2 workers",
        gib(size)
    );
    let floor = run_on_bound_thread(move || {
        let vm = GuestMemfdVm::create().expect("KVM VM");
        let fd = vm
            .create_guest_memfd(size, vm.guest_memfd_flags() & 3)
            .expect("guest_memfd");
        let t = Instant::now();
        kernel::fallocate(fd.as_fd(), 0, size, false).expect("fallocate");
        t.elapsed()
    });
    let prefault = run_on_bound_thread(move || {
        let vm = GuestMemfdVm::create().expect("KVM VM");
        let flags =
            kernel::files::GUEST_MEMFD_FLAG_MMAP | kernel::files::GUEST_MEMFD_FLAG_INIT_SHARED;
        assert_eq!(
            vm.guest_memfd_flags() & flags,
            flags,
            "guest_memfd cannot be mmapped here"
        );
        let fd = vm.create_guest_memfd(size, flags).expect("guest_memfd");
        let map = Mapping::new(fd.as_fd(), size).expect("mmap");
        let t = Instant::now();
        map.populate_write(0, size).expect("MADV_POPULATE_WRITE");
        t.elapsed()
    });

    let (agent, _) = Agent::start(&["--reconcile-interval-secs", "0"]);
    let mut c = agent.client().await;
    // Once without verify (the same job as the fallocate floor), once with it (every page read
    // back from the kernel, as the prefault peer touches every page), each on a fresh file.
    let mut run = async |verify: bool| {
        c.create_region("p1", "gmem", size, pb::Backend::GuestMemfd, vec![])
            .await
            .expect("CreateRegion guest_memfd");
        c.set_policy("p1", "gmem", 0, 0, pb_policy(pb::PolicyMode::Bind), false)
            .await
            .expect("SetPolicy");
        let t = Instant::now();
        let summary = c
            .populate(
                pb::PopulateRequest {
                    vm_id: "p1".into(),
                    name: "gmem".into(),
                    offset: 0,
                    length: 0,
                    threads: 2,
                    cgroup: String::new(),
                    verify,
                },
                |_, _| {},
            )
            .await
            .expect("Populate");
        let api = t.elapsed();
        // Timing a GetPlacement after the populate shows what the proof costs once the pages
        // are zeroed.
        let t = Instant::now();
        let placed = c.placement("p1", "gmem", 0, 0).await.expect("GetPlacement");
        let proof = t.elapsed();
        c.delete_region("p1", "gmem").await.expect("DeleteRegion");
        (api, summary, placed, proof)
    };
    let (quick, quick_summary, quick_placed, _) = run(false).await;
    let (api, summary, _, proof) = run(true).await;
    drop(agent);

    let pages_total = size / kernel::page_size();
    let on0 = |nodes: &[pb::NodePages]| -> (u64, u64) {
        let all = nodes.iter().map(|n| n.pages).sum();
        let on0 = nodes.iter().filter(|n| n.node == 0).map(|n| n.pages).sum();
        (all, on0)
    };
    let (pages, on0_verified) = on0(&summary.nodes);
    let (quick_pages, quick_on0) = on0(&quick_placed.nodes);
    let correct_verified = summary.verified
        && summary.bytes_done == size
        && pages == pages_total
        && on0_verified == pages;
    let correct_quick = !quick_summary.verified
        && quick_summary.nodes.is_empty()
        && quick_summary.bytes_done == size
        && quick_pages == pages_total
        && quick_on0 == quick_pages;
    let correct = correct_verified && correct_quick;

    let r_floor = floor.as_secs_f64() / quick.as_secs_f64();
    let r_pre = prefault.as_secs_f64() / api.as_secs_f64();
    let gbps = |d: Duration| size as f64 / GIB as f64 / d.as_secs_f64();
    Row {
        id: "P1",
        what: format!(
            "Populate {} guest_memfd, BIND 0, 2 workers, gRPC: without verify; with verify",
            gib(size)
        ),
        measured: format!(
            "{:.0} ms ({:.2} GiB/s); {:.0} ms ({:.2} GiB/s)",
            ms(quick),
            gbps(quick),
            ms(api),
            gbps(api)
        ),
        against: format!(
            "fallocate 1 thread {:.0} ms; POPULATE_WRITE {:.0} ms",
            ms(floor),
            ms(prefault)
        ),
        ratio: format!("{r_floor:.2}x floor; {r_pre:.2}x prefault"),
        goal: ">= 1.6x floor, >= 10x prefault",
        met: correct && r_floor >= 1.6 && r_pre >= 10.0,
        notes: vec![
            format!(
                "agent-side elapsed {:.0} ms without verify, {:.0} ms with; verify: {} of {} pages on node 0 in the summary; without: bytes_done {} of {}, no nodes, and a GetPlacement after it found {} of {} pages on node 0 ({})",
                quick_summary.elapsed_seconds * 1e3,
                summary.elapsed_seconds * 1e3,
                on0_verified,
                pages_total,
                quick_summary.bytes_done,
                size,
                quick_on0,
                pages_total,
                if correct { "verified" } else { "WRONG" }
            ),
            format!(
                "floor {:.2} GiB/s, prefault {:.2} GiB/s; a GetPlacement of the populated region after the verified populate takes {:.0} ms",
                gbps(floor),
                gbps(prefault),
                ms(proof)
            ),
        ],
    }
}

/// Runs `f` on a new thread whose task policy is BIND {0}, as the agent's populate workers are
/// (guest_memfd on 6.18 follows the allocating thread's policy).
fn run_on_bound_thread(f: impl FnOnce() -> Duration + Send + 'static) -> Duration {
    std::thread::spawn(move || {
        mempolicy::set_thread_policy(&policy(PolicyMode::Bind)).expect("set_mempolicy");
        f()
    })
    .join()
    .expect("bench thread")
}

// ---------------------------------------------------------------------------------------------
// P2 and P3: durable SetPolicy and GetRegion with 32 clients.

async fn p2_p3() -> (Option<Row>, Option<Row>) {
    let (agent, _) = Agent::start(&["--reconcile-interval-secs", "0"]);
    let mut c = agent.client().await;
    for i in 0..CLIENTS {
        c.create_region(
            &format!("p2vm{i}"),
            "ram",
            2 * MIB,
            pb::Backend::Memfd,
            vec![],
        )
        .await
        .expect("CreateRegion");
    }
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(agent.client().await);
    }
    let p2 = if selected("P2") {
        Some(p2(&agent, &mut clients).await)
    } else {
        None
    };
    let p3 = if selected("P3") {
        Some(p3(&agent, &clients).await)
    } else {
        None
    };
    (p2, p3)
}

async fn p2(agent: &Agent, clients: &mut [Client]) -> Row {
    let per_client = env_u64("MEMPLACE_BENCH_REQUESTS", 200) as usize;
    println!("P2: SetPolicy, {CLIENTS} clients x {per_client} requests");
    // Warm up connections and the database pages.
    let _ = set_policy_burst(clients, 5).await;
    let t = Instant::now();
    let mut lat = set_policy_burst(clients, per_client).await;
    let wall = t.elapsed();
    lat.sort();
    let total = lat.len();
    let rps = total as f64 / wall.as_secs_f64();
    let p50 = percentile(&lat, 0.50);
    let p99 = percentile(&lat, 0.99);

    let (floor_commit, floor_n) = sqlite_floor(&agent.path().join("state")).await;
    let floor_rps = 1.0 / floor_commit.as_secs_f64();
    let ratio = rps / floor_rps;
    Row {
        id: "P2",
        what: format!("durable SetPolicy, {CLIENTS} clients, Unix socket"),
        measured: format!(
            "{rps:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
            ms(p50),
            ms(p99)
        ),
        against: format!(
            "sequential SQLite commit {:.2} ms ({floor_rps:.0}/s)",
            ms(floor_commit)
        ),
        ratio: format!("{ratio:.2}x"),
        goal: ">= 3x, p99 <= 5 ms",
        met: ratio >= 3.0 && p99 <= Duration::from_millis(5),
        notes: vec![
            format!(
                "{total} requests in {:.2} s; floor: median of {floor_n} one-row WAL synchronous=FULL commits in {}",
                wall.as_secs_f64(),
                agent.path().join("state").display()
            ),
            format!(
                "max {:.2} ms, p90 {:.2} ms",
                ms(lat[lat.len() - 1]),
                ms(percentile(&lat, 0.90))
            ),
        ],
    }
}

/// Each client sets alternating policies on its own region `n` times; returns every latency.
async fn set_policy_burst(clients: &[Client], n: usize) -> Vec<Duration> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let mut c = c.clone();
        tasks.spawn(async move {
            let vm = format!("p2vm{i}");
            let mut lat = Vec::with_capacity(n);
            for k in 0..n {
                let mode = if k % 2 == 0 {
                    pb::PolicyMode::Interleave
                } else {
                    pb::PolicyMode::Bind
                };
                let t = Instant::now();
                c.set_policy(&vm, "ram", 0, 0, pb_policy(mode), false)
                    .await
                    .expect("SetPolicy");
                lat.push(t.elapsed());
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("client task"));
    }
    all
}

/// The median time of one small write transaction committed on its own (WAL,
/// synchronous=FULL), sequentially, in a database beside the agent's.
async fn sqlite_floor(dir: &Path) -> (Duration, usize) {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    use sqlx::{Connection, SqliteConnection};
    let opts = SqliteConnectOptions::new()
        .filename(dir.join("floor.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full);
    let mut conn = SqliteConnection::connect_with(&opts)
        .await
        .expect("floor db");
    sqlx::query("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        .execute(&mut conn)
        .await
        .expect("create table");
    let n = 500;
    let mut lat = Vec::with_capacity(n);
    let blob = vec![7u8; 256];
    for _ in 0..n {
        let t = Instant::now();
        sqlx::query("INSERT INTO t (v) VALUES (?)")
            .bind(&blob)
            .execute(&mut conn)
            .await
            .expect("insert");
        lat.push(t.elapsed());
    }
    (median(lat), n)
}

async fn p3(agent: &Agent, clients: &[Client]) -> Row {
    let secs = env_u64("MEMPLACE_BENCH_SECS", 5);
    println!("P3: GetRegion, {CLIENTS} clients, {secs} s each side");
    let mut c0 = clients[0].clone();
    let canned = c0.get_region("p2vm0", "ram").await.expect("GetRegion");
    let agent_rps = get_region_load(clients, Duration::from_secs(secs)).await;

    let sock = agent.path().join("echo.sock");
    let echo = EchoServer::start(&sock, canned);
    let mut echo_clients = Vec::new();
    for _ in 0..CLIENTS {
        echo_clients.push(Client::connect_unix(&sock).await.expect("echo connect"));
    }
    let echo_rps = get_region_load(&echo_clients, Duration::from_secs(secs)).await;
    drop(echo);
    let ratio = agent_rps / echo_rps;
    Row {
        id: "P3",
        what: format!("GetRegion, {CLIENTS} clients, Unix socket"),
        measured: format!("{agent_rps:.0} req/s"),
        against: format!("tonic echo of the same Region: {echo_rps:.0} req/s"),
        ratio: format!("{ratio:.2}x"),
        goal: ">= 0.5x",
        met: ratio >= 0.5,
        notes: vec![
            "echo: a NodeAgentService whose GetRegion returns a canned copy of the agent's answer, on its own 2-thread runtime, same client".into(),
        ],
    }
}

async fn get_region_load(clients: &[Client], d: Duration) -> f64 {
    let deadline = Instant::now() + d;
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for (i, c) in clients.iter().enumerate() {
        let mut c = c.clone();
        tasks.spawn(async move {
            let vm = format!("p2vm{i}");
            let mut n = 0u64;
            while Instant::now() < deadline {
                c.get_region(&vm, "ram").await.expect("GetRegion");
                n += 1;
            }
            n
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r.expect("client task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// The P3 peer: a tonic server on a Unix socket that answers GetRegion with a canned region and
/// does nothing else, on its own runtime so it does not share the clients' threads.
struct EchoServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(sock: &Path, region: pb::Region) -> Self {
        use memplace_proto::v1::node_agent_service_server::NodeAgentServiceServer;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let sock = sock.to_path_buf();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("echo runtime");
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&sock).expect("echo bind");
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                let _ = ready_tx.send(());
                tonic::transport::Server::builder()
                    .add_service(NodeAgentServiceServer::new(Echo {
                        region: Arc::new(region),
                    }))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("echo serve");
            });
        });
        ready.recv().expect("echo ready");
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Echo {
    region: Arc<pb::Region>,
}

type EchoStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

fn unimplemented<T>() -> Result<tonic::Response<T>, tonic::Status> {
    Err(tonic::Status::unimplemented("echo serves GetRegion only"))
}

#[tonic::async_trait]
impl memplace_proto::v1::node_agent_service_server::NodeAgentService for Echo {
    async fn get_node_info(
        &self,
        _: tonic::Request<pb::GetNodeInfoRequest>,
    ) -> Result<tonic::Response<pb::GetNodeInfoResponse>, tonic::Status> {
        unimplemented()
    }
    async fn create_region(
        &self,
        _: tonic::Request<pb::CreateRegionRequest>,
    ) -> Result<tonic::Response<pb::CreateRegionResponse>, tonic::Status> {
        unimplemented()
    }
    async fn get_region(
        &self,
        req: tonic::Request<pb::GetRegionRequest>,
    ) -> Result<tonic::Response<pb::GetRegionResponse>, tonic::Status> {
        let r = req.into_inner();
        let mut region = (*self.region).clone();
        region.vm_id = r.vm_id;
        region.name = r.name;
        Ok(tonic::Response::new(pb::GetRegionResponse {
            region: Some(region),
        }))
    }
    async fn list_regions(
        &self,
        _: tonic::Request<pb::ListRegionsRequest>,
    ) -> Result<tonic::Response<pb::ListRegionsResponse>, tonic::Status> {
        unimplemented()
    }
    async fn delete_region(
        &self,
        _: tonic::Request<pb::DeleteRegionRequest>,
    ) -> Result<tonic::Response<pb::DeleteRegionResponse>, tonic::Status> {
        unimplemented()
    }
    async fn set_policy(
        &self,
        _: tonic::Request<pb::SetPolicyRequest>,
    ) -> Result<tonic::Response<pb::SetPolicyResponse>, tonic::Status> {
        unimplemented()
    }
    type PopulateStream = EchoStream<pb::PopulateResponse>;
    async fn populate(
        &self,
        _: tonic::Request<pb::PopulateRequest>,
    ) -> Result<tonic::Response<Self::PopulateStream>, tonic::Status> {
        unimplemented()
    }
    async fn get_placement(
        &self,
        _: tonic::Request<pb::GetPlacementRequest>,
    ) -> Result<tonic::Response<pb::GetPlacementResponse>, tonic::Status> {
        unimplemented()
    }
    async fn reconcile(
        &self,
        _: tonic::Request<pb::ReconcileRequest>,
    ) -> Result<tonic::Response<pb::ReconcileResponse>, tonic::Status> {
        unimplemented()
    }
    async fn issue_handoff_token(
        &self,
        _: tonic::Request<pb::IssueHandoffTokenRequest>,
    ) -> Result<tonic::Response<pb::IssueHandoffTokenResponse>, tonic::Status> {
        unimplemented()
    }
    async fn attach_process(
        &self,
        _: tonic::Request<pb::AttachProcessRequest>,
    ) -> Result<tonic::Response<pb::AttachProcessResponse>, tonic::Status> {
        unimplemented()
    }
    type WatchEventsStream = EchoStream<pb::WatchEventsResponse>;
    async fn watch_events(
        &self,
        _: tonic::Request<pb::WatchEventsRequest>,
    ) -> Result<tonic::Response<Self::WatchEventsStream>, tonic::Status> {
        unimplemented()
    }
}

// ---------------------------------------------------------------------------------------------
// P5: GetPlacement of a populated memfd against numastat -p on a process mapping it.

async fn p5(size: u64) -> Row {
    println!("P5: GetPlacement of a populated {} memfd", gib(size));
    let (agent, _) = Agent::start(&["--reconcile-interval-secs", "0"]);
    let mut c = agent.client().await;
    let created = c
        .create_region("p5", "ram", size, pb::Backend::Memfd, vec![])
        .await
        .expect("CreateRegion");
    c.set_policy("p5", "ram", 0, 0, pb_policy(pb::PolicyMode::Bind), false)
        .await
        .expect("SetPolicy");
    let req = pb::PopulateRequest {
        vm_id: "p5".into(),
        name: "ram".into(),
        offset: 0,
        length: 0,
        threads: 2,
        cgroup: String::new(),
        verify: false,
    };
    c.populate(req, |_, _| {}).await.expect("Populate");
    // This process is the VMM: it acquires the file and maps all of it, so numastat -p has a
    // process whose page tables hold every page.
    let held = Handoff::connect(agent.handoff_socket())
        .and_then(|h| h.acquire("p5", "ram", &created.handoff_token))
        .expect("acquire");
    let map = Mapping::new(held.fd.as_fd(), size).expect("mmap");
    map.populate_write(0, size).expect("touch");

    let mut placement = Vec::new();
    let mut pages = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let p = c.placement("p5", "ram", 0, 0).await.expect("GetPlacement");
        placement.push(t.elapsed());
        pages = p
            .nodes
            .iter()
            .filter(|n| n.node == 0)
            .map(|n| n.pages)
            .sum();
    }
    let me = std::process::id().to_string();
    let mut numastat = Vec::new();
    let mut numastat_mb = String::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = Command::new("numastat")
            .args(["-p", &me])
            .output()
            .expect("numastat (apt-get install numactl)");
        numastat.push(t.elapsed());
        assert!(out.status.success(), "numastat failed");
        numastat_mb = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("Total"))
            .unwrap_or_default()
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string();
    }
    // The calls GetPlacement makes, done directly: map the file afresh, read-fault the resident
    // pages in (move_pages names the node only of pages mapped by the caller), ask move_pages.
    let t = Instant::now();
    let fresh = Mapping::new(held.fd.as_fd(), size).expect("mmap");
    fresh.populate_read(0, size).expect("MADV_POPULATE_READ");
    let fault_in = t.elapsed();
    let nodes = fresh
        .page_nodes(0, size, kernel::page_size())
        .expect("move_pages");
    let raw = t.elapsed();
    assert!(nodes.iter().all(|&n| n == 0), "a page is not on node 0");
    drop(fresh);
    drop(map);
    drop(held);
    c.delete_region("p5", "ram").await.expect("DeleteRegion");
    let gp = median(placement);
    let ns = median(numastat);
    let ratio = ns.as_secs_f64() / gp.as_secs_f64();
    let correct = pages == size / kernel::page_size();
    Row {
        id: "P5",
        what: format!("GetPlacement, {} populated memfd", gib(size)),
        measured: format!("{:.0} ms", ms(gp)),
        against: format!("numastat -p {:.0} ms", ms(ns)),
        ratio: format!("{ratio:.2}x"),
        goal: ">= 1x",
        met: correct && ratio >= 1.0,
        notes: vec![
            format!(
                "medians of 3; GetPlacement counted {pages} of {} pages on node 0; numastat total {numastat_mb} MB for the bench process (which maps the region)",
                size / kernel::page_size()
            ),
            format!(
                "the same kernel calls done directly: {:.0} ms (MADV_POPULATE_READ on a fresh mapping {:.0} ms, then move_pages)",
                ms(raw),
                ms(fault_in)
            ),
        ],
    }
}

// ---------------------------------------------------------------------------------------------
// P4 and P6: restart with 1,000 regions x 16 ranges, then the idle agent's cost.

fn ranges_request(size: u64) -> Vec<pb::RangePolicy> {
    let step = size / RANGES;
    (0..RANGES)
        .map(|i| pb::RangePolicy {
            offset: i * step,
            length: step,
            policy: Some(pb_policy(if i % 2 == 0 {
                pb::PolicyMode::Bind
            } else {
                pb::PolicyMode::Interleave
            })),
        })
        .collect()
}

fn region_key(i: u64) -> (String, String) {
    // Four regions per VM, as a VMM with a few memory devices has.
    (format!("p4vm{}", i / 4), format!("ram{}", i % 4))
}

/// Regions that are active with all 16 ranges applied (the agent re-read each from the kernel).
async fn verified(c: &mut Client) -> (usize, usize) {
    let regions = c.list_regions("").await.expect("ListRegions");
    let good = regions
        .iter()
        .filter(|r| {
            r.status == pb::RegionStatus::Active as i32
                && r.ranges.len() == RANGES as usize
                && r.ranges
                    .iter()
                    .all(|x| x.state == pb::RangeState::Applied as i32)
        })
        .count();
    (good, regions.len())
}

async fn p4_p6(empty_start: Duration) -> Vec<Row> {
    let n = env_u64("MEMPLACE_BENCH_REGIONS", 1000);
    let size = RANGES * 4 * kernel::page_size(); // 256 KiB: 16 ranges of 4 pages
    let interval = env_u64("MEMPLACE_BENCH_RECONCILE_SECS", 1).to_string();
    println!(
        "P4: {n} memfd regions x {RANGES} ranges ({} KiB each)",
        size >> 10
    );
    let (mut agent, _) = Agent::start(&["--reconcile-interval-secs", &interval]);
    let mut tokens = Vec::with_capacity(n as usize);
    {
        let mut tasks = tokio::task::JoinSet::new();
        let per = n.div_ceil(8);
        for w in 0..8 {
            let mut c = agent.client().await;
            tasks.spawn(async move {
                let mut out = Vec::new();
                for i in (w * per)..((w + 1) * per).min(n) {
                    let (vm, name) = region_key(i);
                    let r = c
                        .create_region(&vm, &name, size, pb::Backend::Memfd, ranges_request(size))
                        .await
                        .expect("CreateRegion");
                    out.push((i, r.handoff_token));
                }
                out
            });
        }
        while let Some(r) = tasks.join_next().await {
            tokens.extend(r.expect("create task"));
        }
    }
    tokens.sort();
    let mut c = agent.client().await;
    let (before, total) = verified(&mut c).await;
    println!("  created {total} regions, {before} with all ranges applied");

    // Restart with no holder: every file is recreated (memfd_create) and re-bound.
    agent.kill();
    let unheld = agent.spawn();
    let mut c = agent.client().await;
    let (unheld_ok, _) = verified(&mut c).await;

    // This process becomes the VMM of every region: it holds all the fds, so the restart takes
    // each back with pidfd_getfd.
    let hand = Handoff::connect(agent.handoff_socket()).expect("handoff");
    let mut held: Vec<OwnedFd> = Vec::with_capacity(tokens.len());
    for (i, token) in &tokens {
        let (vm, name) = region_key(*i);
        held.push(hand.acquire(&vm, &name, token).expect("acquire").fd);
    }
    agent.kill();
    let held_restart = agent.spawn();
    let mut c = agent.client().await;
    let (held_ok, _) = verified(&mut c).await;

    // The floor: the calls recovery makes, in a tight loop, on files that already exist.
    let files: Vec<OwnedFd> = (0..n)
        .map(|i| kernel::create_memfd(&format!("floor{i}"), size, None).expect("memfd"))
        .collect();
    let (floor, floor_create) = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let maps = remap_rebind_verify(files.iter().map(|f| f.as_fd()), size);
        let floor = t.elapsed();
        drop(maps);
        let t = Instant::now();
        let fresh: Vec<OwnedFd> = (0..files.len())
            .map(|i| kernel::create_memfd(&format!("again{i}"), size, None).expect("memfd"))
            .collect();
        let maps = remap_rebind_verify(fresh.iter().map(|f| f.as_fd()), size);
        let floor_create = t.elapsed();
        drop(maps);
        (floor, floor_create)
    })
    .await
    .expect("floor");

    let ratio_held = held_restart.as_secs_f64() / floor.as_secs_f64();
    let ratio_unheld = unheld.as_secs_f64() / floor_create.as_secs_f64();
    let p4 = Row {
        id: "P4",
        what: format!("restart: {n} regions x {RANGES} ranges re-mapped, re-bound, verified"),
        measured: format!(
            "held {:.0} ms ({held_ok}/{n} ok); unheld {:.0} ms ({unheld_ok}/{n} ok)",
            ms(held_restart),
            ms(unheld)
        ),
        against: format!(
            "raw loop {:.0} ms; with memfd_create {:.0} ms",
            ms(floor),
            ms(floor_create)
        ),
        ratio: format!("held {ratio_held:.1}x, unheld {ratio_unheld:.1}x"),
        goal: "<= 3x raw loop and <= 1 s",
        met: held_ok == n as usize
            && unheld_ok == n as usize
            && ratio_held <= 3.0
            && ratio_unheld <= 3.0
            && held_restart <= Duration::from_secs(1)
            && unheld <= Duration::from_secs(1),
        notes: vec![
            format!(
                "restart = SIGKILL, exec, until the gRPC socket accepts (regions are recovered before it binds); an empty agent starts in {:.0} ms",
                ms(empty_start)
            ),
            "held: this bench process holds all fds (acquired over the handoff socket), so each is taken back with pidfd_getfd; unheld: never handed off, so each file is recreated".into(),
            "raw loop per region: mmap, 16 mbind, a second mmap, 16 get_mempolicy (MPOL_F_ADDR); \"with memfd_create\" adds memfd_create+ftruncate first".into(),
        ],
    };

    let mut rows = vec![p4];
    if selected("P6") {
        rows.push(p6(&agent, n, &interval).await);
        if std::env::var("MEMPLACE_BENCH_RECONCILE_SECS").is_err() {
            // Again with the default interval (30 s).
            agent.args = vec![];
            agent.kill();
            agent.spawn();
            rows.push(p6_idle(&agent, n, "30", "P6b").await);
        }
    }
    drop(held);
    rows
}

/// Maps each file, binds its 16 ranges, maps it again and reads every range's policy back.
/// Returns the first mappings (the agent keeps them).
fn remap_rebind_verify<'a>(
    files: impl Iterator<Item = std::os::fd::BorrowedFd<'a>>,
    size: u64,
) -> Vec<Mapping> {
    let step = size / RANGES;
    let mut maps = Vec::new();
    for fd in files {
        let m = Mapping::new(fd, size).expect("mmap");
        for r in 0..RANGES {
            let mode = if r % 2 == 0 {
                PolicyMode::Bind
            } else {
                PolicyMode::Interleave
            };
            m.mbind(r * step, step, &policy(mode), 0).expect("mbind");
        }
        let fresh = Mapping::new(fd, size).expect("mmap");
        for r in 0..RANGES {
            let got = fresh.policy_at(r * step).expect("get_mempolicy");
            assert!(got.is_some_and(|p| p.mode
                == if r % 2 == 0 {
                    PolicyMode::Bind
                } else {
                    PolicyMode::Interleave
                }));
        }
        maps.push(m);
    }
    maps
}

fn proc_rss(pid: i32) -> u64 {
    proc_status(pid, "VmRSS:")
}

/// A size field of /proc/PID/status, in bytes.
fn proc_status(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// utime + stime of a process, in clock ticks.
fn proc_cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0;
    };
    // Fields after the command name start at field 3; utime is 14, stime 15.
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

async fn p6(agent: &Agent, n: u64, interval: &str) -> Row {
    p6_idle(agent, n, interval, "P6").await
}

async fn p6_idle(agent: &Agent, n: u64, interval: &str, id: &'static str) -> Row {
    let secs = env_u64("MEMPLACE_BENCH_IDLE_SECS", 60);
    println!("P6: idle agent with {n} regions for {secs} s, reconcile every {interval} s");
    let pid = agent.pid();
    let hz = clock_ticks();
    let cpu0 = proc_cpu_ticks(pid);
    let t = Instant::now();
    let mut rss_max = proc_rss(pid);
    while t.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_max = rss_max.max(proc_rss(pid));
    }
    let wall = t.elapsed().as_secs_f64();
    let cpu = (proc_cpu_ticks(pid) - cpu0) as f64 / hz as f64;
    let pct = cpu / wall * 100.0;
    let rss_end = proc_rss(pid);
    let mib = |k: &str| proc_status(pid, k) as f64 / MIB as f64;
    Row {
        id,
        what: format!("idle agent, {n} regions, {secs} s, reconcile every {interval} s"),
        measured: format!(
            "RSS max {:.1} MiB, CPU {pct:.2} %",
            rss_max as f64 / MIB as f64
        ),
        against: "-".into(),
        ratio: "-".into(),
        goal: "RSS <= 32 MiB, CPU <= 0.5 %",
        met: rss_max <= 32 * MIB && pct <= 0.5,
        notes: vec![format!(
            "RSS at end {:.1} MiB (anon {:.1}, file {:.1}, shmem {:.1}; VmRSS sampled every 0.5 s), {} threads; CPU {cpu:.2} s of utime+stime in {wall:.1} s",
            rss_end as f64 / MIB as f64,
            mib("RssAnon:"),
            mib("RssFile:"),
            mib("RssShmem:"),
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .map_or(String::new(), |t| t.trim().to_string()),
        )],
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!("| row | what | measured | floor / peer | ratio | goal | met |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.id,
            r.what,
            r.measured,
            r.against,
            r.ratio,
            r.goal,
            if r.met { "yes" } else { "**no**" }
        );
    }
    println!();
    for r in rows {
        for n in &r.notes {
            println!("- {}: {n}", r.id);
        }
    }
}
