//! Bringing regions back when the agent starts. The memory outlives the agent only while some
//! process (a VMM) holds the file, so each region's fd is taken back from its recorded holder with
//! pidfd_getfd; then the agent maps it again, re-binds every range from intent, and verifies the
//! binding through a different, fresh mapping.
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

use super::{Agent, AgentError, LiveRegion, RegionFile, find_drift};
use crate::domain::{Event, EventKind, Holder, RangeIntent, RegionIntent, RegionStatus, Strategy};
use crate::kernel::{self, Mapping, pidfd};
use crate::store::WriteOp;
use nix::errno::Errno;
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::RwLock;

const ACTOR: &str = super::AGENT_ACTOR;

impl Agent {
    /// Loads every stored region and brings it back (see the module docs).
    pub(crate) async fn recover(&self) -> Result<(), AgentError> {
        let stored = self.store.load_regions().await?;
        let mut ops = Vec::new();
        let mut events = Vec::new();
        // Read from /proc only if some recorded holder is gone.
        let mut others = None;
        let mut holders = pidfd::HolderFds::default();
        for intent in stored {
            let (live, mut o, mut e) =
                tokio::task::block_in_place(|| self.recover_one(intent, &mut holders, &mut others));
            ops.append(&mut o);
            events.append(&mut e);
            self.regions
                .lock()
                .expect("region map lock")
                .insert(live.intent.key.clone(), Arc::new(RwLock::new(live)));
        }
        self.commit(ops, events).await?;
        // The stored rows and the recovery's ops are gone now; give their heap back.
        kernel::release_free_heap();
        Ok(())
    }

