//! Bringing regions back when the agent starts. The memory outlives the agent only while some
//! process (a VMM) holds the file, so each region's fd is taken back from its recorded holder with
//! pidfd_getfd; then the agent maps it again, re-binds every range from intent (through one
//! fresh mapping of the whole file, see `Syscalls::bind_each`), and verifies the binding through another
//! mapping, its own.
//!
//! Only the last holder is recorded. When it is gone, every other process is searched for the
//! file (by inode in /proc/PID/fdinfo, confirmed by (st_dev, st_ino) on the fd taken): an earlier
//! acquirer, or a process the VMM passed its fd to, keeps the memory alive just as well.
//!
//! A region nobody held is in one of two states: never handed off (no guest memory can have been
//! written: the file is recreated, empty, with its intent), or handed off and now held by no
//! process (the memory is gone: the region is marked lost, the intent kept until the orchestrator
//! deletes it). The agent never refuses to start because the host changed.
//!
//! No KVM VM fd is taken back: KVM refuses every VM ioctl from a process other than the VM's
//! creator, so a VM fd from a holder (or the dead agent's own VM) would be of no use here.

use super::agent::event;
use super::apply::apply_all;
use super::plan::{Recovery, find_drift, find_drift_at_ends, plan_recovery};
use super::regions::create_file;
use super::syscalls::RealFile;
use super::{Agent, AgentError, LiveRegion, RegionFile};
use crate::domain::{
    Backend, Event, EventKind, Holder, RangeIntent, RangeMap, RegionIntent, RegionStatus, Strategy,
};
use crate::kernel::{self, GuestMemfdVm, Mapping, pidfd};
use crate::store::WriteOp;
use nix::errno::Errno;
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::RwLock;

const ACTOR: &str = super::AGENT_ACTOR;

/// What recovery writes: ops and events, committed together once every region is back.
#[derive(Default)]
struct Writes {
    ops: Vec<WriteOp>,
    events: Vec<Event>,
}

impl Writes {
    fn event(&mut self, kind: EventKind, intent: &RegionIntent, message: String) {
        self.events
            .push(event(kind, Some(&intent.key), message, ACTOR));
    }
}

/// Regions handed to the recovering thread at a time: each hand-off may wake it, and under load
/// a wake-up waits for a CPU.
const RECOVER_CHUNK: usize = 64;

/// A stored region's file found again (or made anew), or the region without one.
enum FileBack {
    Found(RegionIntent, RegionFile),
    Without(LiveRegion),
}

/// Where files are looked for: the recorded holders, and (read only if some holder is gone)
/// every other process's open files.
#[derive(Default)]
struct Holders {
    recorded: pidfd::HolderFds,
    others: Option<pidfd::OpenFiles>,
}

