//! Wiring and startup order: configuration is parsed and checked before anything binds; then the
//! state database is opened and checked, the kernel probed, regions recovered, and only then do
//! the sockets open. Shutdown is one signal that every listener watches.

use crate::api::NodeAgent;
use crate::auth::{AuthLayer, Roles};
use crate::config::{Config, Flags};
use crate::kernel;
use crate::reconcile::{Agent, Limits};
use crate::store::Store;
use crate::topology::TopologyReader;
use clap::Parser;
use memplace_proto::v1::node_agent_service_server::NodeAgentServiceServer;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Startup failures. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A directory could not be made.
    #[error("creating {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    /// The database.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Recovery.
    #[error("recovering regions: {0}")]
    Agent(#[from] crate::reconcile::AgentError),
    /// TLS files.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A listener could not bind.
    #[error("binding {0}: {1}")]
    Bind(String, std::io::Error),
    /// The gRPC server failed.
    #[error("serving gRPC: {0}")]
    Serve(String),
}

/// The entry point of `memplaced`.
pub fn main() -> ExitCode {
    // Files the agent creates (database, sockets before chmod) are private unless made otherwise.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let flags = Flags::parse();
    let cfg = match Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("memplaced: {e}");
            return ExitCode::from(2);
        }
    };
    // Test builds only (feature `failpoints`): the crash test's kill points (checked by
    // --check-config too).
    if let Err(e) = crate::failpoint::arm() {
        eprintln!("memplaced: {e}");
        return ExitCode::from(2);
    }
    if flags.print_config {
        print!("{}", cfg.to_toml());
        return ExitCode::SUCCESS;
    }
    if flags.check_config {
        println!("memplaced: configuration is valid");
        return ExitCode::SUCCESS;
    }
    init_logging(&cfg);
    // Before the runtime starts any thread: capabilities are per thread and inherited.
    drop_capabilities(&cfg);
    // Also before any thread: each thread (blocking ones come and go) would otherwise get its own
    // malloc arena, and what recovery frees would stay in them (BENCHMARKS.md, P6).
    crate::kernel::limit_malloc_arenas(2);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("memplaced: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("memplaced: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn make_dir(path: &Path, mode: u32) -> Result<(), AppError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).map_err(|e| AppError::Dir(path.to_path_buf(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| AppError::Dir(path.to_path_buf(), e))
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    // TLS material is read before anything is created or bound, so a bad file stops the start.
    let tls = match (
        &cfg.listen_tcp,
        &cfg.tls_cert,
        &cfg.tls_key,
        &cfg.tls_client_ca,
    ) {
        (Some(_), Some(cert), Some(key), Some(ca)) => {
            Some(crate::tls::server_config(cert, key, ca)?)
        }
        _ => None,
    };
    make_dir(&cfg.state_dir, 0o700)?;
    // VMMs of other uids connect to sockets here; the sockets' own modes and the uid lists decide.
    make_dir(&cfg.runtime_dir, 0o755)?;
    let db = cfg.state_dir.join("memplace.db");
    let mut store = Store::open(&db, Duration::from_secs(5)).await?;
    store.set_commit_observer(crate::metrics::observe_commit);
    let topology = TopologyReader::host();
    let usable: Vec<u32> = topology.read().usable.iter().collect();
    let caps = tokio::task::spawn_blocking(move || kernel::probe::probe(&usable))
        .await
        .map_err(|e| AppError::Serve(e.to_string()))?;
    // Tests only, compiled in only with the `failpoints` test feature: the multi-node KVM guest
    // proves SetPolicy's interleave warning on a kernel whose probe finds interleave exact (no
    // 6.19 to 7.1 Debian kernel with KVM modules exists). A production build never reads it.
    #[cfg(feature = "failpoints")]
    let mut caps = caps;
    #[cfg(feature = "failpoints")]
    if std::env::var("MEMPLACE_TEST_GMEM_INTERLEAVE_EXACT").as_deref() == Ok("false") {
        tracing::warn!(probed = ?caps.guest_memfd_interleave_exact, "MEMPLACE_TEST_GMEM_INTERLEAVE_EXACT=false overrides the guest_memfd interleave probe");
        caps.guest_memfd_interleave_exact = Some(false);
        caps.guest_memfd_interleave_note = format!(
            "overridden to false by MEMPLACE_TEST_GMEM_INTERLEAVE_EXACT (tests only); the probe found: {}",
            caps.guest_memfd_interleave_note
        );
    }
    log_capabilities(&caps);
    let limits = Limits {
        max_regions: cfg.max_regions,
        max_ranges_per_region: cfg.max_ranges_per_region,
        max_region_bytes: cfg.max_region_bytes,
        force_strategy: cfg.forced_strategy()?,
    };
    let agent = Agent::start(store, caps, topology, limits).await?;
    crate::metrics::refresh_regions(&agent).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mode = cfg.socket_mode_bits().unwrap_or(0o660);

    // Handoff socket.
    let handoff_path = cfg.runtime_dir.join("handoff.sock");
    let handoff = crate::handoff::bind_socket(&handoff_path, mode)
        .map_err(|e| AppError::Bind(handoff_path.display().to_string(), e))?;
    let handoff_task = crate::handoff::serve(
        handoff,
        agent.clone(),
        cfg.handoff_uids.iter().copied().collect(),
        stop_rx.clone(),
    )
    .map_err(|e| AppError::Bind(handoff_path.display().to_string(), e))?;

    // Metrics.
    if cfg.metrics_addr != "off" {
        let addr: std::net::SocketAddr = cfg.metrics_addr.parse().map_err(|_| {
            AppError::Bind(
                cfg.metrics_addr.clone(),
                std::io::Error::other("bad address"),
            )
        })?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AppError::Bind(addr.to_string(), e))?;
        tokio::spawn(serve_metrics(listener, agent.clone(), stop_rx.clone()));
    }

    // Periodic reconcile.
    if cfg.reconcile_interval_secs > 0 {
        let agent = agent.clone();
        let mut stop = stop_rx.clone();
        let period = Duration::from_secs(cfg.reconcile_interval_secs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let start = std::time::Instant::now();
                match agent.reconcile(None, crate::reconcile::AGENT_ACTOR).await {
                    Ok(r) => tracing::debug!(?r, "periodic reconcile"),
                    Err(e) => tracing::warn!(error = %e, "periodic reconcile failed"),
                }
                crate::metrics::observe_reconcile(start.elapsed());
            }
        });
    }

    // gRPC.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<NodeAgentServiceServer<NodeAgent>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(memplace_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AppError::Serve(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(memplace_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| AppError::Serve(e.to_string()))?;
    let service = NodeAgentServiceServer::new(NodeAgent::new(agent.clone()))
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes);
    let roles = Roles {
        admin_uids: cfg.admin_uids.iter().copied().collect(),
        viewer_uids: cfg.viewer_uids.iter().copied().collect(),
        admin_gids: cfg.admin_gids.iter().copied().collect(),
        viewer_gids: cfg.viewer_gids.iter().copied().collect(),
        admin_names: cfg.admin_names.iter().cloned().collect(),
        viewer_names: cfg.viewer_names.iter().cloned().collect(),
        insecure_tcp_admin: cfg.insecure_tcp,
    };
    let auth = AuthLayer::new(roles);
    // One shedding budget shared by the Unix and TCP listeners.
    let shed = crate::limits::ShedLayer::new(cfg.max_concurrent_requests);
    // The same stack serves the Unix socket (plain) and TCP (mTLS when configured).
    let build = |server: tonic::transport::Server| {
        server
            // Outside everything: count and time every request, so refusals by the auth and
            // load-shedding layers below show up in memplace_requests with their codes too.
            .layer(crate::metrics::RequestMetricsLayer)
            // Then refuse callers without a role before they use any capacity.
            .layer(auth.clone())
            // Then shed load: a bounded number of requests in flight (a stream counts until it
            // ends), the rest refused at once with UNAVAILABLE rather than queued without bound.
            .layer(shed.clone())
            // Innermost, around the services where decoding happens: a body that is not valid
            // protobuf is the caller's error (INVALID_ARGUMENT), not the agent's (INTERNAL).
            .layer(tower::util::MapResponseLayer::new(
                crate::limits::decode_error_is_invalid_argument,
            ))
            // A deadline per request, enforced by tonic around the whole stack until the
            // response headers (unary calls; streams run until done or cancelled). Message size
            // is bounded by the service's max_decoding_message_size (RESOURCE_EXHAUSTED).
            .timeout(Duration::from_secs(cfg.request_timeout_secs))
            .add_service(health_service.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(service.clone())
    };
    let router = build(tonic::transport::Server::builder());

    let sock_path = cfg.runtime_dir.join("memplace.sock");
    let _ = std::fs::remove_file(&sock_path);
    let uds = tokio::net::UnixListener::bind(&sock_path)
        .map_err(|e| AppError::Bind(sock_path.display().to_string(), e))?;
    std::fs::set_permissions(
        &sock_path,
        std::os::unix::fs::PermissionsExt::from_mode(mode),
    )
    .map_err(|e| AppError::Bind(sock_path.display().to_string(), e))?;
    tracing::info!(socket = %sock_path.display(), handoff = %handoff_path.display(), db = %db.display(), "memplaced serving");

    let grace = Duration::from_secs(cfg.shutdown_grace_secs);
    let mut tcp_task = None;
    if let Some(addr) = cfg.listen_tcp {
        let router = match &tls {
            Some(tls) => {
                tracing::info!(%addr, "serving gRPC on TCP with mTLS");
                build(
                    tonic::transport::Server::builder()
                        .tls_config(tls.clone())
                        .map_err(|e| AppError::Serve(format!("TLS: {e}")))?,
                )
            }
            None => {
                tracing::warn!(%addr, "serving gRPC on TCP WITHOUT TLS (insecure_tcp): anyone who can reach this address is an admin");
                router.clone()
            }
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AppError::Bind(addr.to_string(), e))?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let mut stop = stop_rx.clone();
        tcp_task = Some(tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.changed().await;
                })
                .await
        }));
    }
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(uds);
    let mut stop = stop_rx.clone();
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = stop.changed().await;
    }));
    shutdown.await;
    let _ = stop_tx.send(true);
    // Drain: in-flight requests get the grace period to finish.
    let drained = tokio::time::timeout(grace, server).await;
    if let Some(t) = tcp_task {
        let _ = tokio::time::timeout(grace, t).await;
    }
    // The handoff listener stops at the same signal; its task ends without waiting for anything.
    let _ = handoff_task.await;
    let _ = std::fs::remove_file(&sock_path);
    let _ = std::fs::remove_file(&handoff_path);
    match drained {
        Ok(Ok(Ok(()))) | Err(_) => Ok(()),
        Ok(Ok(Err(e))) => Err(AppError::Serve(e.to_string())),
        Ok(Err(e)) => Err(AppError::Serve(e.to_string())),
    }
}

