//! memplacectl's commands, one file per group, and the one renderer they all print through
//! ([`render`]): `--output json|yaml` serializes the API's own messages (serde derived on the
//! generated types, see memplace-proto's build.rs), `table` is each command's own layout.

pub(crate) mod attach;
pub(crate) mod events;
pub(crate) mod exec;
pub(crate) mod hold;
pub(crate) mod info;
pub(crate) mod libvirt;
pub(crate) mod placement;
pub(crate) mod policy;
pub(crate) mod region;
pub(crate) mod render;

use clap::{Args, Parser, Subcommand, ValueEnum};
use memplace_client::{Client, ClientError};

#[derive(Parser, Debug)]
#[command(
    name = "memplacectl",
    version,
    about = "Operate memplace: regions, NUMA policies, placement",
    after_help = "Exit codes: 0 success; 1 local error (bad input, cannot connect, handoff refused); \
2 bad usage; 10 + the gRPC code when the agent refuses, with its message on stderr \
(13 INVALID_ARGUMENT, 15 NOT_FOUND, 16 ALREADY_EXISTS, 17 PERMISSION_DENIED, \
18 RESOURCE_EXHAUSTED, 19 FAILED_PRECONDITION, 20 ABORTED, 24 UNAVAILABLE). `exec` has codes of \
its own before PROGRAM runs: see `memplacectl exec --help`."
)]
pub(crate) struct Cli {
    /// Agent Unix socket.
    #[arg(long, global = true, env = "MEMPLACE_SOCKET", default_value = memplace_client::DEFAULT_SOCKET)]
    pub(crate) socket: String,
    /// Agent TCP address instead of the socket: http://host:port (insecure_tcp) or
    /// https://host:port (mTLS, with --tls-ca, --tls-cert and --tls-key).
    #[arg(long, global = true, env = "MEMPLACE_ADDR")]
    pub(crate) addr: Option<String>,
    /// mTLS: the CA that signed the agent's certificate (PEM).
    #[arg(long, global = true, env = "MEMPLACE_TLS_CA")]
    pub(crate) tls_ca: Option<std::path::PathBuf>,
    /// mTLS: this client's certificate (PEM); its name is what the agent maps to a role.
    #[arg(long, global = true, env = "MEMPLACE_TLS_CERT")]
    pub(crate) tls_cert: Option<std::path::PathBuf>,
    /// mTLS: this client's private key (PEM).
    #[arg(long, global = true, env = "MEMPLACE_TLS_KEY")]
    pub(crate) tls_key: Option<std::path::PathBuf>,
    /// mTLS: the name in the agent's certificate, if not the host of --addr.
    #[arg(long, global = true, env = "MEMPLACE_TLS_DOMAIN")]
    pub(crate) tls_domain: Option<String>,
    /// Output format of read commands.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Host NUMA topology and kernel capabilities.
    Info,
    /// Whether the agent is serving (grpc.health.v1).
    Health,
    /// Create, show, list and delete regions.
    #[command(subcommand)]
    Region(region::RegionCmd),
    /// Set policies.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Allocate a range's pages on its policy's nodes.
    Populate(placement::PopulateArgs),
    /// Where a range's pages are, per node.
    Placement(SpanArgs),
    /// Compare intent with the kernel and re-apply drift.
    Reconcile {
        /// Only this VM.
        #[arg(long, default_value = "")]
        vm: String,
    },
    /// Show the event log; with --follow, keep streaming.
    Events {
        /// Only this VM.
        #[arg(long, default_value = "")]
        vm: String,
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep following new events.
        #[arg(long, short)]
        follow: bool,
    },
    /// The VM's handoff token (IssueHandoffToken), for a VMM that adopts its own files.
    Token {
        /// VM id.
        vm: String,
    },
    /// Stand-in VMM: acquire a region's fd, map it, optionally touch it, wait for a signal.
    Hold(hold::HoldArgs),
    /// Start a VMM on a VM's regions: acquire them, put their fds into the arguments
    /// ({fd:NAME}, {path:NAME}) and exec PROGRAM in this process, which the agent then knows as
    /// the regions' holder.
    #[command(
        after_help = exec::AFTER_HELP,
        override_usage = "memplacectl exec [OPTIONS] VM_ID [--region NAME]... -- PROGRAM [ARGS]..."
    )]
    Exec(exec::ExecArgs),
    /// Take over a running VMM's guest memory (its memfds and guest_memfds) as regions of a VM.
    Attach(attach::AttachArgs),
    /// libvirt's qemu hook (/etc/libvirt/hooks/qemu): attach at `started begin` with
    /// <numatune> as intent, delete the regions at `release end`.
    LibvirtHook(libvirt::LibvirtHookArgs),
}

#[derive(Args, Debug)]
pub(crate) struct SpanArgs {
    /// VM id.
    pub(crate) vm: String,
    /// Region name.
    pub(crate) name: String,
    /// Byte offset (e.g. 1G).
    #[arg(long, default_value = "0")]
    pub(crate) offset: String,
    /// Length; 0 = to the end.
    #[arg(long, default_value = "0")]
    pub(crate) length: String,
}

pub(crate) fn parse_size(s: &str) -> Result<u64, ClientError> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match t[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1u64 << 40,
                u => {
                    return Err(ClientError::Invalid(format!(
                        "unknown size unit {u:?} in {s:?}"
                    )));
                }
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| {
            ClientError::Invalid(format!("bad size {s:?}: use e.g. 4G, 512M or a byte count"))
        })
}

pub(crate) async fn connect(cli: &Cli) -> Result<Client, ClientError> {
    match (&cli.addr, &cli.tls_ca, &cli.tls_cert, &cli.tls_key) {
        (Some(a), Some(ca), Some(cert), Some(key)) => {
            let tls = memplace_client::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                domain: cli.tls_domain.clone(),
            };
            Client::connect_tls(a, &tls).await
        }
        (Some(a), None, None, None) if !a.starts_with("https:") => Client::connect_tcp(a).await,
        (Some(_), ..) => Err(ClientError::Invalid(
            "TLS needs all of --tls-ca, --tls-cert and --tls-key, and an https:// --addr".into(),
        )),
        (None, ..) => Client::connect_unix(&cli.socket).await,
    }
}

/// Runs one command line.
pub(crate) async fn run(cli: Cli) -> Result<(), ClientError> {
    let out = cli.output;
    match &cli.command {
        Command::Hold(h) => return hold::hold(h),
        Command::Exec(e) => exec::run(&cli, e).await,
        Command::Health => return info::health(&cli, out).await,
        Command::LibvirtHook(h) => return libvirt::hook(&cli, h).await,
        _ => {}
    }
    let mut c = connect(&cli).await?;
    match cli.command {
        Command::Info => info::info(&mut c, out).await,
        Command::Region(cmd) => region::run(&mut c, cmd, out).await,
        Command::Policy(cmd) => policy::run(&mut c, cmd, out).await,
        Command::Populate(p) => placement::populate(&mut c, &p, out).await,
        Command::Placement(span) => placement::placement(&mut c, &span, out).await,
        Command::Reconcile { vm } => placement::reconcile(&mut c, &vm, out).await,
        Command::Events { vm, after, follow } => {
            events::events(&mut c, vm, after, follow, out).await
        }
        Command::Token { vm } => events::token(&mut c, vm, out).await,
        Command::Attach(a) => attach::attach(&mut c, &a, out).await,
        Command::Hold(_) | Command::Health | Command::Exec(_) | Command::LibvirtHook(_) => {
            unreachable!("handled above")
        }
    }
}
