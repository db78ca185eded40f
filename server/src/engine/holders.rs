//! Holder exit: the agent learns that a region's recorded holder exited from a pidfd (readable
//! once the process has exited, whatever later reuses its pid), and then gives the memory back
//! unless someone still uses it.
//!
//! - Another process still has the file open: it becomes the holder, and is watched in turn.
//! - A file a VMM made (attach, adopt) is the VMM's memory: the region is released at once. The
//!   agent closes its fd and drops its mapping, so the kernel frees the pages, and the region is
//!   marked RELEASED with its intent kept until it is deleted.
//! - A file the agent made (CreateRegion, `memplacectl exec`) is kept for
//!   [`Limits::keep_after_holder_exit`](super::Limits) so a VMM that restarts finds its guest's
//!   memory, then released the same way unless a new holder acquired it meanwhile.
//!
//! Watches start when a holder is recorded (every commit that records one) and, after a
//! restart, for every recovered region's holder.

use super::agent::{AGENT_ACTOR, Agent};
use super::error::AgentError;
use super::live::LiveRegion;
use crate::domain::{EventKind, Holder, RegionKey, RegionStatus};
use crate::kernel::pidfd;
use crate::store::WriteOp;
use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{OwnedRwLockWriteGuard, mpsc};

/// Starts the task that watches holders for `agent`; it ends when the agent is dropped.
pub(crate) fn start_watching(agent: Weak<Agent>, mut rx: mpsc::UnboundedReceiver<Holder>) {
    tokio::spawn(async move {
        let (exited_tx, mut exited_rx) = mpsc::unbounded_channel::<Holder>();
        let mut watching: HashSet<Holder> = HashSet::new();
        loop {
            tokio::select! {
                h = rx.recv() => {
                    let Some(h) = h else { break };
                    if watching.insert(h) {
                        let tx = exited_tx.clone();
                        tokio::spawn(async move {
                            wait_for_exit(h).await;
                            let _ = tx.send(h);
                        });
                    }
                }
                Some(h) = exited_rx.recv() => {
                    watching.remove(&h);
                    let Some(agent) = agent.upgrade() else { break };
                    if let Err(e) = agent.holder_exited(h).await {
                        tracing::warn!(pid = h.pid, error = %e, "handling a holder's exit failed");
                    }
                }
            }
        }
    });
}

/// Returns when process `h` has exited (at once when it is gone already or the pid now names
/// another process). The pidfd is opened, then the start time checked again, so it refers to the
/// recorded process.
async fn wait_for_exit(h: Holder) {
    if pidfd::start_time(h.pid) != Some(h.start_time) {
        return;
    }
    let Ok(fd) = pidfd::open(h.pid) else { return };
    if pidfd::start_time(h.pid) != Some(h.start_time) {
        return;
    }
    if let Err(e) = pidfd::wait_for_exit(fd).await {
        tracing::warn!(pid = h.pid, error = %e, "cannot poll a pidfd; this holder's exit will not be seen");
        std::future::pending::<()>().await;
    }
}

impl Agent {
    /// Holder `h` exited: each region it held gets a new holder, or is released now (a VMM's
    /// file) or after the keep time (the agent's).
    pub(crate) async fn holder_exited(self: &Arc<Self>, h: Holder) -> Result<(), AgentError> {
        let mut open_files = None;
        for slot in self.slots(None) {
            let live = slot.write_owned().await;
            if live.intent.holder != Some(h) || !live.intent.status.has_file() {
                continue;
            }
            let key = live.intent.key.clone();
            // Someone else with the file open (a second VMM that acquired it, or one it was
            // passed to) keeps it in use.
            if let Some(file_id) = live.intent.file_id {
                if open_files.is_none() {
                    open_files =
                        Some(Agent::blocking(crate::kernel::pidfd::OpenFiles::scan).await?);
                }
                let others = open_files
                    .as_ref()
                    .map(|f| f.holders(file_id))
                    .unwrap_or_default();
                if let Some(&(pid, start_time)) = others.first() {
                    self.hand_to_next_holder(live, h, Holder { pid, start_time })
                        .await?;
                    continue;
                }
            }
            if live.intent.origin.vmm_made() {
                let why = format!(
                    "pid {} exited and no process holds the file any more; the memory of this {} file is given back",
                    h.pid,
                    live.intent.origin.as_str()
                );
                self.release(live, why).await?;
                continue;
            }
            match self.settings().keep_after_holder_exit {
                None => {
                    drop(live);
                    self.emit(
                        EventKind::HolderLost,
                        Some(&key),
                        format!(
                            "pid {} exited; the agent keeps the memory for a VMM that acquires it again (release_agent_regions_after = keep)",
                            h.pid
                        ),
                        AGENT_ACTOR,
                    )
                    .await?;
                }
                Some(keep) => {
                    drop(live);
                    self.emit(
                        EventKind::HolderLost,
                        Some(&key),
                        format!(
                            "pid {} exited; the agent keeps the memory {} s for a VMM that acquires it again, then gives it back",
                            h.pid,
                            keep.as_secs()
                        ),
                        AGENT_ACTOR,
                    )
                    .await?;
                    self.release_later(key, h, keep);
                }
            }
        }
        Ok(())
    }

