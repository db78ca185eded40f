//! Configuration: defaults, then a TOML file, then environment variables, then flags. Everything
//! is parsed and checked before anything binds.

use crate::store::Retention;
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Flags of `memplaced`. Each has an environment variable and a config file key of the same name.
#[derive(Parser, Debug, Default)]
#[command(
    name = "memplaced",
    version,
    about = "memplace agent: owns guest memory files and places their pages on NUMA nodes"
)]
pub struct Flags {
    /// TOML config file.
    #[arg(long, env = "MEMPLACE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Directory of the SQLite state (memplace.db) [default: /var/lib/memplace].
    #[arg(long, env = "MEMPLACE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Directory of the sockets (memplace.sock, handoff.sock) [default: /run/memplace].
    #[arg(long, env = "MEMPLACE_RUNTIME_DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Also serve gRPC on this TCP address (mTLS unless --insecure-tcp).
    #[arg(long, env = "MEMPLACE_LISTEN_TCP")]
    pub listen_tcp: Option<SocketAddr>,
    /// Log level or tracing filter [default: info].
    #[arg(long, env = "MEMPLACE_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format: human or json [default: human].
    #[arg(long, env = "MEMPLACE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Prometheus /metrics listener; "off" disables it [default: 127.0.0.1:9464].
    #[arg(long, env = "MEMPLACE_METRICS_ADDR")]
    pub metrics_addr: Option<MetricsAddr>,
    /// Seconds between periodic reconciles; 0 disables them [default: 30].
    #[arg(long, env = "MEMPLACE_RECONCILE_INTERVAL_SECS")]
    pub reconcile_interval_secs: Option<u64>,
    /// Seconds to drain in-flight requests on SIGTERM [default: 10].
    #[arg(long, env = "MEMPLACE_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Octal mode of the sockets [default: 0660].
    #[arg(long, env = "MEMPLACE_SOCKET_MODE")]
    pub socket_mode: Option<SocketMode>,
    /// Uids with the admin role on the Unix socket, comma-separated [default: 0].
    #[arg(long, env = "MEMPLACE_ADMIN_UIDS", value_delimiter = ',')]
    pub admin_uids: Option<Vec<u32>>,
    /// Uids with the viewer role, comma-separated [default: none].
    #[arg(long, env = "MEMPLACE_VIEWER_UIDS", value_delimiter = ',')]
    pub viewer_uids: Option<Vec<u32>>,
    /// Gids with the admin role on the Unix socket (caller's primary gid) [default: none].
    #[arg(long, env = "MEMPLACE_ADMIN_GIDS", value_delimiter = ',')]
    pub admin_gids: Option<Vec<u32>>,
    /// Gids with the viewer role [default: none].
    #[arg(long, env = "MEMPLACE_VIEWER_GIDS", value_delimiter = ',')]
    pub viewer_gids: Option<Vec<u32>>,
    /// Client certificate names (SAN or CN) with the admin role on mTLS TCP [default: none].
    #[arg(long, env = "MEMPLACE_ADMIN_NAMES", value_delimiter = ',')]
    pub admin_names: Option<Vec<String>>,
    /// Client certificate names with the viewer role [default: none].
    #[arg(long, env = "MEMPLACE_VIEWER_NAMES", value_delimiter = ',')]
    pub viewer_names: Option<Vec<String>>,
    /// Uids allowed on the handoff socket, comma-separated [default: 0].
    #[arg(long, env = "MEMPLACE_HANDOFF_UIDS", value_delimiter = ',')]
    pub handoff_uids: Option<Vec<u32>>,
    /// TLS certificate (PEM) for the TCP listener.
    #[arg(long, env = "MEMPLACE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS key (PEM).
    #[arg(long, env = "MEMPLACE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to.
    #[arg(long, env = "MEMPLACE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Allow TCP without TLS (logs a warning at every start).
    #[arg(long, env = "MEMPLACE_INSECURE_TCP")]
    pub insecure_tcp: Option<bool>,
    /// Regions at most [default: 4096].
    #[arg(long, env = "MEMPLACE_MAX_REGIONS")]
    pub max_regions: Option<usize>,
    /// Ranges per region at most [default: 256].
    #[arg(long, env = "MEMPLACE_MAX_RANGES_PER_REGION")]
    pub max_ranges_per_region: Option<usize>,
    /// Bytes per region at most [default: 1 TiB].
    #[arg(long, env = "MEMPLACE_MAX_REGION_BYTES")]
    pub max_region_bytes: Option<u64>,
    /// Per-request timeout in seconds (streams excepted) [default: 30].
    #[arg(long, env = "MEMPLACE_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// Requests in flight at most; more are refused with UNAVAILABLE [default: 64].
    #[arg(long, env = "MEMPLACE_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,
    /// Largest gRPC message in bytes [default: 4 MiB].
    #[arg(long, env = "MEMPLACE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Bytes of guest memory GetPlacement may keep mapped in the agent between counts, over all
    /// regions (0 keeps none: every count faults again) [default: 16 GiB].
    #[arg(long, env = "MEMPLACE_PLACEMENT_MAP_MAX_BYTES")]
    pub placement_map_max_bytes: Option<u64>,
    /// Placement strategy of new regions: auto (probed per backend) or task-policy (for
    /// testing the task-policy path on memfd) [default: auto].
    #[arg(long, env = "MEMPLACE_FORCE_STRATEGY")]
    pub force_strategy: Option<String>,
    /// Seconds a region the agent made keeps its memory after the last process holding it
    /// exited, for a VMM that restarts; "keep" keeps it until deleted [default: 300].
    #[arg(long, env = "MEMPLACE_RELEASE_AGENT_REGIONS_AFTER")]
    pub release_agent_regions_after: Option<String>,
    /// Seconds a request id's record (its first answer, replayed to a retry) is kept
    /// [default: 86400].
    #[arg(long, env = "MEMPLACE_REQUEST_RECORD_MAX_AGE_SECS")]
    pub request_record_max_age_secs: Option<u64>,
    /// Request records kept at most, the newest [default: 100000].
    #[arg(long, env = "MEMPLACE_REQUEST_RECORD_MAX_COUNT")]
    pub request_record_max_count: Option<u64>,
    /// Seconds a pruned request id is still refused (tombstone) [default: 2592000].
    #[arg(long, env = "MEMPLACE_REQUEST_TOMBSTONE_MAX_AGE_SECS")]
    pub request_tombstone_max_age_secs: Option<u64>,
    /// Tombstones of pruned request ids kept at most, the newest [default: 500000].
    #[arg(long, env = "MEMPLACE_REQUEST_TOMBSTONE_MAX_COUNT")]
    pub request_tombstone_max_count: Option<u64>,
}

