//! The Rust client of memplace: a typed [`Client`] for the gRPC API over a Unix socket, plain
//! TCP or mTLS ([`Client::connect_unix`], [`Client::connect_tcp`], [`Client::connect_tls`]),
//! node lists in numactl syntax ([`nodes`], [`policy`], [`parse_mode`]), and the VMM side of the
//! handoff socket ([`handoff::Handoff`]: acquire, adopt, attach a VM).
//!
//! Mutations carry a `request_id`. The convenience calls make a fresh one and keep it across
//! their own retries (on UNAVAILABLE), so a retry after a lost answer returns the first answer
//! and changes nothing; the `*_with` calls take a request you built, for ids you keep yourself.
//!
//! An orchestrator's flow — create, bind, populate, verify, hand to the VMM — is in
//! `client/examples/orchestrator.rs`. In short:
//!
//! ```no_run
//! # async fn demo() -> Result<(), memplace_client::ClientError> {
//! use memplace_client::{Client, pb};
//! let mut c = Client::connect_unix("/run/memplace/memplace.sock").await?;
//! let created = c
//!     .create_region("vm1", "ram0", 1 << 30, pb::Backend::Memfd, vec![])
//!     .await?;
//! let policy = memplace_client::policy(pb::PolicyMode::Bind, "0")?;
//! c.set_policy("vm1", "ram0", 0, 0, policy, false).await?;
//! let req = pb::PopulateRequest { vm_id: "vm1".into(), name: "ram0".into(), ..Default::default() };
//! let summary = c.populate(req, |done, total| eprintln!("{done}/{total}")).await?;
//! let placement = c.placement("vm1", "ram0", 0, 0).await?;
//! assert_eq!(placement.pages_misplaced, 0);
//! // The VMM acquires the fd with the VM's token (see `handoff`).
//! let token = created.handoff_token;
//! # let _ = (summary, token);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod handoff;

use backon::{ExponentialBuilder, Retryable};
pub use memplace_proto::v1 as pb;
use pb::node_agent_service_client::NodeAgentServiceClient;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Default Unix socket of the agent.
pub const DEFAULT_SOCKET: &str = "/run/memplace/memplace.sock";

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect.
    #[error("connecting to {target}: {source}")]
    Connect {
        /// Socket or address.
        target: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The agent answered with an error status.
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
    /// Bad local input.
    #[error("{0}")]
    Invalid(String),
    /// A handoff socket failure.
    #[error("handoff: {0}")]
    Handoff(String),
}

impl ClientError {
    /// The gRPC code, if the agent answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// Node sets in the numactl list syntax (`0-3,5`).
pub mod nodes {
    use super::ClientError;
    use memplace_sys::policy::NodeSet;

    /// Parses `0-3,5` into sorted node ids.
    ///
    /// ```
    /// assert_eq!(memplace_client::nodes::parse("0-2,5").unwrap(), vec![0, 1, 2, 5]);
    /// assert!(memplace_client::nodes::parse("3-1").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Vec<u32>, ClientError> {
        NodeSet::parse_list(text)
            .map(|s| s.iter().collect())
            .map_err(|e| ClientError::Invalid(e.to_string()))
    }

    /// Formats node ids as `0-3,5`.
    ///
    /// ```
    /// assert_eq!(memplace_client::nodes::format(&[5, 0, 1, 2]), "0-2,5");
    /// ```
    pub fn format(ids: &[u32]) -> String {
        NodeSet::from_ids(ids.iter().copied())
            .map(|s| s.to_string())
            .unwrap_or_else(|_| format!("{ids:?}"))
    }
}

/// A policy from a mode and a node list in numactl syntax.
///
/// ```
/// use memplace_client::pb;
/// let p = memplace_client::policy(pb::PolicyMode::Interleave, "0-1").unwrap();
/// assert_eq!((p.mode(), p.nodes), (pb::PolicyMode::Interleave, vec![0, 1]));
/// ```
pub fn policy(mode: pb::PolicyMode, nodes: &str) -> Result<pb::Policy, ClientError> {
    Ok(pb::Policy {
        mode: mode as i32,
        nodes: nodes::parse(nodes)?,
        static_nodes: false,
        relative_nodes: false,
    })
}

