//! The placement engine against the real binary on this host (one NUMA node, real KVM): Populate
//! on guest_memfd, memfd and hugetlb memfd, progress and cancellation, cgroup charging through the
//! populate helper process, GetPlacement against numa_maps and numastat and against node free
//! memory, migration, capacity refusals, and what a task policy governs.
//!
//! Every number the agent reports is checked against something the kernel shows independently
//! (/proc/PID/numa_maps, numastat, memory.usage_in_bytes, node meminfo). The tests share the host's
//! memory and huge page pool, so they run one at a time.

mod common;

use common::events::last_sequence;
use common::lines::Lines;
use common::procfs::memfd_allocated_bytes;
use common::wait;
use common::{AgentProc, MIB, policy, whole};
use memplace_client::handoff::Handoff;
use memplace_client::{Client, pb};
use memplace_server::kernel::{self, Mapping};
use pb::PolicyMode as M;
use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
const NODE0: &str = "/sys/devices/system/node/node0";
const HUGE_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

/// The tests measure node memory, cgroups and the huge page pool: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the other tests of this file, then starts an agent and connects to it.
async fn start() -> (tokio::sync::MutexGuard<'static, ()>, AgentProc, Client) {
    let serial = SERIAL.lock().await;
    let agent = AgentProc::start();
    let client = agent.client().await;
    (serial, agent, client)
}

fn bind0() -> Vec<pb::RangePolicy> {
    whole(policy(M::Bind, &[0]))
}

/// A field of node 0's meminfo ("MemFree", "HugePages_Free"), in kB or pages as the file says.
fn node0_meminfo(field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("{NODE0}/meminfo")).expect("node0 meminfo");
    text.lines()
        .find_map(|l| {
            let rest = l.split_once(&format!(" {field}:"))?.1;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in node0 meminfo:\n{text}"))
}

fn pages_on(p: &pb::GetPlacementResponse, node: u32) -> u64 {
    p.nodes
        .iter()
        .filter(|n| n.node == node)
        .map(|n| n.pages)
        .sum()
}

/// Pages allocated (on any node, or on one the kernel could not name).
fn present(p: &pb::GetPlacementResponse) -> u64 {
    p.nodes.iter().map(|n| n.pages).sum::<u64>() + p.pages_unknown
}

/// Checks that every page of a placement is accounted for, and returns the pages present.
fn consistent(p: &pb::GetPlacementResponse, total_pages: u64) -> u64 {
    assert_eq!(
        present(p) + p.pages_not_present,
        total_pages,
        "present + not present must cover the span: {p:?}"
    );
    assert_eq!(p.pages_unknown, 0, "every allocated page has a node: {p:?}");
    assert_eq!(p.pages_misplaced, 0, "{p:?}");
    present(p)
}

fn populate_req(
    vm: &str,
    name: &str,
    offset: u64,
    length: u64,
    threads: u32,
) -> pb::PopulateRequest {
    pb::PopulateRequest {
        vm_id: vm.into(),
        name: name.into(),
        offset,
        length,
        threads,
        cgroup: String::new(),
        verify: true,
    }
}

/// Runs a Populate to its end: every progress message and the summary.
async fn populate_all(
    c: &mut Client,
    req: pb::PopulateRequest,
) -> Result<(Vec<pb::PopulateProgress>, pb::PopulateSummary), tonic::Status> {
    use pb::populate_response::Event;
    let mut stream = c.raw().populate(req).await?.into_inner();
    let mut progress = Vec::new();
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(Event::Progress(p)) => progress.push(p),
            Some(Event::Summary(s)) => return Ok((progress, s)),
            None => {}
        }
    }
    panic!("populate stream ended without a summary");
}

async fn placement(c: &mut Client, vm: &str, name: &str) -> pb::GetPlacementResponse {
    c.placement(vm, name, 0, 0).await.expect("GetPlacement")
}

/// The message of the next POPULATED event of a region after `after` (a stored sequence).
async fn next_populated_event(c: &mut Client, vm: &str, name: &str, after: u64) -> String {
    let mut events = c
        .watch_events(pb::WatchEventsRequest {
            vm_id: vm.into(),
            after_sequence: after,
            no_follow: false,
        })
        .await
        .expect("WatchEvents");
    // A guard against a hang, not a timing assertion: the event follows the populate's end.
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(e) = events.message().await.expect("event stream") {
            if e.kind == pb::EventKind::Populated as i32 && e.name == name {
                return e.message;
            }
        }
        panic!("event stream ended");
    })
    .await
    .expect("no POPULATED event within 120 s")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