/// The config file, and the effective configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// State directory.
    pub state_dir: PathBuf,
    /// Socket directory.
    pub runtime_dir: PathBuf,
    /// Optional TCP listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_tcp: Option<SocketAddr>,
    /// Log level or filter.
    pub log_level: String,
    /// human or json.
    pub log_format: String,
    /// Metrics listener, or "off".
    pub metrics_addr: MetricsAddr,
    /// Reconcile period, 0 = off.
    pub reconcile_interval_secs: u64,
    /// Drain time on shutdown.
    pub shutdown_grace_secs: u64,
    /// Socket mode, octal text in the file.
    pub socket_mode: SocketMode,
    /// Admin uids.
    pub admin_uids: Vec<u32>,
    /// Viewer uids.
    pub viewer_uids: Vec<u32>,
    /// Admin gids.
    pub admin_gids: Vec<u32>,
    /// Viewer gids.
    pub viewer_gids: Vec<u32>,
    /// Admin certificate names.
    pub admin_names: Vec<String>,
    /// Viewer certificate names.
    pub viewer_names: Vec<String>,
    /// Handoff uids.
    pub handoff_uids: Vec<u32>,
    /// TLS certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// TLS key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Client CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// TCP without TLS.
    pub insecure_tcp: bool,
    /// Region limit.
    pub max_regions: usize,
    /// Range limit.
    pub max_ranges_per_region: usize,
    /// Region size limit.
    pub max_region_bytes: u64,
    /// Request timeout.
    pub request_timeout_secs: u64,
    /// Concurrency limit.
    pub max_concurrent_requests: usize,
    /// Message size limit.
    pub max_message_bytes: usize,
    /// What GetPlacement keeps mapped between counts, at most.
    pub placement_map_max_bytes: u64,
    /// auto, or task-policy to place every new region with the task-policy strategy.
    pub force_strategy: String,
    /// Seconds (or "keep") an agent-made region keeps its memory after its last holder exited.
    pub release_agent_regions_after: String,
    /// Request record retention, seconds.
    pub request_record_max_age_secs: u64,
    /// Request records at most.
    pub request_record_max_count: u64,
    /// Tombstone retention, seconds.
    pub request_tombstone_max_age_secs: u64,
    /// Tombstones at most.
    pub request_tombstone_max_count: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: "/var/lib/memplace".into(),
            runtime_dir: "/run/memplace".into(),
            listen_tcp: None,
            log_level: "info".into(),
            log_format: "human".into(),
            metrics_addr: MetricsAddr::On(SocketAddr::from(([127, 0, 0, 1], 9464))),
            reconcile_interval_secs: 30,
            shutdown_grace_secs: 10,
            socket_mode: SocketMode(0o660),
            admin_uids: vec![0],
            viewer_uids: vec![],
            admin_gids: vec![],
            viewer_gids: vec![],
            admin_names: vec![],
            viewer_names: vec![],
            handoff_uids: vec![0],
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            insecure_tcp: false,
            max_regions: 4096,
            max_ranges_per_region: 256,
            max_region_bytes: 1 << 40,
            request_timeout_secs: 30,
            max_concurrent_requests: 64,
            max_message_bytes: 4 << 20,
            placement_map_max_bytes: crate::engine::DEFAULT_PLACEMENT_MAP_MAX_BYTES,
            force_strategy: "auto".into(),
            release_agent_regions_after: crate::engine::DEFAULT_KEEP_AFTER_HOLDER_EXIT_SECS
                .to_string(),
            request_record_max_age_secs: Retention::default().record_max_age_secs,
            request_record_max_count: Retention::default().record_max_count,
            request_tombstone_max_age_secs: Retention::default().tombstone_max_age_secs,
            request_tombstone_max_count: Retention::default().tombstone_max_count,
        }
    }
}