/// Parses a mode name: `bind`, `preferred`, `interleave`, `preferred-many`,
/// `weighted-interleave`, `local`, `default` (`_` and `-` are the same).
///
/// ```
/// use memplace_client::{parse_mode, pb};
/// assert_eq!(parse_mode("preferred_many").unwrap(), pb::PolicyMode::PreferredMany);
/// assert!(parse_mode("scatter").is_err());
/// ```
pub fn parse_mode(name: &str) -> Result<pb::PolicyMode, ClientError> {
    let n = name.to_ascii_lowercase().replace('_', "-");
    Ok(match n.as_str() {
        "default" => pb::PolicyMode::Default,
        "bind" => pb::PolicyMode::Bind,
        "preferred" => pb::PolicyMode::Preferred,
        "interleave" => pb::PolicyMode::Interleave,
        "preferred-many" => pb::PolicyMode::PreferredMany,
        "weighted-interleave" => pb::PolicyMode::WeightedInterleave,
        "local" => pb::PolicyMode::Local,
        _ => {
            return Err(ClientError::Invalid(format!(
                "unknown policy mode {name:?}: use default, bind, preferred, interleave, preferred-many, weighted-interleave or local"
            )));
        }
    })
}

/// A fresh request id for an idempotent mutation.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// PEM files for [`Client::connect_tls`].
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// The CA that signed the agent's certificate.
    pub ca: PathBuf,
    /// This client's certificate.
    pub cert: PathBuf,
    /// This client's private key.
    pub key: PathBuf,
    /// The name to expect in the agent's certificate, when it differs from the address's host.
    pub domain: Option<String>,
}

/// A connected client.
#[derive(Clone, Debug)]
pub struct Client {
    inner: NodeAgentServiceClient<Channel>,
    channel: Channel,
    /// How many times an idempotent mutation is retried on UNAVAILABLE, with the same request id.
    pub retries: u32,
}

