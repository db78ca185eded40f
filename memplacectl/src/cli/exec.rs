//! `memplacectl exec VM_ID [--region NAME]... -- PROGRAM [ARGS...]`: starts a VMM on a VM's
//! regions.
//!
//! It gets the VM's handoff token (IssueHandoffToken), acquires each region over the handoff
//! socket, clears CLOEXEC on the fds it got, puts their numbers into the arguments, and execs
//! PROGRAM in this same process. The agent recorded this process (pid and start time, which exec
//! keeps) as the holder of every region, so the holder it knows is the VMM itself: after an agent
//! restart it takes the files back from the VMM.
//!
//! Everything that can be checked is checked before the first acquire, so a bad placeholder, an
//! unknown or LOST region or a missing PROGRAM leaves no holder recorded and runs nothing.

use super::{Cli, connect};
use clap::Args;
use memplace_client::handoff::Handoff;
use memplace_client::pb;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// What `exec --help` prints after the options.
pub const AFTER_HELP: &str = "\
Placeholders, replaced in PROGRAM and in every ARG:
  {fd:NAME}    the number of the fd that holds region NAME, e.g. 7
  {path:NAME}  /proc/self/fd/N for that fd: a path the VMM can open, e.g.
               QEMU:             -object memory-backend-file,id=m0,size=1G,mem-path={path:ram0},share=on
                                 -machine memory-backend=m0
               Cloud Hypervisor: --memory-zone id=z0,size=1G,file={path:ram0},shared=on
               crosvm:           --file-backed-mapping {path:ram0},addr=0x100000000,size=0x40000000,rw,ram
  Any other {WORD:...} with WORD in lowercase letters is an error. Other braces (QEMU's JSON
  syntax, for instance) are left alone. A NAME must be one of the regions being acquired.

The regions are those of --region, or every region of VM_ID. The fds stay open across the exec,
and PROGRAM runs in this process, so the agent records the VMM itself as the holder of each region
and takes the files back from it after a restart. Do not give QEMU host-nodes= or policy= on this
memory: QEMU would mbind the shared file and replace memplace's policy.

Exit codes before PROGRAM runs (PROGRAM is then not executed):
  1    cannot reach the agent or the handoff socket, or another local error
  2    bad usage
  3    unknown placeholder: a {WORD:..} other than fd and path, or a NAME not being acquired
  4    unknown region: a --region the VM does not have, or a VM with no regions
  5    a region is LOST (its memory did not survive an agent restart): delete and recreate it
  6    the handoff socket refused an acquire (its code and message are printed)
  10+  the agent refused IssueHandoffToken or ListRegions: 10 + the gRPC code
  126  PROGRAM cannot be executed
  127  PROGRAM not found
Once PROGRAM runs, the exit status is PROGRAM's own.";

/// Exit codes of `exec` (see [`AFTER_HELP`]).
pub mod code {
    /// A local error.
    pub const LOCAL: u8 = 1;
    /// Unknown placeholder.
    pub const PLACEHOLDER: u8 = 3;
    /// Unknown region.
    pub const REGION: u8 = 4;
    /// A LOST region.
    pub const LOST: u8 = 5;
    /// The handoff socket refused an acquire.
    pub const REFUSED: u8 = 6;
    /// PROGRAM cannot be executed.
    pub const NOT_EXECUTABLE: u8 = 126;
    /// PROGRAM not found.
    pub const NOT_FOUND: u8 = 127;
}

/// `memplacectl exec`.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// VM id.
    #[arg(value_name = "VM_ID")]
    pub vm: String,
    /// A region to acquire (repeatable) [default: every region of the VM].
    #[arg(long = "region", value_name = "NAME")]
    pub regions: Vec<String>,
    /// Handoff socket [default: handoff.sock beside --socket].
    #[arg(long, env = "MEMPLACE_HANDOFF_SOCKET")]
    pub handoff_socket: Option<PathBuf>,
    /// The VMM and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    pub command: Vec<OsString>,
}

