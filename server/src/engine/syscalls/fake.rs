//! A fake kernel: one policy per page, set by `bind`, read by `policy_at`; an allocated bit and a
//! node per page, set by `allocate` (on the first node the task policy names, else node 0) and
//! by `bind_moving` (onto the first node the policy names, where it does not allow the page's).
use super::*;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// A file of `pages` pages, each with a policy (DEFAULT at first) and an allocated bit.
pub struct FakeKernel {
    pub page: u64,
    pub policies: RefCell<Vec<Policy>>,
    /// Allocated pages by offset, each with its node.
    pub allocated: RefCell<BTreeMap<u64, bool>>,
    /// The node of each allocated page (node 0 where absent).
    pub nodes: RefCell<BTreeMap<u64, u32>>,
    /// The policy `set_task_policy` set.
    pub task_policy: RefCell<Option<Policy>>,
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
            nodes: RefCell::new(BTreeMap::new()),
            task_policy: RefCell::new(None),
            unreadable: RefCell::new(Vec::new()),
            bind_error: None,
            residency_error: None,
        }
    }

    fn pages(&self, offset: u64, length: u64) -> impl Iterator<Item = u64> {
        (offset..offset + length).step_by(self.page as usize)
    }
}

impl Syscalls for FakeKernel {
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

    fn bind_moving(&self, offset: u64, length: u64, policy: &Policy) -> Result<Moved, Errno> {
        self.bind(offset, length, policy)?;
        let mut done = Moved::default();
        let allocated = self.allocated.borrow();
        let mut nodes = self.nodes.borrow_mut();
        for o in self.pages(offset, length) {
            if allocated.get(&o) != Some(&true) {
                continue;
            }
            let node = nodes.entry(o).or_insert(0);
            if policy.allows(*node) == Some(false) {
                match policy.nodes.iter().next() {
                    Some(to) => {
                        *node = to;
                        done.moved += 1;
                    }
                    None => done.failed += 1,
                }
            }
        }
        Ok(done)
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

    fn set_task_policy(&self, policy: &Policy) -> Result<(), Errno> {
        *self.task_policy.borrow_mut() = Some(*policy);
        Ok(())
    }

    fn allocate(&self, offset: u64, length: u64) -> Result<(), Errno> {
        let node = self
            .task_policy
            .borrow()
            .and_then(|p| p.nodes.iter().next())
            .unwrap_or(0);
        for o in self.pages(offset, length) {
            if self.allocated.borrow_mut().insert(o, true) != Some(true) {
                self.nodes.borrow_mut().insert(o, node);
            }
        }
        Ok(())
    }
}