/// Where /metrics is served: `host:port`, or `off`. Checked when the configuration loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MetricsAddr {
    /// No metrics listener.
    Off,
    /// Listen here.
    On(SocketAddr),
}

impl MetricsAddr {
    /// The address to listen on, if any.
    pub fn socket(self) -> Option<SocketAddr> {
        match self {
            Self::Off => None,
            Self::On(a) => Some(a),
        }
    }
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self::Off);
        }
        s.parse().map(Self::On).map_err(|_| {
            format!("metrics_addr {s:?} must be host:port (e.g. 127.0.0.1:9464) or off")
        })
    }
}

impl TryFrom<String> for MetricsAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MetricsAddr> for String {
    fn from(a: MetricsAddr) -> String {
        a.to_string()
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::On(a) => write!(f, "{a}"),
        }
    }
}

/// The permission bits of the agent's sockets: octal text such as `0660` (or `0o660`), at most
/// 0777. Checked when the configuration loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SocketMode(u32);

impl SocketMode {
    /// The mode bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl std::str::FromStr for SocketMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| !digits.is_empty() && *m <= 0o777)
            .map(Self)
            .ok_or_else(|| format!("socket_mode {s:?} must be octal permission bits, e.g. 0660"))
    }
}

impl TryFrom<String> for SocketMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<SocketMode> for String {
    fn from(m: SocketMode) -> String {
        m.to_string()
    }
}

impl std::fmt::Display for SocketMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file is not valid.
    #[error("config file {0}: {1}")]
    Parse(PathBuf, String),
    /// A value is not acceptable.
    #[error("config: {0}")]
    Invalid(String),
}

macro_rules! overlay {
    ($cfg:ident, $flags:ident, $($f:ident),*) => {
        $( if let Some(v) = $flags.$f.clone() { $cfg.$f = v; } )*
    };
}