/// Why exec stopped before running PROGRAM.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

impl From<memplace_client::ClientError> for Failure {
    fn from(e: memplace_client::ClientError) -> Self {
        let code = e.code().map_or(code::LOCAL, |c| 10 + c as u8);
        fail(code, e.to_string())
    }
}

/// One piece of an argument: literal bytes, or a placeholder.
#[derive(Debug, PartialEq, Eq)]
enum Piece {
    Text(Vec<u8>),
    Fd(String),
    Path(String),
}

/// Splits an argument into text and placeholders. `{WORD:NAME}` with WORD of lowercase ASCII
/// letters is a placeholder: `fd` and `path` are known, any other WORD is an error, as is one
/// without its closing brace. Every other brace is text.
fn parse_arg(arg: &OsStr) -> Result<Vec<Piece>, String> {
    let bytes = arg.as_bytes();
    let mut pieces = Vec::new();
    let mut text = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'{' {
            let word_len = bytes[i + 1..]
                .iter()
                .take_while(|b| b.is_ascii_lowercase())
                .count();
            let colon = i + 1 + word_len;
            if word_len > 0 && bytes.get(colon) == Some(&b':') {
                let word = String::from_utf8_lossy(&bytes[i + 1..colon]).into_owned();
                let Some(close) = bytes[colon + 1..].iter().position(|&b| b == b'}') else {
                    return Err(format!(
                        "placeholder {{{word}:... in {:?} has no closing brace",
                        arg
                    ));
                };
                let name =
                    String::from_utf8_lossy(&bytes[colon + 1..colon + 1 + close]).into_owned();
                let piece = match word.as_str() {
                    "fd" => Piece::Fd(name),
                    "path" => Piece::Path(name),
                    _ => {
                        return Err(format!(
                            "unknown placeholder {{{word}:{name}}} in {arg:?}: the placeholders \
                             are {{fd:NAME}} and {{path:NAME}}"
                        ));
                    }
                };
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(piece);
                i = colon + 1 + close + 1;
                continue;
            }
        }
        text.push(bytes[i]);
        i += 1;
    }
    if !text.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

fn placeholder_names(args: &[Vec<Piece>]) -> impl Iterator<Item = (&str, &str)> {
    args.iter().flatten().filter_map(|p| match p {
        Piece::Fd(n) => Some(("fd", n.as_str())),
        Piece::Path(n) => Some(("path", n.as_str())),
        Piece::Text(_) => None,
    })
}

/// Joins the pieces back, with each region's fd number in place of its placeholders.
fn render(pieces: &[Piece], fds: &BTreeMap<String, i32>) -> OsString {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Text(t) => out.extend_from_slice(t),
            // Every name was checked against the acquired regions before.
            Piece::Fd(n) => out.extend_from_slice(fds[n].to_string().as_bytes()),
            Piece::Path(n) => out.extend_from_slice(format!("/proc/self/fd/{}", fds[n]).as_bytes()),
        }
    }
    OsString::from_vec(out)
}

/// Finds PROGRAM as execvp will: a name with a slash is a path, any other is looked up in PATH.
fn resolve_program(program: &OsStr) -> Result<PathBuf, Failure> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.as_bytes().contains(&b'/') {
        let p = PathBuf::from(program);
        if !p.exists() {
            return Err(fail(
                code::NOT_FOUND,
                format!("PROGRAM {} not found", p.display()),
            ));
        }
        if !executable(&p) {
            return Err(fail(
                code::NOT_EXECUTABLE,
                format!("PROGRAM {} is not an executable file", p.display()),
            ));
        }
        return Ok(p);
    }
    if program.is_empty() {
        return Err(fail(code::NOT_FOUND, "PROGRAM is empty"));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| {
            fail(
                code::NOT_FOUND,
                format!("PROGRAM {program:?} not found in PATH"),
            )
        })
}

