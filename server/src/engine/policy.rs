//! SetPolicy: check a policy against the kernel and the host, commit the new intent, then bind
//! it through a fresh window and read it back.

use super::agent::Agent;
use super::apply::apply_range;
use super::error::AgentError;
use super::idempotency::{Idempotency, committed_first, request_id};
use super::live::{LiveRegion, RegionView};
use super::plan::{Migrate, plan_migrate};
use crate::domain::{
    Backend, DomainError, EventKind, Policy, PolicyMode, RegionIntent, RegionKey, Strategy,
    resolve_span,
};
use crate::kernel::probe::Features;
use crate::store::WriteOp;
use nix::errno::Errno;
use std::collections::HashMap;
use tokio::sync::OwnedRwLockWriteGuard;

/// A SetPolicy request in domain terms.
#[derive(Clone, Debug)]
pub struct SetPolicyRequest {
    /// The region.
    pub key: RegionKey,
    /// Start of the range (page aligned).
    pub offset: u64,
    /// Length of the range; 0 means to the end of the region.
    pub length: u64,
    /// The policy.
    pub policy: Policy,
    /// Move pages already allocated that the policy does not allow.
    pub migrate: bool,
    /// The region generation the caller saw; 0 skips the check.
    pub expected_generation: u64,
}

/// The outcome of SetPolicy.
#[derive(Clone, Debug)]
pub struct SetPolicyOutcome {
    /// The region after the change.
    pub region: RegionView,
    /// Pages moved with migrate.
    pub pages_migrated: u64,
    /// Pages that could not move.
    pub pages_migrate_failed: u64,
    /// The policy was applied but will not place pages as asked (see [`policy_warning`]).
    pub warnings: Vec<String>,
}

/// Why a policy applied to a region will not place its pages as asked, if it will not: INTERLEAVE
/// or WEIGHTED_INTERLEAVE over several nodes on a guest_memfd region placed through the kernel's
/// shared policy, where the start-up probe did not find interleave on guest_memfd exact (kernels
/// 6.19 to 7.1 take the interleave index from the inode, not the page offset). The agent applies
/// the policy anyway (pages still go to the named nodes, only not alternating by offset), and says
/// so in SetPolicy's answer and in a POLICY_WARNING event.
pub(crate) fn policy_warning(
    backend: Backend,
    strategy: Strategy,
    policy: &Policy,
    features: &Features,
) -> Option<String> {
    let interleave = matches!(
        policy.mode,
        PolicyMode::Interleave | PolicyMode::WeightedInterleave
    );
    if backend != Backend::GuestMemfd
        || strategy != Strategy::SharedPolicy
        || !interleave
        || policy.nodes.len() < 2
        || features.guest_memfd_interleave_exact == Some(true)
    {
        return None;
    }
    let why = match features.guest_memfd_interleave_exact {
        Some(_) => format!(
            "is not exact on kernel {}: it takes the interleave index of guest_memfd pages from the inode, \
             not from the page offset (fixed in 7.2), so the pages will not alternate over nodes {}",
            features.kernel_release, policy.nodes
        ),
        None => format!(
            "could not be verified on kernel {} ({}); kernels 6.19 to 7.1 do not alternate the pages by offset",
            features.kernel_release, features.guest_memfd_interleave_note
        ),
    };
    Some(format!(
        "{} on guest_memfd {why}; the policy was applied as asked",
        policy.mode.as_str()
    ))
}

impl Agent {
    /// Checks a policy against the modes this kernel supports and the nodes the agent may use.
    pub fn check_policy(&self, policy: &Policy) -> Result<(), AgentError> {
        policy.validate().map_err(DomainError::from)?;
        let unsupported = match policy.mode {
            PolicyMode::PreferredMany if !self.features().preferred_many => {
                Some("preferred-many (5.15+)")
            }
            PolicyMode::WeightedInterleave if !self.features().weighted_interleave => {
                Some("weighted-interleave (6.9+)")
            }
            _ => None,
        };
        if let Some(m) = unsupported {
            return Err(AgentError::Unsupported {
                what: "policy mode",
                message: format!(
                    "policy mode {m} is not supported by kernel {}",
                    self.features().kernel_release
                ),
            });
        }
        policy
            .check_usable(&self.cached_topology().cached().usable)
            .map_err(DomainError::from)?;
        Ok(())
    }

