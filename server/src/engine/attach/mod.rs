//! AttachProcess: bringing a running VMM's guest memory under the agent. Every memfd the process
//! maps shared or holds, and every guest_memfd it holds, is taken with pidfd_getfd (or through
//! /proc/PID/map_files) and becomes a region of the VM with the process recorded as its holder,
//! exactly as if the VMM had acquired or adopted it: a restart takes the file back from it.
//!
//! A file that already is a region of the VM is that region again (matched by st_dev/st_ino), so
//! attaching twice changes nothing. Everything is durable before the answer; nothing is written
//! when any check fails.

mod adopt;
mod qemu;

use super::idempotency::committed_first;
use super::{Agent, AgentError, Idempotency, LiveRegion, RegionFile, RegionView, kerr, new_uid};
use crate::domain::{
    Backend, DomainError, Event, EventKind, Holder, RegionIntent, RegionKey, RegionStatus,
    Strategy, VmId,
};
use crate::kernel::procmem::{self, FoundFile, MemKind, ProcessMemory};
use crate::kernel::{Mapping, pidfd};
use crate::store::{WriteOp, unix_now};
use nix::errno::Errno;
use qemu::{BackendMatch, FileShape};
use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::sync::Arc;
use tokio::sync::RwLock;

/// What to tell a caller whose process has no shared guest memory.
const HOW_TO_SHARE: &str = "memplace can take over only guest RAM kept in a shared file. QEMU: \
    -object memory-backend-memfd,id=m0,size=SIZE,share=on -machine memory-backend=m0 (plain -m \
    RAM is anonymous and share=off maps the file privately); Cloud Hypervisor: --memory \
    size=SIZE,shared=on; or start the VMM on memplace regions with `memplacectl exec`";

/// A region name from a memfd's name: characters outside [A-Za-z0-9._-] become '-', at most 63
/// characters, "memfd" when nothing is left.
fn name_from_memfd(raw: &str) -> String {
    let s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if s.trim_matches('-').is_empty() {
        "memfd".into()
    } else {
        s
    }
}

/// `base`, or `base-1`, `base-2`, … (shortened to fit 63 characters), whichever is not taken.
fn unique(base: &str, taken: &HashSet<String>) -> String {
    if !taken.contains(base) {
        return base.to_string();
    }
    (1..)
        .map(|i| {
            let suffix = format!("-{i}");
            let keep = 63usize.saturating_sub(suffix.len()).min(base.len());
            format!("{}{suffix}", &base[..keep])
        })
        .find(|n| !taken.contains(n))
        .unwrap_or_default()
}

/// Checks the pid names a process that may be attached; returns its start time.
fn check_pid(pid: i32) -> Result<u64, AgentError> {
    let me = std::process::id() as i32;
    if pid <= 0 {
        return Err(AgentError::InvalidArgument(format!(
            "pid must be a positive process id, got {pid}"
        )));
    }
    if pid == 1 {
        return Err(AgentError::InvalidArgument(
            "pid 1 is the init process, not a VMM".into(),
        ));
    }
    let Some((tgid, state)) = procmem::tgid_and_state(pid) else {
        return Err(no_process(pid));
    };
    if pid == me {
        return Err(AgentError::InvalidArgument(format!(
            "pid {pid} is the memplace agent itself, not a VMM"
        )));
    }
    if tgid != pid {
        return Err(AgentError::InvalidArgument(format!(
            "pid {pid} is a thread of process {tgid}: give the process id"
        )));
    }
    if matches!(state, 'Z' | 'X') {
        return Err(no_process(pid));
    }
    pidfd::start_time(pid).ok_or_else(|| no_process(pid))
}

fn no_process(pid: i32) -> AgentError {
    AgentError::ProcessNotFound(format!("no running process has pid {pid}"))
}

/// Per file found: an existing region of the VM, or a new region.
enum Attached {
    Existing(RegionKey),
    New(Box<LiveRegion>),
}