/// The handoff socket: --handoff-socket, or handoff.sock beside --socket.
fn handoff_path(cli: &Cli, args: &ExecArgs) -> PathBuf {
    match &args.handoff_socket {
        Some(p) => p.clone(),
        None => Path::new(&cli.socket)
            .parent()
            .unwrap_or(Path::new(""))
            .join("handoff.sock"),
    }
}

/// Runs `exec`: on success this process becomes PROGRAM and never returns. On failure it prints
/// the reason and exits with its code, having executed nothing.
pub async fn run(cli: &Cli, args: &ExecArgs) -> ! {
    let Err(f) = prepare_and_exec(cli, args).await;
    eprintln!("memplacectl exec: {}", f.message);
    std::process::exit(i32::from(f.code));
}

async fn prepare_and_exec(cli: &Cli, args: &ExecArgs) -> Result<std::convert::Infallible, Failure> {
    // 1. Placeholders and PROGRAM, before talking to the agent.
    let parsed: Vec<Vec<Piece>> = args
        .command
        .iter()
        .map(|a| parse_arg(a))
        .collect::<Result<_, _>>()
        .map_err(|m| fail(code::PLACEHOLDER, m))?;
    let program = args
        .command
        .first()
        .ok_or_else(|| fail(2, "no PROGRAM after --"))?;
    if placeholder_names(&parsed[..1]).next().is_none() {
        resolve_program(program)?;
    }

    // 2. The VM's token (the agent checks the VM id; an empty one would list every VM's
    // regions), its regions, and which to acquire.
    let mut client = connect(cli).await?;
    let token = client.issue_handoff_token(&args.vm).await?;
    let all = client.list_regions(&args.vm).await?;
    let selected = select(&args.vm, &all, &args.regions, &parsed)?;
    // PROGRAM with a placeholder in it is resolved once the fd numbers are known.

    // 3. One acquire per region. Each fd stays open across the exec.
    drop(client);
    let socket = handoff_path(cli, args);
    let handoff = Handoff::connect(&socket).map_err(|e| fail(code::LOCAL, e.to_string()))?;
    let (held, fds) = acquire_all(&handoff, &args.vm, &selected, &token)?;
    drop(handoff);

    // 4. Arguments, then exec. The fds in `held` stay open in PROGRAM.
    let argv: Vec<OsString> = parsed.iter().map(|p| render(p, &fds)).collect();
    resolve_program(&argv[0])?;
    let err = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
    let code = match err.kind() {
        std::io::ErrorKind::NotFound => code::NOT_FOUND,
        _ => code::NOT_EXECUTABLE,
    };
    drop(held);
    Err(fail(code, format!("executing {:?}: {err}", argv[0])))
}

