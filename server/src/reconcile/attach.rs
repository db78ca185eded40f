//! AttachProcess: bringing a running VMM's guest memory under the agent. Every memfd the process
//! maps shared or holds, and every guest_memfd it holds, is taken with pidfd_getfd (or through
//! /proc/PID/map_files) and becomes a region of the VM with the process recorded as its holder,
//! exactly as if the VMM had acquired or adopted it: a restart takes the file back from it.
//!
//! A file that already is a region of the VM is that region again (matched by st_dev/st_ino), so
//! attaching twice changes nothing. Everything is durable before the answer; nothing is written
//! when any check fails.

use super::{Agent, AgentError, LiveRegion, RegionFile, RegionView, kerr, new_uid};
use crate::domain::{
    Backend, DomainError, EventKind, Holder, RangeMap, RegionIntent, RegionKey, RegionStatus,
    Strategy, validate_name,
};
use crate::kernel::procmem::{self, MemKind};
use crate::kernel::{Mapping, pidfd};
use crate::store::{StoreError, WriteOp, unix_now};
use nix::errno::Errno;
use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::sync::Arc;
use tokio::sync::RwLock;

/// Encodes the first answer to an AttachProcess from its regions.
pub type EncodeRegions = Box<dyn Fn(&[RegionView]) -> Vec<u8> + Send + Sync>;

/// The idempotency record of an AttachProcess: like [`super::Idempotency`], for several regions.
pub struct AttachIdempotency {
    /// The id.
    pub request_id: String,
    /// Digest of the request.
    pub fingerprint: Vec<u8>,
    /// Encodes the answer from the regions.
    pub encode: EncodeRegions,
}

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

