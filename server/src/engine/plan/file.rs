//! [`RangeKernel`] over a real file: the agent's mapping reads the policy, a fresh window per
//! bind sets it (see `bind_file_range`), and the page cache (or a probe through the mapping) tells
//! which pages are allocated.

use super::RangeKernel;
use crate::domain::Policy;
use crate::engine::placement;
use crate::engine::policy::bind_file_range;
use crate::kernel::{self, Mapping};
use nix::errno::Errno;
use std::os::fd::BorrowedFd;

/// A region's file as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FileKernel<'a> {
    /// The file.
    pub fd: BorrowedFd<'a>,
    /// A shared mapping of the whole file, where it can be mapped.
    pub mapping: Option<&'a Mapping>,
    /// The file's page size.
    pub page: u64,
}

impl RangeKernel for FileKernel<'_> {
    fn policy_at(&self, offset: u64) -> Option<Policy> {
        self.mapping?.policy_at(offset).ok().flatten()
    }

    fn bind(&self, offset: u64, length: u64, policy: &Policy) -> Result<(), Errno> {
        let window = Mapping::window(self.fd, offset, length)?;
        bind_file_range(&window, offset, length, policy, 0)
    }

    fn allocated_pages(&self, offset: u64, length: u64) -> Result<u64, Errno> {
        let map = match self.mapping {
            Some(m) => placement::allocated(self.fd, m, offset, length, self.page)?,
            None => kernel::files::allocated_map(self.fd, offset, length, self.page)?,
        };
        Ok(map.iter().filter(|b| **b).count() as u64)
    }
}
