//! Adopt: a file a VMM made (a guest_memfd of its own VM, or a memfd) becomes a region, durable
//! first, then mapped.

use crate::domain::{
    Backend, DomainError, EventKind, Holder, RangeMap, RegionIntent, RegionKey, RegionStatus,
    Strategy,
};
use crate::engine::agent::{Agent, new_uid};
use crate::engine::error::{AgentError, kerr};
use crate::engine::live::{LiveRegion, RegionFile, RegionView};
use crate::engine::plan::observed_ranges;
use crate::engine::syscalls::RealFile;
use crate::kernel::Mapping;
use crate::store::{WriteOp, unix_now};
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use tokio::sync::RwLock;

impl Agent {
    /// Takes a file a VMM made and makes it a region: durable first, then mapped and bound.
    pub(crate) async fn adopt(
        &self,
        key: RegionKey,
        backend: Backend,
        size_bytes: u64,
        fd: OwnedFd,
        holder: Holder,
        actor: &str,
    ) -> Result<RegionView, AgentError> {
        let st = nix::sys::stat::fstat(&fd).map_err(kerr("fstat"))?;
        // guest_memfd reports its size too; a region larger than its file would fault SIGBUS.
        let file_size = st.st_size as u64;
        if file_size != size_bytes {
            return Err(AgentError::InvalidArgument(format!(
                "size_bytes {size_bytes} does not match the file's size {file_size}"
            )));
        }
        if size_bytes == 0
            || !size_bytes.is_multiple_of(self.page_size())
            || size_bytes > self.settings().max_region_bytes
        {
            return Err(DomainError::BadSize {
                size: size_bytes,
                max: self.settings().max_region_bytes,
            }
            .into());
        }
        let _m = self.regions().changing().await;
        if self.regions().map().contains_key(&key) {
            return Err(AgentError::AlreadyExists(key));
        }
        let mapping = Mapping::new(fd.as_fd(), size_bytes).map_err(|e| {
            AgentError::InvalidArgument(format!(
                "the fd handed in cannot be mapped shared for {size_bytes} bytes: {}",
                e.desc()
            ))
        })?;
        let strategy = match backend {
            Backend::GuestMemfd if self.features().guest_memfd_shared_policy => {
                Strategy::SharedPolicy
            }
            Backend::GuestMemfd => Strategy::TaskPolicy,
            b => self.strategy_for(b),
        };
        let (ranges, kept) = kernel_ranges(
            fd.as_fd(),
            Some(&mapping),
            strategy,
            size_bytes,
            self.page_size(),
        )?;
        let intent = RegionIntent {
            key: key.clone(),
            uid: new_uid(),
            backend,
            size_bytes,
            hugepage_size_bytes: 0,
            generation: 1,
            strategy,
            ranges,
            created_unix: unix_now(),
            status: RegionStatus::Active,
            holder: Some(holder),
            file_id: Some((st.st_dev, st.st_ino)),
            origin: crate::domain::Origin::Adopt,
            guest_cell: None,
        };
        let ev = self.event(
            EventKind::RegionAdopted,
            Some(&key),
            format!(
                "adopted a {} file of {size_bytes} bytes from pid {}; {kept}",
                backend.as_str(),
                holder.pid
            ),
            actor,
        );
        self.commit(vec![WriteOp::InsertRegion(intent.clone())], vec![ev])
            .await?;
        let live = Box::new(LiveRegion {
            intent,
            file: Some(RegionFile {
                census: Default::default(),
                fd,
                mapping: Some(mapping),
                vm: None,
            }),
            errors: HashMap::new(),
            checked: None,
        });
        let (live, view) = self.fresh_view_of(live).await?;
        self.regions()
            .map()
            .insert(key, Arc::new(RwLock::new(*live)));
        Ok(view)
    }
}

/// The intent of a file brought in from a VMM (attach, adopt): the placement the kernel shows
/// now, so bringing a file in changes nothing nobody asked for (a VMM's own mbind, such as
/// QEMU's `host-nodes`/`policy` from libvirt's `<numatune>`, is kept, and Reconcile re-applies
/// it). Returns the ranges and what was kept, for the event.
///
/// Only a shared-policy file holds a placement to read; a task-policy file's policy is that of
/// whoever allocates, so its ranges start DEFAULT as the kernel reports them.
pub(crate) fn kernel_ranges(
    fd: BorrowedFd<'_>,
    mapping: Option<&Mapping>,
    strategy: Strategy,
    size: u64,
    page: u64,
) -> Result<(RangeMap, String), AgentError> {
    let Some(mapping) = mapping.filter(|_| strategy == Strategy::SharedPolicy) else {
        return Ok((
            RangeMap::new(size),
            "the file holds no shared policy: intent starts DEFAULT".into(),
        ));
    };
    let k = RealFile {
        fd,
        mapping: Some(mapping),
        page,
    };
    let ranges = observed_ranges(&k, size, page).ok_or_else(|| {
        AgentError::FailedPrecondition(
            "the file's memory policy cannot be read (get_mempolicy failed or reported a mode \
             memplace does not know), so it cannot be taken over unchanged"
                .into(),
        )
    })?;
    let text = ranges
        .iter()
        .map(|r| format!("[{:#x}, {:#x}) {}", r.offset, r.end(), r.policy))
        .collect::<Vec<_>>()
        .join(", ");
    let map = RangeMap::from_ranges(size, ranges).ok_or_else(|| {
        AgentError::Internal("the ranges read from the kernel do not tile the file".into())
    })?;
    Ok((
        map,
        format!("kept the kernel's placement as intent: {text}"),
    ))
}