/// Keeps only the capabilities the agent uses (see `kernel::caps::KEEP`), plus
/// CAP_NET_BIND_SERVICE when a listener needs a port below 1024, and says what will not work
/// when a needed one is missing.
fn drop_capabilities(cfg: &Config) {
    use kernel::caps;
    let mut keep = caps::KEEP.to_vec();
    let low_port = |a: &str| {
        a.parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.port() < 1024)
    };
    if cfg.listen_tcp.is_some_and(|a| a.port() < 1024) || low_port(&cfg.metrics_addr) {
        keep.push(caps::CAP_NET_BIND_SERVICE);
    }
    match caps::drop_all_but(&keep) {
        Ok(d) => tracing::info!(
            dropped_from_bounding_set = d.bounding.len(),
            effective = format_args!("{:#x}", d.after.effective),
            "capabilities reduced to what the agent uses"
        ),
        Err(e) => tracing::warn!(error = %e, "could not drop unneeded capabilities"),
    }
    let now = caps::current().unwrap_or_default();
    if !now.has(caps::CAP_SYS_NICE) {
        tracing::warn!(
            "no CAP_SYS_NICE: SetPolicy with migrate and placement of pages a VMM shares will fail (mbind MPOL_MF_MOVE_ALL and move_pages need it); run as root or grant CAP_SYS_NICE"
        );
    }
    if !now.has(caps::CAP_SYS_PTRACE) {
        tracing::warn!(
            "no CAP_SYS_PTRACE: after a restart the agent cannot take region fds back from VMMs (pidfd_getfd), so held regions will be reported lost; grant CAP_SYS_PTRACE"
        );
    }
}