impl Agent {
    /// Takes every memfd and guest_memfd of process `pid` as a region of `vm_id` (see the module
    /// docs). Returns the regions in the order their files were found.
    pub async fn attach_process(
        &self,
        vm_id: &str,
        pid: i32,
        actor: &str,
        idem: Option<AttachIdempotency>,
    ) -> Result<Vec<RegionView>, AgentError> {
        validate_name("vm_id", vm_id)?;
        let start = check_pid(pid)?;
        let holder = Holder {
            pid,
            start_time: start,
        };
        // Creates and deletes wait, so names and the region count stay consistent.
        let _m = self.membership.lock().await;
        let found =
            tokio::task::block_in_place(|| procmem::scan(pid, start)).map_err(|e| match e {
                Errno::ESRCH => no_process(pid),
                e => kerr("taking the process's files (pidfd_getfd)")(e),
            })?;
        if !found.unopenable.is_empty() {
            // Attaching part of the guest's memory would leave the rest unplaced without a word.
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
        // Every region, by file, and the VM's names.
        let mut by_file: HashMap<(u64, u64), (RegionKey, Option<Holder>)> = HashMap::new();
        let mut taken: HashSet<String> = HashSet::new();
        for slot in self.slots(None) {
            let live = slot.read().await;
            if live.intent.key.vm_id == vm_id {
                taken.insert(live.intent.key.name.clone());
            }
            if let Some(id) = live.intent.file_id
                && live.intent.status == RegionStatus::Active
            {
                by_file.insert(id, (live.intent.key.clone(), live.intent.holder));
            }
        }
        let page = self.page;
        let mut ops = Vec::new();
        let mut events = Vec::new();
        // Per file found: an existing region's key, or a new region.
        enum Planned {
            Existing(RegionKey),
            New(Box<LiveRegion>),
        }
        let mut plan = Vec::new();
        let mut gmem_index = 0;
        let mut new_count = 0;
        for f in found.files {
            if let Some((key, recorded)) = by_file.get(&f.file_id) {
                if key.vm_id != vm_id {
                    return Err(AgentError::FailedPrecondition(format!(
                        "a file of pid {pid} already is region {key} of another VM; a file \
                         belongs to one VM"
                    )));
                }
                if *recorded != Some(holder) {
                    ops.push(WriteOp::SaveHolder {
                        key: key.clone(),
                        holder: Some(holder),
                        file_id: Some(f.file_id),
                    });
                    events.push(self.event(
                        EventKind::Handoff,
                        Some(key),
                        format!("attached: pid {pid} holds the file"),
                        actor,
                    ));
                }
                plan.push(Planned::Existing(key.clone()));
                continue;
            }
            let (backend, file_page, hugepage) = match f.kind {
                MemKind::Memfd => (Backend::Memfd, page, 0),
                MemKind::MemfdHugetlb(hp) => (Backend::MemfdHugetlb, hp, hp),
                MemKind::GuestMemfd => (Backend::GuestMemfd, page, 0),
            };
            if f.size == 0 || f.size > self.limits.max_region_bytes {
                return Err(DomainError::BadSize {
                    size: f.size,
                    max: self.limits.max_region_bytes,
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
            let base = match f.kind {
                MemKind::GuestMemfd => loop {
                    let n = format!("gmem{gmem_index}");
                    gmem_index += 1;
                    if !taken.contains(&n) {
                        break n;
                    }
                },
                _ => name_from_memfd(&f.name),
            };
            let name = unique(&base, &taken);
            taken.insert(name.clone());
            let key = RegionKey {
                vm_id: vm_id.to_string(),
                name,
            };
            // guest_memfd without MMAP cannot be mapped: such a region is placed by task policy.
            let mapping = Mapping::new(f.fd.as_fd(), f.size).ok();
            let strategy = match backend {
                Backend::GuestMemfd if mapping.is_none() => Strategy::TaskPolicy,
                Backend::GuestMemfd if self.caps.guest_memfd_shared_policy => {
                    Strategy::SharedPolicy
                }
                Backend::GuestMemfd => Strategy::TaskPolicy,
                b => self.strategy_for(b),
            };
            if mapping.is_none() && backend != Backend::GuestMemfd {
                return Err(kerr("mmap of the attached file")(Errno::EINVAL));
            }
            let intent = RegionIntent {
                key: key.clone(),
                uid: new_uid(),
                backend,
                size_bytes: f.size,
                hugepage_size_bytes: hugepage,
                generation: 1,
                strategy,
                ranges: RangeMap::new(f.size),
                created_unix: unix_now(),
                status: RegionStatus::Active,
                holder: Some(holder),
                file_id: Some(f.file_id),
                adopted: true,
            };
            ops.push(WriteOp::InsertRegion(intent.clone()));
            events.push(self.event(
                EventKind::RegionAdopted,
                Some(&key),
                format!(
                    "attached a {} file of {} bytes from pid {pid} ({}){}",
                    backend.as_str(),
                    f.size,
                    found.comm,
                    match f.held_fd {
                        Some(n) => format!(", its fd {n}"),
                        None => ", mapped without an fd".into(),
                    }
                ),
                actor,
            ));
            new_count += 1;
            plan.push(Planned::New(Box::new(LiveRegion {
                intent,
                file: Some(RegionFile {
                    fd: f.fd,
                    mapping,
                    vm: None,
                }),
                errors: HashMap::new(),
            })));
        }
        let existing = self.regions.lock().expect("region map lock").len();
        if existing + new_count > self.limits.max_regions {
            return Err(AgentError::ResourceExhausted(format!(
                "attaching {new_count} regions would pass the agent's limit of {} regions",
                self.limits.max_regions
            )));
        }
        // The answer, stored with the commit. Attaching applies no policy (new regions start at
        // DEFAULT), so the kernel reads now as it will after the commit, and a replay of the
        // request id answers exactly as the first call did.
        let mut pending = Vec::with_capacity(plan.len());
        for p in &plan {
            pending.push(match p {
                Planned::Existing(key) => {
                    let slot = self.slot(key)?;
                    let live = slot.read().await;
                    let mut v = tokio::task::block_in_place(|| self.view(&live));
                    v.intent.holder = Some(holder);
                    v
                }
                Planned::New(live) => tokio::task::block_in_place(|| self.view(live)),
            });
        }
        if let Some(i) = &idem {
            ops.push(WriteOp::SaveRequest {
                request_id: i.request_id.clone(),
                method: "AttachProcess",
                fingerprint: i.fingerprint.clone(),
                response: (i.encode)(&pending),
            });
        }
        if !ops.is_empty() {
            match self.commit(ops, events).await {
                Err(AgentError::Store(StoreError::Conflict)) if idem.is_some() => {
                    return Err(AgentError::DuplicateRequest(
                        idem.map(|i| i.request_id).unwrap_or_default(),
                    ));
                }
                r => r?,
            }
        }
        let mut views = Vec::with_capacity(plan.len());
        for p in plan {
            match p {
                Planned::Existing(key) => {
                    let slot = self.slot(&key)?;
                    let mut live = slot.write().await;
                    live.intent.holder = Some(holder);
                    views.push(tokio::task::block_in_place(|| self.view(&live)));
                }
                Planned::New(live) => {
                    let live = *live;
                    views.push(tokio::task::block_in_place(|| self.view(&live)));
                    self.regions
                        .lock()
                        .expect("region map lock")
                        .insert(live.intent.key.clone(), Arc::new(RwLock::new(live)));
                }
            }
        }
        Ok(views)
    }
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
        assert!(validate_name("name", &u).is_ok());
    }
}
