//! libvirt-managed VMs under memplace, with the real libvirt: Debian's libvirt 9.0, installed
//! without systemd and started by hand (tests/libvirt/setup.sh), running a TCG domain with
//! `<memoryBacking><source type='memfd'/><access mode='shared'/>`, direct kernel boot of the
//! busybox guest whose RAM checks run on the serial console (tests/numa/ram-check.sh), and
//! `<numatune><memory mode='strict' nodeset='0'/>`. The hook is the shipped deploy/libvirt/qemu
//! calling `memplacectl libvirt-hook`.
//!
//! One scenario, because libvirtd is one per machine and reads its hook only when it starts. Its
//! checks, each of which must be reached: the hook attaches before the guest runs; numatune is
//! the intent; live SetPolicy works; an agent SIGKILL leaves the guest running and the regions
//! are recovered; a libvirtd restart changes nothing; `virsh destroy` deletes the regions and the
//! memory is given back (node Shmem and FilePages drop). It fails, never skips, when libvirt
//! cannot be installed or started. Only one host NUMA node here: policies name node 0 and the
//! checks read the policy the kernel shows.

mod common;

use common::events::stored_events;
use common::procfs::{holds_inode, node_meminfo};
use common::qemu::{lts_kernel, ram_check_initramfs};
use common::{AgentProc, MIB, ctl_path, policy};
use memplace_client::pb;
use memplace_server::domain::{NodeSet, Policy, PolicyMode};
use memplace_server::kernel::Mapping;
use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DOMAIN: &str = "memplace-test";
const GUEST_MB: u64 = 256;
/// What the guest writes into its RAM (a tmpfs of half its RAM) and keeps checking.
const GUEST_DATA_MIB: u64 = 96;
/// Upper bound for a TCG boot (or a check) on a busy machine.
const GUEST_LIMIT: Duration = Duration::from_secs(600);
const HOOK: &str = "/etc/libvirt/hooks/qemu";
const HOOK_ENV: &str = "/etc/default/memplace";