/// What an attach will write: the regions in the order their files were found, with the ops and
/// events to commit.
#[derive(Default)]
struct AttachPlan {
    regions: Vec<Attached>,
    ops: Vec<WriteOp>,
    events: Vec<Event>,
    new_count: usize,
}

/// Whose files an attach takes, and who asked.
#[derive(Clone, Copy)]
struct Who<'a> {
    vm_id: &'a VmId,
    holder: Holder,
    comm: &'a str,
    actor: &'a str,
}

/// The agent's regions by file identity, and the names the VM already uses.
#[derive(Default)]
struct Known {
    by_file: HashMap<(u64, u64), (RegionKey, Option<Holder>)>,
    taken: HashSet<String>,
    gmem_index: usize,
}

impl Agent {
    /// Takes every memfd and guest_memfd of process `pid` as a region of `vm_id` (see the module
    /// docs). Returns the regions in the order their files were found.
    pub async fn attach_process(
        &self,
        vm_id: &VmId,
        pid: i32,
        actor: &str,
        idem: Option<Idempotency<[RegionView]>>,
    ) -> Result<Vec<RegionView>, AgentError> {
        // /proc is read off the runtime.
        let start = Agent::blocking(move || check_pid(pid)).await??;
        let holder = Holder {
            pid,
            start_time: start,
        };
        // Creates and deletes wait, so names and the region count stay consistent.
        let _m = self.regions().changing().await;
        let found = scan_process(pid, start).await?;
        let mut known = self.known_files(vm_id.as_str()).await;
        let mut plan = AttachPlan::default();
        let who = Who {
            vm_id,
            holder,
            comm: &found.comm,
            actor,
        };
        let names = backend_names(&found);
        for (f, naming) in found.files.into_iter().zip(names) {
            self.plan_file(&mut plan, &mut known, f, naming, &who)
                .await?;
        }
        let existing = self.regions().map().len();
        let max = self.settings().max_regions;
        if existing + plan.new_count > max {
            return Err(AgentError::OverLimit {
                limit: "max_regions",
                max: max as u64,
                message: format!(
                    "attaching {} regions would pass the agent's limit of {max} regions",
                    plan.new_count
                ),
            });
        }
        let AttachPlan {
            regions,
            mut ops,
            events,
            ..
        } = plan;
        // The answer, stored with the commit. Attaching applies no policy (new regions start at
        // what the kernel shows), so the kernel reads now as it will after the commit, and a replay of the
        // request id answers exactly as the first call did.
        let (regions, pending) = self.attached_views(regions, holder).await?;
        if let Some(i) = &idem {
            ops.push(i.save(&pending));
        }
        if !ops.is_empty() {
            self.commit(ops, events)
                .await
                .map_err(committed_first(idem.as_ref()))?;
        }
        self.install_attached(regions, holder).await
    }

    /// Every region by file, and the VM's region names.
    async fn known_files(&self, vm_id: &str) -> Known {
        let mut known = Known::default();
        for slot in self.slots(None) {
            let live = slot.read().await;
            if live.intent.key.vm_id == vm_id {
                known.taken.insert(live.intent.key.name.clone());
            }
            if let Some(id) = live.intent.file_id
                && live.intent.status == RegionStatus::Active
            {
                known
                    .by_file
                    .insert(id, (live.intent.key.clone(), live.intent.holder));
            }
        }
        known
    }