    /// Records `next` as the holder of a region whose holder `gone` exited.
    async fn hand_to_next_holder(
        &self,
        mut live: OwnedRwLockWriteGuard<LiveRegion>,
        gone: Holder,
        next: Holder,
    ) -> Result<(), AgentError> {
        let key = live.intent.key.clone();
        let ev = self.event(
            EventKind::HolderLost,
            Some(&key),
            format!(
                "pid {} exited; pid {} still holds the file and is its holder now",
                gone.pid, next.pid
            ),
            AGENT_ACTOR,
        );
        self.commit(
            vec![WriteOp::SaveHolder {
                key,
                holder: Some(next),
                file_id: live.intent.file_id,
            }],
            vec![ev],
        )
        .await?;
        live.intent.holder = Some(next);
        Ok(())
    }

    /// After `keep`, releases region `key` if `gone` is still its recorded holder (no VMM
    /// acquired it meanwhile).
    fn release_later(self: &Arc<Self>, key: RegionKey, gone: Holder, keep: Duration) {
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(keep).await;
            let Some(agent) = agent.upgrade() else { return };
            let Ok(slot) = agent.slot(&key) else { return };
            let live = slot.write_owned().await;
            if live.intent.holder != Some(gone) || !live.intent.status.has_file() {
                return;
            }
            let why = format!(
                "pid {} exited {} s ago and no VMM acquired the file since; its memory is given back",
                gone.pid,
                keep.as_secs()
            );
            if let Err(e) = agent.release(live, why).await {
                tracing::warn!(region = %key, error = %e, "releasing a region failed");
            }
        });
    }

    /// Gives a region's memory back: durable RELEASED status first, then the agent's fd and
    /// mapping are dropped (off the runtime: unmapping a large file takes a while) with the
    /// region's lock held.
    async fn release(
        &self,
        mut live: OwnedRwLockWriteGuard<LiveRegion>,
        why: String,
    ) -> Result<(), AgentError> {
        let key = live.intent.key.clone();
        let ev = self.event(EventKind::RegionReleased, Some(&key), why, AGENT_ACTOR);
        self.commit(
            vec![WriteOp::SaveStatus(key.clone(), RegionStatus::Released)],
            vec![ev],
        )
        .await?;
        // The file goes before the status shows RELEASED, so whoever reads RELEASED finds the
        // memory given back.
        let file = live.file.take();
        Agent::blocking(move || drop(file)).await?;
        live.intent.status = RegionStatus::Released;
        live.errors.clear();
        self.counters
            .regions_released
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Where holder `h` may allocate: the nodes of its cpuset (`Mems_allowed_list` of
/// /proc/PID/status, which cgroup v1 and v2 both keep) and the cgroup that sets them, for
/// messages. `None` when the process is gone or not the recorded one any more.
pub(crate) fn holder_cpuset(h: Holder) -> Option<(crate::domain::NodeSet, String)> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", h.pid)).ok()?;
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Mems_allowed_list:"))
        .and_then(|v| crate::domain::NodeSet::parse_list(v.trim()).ok())?;
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", h.pid)).unwrap_or_default();
    let cgroup = cgroups
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers
                .split(',')
                .any(|c| c == "cpuset")
                .then(|| path.to_string())
        })
        .or_else(|| {
            cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .unwrap_or_default();
    (pidfd::start_time(h.pid) == Some(h.start_time)).then_some((allowed, cgroup))
}

/// Why `policy` cannot place a holder's pages where it says: its nodes are not all in the
/// holder's cpuset (`allowed`), so the kernel would put pages elsewhere or fail the fault (a
/// libvirt domain's cgroup gets `cpuset.mems` from `<numatune>`). `None` when it can, or names
/// no nodes, or names them relative to the cpuset.
pub(crate) fn cpuset_conflict(
    policy: &crate::domain::Policy,
    allowed: &crate::domain::NodeSet,
    pid: i32,
    cgroup: &str,
) -> Option<String> {
    if policy.nodes.is_empty() || policy.relative_nodes || policy.nodes.is_subset(allowed) {
        return None;
    }
    Some(format!(
        "the region's holder, pid {pid}, may allocate only on nodes {allowed} (cpuset.mems of \
         cgroup {cgroup}), so the kernel would not place its pages on {}: widen the cpuset first \
         (libvirt: virsh numatune DOMAIN --nodeset NODES --live) or name nodes within {allowed}",
        policy.nodes
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{NodeSet, Policy, PolicyMode};

    #[test]
    fn a_policy_outside_the_holders_cpuset_is_named() {
        let set = |ids: &[u32]| NodeSet::from_ids(ids.iter().copied()).unwrap();
        let allowed = set(&[0, 1]);
        let bind = |ids: &[u32]| Policy::new(PolicyMode::Bind, set(ids));
        assert_eq!(cpuset_conflict(&bind(&[1]), &allowed, 7, "/m"), None);
        assert_eq!(cpuset_conflict(&Policy::DEFAULT, &allowed, 7, "/m"), None);
        let msg = cpuset_conflict(
            &bind(&[1, 2]),
            &allowed,
            7,
            "/machine/qemu-1-d.libvirt-qemu",
        )
        .unwrap();
        assert!(
            msg.contains("pid 7, may allocate only on nodes 0-1")
                && msg.contains("/machine/qemu-1-d.libvirt-qemu")
                && msg.contains("on 1-2"),
            "{msg}"
        );
        let mut relative = bind(&[3]);
        relative.relative_nodes = true;
        assert_eq!(cpuset_conflict(&relative, &allowed, 7, "/m"), None);
        // This process's own cpuset reads back, and the agent's pid reused is refused.
        let me = Holder {
            pid: std::process::id() as i32,
            start_time: pidfd::start_time(std::process::id() as i32).unwrap(),
        };
        let (mine, _) = holder_cpuset(me).unwrap();
        assert!(!mine.is_empty());
        let stale = Holder {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(holder_cpuset(stale).is_none());
    }
}
