//! Who may act. On the Unix socket the caller's SO_PEERCRED uid maps to a role: admins may
//! mutate, viewers may only read, anyone else is refused. The caller's identity rides on as a
//! request extension, so every mutation's event and log line names it.

use crate::api::Caller;
use crate::metrics::Metrics;
use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
use tower::{Layer, Service};

/// A caller's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// May call everything.
    Admin,
    /// May call read-only methods.
    Viewer,
}

/// Role assignment.
#[derive(Clone, Debug, Default)]
pub struct Roles {
    /// Admin uids.
    pub admin_uids: HashSet<u32>,
    /// Viewer uids.
    pub viewer_uids: HashSet<u32>,
    /// Admin gids (checked when the uid has no role).
    pub admin_gids: HashSet<u32>,
    /// Viewer gids.
    pub viewer_gids: HashSet<u32>,
    /// TCP: certificate identities (SAN or CN) with admin.
    pub admin_names: HashSet<String>,
    /// TCP: certificate identities with viewer.
    pub viewer_names: HashSet<String>,
    /// TCP without TLS was allowed explicitly: its callers are admins.
    pub insecure_tcp_admin: bool,
}

/// Methods a viewer may call: they read and never change state.
const READ_ONLY: &[&str] = &[
    "/memplace.v1.NodeAgentService/GetNodeInfo",
    "/memplace.v1.NodeAgentService/GetRegion",
    "/memplace.v1.NodeAgentService/ListRegions",
    "/memplace.v1.NodeAgentService/GetPlacement",
    "/memplace.v1.NodeAgentService/WatchEvents",
];

/// Paths anyone allowed to connect may call (health and reflection carry no VM data).
fn is_public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

impl Roles {
    /// The role of a uid.
    pub fn of_uid(&self, uid: u32) -> Option<Role> {
        if self.admin_uids.contains(&uid) {
            Some(Role::Admin)
        } else if self.viewer_uids.contains(&uid) {
            Some(Role::Viewer)
        } else {
            None
        }
    }

    /// The role of a primary gid (used only when the uid itself has no role).
    pub fn of_gid(&self, gid: u32) -> Option<Role> {
        if self.admin_gids.contains(&gid) {
            Some(Role::Admin)
        } else if self.viewer_gids.contains(&gid) {
            Some(Role::Viewer)
        } else {
            None
        }
    }

    /// The role of a certificate identity.
    pub fn of_name(&self, name: &str) -> Option<Role> {
        if self.admin_names.contains(name) {
            Some(Role::Admin)
        } else if self.viewer_names.contains(name) {
            Some(Role::Viewer)
        } else {
            None
        }
    }
}

/// Decides whether `role` may call `path`.
pub fn allowed(role: Option<Role>, path: &str) -> bool {
    match role {
        Some(Role::Admin) => true,
        Some(Role::Viewer) => READ_ONLY.contains(&path) || is_public(path),
        None => false,
    }
}

/// The tower layer that enforces roles. It sits outermost so a refused caller costs nothing
/// further: no timeout slot, no concurrency permit, no decoding.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    roles: Arc<Roles>,
    metrics: Arc<Metrics>,
}

impl AuthLayer {
    /// Enforces `roles`; refusals are counted in `metrics`.
    pub fn new(roles: Roles, metrics: Arc<Metrics>) -> Self {
        Self {
            roles: Arc::new(roles),
            metrics,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            roles: self.roles.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    roles: Arc<Roles>,
    metrics: Arc<Metrics>,
}

impl<S: NamedService> NamedService for Auth<S> {
    const NAME: &'static str = S::NAME;
}

/// The identity and role of a request's peer. Unix socket: its SO_PEERCRED uid, then its gid.
/// TCP with mTLS: the client certificate's names (SAN entries, then CN); the handshake already
/// proved the certificate chains to `tls_client_ca`. TCP without TLS: admin only when
/// `insecure_tcp` was set explicitly.
fn identify<B>(roles: &Roles, req: &http::Request<B>) -> (String, Option<Role>) {
    if let Some(info) = req.extensions().get::<UdsConnectInfo>() {
        return match info.peer_cred {
            Some(c) => {
                let role = roles.of_uid(c.uid()).or_else(|| roles.of_gid(c.gid()));
                (format!("uid:{}", c.uid()), role)
            }
            None => ("uid:unknown".into(), None),
        };
    }
    if let Some(info) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
        let names = info
            .peer_certs()
            .and_then(|certs| certs.first().map(|leaf| crate::tls::peer_names(leaf)))
            .unwrap_or_default();
        // The strongest role any of the certificate's names holds; the audit names that name.
        for want in [Role::Admin, Role::Viewer] {
            if let Some(n) = names.iter().find(|n| roles.of_name(n) == Some(want)) {
                return (format!("cert:{n}"), Some(want));
            }
        }
        let who = names
            .first()
            .map_or("cert:unnamed".to_string(), |n| format!("cert:{n}"));
        return (who, None);
    }
    if roles.insecure_tcp_admin
        && let Some(info) = req.extensions().get::<TcpConnectInfo>()
    {
        let peer = info
            .remote_addr()
            .map_or("unknown".to_string(), |a| a.to_string());
        return (format!("tcp:{peer}"), Some(Role::Admin));
    }
    ("unknown".into(), None)
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let (who, role) = identify(&self.roles, &req);
        let path = req.uri().path().to_string();
        if !allowed(role, &path) {
            let msg = match role {
                None => format!(
                    "{who} may not use this agent: it has no role (configure admin_uids/viewer_uids/admin_gids/viewer_gids, or admin_names/viewer_names for certificates)"
                ),
                Some(_) => format!("{who} has the viewer role, which may not call {path}"),
            };
            self.metrics.count_denied();
            return Box::pin(async move { Ok(tonic::Status::permission_denied(msg).into_http()) });
        }
        req.extensions_mut().insert(Caller(who));
        let mut inner = self.inner.clone();
        std::mem::swap(&mut inner, &mut self.inner);
        Box::pin(async move { inner.call(req).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_only_read() {
        let r = Roles {
            admin_uids: [0].into(),
            viewer_uids: [1000].into(),
            ..Default::default()
        };
        let set = "/memplace.v1.NodeAgentService/SetPolicy";
        let get = "/memplace.v1.NodeAgentService/GetRegion";
        assert!(allowed(r.of_uid(0), set));
        assert!(!allowed(r.of_uid(1000), set));
        assert!(allowed(r.of_uid(1000), get));
        assert!(!allowed(r.of_uid(1001), get));
        assert!(allowed(r.of_uid(1000), "/grpc.health.v1.Health/Check"));
        assert!(!allowed(None, "/grpc.health.v1.Health/Check"));
    }
}