fn log_capabilities(c: &kernel::probe::Capabilities) {
    tracing::info!(
        kernel = %c.kernel_release,
        kvm = c.kvm_usable,
        guest_memfd = c.guest_memfd_supported,
        guest_memfd_flags = c.guest_memfd_flags,
        guest_memfd_shared_policy = c.guest_memfd_shared_policy,
        memfd_shared_policy = c.memfd_shared_policy,
        preferred_many = c.preferred_many,
        weighted_interleave = c.weighted_interleave,
        pidfd_getfd = c.pidfd_getfd,
        guest_memfd_interleave_exact = ?c.guest_memfd_interleave_exact,
        guest_memfd_interleave = %c.guest_memfd_interleave_note,
        "kernel capabilities probed"
    );
    if !c.kvm_usable {
        tracing::warn!(reason = %c.kvm_error, "KVM is not usable: guest_memfd regions will be refused; memfd works");
    }
    if !c.pidfd_getfd {
        tracing::warn!(
            "no CAP_SYS_PTRACE: after a restart the agent cannot take fds back from VMMs, so their regions will be reported lost"
        );
    }
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.changed() => return,
        };
        let Ok((stream, _)) = conn else { continue };
        let agent = agent.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let agent = agent.clone();
                    async move {
                        let (status, body) = if req.uri().path() == "/metrics" {
                            crate::metrics::refresh_regions(&agent).await;
                            (200, crate::metrics::render())
                        } else {
                            (404, "not found: try /metrics\n".to_string())
                        };
                        http::Response::builder()
                            .status(status)
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
