//! Region lifecycle: create (intent durable before the file is used), get, list, delete, and
//! the handoff's holder record and fd access.

use super::agent::{Agent, new_uid};
use super::apply::apply_all;
use super::error::{AgentError, kerr};
use super::idempotency::{Idempotency, request_id};
use super::live::{LiveRegion, RegionFile, RegionView};
use crate::domain::{
    Backend, DomainError, EventKind, Holder, Policy, RangeMap, RegionIntent, RegionKey,
    RegionStatus, VmId, resolve_span,
};
use crate::kernel::{self, GuestMemfdVm, Mapping};
use crate::store::{StoreError, WriteOp, unix_now};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use tokio::sync::RwLock;

/// A CreateRegion request in domain terms.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    /// Identity.
    pub key: RegionKey,
    /// Size.
    pub size_bytes: u64,
    /// Backend.
    pub backend: Backend,
    /// Huge page size, 0 for default.
    pub hugepage_size_bytes: u64,
    /// Initial policies: (offset, length, policy).
    pub policies: Vec<(u64, u64, Policy)>,
}

impl Agent {
    pub(crate) fn check_backend(&self, req: &CreateRequest) -> Result<u64, AgentError> {
        match req.backend {
            Backend::GuestMemfd => {
                if !self.features().kvm_usable {
                    return Err(AgentError::Unsupported {
                        what: "guest_memfd",
                        message: format!(
                            "guest_memfd regions need KVM, which is not usable here ({}); memfd regions still work",
                            self.features().kvm_error
                        ),
                    });
                }
                if !self.features().guest_memfd_supported {
                    return Err(AgentError::Unsupported {
                        what: "guest_memfd",
                        message: format!(
                            "kernel {} does not support guest_memfd (KVM_CAP_GUEST_MEMFD); use a memfd backend",
                            self.features().kernel_release
                        ),
                    });
                }
                if req.hugepage_size_bytes != 0 {
                    return Err(AgentError::InvalidArgument(
                        "hugepage_size_bytes applies only to BACKEND_MEMFD_HUGETLB".into(),
                    ));
                }
                Ok(self.page_size())
            }
            Backend::Memfd => {
                if req.hugepage_size_bytes != 0 {
                    return Err(AgentError::InvalidArgument(
                        "hugepage_size_bytes applies only to BACKEND_MEMFD_HUGETLB".into(),
                    ));
                }
                Ok(self.page_size())
            }
            Backend::MemfdHugetlb => {
                let sizes: Vec<u64> = self
                    .cached_topology()
                    .cached()
                    .nodes
                    .iter()
                    .flat_map(|n| n.hugepages.iter().map(|h| h.page_size))
                    .collect();
                let hp = if req.hugepage_size_bytes == 0 {
                    2 << 20
                } else {
                    req.hugepage_size_bytes
                };
                if !sizes.contains(&hp) {
                    return Err(AgentError::InvalidArgument(format!(
                        "hugepage_size_bytes {hp} is not a huge page size of this host (sizes: {sizes:?})"
                    )));
                }
                Ok(hp)
            }
        }
    }

    /// Creates a region. The intent (and idempotency record) is durable before the file exists,
    /// and the file exists before the call returns.
    pub async fn create_region(
        &self,
        req: CreateRequest,
        actor: &str,
        idem: Option<Idempotency<RegionView>>,
    ) -> Result<RegionView, AgentError> {
        let page = self.check_backend(&req)?;
        if req.size_bytes == 0 || req.size_bytes > self.settings().max_region_bytes {
            return Err(DomainError::BadSize {
                size: req.size_bytes,
                max: self.settings().max_region_bytes,
            }
            .into());
        }
        if !req.size_bytes.is_multiple_of(page) {
            return Err(DomainError::Unaligned {
                what: "size_bytes",
                value: req.size_bytes,
                page,
            }
            .into());
        }
        let mut ranges = RangeMap::new(req.size_bytes);
        for (offset, length, policy) in &req.policies {
            self.check_policy(policy)?;
            let (o, l) = resolve_span(*offset, *length, req.size_bytes, page)?;
            ranges.apply(o, l, *policy);
        }
        self.check_range_count(&req.key, &ranges)?;
        let _m = self.regions().changing().await;
        self.check_new_key(&req.key)?;
        let mut intent = RegionIntent {
            key: req.key.clone(),
            uid: new_uid(),
            backend: req.backend,
            size_bytes: req.size_bytes,
            hugepage_size_bytes: if req.backend == Backend::MemfdHugetlb {
                page
            } else {
                0
            },
            generation: 1,
            strategy: self.strategy_for(req.backend),
            ranges,
            created_unix: unix_now(),
            status: RegionStatus::Active,
            holder: None,
            file_id: None,
            origin: crate::domain::Origin::Agent,
            guest_cell: None,
        };
        // The file is made before the commit only to learn its identity; if the commit fails it is
        // closed and nothing was acknowledged. Its memory is untouched until after the commit.
        let vm = match intent.backend {
            Backend::GuestMemfd => Some(self.vm_for(&intent.key.vm_id).await?),
            _ => None,
        };
        let gmem_flags = self.features().guest_memfd_flags;
        let (file, intent) = Agent::blocking(move || {
            let file = create_file(&intent, vm, gmem_flags)?;
            // The identity is how a restarted agent finds the file in a VMM: without it a
            // handed-off file could not be taken back, so no region is created without one.
            intent.file_id = Some(kernel::fd_file_id(file.fd.as_fd()).map_err(kerr("fstat"))?);
            Ok::<_, AgentError>((file, intent))
        })
        .await??;
        let live = Box::new(LiveRegion {
            intent: intent.clone(),
            file: Some(file),
            errors: HashMap::new(),
            checked: None,
        });
        let pending_view = self.view_without_kernel(&live);
        let mut ops = vec![WriteOp::InsertRegion(intent.clone())];
        if let Some(i) = &idem {
            ops.push(i.save(&pending_view));
        }
        let ev = self.event(
            EventKind::RegionCreated,
            Some(&req.key),
            format!(
                "created {} region of {} bytes ({})",
                req.backend.as_str(),
                req.size_bytes,
                intent.strategy.as_str()
            ),
            actor,
        );
        self.commit(ops, vec![ev]).await.map_err(|e| match e {
            AgentError::Store(StoreError::Conflict) => AgentError::AlreadyExists(req.key.clone()),
            e => e,
        })?;
        crate::failpoint::hit("CreateRegion.after-commit", request_id(idem.as_ref()));
        let page = self.page_size();
        let (live, applied, view) = Agent::blocking(move || {
            let mut live = live;
            let applied = apply_all(&mut live, page);
            let view = live.fresh_view(page);
            (live, applied, view)
        })
        .await?;
        self.regions()
            .map()
            .insert(req.key.clone(), Arc::new(RwLock::new(*live)));
        if applied > 0 {
            tracing::debug!(region = %req.key, applied, "initial policies applied");
        }
        Ok(view)
    }

