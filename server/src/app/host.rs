//! The host's privileges and kernel features at start: capabilities dropped to what the agent
//! uses, and the kernel's features probed and logged.

use crate::config::Config;
use crate::kernel;

/// Probes the kernel's features on the usable nodes (off the runtime: it creates files and VMs).
pub(super) async fn probe(usable: Vec<u32>) -> Result<kernel::probe::Features, super::AppError> {
    let features = tokio::task::spawn_blocking(move || kernel::probe::probe(&usable))
        .await
        .map_err(|e| super::AppError::Serve(e.to_string()))?;
    // Tests only, compiled in only with the `failpoints` test feature: the multi-node KVM guest
    // proves SetPolicy's interleave warning on a kernel whose probe finds interleave exact (no
    // 6.19 to 7.1 Debian kernel with KVM modules exists). A production build never reads it.
    #[cfg(feature = "failpoints")]
    let mut features = features;
    #[cfg(feature = "failpoints")]
    if std::env::var("MEMPLACE_TEST_GMEM_INTERLEAVE_EXACT").as_deref() == Ok("false") {
        tracing::warn!(probed = ?features.guest_memfd_interleave_exact, "MEMPLACE_TEST_GMEM_INTERLEAVE_EXACT=false overrides the guest_memfd interleave probe");
        features.guest_memfd_interleave_exact = Some(false);
        features.guest_memfd_interleave_note = format!(
            "overridden to false by MEMPLACE_TEST_GMEM_INTERLEAVE_EXACT (tests only); the probe found: {}",
            features.guest_memfd_interleave_note
        );
    }
    log_features(&features);
    Ok(features)
}

/// Keeps only the capabilities the agent uses (see `kernel::caps::KEEP`), plus
/// CAP_NET_BIND_SERVICE when a listener needs a port below 1024, and says what will not work
/// when a needed one is missing.
pub(super) fn drop_capabilities(cfg: &Config) {
    use kernel::caps;
    let mut keep = caps::KEEP.to_vec();
    let low_port = |a: Option<std::net::SocketAddr>| a.is_some_and(|a| a.port() < 1024);
    if low_port(cfg.listen_tcp) || low_port(cfg.metrics_addr.socket()) {
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

fn log_features(c: &kernel::probe::Features) {
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
