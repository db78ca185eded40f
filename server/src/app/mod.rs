//! Wiring and startup order: configuration is parsed and checked before anything binds; then the
//! state database is opened and checked, the kernel probed, regions recovered, and only then do
//! the sockets open. Shutdown is one signal that every listener watches.

mod grpc;
mod host;
mod logging;
mod metrics_http;

use crate::config::{Config, Flags};
use crate::engine::{Agent, EngineSettings};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::topology::TopologyReader;
use clap::Parser;
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
    Agent(#[from] crate::engine::AgentError),
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
    logging::init(&cfg);
    // Before the runtime starts any thread: capabilities are per thread and inherited.
    host::drop_capabilities(&cfg);
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
    // The agent's metrics: one set per agent, handed to everything that counts.
    let metrics = Arc::new(Metrics::new());
    let agent = start_agent(&cfg, &db, &metrics).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mode = cfg.socket_mode.bits();

    // Handoff socket.
    let handoff_path = cfg.runtime_dir.join("handoff.sock");
    let handoff = crate::handoff::bind_socket(&handoff_path, mode)
        .map_err(|e| AppError::Bind(handoff_path.display().to_string(), e))?;
    let handoff_task = crate::handoff::serve(
        handoff,
        agent.clone(),
        metrics.clone(),
        cfg.handoff_uids.iter().copied().collect(),
        crate::handoff::MAX_CONNECTIONS,
        stop_rx.clone(),
    )
    .map_err(|e| AppError::Bind(handoff_path.display().to_string(), e))?;

    // Metrics.
    if let Some(addr) = cfg.metrics_addr.socket() {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AppError::Bind(addr.to_string(), e))?;
        tokio::spawn(metrics_http::serve_metrics(
            listener,
            agent.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
    }

    // Periodic reconcile.
    if cfg.reconcile_interval_secs > 0 {
        let period = Duration::from_secs(cfg.reconcile_interval_secs);
        tokio::spawn(reconcile_every(
            period,
            agent.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
    }

    // gRPC.
    let sock_path = cfg.runtime_dir.join("memplace.sock");
    let bind_unix = || {
        let _ = std::fs::remove_file(&sock_path);
        let uds = tokio::net::UnixListener::bind(&sock_path)
            .map_err(|e| AppError::Bind(sock_path.display().to_string(), e))?;
        std::fs::set_permissions(
            &sock_path,
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .map_err(|e| AppError::Bind(sock_path.display().to_string(), e))?;
        tracing::info!(socket = %sock_path.display(), handoff = %handoff_path.display(), db = %db.display(), "memplaced serving");
        Ok(uds)
    };
    let serving = grpc::serve(&cfg, agent, metrics, tls, bind_unix, stop_rx).await?;

    shutdown.await;
    let _ = stop_tx.send(true);
    // Drain: in-flight requests get the grace period to finish.
    let drained = serving
        .drain(Duration::from_secs(cfg.shutdown_grace_secs))
        .await;
    // The handoff listener stops at the same signal; its task ends without waiting for anything.
    let _ = handoff_task.await;
    let _ = std::fs::remove_file(&sock_path);
    let _ = std::fs::remove_file(&handoff_path);
    drained
}

/// Opens the state database and probes the kernel (at the same time: the probes create files
/// and a KVM VM on a blocking thread while SQLite opens and checks the database), then starts the
/// engine, which recovers every region before anything listens. The metrics' region gauges are
/// not filled here: every /metrics scrape refreshes them first.
async fn start_agent(
    cfg: &Config,
    db: &Path,
    metrics: &Arc<Metrics>,
) -> Result<Arc<Agent>, AppError> {
    let topology = TopologyReader::host();
    let usable: Vec<u32> = topology.read().usable.iter().collect();
    let (store, features) = tokio::join!(
        Store::open_with(db, Duration::from_secs(5), cfg.request_retention()),
        host::probe(usable)
    );
    let mut store = store?;
    let features = features?;
    let m = metrics.clone();
    store.set_commit_observer(move |took, jobs| m.observe_commit(took, jobs));
    let limits = EngineSettings {
        max_regions: cfg.max_regions,
        max_ranges_per_region: cfg.max_ranges_per_region,
        max_region_bytes: cfg.max_region_bytes,
        force_strategy: cfg.forced_strategy()?,
        keep_after_holder_exit: cfg.keep_after_holder_exit()?,
        placement_map_max_bytes: cfg.placement_map_max_bytes,
    };
    let agent = Agent::start(store, features, topology, limits).await?;
    Ok(agent)
}

/// Reconciles every region every `period` until `stop` changes.
async fn reconcile_every(
    period: Duration,
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let start = std::time::Instant::now();
        match agent.reconcile(None, crate::engine::AGENT_ACTOR).await {
            Ok(r) => tracing::debug!(?r, "periodic reconcile"),
            Err(e) => tracing::warn!(error = %e, "periodic reconcile failed"),
        }
        metrics.observe_reconcile(start.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetricsAddr;
    use std::os::unix::net::UnixStream;

    fn connect_seqpacket(path: &Path) -> nix::Result<std::os::fd::OwnedFd> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        Ok(fd)
    }

    /// The handoff socket follows the same shutdown signal as the gRPC socket: once `run`
    /// returns, neither listener takes a connection (reached through hard links, since `run`
    /// removes the socket files), and an idle handoff connection was closed by the agent
    /// (the handoff task, which `run` waits for, ends after every connection's task).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_listener_follows_the_shutdown_signal() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            state_dir: dir.path().join("state"),
            runtime_dir: dir.path().join("run"),
            metrics_addr: MetricsAddr::Off,
            reconcile_interval_secs: 0,
            ..Config::default()
        };
        let (grpc, handoff) = (
            cfg.runtime_dir.join("memplace.sock"),
            cfg.runtime_dir.join("handoff.sock"),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = run(cfg, async {
            let _ = stopped.await;
        });
        tokio::pin!(agent);
        // The gRPC socket is bound last: once it exists, both listeners are serving.
        while !grpc.exists() {
            tokio::select! {
                r = &mut agent => panic!("the agent stopped: {r:?}"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let (grpc_link, handoff_link) = (dir.path().join("g.sock"), dir.path().join("h.sock"));
        std::fs::hard_link(&grpc, &grpc_link).unwrap();
        std::fs::hard_link(&handoff, &handoff_link).unwrap();
        UnixStream::connect(&grpc_link).expect("the gRPC socket takes connections");
        let idle = connect_seqpacket(&handoff_link).expect("the handoff socket takes connections");
        // A request answered on it shows that its task runs.
        use nix::sys::socket::{MsgFlags, recv, send};
        use std::os::fd::AsRawFd;
        send(idle.as_raw_fd(), b"\xff", MsgFlags::empty()).unwrap();
        let mut buf = [0u8; 4096];
        assert!(recv(idle.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap() > 0);

        stop.send(()).unwrap();
        agent.await.expect("run ends cleanly");
        let e = UnixStream::connect(&grpc_link).expect_err("gRPC socket still open");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        assert_eq!(
            connect_seqpacket(&handoff_link).err(),
            Some(nix::errno::Errno::ECONNREFUSED),
            "the handoff socket must close at the shutdown signal"
        );
        assert_eq!(
            recv(idle.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT),
            Ok(0),
            "the agent must close an idle handoff connection at the shutdown signal"
        );
    }
}