impl Agent {
    /// Loads every stored region and brings it back (see the module docs), then commits what
    /// recovery found with `last`, the event that ends it, in one transaction.
    ///
    /// Loading and bringing back overlap: a blocking thread brings regions back, in chunks of
    /// [`RECOVER_CHUNK`], as soon as SQLite has read them, while the rest load. When loading
    /// fails part way, the regions already sent are finished (nothing is written) and the error
    /// is returned.
    pub(crate) async fn recover(self: &Arc<Self>, last: Event) -> Result<(), AgentError> {
        use tokio_stream::StreamExt;
        type Vm = Option<Result<Arc<GuestMemfdVm>, AgentError>>;
        let (tx, rx) = std::sync::mpsc::channel::<Vec<(RegionIntent, Vm)>>();
        let agent = self.clone();
        let worker = tokio::task::spawn_blocking(move || {
            let mut writes = Writes::default();
            let mut holders = Holders::default();
            let lives: Vec<LiveRegion> = rx
                .into_iter()
                .flatten()
                .map(|(intent, vm)| agent.recover_one(intent, vm, &mut holders, &mut writes))
                .collect();
            (lives, writes)
        });
        let loaded = async {
            let mut stored = std::pin::pin!(self.store().stream_regions());
            let mut batch = Vec::with_capacity(RECOVER_CHUNK);
            while let Some(intent) = stored.next().await {
                let intent = intent?;
                // A recreated guest_memfd needs its VM; creating one is the only async step.
                let vm = match (plan_recovery(&intent), intent.backend) {
                    (Recovery::Recreate, Backend::GuestMemfd) => {
                        Some(self.vm_for(&intent.key.vm_id).await)
                    }
                    _ => None,
                };
                batch.push((intent, vm));
                if batch.len() >= RECOVER_CHUNK && tx.send(std::mem::take(&mut batch)).is_err() {
                    // The worker is gone; joining it below says why.
                    break;
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
            Ok::<(), AgentError>(())
        }
        .await;
        drop(tx);
        let (lives, writes) = worker.await.map_err(|e| {
            AgentError::Internal(format!(
                "recovering regions on a blocking thread failed: {e}"
            ))
        })?;
        loaded?;
        {
            let mut map = self.regions().map();
            for live in lives {
                map.insert(live.intent.key.clone(), Arc::new(RwLock::new(live)));
            }
        }
        let mut events = writes.events;
        events.push(last);
        self.commit(writes.ops, events).await?;
        // The stored rows and the recovery's ops are gone now; give their heap back.
        kernel::release_free_heap();
        Ok(())
    }

    /// Brings one region back: finds or recreates its file (see [`plan_recovery`]), then re-binds
    /// and verifies its ranges. Blocking.
    fn recover_one(
        &self,
        intent: RegionIntent,
        vm: Option<Result<Arc<GuestMemfdVm>, AgentError>>,
        holders: &mut Holders,
        out: &mut Writes,
    ) -> LiveRegion {
        let (intent, file) = match plan_recovery(&intent) {
            Recovery::StillLost => return lost(intent),
            Recovery::MarkLostNoIdentity => return self.lost_without_identity(intent, out),
            Recovery::TakeBack => match self.take_back(intent, holders, out) {
                FileBack::Found(intent, file) => (intent, file),
                FileBack::Without(live) => return live,
            },
            Recovery::Recreate => {
                match recreate(intent, vm, self.features().guest_memfd_flags, out) {
                    FileBack::Found(intent, file) => (intent, file),
                    FileBack::Without(live) => return live,
                }
            }
        };
        let mut live = LiveRegion {
            intent,
            file: Some(file),
            errors: HashMap::new(),
            checked: None,
        };
        self.rebind_recovered(&mut live, out);
        live
    }

    /// Handed off, but with no recorded identity the file cannot be found in any process, and a
    /// VMM may still hold and use it: recreating it would give the region a second, empty file.
    /// The region is lost to the agent instead.
    fn lost_without_identity(&self, mut intent: RegionIntent, out: &mut Writes) -> LiveRegion {
        let pid = intent.holder.map_or(0, |h| h.pid);
        intent.status = RegionStatus::Lost;
        out.ops
            .push(WriteOp::SaveStatus(intent.key.clone(), RegionStatus::Lost));
        out.event(
            EventKind::RegionLost,
            &intent,
            format!(
                "region lost: it was handed to pid {pid} but its file's identity was not recorded, so the file cannot be found and taken back (a VMM may still hold it); the intent is kept until the region is deleted"
            ),
        );
        self.counters.regions_lost.fetch_add(1, Ordering::Relaxed);
        lost(intent)
    }

    /// Takes the file back from whoever holds it; when nobody does, the memory is gone and the
    /// region is marked lost.
    fn take_back(
        &self,
        mut intent: RegionIntent,
        holders: &mut Holders,
        out: &mut Writes,
    ) -> FileBack {
        let (Some(recorded), Some(file_id)) = (intent.holder, intent.file_id) else {
            return FileBack::Without(lost(intent));
        };
        let (holder, fd) = match fd_from_holders(recorded, file_id, holders) {
            Ok(found) => found,
            Err(e) => return FileBack::Without(self.holder_gone(intent, e, out)),
        };
        let message = if holder.pid == recorded.pid {
            format!("fd taken back from holder pid {}", holder.pid)
        } else {
            // Record who holds it now, so the next restart looks there first.
            intent.holder = Some(holder);
            out.ops.push(WriteOp::SaveHolder {
                key: intent.key.clone(),
                holder: Some(holder),
                file_id: intent.file_id,
            });
            format!(
                "fd taken back from pid {}, which holds the file; the recorded holder pid {} is gone",
                holder.pid, recorded.pid
            )
        };
        let mapping = Mapping::new(fd.as_fd(), intent.size_bytes).ok();
        out.event(EventKind::FdRecovered, &intent, message);
        // No VM fd comes back: one taken from another process would refuse every VM ioctl here
        // (KVM answers only its creator), and the file itself keeps its VM alive.
        let file = RegionFile {
            census: Default::default(),
            fd,
            mapping,
            vm: None,
        };
        FileBack::Found(intent, file)
    }

    /// Nobody holds the handed-off file any more: its memory is gone, and the region is lost.
    fn holder_gone(&self, mut intent: RegionIntent, e: Errno, out: &mut Writes) -> LiveRegion {
        let pid = intent.holder.map_or(0, |h| h.pid);
        intent.status = RegionStatus::Lost;
        out.ops
            .push(WriteOp::SaveStatus(intent.key.clone(), RegionStatus::Lost));
        out.event(
            EventKind::HolderLost,
            &intent,
            format!(
                "holder pid {pid} is gone or no longer holds the file, and no other process has it ({})",
                e.desc()
            ),
        );
        out.event(
            EventKind::RegionLost,
            &intent,
            "region lost: its memory did not survive; the intent is kept until the region is deleted".into(),
        );
        self.counters.regions_lost.fetch_add(1, Ordering::Relaxed);
        lost(intent)
    }

    /// Re-binds every range of a recovered region on its new mapping and verifies the binding
    /// through a second, fresh mapping.
    fn rebind_recovered(&self, live: &mut LiveRegion, out: &mut Writes) {
        let applied = apply_all(live, self.page_size());
        let total = live.intent.ranges.ranges().len() as u32;
        if live.intent.strategy != Strategy::SharedPolicy {
            return;
        }
        if applied < total {
            out.event(
                EventKind::VerifyFailed,
                &live.intent,
                format!(
                    "{} of {total} ranges could not be re-bound on the new mapping; see each range's last_error",
                    total - applied
                ),
            );
        }
        if applied == 0 {
            return;
        }
        let page = live.intent.page_size(self.page_size());
        let at = super::live::now_unix_ms();
        let checked = verify_fresh(
            live.file.as_ref(),
            live.intent.size_bytes,
            live.intent.ranges.ranges(),
            &live.errors,
            page,
        );
        let (kind, message) = match checked {
            Ok(bad) if bad.is_empty() => (
                EventKind::Reapplied,
                format!(
                    "{applied} ranges re-bound on a new mapping; all verified through a second mapping"
                ),
            ),
            Ok(bad) => {
                let n = bad.len();
                live.errors.extend(bad);
                (
                    EventKind::VerifyFailed,
                    format!(
                        "{applied} ranges re-bound on a new mapping; {n} did not read back as intended through a second mapping"
                    ),
                )
            }
            Err(why) => {
                for r in live.intent.ranges.ranges() {
                    live.errors
                        .insert(r.offset, format!("binding not verified: {why}"));
                }
                (
                    EventKind::VerifyFailed,
                    format!(
                        "{applied} ranges re-bound on a new mapping, but none could be verified: {why}"
                    ),
                )
            }
        };
        out.event(kind, &live.intent, message);
        // What the read-back found is the region's first check after the restart, as SetPolicy's
        // read-back is (ends of each range just bound): a range that bound and read back as
        // intended was seen with its policy; the others (in `errors`) are left out, so views
        // read them from the kernel until the first pass.
        live.checked = Some(super::live::LastCheck {
            at_unix_ms: at,
            ranges: live
                .intent
                .ranges
                .ranges()
                .iter()
                .filter(|r| !live.errors.contains_key(&r.offset))
                .map(|r| (*r, Some(r.policy)))
                .collect(),
        });
    }
}

/// Never handed off: nothing but the agent held the file, so no guest data existed. The file is
/// recreated, empty; its ranges are stored again only if some were placed (task-policy
/// populate): a new empty file has none placed. When the file cannot be made, the region stays,
/// without a file, every range naming why.
fn recreate(
    mut intent: RegionIntent,
    vm: Option<Result<Arc<GuestMemfdVm>, AgentError>>,
    gmem_flags: u64,
    out: &mut Writes,
) -> FileBack {
    let was_placed = intent.ranges.ranges().iter().any(|r| r.placed);
    let fresh: Vec<_> = intent
        .ranges
        .ranges()
        .iter()
        .map(|r| RangeIntent {
            placed: false,
            ..*r
        })
        .collect();
    if let Some(m) = RangeMap::from_ranges(intent.size_bytes, fresh) {
        intent.ranges = m;
    }
    let made = vm
        .transpose()
        .and_then(|vm| create_file(&intent, vm, gmem_flags));
    let f = match made {
        Ok(f) => f,
        Err(e) => {
            return FileBack::Without(fileless(intent, &format!("recreating the file: {e}")));
        }
    };
    // Without its identity a later handoff could not be taken back; fstat on a file just made
    // fails only on a broken kernel, and then the region waits for deletion rather than risk
    // that.
    let id = match kernel::fd_file_id(f.fd.as_fd()) {
        Ok(id) => id,
        Err(e) => {
            return FileBack::Without(fileless(
                intent,
                &format!("recreating the file: fstat: {}", e.desc()),
            ));
        }
    };
    intent.file_id = Some(id);
    out.ops.push(WriteOp::SaveHolder {
        key: intent.key.clone(),
        holder: None,
        file_id: intent.file_id,
    });
    if was_placed {
        out.ops.push(WriteOp::SaveRanges {
            key: intent.key.clone(),
            generation: intent.generation,
            ranges: intent.ranges.clone(),
        });
    }
    out.event(
        EventKind::Reapplied,
        &intent,
        "file recreated empty: it had not been handed to a VMM, so no process kept it while the agent was down".into(),
    );
    FileBack::Found(intent, f)
}

/// An active region without a file, every range naming `why`.
fn fileless(intent: RegionIntent, why: &str) -> LiveRegion {
    let mut live = lost(intent);
    live.intent.status = RegionStatus::Active;
    for r in live.intent.ranges.ranges() {
        live.errors.insert(r.offset, why.to_string());
    }
    live
}

/// Reads every range's policy back through a mapping other than the one it was bound through:
/// the agent's own mapping of the file, made when the file came back and never bound through (a
/// new one where the file has none). A range whose mbind just succeeded over its whole span
/// (`errors` has no entry for it) is read at its first and last page, as SetPolicy's answer reads
/// a range it just bound; any other range is sampled in full ([`find_drift`]). Returns each range
/// that does not match (its offset and why), or why nothing could be read.
fn verify_fresh(
    file: Option<&RegionFile>,
    size_bytes: u64,
    ranges: &[RangeIntent],
    errors: &HashMap<u64, String>,
    page: u64,
) -> Result<Vec<(u64, String)>, String> {
    let file = file.ok_or_else(|| "the region has no file".to_string())?;
    let fresh;
    let mapping = match &file.mapping {
        Some(m) => m,
        None => {
            fresh = Mapping::new(file.fd.as_fd(), size_bytes)
                .map_err(|e| format!("mapping the file a second time failed: {}", e.desc()))?;
            &fresh
        }
    };
    let k = RealFile {
        fd: file.fd.as_fd(),
        mapping: Some(mapping),
        page,
    };
    Ok(ranges
        .iter()
        .filter_map(|r| {
            let d = if errors.contains_key(&r.offset) {
                find_drift(&k, r, page)
            } else {
                find_drift_at_ends(&k, r, page)
            }?;
            Some((
                r.offset,
                format!(
                    "binding did not read back through a fresh mapping: {} at offset {:#x}",
                    d.found.map_or("nothing readable".into(), |p| p.to_string()),
                    d.offset
                ),
            ))
        })
        .collect())
}

/// Takes the file back from its recorded holder or, when that process is gone or no longer has
/// it, from any other process that has it open (`others` is filled on first need).
fn fd_from_holders(
    recorded: Holder,
    file_id: (u64, u64),
    holders: &mut Holders,
) -> Result<(Holder, OwnedFd), Errno> {
    match holders
        .recorded
        .take(recorded.pid, recorded.start_time, file_id)
    {
        Ok(fd) => Ok((recorded, fd)),
        Err(e) => holders
            .others
            .get_or_insert_with(pidfd::OpenFiles::scan)
            .take(file_id)
            .map(|(pid, start_time, fd)| (Holder { pid, start_time }, fd))
            .ok_or(e),
    }
}

fn lost(intent: RegionIntent) -> LiveRegion {
    LiveRegion {
        intent,
        file: None,
        errors: HashMap::new(),
        checked: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{NodeSet, Policy, PolicyMode, RangeMap};

    /// A restart's read-back is each region's first check: GetRegion and ListRegions answer
    /// from it at once, with its time, before any pass.
    #[tokio::test]
    async fn a_restart_read_back_is_the_first_check() {
        use crate::domain::{Backend, RegionKey};
        use crate::engine::{CreateRequest, EngineSettings};
        use crate::store::Store;
        use crate::topology::TopologyReader;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let usable: Vec<u32> = TopologyReader::host().read().usable.iter().collect();
        let features = kernel::probe::probe(&usable);
        let start = || async {
            Agent::start(
                Store::open(&db, std::time::Duration::from_secs(5))
                    .await
                    .unwrap(),
                features.clone(),
                TopologyReader::host(),
                EngineSettings::default(),
            )
            .await
            .unwrap()
        };
        let agent = start().await;
        let page = agent.page_size();
        let key = RegionKey::parse("vm", "r").unwrap();
        let bind0 = policy(PolicyMode::Bind, &[0]);
        let req = CreateRequest {
            key: key.clone(),
            size_bytes: 4 * page,
            backend: Backend::Memfd,
            hugepage_size_bytes: 0,
            policies: vec![(0, 2 * page, bind0)],
        };
        agent.create_region(req, "test", None).await.unwrap();
        drop(agent);
        let before = super::super::live::now_unix_ms();
        let agent = start().await;
        let live = agent.slot(&key).unwrap().read_owned().await;
        assert!(live.answers_from_check(), "{:?}", live.checked);
        let at = live.checked.as_ref().unwrap().at_unix_ms;
        assert!(at >= before, "checked at {at}, restarted at {before}");
        drop(live);
        let v = agent.get_region(&key, false).await.unwrap();
        assert_eq!(
            v.observed_at_unix_ms, at,
            "answered from the restart's check"
        );
        assert_eq!(
            v.ranges.iter().map(|r| r.observed).collect::<Vec<_>>(),
            vec![Some(bind0), Some(Policy::DEFAULT)]
        );
    }

    /// When the second mapping cannot be made, nothing was verified: that is an error, never
    /// "no range failed".
    #[test]
    fn verify_fresh_fails_without_a_second_mapping() {
        let page = kernel::page_size();
        let ranges = RangeMap::new(page);
        let ranges = ranges.ranges();
        assert!(verify_fresh(None, page, ranges, &HashMap::new(), page).is_err());
        // A pipe cannot be mapped.
        let (rd, _wr) = nix::unistd::pipe().unwrap();
        let file = RegionFile {
            census: Default::default(),
            fd: rd,
            mapping: None,
            vm: None,
        };
        let e = verify_fresh(Some(&file), page, ranges, &HashMap::new(), page).unwrap_err();
        assert!(e.contains("mapping the file a second time failed"), "{e}");
    }

    /// A range bound as intended verifies; one that is not is named.
    #[test]
    fn verify_fresh_names_ranges_that_do_not_read_back() {
        let page = kernel::page_size();
        let fd = kernel::create_memfd("verify-test", 2 * page, None).unwrap();
        let bind = Policy::new(PolicyMode::Bind, NodeSet::from_ids([0]).unwrap());
        let mut map = RangeMap::new(2 * page);
        map.apply(0, 2 * page, bind);
        let w = Mapping::window(fd.as_fd(), 0, page).unwrap();
        w.mbind(0, page, &bind, 0).unwrap();
        let file = RegionFile {
            census: Default::default(),
            fd,
            mapping: None,
            vm: None,
        };
        let bad = verify_fresh(Some(&file), 2 * page, map.ranges(), &HashMap::new(), page).unwrap();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].1.contains(&format!("{:#x}", page)), "{bad:?}");
        let w2 = Mapping::window(file.fd.as_fd(), page, page).unwrap();
        w2.mbind(page, page, &bind, 0).unwrap();
        assert!(
            verify_fresh(Some(&file), 2 * page, map.ranges(), &HashMap::new(), page)
                .unwrap()
                .is_empty()
        );
    }

    fn policy(mode: PolicyMode, nodes: &[u32]) -> Policy {
        Policy::new(mode, NodeSet::from_ids(nodes.iter().copied()).unwrap())
    }

    /// A live memfd region of `pages` pages with these ranges, its file mapped as recovery maps
    /// it.
    fn live_memfd(pages: u64, ranges: &[(u64, u64, Policy)]) -> LiveRegion {
        let page = kernel::page_size();
        let fd = kernel::create_memfd("apply-all-test", pages * page, None).unwrap();
        let mapping = Mapping::new(fd.as_fd(), pages * page).ok();
        LiveRegion {
            intent: crate::engine::syscalls::contract::memfd_region(pages, ranges),
            file: Some(RegionFile {
                census: Default::default(),
                fd,
                mapping,
                vm: None,
            }),
            errors: HashMap::new(),
            checked: None,
        }
    }

    /// Recovery binds a region's ranges through one mapping of the whole file. Each range ends at
    /// its intent, read at every page through another mapping, over a policy a VMM set before;
    /// a DEFAULT range next to ranges not bound yet clears nothing but itself, so a range whose
    /// bind then fails keeps the policy it had (and names its error) rather than losing it.
    #[test]
    fn apply_all_binds_each_range_exactly_through_one_mapping() {
        let page = kernel::page_size();
        let preferred = policy(PolicyMode::Preferred, &[0]);
        let interleave = policy(PolicyMode::Interleave, &[0]);
        // Node 1000 exists on no test machine: mbind refuses it.
        let unbindable = policy(PolicyMode::Bind, &[1000]);
        let mut live = live_memfd(
            6,
            &[
                (0, 1, Policy::DEFAULT),
                (1, 1, unbindable),
                (2, 1, interleave),
                (3, 1, Policy::DEFAULT),
                (4, 2, policy(PolicyMode::Bind, &[0])),
            ],
        );
        // What the file held before the restart, set through the VMM's mapping.
        let fd = live.file.as_ref().unwrap().fd.as_fd();
        let vmm = Mapping::new(fd, 6 * page).unwrap();
        vmm.mbind(0, 6 * page, &preferred, 0).unwrap();
        let total = live.intent.ranges.ranges().len() as u32;
        assert_eq!(apply_all(&mut live, kernel::page_size()), total - 1);
        assert_eq!(live.errors.keys().copied().collect::<Vec<_>>(), vec![page]);
        assert!(
            live.errors[&page].starts_with("mbind: "),
            "{:?}",
            live.errors
        );
        let other = Mapping::new(live.file.as_ref().unwrap().fd.as_fd(), 6 * page).unwrap();
        let seen: Vec<Option<Policy>> =
            (0..6).map(|i| other.policy_at(i * page).unwrap()).collect();
        let bind0 = policy(PolicyMode::Bind, &[0]);
        assert_eq!(
            seen,
            [
                Policy::DEFAULT,
                preferred,
                interleave,
                Policy::DEFAULT,
                bind0,
                bind0
            ]
            .map(Some)
            .to_vec()
        );
    }

    /// A range recovery just bound without an error is read back at its first and last page, as
    /// SetPolicy's answer reads one; a range whose bind failed is sampled at every point.
    #[test]
    fn verify_fresh_reads_a_range_bound_without_error_at_its_ends() {
        let page = kernel::page_size();
        let bind0 = policy(PolicyMode::Bind, &[0]);
        let live = live_memfd(3, &[(0, 3, bind0)]);
        let fd = live.file.as_ref().unwrap().fd.as_fd();
        let w = Mapping::window(fd, 0, 3 * page).unwrap();
        w.mbind(0, 3 * page, &bind0, 0).unwrap();
        let w2 = Mapping::window(fd, page, page).unwrap();
        w2.mbind(page, page, &policy(PolicyMode::Preferred, &[0]), 0)
            .unwrap();
        let ranges = live.intent.ranges.ranges();
        let no_errors = HashMap::new();
        assert_eq!(
            verify_fresh(live.file.as_ref(), 3 * page, ranges, &no_errors, page).unwrap(),
            vec![]
        );
        let failed = HashMap::from([(0, "mbind: EINVAL".to_string())]);
        let bad = verify_fresh(live.file.as_ref(), 3 * page, ranges, &failed, page).unwrap();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(
            bad[0].1.contains(&format!("at offset {page:#x}")),
            "{bad:?}"
        );
    }
}