async fn populate_allocates_every_page_on_node0_and_streams_progress() {
    let (_serial, _agent, mut c) = start().await;
    let caps = c.node_info().await.unwrap().capabilities.unwrap();
    assert!(
        caps.kvm_usable,
        "this host has /dev/kvm: {}",
        caps.kvm_error
    );
    let size = 512 * MIB;
    for (name, backend) in [
        ("gmem", pb::Backend::GuestMemfd),
        ("ram", pb::Backend::Memfd),
    ] {
        c.create_region("vm1", name, size, backend, bind0())
            .await
            .unwrap();
        let before = placement(&mut c, "vm1", name).await;
        assert_eq!(consistent(&before, size / PAGE), 0, "{name}: fresh region");

        let (progress, summary) = populate_all(&mut c, populate_req("vm1", name, 0, 0, 1))
            .await
            .unwrap();
        println!(
            "{name}: {} progress messages, {:.2}s",
            progress.len(),
            summary.elapsed_seconds
        );
        assert!(
            !progress.is_empty(),
            "{name}: a 512 MiB populate streams progress"
        );
        let mut last = 0;
        for p in &progress {
            assert_eq!(p.bytes_total, size, "{name}: {p:?}");
            assert!(
                p.bytes_done >= last && p.bytes_done <= size,
                "{name}: {progress:?}"
            );
            last = p.bytes_done;
        }
        assert!(!summary.cancelled, "{name}");
        assert_eq!(summary.threads, 1, "{name}");
        assert_eq!(
            (summary.bytes_done, summary.bytes_total),
            (size, size),
            "{name}"
        );
        assert_eq!(
            summary.nodes,
            vec![pb::NodePages {
                node: 0,
                pages: size / PAGE
            }],
            "{name}: the summary reads the kernel"
        );

        let after = placement(&mut c, "vm1", name).await;
        assert_eq!(after.page_size_bytes, PAGE);
        assert_eq!(consistent(&after, size / PAGE), size / PAGE, "{name}");
        assert_eq!(pages_on(&after, 0), size / PAGE, "{name}: all on node 0");
        c.delete_region("vm1", name).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
async fn populate_verifies_in_its_workers_or_answers_from_the_page_cache() {
    let (_serial, _agent, mut c) = start().await;
    let size = 96 * MIB;
    for (name, backend) in [
        ("gmem", pb::Backend::GuestMemfd),
        ("ram", pb::Backend::Memfd),
    ] {
        // Three ranges, so the workers' per-chunk read-back is summed per range; 2 workers.
        let ranges = (0..3)
            .map(|i| pb::RangePolicy {
                offset: i * 32 * MIB,
                length: 32 * MIB,
                policy: Some(policy(M::Bind, &[0])),
            })
            .collect();
        c.create_region("vm1", name, size, backend, ranges)
            .await
            .unwrap();
        // Without verify: the bytes come from the page cache, and no nodes are claimed.
        let (_, quick) = populate_all(
            &mut c,
            pb::PopulateRequest {
                verify: false,
                ..populate_req("vm1", name, 0, 64 * MIB, 2)
            },
        )
        .await
        .unwrap();
        assert_eq!(quick.bytes_done, 64 * MIB, "{name}: {quick:?}");
        assert!(!quick.verified, "{name}: {quick:?}");
        assert!(quick.nodes.is_empty(), "{name}: {quick:?}");
        let p = placement(&mut c, "vm1", name).await;
        assert_eq!(consistent(&p, size / PAGE), 64 * MIB / PAGE, "{name}");

        // With verify over the whole region: the pages allocated before count too.
        let (_, full) = populate_all(&mut c, populate_req("vm1", name, 0, 0, 2))
            .await
            .unwrap();
        assert!(full.verified, "{name}: {full:?}");
        assert_eq!(full.bytes_done, size, "{name}: {full:?}");
        assert_eq!(
            full.nodes,
            vec![pb::NodePages {
                node: 0,
                pages: size / PAGE
            }],
            "{name}"
        );
        // GetPlacement, read independently, agrees.
        let p = placement(&mut c, "vm1", name).await;
        assert_eq!(pages_on(&p, 0), size / PAGE, "{name}");
        c.delete_region("vm1", name).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
async fn cancelled_populate_leaves_a_consistent_region_that_a_new_populate_completes() {
    let (_serial, _agent, mut c) = start().await;
    // No BIND here: the capacity check reads MemFree, which page cache on a busy host can hold
    // below the region size although the memory is there.
    let size = 2 * GIB;
    let pages = size / PAGE;
    c.create_region("vm1", "big", size, pb::Backend::GuestMemfd, vec![])
        .await
        .unwrap();
    let seq = last_sequence(&mut c, "vm1").await;

    // Drop the stream at the first progress message: the first chunk is in, the rest is not.
    {
        use pb::populate_response::Event;
        let mut stream = c
            .raw()
            .populate(populate_req("vm1", "big", 0, 0, 1))
            .await
            .unwrap()
            .into_inner();
        // A slow machine (a TCG guest) can report progress before the first chunk is in.
        loop {
            let next = wait::within(
                "the populate's first progress message with bytes done",
                wait::PATIENCE,
                stream.message(),
            )
            .await;
            match next.unwrap().and_then(|m| m.event) {
                Some(Event::Progress(p)) if p.bytes_done == 0 => continue,
                Some(Event::Progress(p)) => {
                    println!("cancelling at {} of {} bytes", p.bytes_done, p.bytes_total);
                    assert!(p.bytes_done < size, "{p:?}");
                    break;
                }
                other => panic!("expected progress messages first, got {other:?}"),
            }
        }
    }
    let msg = next_populated_event(&mut c, "vm1", "big", seq).await;
    println!("event: {msg}");
    assert!(
        msg.contains("(cancelled)"),
        "the event says cancelled: {msg}"
    );

    let p = placement(&mut c, "vm1", "big").await;
    let done = consistent(&p, pages);
    println!("after cancel: {done} of {pages} pages present");
    assert!(
        done > 0 && done < pages,
        "cancelled mid-way: some pages but not all ({done} of {pages})"
    );
    assert_eq!(pages_on(&p, 0), done);

    // The region still works, and a new populate completes the rest.
    let r = c.get_region("vm1", "big").await.unwrap();
    assert_eq!(r.status(), pb::RegionStatus::Active);
    let (_, summary) = populate_all(&mut c, populate_req("vm1", "big", 0, 0, 0))
        .await
        .unwrap();
    assert!(!summary.cancelled);
    assert_eq!(summary.bytes_done, size);
    let p = placement(&mut c, "vm1", "big").await;
    assert_eq!(consistent(&p, pages), pages);
    assert_eq!(pages_on(&p, 0), pages);
    c.delete_region("vm1", "big").await.unwrap();
}

/// A memory cgroup made for a test, removed when dropped (once no task is in it).
struct TempCgroup(PathBuf);

impl TempCgroup {
    fn new(tag: &str) -> Self {
        let root = Path::new(cgroup_files().root);
        let dir = root.join(format!("memplace-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TempCgroup(dir)
    }

    fn usage(&self) -> u64 {
        usage_of(&self.0)
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    fn limit(&self, bytes: u64) {
        std::fs::write(self.0.join(cgroup_files().limit), bytes.to_string()).unwrap();
    }
}

impl Drop for TempCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.0.display());
    }
}

/// The memory cgroup files of the version this kernel mounts: v1's memory controller at
/// /sys/fs/cgroup/memory (the 6.18 host), or the v2 hierarchy at /sys/fs/cgroup (kernels built
/// without v1 memory, as Debian's 7.x).
struct CgroupFiles {
    root: &'static str,
    usage: &'static str,
    limit: &'static str,
}

fn cgroup_files() -> CgroupFiles {
    if Path::new("/sys/fs/cgroup/memory/memory.usage_in_bytes").exists() {
        return CgroupFiles {
            root: "/sys/fs/cgroup/memory",
            usage: "memory.usage_in_bytes",
            limit: "memory.limit_in_bytes",
        };
    }
    let controllers =
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_else(|e| {
            panic!("no cgroup v1 memory controller and no cgroup v2 hierarchy: {e}")
        });
    assert!(
        controllers.split_whitespace().any(|c| c == "memory"),
        "cgroup v2 without the memory controller: {controllers}"
    );
    // Children get the memory controller only when their parent enables it.
    std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory")
        .expect("enable +memory in /sys/fs/cgroup/cgroup.subtree_control");
    CgroupFiles {
        root: "/sys/fs/cgroup",
        usage: "memory.current",
        limit: "memory.max",
    }
}

fn usage_of(cgroup: &Path) -> u64 {
    std::fs::read_to_string(cgroup.join(cgroup_files().usage))
        .unwrap_or_else(|e| panic!("{}: {e}", cgroup.display()))
        .trim()
        .parse()
        .unwrap()
}

/// The memory cgroup directory of a process, from /proc/PID/cgroup (v1's `memory` line, or v2's
/// `0::` line).
fn memory_cgroup_of(pid: u32) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let files = cgroup_files();
    let v2 = files.root == "/sys/fs/cgroup";
    let rel = text
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (id, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            let ours = if v2 {
                id == "0" && ctrl.is_empty()
            } else {
                ctrl.split(',').any(|c| c == "memory")
            };
            ours.then_some(path)
        })
        .unwrap_or_else(|| panic!("no memory cgroup in /proc/{pid}/cgroup:\n{text}"));
    Path::new(files.root).join(rel.trim_start_matches('/'))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
async fn populate_with_a_cgroup_charges_that_cgroup_not_the_agent() {
    // Declared before the agent, so they are removed after it is gone (a cgroup with a task in it
    // cannot be).
    let agent_cg = TempCgroup::new("agent");
    let vm_cg = TempCgroup::new("vm");
    let (_serial, agent, mut c) = start().await;
    // The agent gets a cgroup of its own, so other processes of this host do not blur its usage.
    agent_cg.add(agent.pid());
    let agent_mem = memory_cgroup_of(agent.pid());
    assert_eq!(agent_mem, agent_cg.0, "the agent's memory cgroup per /proc");
    let size = 256 * MIB;
    for (name, backend) in [
        ("ram", pb::Backend::Memfd),
        ("gmem", pb::Backend::GuestMemfd),
    ] {
        c.create_region("vm1", name, size, backend, bind0())
            .await
            .unwrap();
        let (vm_before, agent_before) = (vm_cg.usage(), usage_of(&agent_mem));
        let mut req = populate_req("vm1", name, 0, 0, 2);
        req.cgroup = vm_cg.0.display().to_string();
        let (_, summary) = populate_all(&mut c, req).await.unwrap();
        assert_eq!(summary.bytes_done, size, "{name}: {summary:?}");
        let (vm_after, agent_after) = (vm_cg.usage(), usage_of(&agent_mem));
        let vm_grew = vm_after.saturating_sub(vm_before);
        let agent_grew = agent_after.saturating_sub(agent_before);
        println!("{name}: vm cgroup +{vm_grew} bytes, agent cgroup +{agent_grew} bytes");
        assert!(
            vm_grew >= size / 10 * 9,
            "{name}: the named cgroup is charged for the populate: +{vm_grew} of {size}"
        );
        assert!(
            agent_grew < size / 4,
            "{name}: the agent's cgroup is not: +{agent_grew} of {size}"
        );
        let p = placement(&mut c, "vm1", name).await;
        assert_eq!(pages_on(&p, 0), size / PAGE, "{name}");

        // Deleting the region frees its memory, and with it the cgroup's charge.
        c.delete_region("vm1", name).await.unwrap();
        let freed = vm_after.saturating_sub(vm_cg.usage());
        assert!(
            freed >= size / 10 * 9,
            "{name}: deleting the region uncharges the cgroup: -{freed} of {size}"
        );
    }

    // A limit too small for the populate: refused before anything is allocated.
    let tight = TempCgroup::new("tight");
    c.create_region("vm1", "ram", size, pb::Backend::Memfd, bind0())
        .await
        .unwrap();
    tight.limit(size / 4);
    let mut req = populate_req("vm1", "ram", 0, 0, 1);
    req.cgroup = tight.0.display().to_string();
    let e = populate_all(&mut c, req.clone()).await.unwrap_err();
    println!("{}", e.message());
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains(&req.cgroup) && e.message().contains("short by"),
        "the refusal names the cgroup and the shortfall: {}",
        e.message()
    );
    let p = placement(&mut c, "vm1", "ram").await;
    assert_eq!(consistent(&p, size / PAGE), 0, "nothing was allocated");

    // Room for exactly the pages passes that check, but the cgroup is also charged for the file's
    // page-cache index and the helper's own memory, so its OOM killer stops the helper part-way.
    tight.limit(tight.usage() + size);
    let e = populate_all(&mut c, req).await.unwrap_err();
    println!("{}", e.message());
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("OOM killer"), "{}", e.message());
    let p = placement(&mut c, "vm1", "ram").await;
    let done = consistent(&p, size / PAGE);
    assert!(
        done < size / PAGE,
        "the helper was stopped before the end: {done} pages"
    );
    c.delete_region("vm1", "ram").await.unwrap();
    drop(tight);

    // A path that is not a cgroup is refused before anything runs.
    c.create_region("vm1", "ram", 16 * MIB, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    let mut req = populate_req("vm1", "ram", 0, 0, 1);
    req.cgroup = "/tmp".into();
    let e = populate_all(&mut c, req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    c.delete_region("vm1", "ram").await.unwrap();
}

/// A `memplacectl hold` process: acquires a region, touches `touch`, waits for SIGTERM.
struct Holder(std::process::Child);

impl Holder {
    fn start(agent: &AgentProc, vm: &str, name: &str, token: &str, touch: &str) -> Self {
        let mut child = agent
            .ctl()
            .args(["hold", vm, name, "--token", token, "--handoff-socket"])
            .arg(agent.handoff_socket())
            .args(["--touch", touch])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("memplacectl hold");
        let line = Lines::of(&mut child).wait_for("\"holding\" line", |_| true);
        assert!(line.starts_with("holding"), "holder said {line:?}");
        Holder(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// Pages per node of the holder's mapping whose numa_maps line mentions `file`.
fn numa_maps_nodes(pid: u32, file: &[&str]) -> Vec<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap();
    let line = text
        .lines()
        .find(|l| file.iter().any(|f| l.contains(f)))
        .unwrap_or_else(|| panic!("no mapping of {file:?} in /proc/{pid}/numa_maps:\n{text}"));
    println!("numa_maps: {line}");
    line.split_whitespace()
        .filter_map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((k.strip_prefix('N')?.parse().ok()?, v.parse().ok()?))
        })
        .collect()
}

/// numastat -p PID: MB on node 0 in the "Private" row (file and shared mappings count there).
fn numastat_private_node0_mb(pid: u32) -> f64 {
    let out = std::process::Command::new("numastat")
        .args(["-p", &pid.to_string()])
        .output()
        .expect("numastat (Debian package numactl) is installed");
    assert!(out.status.success(), "numastat -p {pid}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    text.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "Private").then(|| w.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Private row in numastat output:\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
async fn placement_agrees_with_numa_maps_and_numastat_of_a_holder() {
    let (_serial, agent, mut c) = start().await;
    let size = 64 * MIB;
    for (name, backend, file) in [
        ("ram", pb::Backend::Memfd, &["memfd:memplace:vm1/ram"][..]),
        // anon_inode:[kvm-gmem] on 6.18; its own pseudo-filesystem from 6.19.
        (
            "gmem",
            pb::Backend::GuestMemfd,
            &["kvm-gmem", "guest_memfd"],
        ),
    ] {
        let created = c
            .create_region("vm1", name, size, backend, vec![])
            .await
            .unwrap();
        // The holder touches the memory itself: the agent populated nothing.
        let holder = Holder::start(&agent, "vm1", name, &created.handoff_token, "64M");
        let p = placement(&mut c, "vm1", name).await;
        assert_eq!(consistent(&p, size / PAGE), size / PAGE, "{name}");
        let agent_node0 = pages_on(&p, 0);
        assert_eq!(
            p.ranges[0].counted_from_pid,
            holder.pid() as i32,
            "{name}: the holder maps every allocated page, so its page tables are counted: {p:?}"
        );
        let maps = numa_maps_nodes(holder.pid(), file);
        assert_eq!(
            maps,
            vec![(0, agent_node0)],
            "{name}: GetPlacement says {agent_node0} pages on node 0; numa_maps of the holder says {maps:?}"
        );
        let mb = numastat_private_node0_mb(holder.pid());
        assert!(
            mb >= (size / MIB) as f64,
            "{name}: numastat shows {mb} MB on node 0 for the holder, which maps {} MiB there",
            size / MIB
        );
        drop(holder);
        c.delete_region("vm1", name).await.unwrap();
    }
}

/// Pages per node of a range of a placement, as a map.
fn range_nodes(r: &pb::RangePlacement) -> BTreeMap<u32, u64> {
    r.nodes.iter().map(|n| (n.node, n.pages)).collect()
}

/// GetPlacement of `[offset, offset+length)` of a one-range region: the range's placement, after
/// checking that its counts are exact (every page allocated or not, none of unknown node) and
/// that `allocated` pages are on node 0.
async fn one_range(
    c: &mut Client,
    name: &str,
    offset: u64,
    length: u64,
    allocated: u64,
) -> pb::RangePlacement {
    let p = c.placement("vm1", name, offset, length).await.unwrap();
    assert_eq!(p.ranges.len(), 1, "{name}: {p:?}");
    let r = p.ranges[0].clone();
    assert_eq!(
        (range_nodes(&r), r.pages_not_present, r.pages_unknown),
        (
            BTreeMap::from([(0, allocated)]),
            length / PAGE - allocated,
            0
        ),
        "{name} [{offset}, +{length}): {r:?}"
    );
    r
}

/// GetPlacement counts a range from its holder's page tables (`/proc/PID/numa_maps`) only where
/// the holder's shared mappings of the file lie inside the range, overlap nowhere and map every
/// allocated page; everywhere else the agent read-faults the allocated pages into its own window.
/// Either way the counts are exact. This test process is the holder: it acquires the file and maps
/// windows of it, faulting exactly the pages each case needs.
#[tokio::test(flavor = "multi_thread")]
async fn placement_counts_from_the_holder_only_where_that_is_exact() {
    let (_serial, _agent, mut c) = start().await;
    let agent = &_agent;
    let me = std::process::id() as i32;
    let mib = MIB / PAGE;
    let size = 64 * MIB;
    // memfd: one shared-policy range however it is populated. (A guest_memfd region on this
    // kernel is task-policy, whose ranges Populate splits; its holder path is checked by
    // placement_agrees_with_numa_maps_and_numastat_of_a_holder.)
    {
        let name = "ram";
        let created = c
            .create_region("vm1", name, size, pb::Backend::Memfd, bind0())
            .await
            .unwrap();
        let held = Handoff::connect(agent.handoff_socket())
            .unwrap()
            .acquire("vm1", name, &created.handoff_token)
            .unwrap();
        let fd = held.fd.as_fd();
        let window = |offset: u64, len: u64, fault: Option<(u64, u64)>| {
            let w = Mapping::window(fd, offset, len).unwrap();
            if let Some((at, l)) = fault {
                w.populate_read(at, l).unwrap();
            }
            w
        };
        let via = |r: &pb::RangePlacement| r.counted_from_pid;
        populate_all(&mut c, populate_req("vm1", name, 0, 32 * MIB, 0))
            .await
            .unwrap();

        // The holder maps nothing: the agent counts.
        let r = one_range(&mut c, name, 0, size, 32 * mib).await;
        assert_eq!(via(&r), 0, "{name}: nothing mapped by the holder: {r:?}");

        // It maps [0, 32M), every allocated page: its page tables are counted, and they say what
        // the agent's own read-fault count says.
        let w1 = window(0, 32 * MIB, Some((0, 32 * MIB)));
        let r = one_range(&mut c, name, 0, size, 32 * mib).await;
        assert_eq!(
            via(&r),
            me,
            "{name}: the holder maps every allocated page: {r:?}"
        );
        let by_fault = kernel::residency::count_nodes(fd, size, 0, size, PAGE).unwrap();
        assert_eq!(by_fault.counted_from, None);
        assert_eq!(
            (by_fault.nodes, by_fault.not_present, by_fault.unknown),
            (range_nodes(&r), r.pages_not_present, r.pages_unknown),
            "{name}: the holder's count and the read-fault count differ"
        );

        // The span [0, 32M): the holder's mapping is the span.
        let r = one_range(&mut c, name, 0, 32 * MIB, 32 * mib).await;
        assert_eq!(via(&r), me, "{name}: the mapping is the span: {r:?}");
        // A span that cuts the holder's mapping: the agent counts.
        let r = one_range(&mut c, name, 0, 16 * MIB, 16 * mib).await;
        assert_eq!(
            via(&r),
            0,
            "{name}: the holder's mapping is not inside the span: {r:?}"
        );

        // Half of the allocated pages are not mapped by the holder: the agent counts.
        populate_all(&mut c, populate_req("vm1", name, 32 * MIB, 32 * MIB, 0))
            .await
            .unwrap();
        let r = one_range(&mut c, name, 0, size, 64 * mib).await;
        assert_eq!(via(&r), 0, "{name}: half the pages are not mapped: {r:?}");

        // Two mappings that overlap on [16M, 32M), which only the first faulted: they map
        // 8192 + 8192 pages, as many as are allocated, yet they could count a page twice.
        let w2 = window(16 * MIB, 48 * MIB, Some((32 * MIB, 32 * MIB)));
        let r = one_range(&mut c, name, 0, size, 64 * mib).await;
        assert_eq!(via(&r), 0, "{name}: overlapping mappings: {r:?}");

        // [0, 16M) and [16M, 64M) side by side, all faulted: the holder counts again.
        drop(w1);
        let w3 = window(0, 16 * MIB, Some((0, 16 * MIB)));
        let r = one_range(&mut c, name, 0, size, 64 * mib).await;
        assert_eq!(via(&r), 0, "{name}: [16M, 32M) is not mapped: {r:?}");
        w2.populate_read(16 * MIB, 16 * MIB).unwrap();
        let r = one_range(&mut c, name, 0, size, 64 * mib).await;
        assert_eq!(via(&r), me, "{name}: every page mapped once: {r:?}");

        // The span [0, 48M) and a mapping of [16M, 64M) faulted only on [16M, 48M) (merged with
        // [0, 16M) or not): the pages mapped add up to the span's allocated pages, but a mapping
        // reaches past the span.
        drop(w2);
        let w4 = window(16 * MIB, 48 * MIB, Some((16 * MIB, 32 * MIB)));
        let r = one_range(&mut c, name, 0, 48 * MIB, 48 * mib).await;
        assert_eq!(via(&r), 0, "{name}: a mapping reaches past the span: {r:?}");
        drop((w3, w4));
        drop(held);
        c.delete_region("vm1", name).await.unwrap();
    }
}

/// Bytes of node 0's page cache counted in the field where a backend's pages go: besides
/// FilePages, memfd pages count as Shmem and guest_memfd pages as Unevictable (KERNEL.md). Unlike
/// FilePages and MemFree, ordinary page cache and free-page reporting do not move these.
fn node0_backend_bytes(backend: pb::Backend) -> u64 {
    let field = match backend {
        pb::Backend::GuestMemfd => "Unevictable",
        _ => "Shmem",
    };
    node0_meminfo(field) * 1024
}

/// What other processes on the host may move the node counters by while a test looks (mlock
/// and tmpfs users): far below the size of any allocation the tests look for.
const NODE_COUNTER_NOISE: u64 = MIB;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
async fn get_placement_allocates_nothing() {
    let (_serial, agent, mut c) = start().await;
    // The witnesses count pages exactly, so the region need not be large to show an allocation.
    let size = 256 * MIB;
    let pages = size / PAGE;
    for (name, backend) in [
        ("gmem", pb::Backend::GuestMemfd),
        ("ram", pb::Backend::Memfd),
    ] {
        c.create_region("vm1", name, size, backend, bind0())
            .await
            .unwrap();
        let file_bytes = |agent: &AgentProc| {
            (backend == pb::Backend::Memfd).then(|| memfd_allocated_bytes(agent.pid(), "vm1", name))
        };
        assert_eq!(file_bytes(&agent).unwrap_or(0), 0, "{name}: a new file");
        let before = node0_backend_bytes(backend);
        let first = placement(&mut c, "vm1", name).await;
        let second = placement(&mut c, "vm1", name).await;
        let after = node0_backend_bytes(backend);
        assert_eq!(consistent(&first, pages), 0, "{name}: nothing present");
        assert_eq!(first.pages_not_present, pages, "{name}");
        assert_eq!(
            second.pages_not_present, pages,
            "{name}: still nothing present"
        );
        println!(
            "{name}: node 0 counter moved by {} bytes across two GetPlacement of {size} bytes",
            after as i64 - before as i64
        );
        assert!(
            after <= before + NODE_COUNTER_NOISE,
            "{name}: node 0 grew by {} bytes across GetPlacement of an unpopulated {size}-byte region",
            after - before
        );
        assert_eq!(
            file_bytes(&agent).unwrap_or(0),
            0,
            "{name}: GetPlacement allocated pages of the file"
        );

        // The witnesses see an allocation: half populated grows them by half the size.
        let before = node0_backend_bytes(backend);
        populate_all(&mut c, populate_req("vm1", name, 0, size / 2, 0))
            .await
            .unwrap();
        let grown = node0_backend_bytes(backend) as i64 - before as i64;
        println!(
            "{name}: node 0 counter grew by {grown} bytes for {} populated",
            size / 2
        );
        assert!(
            grown.abs_diff((size / 2) as i64) <= NODE_COUNTER_NOISE,
            "{name}: populating {} bytes grew node 0 by {grown}",
            size / 2
        );
        assert_eq!(file_bytes(&agent).unwrap_or(size / 2), size / 2, "{name}");
        // Half populated: exactly half, and reading it allocates nothing more.
        let before = node0_backend_bytes(backend);
        for _ in 0..2 {
            let p = placement(&mut c, "vm1", name).await;
            assert_eq!(consistent(&p, pages), pages / 2, "{name}");
            assert_eq!(p.pages_not_present, pages / 2, "{name}");
            assert_eq!(pages_on(&p, 0), pages / 2, "{name}");
        }
        let upper = c.placement("vm1", name, size / 2, 0).await.unwrap();
        assert_eq!(upper.pages_not_present, pages / 2, "{name}: upper half");
        let after = node0_backend_bytes(backend);
        assert!(
            after <= before + NODE_COUNTER_NOISE,
            "{name}: node 0 grew by {} bytes across GetPlacement of a half-populated region",
            after - before
        );
        assert_eq!(file_bytes(&agent).unwrap_or(size / 2), size / 2, "{name}");
        c.delete_region("vm1", name).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
async fn migrate_on_memfd_reports_and_guest_memfd_refuses_allocated_pages() {
    let (_serial, _agent, mut c) = start().await;
    let size = 64 * MIB;

    // memfd: populate half, then migrate to BIND {0} (the only node: nothing has to move).
    c.create_region("vm1", "ram", size, pb::Backend::Memfd, bind0())
        .await
        .unwrap();
    populate_all(&mut c, populate_req("vm1", "ram", 0, size / 2, 0))
        .await
        .unwrap();
    let r = c
        .set_policy("vm1", "ram", 0, 0, policy(M::Bind, &[0]), true)
        .await
        .unwrap();
    println!(
        "memfd migrate: {} moved, {} failed",
        r.pages_migrated, r.pages_migrate_failed
    );
    assert_eq!(
        (r.pages_migrated, r.pages_migrate_failed),
        (0, 0),
        "on one node every page already sits on node 0"
    );
    let region = r.region.unwrap();
    assert!(
        region
            .ranges
            .iter()
            .all(|x| x.state() == pb::RangeState::Applied),
        "{region:?}"
    );
    let p = placement(&mut c, "vm1", "ram").await;
    assert_eq!(consistent(&p, size / PAGE), size / PAGE / 2, "pages stay");
    assert_eq!(pages_on(&p, 0), size / PAGE / 2);

    // guest_memfd: allocated pages cannot move, so migrate is refused where there are any.
    c.create_region("vm1", "gmem", size, pb::Backend::GuestMemfd, bind0())
        .await
        .unwrap();
    populate_all(&mut c, populate_req("vm1", "gmem", 0, size / 2, 0))
        .await
        .unwrap();
    let generation = c.get_region("vm1", "gmem").await.unwrap().generation;
    let e = c
        .raw()
        .set_policy(pb::SetPolicyRequest {
            vm_id: "vm1".into(),
            name: "gmem".into(),
            offset: 0,
            length: size / 2,
            policy: Some(policy(M::Preferred, &[0])),
            migrate: true,
            expected_generation: 0,
            request_id: memplace_client::new_request_id(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("cannot migrate") && e.message().contains("8192 pages"),
        "the refusal explains that the allocated pages cannot move: {}",
        e.message()
    );
    assert_eq!(
        c.get_region("vm1", "gmem").await.unwrap().generation,
        generation,
        "a refused SetPolicy changes no intent"
    );
    let r = c
        .set_policy("vm1", "gmem", size / 2, 0, policy(M::Preferred, &[0]), true)
        .await
        .expect("migrate over an unallocated guest_memfd range has nothing to move");
    assert_eq!((r.pages_migrated, r.pages_migrate_failed), (0, 0));
    let p = placement(&mut c, "vm1", "gmem").await;
    assert_eq!(consistent(&p, size / PAGE), size / PAGE / 2);
    c.delete_region("vm1", "gmem").await.unwrap();
    c.delete_region("vm1", "ram").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn populate_beyond_node_free_memory_is_refused_before_allocating() {
    let (_serial, _agent, mut c) = start().await;
    let free = node0_meminfo("MemFree") * 1024;
    let total = node0_meminfo("MemTotal") * 1024;
    // memfd is sparse: a region far beyond the node's memory costs nothing until populated.
    let size = (total * 2).next_multiple_of(GIB).max(64 * GIB);
    assert!(size > free);
    c.create_region("vm1", "huge", size, pb::Backend::Memfd, bind0())
        .await
        .unwrap();
    let e = populate_all(&mut c, populate_req("vm1", "huge", 0, 0, 0))
        .await
        .unwrap_err();
    println!("{}", e.message());
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("node 0") && e.message().contains("short by"),
        "the refusal names the node and the shortfall: {}",
        e.message()
    );
    let p = placement(&mut c, "vm1", "huge").await;
    assert_eq!(
        consistent(&p, size / PAGE),
        0,
        "nothing was allocated before the refusal"
    );
    // A range that fits still populates.
    populate_all(&mut c, populate_req("vm1", "huge", 0, 16 * MIB, 0))
        .await
        .unwrap();
    let p = placement(&mut c, "vm1", "huge").await;
    assert_eq!(consistent(&p, size / PAGE), 16 * MIB / PAGE);
    c.delete_region("vm1", "huge").await.unwrap();
}

/// Reserves 2 MiB huge pages for a test and gives them back when dropped.
struct HugePool {
    before: u64,
}

impl HugePool {
    fn reserve(extra: u64) -> Self {
        let read = || -> u64 {
            std::fs::read_to_string(HUGE_2M)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let before = read();
        let pool = HugePool { before };
        std::fs::write(HUGE_2M, (before + extra).to_string()).unwrap();
        assert_eq!(
            read(),
            before + extra,
            "the kernel could not reserve {extra} huge pages of 2 MiB"
        );
        pool
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        let _ = std::fs::write(HUGE_2M, self.before.to_string());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hugetlb_populate_placement_alignment_and_pool_exhaustion() {
    const HUGE: u64 = 2 * MIB;
    let (_serial, _agent, mut c) = start().await;
    let _pool = HugePool::reserve(16);
    let free0 = node0_meminfo("HugePages_Free");
    assert!(free0 >= 16, "node 0 has the reserved pages free: {free0}");

    // A region of twice what the pool holds for us.
    let size = 32 * HUGE;
    let created = c
        .create_region_with(pb::CreateRegionRequest {
            vm_id: "vm1".into(),
            name: "huge".into(),
            size_bytes: size,
            backend: pb::Backend::MemfdHugetlb as i32,
            hugepage_size_bytes: HUGE,
            policies: bind0(),
            request_id: memplace_client::new_request_id(),
        })
        .await
        .unwrap();
    assert_eq!(created.region.unwrap().page_size_bytes, HUGE);

    // Offsets and lengths must be huge-page aligned.
    let e = populate_all(&mut c, populate_req("vm1", "huge", PAGE, HUGE, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = populate_all(&mut c, populate_req("vm1", "huge", HUGE, MIB, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .raw()
        .get_placement(pb::GetPlacementRequest {
            vm_id: "vm1".into(),
            name: "huge".into(),
            offset: MIB,
            length: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(node0_meminfo("HugePages_Free"), free0, "nothing allocated");

    // Fresh: nothing present, and reading says so without allocating.
    let p = placement(&mut c, "vm1", "huge").await;
    assert_eq!(p.page_size_bytes, HUGE);
    assert_eq!(consistent(&p, 32), 0);
    assert_eq!(node0_meminfo("HugePages_Free"), free0);

    // Populate 8 huge pages (fallocate: nobody maps them).
    let (_, summary) = populate_all(&mut c, populate_req("vm1", "huge", 0, 8 * HUGE, 0))
        .await
        .unwrap();
    assert_eq!(summary.bytes_done, 8 * HUGE, "{summary:?}");
    assert_eq!(summary.nodes, vec![pb::NodePages { node: 0, pages: 8 }]);
    assert_eq!(
        node0_meminfo("HugePages_Free"),
        free0 - 8,
        "the kernel's pool agrees: 8 pages taken"
    );
    for _ in 0..2 {
        let p = placement(&mut c, "vm1", "huge").await;
        assert_eq!(p.page_size_bytes, HUGE);
        assert_eq!(consistent(&p, 32), 8, "{p:?}");
        assert_eq!(pages_on(&p, 0), 8);
        assert_eq!(p.ranges[0].pages_not_present, 0, "{p:?}");
        assert_eq!(
            node0_meminfo("HugePages_Free"),
            free0 - 8,
            "reading placement allocates no huge page"
        );
    }

    // The whole region needs 24 more pages than the 8 the pool has left: refused up front.
    let e = populate_all(&mut c, populate_req("vm1", "huge", 0, 0, 0))
        .await
        .unwrap_err();
    println!("{}", e.message());
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("node 0") && e.message().contains("huge pages"),
        "{}",
        e.message()
    );
    assert_eq!(
        node0_meminfo("HugePages_Free"),
        free0 - 8,
        "nothing allocated by the refused populate"
    );

    // Deleting frees the pages back to the pool.
    c.delete_region("vm1", "huge").await.unwrap();
    assert_eq!(node0_meminfo("HugePages_Free"), free0);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
async fn task_policy_ranges_are_applied_by_populate_and_pending_after_a_change() {
    // The task-policy strategy is what guest_memfd gets on a kernel without its shared policy
    // (6.18); forced, so the case runs the same on one that has it (the 7.x guest).
    let _serial = SERIAL.lock().await;
    let _agent = AgentProc::start_with(&["--force-strategy", "task-policy"]);
    let mut c = _agent.client().await;
    let size = 64 * MIB;
    let r = c
        .create_region("vm1", "gmem", size, pb::Backend::GuestMemfd, bind0())
        .await
        .unwrap()
        .region
        .unwrap();
    assert_eq!(r.strategy(), pb::Strategy::TaskPolicy);
    let states = |r: &pb::Region| -> Vec<(u64, u64, pb::RangeState, pb::Governs)> {
        r.ranges
            .iter()
            .map(|x| (x.offset, x.length, x.state(), x.governs()))
            .collect()
    };
    use pb::Governs::AgentAllocationsOnly as Agent;
    use pb::RangeState::{Applied, Pending};
    assert_eq!(states(&r), vec![(0, size, Pending, Agent)]);

    // Populating the first half places that half only.
    populate_all(&mut c, populate_req("vm1", "gmem", 0, size / 2, 0))
        .await
        .unwrap();
    let r = c.get_region("vm1", "gmem").await.unwrap();
    assert_eq!(
        states(&r),
        vec![
            (0, size / 2, Applied, Agent),
            (size / 2, size / 2, Pending, Agent)
        ]
    );
    populate_all(&mut c, populate_req("vm1", "gmem", 0, 0, 0))
        .await
        .unwrap();
    let r = c.get_region("vm1", "gmem").await.unwrap();
    assert_eq!(states(&r), vec![(0, size, Applied, Agent)]);

    // The same policy again keeps the range placed; a different one makes it pending.
    c.set_policy("vm1", "gmem", 0, 0, policy(M::Bind, &[0]), false)
        .await
        .unwrap();
    let r = c.get_region("vm1", "gmem").await.unwrap();
    assert_eq!(states(&r), vec![(0, size, Applied, Agent)]);
    let r = c
        .set_policy("vm1", "gmem", 0, 0, policy(M::Preferred, &[0]), false)
        .await
        .unwrap()
        .region
        .unwrap();
    assert_eq!(states(&r), vec![(0, size, Pending, Agent)]);
    let r = c.get_region("vm1", "gmem").await.unwrap();
    assert_eq!(states(&r), vec![(0, size, Pending, Agent)]);
    c.delete_region("vm1", "gmem").await.unwrap();
}
