//! `memplacectl`: the command line of memplace.
//!
//! Exit codes: 0 success; 1 a local error (bad input, connection failure, handoff refusal); 2 bad
//! usage; and 10 + the gRPC code when the agent refuses, printing the agent's message (11 =
//! CANCELLED, 13 = INVALID_ARGUMENT, 14 = DEADLINE_EXCEEDED, 15 = NOT_FOUND, 16 = ALREADY_EXISTS,
//! 17 = PERMISSION_DENIED, 18 = RESOURCE_EXHAUSTED, 19 = FAILED_PRECONDITION, 20 = ABORTED,
//! 23 = INTERNAL, 24 = UNAVAILABLE, 25 = DATA_LOSS).
//!
//! Every read command takes `--output table|json|yaml`. JSON is one pretty-printed document
//! (for `events`, one compact object per line), with field names and enum spellings that stay
//! stable for scripts.

#![forbid(unsafe_code)]

mod attach;

use clap::{Args, Parser, Subcommand, ValueEnum};
use memplace_client::handoff::{DEFAULT_HANDOFF_SOCKET, Handoff};
use memplace_client::{Client, ClientError, nodes, pb};
use serde_json::{Value, json};
use std::io::Write;
use std::process::ExitCode;

mod exec;

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
struct Cli {
    /// Agent Unix socket.
    #[arg(long, global = true, env = "MEMPLACE_SOCKET", default_value = memplace_client::DEFAULT_SOCKET)]
    socket: String,
    /// Agent TCP address instead of the socket: http://host:port (insecure_tcp) or
    /// https://host:port (mTLS, with --tls-ca, --tls-cert and --tls-key).
    #[arg(long, global = true, env = "MEMPLACE_ADDR")]
    addr: Option<String>,
    /// mTLS: the CA that signed the agent's certificate (PEM).
    #[arg(long, global = true, env = "MEMPLACE_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// mTLS: this client's certificate (PEM); its name is what the agent maps to a role.
    #[arg(long, global = true, env = "MEMPLACE_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// mTLS: this client's private key (PEM).
    #[arg(long, global = true, env = "MEMPLACE_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// mTLS: the name in the agent's certificate, if not the host of --addr.
    #[arg(long, global = true, env = "MEMPLACE_TLS_DOMAIN")]
    tls_domain: Option<String>,
    /// Output format of read commands.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Host NUMA topology and kernel capabilities.
    Info,
    /// Whether the agent is serving (grpc.health.v1).
    Health,
    /// Create, show, list and delete regions.
    #[command(subcommand)]
    Region(RegionCmd),
    /// Set policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Allocate a range's pages on its policy's nodes.
    Populate(PopulateArgs),
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
    Hold(HoldArgs),
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
}

