//! Idempotent mutations: a request that carries a `request_id` is answered once. A retry with the
//! same id and the same request gets the stored first answer; the same id with another request
//! is refused. The record is the engine's [`Idempotency`], made here from the handler's conversion
//! of the engine's outcome to its response ([`Record::answer`]): the engine encodes the outcome it
//! answers with and writes the record in the same transaction as the intent (so an acknowledged
//! answer is durable, and a replay answers with the engine's facts at that commit). It is read
//! here, before and (after a lost race) after the mutation runs.

use super::status_of;
use crate::engine::{Agent, AgentError, Idempotency};
use crate::store::RequestLookup;
use memplace_proto::v1 as pb;
use prost::Message;
use sha2::Digest;
use std::future::Future;
use tonic::Status;

/// Longest request_id accepted.
const MAX_REQUEST_ID: usize = 128;

/// A mutating request that may carry a request id.
pub(super) trait Keyed: Message + Clone {
    /// The RPC's name, as stored in the request record.
    const METHOD: &'static str;
    /// The crash test's kill point between the mutation's success and its reply, if any.
    const BEFORE_REPLY: Option<&'static str>;
    /// The request id ("" for none).
    fn request_id(&self) -> &str;
    /// The request without its id: what a retry must repeat.
    fn unkeyed(&self) -> Self;
    /// Whether `e` is how the engine reports that a concurrent call with the same request id
    /// committed first (so its stored answer applies).
    fn lost_race(e: &AgentError) -> bool;
}

macro_rules! keyed {
    ($req:ty, $method:literal, $before_reply:expr, $race:pat) => {
        impl Keyed for $req {
            const METHOD: &'static str = $method;
            const BEFORE_REPLY: Option<&'static str> = $before_reply;
            fn request_id(&self) -> &str {
                &self.request_id
            }
            fn unkeyed(&self) -> Self {
                Self {
                    request_id: String::new(),
                    ..self.clone()
                }
            }
            fn lost_race(e: &AgentError) -> bool {
                matches!(e, $race)
            }
        }
    };
}

// A concurrent create with the same id made the region; a concurrent delete removed it; the
// other two notice the committed record itself.
keyed!(
    pb::CreateRegionRequest,
    "CreateRegion",
    Some("CreateRegion.before-reply"),
    AgentError::AlreadyExists(_)
);
keyed!(
    pb::DeleteRegionRequest,
    "DeleteRegion",
    Some("DeleteRegion.before-reply"),
    AgentError::NotFound(_)
);
keyed!(
    pb::SetPolicyRequest,
    "SetPolicy",
    Some("SetPolicy.before-reply"),
    AgentError::DuplicateRequest(_)
);
keyed!(
    pb::AttachProcessRequest,
    "AttachProcess",
    None,
    AgentError::DuplicateRequest(_)
);

/// What the engine stores with a keyed mutation's intent.
pub(super) struct Record {
    /// The id.
    request_id: String,
    /// The RPC's name.
    method: &'static str,
    /// Digest of the request without its id.
    fingerprint: Vec<u8>,
}

impl Record {
    /// The engine's record, whose stored answer is `to_pb` of the engine's outcome: the same
    /// conversion the handler answers the first call with, so a replay answers with what the
    /// engine said at the commit.
    pub fn answer<O, Resp>(
        self,
        to_pb: impl Fn(&O) -> Resp + Send + Sync + 'static,
    ) -> Idempotency<O>
    where
        O: ?Sized,
        Resp: Message,
    {
        Idempotency {
            request_id: self.request_id,
            method: self.method,
            fingerprint: self.fingerprint,
            encode: Box::new(move |o| to_pb(o).encode_to_vec()),
        }
    }
}

/// Runs the mutation `op` on `req` at most once per request id, and answers as the first run
/// did. `op` gets the request and the record to store with its intent (None without a request
/// id); it runs on
/// its own task, so a client that cancels (or a deadline that fires) cannot stop it between its
/// durable commit and the kernel change that follows.
pub(super) async fn idempotent<Req, Resp, Fut>(
    agent: &Agent,
    req: Req,
    op: impl FnOnce(Req, Option<Record>) -> Fut,
) -> Result<Resp, Status>
where
    Req: Keyed,
    Resp: Message + Default + Send + 'static,
    Fut: Future<Output = Result<Resp, AgentError>> + Send + 'static,
{
    let request_id = req.request_id().to_string();
    check_request_id(&request_id)?;
    let print = fingerprint(Req::METHOD, &req.unkeyed());
    if let Some(first) = replay(agent, &request_id, Req::METHOD, &print).await? {
        return Ok(first);
    }
    let record = (!request_id.is_empty()).then(|| Record {
        request_id: request_id.clone(),
        method: Req::METHOD,
        fingerprint: print.clone(),
    });
    crate::failpoint::pause_before_take_on(&request_id).await;
    match run_to_completion(op(req, record)).await? {
        Ok(resp) => {
            if let Some(point) = Req::BEFORE_REPLY {
                crate::failpoint::hit(point, &request_id);
            }
            Ok(resp)
        }
        // A concurrent retry of the same request_id won the race: answer as it did.
        Err(e) if Req::lost_race(&e) => {
            match replay(agent, &request_id, Req::METHOD, &print).await? {
                Some(first) => Ok(first),
                None => Err(status_of(e)),
            }
        }
        Err(e) => Err(status_of(e)),
    }
}