    /// Plans one file of the process: an existing region of the VM (its holder recorded anew),
    /// or a new region.
    async fn plan_file(
        &self,
        plan: &mut AttachPlan,
        known: &mut Known,
        f: FoundFile,
        naming: Option<BackendMatch>,
        who: &Who<'_>,
    ) -> Result<(), AgentError> {
        let Who {
            vm_id,
            holder,
            actor,
            ..
        } = *who;
        let pid = holder.pid;
        let Some((key, recorded)) = known.by_file.get(&f.file_id) else {
            let (live, event) = self.new_attached(known, f, naming, who).await?;
            plan.ops.push(WriteOp::InsertRegion(live.intent.clone()));
            plan.events.push(event);
            plan.new_count += 1;
            plan.regions.push(Attached::New(Box::new(live)));
            return Ok(());
        };
        if key.vm_id != vm_id.as_str() {
            return Err(AgentError::FailedPrecondition(format!(
                "a file of pid {pid} already is region {key} of another VM; a file \
                 belongs to one VM"
            )));
        }
        if *recorded != Some(holder) {
            plan.ops.push(WriteOp::SaveHolder {
                key: key.clone(),
                holder: Some(holder),
                file_id: Some(f.file_id),
            });
            plan.events.push(self.event(
                EventKind::Handoff,
                Some(key),
                format!("attached: pid {pid} holds the file"),
                actor,
            ));
        }
        plan.regions.push(Attached::Existing(key.clone()));
        Ok(())
    }

    /// A new region for a file of the process, with its event: named after the QEMU backend the
    /// file is proven to be, else after the memfd.
    async fn new_attached(
        &self,
        known: &mut Known,
        f: FoundFile,
        naming: Option<BackendMatch>,
        who: &Who<'_>,
    ) -> Result<(LiveRegion, Event), AgentError> {
        let Who {
            vm_id,
            holder,
            comm,
            actor,
        } = *who;
        let pid = holder.pid;
        let page = self.page_size();
        let (backend, file_page, hugepage) = match f.kind {
            MemKind::Memfd => (Backend::Memfd, page, 0),
            MemKind::MemfdHugetlb(hp) => (Backend::MemfdHugetlb, hp, hp),
            MemKind::GuestMemfd => (Backend::GuestMemfd, page, 0),
        };
        if f.size == 0 || f.size > self.settings().max_region_bytes {
            return Err(DomainError::BadSize {
                size: f.size,
                max: self.settings().max_region_bytes,
            }
            .into());
        }
        if file_page == 0 || !f.size.is_multiple_of(file_page) {
            return Err(AgentError::FailedPrecondition(format!(
                "the {} file {:?} of pid {pid} is {} bytes, not a multiple of its page size {file_page}",
                backend.as_str(),
                f.name,
                f.size
            )));
        }
        let (name, guest_cell, named) = attached_name(known, &f, naming.as_ref());
        let key = RegionKey::in_vm(vm_id, &name)?;
        // guest_memfd without MMAP cannot be mapped: such a region is placed by task policy.
        let gmem_shared = self.features().guest_memfd_shared_policy;
        let by_backend = self.strategy_for(backend);
        // The mapping and the read of the file's policy are kernel work: off the runtime.
        let (f, mapping, strategy, read) = Agent::blocking(move || {
            let mapping = Mapping::new(f.fd.as_fd(), f.size).ok();
            let strategy = match backend {
                Backend::GuestMemfd if mapping.is_none() => Strategy::TaskPolicy,
                Backend::GuestMemfd if gmem_shared => Strategy::SharedPolicy,
                Backend::GuestMemfd => Strategy::TaskPolicy,
                _ => by_backend,
            };
            let read = match &mapping {
                None if backend != Backend::GuestMemfd => {
                    Err(kerr("mmap of the attached file")(Errno::EINVAL))
                }
                _ => adopt::kernel_ranges(
                    f.fd.as_fd(),
                    mapping.as_ref(),
                    strategy,
                    f.size,
                    file_page,
                ),
            };
            (f, mapping, strategy, read)
        })
        .await?;
        let (ranges, kept) = read?;
        let intent = RegionIntent {
            key: key.clone(),
            uid: new_uid(),
            backend,
            size_bytes: f.size,
            hugepage_size_bytes: hugepage,
            generation: 1,
            strategy,
            ranges,
            created_unix: unix_now(),
            status: RegionStatus::Active,
            holder: Some(holder),
            file_id: Some(f.file_id),
            origin: crate::domain::Origin::Attach,
            guest_cell,
        };
        // How much of the file holds data now: near nothing for a VMM attached before its guest
        // ran (libvirt's `started` hook), so the placement applies to all the guest's memory.
        let allocated = nix::sys::stat::fstat(&f.fd).map_or_else(
            |_| "unknown bytes".to_string(),
            |st| format!("{} bytes", st.st_blocks as u64 * 512),
        );
        let event = self.event(
            EventKind::RegionAdopted,
            Some(&key),
            format!(
                "attached a {} file of {} bytes ({allocated} allocated) from pid {pid} ({comm}){}{named}; {kept}",
                backend.as_str(),
                f.size,
                match f.held_fd {
                    Some(n) => format!(", its fd {n}"),
                    None => ", mapped without an fd".into(),
                }
            ),
            actor,
        );
        let live = LiveRegion {
            intent,
            file: Some(RegionFile {
                census: Default::default(),
                fd: f.fd,
                mapping,
                vm: None,
            }),
            errors: HashMap::new(),
            checked: None,
        };
        Ok((live, event))
    }

