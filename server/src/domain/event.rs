//! The event log's entries.

/// What happened, for the event log. The numbers are the API's `EventKind` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum EventKind {
    /// The agent started.
    AgentStarted = 1,
    /// A region was created.
    RegionCreated = 2,
    /// A region was deleted.
    RegionDeleted = 3,
    /// A policy was applied.
    PolicyApplied = 4,
    /// Drift found.
    DriftFound = 5,
    /// Re-applied after drift or a new mapping.
    Reapplied = 6,
    /// A holder went away.
    HolderLost = 7,
    /// A region's file could not be recovered.
    RegionLost = 8,
    /// A region was populated.
    Populated = 9,
    /// A VMM acquired a region's fd.
    Handoff = 10,
    /// A region's fd was taken back from its holder.
    FdRecovered = 11,
    /// A VMM handed in its own file.
    RegionAdopted = 12,
    /// A VMM attached its VM fd.
    VmAttached = 13,
    /// A policy was applied that will not place pages as asked.
    PolicyWarning = 14,
    /// A range's policy could not be applied or read back as intended.
    VerifyFailed = 15,
    /// A region's memory was given back after its last holder exited.
    RegionReleased = 16,
}

impl EventKind {
    /// The kind with API number `v`.
    pub fn from_i32(v: i32) -> Option<Self> {
        use EventKind::*;
        [
            AgentStarted,
            RegionCreated,
            RegionDeleted,
            PolicyApplied,
            DriftFound,
            Reapplied,
            HolderLost,
            RegionLost,
            Populated,
            Handoff,
            FdRecovered,
            RegionAdopted,
            VmAttached,
            PolicyWarning,
            VerifyFailed,
            RegionReleased,
        ]
        .into_iter()
        .find(|k| *k as i32 == v)
    }
}

/// One entry of the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Sequence number, assigned by the store.
    pub sequence: u64,
    /// Unix milliseconds.
    pub time_unix_ms: i64,
    /// What happened.
    pub kind: EventKind,
    /// The VM, or empty.
    pub vm_id: String,
    /// The region, or empty.
    pub name: String,
    /// For a person.
    pub message: String,
    /// Who caused it.
    pub actor: String,
}