#[derive(Subcommand, Debug)]
enum RegionCmd {
    /// Create a region.
    Create {
        /// VM id.
        vm: String,
        /// Region name.
        name: String,
        /// Size, e.g. 4G, 512M, 65536.
        #[arg(long)]
        size: String,
        /// Backend: memfd, guest-memfd or memfd-hugetlb.
        #[arg(long, default_value = "memfd")]
        backend: String,
        /// Huge page size for memfd-hugetlb, e.g. 2M.
        #[arg(long)]
        hugepage_size: Option<String>,
        /// Initial policy over the whole region, MODE[:NODES], e.g. bind:0-1.
        #[arg(long)]
        policy: Option<String>,
    },
    /// Show a region with intended and observed policies.
    Get {
        /// VM id.
        vm: String,
        /// Region name.
        name: String,
    },
    /// List regions.
    List {
        /// Only this VM.
        #[arg(long, default_value = "")]
        vm: String,
    },
    /// Delete a region and release its memory (once no VMM holds it).
    Delete {
        /// VM id.
        vm: String,
        /// Region name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Set the policy of a byte range.
    Set {
        #[command(flatten)]
        span: SpanArgs,
        /// Mode: default, bind, preferred, interleave, preferred-many, weighted-interleave, local.
        #[arg(long)]
        mode: String,
        /// Nodes in numactl syntax, e.g. 0-3,5.
        #[arg(long, default_value = "")]
        nodes: String,
        /// Move already-allocated pages (memfd).
        #[arg(long)]
        migrate: bool,
        /// MPOL_F_STATIC_NODES.
        #[arg(long = "static")]
        static_nodes: bool,
        /// MPOL_F_RELATIVE_NODES.
        #[arg(long = "relative")]
        relative_nodes: bool,
        /// Fail unless the region is at this generation.
        #[arg(long, default_value_t = 0)]
        expected_generation: u64,
    },
}

#[derive(Args, Debug)]
struct SpanArgs {
    /// VM id.
    vm: String,
    /// Region name.
    name: String,
    /// Byte offset (e.g. 1G).
    #[arg(long, default_value = "0")]
    offset: String,
    /// Length; 0 = to the end.
    #[arg(long, default_value = "0")]
    length: String,
}

#[derive(Args, Debug)]
struct PopulateArgs {
    #[command(flatten)]
    span: SpanArgs,
    /// Worker threads (0 = default).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Memory cgroup to charge, e.g. /sys/fs/cgroup/memory/vm1.
    #[arg(long, default_value = "")]
    cgroup: String,
    /// Skip reading each page's node back from the kernel (faster on a fresh file; the summary
    /// then lists no nodes: see `placement`).
    #[arg(long)]
    no_verify: bool,
}

#[derive(Args, Debug)]
struct HoldArgs {
    /// VM id.
    vm: String,
    /// Region name.
    name: String,
    /// The VM's handoff token.
    #[arg(long, env = "MEMPLACE_HANDOFF_TOKEN")]
    token: String,
    /// Handoff socket.
    #[arg(long, env = "MEMPLACE_HANDOFF_SOCKET", default_value = DEFAULT_HANDOFF_SOCKET)]
    handoff_socket: String,
    /// Write-fault this many bytes from offset 0 (e.g. 64M), as a guest would.
    #[arg(long)]
    touch: Option<String>,
    /// Write a pattern derived from SEED over the touched bytes; on SIGUSR1, verify it and print
    /// "pattern ok" or "pattern BAD".
    #[arg(long)]
    pattern: Option<u64>,
    /// For guest_memfd: bind memslot 0 of the VM fd that came with the region to it, proving
    /// the file belongs to that VM. Fails with this agent, which sends no VM fd: a KVM VM fd
    /// answers only in the process that created it (the kernel returns EIO to any other).
    #[arg(long)]
    bind_memslot: bool,
}

fn parse_size(s: &str) -> Result<u64, ClientError> {
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

fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS.mmm` (UTC).
fn utc_time(unix_ms: i64) -> String {
    let (days, ms) = (
        unix_ms.div_euclid(86_400_000),
        unix_ms.rem_euclid(86_400_000),
    );
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

fn parse_backend(s: &str) -> Result<pb::Backend, ClientError> {
    match s.to_ascii_lowercase().replace('_', "-").as_str() {
        "memfd" => Ok(pb::Backend::Memfd),
        "guest-memfd" | "gmem" => Ok(pb::Backend::GuestMemfd),
        "memfd-hugetlb" | "hugetlb" => Ok(pb::Backend::MemfdHugetlb),
        _ => Err(ClientError::Invalid(format!(
            "unknown backend {s:?}: use memfd, guest-memfd or memfd-hugetlb"
        ))),
    }
}

fn mode_name(m: i32) -> String {
    pb::PolicyMode::try_from(m)
        .map(|m| {
            m.as_str_name()
                .trim_start_matches("POLICY_MODE_")
                .to_ascii_lowercase()
                .replace('_', "-")
        })
        .unwrap_or_else(|_| format!("mode-{m}"))
}

fn policy_text(p: Option<&pb::Policy>) -> String {
    match p {
        None => "-".into(),
        Some(p) => {
            let mut s = mode_name(p.mode);
            if !p.nodes.is_empty() {
                s.push(' ');
                s.push_str(&nodes::format(&p.nodes));
            }
            if p.static_nodes {
                s.push_str(" static");
            }
            if p.relative_nodes {
                s.push_str(" relative");
            }
            s
        }
    }
}

fn enum_name(s: &str, prefix: &str) -> String {
    s.trim_start_matches(prefix)
        .to_ascii_lowercase()
        .replace('_', "-")
}

fn policy_json(p: Option<&pb::Policy>) -> Value {
    match p {
        None => Value::Null,
        Some(p) => {
            json!({"mode": mode_name(p.mode), "nodes": p.nodes, "static_nodes": p.static_nodes, "relative_nodes": p.relative_nodes})
        }
    }
}

fn region_json(r: &pb::Region) -> Value {
    json!({
        "vm_id": r.vm_id, "name": r.name, "uid": r.uid,
        "backend": enum_name(r.backend().as_str_name(), "BACKEND_"),
        "size_bytes": r.size_bytes, "generation": r.generation,
        "strategy": enum_name(r.strategy().as_str_name(), "STRATEGY_"),
        "status": enum_name(r.status().as_str_name(), "REGION_STATUS_"),
        "page_size_bytes": r.page_size_bytes, "holder_pid": r.holder_pid,
        "ranges": r.ranges.iter().map(|x| json!({
            "offset": x.offset, "length": x.length,
            "intended": policy_json(x.intended.as_ref()), "observed": policy_json(x.observed.as_ref()),
            "state": enum_name(x.state().as_str_name(), "RANGE_STATE_"),
            "governs": enum_name(x.governs().as_str_name(), "GOVERNS_"),
            "last_error": x.last_error,
        })).collect::<Vec<_>>(),
    })
}

fn print_value(out: Output, v: &Value, table: impl FnOnce()) {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Yaml => print!("{}", serde_yaml::to_string(v).unwrap_or_default()),
        Output::Table => table(),
    }
}

fn print_region_table(r: &pb::Region) {
    println!(
        "{}/{}  {}  {}  {}  generation {}  {}",
        r.vm_id,
        r.name,
        enum_name(r.backend().as_str_name(), "BACKEND_"),
        human(r.size_bytes),
        enum_name(r.strategy().as_str_name(), "STRATEGY_"),
        r.generation,
        enum_name(r.status().as_str_name(), "REGION_STATUS_"),
    );
    println!(
        "  {:<14} {:<12} {:<24} {:<24} {:<9} note",
        "OFFSET", "LENGTH", "INTENDED", "OBSERVED", "STATE"
    );
    for x in &r.ranges {
        let note = if !x.last_error.is_empty() {
            x.last_error.clone()
        } else if x.governs() == pb::Governs::AgentAllocationsOnly {
            "binds only pages memplace allocates (task policy)".into()
        } else {
            String::new()
        };
        println!(
            "  {:<14} {:<12} {:<24} {:<24} {:<9} {}",
            format!("{:#x}", x.offset),
            human(x.length),
            policy_text(x.intended.as_ref()),
            policy_text(x.observed.as_ref()),
            enum_name(x.state().as_str_name(), "RANGE_STATE_"),
            note
        );
    }
}

async fn connect(cli: &Cli) -> Result<Client, ClientError> {
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

/// Whether stderr is a terminal, so a progress bar can redraw in place.
fn stderr_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Bold red when stdout is a terminal, plain text otherwise (pipes, files, tests).
fn alarm(text: &str) -> String {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        format!("\x1b[1;31m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    let out = cli.output;
    match &cli.command {
        Command::Hold(h) => return hold(h),
        Command::Exec(e) => exec::run(&cli, e).await,
        Command::Health => {
            let c = connect(&cli).await?;
            let mut h = tonic_health_client(c.channel());
            let r = h
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            if r.status == 1 {
                print_value(out, &json!({"status": "SERVING"}), || println!("SERVING"));
                return Ok(());
            }
            return Err(ClientError::Invalid(format!(
                "not serving (status {})",
                r.status
            )));
        }
        _ => {}
    }
    let mut c = connect(&cli).await?;
    match cli.command {
        Command::Info => {
            let i = c.node_info().await?;
            let caps = i.capabilities.clone().unwrap_or_default();
            let v = json!({
                "agent_version": i.agent_version, "page_size_bytes": i.page_size_bytes,
                "nodes": i.nodes.iter().map(|n| json!({
                    "id": n.id, "cpus": nodes::format(&n.cpus), "memory_total_bytes": n.memory_total_bytes,
                    "memory_free_bytes": n.memory_free_bytes, "distances": n.distances, "allowed": n.allowed,
                    "hugepages": n.hugepages.iter().map(|h| json!({"page_size_bytes": h.page_size_bytes, "total_pages": h.total_pages, "free_pages": h.free_pages})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "capabilities": {
                    "kernel_release": caps.kernel_release, "kvm_usable": caps.kvm_usable, "kvm_error": caps.kvm_error,
                    "guest_memfd_supported": caps.guest_memfd_supported, "guest_memfd_flags": caps.guest_memfd_flags,
                    "guest_memfd_shared_policy": caps.guest_memfd_shared_policy, "memfd_shared_policy": caps.memfd_shared_policy,
                    "hugetlb_shared_policy": caps.hugetlb_shared_policy, "preferred_many_supported": caps.preferred_many_supported,
                    "weighted_interleave_supported": caps.weighted_interleave_supported, "pidfd_getfd_supported": caps.pidfd_getfd_supported,
                    "guest_memfd_interleave_exact": match caps.guest_memfd_interleave_exact {
                        Some(b) => json!(b),
                        None => json!("unknown"),
                    },
                    "guest_memfd_interleave_note": caps.guest_memfd_interleave_note,
                },
            });
            print_value(out, &v, || {
                println!(
                    "memplaced {}  kernel {}  page size {}",
                    i.agent_version,
                    caps.kernel_release,
                    human(i.page_size_bytes)
                );
                println!();
                let ids: Vec<String> = i.nodes.iter().map(|n| format!("{:>4}", n.id)).collect();
                println!(
                    "{:<5} {:<10} {:>12} {:>12} {:<8} distances {}",
                    "NODE",
                    "CPUS",
                    "TOTAL",
                    "FREE",
                    "ALLOWED",
                    ids.join("")
                );
                for n in &i.nodes {
                    let d: Vec<String> = n.distances.iter().map(|d| format!("{d:>4}")).collect();
                    println!(
                        "{:<5} {:<10} {:>12} {:>12} {:<8}           {}",
                        n.id,
                        nodes::format(&n.cpus),
                        human(n.memory_total_bytes),
                        human(n.memory_free_bytes),
                        if n.allowed { "yes" } else { "no" },
                        d.join("")
                    );
                }
                println!();
                let yn = |b: bool| if b { "yes" } else { "no" };
                println!(
                    "KVM usable                 {}{}",
                    yn(caps.kvm_usable),
                    if caps.kvm_error.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", caps.kvm_error)
                    }
                );
                println!(
                    "guest_memfd                {} (flags {:#x})",
                    yn(caps.guest_memfd_supported),
                    caps.guest_memfd_flags
                );
                println!(
                    "guest_memfd shared policy  {}{}",
                    yn(caps.guest_memfd_shared_policy),
                    if caps.guest_memfd_shared_policy {
                        ""
                    } else {
                        "  -> guest_memfd uses the task-policy strategy"
                    }
                );
                println!(
                    "memfd shared policy        {}",
                    yn(caps.memfd_shared_policy)
                );
                println!(
                    "hugetlb shared policy      {}",
                    yn(caps.hugetlb_shared_policy)
                );
                println!(
                    "preferred-many             {}",
                    yn(caps.preferred_many_supported)
                );
                println!(
                    "weighted-interleave        {}",
                    yn(caps.weighted_interleave_supported)
                );
                println!(
                    "fd recovery (pidfd_getfd)  {}",
                    yn(caps.pidfd_getfd_supported)
                );
                println!(
                    "guest_memfd interleave     {}  ({})",
                    match caps.guest_memfd_interleave_exact {
                        Some(true) => "exact",
                        Some(false) => "NOT exact",
                        None => "unknown",
                    },
                    caps.guest_memfd_interleave_note
                );
            });
        }
        Command::Region(RegionCmd::Create {
            vm,
            name,
            size,
            backend,
            hugepage_size,
            policy,
        }) => {
            let mut policies = vec![];
            if let Some(p) = policy {
                let (m, n) = p.split_once(':').unwrap_or((p.as_str(), ""));
                policies.push(pb::RangePolicy {
                    offset: 0,
                    length: 0,
                    policy: Some(memplace_client::policy(memplace_client::parse_mode(m)?, n)?),
                });
            }
            let req = pb::CreateRegionRequest {
                vm_id: vm,
                name,
                size_bytes: parse_size(&size)?,
                backend: parse_backend(&backend)? as i32,
                hugepage_size_bytes: hugepage_size
                    .as_deref()
                    .map(parse_size)
                    .transpose()?
                    .unwrap_or(0),
                policies,
                request_id: memplace_client::new_request_id(),
            };
            let r = c.create_region_with(req).await?;
            let region = r.region.unwrap_or_default();
            let mut v = region_json(&region);
            v["handoff_token"] = json!(r.handoff_token);
            print_value(out, &v, || {
                print_region_table(&region);
                println!("handoff token: {}", r.handoff_token);
            });
        }
        Command::Region(RegionCmd::Get { vm, name }) => {
            let r = c.get_region(&vm, &name).await?;
            print_value(out, &region_json(&r), || print_region_table(&r));
        }
        Command::Region(RegionCmd::List { vm }) => {
            let rs = c.list_regions(&vm).await?;
            let v = Value::Array(rs.iter().map(region_json).collect());
            print_value(out, &v, || {
                println!(
                    "{:<20} {:<16} {:<14} {:>10} {:<14} {:>4} {:<7} {:>6}",
                    "VM", "NAME", "BACKEND", "SIZE", "STRATEGY", "GEN", "STATUS", "RANGES"
                );
                for r in &rs {
                    println!(
                        "{:<20} {:<16} {:<14} {:>10} {:<14} {:>4} {:<7} {:>6}",
                        r.vm_id,
                        r.name,
                        enum_name(r.backend().as_str_name(), "BACKEND_"),
                        human(r.size_bytes),
                        enum_name(r.strategy().as_str_name(), "STRATEGY_"),
                        r.generation,
                        enum_name(r.status().as_str_name(), "REGION_STATUS_"),
                        r.ranges.len()
                    );
                }
            });
        }
        Command::Region(RegionCmd::Delete { vm, name }) => {
            let r = c.delete_region(&vm, &name).await?;
            print_value(out, &region_json(&r), || {
                println!("deleted {}/{}", r.vm_id, r.name)
            });
        }
        Command::Policy(PolicyCmd::Set {
            span,
            mode,
            nodes: n,
            migrate,
            static_nodes,
            relative_nodes,
            expected_generation,
        }) => {
            let mut p = memplace_client::policy(memplace_client::parse_mode(&mode)?, &n)?;
            p.static_nodes = static_nodes;
            p.relative_nodes = relative_nodes;
            let r = c
                .set_policy_with(pb::SetPolicyRequest {
                    vm_id: span.vm.clone(),
                    name: span.name.clone(),
                    offset: parse_size(&span.offset)?,
                    length: parse_size(&span.length)?,
                    policy: Some(p),
                    migrate,
                    expected_generation,
                    request_id: memplace_client::new_request_id(),
                })
                .await?;
            let region = r.region.unwrap_or_default();
            let mut v = region_json(&region);
            v["pages_migrated"] = json!(r.pages_migrated);
            v["pages_migrate_failed"] = json!(r.pages_migrate_failed);
            v["warnings"] = json!(r.warnings);
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            print_value(out, &v, || {
                print_region_table(&region);
                if migrate {
                    println!(
                        "pages migrated: {}  failed: {}",
                        r.pages_migrated, r.pages_migrate_failed
                    );
                }
            });
        }
        Command::Populate(p) => {
            let req = pb::PopulateRequest {
                vm_id: p.span.vm.clone(),
                name: p.span.name.clone(),
                offset: parse_size(&p.span.offset)?,
                length: parse_size(&p.span.length)?,
                threads: p.threads,
                cgroup: p.cgroup.clone(),
                verify: !p.no_verify,
            };
            let start = std::time::Instant::now();
            let show = out == Output::Table && stderr_is_tty();
            let work = c.populate(req, |done, total| {
                if show {
                    let secs = start.elapsed().as_secs_f64().max(0.001);
                    let rate = done as f64 / secs;
                    let eta = if rate > 0.0 {
                        (total.saturating_sub(done)) as f64 / rate
                    } else {
                        0.0
                    };
                    let width = 30usize;
                    let filled = if total > 0 {
                        (done as f64 / total as f64 * width as f64) as usize
                    } else {
                        0
                    };
                    eprint!(
                        "\r[{}{}] {} / {}  {}/s  ETA {:.0}s   ",
                        "#".repeat(filled.min(width)),
                        ".".repeat(width - filled.min(width)),
                        human(done),
                        human(total),
                        human(rate as u64),
                        eta
                    );
                    let _ = std::io::stderr().flush();
                }
            });
            // Ctrl-C drops the stream, which the agent treats as cancellation.
            let s = tokio::select! {
                r = work => r?,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("\ncancelled: pages already allocated stay allocated");
                    return Err(ClientError::Status(tonic::Status::cancelled("cancelled by the user")));
                }
            };
            if show {
                eprintln!();
            }
            let v = json!({"bytes_done": s.bytes_done, "bytes_total": s.bytes_total, "elapsed_seconds": s.elapsed_seconds, "cancelled": s.cancelled, "threads": s.threads, "verified": s.verified,
                "nodes": s.nodes.iter().map(|n| json!({"node": n.node, "pages": n.pages})).collect::<Vec<_>>()});
            print_value(out, &v, || {
                println!(
                    "populated {} of {} in {:.2}s with {} workers ({}/s){}",
                    human(s.bytes_done),
                    human(s.bytes_total),
                    s.elapsed_seconds,
                    s.threads,
                    human((s.bytes_done as f64 / s.elapsed_seconds.max(0.001)) as u64),
                    if s.cancelled { " - cancelled" } else { "" }
                );
                for n in &s.nodes {
                    println!("  node {}: {} pages", n.node, n.pages);
                }
            });
        }
        Command::Placement(span) => {
            let p = c
                .placement(
                    &span.vm,
                    &span.name,
                    parse_size(&span.offset)?,
                    parse_size(&span.length)?,
                )
                .await?;
            let v = json!({
                "page_size_bytes": p.page_size_bytes, "pages_not_present": p.pages_not_present,
                "pages_misplaced": p.pages_misplaced, "pages_unknown": p.pages_unknown,
                "nodes": p.nodes.iter().map(|n| json!({"node": n.node, "pages": n.pages})).collect::<Vec<_>>(),
                "ranges": p.ranges.iter().map(|r| json!({"offset": r.offset, "length": r.length, "pages_not_present": r.pages_not_present, "pages_misplaced": r.pages_misplaced, "pages_unknown": r.pages_unknown,
                    "nodes": r.nodes.iter().map(|n| json!({"node": n.node, "pages": n.pages})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
            });
            print_value(out, &v, || {
                let present: u64 = p.nodes.iter().map(|n| n.pages).sum();
                let all = present + p.pages_not_present + p.pages_unknown;
                println!(
                    "{}/{}: {} pages of {} ({} allocated)",
                    span.vm,
                    span.name,
                    all,
                    human(p.page_size_bytes),
                    human(present * p.page_size_bytes)
                );
                for n in &p.nodes {
                    let frac = if all > 0 {
                        n.pages as f64 / all as f64
                    } else {
                        0.0
                    };
                    let bar = "#".repeat((frac * 40.0).round() as usize);
                    println!(
                        "  node {:<3} {:>10} pages {:>10}  {:<40} {:5.1}%",
                        n.node,
                        n.pages,
                        human(n.pages * p.page_size_bytes),
                        bar,
                        frac * 100.0
                    );
                }
                println!("  not allocated {:>8} pages", p.pages_not_present);
                if p.ranges.len() > 1 {
                    for r in &p.ranges {
                        let nodes: Vec<String> = r
                            .nodes
                            .iter()
                            .map(|n| format!("node {}: {}", n.node, n.pages))
                            .collect();
                        let line = format!(
                            "  range {:#x}+{}: {}; {} not allocated, {} misplaced",
                            r.offset,
                            human(r.length),
                            if nodes.is_empty() {
                                "no pages".into()
                            } else {
                                nodes.join(", ")
                            },
                            r.pages_not_present,
                            r.pages_misplaced
                        );
                        if r.pages_misplaced > 0 {
                            println!("{}", alarm(&line));
                        } else {
                            println!("{line}");
                        }
                    }
                }
                if p.pages_unknown > 0 {
                    println!("  unknown node  {:>8} pages", p.pages_unknown);
                }
                if p.pages_misplaced > 0 {
                    let line = format!(
                        "  MISPLACED     {:>8} pages on nodes the policy does not allow",
                        p.pages_misplaced
                    );
                    println!("{}", alarm(&line));
                } else {
                    println!("  misplaced     {:>8} pages", 0);
                }
            });
        }
        Command::Token { vm } => {
            let token = c.issue_handoff_token(&vm).await?;
            let v = json!({"vm_id": vm, "handoff_token": token});
            print_value(out, &v, || println!("{token}"));
        }
        Command::Reconcile { vm } => {
            let r = c.reconcile(&vm).await?;
            let v = json!({"regions_checked": r.regions_checked, "ranges_checked": r.ranges_checked, "ranges_drifted": r.ranges_drifted, "ranges_reapplied": r.ranges_reapplied, "ranges_failed": r.ranges_failed, "ranges_task_policy": r.ranges_task_policy, "ranges_lost": r.ranges_lost, "ranges_unmapped": r.ranges_unmapped});
            print_value(out, &v, || {
                println!(
                    "checked {} ranges in {} regions: {} drifted, {} re-applied, {} failed; not checked: {} task-policy, {} lost, {} unmapped",
                    r.ranges_checked,
                    r.regions_checked,
                    r.ranges_drifted,
                    r.ranges_reapplied,
                    r.ranges_failed,
                    r.ranges_task_policy,
                    r.ranges_lost,
                    r.ranges_unmapped
                )
            });
        }
        Command::Events { vm, after, follow } => {
            let mut s = c
                .watch_events(pb::WatchEventsRequest {
                    vm_id: vm,
                    after_sequence: after,
                    no_follow: !follow,
                })
                .await?;
            if out == Output::Table {
                println!(
                    "{:>6}  {:<23}  {:<15} {:<24} {:<9} MESSAGE",
                    "SEQ", "TIME (UTC)", "KIND", "REGION", "ACTOR"
                );
            }
            while let Some(e) = s.message().await? {
                let kind = enum_name(e.kind().as_str_name(), "EVENT_KIND_");
                let v = json!({"sequence": e.sequence, "time_unix_ms": e.time_unix_ms, "kind": kind, "vm_id": e.vm_id, "name": e.name, "message": e.message, "actor": e.actor});
                match out {
                    Output::Table => println!(
                        "{:>6}  {:<23}  {:<15} {:<24} {:<9} {}",
                        e.sequence,
                        utc_time(e.time_unix_ms),
                        kind,
                        if e.vm_id.is_empty() {
                            "-".to_string()
                        } else {
                            format!("{}/{}", e.vm_id, e.name)
                        },
                        e.actor,
                        e.message,
                    ),
                    // One object per line, so `--follow` output can be read line by line.
                    Output::Json => println!("{v}"),
                    // One YAML document per event.
                    Output::Yaml => {
                        print!("---\n{}", serde_yaml::to_string(&v).unwrap_or_default())
                    }
                }
            }
        }
        Command::Attach(a) => attach::attach(&mut c, &a, out).await?,
        Command::Hold(_) | Command::Health | Command::Exec(_) => unreachable!("handled above"),
    }
    Ok(())
}

use tonic_health_shim::{HealthCheckRequest, tonic_health_client};

/// A minimal grpc.health.v1 client, so the CLI needs no extra generated code.
mod tonic_health_shim {
    use tonic::codegen::http;
    /// grpc.health.v1.HealthCheckRequest.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HealthCheckRequest {
        /// Service name; empty for the whole server.
        #[prost(string, tag = "1")]
        pub service: String,
    }
    /// grpc.health.v1.HealthCheckResponse.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HealthCheckResponse {
        /// 1 = SERVING.
        #[prost(int32, tag = "1")]
        pub status: i32,
    }
    /// The client.
    pub struct Health(tonic::client::Grpc<tonic::transport::Channel>);
    /// Makes a client on a channel.
    pub fn tonic_health_client(ch: tonic::transport::Channel) -> Health {
        Health(tonic::client::Grpc::new(ch))
    }
    impl Health {
        /// grpc.health.v1.Health/Check.
        pub async fn check(
            &mut self,
            req: HealthCheckRequest,
        ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
            self.0
                .ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let codec = tonic_prost::ProstCodec::default();
            let path = http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
            self.0.unary(tonic::Request::new(req), path, codec).await
        }
    }
}

fn hold(h: &HoldArgs) -> Result<(), ClientError> {
    use memplace_sys::{GuestMemfdVm, Mapping};
    use std::os::fd::AsFd;
    let conn = Handoff::connect(&h.handoff_socket)?;
    let got = conn.acquire(&h.vm, &h.name, &h.token)?;
    let size = got.region.size_bytes;
    let map = std::sync::Arc::new(
        Mapping::new(got.fd.as_fd(), size)
            .map_err(|e| ClientError::Handoff(format!("mmap: {}", e.desc())))?,
    );
    let touch = h
        .touch
        .as_deref()
        .map(parse_size)
        .transpose()?
        .unwrap_or(0)
        .min(size);
    let page = memplace_sys::page_size();
    let pattern_byte =
        |seed: u64, off: u64| ((off / page).wrapping_mul(31).wrapping_add(seed) & 0xff) as u8;
    if touch > 0 {
        map.populate_write(0, touch.div_ceil(page) * page)
            .map_err(|e| ClientError::Handoff(format!("touching memory: {}", e.desc())))?;
        if let Some(seed) = h.pattern {
            let mut off = 0;
            while off < touch {
                map.write(off, &[pattern_byte(seed, off)])
                    .map_err(|e| ClientError::Handoff(e.desc().into()))?;
                off += page;
            }
        }
    }
    let mut _vm = None;
    if h.bind_memslot {
        let vm_fd = got.vm_fd.ok_or_else(|| {
            ClientError::Handoff(
                "no VM fd came with the region: a KVM VM fd answers only in the process that \
                     created it, and a guest_memfd binds only to the VM it was created on, so a \
                     guest_memfd the agent made cannot back a memslot of this VMM's VM; create it \
                     in the VMM and hand it in with adopt"
                    .into(),
            )
        })?;
        let vm = GuestMemfdVm::from_fd(vm_fd)
            .map_err(|e| ClientError::Handoff(format!("VM fd: {}", e.desc())))?;
        vm.bind_memslot(0, 0, map.clone(), got.fd.as_fd())
            .map_err(|e| {
                ClientError::Handoff(format!(
                    "binding memslot 0 to the guest_memfd: {}",
                    e.desc()
                ))
            })?;
        println!("memslot bound");
        _vm = Some(vm);
    }
    // `run` is already on the multi-threaded runtime: block this worker in place rather than
    // starting a second runtime. The signal handlers exist before "holding" is printed, so a
    // caller that waits for that line may signal at once.
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).map_err(|e| ClientError::Handoff(e.to_string()))?;
            let mut int = signal(SignalKind::interrupt()).map_err(|e| ClientError::Handoff(e.to_string()))?;
            let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| ClientError::Handoff(e.to_string()))?;
            println!(
                "holding {}/{} ({} bytes) pid {}",
                h.vm,
                h.name,
                size,
                std::process::id()
            );
            let _ = std::io::stdout().flush();
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = usr1.recv() => {
                        let ok = match h.pattern {
                            Some(seed) => {
                                let mut off = 0;
                                let mut good = true;
                                let mut b = [0u8; 1];
                                while off < touch {
                                    if map.read(off, &mut b).is_err() || b[0] != pattern_byte(seed, off) { good = false; break; }
                                    off += page;
                                }
                                good
                            }
                            None => true,
                        };
                        println!("pattern {}", if ok { "ok" } else { "BAD" });
                        let _ = std::io::stdout().flush();
                    }
                }
            }
            Ok::<_, ClientError>(())
        })
    })?;
    drop(map);
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memplacectl: {e}");
            match e.code() {
                Some(code) => ExitCode::from(10 + code as u8),
                None => ExitCode::from(1),
            }
        }
    }
}
