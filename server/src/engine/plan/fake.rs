//! A fake kernel: one policy per page, set by `bind`, read by `policy_at`.
use super::*;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// A file of `pages` pages, each with a policy (DEFAULT at first) and an allocated bit.
pub struct FakeKernel {
    pub page: u64,
    pub policies: RefCell<Vec<Policy>>,
    pub allocated: RefCell<BTreeMap<u64, bool>>,
    /// Offsets whose policy cannot be read.
    pub unreadable: RefCell<Vec<u64>>,
    /// Make every bind fail with this error.
    pub bind_error: Option<Errno>,
    /// Make allocated_pages fail with this error.
    pub residency_error: Option<Errno>,
}

impl FakeKernel {
    pub fn new(pages: u64, page: u64) -> Self {
        Self {
            page,
            policies: RefCell::new(vec![Policy::DEFAULT; pages as usize]),
            allocated: RefCell::new(BTreeMap::new()),
            unreadable: RefCell::new(Vec::new()),
            bind_error: None,
            residency_error: None,
        }
    }
}

impl RangeKernel for FakeKernel {
    fn policy_at(&self, offset: u64) -> Option<Policy> {
        if self.unreadable.borrow().contains(&offset) {
            return None;
        }
        self.policies
            .borrow()
            .get((offset / self.page) as usize)
            .copied()
    }

    fn bind(&self, offset: u64, length: u64, policy: &Policy) -> Result<(), Errno> {
        if let Some(e) = self.bind_error {
            return Err(e);
        }
        let mut p = self.policies.borrow_mut();
        for i in offset / self.page..(offset + length) / self.page {
            *p.get_mut(i as usize).ok_or(Errno::EINVAL)? = *policy;
        }
        Ok(())
    }

    fn allocated_pages(&self, offset: u64, length: u64) -> Result<u64, Errno> {
        if let Some(e) = self.residency_error {
            return Err(e);
        }
        Ok(self
            .allocated
            .borrow()
            .range(offset..offset + length)
            .filter(|(_, a)| **a)
            .count() as u64)
    }
}
