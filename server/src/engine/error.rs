//! Failures of agent operations, and the one mapping from each to a status code
//! ([`AgentError::code`]) that both edges use: gRPC ([`ErrorCode::grpc`]) and the handoff socket
//! ([`ErrorCode::handoff`]) answer the same failure with the same code.

use crate::domain::{DomainError, RegionKey};
use crate::store::StoreError;
use memplace_proto::v1::HandoffCode;
use nix::errno::Errno;

/// Failures of agent operations. Each has one [`ErrorCode`], given by [`AgentError::code`].
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad caller input.
    #[error(transparent)]
    Invalid(#[from] DomainError),
    /// Bad caller input not covered by the domain rules.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such region.
    #[error("region {0} not found")]
    NotFound(RegionKey),
    /// No such process (AttachProcess).
    #[error("{0}")]
    ProcessNotFound(String),
    /// The region exists.
    #[error("region {0} already exists")]
    AlreadyExists(RegionKey),
    /// The region is lost: its file did not survive a restart of the agent.
    #[error("region {0} is lost: its file did not survive; delete and recreate it")]
    Lost(RegionKey),
    /// The region was released: its last holder exited and the agent gave its memory back.
    #[error(
        "region {0} was released: the last process holding its file exited and its memory was given back; delete it (and create or attach anew)"
    )]
    Released(RegionKey),
    /// The kernel or host cannot do what was asked (a policy mode, a backend, a migration).
    #[error("{message}")]
    Unsupported {
        /// What is not supported, in a few words ("policy mode", "guest_memfd", ...).
        what: &'static str,
        /// The whole message for the caller.
        message: String,
    },
    /// The request would take the agent over one of its limits (regions, ranges per region).
    #[error("{message}")]
    OverLimit {
        /// Which limit.
        limit: &'static str,
        /// Its value.
        max: u64,
        /// The whole message for the caller.
        message: String,
    },
    /// A request id was reused for another request.
    #[error("request_id {0:?} was already used for a different request")]
    RequestIdReused(String),
    /// The request id was committed by a concurrent call; its stored answer applies.
    #[error("request_id {0:?} was committed by a concurrent call")]
    DuplicateRequest(String),
    /// The host or region cannot do this now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this (a handoff peer's uid, a wrong handoff token).
    #[error("{0}")]
    PermissionDenied(String),
    /// expected_generation did not match.
    #[error("region {key} is at generation {actual}, not the expected {expected}")]
    GenerationConflict {
        /// The region.
        key: RegionKey,
        /// What the caller expected.
        expected: u64,
        /// What it is.
        actual: u64,
    },
    /// Not enough memory (or room in a cgroup) for the request.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A kernel call failed.
    #[error("{op} failed: {errno}")]
    Kernel {
        /// What was attempted.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The agent itself failed (kernel work on a blocking thread panicked or was cancelled).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::domain::PolicyError> for AgentError {
    fn from(e: crate::domain::PolicyError) -> Self {
        AgentError::Invalid(DomainError::Policy(e))
    }
}