    /// How a new region of `backend` is placed: through the file's shared policy where the kernel
    /// has one, else by allocating under a task policy.
    pub(crate) fn strategy_for(&self, backend: Backend) -> Strategy {
        // The `force_strategy` config key (tests prove the task-policy path on memfd in
        // multi-node guests, where KVM is absent).
        if let Some(s) = self.settings().force_strategy {
            return s;
        }
        let shared = match backend {
            Backend::Memfd => self.features().memfd_shared_policy,
            Backend::GuestMemfd => self.features().guest_memfd_shared_policy,
            Backend::MemfdHugetlb => self.features().hugetlb_shared_policy,
        };
        if shared {
            Strategy::SharedPolicy
        } else {
            Strategy::TaskPolicy
        }
    }

    /// Sets a range's policy: validate, commit the new intent, then apply it and read it back.
    pub async fn set_policy(
        &self,
        req: SetPolicyRequest,
        actor: &str,
        idem: Option<Idempotency<SetPolicyOutcome>>,
    ) -> Result<SetPolicyOutcome, AgentError> {
        let SetPolicyRequest {
            key,
            offset,
            length,
            policy,
            migrate,
            expected_generation,
        } = req;
        let key = &key;
        self.check_policy(&policy)?;
        let mut live = self.slot(key)?.write_owned().await;
        // A concurrent call with the same request id is caught when its request record conflicts
        // at commit (below), so the common path reads nothing here.
        let page = live.intent.page_size(self.page_size());
        let (offset, length) = resolve_span(offset, length, live.intent.size_bytes, page)?;
        self.check_generation(&live.intent, expected_generation, idem.as_ref())
            .await?;
        if let Some(e) = AgentError::without_file(&live.intent) {
            return Err(e);
        }
        // A holder confined by its cgroup's cpuset (a libvirt domain) would not get pages on
        // nodes outside it: say so instead of binding.
        if let Some(h) = live.intent.holder
            && let Some((allowed, cgroup)) = super::holders::holder_cpuset(h)
            && let Some(why) = super::holders::cpuset_conflict(&policy, &allowed, h.pid, &cgroup)
        {
            return Err(AgentError::FailedPrecondition(format!(
                "region {key}: {why}"
            )));
        }
        if migrate {
            live = refuse_unmovable(live, offset, length, page).await?;
        }
        let change = PolicyChange {
            offset,
            length,
            policy,
            migrate,
        };
        let next = self.next_intent(&live.intent, &change)?;
        let warnings: Vec<String> = policy_warning(
            live.intent.backend,
            live.intent.strategy,
            &policy,
            self.features(),
        )
        .into_iter()
        .collect();
        self.commit_policy(&next, &change, &warnings, actor, idem.as_ref())
            .await?;
        crate::failpoint::hit("SetPolicy.after-commit", request_id(idem.as_ref()));
        live.intent = next;
        let base_page = self.page_size();
        let ((moved, failed), region) = Agent::blocking(move || {
            let moved = apply_range(&mut live, offset, length, migrate, base_page);
            (
                moved,
                live.fresh_view_after(base_page, Some((offset, offset + length))),
            )
        })
        .await?;
        Ok(SetPolicyOutcome {
            region,
            pages_migrated: moved,
            pages_migrate_failed: failed,
            warnings,
        })
    }