/// Runs a mutation on its own task: once started, a mutation finishes, whether or not anyone
/// waits for the answer.
async fn run_to_completion<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work)
        .await
        .map_err(|e| Status::internal(format!("mutation task failed: {e}")))
}

fn check_request_id(id: &str) -> Result<(), Status> {
    if id.len() > MAX_REQUEST_ID || id.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(Status::invalid_argument(format!(
            "request_id must be at most {MAX_REQUEST_ID} printable ASCII characters"
        )));
    }
    Ok(())
}

/// The digest of a request without its request_id: what a retry must repeat.
fn fingerprint<M: Message>(method: &str, msg: &M) -> Vec<u8> {
    let mut h = sha2::Sha256::new();
    h.update(method.as_bytes());
    h.update(msg.encode_to_vec());
    h.finalize().to_vec()
}

/// The stored first answer to a request id, if any. A request id used for a different request is
/// an error.
async fn replay<R: Message + Default>(
    agent: &Agent,
    request_id: &str,
    method: &str,
    print: &[u8],
) -> Result<Option<R>, Status> {
    if request_id.is_empty() {
        return Ok(None);
    }
    let store = agent.store();
    let stored = match store
        .lookup_request(request_id)
        .await
        .map_err(|e| status_of(e.into()))?
    {
        RequestLookup::Unknown => return Ok(None),
        RequestLookup::Answered(stored) => stored,
        RequestLookup::Pruned => {
            let r = store.retention();
            return Err(status_of(AgentError::FailedPrecondition(format!(
                "request_id {request_id:?} was answered before, but its record has been pruned \
                 (records are kept {} s and at most {}): its answer is no longer known and the \
                 request was not run again; read the current state, and send a new request_id \
                 if the change is still wanted",
                r.record_max_age_secs, r.record_max_count
            ))));
        }
    };
    if stored.method != method || stored.fingerprint != print {
        return Err(status_of(AgentError::RequestIdReused(
            request_id.to_string(),
        )));
    }
    R::decode(stored.response.as_slice())
        .map(Some)
        .map_err(|e| {
            Status::internal(format!(
                "stored response for {request_id:?} is unreadable: {e}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Backend, Origin, RangeMap, RegionIntent, RegionKey, RegionStatus};
    use crate::engine::{RegionView, SetPolicyOutcome};
    use crate::store::WriteOp;

    /// What SetPolicy stores is its answer to the engine's outcome, warnings and all: the edge
    /// computes nothing of its own for a replay.
    #[test]
    fn a_set_policy_record_stores_the_outcome_with_its_warnings() {
        let record = Record {
            request_id: "set-1".into(),
            method: "SetPolicy",
            fingerprint: vec![1],
        };
        let idem = record.answer(super::super::set_policy_answer);
        let region = RegionView {
            intent: RegionIntent {
                key: RegionKey::parse("vm", "r").unwrap(),
                uid: "u".into(),
                backend: Backend::GuestMemfd,
                size_bytes: 1 << 20,
                hugepage_size_bytes: 0,
                generation: 7,
                strategy: crate::domain::Strategy::SharedPolicy,
                ranges: RangeMap::new(1 << 20),
                created_unix: 0,
                status: RegionStatus::Active,
                holder: None,
                file_id: None,
                origin: Origin::Agent,
                guest_cell: None,
            },
            ranges: vec![],
            page_size: 4096,
            observed_at_unix_ms: 0,
        };
        let outcome = SetPolicyOutcome {
            region,
            pages_migrated: 0,
            pages_migrate_failed: 0,
            warnings: vec!["interleave is not exact here".into()],
        };
        let WriteOp::SaveRequest {
            request_id,
            method,
            response,
            ..
        } = idem.save(&outcome)
        else {
            panic!("not a request record");
        };
        assert_eq!((request_id.as_str(), method), ("set-1", "SetPolicy"));
        let stored = pb::SetPolicyResponse::decode(response.as_slice()).unwrap();
        assert_eq!(stored, super::super::set_policy_answer(&outcome));
        assert_eq!(stored.warnings, outcome.warnings);
        assert_eq!(stored.region.unwrap().generation, 7);
    }
}