/// The status code of a failure, the same on every edge. The names are gRPC's canonical codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Bad input.
    InvalidArgument,
    /// No such region or process.
    NotFound,
    /// The region exists, or a request id was reused.
    AlreadyExists,
    /// A concurrent change won (generation, request id): retry or read the stored answer.
    Aborted,
    /// Not in this state, or not on this host or kernel.
    FailedPrecondition,
    /// Out of memory or over a limit.
    ResourceExhausted,
    /// Cancelled by the caller.
    Cancelled,
    /// The kernel refused for lack of privilege.
    PermissionDenied,
    /// Busy now; try again.
    Unavailable,
    /// The kernel reported an I/O error.
    DataLoss,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    /// Every code, for tests that go over all of them.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::Aborted,
        ErrorCode::FailedPrecondition,
        ErrorCode::ResourceExhausted,
        ErrorCode::Cancelled,
        ErrorCode::PermissionDenied,
        ErrorCode::Unavailable,
        ErrorCode::DataLoss,
        ErrorCode::Internal,
    ];

    /// The gRPC status code.
    pub fn grpc(self) -> tonic::Code {
        use tonic::Code;
        match self {
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::Aborted => Code::Aborted,
            ErrorCode::FailedPrecondition => Code::FailedPrecondition,
            ErrorCode::ResourceExhausted => Code::ResourceExhausted,
            ErrorCode::Cancelled => Code::Cancelled,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::DataLoss => Code::DataLoss,
            ErrorCode::Internal => Code::Internal,
        }
    }

    /// The handoff socket's code.
    pub fn handoff(self) -> HandoffCode {
        match self {
            ErrorCode::InvalidArgument => HandoffCode::InvalidArgument,
            ErrorCode::NotFound => HandoffCode::NotFound,
            ErrorCode::AlreadyExists => HandoffCode::AlreadyExists,
            ErrorCode::Aborted => HandoffCode::Aborted,
            ErrorCode::FailedPrecondition => HandoffCode::FailedPrecondition,
            ErrorCode::ResourceExhausted => HandoffCode::ResourceExhausted,
            ErrorCode::Cancelled => HandoffCode::Cancelled,
            ErrorCode::PermissionDenied => HandoffCode::PermissionDenied,
            ErrorCode::Unavailable => HandoffCode::Unavailable,
            ErrorCode::DataLoss => HandoffCode::DataLoss,
            ErrorCode::Internal => HandoffCode::Internal,
        }
    }

    /// The code of a failed kernel call.
    pub fn of_errno(errno: Errno) -> Self {
        match errno {
            Errno::EINVAL | Errno::EFAULT | Errno::EOVERFLOW | Errno::EFBIG => {
                ErrorCode::InvalidArgument
            }
            Errno::ENOMEM | Errno::ENOSPC | Errno::EMFILE | Errno::ENFILE => {
                ErrorCode::ResourceExhausted
            }
            Errno::EPERM | Errno::EACCES => ErrorCode::PermissionDenied,
            Errno::ENOENT | Errno::ESRCH | Errno::ENODEV | Errno::ENXIO => {
                ErrorCode::FailedPrecondition
            }
            Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::ENOTTY => ErrorCode::FailedPrecondition,
            Errno::EBUSY | Errno::EAGAIN | Errno::EINTR => ErrorCode::Unavailable,
            Errno::EIO => ErrorCode::DataLoss,
            _ => ErrorCode::Internal,
        }
    }
}

impl AgentError {
    /// The error for a request that needs the file of a region that has none (lost or released).
    pub(crate) fn without_file(intent: &crate::domain::RegionIntent) -> Option<Self> {
        match intent.status {
            crate::domain::RegionStatus::Active => None,
            crate::domain::RegionStatus::Lost => Some(AgentError::Lost(intent.key.clone())),
            crate::domain::RegionStatus::Released => Some(AgentError::Released(intent.key.clone())),
        }
    }