    /// Refuses a region whose ranges would exceed the per-region limit.
    pub(crate) fn check_range_count(
        &self,
        key: &RegionKey,
        ranges: &RangeMap,
    ) -> Result<(), AgentError> {
        let max = self.settings().max_ranges_per_region;
        if ranges.ranges().len() > max {
            return Err(AgentError::OverLimit {
                limit: "max_ranges_per_region",
                max: max as u64,
                message: format!(
                    "region {key} would have {} ranges, over the limit of {max}",
                    ranges.ranges().len(),
                ),
            });
        }
        Ok(())
    }

    /// Refuses a new region whose key is taken, or one over the agent's region limit. Call with
    /// `membership` held, so the answer stands until the region is inserted.
    pub(crate) fn check_new_key(&self, key: &RegionKey) -> Result<(), AgentError> {
        let regions = self.regions().map();
        if regions.contains_key(key) {
            return Err(AgentError::AlreadyExists(key.clone()));
        }
        let max = self.settings().max_regions;
        if regions.len() >= max {
            return Err(AgentError::OverLimit {
                limit: "max_regions",
                max: max as u64,
                message: format!("the agent already holds its limit of {max} regions"),
            });
        }
        Ok(())
    }

    /// One region with observed state: from its last check (see [`super::live::LastCheck`]),
    /// or with `fresh` read from the kernel now (every range at its samples) and kept as the
    /// last check.
    pub async fn get_region(&self, key: &RegionKey, fresh: bool) -> Result<RegionView, AgentError> {
        if fresh {
            let live = self.slot(key)?.write_owned().await;
            return Ok(self.fresh_view_of(live).await?.1);
        }
        let live = self.slot(key)?.read_owned().await;
        Ok(self.view_of(live).await?.1)
    }

    /// Every region's intent, without reading the kernel (for metrics).
    pub async fn list_intents(&self) -> Result<Vec<RegionIntent>, AgentError> {
        let mut out = Vec::new();
        for slot in self.slots(None) {
            out.push(slot.read().await.intent.clone());
        }
        Ok(out)
    }

    /// All regions (of one VM), with observed state.
    pub async fn list_regions(&self, vm_id: Option<&VmId>) -> Result<Vec<RegionView>, AgentError> {
        Ok(self
            .list_regions_page(vm_id, None, usize::MAX, |v| v)
            .await?
            .0)
    }