/// The regions to acquire: all of the VM's, or those named with --region. Every placeholder must
/// name one of them, and none may be LOST.
fn select<'a>(
    vm: &str,
    all: &'a [pb::Region],
    regions: &[String],
    parsed: &[Vec<Piece>],
) -> Result<Vec<&'a pb::Region>, Failure> {
    let names_of = |rs: &[pb::Region]| {
        rs.iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if all.is_empty() {
        return Err(fail(
            code::REGION,
            format!("VM {} has no regions: create one first", vm),
        ));
    }
    let selected: Vec<&pb::Region> = if regions.is_empty() {
        all.iter().collect()
    } else {
        let wanted: BTreeSet<&str> = regions.iter().map(String::as_str).collect();
        let mut chosen = Vec::new();
        for name in wanted {
            match all.iter().find(|r| r.name == name) {
                Some(r) => chosen.push(r),
                None => {
                    return Err(fail(
                        code::REGION,
                        format!(
                            "VM {} has no region {name:?} (its regions: {})",
                            vm,
                            names_of(all)
                        ),
                    ));
                }
            }
        }
        chosen
    };
    for (kind, name) in placeholder_names(parsed) {
        if selected.iter().any(|r| r.name == name) {
            continue;
        }
        let hint = if all.iter().any(|r| r.name == name) {
            format!("add --region {name}")
        } else {
            format!("VM {} has no region {name:?}", vm)
        };
        return Err(fail(
            code::PLACEHOLDER,
            format!(
                "unknown placeholder {{{kind}:{name}}}: {name:?} is not a region being acquired \
                 ({}); {hint}",
                selected
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if let Some(r) = selected
        .iter()
        .find(|r| r.status() == pb::RegionStatus::Lost)
    {
        return Err(fail(
            code::LOST,
            format!(
                "region {}/{} is LOST: its memory did not survive an agent restart; delete and \
                 recreate it",
                r.vm_id, r.name
            ),
        ));
    }
    Ok(selected)
}

/// One acquire per region, each fd made to stay open across the exec. Returns the fds and each
/// region's fd number.
fn acquire_all(
    handoff: &Handoff,
    vm: &str,
    selected: &[&pb::Region],
    token: &str,
) -> Result<(Vec<OwnedFd>, BTreeMap<String, i32>), Failure> {
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut fds: BTreeMap<String, i32> = BTreeMap::new();
    for r in selected {
        let got = handoff.acquire(vm, &r.name, token).map_err(|e| {
            let before = if fds.is_empty() {
                String::new()
            } else {
                format!(
                    "; already acquired: {} (the agent recorded this process, which now exits \
                     without running PROGRAM, as their holder until the next acquire)",
                    fds.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            fail(
                code::REFUSED,
                format!("acquiring {}/{}: {e}{before}", vm, r.name),
            )
        })?;
        fcntl(&got.fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(|e| {
            fail(
                code::LOCAL,
                format!("clearing FD_CLOEXEC on {}: {}", r.name, e.desc()),
            )
        })?;
        fds.insert(r.name.clone(), got.fd.as_raw_fd());
        held.push(got.fd);
        // A VM fd is of no use in another process (KVM answers only its creator): `got.vm_fd`
        // is dropped, and so closed, here.
    }
    Ok((held, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<Piece>, String> {
        parse_arg(OsStr::new(s))
    }

    #[test]
    fn placeholders_are_found_and_other_braces_left_alone() {
        assert_eq!(
            parse("mem-path={path:ram0},share=on").unwrap(),
            vec![
                Piece::Text(b"mem-path=".to_vec()),
                Piece::Path("ram0".into()),
                Piece::Text(b",share=on".to_vec()),
            ]
        );
        assert_eq!(
            parse("{fd:a}{fd:b}").unwrap(),
            vec![Piece::Fd("a".into()), Piece::Fd("b".into())]
        );
        let json = r#"{"qom-type":"memory-backend-ram","id":"m0"}"#;
        assert_eq!(parse(json).unwrap(), vec![Piece::Text(json.into())]);
        assert_eq!(parse("").unwrap(), vec![Piece::Text(vec![])]);
        assert_eq!(
            parse("{X:y} {:z}").unwrap(),
            vec![Piece::Text(b"{X:y} {:z}".to_vec())]
        );
    }

    #[test]
    fn unknown_or_unclosed_placeholders_are_errors() {
        let e = parse("size={size:ram0}").unwrap_err();
        assert!(e.contains("unknown placeholder {size:ram0}"), "{e}");
        let e = parse("x{fd:ram0").unwrap_err();
        assert!(e.contains("no closing brace"), "{e}");
    }

    #[test]
    fn rendering_puts_in_fd_numbers_and_paths() {
        let fds = BTreeMap::from([("ram0".to_string(), 7)]);
        let p = parse("fd={fd:ram0} path={path:ram0}").unwrap();
        assert_eq!(render(&p, &fds), "fd=7 path=/proc/self/fd/7");
    }
}
