//! The narrow handles the [`Agent`](super::Agent) hands its jobs, one per kind of state:
//! [`Regions`] (the live regions and the lock that orders creates and deletes), [`Journal`]
//! (the durable store and the event feed: committed first, announced after) and [`Vms`] (the
//! KVM VMs guest_memfd files are made on). A job takes the handle it needs, not the agent's
//! fields.

use super::error::{AgentError, kerr};
use super::live::Slot;
use crate::domain::{Event, RegionKey};
use crate::kernel::GuestMemfdVm;
use crate::store::{Store, WriteOp};
use parking_lot::{Mutex, MutexGuard};
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use tokio::sync::broadcast;

/// The live regions by key.
#[derive(Default)]
pub(crate) struct Regions {
    map: Mutex<BTreeMap<RegionKey, Slot>>,
    /// Serializes creates and deletes, so region counts and names stay consistent.
    membership: tokio::sync::Mutex<()>,
}

impl Regions {
    /// Holds off every other create and delete until the guard drops.
    pub(crate) async fn changing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.membership.lock().await
    }

    /// The region `key`.
    pub(crate) fn get(&self, key: &RegionKey) -> Result<Slot, AgentError> {
        self.map
            .lock()
            .get(key)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(key.clone()))
    }

    /// Every region, or a VM's.
    pub(crate) fn all(&self, vm_id: Option<&str>) -> Vec<Slot> {
        self.map
            .lock()
            .iter()
            .filter(|(k, _)| vm_id.is_none_or(|v| k.vm_id == v))
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// At most `limit` regions (of one VM) after `after` in key order, and whether more follow.
    pub(crate) fn page(
        &self,
        vm_id: Option<&str>,
        after: Option<&RegionKey>,
        limit: usize,
    ) -> (Vec<Slot>, bool) {
        let map = self.map.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut it = map
            .range((start, Bound::Unbounded))
            .skip_while(|(k, _)| vm_id.is_some_and(|v| k.vm_id.as_str() < v))
            .take_while(|(k, _)| vm_id.is_none_or(|v| k.vm_id == v))
            .map(|(_, s)| s);
        let page = it.by_ref().take(limit).cloned().collect();
        (page, it.next().is_some())
    }

    /// The map itself, for a change of several steps under one lock.
    pub(crate) fn map(&self) -> MutexGuard<'_, BTreeMap<RegionKey, Slot>> {
        self.map.lock()
    }
}

/// Durable state and the event feed.
pub(crate) struct Journal {
    store: Store,
    events: broadcast::Sender<Event>,
}

impl Journal {
    pub(crate) fn new(store: Store) -> Self {
        Self {
            store,
            events: broadcast::channel(4096).0,
        }
    }

    /// The store.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Subscribes to events as they are committed.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Commits `ops` and `events` in one write, then announces the events with their sequence
    /// numbers. Nothing is announced that is not durable.
    pub(crate) async fn commit(
        &self,
        mut ops: Vec<WriteOp>,
        events: Vec<Event>,
    ) -> Result<(), AgentError> {
        let n = events.len();
        ops.extend(events.iter().cloned().map(WriteOp::AppendEvent));
        let seqs = self.store.write(ops).await?;
        for (mut e, seq) in events.into_iter().zip(seqs).take(n) {
            e.sequence = seq;
            let _ = self.events.send(e);
        }
        Ok(())
    }
}

/// The KVM VM of each vm_id that has guest_memfd files.
#[derive(Default)]
pub(crate) struct Vms {
    map: Mutex<HashMap<String, Arc<GuestMemfdVm>>>,
}

impl Vms {
    /// The VM this vm_id's guest_memfd files are made on: the one a VMM attached, else one
    /// created here. The VM is created without holding the map's lock (creating a KVM VM takes
    /// milliseconds); when two calls race, the first inserted wins and the other's VM is dropped.
    pub(crate) async fn for_vm(&self, vm_id: &str) -> Result<Arc<GuestMemfdVm>, AgentError> {
        if let Some(vm) = self.map.lock().get(vm_id).cloned() {
            return Ok(vm);
        }
        let vm = super::Agent::blocking(GuestMemfdVm::create)
            .await?
            .map_err(kerr("creating a KVM VM"))?;
        Ok(self
            .map
            .lock()
            .entry(vm_id.to_string())
            .or_insert(Arc::new(vm))
            .clone())
    }

    /// Uses `vm` for this vm_id from now on.
    pub(crate) fn insert(&self, vm_id: &str, vm: GuestMemfdVm) {
        self.map.lock().insert(vm_id.to_string(), Arc::new(vm));
    }

    /// Forgets a vm_id's VM once `regions` holds none of its regions.
    pub(crate) fn release_if_unused(&self, vm_id: &str, regions: &Regions) {
        let map = regions.map();
        if !map.keys().any(|k| k.vm_id == vm_id) {
            self.map.lock().remove(vm_id);
        }
    }
}