    /// A page of [`Self::list_regions`]: at most `limit` regions after `after` in key order, each
    /// as `each` makes it from its view (each view is dropped at once, not kept for the page),
    /// and whether more follow.
    pub async fn list_regions_page<T>(
        &self,
        vm_id: Option<&VmId>,
        after: Option<&RegionKey>,
        limit: usize,
        mut each: impl FnMut(RegionView) -> T,
    ) -> Result<(Vec<T>, bool), AgentError> {
        let (slots, more) = self.regions().page(vm_id.map(VmId::as_str), after, limit);
        let page = self.page_size();
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            // A region nobody is changing whose last check answers (the usual case) is read
            // under its lock at once: no await, no owned guard, no blocking thread.
            let ready = slot
                .try_read()
                .ok()
                .filter(|live| live.answers_from_check())
                .map(|live| live.view(page));
            let view = match ready {
                Some(v) => v,
                None => self.view_of(slot.read_owned().await).await?.1,
            };
            out.push(each(view));
        }
        Ok((out, more))
    }

    /// Deletes a region: durable first, then every fd of the agent is closed.
    pub async fn delete_region(
        &self,
        key: &RegionKey,
        actor: &str,
        idem: Option<Idempotency<RegionView>>,
    ) -> Result<RegionView, AgentError> {
        let _m = self.regions().changing().await;
        let live = self.slot(key)?.write_owned().await;
        let (mut live, view) = self.view_of(live).await?;
        let mut ops = vec![WriteOp::DeleteRegion(key.clone())];
        if let Some(i) = &idem {
            ops.push(i.save(&view));
        }
        let ev = self.event(
            EventKind::RegionDeleted,
            Some(key),
            "region deleted".into(),
            actor,
        );
        self.commit(ops, vec![ev]).await?;
        crate::failpoint::hit("DeleteRegion.after-commit", request_id(idem.as_ref()));
        self.regions().map().remove(key);
        // Close the fd and mapping now: a held guest_memfd keeps its whole KVM VM alive.
        live.file = None;
        drop(live);
        self.release_vm_if_unused(&key.vm_id);
        Ok(view)
    }

    /// Records that `holder` acquired the region's fd, so the agent can take it back after a
    /// restart.
    pub(crate) async fn record_holder(
        &self,
        key: &RegionKey,
        holder: Holder,
        actor: &str,
    ) -> Result<RegionView, AgentError> {
        let mut live = self.slot(key)?.write_owned().await;
        // What GetPlacement keeps mapped goes before the VMM gets the file (see
        // `placement::Census::forget`).
        live = Agent::blocking(move || {
            if let Some(f) = live.file.as_ref() {
                let mut census = f.census.lock().unwrap_or_else(|p| p.into_inner());
                census.forget(f.mapping.as_ref());
            }
            live
        })
        .await?;
        let file_id = live.intent.file_id;
        let ev = self.event(
            EventKind::Handoff,
            Some(key),
            format!("fd handed to pid {}", holder.pid),
            actor,
        );
        self.commit(
            vec![WriteOp::SaveHolder {
                key: key.clone(),
                holder: Some(holder),
                file_id,
            }],
            vec![ev],
        )
        .await?;
        live.intent.holder = Some(holder);
        self.counters
            .handoffs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.view_of(live).await?.1)
    }

    /// Runs `f` with the region's fd (and VM fd), e.g. to send them on the handoff socket.
    pub(crate) async fn with_fds<T>(
        &self,
        key: &RegionKey,
        f: impl FnOnce(
            &RegionIntent,
            std::os::fd::BorrowedFd<'_>,
            Option<std::os::fd::BorrowedFd<'_>>,
        ) -> T,
    ) -> Result<T, AgentError> {
        let slot = self.slot(key)?;
        let live = slot.read().await;
        let Some(file) = live.file.as_ref() else {
            return Err(AgentError::Lost(key.clone()));
        };
        let vm = file.vm.as_ref().map(|v| v.as_fd());
        Ok(f(&live.intent, file.fd.as_fd(), vm))
    }
}

/// Creates the kernel file of a region (for a guest_memfd, on `vm` with `gmem_flags`). Blocking.
pub(crate) fn create_file(
    intent: &RegionIntent,
    vm: Option<Arc<GuestMemfdVm>>,
    gmem_flags: u64,
) -> Result<RegionFile, AgentError> {
    match intent.backend {
        Backend::Memfd | Backend::MemfdHugetlb => {
            let huge =
                (intent.backend == Backend::MemfdHugetlb).then_some(intent.hugepage_size_bytes);
            let fd = kernel::create_memfd(&intent.key.to_string(), intent.size_bytes, huge)
                .map_err(kerr("memfd_create"))?;
            let mapping = Mapping::new(fd.as_fd(), intent.size_bytes).map_err(kerr("mmap"))?;
            Ok(RegionFile {
                census: Default::default(),
                fd,
                mapping: Some(mapping),
                vm: None,
            })
        }
        Backend::GuestMemfd => {
            let vm =
                vm.ok_or_else(|| AgentError::Internal("a guest_memfd region needs its VM".into()))?;
            let flags = gmem_flags
                & (kernel::files::GUEST_MEMFD_FLAG_MMAP
                    | kernel::files::GUEST_MEMFD_FLAG_INIT_SHARED);
            let fd = vm
                .create_guest_memfd(intent.size_bytes, flags)
                .map_err(kerr("KVM_CREATE_GUEST_MEMFD"))?;
            let mapping = if flags & kernel::files::GUEST_MEMFD_FLAG_MMAP != 0 {
                Some(Mapping::new(fd.as_fd(), intent.size_bytes).map_err(kerr("mmap"))?)
            } else {
                None
            };
            Ok(RegionFile {
                census: Default::default(),
                fd,
                mapping,
                vm: Some(vm),
            })
        }
    }
}