    /// Refuses a stale `expected_generation` (0 skips the check). When a concurrent retry of this
    /// request committed first and moved the generation on, its stored answer applies instead.
    async fn check_generation(
        &self,
        intent: &RegionIntent,
        expected: u64,
        idem: Option<&Idempotency<SetPolicyOutcome>>,
    ) -> Result<(), AgentError> {
        if expected == 0 || expected == intent.generation {
            return Ok(());
        }
        if let Some(i) = idem
            && !matches!(
                self.store().lookup_request(&i.request_id).await?,
                crate::store::RequestLookup::Unknown
            )
        {
            return Err(AgentError::DuplicateRequest(i.request_id.clone()));
        }
        Err(AgentError::GenerationConflict {
            key: intent.key.clone(),
            expected,
            actual: intent.generation,
        })
    }

    /// The region's intent with the change applied, at the next generation.
    fn next_intent(
        &self,
        intent: &RegionIntent,
        change: &PolicyChange,
    ) -> Result<RegionIntent, AgentError> {
        let mut next = intent.clone();
        next.ranges
            .apply(change.offset, change.length, change.policy);
        self.check_range_count(&intent.key, &next.ranges)?;
        next.generation = intent.generation + 1;
        Ok(next)
    }

    /// Commits the new intent with its events (and the request's record and first answer). A
    /// conflict on the request record means a concurrent call with this id committed first, and
    /// nothing of this one was written.
    async fn commit_policy(
        &self,
        next: &RegionIntent,
        change: &PolicyChange,
        warnings: &[String],
        actor: &str,
        idem: Option<&Idempotency<SetPolicyOutcome>>,
    ) -> Result<(), AgentError> {
        let key = &next.key;
        let PolicyChange {
            offset,
            length,
            policy,
            migrate,
        } = *change;
        let generation = next.generation;
        let mut ops = vec![WriteOp::SaveRanges {
            key: key.clone(),
            generation,
            ranges: next.ranges.clone(),
        }];
        if let Some(i) = idem {
            let pending = LiveRegion {
                intent: next.clone(),
                file: None,
                errors: HashMap::new(),
                checked: None,
            };
            // The first answer, as the engine knows it at the commit: the committed intent and
            // the warnings; the kernel change (and any migrate) follows the commit.
            ops.push(i.save(&SetPolicyOutcome {
                region: self.view_without_kernel(&pending),
                pages_migrated: 0,
                pages_migrate_failed: 0,
                warnings: warnings.to_vec(),
            }));
        }
        let mut events = vec![self.event(
            EventKind::PolicyApplied,
            Some(key),
            format!(
                "policy {policy} on [{offset:#x}, {:#x}) at generation {generation}{}",
                offset + length,
                if migrate { " with migrate" } else { "" }
            ),
            actor,
        )];
        for w in warnings {
            events.push(self.event(
                EventKind::PolicyWarning,
                Some(key),
                format!("[{offset:#x}, {:#x}): {w}", offset + length),
                actor,
            ));
        }
        // Only the request record can conflict here (ranges are replaced, not added to).
        self.commit(ops, events)
            .await
            .map_err(committed_first(idem))
    }
}

/// One SetPolicy change, resolved to whole pages.
#[derive(Clone, Copy, Debug)]
struct PolicyChange {
    offset: u64,
    length: u64,
    policy: Policy,
    migrate: bool,
}