    /// The one status code of this failure, used by the gRPC edge and the handoff socket alike.
    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::Invalid(_) | AgentError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            AgentError::NotFound(_) | AgentError::ProcessNotFound(_) => ErrorCode::NotFound,
            AgentError::AlreadyExists(_) | AgentError::RequestIdReused(_) => {
                ErrorCode::AlreadyExists
            }
            AgentError::DuplicateRequest(_) | AgentError::GenerationConflict { .. } => {
                ErrorCode::Aborted
            }
            AgentError::Lost(_)
            | AgentError::Released(_)
            | AgentError::Unsupported { .. }
            | AgentError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            AgentError::OverLimit { .. } | AgentError::ResourceExhausted(_) => {
                ErrorCode::ResourceExhausted
            }
            AgentError::Cancelled => ErrorCode::Cancelled,
            AgentError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            AgentError::Kernel { errno, .. } => ErrorCode::of_errno(*errno),
            AgentError::Store(s) => match s {
                StoreError::Locked | StoreError::WriterGone => ErrorCode::Unavailable,
                StoreError::Full => ErrorCode::ResourceExhausted,
                StoreError::Conflict => ErrorCode::AlreadyExists,
                _ => ErrorCode::Internal,
            },
            AgentError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Maps a failed kernel call to [`AgentError::Kernel`].
pub(crate) fn kerr(op: &'static str) -> impl FnOnce(Errno) -> AgentError {
    move |errno| AgentError::Kernel { op, errno }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RegionKey {
        RegionKey::parse("vm", "r").unwrap()
    }

    /// One of every variant (and every store failure and errno class), with the code it must get.
    fn cases() -> Vec<(AgentError, ErrorCode)> {
        use ErrorCode as C;
        let k = |errno| AgentError::Kernel { op: "x", errno };
        vec![
            (
                AgentError::Invalid(DomainError::BadSize { size: 0, max: 1 }),
                C::InvalidArgument,
            ),
            (AgentError::InvalidArgument("x".into()), C::InvalidArgument),
            (AgentError::NotFound(key()), C::NotFound),
            (AgentError::ProcessNotFound("x".into()), C::NotFound),
            (AgentError::AlreadyExists(key()), C::AlreadyExists),
            (AgentError::Lost(key()), C::FailedPrecondition),
            (
                AgentError::Unsupported {
                    what: "policy mode",
                    message: "x".into(),
                },
                C::FailedPrecondition,
            ),
            (
                AgentError::OverLimit {
                    limit: "regions",
                    max: 1,
                    message: "x".into(),
                },
                C::ResourceExhausted,
            ),
            (AgentError::RequestIdReused("r".into()), C::AlreadyExists),
            (AgentError::DuplicateRequest("r".into()), C::Aborted),
            (
                AgentError::FailedPrecondition("x".into()),
                C::FailedPrecondition,
            ),
            (
                AgentError::GenerationConflict {
                    key: key(),
                    expected: 1,
                    actual: 2,
                },
                C::Aborted,
            ),
            (
                AgentError::ResourceExhausted("x".into()),
                C::ResourceExhausted,
            ),
            (k(Errno::EINVAL), C::InvalidArgument),
            (k(Errno::ENOMEM), C::ResourceExhausted),
            (k(Errno::ENOSPC), C::ResourceExhausted),
            (k(Errno::EPERM), C::PermissionDenied),
            (k(Errno::ENODEV), C::FailedPrecondition),
            (k(Errno::EOPNOTSUPP), C::FailedPrecondition),
            (k(Errno::EBUSY), C::Unavailable),
            (k(Errno::EIO), C::DataLoss),
            (k(Errno::E2BIG), C::Internal),
            (AgentError::Store(StoreError::Locked), C::Unavailable),
            (AgentError::Store(StoreError::WriterGone), C::Unavailable),
            (AgentError::Store(StoreError::Full), C::ResourceExhausted),
            (AgentError::Store(StoreError::Conflict), C::AlreadyExists),
            (AgentError::Cancelled, C::Cancelled),
            (
                AgentError::PermissionDenied("x".into()),
                C::PermissionDenied,
            ),
            (AgentError::Internal("x".into()), C::Internal),
        ]
    }

    /// Every variant has its code, and the gRPC edge and the handoff socket answer it with the
    /// same code (by name: the handoff enum spells gRPC's names with a HANDOFF_CODE_ prefix).
    #[test]
    fn both_edges_give_every_failure_the_same_code() {
        for (e, want) in cases() {
            assert_eq!(e.code(), want, "{e:?}");
        }
        for c in ErrorCode::ALL {
            let grpc = format!("{:?}", c.grpc());
            let handoff = c.handoff().as_str_name();
            let grpc_snake: String = grpc
                .chars()
                .enumerate()
                .flat_map(|(i, ch)| {
                    let sep = (i > 0 && ch.is_ascii_uppercase()).then_some('_');
                    sep.into_iter()
                        .chain(std::iter::once(ch.to_ascii_uppercase()))
                })
                .collect();
            assert_eq!(handoff, format!("HANDOFF_CODE_{grpc_snake}"), "{c:?}");
        }
        // The two edges' own functions delegate to the one mapping.
        for (e, want) in cases() {
            let msg = e.to_string();
            let refusal = crate::handoff::refusal(&e);
            assert_eq!(refusal.code, want.handoff() as i32, "{e:?}");
            assert_eq!(refusal.message, msg);
            let status = crate::api::status_of(e);
            assert_eq!(status.code(), want.grpc(), "{msg}");
            assert_eq!(status.message(), msg);
        }
    }
}