impl Config {
    /// Builds the effective configuration from flags (which already include env vars) and the
    /// file they name.
    pub fn load(flags: &Flags) -> Result<Self, ConfigError> {
        let mut cfg = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.clone(), e))?;
                toml::from_str::<Config>(&text)
                    .map_err(|e| ConfigError::Parse(path.clone(), e.to_string()))?
            }
            None => Config::default(),
        };
        overlay!(
            cfg,
            flags,
            state_dir,
            runtime_dir,
            log_level,
            log_format,
            metrics_addr,
            reconcile_interval_secs,
            shutdown_grace_secs,
            socket_mode,
            admin_uids,
            viewer_uids,
            admin_gids,
            viewer_gids,
            admin_names,
            viewer_names,
            handoff_uids,
            insecure_tcp,
            max_regions,
            max_ranges_per_region,
            max_region_bytes,
            request_timeout_secs,
            max_concurrent_requests,
            max_message_bytes,
            placement_map_max_bytes,
            force_strategy,
            release_agent_regions_after,
            request_record_max_age_secs,
            request_record_max_count,
            request_tombstone_max_age_secs,
            request_tombstone_max_count
        );
        if flags.listen_tcp.is_some() {
            cfg.listen_tcp = flags.listen_tcp;
        }
        if flags.tls_cert.is_some() {
            cfg.tls_cert = flags.tls_cert.clone();
        }
        if flags.tls_key.is_some() {
            cfg.tls_key = flags.tls_key.clone();
        }
        if flags.tls_client_ca.is_some() {
            cfg.tls_client_ca = flags.tls_client_ca.clone();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// How long and how many request records (and tombstones of pruned ones) are kept.
    pub fn request_retention(&self) -> Retention {
        Retention {
            record_max_age_secs: self.request_record_max_age_secs,
            record_max_count: self.request_record_max_count,
            tombstone_max_age_secs: self.request_tombstone_max_age_secs,
            tombstone_max_count: self.request_tombstone_max_count,
        }
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !matches!(self.log_format.as_str(), "human" | "json") {
            return bad(format!(
                "log_format {:?} must be human or json",
                self.log_format
            ));
        }
        self.forced_strategy()?;
        self.keep_after_holder_exit()?;
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return bad(format!(
                "log_level {:?} is not a level or filter",
                self.log_level
            ));
        }
        if self.max_regions == 0 || self.max_ranges_per_region == 0 || self.max_region_bytes == 0 {
            return bad(
                "max_regions, max_ranges_per_region and max_region_bytes must be above 0".into(),
            );
        }
        if self.max_concurrent_requests == 0
            || self.request_timeout_secs == 0
            || self.max_message_bytes < 1024
        {
            return bad("max_concurrent_requests and request_timeout_secs must be above 0, max_message_bytes at least 1024".into());
        }
        if self.request_record_max_age_secs == 0 || self.request_record_max_count == 0 {
            return bad("request_record_max_age_secs and request_record_max_count must be above 0: a retry must find the answer it repeats".into());
        }
        if self.listen_tcp.is_some() {
            let tls = [&self.tls_cert, &self.tls_key, &self.tls_client_ca];
            let n = tls.iter().filter(|t| t.is_some()).count();
            if n != 0 && n != 3 {
                return bad("TLS needs all of tls_cert, tls_key and tls_client_ca".into());
            }
            if n == 0 && !self.insecure_tcp {
                return bad("listen_tcp without TLS is refused: give tls_cert, tls_key and tls_client_ca, or insecure_tcp = true".into());
            }
            if n == 3 && self.admin_names.is_empty() && self.viewer_names.is_empty() {
                return bad("listen_tcp with mTLS needs admin_names or viewer_names: no client certificate would have a role".into());
            }
        }
        Ok(())
    }

    /// The strategy `force_strategy` forces on new regions; `None` for auto.
    pub fn forced_strategy(&self) -> Result<Option<crate::domain::Strategy>, ConfigError> {
        match self.force_strategy.as_str() {
            "auto" => Ok(None),
            "task-policy" => Ok(Some(crate::domain::Strategy::TaskPolicy)),
            s => Err(ConfigError::Invalid(format!(
                "force_strategy {s:?} must be auto or task-policy"
            ))),
        }
    }

    /// How long an agent-made region keeps its memory after its last holder exited; `None`
    /// keeps it until it is deleted.
    pub fn keep_after_holder_exit(&self) -> Result<Option<std::time::Duration>, ConfigError> {
        match self.release_agent_regions_after.as_str() {
            "keep" => Ok(None),
            s => s
                .parse::<u64>()
                .map(|n| Some(std::time::Duration::from_secs(n)))
                .map_err(|_| {
                    ConfigError::Invalid(format!(
                        "release_agent_regions_after {s:?} must be a number of seconds or keep"
                    ))
                }),
        }
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn release_agent_regions_after_is_seconds_or_keep() {
        let c = Config::default();
        assert_eq!(
            c.keep_after_holder_exit().unwrap(),
            Some(std::time::Duration::from_secs(300))
        );
        let c: Config = toml::from_str("release_agent_regions_after = \"keep\"").unwrap();
        assert_eq!(c.keep_after_holder_exit().unwrap(), None);
        let c: Config = toml::from_str("release_agent_regions_after = \"0\"").unwrap();
        assert_eq!(
            c.keep_after_holder_exit().unwrap(),
            Some(std::time::Duration::ZERO)
        );
        let c: Config = toml::from_str("release_agent_regions_after = \"5m\"").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("number of seconds or keep"), "{e}");
    }

    #[test]
    fn force_strategy_is_a_checked_key() {
        let c = Config::default();
        assert_eq!(c.forced_strategy().unwrap(), None);
        let c: Config = toml::from_str("force_strategy = \"task-policy\"").unwrap();
        assert_eq!(
            c.forced_strategy().unwrap(),
            Some(crate::domain::Strategy::TaskPolicy)
        );
        let c: Config = toml::from_str("force_strategy = \"shared\"").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn request_retention_comes_from_file_and_flags_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "request_record_max_age_secs = 600\nrequest_tombstone_max_count = 0\n",
        )
        .unwrap();
        let flags = Flags::try_parse_from([
            "memplaced",
            "--config",
            f.to_str().unwrap(),
            "--request-record-max-count",
            "50",
        ])
        .unwrap();
        let r = Config::load(&flags).unwrap().request_retention();
        assert_eq!(
            r,
            Retention {
                record_max_age_secs: 600,
                record_max_count: 50,
                tombstone_max_count: 0,
                ..Retention::default()
            }
        );
        let zero: Config = toml::from_str("request_record_max_count = 0").unwrap();
        let e = zero.validate().unwrap_err().to_string();
        assert!(e.contains("request_record_max_count"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("state_dirr = \"/x\"").is_err());
    }

    #[test]
    fn flags_beat_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "state_dir = \"/from/file\"\nmax_regions = 7\n").unwrap();
        let flags = Flags {
            config: Some(f),
            state_dir: Some("/from/flag".into()),
            ..Default::default()
        };
        let c = Config::load(&flags).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.max_regions, 7);
    }

    #[test]
    fn insecure_tcp_must_be_explicit() {
        let mut c = Config {
            listen_tcp: Some("127.0.0.1:1".parse().unwrap()),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        c.insecure_tcp = true;
        assert!(c.validate().is_ok());
        c.tls_cert = Some("/x".into());
        assert!(c.validate().is_err());
        c.tls_key = Some("/y".into());
        c.tls_client_ca = Some("/z".into());
        assert!(
            c.validate().is_err(),
            "mTLS without any certificate name is useless"
        );
        c.admin_names = vec!["ops".into()];
        assert!(c.validate().is_ok());
    }

    #[test]
    fn role_lists_parse_from_flags() {
        let flags = Flags::try_parse_from([
            "memplaced",
            "--admin-gids",
            "10,11",
            "--viewer-names",
            "a.example,b",
        ])
        .unwrap();
        let c = Config::load(&flags).unwrap();
        assert_eq!(c.admin_gids, vec![10, 11]);
        assert_eq!(
            c.viewer_names,
            vec!["a.example".to_string(), "b".to_string()]
        );
    }

    #[test]
    fn metrics_addr_and_socket_mode_are_typed_and_checked_at_load() {
        let c: Config =
            toml::from_str("metrics_addr = \"off\"\nsocket_mode = \"0o600\"\n").unwrap();
        assert_eq!(c.metrics_addr, MetricsAddr::Off);
        assert_eq!(c.socket_mode.bits(), 0o600);
        // Printed back in the form the file takes.
        let back = c.to_toml();
        assert!(back.contains("metrics_addr = \"off\""), "{back}");
        assert!(back.contains("socket_mode = \"0600\""), "{back}");
        for (text, says) in [
            ("metrics_addr = \"localhost\"", "must be host:port"),
            ("metrics_addr = \"\"", "must be host:port"),
            ("socket_mode = \"0999\"", "must be octal"),
            ("socket_mode = \"01777\"", "must be octal"),
            ("socket_mode = \"\"", "must be octal"),
        ] {
            let e = toml::from_str::<Config>(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
        let e = Flags::try_parse_from(["memplaced", "--metrics-addr", "9464"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be host:port"), "{e}");
        let e = Flags::try_parse_from(["memplaced", "--socket-mode", "rw"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be octal"), "{e}");
        let f = Flags::try_parse_from(["memplaced", "--metrics-addr", "[::1]:9000"]).unwrap();
        assert_eq!(
            Config::load(&f).unwrap().metrics_addr.socket(),
            Some("[::1]:9000".parse().unwrap())
        );
    }
}