    fn recover_one(
        &self,
        mut intent: RegionIntent,
        holders: &mut pidfd::HolderFds,
        others: &mut Option<pidfd::OpenFiles>,
    ) -> (LiveRegion, Vec<WriteOp>, Vec<Event>) {
        let key = intent.key.clone();
        let mut ops = Vec::new();
        let mut events = Vec::new();
        if intent.status == RegionStatus::Lost {
            return (lost(intent), ops, events);
        }
        let taken = match (intent.holder, intent.file_id) {
            (Some(h), Some(id)) => Some(take_back(h, id, holders, others)),
            (Some(h), None) => {
                // Handed off, but with no recorded identity the file cannot be found in any
                // process, and a VMM may still hold and use it: recreating it would give the
                // region a second, empty file. The region is lost to the agent instead.
                intent.status = RegionStatus::Lost;
                ops.push(WriteOp::SaveStatus(key.clone(), RegionStatus::Lost));
                events.push(self.event(
                    EventKind::RegionLost,
                    Some(&key),
                    format!(
                        "region lost: it was handed to pid {} but its file's identity was not recorded, so the file cannot be found and taken back (a VMM may still hold it); the intent is kept until the region is deleted",
                        h.pid
                    ),
                    ACTOR,
                ));
                self.counters.regions_lost.fetch_add(1, Ordering::Relaxed);
                return (lost(intent), ops, events);
            }
            (None, _) => None,
        };
        let file = match taken {
            Some(Ok((holder, fd))) => {
                let recorded = intent.holder.map_or(0, |h| h.pid);
                let message = if holder.pid == recorded {
                    format!("fd taken back from holder pid {}", holder.pid)
                } else {
                    // Record who holds it now, so the next restart looks there first.
                    intent.holder = Some(holder);
                    ops.push(WriteOp::SaveHolder {
                        key: key.clone(),
                        holder: Some(holder),
                        file_id: intent.file_id,
                    });
                    format!(
                        "fd taken back from pid {}, which holds the file; the recorded holder pid {recorded} is gone",
                        holder.pid
                    )
                };
                let mapping = Mapping::new(fd.as_fd(), intent.size_bytes).ok();
                events.push(self.event(EventKind::FdRecovered, Some(&key), message, ACTOR));
                // No VM fd comes back: one taken from another process would refuse every VM
                // ioctl here (KVM answers only its creator), and the file itself keeps its VM
                // alive.
                RegionFile {
                    fd,
                    mapping,
                    vm: None,
                }
            }
            Some(Err(e)) => {
                let pid = intent.holder.map_or(0, |h| h.pid);
                intent.status = RegionStatus::Lost;
                ops.push(WriteOp::SaveStatus(key.clone(), RegionStatus::Lost));
                events.push(self.event(
                    EventKind::HolderLost,
                    Some(&key),
                    format!(
                        "holder pid {pid} is gone or no longer holds the file, and no other process has it ({})",
                        e.desc()
                    ),
                    ACTOR,
                ));
                events.push(self.event(
                    EventKind::RegionLost,
                    Some(&key),
                    "region lost: its memory did not survive; the intent is kept until the region is deleted".into(),
                    ACTOR,
                ));
                self.counters.regions_lost.fetch_add(1, Ordering::Relaxed);
                return (lost(intent), ops, events);
            }
            None => {
                // Never handed off: nothing but the agent held it, so no guest data existed.
                // Its ranges are stored again only if some were placed (task-policy populate):
                // a new empty file has none placed.
                let was_placed = intent.ranges.ranges().iter().any(|r| r.placed);
                let fresh: Vec<_> = intent
                    .ranges
                    .ranges()
                    .iter()
                    .map(|r| crate::domain::RangeIntent {
                        placed: false,
                        ..*r
                    })
                    .collect();
                if let Some(m) = crate::domain::RangeMap::from_ranges(intent.size_bytes, fresh) {
                    intent.ranges = m;
                }
                match self.create_file(&intent) {
                    Ok(f) => {
                        // Without its identity a later handoff could not be taken back; fstat
                        // on a file just made fails only on a broken kernel, and then the
                        // region waits for deletion rather than risk that.
                        let id = match kernel::fd_file_id(f.fd.as_fd()) {
                            Ok(id) => id,
                            Err(e) => {
                                let mut live = lost(intent);
                                live.intent.status = RegionStatus::Active;
                                for r in live.intent.ranges.ranges() {
                                    live.errors.insert(
                                        r.offset,
                                        format!("recreating the file: fstat: {}", e.desc()),
                                    );
                                }
                                return (live, ops, events);
                            }
                        };
                        intent.file_id = Some(id);
                        ops.push(WriteOp::SaveHolder {
                            key: key.clone(),
                            holder: None,
                            file_id: intent.file_id,
                        });
                        if was_placed {
                            ops.push(WriteOp::SaveRanges {
                                key: key.clone(),
                                generation: intent.generation,
                                ranges: intent.ranges.clone(),
                            });
                        }
                        events.push(self.event(
                            EventKind::Reapplied,
                            Some(&key),
                            "file recreated empty: it had not been handed to a VMM, so no process kept it while the agent was down".into(),
                            ACTOR,
                        ));
                        f
                    }
                    Err(e) => {
                        let mut live = lost(intent);
                        live.intent.status = RegionStatus::Active;
                        for r in live.intent.ranges.ranges() {
                            live.errors
                                .insert(r.offset, format!("recreating the file: {e}"));
                        }
                        return (live, ops, events);
                    }
                }
            }
        };
        let mut live = LiveRegion {
            intent,
            file: Some(file),
            errors: HashMap::new(),
        };
        let applied = self.apply_all(&mut live);
        let total = live.intent.ranges.ranges().len() as u32;
        if live.intent.strategy == Strategy::SharedPolicy && applied < total {
            events.push(self.event(
                EventKind::VerifyFailed,
                Some(&key),
                format!(
                    "{} of {total} ranges could not be re-bound on the new mapping; see each range's last_error",
                    total - applied
                ),
                ACTOR,
            ));
        }
        if live.intent.strategy == Strategy::SharedPolicy && applied > 0 {
            let page = live.intent.page_size(self.page);
            let checked = verify_fresh(
                live.file.as_ref(),
                live.intent.size_bytes,
                live.intent.ranges.ranges(),
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
            events.push(self.event(kind, Some(&key), message, ACTOR));
        }
        (live, ops, events)
    }
}

/// Reads every range's policy back through a new, separate mapping of the file. Returns each
/// range that does not match (its offset and why), or why nothing could be read.
fn verify_fresh(
    file: Option<&RegionFile>,
    size_bytes: u64,
    ranges: &[RangeIntent],
    page: u64,
) -> Result<Vec<(u64, String)>, String> {
    let file = file.ok_or_else(|| "the region has no file".to_string())?;
    let fresh = Mapping::new(file.fd.as_fd(), size_bytes)
        .map_err(|e| format!("mapping the file a second time failed: {}", e.desc()))?;
    Ok(ranges
        .iter()
        .filter_map(|r| {
            let d = find_drift(&fresh, r, page)?;
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
fn take_back(
    recorded: Holder,
    file_id: (u64, u64),
    holders: &mut pidfd::HolderFds,
    others: &mut Option<pidfd::OpenFiles>,
) -> Result<(Holder, OwnedFd), Errno> {
    match holders.take(recorded.pid, recorded.start_time, file_id) {
        Ok(fd) => Ok((recorded, fd)),
        Err(e) => others
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{NodeSet, Policy, PolicyMode, RangeMap};

    /// When the second mapping cannot be made, nothing was verified: that is an error, never
    /// "no range failed".
    #[test]
    fn verify_fresh_fails_without_a_second_mapping() {
        let page = kernel::page_size();
        let ranges = RangeMap::new(page);
        let ranges = ranges.ranges();
        assert!(verify_fresh(None, page, ranges, page).is_err());
        // A pipe cannot be mapped.
        let (rd, _wr) = nix::unistd::pipe().unwrap();
        let file = RegionFile {
            fd: rd,
            mapping: None,
            vm: None,
        };
        let e = verify_fresh(Some(&file), page, ranges, page).unwrap_err();
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
            fd,
            mapping: None,
            vm: None,
        };
        let bad = verify_fresh(Some(&file), 2 * page, map.ranges(), page).unwrap();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].1.contains(&format!("{:#x}", page)), "{bad:?}");
        let w2 = Mapping::window(file.fd.as_fd(), page, page).unwrap();
        w2.mbind(page, page, &bind, 0).unwrap();
        assert!(
            verify_fresh(Some(&file), 2 * page, map.ranges(), page)
                .unwrap()
                .is_empty()
        );
    }
}