impl Client {
    /// Connects to the agent's Unix socket.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path: PathBuf = path.as_ref().to_path_buf();
        let target = path.display().to_string();
        // The URI is required by the API but unused: the connector dials the socket.
        let channel = Endpoint::try_from("http://localhost")
            .map_err(|e| ClientError::Connect {
                target: target.clone(),
                source: e,
            })?
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .map_err(|e| ClientError::Connect { target, source: e })?;
        Ok(Self::from_channel(channel))
    }

    /// Connects to a plain TCP address such as `http://127.0.0.1:7443` (an agent started with
    /// `insecure_tcp`); see [`Client::connect_tls`] for mTLS.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), memplace_client::ClientError> {
    /// let mut c = memplace_client::Client::connect_tcp("http://127.0.0.1:7443").await?;
    /// println!("{} nodes", c.node_info().await?.nodes.len());
    /// # Ok(()) }
    /// ```
    pub async fn connect_tcp(addr: &str) -> Result<Self, ClientError> {
        let channel = Endpoint::from_shared(addr.to_string())
            .map_err(|e| ClientError::Connect {
                target: addr.into(),
                source: e,
            })?
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                target: addr.into(),
                source: e,
            })?;
        Ok(Self::from_channel(channel))
    }

    /// Connects to the agent's mTLS TCP listener: `addr` is `https://host:port`, `tls` names the
    /// CA that signed the agent's certificate and this client's certificate and key, whose
    /// name the agent maps to a role.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), memplace_client::ClientError> {
    /// use memplace_client::{Client, TlsFiles};
    /// let tls = TlsFiles {
    ///     ca: "/etc/memplace/ca.pem".into(),
    ///     cert: "/etc/memplace/orchestrator.pem".into(),
    ///     key: "/etc/memplace/orchestrator-key.pem".into(),
    ///     domain: Some("localhost".into()),
    /// };
    /// let mut c = Client::connect_tls("https://10.0.0.5:7443", &tls).await?;
    /// # let _ = c.node_info().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_tls(addr: &str, tls: &TlsFiles) -> Result<Self, ClientError> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read = |p: &Path| {
            std::fs::read(p)
                .map_err(|e| ClientError::Invalid(format!("reading {}: {e}", p.display())))
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
            .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
        if let Some(d) = &tls.domain {
            config = config.domain_name(d.clone());
        }
        let err = |e| ClientError::Connect {
            target: addr.into(),
            source: e,
        };
        let channel = Endpoint::from_shared(addr.to_string())
            .map_err(err)?
            .tls_config(config)
            .map_err(err)?
            .connect()
            .await
            .map_err(err)?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps a channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: NodeAgentServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            channel,
            retries: 3,
        }
    }

    /// The generated client, for calls this wrapper does not cover.
    pub fn raw(&mut self) -> &mut NodeAgentServiceClient<Channel> {
        &mut self.inner
    }

    /// The channel, e.g. for the health service.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Retries `f` on UNAVAILABLE (the agent restarting, or shedding load) with backoff; `f`
    /// sends the same request, with the same request id, each time.
    async fn retrying<T, F, Fut>(&mut self, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut(NodeAgentServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        // Exponential from 100 ms, with jitter so clients shed together do not come back
        // together.
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_times(self.retries as usize)
            .with_jitter();
        let inner = self.inner.clone();
        (|| f(inner.clone()))
            .retry(backoff)
            .when(|s: &tonic::Status| s.code() == tonic::Code::Unavailable)
            .await
            .map(tonic::Response::into_inner)
            .map_err(Into::into)
    }

    /// GetNodeInfo.
    pub async fn node_info(&mut self) -> Result<pb::GetNodeInfoResponse, ClientError> {
        self.retrying(|mut c| async move { c.get_node_info(pb::GetNodeInfoRequest {}).await })
            .await
    }

    /// CreateRegion with a fresh request id, retried safely.
    pub async fn create_region(
        &mut self,
        vm_id: &str,
        name: &str,
        size_bytes: u64,
        backend: pb::Backend,
        policies: Vec<pb::RangePolicy>,
    ) -> Result<pb::CreateRegionResponse, ClientError> {
        let req = pb::CreateRegionRequest {
            vm_id: vm_id.into(),
            name: name.into(),
            size_bytes,
            backend: backend as i32,
            hugepage_size_bytes: 0,
            policies,
            request_id: new_request_id(),
        };
        self.create_region_with(req).await
    }

    /// CreateRegion with a caller-built request (keep its request_id across retries).
    pub async fn create_region_with(
        &mut self,
        req: pb::CreateRegionRequest,
    ) -> Result<pb::CreateRegionResponse, ClientError> {
        self.retrying(|mut c| {
            let r = req.clone();
            async move { c.create_region(r).await }
        })
        .await
    }

    /// GetRegion.
    pub async fn get_region(&mut self, vm_id: &str, name: &str) -> Result<pb::Region, ClientError> {
        self.get_region_with(vm_id, name, false).await
    }

    /// GetRegion; with `fresh`, the agent reads every range's policy from the kernel now instead
    /// of answering from its last check (`observed_at_unix_ms` says when that was).
    pub async fn get_region_with(
        &mut self,
        vm_id: &str,
        name: &str,
        fresh: bool,
    ) -> Result<pb::Region, ClientError> {
        let req = pb::GetRegionRequest {
            vm_id: vm_id.into(),
            name: name.into(),
            fresh,
        };
        let r = self
            .retrying(|mut c| {
                let r = req.clone();
                async move { c.get_region(r).await }
            })
            .await?;
        r.region
            .ok_or_else(|| ClientError::Invalid("agent returned no region".into()))
    }

    /// ListRegions: every region (of one VM, or all for ""), in order, following the agent's
    /// pages of its default size to the end.
    pub async fn list_regions(&mut self, vm_id: &str) -> Result<Vec<pb::Region>, ClientError> {
        Ok(self.list_regions_paged(vm_id, 0).await?.0)
    }

    /// ListRegions in pages of `page_size` regions (0: the agent's default): every region, in
    /// order, and the number of pages it took. Each page is retried on UNAVAILABLE; a region
    /// created or deleted meanwhile may or may not be listed, every other one is listed once.
    pub async fn list_regions_paged(
        &mut self,
        vm_id: &str,
        page_size: i32,
    ) -> Result<(Vec<pb::Region>, usize), ClientError> {
        let mut out = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            pages += 1;
            let req = pb::ListRegionsRequest {
                vm_id: vm_id.into(),
                page_size,
                page_token: std::mem::take(&mut token),
            };
            let sent = req.page_token.clone();
            let page = self
                .retrying(|mut c| {
                    let r = req.clone();
                    async move { c.list_regions(r).await }
                })
                .await?;
            out.extend(page.regions);
            if page.next_page_token.is_empty() {
                return Ok((out, pages));
            }
            if page.next_page_token == sent {
                return Err(ClientError::Invalid(format!(
                    "ListRegions answered page token {sent:?} with the same token: the listing would not end"
                )));
            }
            token = page.next_page_token;
        }
    }

    /// DeleteRegion with a fresh request id, retried safely.
    pub async fn delete_region(
        &mut self,
        vm_id: &str,
        name: &str,
    ) -> Result<pb::Region, ClientError> {
        self.delete_region_with(pb::DeleteRegionRequest {
            vm_id: vm_id.into(),
            name: name.into(),
            request_id: new_request_id(),
        })
        .await
    }

    /// DeleteRegion with a caller-built request (keep its request_id across retries).
    pub async fn delete_region_with(
        &mut self,
        req: pb::DeleteRegionRequest,
    ) -> Result<pb::Region, ClientError> {
        let r = self
            .retrying(|mut c| {
                let r = req.clone();
                async move { c.delete_region(r).await }
            })
            .await?;
        r.region
            .ok_or_else(|| ClientError::Invalid("agent returned no region".into()))
    }

    /// SetPolicy with a fresh request id, retried safely.
    pub async fn set_policy(
        &mut self,
        vm_id: &str,
        name: &str,
        offset: u64,
        length: u64,
        policy: pb::Policy,
        migrate: bool,
    ) -> Result<pb::SetPolicyResponse, ClientError> {
        self.set_policy_with(pb::SetPolicyRequest {
            vm_id: vm_id.into(),
            name: name.into(),
            offset,
            length,
            policy: Some(policy),
            migrate,
            expected_generation: 0,
            request_id: new_request_id(),
        })
        .await
    }

    /// SetPolicy with a caller-built request.
    pub async fn set_policy_with(
        &mut self,
        req: pb::SetPolicyRequest,
    ) -> Result<pb::SetPolicyResponse, ClientError> {
        self.retrying(|mut c| {
            let r = req.clone();
            async move { c.set_policy(r).await }
        })
        .await
    }

    /// Populate, calling `progress(done, total)` on each progress message; returns the summary.
    pub async fn populate(
        &mut self,
        req: pb::PopulateRequest,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<pb::PopulateSummary, ClientError> {
        use pb::populate_response::Event;
        let mut stream = self.inner.populate(req).await?.into_inner();
        while let Some(msg) = stream.message().await? {
            match msg.event {
                Some(Event::Progress(p)) => progress(p.bytes_done, p.bytes_total),
                Some(Event::Summary(s)) => {
                    // Read to the end of the stream, so the call ends with its status (OK)
                    // rather than a cancellation.
                    while stream.message().await?.is_some() {}
                    return Ok(s);
                }
                None => {}
            }
        }
        Err(ClientError::Invalid(
            "populate stream ended without a summary".into(),
        ))
    }

    /// GetPlacement.
    pub async fn placement(
        &mut self,
        vm_id: &str,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<pb::GetPlacementResponse, ClientError> {
        let req = pb::GetPlacementRequest {
            vm_id: vm_id.into(),
            name: name.into(),
            offset,
            length,
        };
        self.retrying(|mut c| {
            let r = req.clone();
            async move { c.get_placement(r).await }
        })
        .await
    }

    /// Reconcile.
    pub async fn reconcile(&mut self, vm_id: &str) -> Result<pb::ReconcileResponse, ClientError> {
        let req = pb::ReconcileRequest {
            vm_id: vm_id.into(),
        };
        self.retrying(|mut c| {
            let r = req.clone();
            async move { c.reconcile(r).await }
        })
        .await
    }

    /// IssueHandoffToken: the VM's handoff token, for a VMM that adopts its own files before
    /// any region of the VM exists.
    pub async fn issue_handoff_token(&mut self, vm_id: &str) -> Result<String, ClientError> {
        let req = pb::IssueHandoffTokenRequest {
            vm_id: vm_id.into(),
        };
        Ok(self
            .retrying(|mut c| {
                let r = req.clone();
                async move { c.issue_handoff_token(r).await }
            })
            .await?
            .handoff_token)
    }

    /// AttachProcess with a fresh request id, retried safely: every memfd and guest_memfd of a
    /// running VMM becomes a region of `vm_id`, held by that process.
    pub async fn attach_process(
        &mut self,
        vm_id: &str,
        pid: i32,
    ) -> Result<pb::AttachProcessResponse, ClientError> {
        let req = pb::AttachProcessRequest {
            vm_id: vm_id.into(),
            pid,
            request_id: new_request_id(),
        };
        self.retrying(|mut c| {
            let r = req.clone();
            async move { c.attach_process(r).await }
        })
        .await
    }

    /// WatchEvents as a stream.
    pub async fn watch_events(
        &mut self,
        req: pb::WatchEventsRequest,
    ) -> Result<tonic::Streaming<pb::WatchEventsResponse>, ClientError> {
        Ok(self.inner.watch_events(req).await?.into_inner())
    }
}