    /// The views of the attached regions as they will read after the commit (the holder set).
    async fn attached_views(
        &self,
        regions: Vec<Attached>,
        holder: Holder,
    ) -> Result<(Vec<Attached>, Vec<RegionView>), AgentError> {
        let mut out = Vec::with_capacity(regions.len());
        let mut views = Vec::with_capacity(regions.len());
        for a in regions {
            match a {
                Attached::Existing(key) => {
                    let live = self.slot(&key)?.read_owned().await;
                    let (_, mut v) = self.view_of(live).await?;
                    v.intent.holder = Some(holder);
                    views.push(v);
                    out.push(Attached::Existing(key));
                }
                Attached::New(live) => {
                    // Read now and kept as the region's last check, so later answers (and a
                    // retry's) show the same reading until the next check.
                    let (live, v) = self.fresh_view_of(live).await?;
                    views.push(v);
                    out.push(Attached::New(live));
                }
            }
        }
        Ok((out, views))
    }

    /// After the commit: records the holder on existing regions and inserts the new ones.
    async fn install_attached(
        &self,
        regions: Vec<Attached>,
        holder: Holder,
    ) -> Result<Vec<RegionView>, AgentError> {
        let mut views = Vec::with_capacity(regions.len());
        for a in regions {
            match a {
                Attached::Existing(key) => {
                    let mut live = self.slot(&key)?.write_owned().await;
                    live.intent.holder = Some(holder);
                    views.push(self.view_of(live).await?.1);
                }
                Attached::New(live) => {
                    let (live, v) = self.view_of(live).await?;
                    views.push(v);
                    self.regions()
                        .map()
                        .insert(live.intent.key.clone(), Arc::new(RwLock::new(*live)));
                }
            }
        }
        Ok(views)
    }
}

/// For each file of the process, in order, which QEMU memory backend it is proven to be (see
/// [`qemu`]); `None` for each when the process declares no backend (not QEMU).
fn backend_names(found: &ProcessMemory) -> Vec<Option<BackendMatch>> {
    let backends = qemu::backends(&found.cmdline);
    if backends.is_empty() {
        return found.files.iter().map(|_| None).collect();
    }
    let maps: Vec<Vec<(u64, u64, u64)>> = found
        .files
        .iter()
        .map(|f| {
            f.shared_mappings
                .iter()
                .map(|m| (m.start, m.length, m.offset))
                .collect()
        })
        .collect();
    let shapes: Vec<FileShape<'_>> = found
        .files
        .iter()
        .zip(&maps)
        .map(|(f, m)| FileShape {
            memfd: f.kind != MemKind::GuestMemfd,
            size: f.size,
            mappings: m,
        })
        .collect();
    qemu::match_files(&backends, &shapes)
        .into_iter()
        .map(Some)
        .collect()
}