/// Refuses a migrate over a guest_memfd range with allocated pages (they cannot move), or where
/// the kernel cannot tell whether it has any (see [`plan_migrate`]). Hands the region back when
/// the migrate may go on.
async fn refuse_unmovable(
    live: OwnedRwLockWriteGuard<LiveRegion>,
    offset: u64,
    length: u64,
    page: u64,
) -> Result<OwnedRwLockWriteGuard<LiveRegion>, AgentError> {
    let backend = live.intent.backend;
    let (live, decision) = Agent::blocking(move || {
        let decision = match live.kernel(page) {
            Some(k) => plan_migrate(backend, &k, offset, length),
            None => Migrate::RefuseUnknown(Errno::EBADF),
        };
        (live, decision)
    })
    .await?;
    let message = match decision {
        Migrate::Go => return Ok(live),
        Migrate::RefuseUnknown(e) => format!(
            "cannot tell whether pages of this range are allocated ({}), and guest_memfd pages cannot migrate between nodes; \
             set the policy without migrate",
            e.desc()
        ),
        Migrate::RefuseAllocated(resident) => format!(
            "{resident} pages of this range are already allocated, and guest_memfd pages cannot migrate between nodes; \
             set the policy without migrate to govern only unallocated pages, or free the range (the VM must not use it) \
             or recreate the region and populate it again"
        ),
    };
    Err(AgentError::Unsupported {
        what: "guest_memfd migrate",
        message,
    })
}

#[cfg(test)]
mod policy_warning_tests {
    use super::policy_warning;
    use crate::domain::{Backend, NodeSet, Policy, PolicyMode, Strategy};
    use crate::kernel::probe::Features;

    fn features(exact: Option<bool>) -> Features {
        Features {
            kernel_release: "7.0.4-cloud-amd64".into(),
            guest_memfd_interleave_exact: exact,
            guest_memfd_interleave_note:
                "not probed: needs two NUMA nodes the agent may use, has 1".into(),
            ..Default::default()
        }
    }

    fn policy(mode: PolicyMode, nodes: &[u32]) -> Policy {
        Policy::new(
            mode,
            NodeSet::from_ids(nodes.iter().copied()).expect("nodes"),
        )
    }

    #[test]
    fn interleave_on_guest_memfd_warns_where_the_probe_found_it_inexact() {
        let il = policy(PolicyMode::Interleave, &[0, 1]);
        let w = policy_warning(
            Backend::GuestMemfd,
            Strategy::SharedPolicy,
            &il,
            &features(Some(false)),
        )
        .expect("a warning");
        assert!(
            w.contains("interleave on guest_memfd is not exact on kernel 7.0.4"),
            "{w}"
        );
        assert!(w.contains("applied as asked"), "{w}");
        let wil = policy(PolicyMode::WeightedInterleave, &[0, 1]);
        assert!(
            policy_warning(
                Backend::GuestMemfd,
                Strategy::SharedPolicy,
                &wil,
                &features(Some(false))
            )
            .is_some()
        );
        // Not known: still warned, with the probe's reason.
        let w = policy_warning(
            Backend::GuestMemfd,
            Strategy::SharedPolicy,
            &il,
            &features(None),
        )
        .expect("a warning");
        assert!(
            w.contains("could not be verified") && w.contains("needs two NUMA nodes"),
            "{w}"
        );
    }

    #[test]
    fn no_warning_where_interleave_is_exact_or_not_at_stake() {
        let il = policy(PolicyMode::Interleave, &[0, 1]);
        let inexact = features(Some(false));
        // Exact (7.2+).
        assert_eq!(
            policy_warning(
                Backend::GuestMemfd,
                Strategy::SharedPolicy,
                &il,
                &features(Some(true))
            ),
            None
        );
        // memfd interleaves by offset; task-policy placement is the agent's own allocation.
        assert_eq!(
            policy_warning(Backend::Memfd, Strategy::SharedPolicy, &il, &inexact),
            None
        );
        assert_eq!(
            policy_warning(Backend::GuestMemfd, Strategy::TaskPolicy, &il, &inexact),
            None
        );
        // Other modes, and interleave over one node.
        for p in [
            policy(PolicyMode::Bind, &[0, 1]),
            policy(PolicyMode::PreferredMany, &[0, 1]),
            policy(PolicyMode::Interleave, &[1]),
        ] {
            assert_eq!(
                policy_warning(Backend::GuestMemfd, Strategy::SharedPolicy, &p, &inexact),
                None,
                "{p}"
            );
        }
    }
}
