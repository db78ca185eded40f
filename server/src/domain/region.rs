//! Regions: their keys, backends, placement strategies, holders and intent.

use super::*;
use std::fmt;

/// What kind of file holds a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// KVM guest_memfd.
    GuestMemfd,
    /// memfd (shmem).
    Memfd,
    /// memfd on hugetlbfs.
    MemfdHugetlb,
}

impl Backend {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GuestMemfd => "guest_memfd",
            Self::Memfd => "memfd",
            Self::MemfdHugetlb => "memfd_hugetlb",
        }
    }

    /// Parses [`Backend::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::GuestMemfd, Self::Memfd, Self::MemfdHugetlb]
            .into_iter()
            .find(|b| b.as_str() == s)
    }
}

/// How pages are made to follow a range's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// mbind through the agent's mapping sets the file's shared policy.
    SharedPolicy,
    /// The agent allocates pages from a thread whose task policy is the range's policy.
    TaskPolicy,
}

impl Strategy {
    /// The database and report spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SharedPolicy => "shared-policy",
            Self::TaskPolicy => "task-policy",
        }
    }

    /// Parses [`Strategy::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::SharedPolicy, Self::TaskPolicy]
            .into_iter()
            .find(|b| b.as_str() == s)
    }
}

/// A checked `vm_id`: the only way to build one is [`VmId::parse`], so the engine, which takes
/// it, never checks the name again.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(String);

impl VmId {
    /// A vm_id from caller input, checked here, once, at the edge.
    pub fn parse(vm_id: &str) -> Result<Self, DomainError> {
        validate_name("vm_id", vm_id)?;
        Ok(Self(vm_id.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifies a region. Built only by [`RegionKey::parse`] (or [`RegionKey::in_vm`] from a
/// checked [`VmId`]), so both names are always valid and the engine, which takes keys, never
/// checks them again. The fields are public to read; code must not assign them.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionKey {
    /// The VM.
    pub vm_id: String,
    /// The region within the VM.
    pub name: String,
    /// Keeps struct literals out: a key is made by a constructor that checks it.
    checked: Checked,
}

/// Proof that a [`RegionKey`]'s names were checked; only this module can make one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Checked;

impl RegionKey {
    /// A key from caller input: both names are checked here, once, at the edge.
    pub fn parse(vm_id: &str, name: &str) -> Result<Self, DomainError> {
        validate_name("vm_id", vm_id)?;
        validate_name("name", name)?;
        Ok(Self {
            vm_id: vm_id.to_string(),
            name: name.to_string(),
            checked: Checked,
        })
    }

    /// The key of region `name` in the checked VM `vm`.
    pub fn in_vm(vm: &VmId, name: &str) -> Result<Self, DomainError> {
        validate_name("name", name)?;
        Ok(Self {
            vm_id: vm.0.clone(),
            name: name.to_string(),
            checked: Checked,
        })
    }
}

impl fmt::Debug for RegionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionKey")
            .field("vm_id", &self.vm_id)
            .field("name", &self.name)
            .finish()
    }
}

impl fmt::Display for RegionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vm_id, self.name)
    }
}

/// Whether the agent holds a region's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionStatus {
    /// Held and mapped.
    Active,
    /// Gone after a restart with no holder; intent kept until deleted.
    Lost,
    /// Given back when its last holder exited: the agent closed its file, so the memory is
    /// freed. Intent kept until deleted.
    Released,
}

impl RegionStatus {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Lost => "lost",
            Self::Released => "released",
        }
    }

    /// From the database spelling.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::Lost, Self::Released]
            .into_iter()
            .find(|v| v.as_str() == s)
    }

    /// Whether the agent has the region's file (a lost or released region has none).
    pub fn has_file(self) -> bool {
        self == Self::Active
    }
}

/// Who made a region's file. A file a VMM made is the VMM's memory: when its last holder exits
/// the agent gives it back at once. A file the agent made is kept a while for a VMM that
/// restarts (see `release_agent_regions_after` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The agent created it (CreateRegion; `memplacectl exec` creates its regions this way).
    Agent,
    /// Taken from a running VMM by AttachProcess.
    Attach,
    /// Handed in by a VMM on the handoff socket (adopt).
    Adopt,
}

impl Origin {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Attach => "attach",
            Self::Adopt => "adopt",
        }
    }

    /// From the database spelling.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Agent, Self::Attach, Self::Adopt]
            .into_iter()
            .find(|v| v.as_str() == s)
    }

    /// Whether a VMM made the file (attach, adopt).
    pub fn vmm_made(self) -> bool {
        self != Self::Agent
    }
}

/// Who holds a region's fd besides the agent, recorded at handoff so the agent can take the fd
/// back after its own restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Holder {
    /// The process id.
    pub pid: i32,
    /// Field 22 of /proc/PID/stat, so a reused pid is not mistaken for the holder.
    pub start_time: u64,
}

/// The durable intent of one region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionIntent {
    /// Identity.
    pub key: RegionKey,
    /// A unique id.
    pub uid: String,
    /// File kind.
    pub backend: Backend,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Huge page size, or 0.
    pub hugepage_size_bytes: u64,
    /// Bumped by each change of intent.
    pub generation: u64,
    /// Placement strategy, chosen at creation from probed capabilities.
    pub strategy: Strategy,
    /// Per-range policies.
    pub ranges: RangeMap,
    /// Creation time, Unix seconds.
    pub created_unix: i64,
    /// Held or lost.
    pub status: RegionStatus,
    /// The last process that acquired the fd.
    pub holder: Option<Holder>,
    /// (st_dev, st_ino) of the file, to find it in a holder after a restart.
    pub file_id: Option<(u64, u64)>,
    /// Who made the file.
    pub origin: Origin,
    /// The guest NUMA cell the file backs, where the VMM's configuration and the kernel prove it.
    pub guest_cell: Option<u32>,
}

impl RegionIntent {
    /// The file's page size.
    pub fn page_size(&self, base_page: u64) -> u64 {
        if self.backend == Backend::MemfdHugetlb {
            self.hugepage_size_bytes
        } else {
            base_page
        }
    }
}