fn setup(step: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libvirt/setup.sh");
    let o = Command::new("bash")
        .arg(&script)
        .arg(step)
        .output()
        .expect("running tests/libvirt/setup.sh");
    assert!(
        o.status.success(),
        "tests/libvirt/setup.sh {step} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn virsh(args: &[&str]) -> String {
    let o = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("virsh (installed by tests/libvirt/setup.sh)");
    assert!(
        o.status.success(),
        "virsh {args:?} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The hook installed for this test's agent; on drop the domain is destroyed, the hook removed
/// and libvirtd stopped (it would keep calling a hook whose agent is gone).
struct Hooked {
    dir: PathBuf,
}

impl Hooked {
    fn install(agent: &AgentProc) -> Self {
        setup("install");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/libvirt/qemu"),
            HOOK,
        )
        .expect("installing the hook");
        std::fs::write(
            HOOK_ENV,
            format!(
                "MEMPLACECTL={}\nMEMPLACE_SOCKET={}\n",
                ctl_path().display(),
                agent.socket().display()
            ),
        )
        .unwrap();
        // libvirtd reads hooks only when it starts.
        setup("stop");
        setup("start");
        let dir = PathBuf::from(format!(
            "/var/lib/libvirt/images/{DOMAIN}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Hooked { dir }
    }
}

impl Drop for Hooked {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", "destroy", DOMAIN])
            .output();
        let _ = std::fs::remove_file(HOOK);
        let _ = std::fs::remove_file(HOOK_ENV);
        let _ = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libvirt/setup.sh"))
            .arg("stop")
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The domain of README's libvirt section (TCG, memfd shared backing, direct kernel boot, strict
/// numatune on node 0), with this test's name, files and guest data size.
fn domain_xml(dir: &Path) -> String {
    let readme = common::readme::readme();
    let section = common::readme::section(&readme, "## libvirt");
    let start = section
        .find("```xml\n")
        .expect("README's libvirt section has no ```xml block")
        + 7;
    let end = start
        + section[start..]
            .find("```")
            .expect("an unterminated ```xml block");
    let xml = section[start..end]
        .replace("<name>guest</name>", &format!("<name>{DOMAIN}</name>"))
        .replace(
            "/var/lib/libvirt/images/guest/",
            &format!("{}/", dir.display()),
        )
        .replace(
            "panic=-1</cmdline>",
            &format!("panic=-1 quiet memplace.ramcheck_mb={GUEST_DATA_MIB}</cmdline>"),
        );
    assert!(
        xml.contains(&format!("<memory unit='MiB'>{GUEST_MB}</memory>"))
            && xml.contains(&format!("{}/vmlinuz", dir.display()))
            && xml.contains("memplace.ramcheck_mb="),
        "README's domain XML is not the one this test expects:\n{xml}"
    );
    xml
}

/// A domain with two guest NUMA cells of 128 and 64 MiB on shared memfds, cell 1 interleaved by
/// `<memnode>`, the rest strict. It is only started, not booted to a check.
fn two_cell_xml(dir: &Path) -> String {
    format!(
        r#"<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>2</vcpu>
  <cpu>
    <numa>
      <cell id='0' cpus='0' memory='128' unit='MiB' memAccess='shared'/>
      <cell id='1' cpus='1' memory='64' unit='MiB' memAccess='shared'/>
    </numa>
  </cpu>
  <numatune>
    <memory mode='strict' nodeset='0'/>
    <memnode cellid='1' mode='interleave' nodeset='0'/>
  </numatune>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{dir}/vmlinuz</kernel>
    <initrd>{dir}/initrd.cpio</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
        dir = dir.display()
    )
}

/// Counts of the guest's passed and failed RAM checks.
fn checks(serial: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let count = |p: &str| text.lines().filter(|l| l.starts_with(p)).count();
    (count("RAMCHECK OK "), count("RAMCHECK FAIL "))
}

/// Waits until the guest has passed two more RAM checks than `after`, with none failed.
fn checks_keep_passing(serial: &Path, after: usize, when: &str) -> usize {
    let t = Instant::now();
    loop {
        let (ok, bad) = checks(serial);
        assert_eq!(
            bad,
            0,
            "{when}: a guest RAM check failed:\n{}",
            std::fs::read_to_string(serial).unwrap_or_default()
        );
        if ok >= after + 2 {
            return ok;
        }
        assert!(
            t.elapsed() < GUEST_LIMIT,
            "{when}: the guest passed no two more RAM checks within {GUEST_LIMIT:?}:\n{}",
            std::fs::read_to_string(serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn qemu_pid() -> i32 {
    std::fs::read_to_string(format!("/run/libvirt/qemu/{DOMAIN}.pid"))
        .expect("libvirt's pid file of the domain")
        .trim()
        .parse()
        .unwrap()
}

/// QEMU's memfd fd number whose inode is `ino`.
fn fd_of_inode(pid: i32, ino: u64) -> String {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::metadata(e.path())
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino)
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("QEMU pid {pid} holds no fd of inode {ino}"))
        .file_name()
        .into_string()
        .unwrap()
}

/// QEMU's only memfd: its inode.
fn qemu_memfd_inode(pid: i32) -> u64 {
    let inodes: BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| {
                l.to_string_lossy()
                    .starts_with("/memfd:memory-backend-memfd")
            })
        })
        .map(|e| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(e.path()).unwrap()))
        .collect();
    assert_eq!(
        inodes.len(),
        1,
        "QEMU should hold one backend memfd: {inodes:?}"
    );
    inodes.into_iter().next().unwrap()
}

/// The policy of QEMU's file at its first and last page, read through a mapping made now of
/// QEMU's own fd.
fn policy_seen(pid: i32, ino: u64) -> (Option<Policy>, Option<Policy>) {
    let fd = fd_of_inode(pid, ino);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .unwrap();
    let size = GUEST_MB * MIB;
    let m = Mapping::new(f.as_fd(), size).unwrap();
    (m.policy_at(0).unwrap(), m.policy_at(size - 4096).unwrap())
}

fn node0(mode: PolicyMode) -> Policy {
    let mut n = NodeSet::new();
    n.insert(0).unwrap();
    Policy::new(mode, n)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_libvirt_domain_is_placed_by_memplace_through_its_hook() {
    let mut expected: BTreeSet<&str> = [
        "guest boots and checks its RAM",
        "hook attached before the guest ran",
        "numatune is the intent",
        "live SetPolicy",
        "agent SIGKILL: guest runs, regions recovered",
        "libvirtd restart changes nothing",
        "virsh destroy deletes the regions and frees the memory",
        "two guest cells: regions per cell, memnode as intent",
    ]
    .into_iter()
    .collect();
    let mut done = |what: &'static str| assert!(expected.remove(what), "unknown check {what}");

    let kernel = lts_kernel();
    let mut agent = AgentProc::start();
    let hooked = Hooked::install(&agent);
    // The guest files where libvirt-qemu can read them (libvirt relabels them for QEMU).
    let tmp = tempfile::tempdir().unwrap();
    let initrd = hooked.dir.join("initrd.cpio");
    std::fs::copy(ram_check_initramfs(tmp.path()), &initrd).unwrap();
    let vmlinuz = hooked.dir.join("vmlinuz");
    std::fs::copy(&kernel, &vmlinuz).unwrap();
    let xml = hooked.dir.join("domain.xml");
    std::fs::write(&xml, domain_xml(&hooked.dir)).unwrap();
    let serial = hooked.dir.join("serial.log");

    // `virsh create` returns once the `started` hook has run.
    virsh(&["create", xml.to_str().unwrap()]);
    let qpid = qemu_pid();
    let mut c = agent.client().await;
    let regions = c.list_regions(DOMAIN).await.unwrap();
    assert_eq!(regions.len(), 1, "{regions:#?}");
    let r = &regions[0];
    // libvirt's backend id for a guest without <numa> cells is pc.ram (QEMU's -machine
    // memory-backend=pc.ram): the region is named after it, and it backs guest cell 0.
    assert_eq!(
        (r.name.as_str(), r.guest_cell),
        ("pc.ram", Some(0)),
        "{r:?}"
    );
    assert_eq!(r.holder_pid, qpid, "{r:?}");
    assert_eq!(r.origin(), pb::RegionOrigin::Attach, "{r:?}");
    let uid = r.uid.clone();
    let evs = stored_events(&mut c, DOMAIN, 0).await;
    let attached = evs
        .iter()
        .find(|e| e.kind() == pb::EventKind::RegionAdopted)
        .unwrap_or_else(|| panic!("no attach event: {evs:#?}"));
    // The hook ran at `started begin`, before libvirt let the guest run: almost nothing of the
    // guest's RAM was allocated when the file was attached (the guest later writes GUEST_DATA_MIB).
    let allocated: u64 = attached
        .message
        .split_once(" bytes (")
        .and_then(|(_, rest)| rest.split_once(" bytes allocated)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no allocated bytes in {attached:?}"));
    assert!(
        allocated < 4 * MIB,
        "{allocated} bytes of the guest's RAM were allocated at attach: {attached:?}"
    );
    done("hook attached before the guest ran");

    // numatune strict 0 is the intent, and the kernel shows it on QEMU's file.
    let bind = policy(pb::PolicyMode::Bind, &[0]);
    assert_eq!(r.ranges.len(), 1, "{r:?}");
    assert_eq!(r.ranges[0].intended.as_ref(), Some(&bind), "{r:?}");
    assert_eq!(r.ranges[0].state(), pb::RangeState::Applied, "{r:?}");
    let ino = qemu_memfd_inode(qpid);
    let bind0 = node0(PolicyMode::Bind);
    assert_eq!(policy_seen(qpid, ino), (Some(bind0), Some(bind0)));
    c.reconcile(DOMAIN).await.unwrap();
    assert_eq!(policy_seen(qpid, ino), (Some(bind0), Some(bind0)));
    done("numatune is the intent");

    let seen = checks_keep_passing(&serial, 0, "after start");
    done("guest boots and checks its RAM");

    // Live SetPolicy on the running domain: preferred 0, pages moved, then back to bind 0.
    let pref = policy(pb::PolicyMode::Preferred, &[0]);
    c.set_policy(DOMAIN, "pc.ram", 0, 0, pref, true)
        .await
        .unwrap();
    let p0 = node0(PolicyMode::Preferred);
    assert_eq!(policy_seen(qpid, ino), (Some(p0), Some(p0)));
    c.set_policy(DOMAIN, "pc.ram", 0, 0, bind.clone(), true)
        .await
        .unwrap();
    assert_eq!(policy_seen(qpid, ino), (Some(bind0), Some(bind0)));
    let seen = checks_keep_passing(&serial, seen, "after SetPolicy");
    done("live SetPolicy");

    // Agent SIGKILL: the guest keeps running, the restarted agent takes QEMU's file back.
    agent.restart();
    let mut c = agent.client().await;
    let r = c.get_region(DOMAIN, "pc.ram").await.unwrap();
    assert_eq!(
        (r.status(), r.holder_pid, r.uid.as_str()),
        (pb::RegionStatus::Active, qpid, uid.as_str()),
        "{r:?}"
    );
    assert_eq!(r.ranges[0].state(), pb::RangeState::Applied, "{r:?}");
    let seen = checks_keep_passing(&serial, seen, "after the agent's SIGKILL");
    done("agent SIGKILL: guest runs, regions recovered");

    // libvirtd restarts: `reconnect begin` changes nothing.
    let before = c.get_region(DOMAIN, "pc.ram").await.unwrap();
    let last = stored_events(&mut c, DOMAIN, 0)
        .await
        .last()
        .map_or(0, |e| e.sequence);
    setup("stop");
    setup("start");
    assert!(
        virsh(&["domstate", DOMAIN]).contains("running"),
        "the domain is not running after libvirtd restarted"
    );
    assert_eq!(qemu_pid(), qpid);
    let after = c.get_region(DOMAIN, "pc.ram").await.unwrap();
    assert_eq!(
        (
            after.generation,
            &after.uid,
            after.holder_pid,
            &after.ranges
        ),
        (
            before.generation,
            &before.uid,
            before.holder_pid,
            &before.ranges
        )
    );
    let since = stored_events(&mut c, DOMAIN, last).await;
    assert!(
        since.is_empty(),
        "events after libvirtd restarted: {since:#?}"
    );
    checks_keep_passing(&serial, seen, "after libvirtd restarted");
    done("libvirtd restart changes nothing");

    // virsh destroy: the `release end` hook deletes the regions, and the memory is freed.
    let (shmem, file_pages) = (node_meminfo("Shmem"), node_meminfo("FilePages"));
    virsh(&["destroy", DOMAIN]);
    let left = c.list_regions(DOMAIN).await.unwrap();
    assert!(
        left.is_empty(),
        "regions left after virsh destroy: {left:#?}"
    );
    assert!(
        !holds_inode(agent.pid(), ino),
        "the agent still holds the destroyed domain's memfd"
    );
    let size = GUEST_MB * MIB;
    let (shmem_after, file_pages_after) = (node_meminfo("Shmem"), node_meminfo("FilePages"));
    // The guest wrote GUEST_DATA_MIB and its kernel: at least that much was allocated.
    let used = GUEST_DATA_MIB * MIB;
    assert!(
        shmem_after + used <= shmem,
        "Shmem went from {shmem} to {shmem_after}: the guest's memory ({size} bytes file) was not freed"
    );
    assert!(
        file_pages_after + used / 2 <= file_pages,
        "FilePages went from {file_pages} to {file_pages_after}: the guest's memory was not freed"
    );
    done("virsh destroy deletes the regions and frees the memory");

    // Two guest NUMA cells of different sizes: libvirt makes backends ram-node0 and ram-node1,
    // the regions are named after them with their cells, and each cell's <memnode> (else
    // <memory>) is its intent. The host has one node, so both name node 0.
    let two = hooked.dir.join("two-cells.xml");
    std::fs::write(&two, two_cell_xml(&hooked.dir)).unwrap();
    virsh(&["create", two.to_str().unwrap()]);
    let qpid = qemu_pid();
    let mut got: Vec<(String, Option<u32>, u64, Option<pb::Policy>)> = c
        .list_regions(DOMAIN)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            assert_eq!(r.holder_pid, qpid, "{r:?}");
            assert_eq!(r.ranges.len(), 1, "{r:?}");
            (
                r.name.clone(),
                r.guest_cell,
                r.size_bytes,
                r.ranges[0].intended.clone(),
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            (
                "ram-node0".to_string(),
                Some(0),
                128 * MIB,
                Some(bind.clone())
            ),
            (
                "ram-node1".to_string(),
                Some(1),
                64 * MIB,
                Some(policy(pb::PolicyMode::Interleave, &[0]))
            ),
        ]
    );
    virsh(&["destroy", DOMAIN]);
    assert!(c.list_regions(DOMAIN).await.unwrap().is_empty());
    done("two guest cells: regions per cell, memnode as intent");

    assert!(expected.is_empty(), "checks not reached: {expected:?}");
    drop(hooked);
}
