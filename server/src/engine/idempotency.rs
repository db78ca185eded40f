//! The one idempotency record of a keyed mutation (CreateRegion, DeleteRegion, SetPolicy,
//! AttachProcess): the request id, the method, a digest of the request, and how to encode the
//! first answer from the engine's outcome. The engine commits the record in the same transaction
//! as the mutation's intent, encoding the outcome it is about to answer with, so a replay answers
//! with the engine's facts as they were at that commit (generation, warnings), whatever changed
//! since.

use super::error::AgentError;
use crate::store::{StoreError, WriteOp};

/// Encodes the first answer to a request from the engine's outcome `O` (a region, a SetPolicy
/// outcome, the regions an attach took over).
pub type EncodeAnswer<O> = Box<dyn Fn(&O) -> Vec<u8> + Send + Sync>;

/// An idempotency record to commit with a mutation whose outcome is an `O`.
pub struct Idempotency<O: ?Sized> {
    /// The id.
    pub request_id: String,
    /// The RPC's name.
    pub method: &'static str,
    /// Digest of the request without its id.
    pub fingerprint: Vec<u8>,
    /// Encodes the answer from the outcome.
    pub encode: EncodeAnswer<O>,
}

impl<O: ?Sized> Idempotency<O> {
    /// The write that stores this record with `outcome` as the first answer.
    pub(crate) fn save(&self, outcome: &O) -> WriteOp {
        WriteOp::SaveRequest {
            request_id: self.request_id.clone(),
            method: self.method,
            fingerprint: self.fingerprint.clone(),
            response: (self.encode)(outcome),
        }
    }
}

/// What a commit with the record `idem` failed with: with a record, a store conflict means that a
/// concurrent call with the same request id committed first (its stored answer applies).
pub(crate) fn committed_first<O: ?Sized>(
    idem: Option<&Idempotency<O>>,
) -> impl FnOnce(AgentError) -> AgentError + '_ {
    move |e| match (idem, e) {
        (Some(i), AgentError::Store(StoreError::Conflict)) => {
            AgentError::DuplicateRequest(i.request_id.clone())
        }
        (_, e) => e,
    }
}

/// The request id of an optional record ("" for none), for failpoints and logs.
pub(crate) fn request_id<O: ?Sized>(idem: Option<&Idempotency<O>>) -> &str {
    idem.map_or("", |i| i.request_id.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Idempotency<[u64]> {
        Idempotency {
            request_id: "r-1".into(),
            method: "M",
            fingerprint: vec![1, 2],
            encode: Box::new(|o: &[u64]| o.iter().map(|v| *v as u8).collect()),
        }
    }

    /// The stored answer is the outcome, encoded; the id, method and digest are the record's.
    #[test]
    fn saves_the_outcome_as_the_answer() {
        match record().save(&[7, 9]) {
            WriteOp::SaveRequest {
                request_id,
                method,
                fingerprint,
                response,
            } => {
                assert_eq!(
                    (request_id.as_str(), method, fingerprint, response),
                    ("r-1", "M", vec![1, 2], vec![7, 9])
                );
            }
            _ => panic!("not a request record"),
        }
    }

    /// A conflict is the concurrent duplicate; any other failure stays what it was.
    #[test]
    fn a_conflict_is_a_duplicate_request() {
        let r = record();
        assert!(matches!(
            committed_first(Some(&r))(AgentError::Store(StoreError::Conflict)),
            AgentError::DuplicateRequest(id) if id == "r-1"
        ));
        assert!(matches!(
            committed_first(Some(&r))(AgentError::Cancelled),
            AgentError::Cancelled
        ));
        assert!(matches!(
            committed_first::<[u64]>(None)(AgentError::Store(StoreError::Conflict)),
            AgentError::Store(StoreError::Conflict)
        ));
        assert_eq!(request_id(Some(&r)), "r-1");
        assert_eq!(request_id::<[u64]>(None), "");
    }
}