/// Takes the process's guest-memory files; refuses a process with none, or with some the agent
/// cannot open (attaching part of the guest's memory would leave the rest unplaced without a
/// word).
async fn scan_process(pid: i32, start: u64) -> Result<ProcessMemory, AgentError> {
    let found = Agent::blocking(move || procmem::scan(pid, start))
        .await?
        .map_err(|e| match e {
            Errno::ESRCH => no_process(pid),
            e => kerr("taking the process's files (pidfd_getfd)")(e),
        })?;
    if !found.unopenable.is_empty() {
        return Err(AgentError::FailedPrecondition(format!(
            "pid {pid} ({}) maps memfds shared without holding an fd, and the agent cannot \
             open them through /proc/{pid}/map_files: {}. Give the agent \
             CAP_CHECKPOINT_RESTORE",
            found.comm,
            found.unopenable.join(", ")
        )));
    }
    if found.files.is_empty() {
        let private = if found.private_memfds.is_empty() {
            String::new()
        } else {
            format!(
                "; it maps these memfds only privately (share=off): {}",
                found.private_memfds.join(", ")
            )
        };
        return Err(AgentError::FailedPrecondition(format!(
            "pid {pid} ({}) has no shared guest memory: it maps no memfd shared and holds no \
             memfd or guest_memfd{private}. {HOW_TO_SHARE}",
            found.comm
        )));
    }
    Ok(found)
}

/// The name of a region attached from `f`, its guest NUMA cell, and what the event says of the
/// name: `gmemN` for a guest_memfd, the QEMU backend's id where the file is proven to be that
/// backend, else the memfd's own name; made unique among `known` names and added to them.
fn attached_name(
    known: &mut Known,
    f: &FoundFile,
    naming: Option<&BackendMatch>,
) -> (String, Option<u32>, String) {
    let base = match f.kind {
        MemKind::GuestMemfd => loop {
            let n = format!("gmem{}", known.gmem_index);
            known.gmem_index += 1;
            if !known.taken.contains(&n) {
                break n;
            }
        },
        _ => match naming {
            Some(BackendMatch::Proven { backend, .. }) => name_from_memfd(&backend.id),
            _ => name_from_memfd(&f.name),
        },
    };
    let (guest_cell, named) = match naming {
        Some(BackendMatch::Proven { backend, how }) => (
            backend.cell,
            format!(
                "; named after QEMU memory backend {}{}: {how}",
                backend.id,
                backend
                    .cell
                    .map_or(String::new(), |c| format!(" (guest NUMA cell {c})"))
            ),
        ),
        Some(BackendMatch::Unproven(why)) => (
            None,
            format!("; named after the memfd, not a QEMU backend: {why}"),
        ),
        None => (None, String::new()),
    };
    let name = unique(&base, &known.taken);
    known.taken.insert(name.clone());
    (name, guest_cell, named)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_names_become_valid_unique_region_names() {
        assert_eq!(
            name_from_memfd("memory-backend-memfd"),
            "memory-backend-memfd"
        );
        assert_eq!(name_from_memfd("a b/c"), "a-b-c");
        assert_eq!(name_from_memfd(""), "memfd");
        assert_eq!(name_from_memfd("///"), "memfd");
        assert_eq!(name_from_memfd(&"x".repeat(100)).len(), 63);
        let mut taken = HashSet::new();
        taken.insert("ram".to_string());
        assert_eq!(unique("ram", &taken), "ram-1");
        taken.insert("ram-1".to_string());
        assert_eq!(unique("ram", &taken), "ram-2");
        let long = "y".repeat(63);
        taken.insert(long.clone());
        let u = unique(&long, &taken);
        assert_eq!(u.len(), 63);
        assert!(u.ends_with("-1"));
        assert!(crate::domain::validate_name("name", &u).is_ok());
    }
}
