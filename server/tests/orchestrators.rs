//! The orchestrator flow — nodes, create, bind, populate, verify, hand off — run against the
//! real agent by the Rust example (client/examples/orchestrator.rs) and by a Python client
//! generated from proto/ with grpcio-tools (server/tests/py/orchestrator.py).

mod common;

use common::{AgentProc, MIB};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The built example, beside memplaced (cargo test builds the workspace's examples).
fn example_path() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_memplaced"));
    let p = exe.with_file_name("examples").join("orchestrator");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p memplace-client --examples`",
        p.display()
    );
    p
}

/// Checks what an orchestrator printed and what the agent now holds for `vm`.
async fn check_flow(agent: &AgentProc, vm: &str, summary: &Value, holder_pid: u64) {
    let regions = summary["regions"]
        .as_array()
        .expect("regions in the summary");
    assert_eq!(regions.len(), 2, "{summary}");
    for (guest, r) in regions.iter().enumerate() {
        assert_eq!(r["guest_node"], guest, "{r}");
        // One host node here: both guest nodes land on node 0.
        assert_eq!(r["host_node"], 0, "{r}");
        assert_eq!(r["size_bytes"], 8 * MIB, "{r}");
        assert_eq!(r["pages_on_node"], 8 * MIB / 4096, "{r}");
    }
    let mut c = agent.client().await;
    let listed = c.list_regions(vm).await.unwrap();
    let names: Vec<&str> = listed.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["ram-node0", "ram-node1"]);
    for r in &listed {
        // The agent recorded the orchestrator's process as the holder of each fd.
        assert_eq!(r.holder_pid as u64, holder_pid, "{r:?}");
        let placement = c.placement(vm, &r.name, 0, 0).await.unwrap();
        assert_eq!(placement.pages_misplaced, 0);
        assert_eq!(placement.pages_not_present, 0);
    }
}

/// Runs `cmd` with stdout captured; returns its pid and JSON summary, failing with its stderr.
fn run_json(mut cmd: Command, what: &str) -> (u64, Value) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let pid = u64::from(child.id());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed no JSON summary ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (pid, summary)
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_example_orchestrator_flow() {
    let agent = AgentProc::start();
    let mut cmd = Command::new(example_path());
    cmd.arg("--socket")
        .arg(agent.socket())
        .arg("--handoff-socket")
        .arg(agent.handoff_socket())
        .args(["--vm", "vm-rs", "--node-mib", "8"]);
    let (pid, summary) = run_json(cmd, "the orchestrator example");
    check_flow(&agent, "vm-rs", &summary, pid).await;

    // With --cleanup it lets go of the fds and deletes what it made.
    let mut cmd = Command::new(example_path());
    cmd.arg("--socket")
        .arg(agent.socket())
        .arg("--handoff-socket")
        .arg(agent.handoff_socket())
        .args(["--vm", "vm-tmp", "--node-mib", "8", "--cleanup"]);
    let (_, summary) = run_json(cmd, "the orchestrator example with --cleanup");
    assert_eq!(summary["cleaned_up"], true);
    let mut c = agent.client().await;
    assert!(c.list_regions("vm-tmp").await.unwrap().is_empty());
}

/// Python with grpcio-tools, or a clear failure naming what to install.
fn python_with_grpc_tools() {
    let probe = Command::new("python3")
        .args([
            "-c",
            "import grpc, grpc_tools.protoc, socket; socket.recv_fds",
        ])
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed for the Python client test: {e}"));
    assert!(
        probe.status.success(),
        "the Python client test needs grpcio-tools (python3 -m pip install grpcio-tools) and \
         Python 3.9+ (socket.recv_fds): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn python_client_generated_from_the_protos_runs_the_same_flow() {
    python_with_grpc_tools();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let gen_dir = tempfile::tempdir().unwrap();
    let protos: Vec<PathBuf> = std::fs::read_dir(repo.join("proto/memplace/v1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    assert_eq!(protos.len(), 3, "{protos:?}");
    let out = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", repo.join("proto").display()))
        .arg(format!("--python_out={}", gen_dir.path().display()))
        .arg(format!("--grpc_python_out={}", gen_dir.path().display()))
        .args(&protos)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grpc_tools.protoc failed on proto/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        gen_dir
            .path()
            .join("memplace/v1/agent_pb2_grpc.py")
            .exists()
    );

    let agent = AgentProc::start();
    let mut cmd = Command::new("python3");
    cmd.arg(repo.join("server/tests/py/orchestrator.py"))
        .arg(agent.socket())
        .arg(agent.handoff_socket())
        .args(["vm-py", "8"])
        .env("PYTHONPATH", gen_dir.path());
    let (pid, summary) = run_json(cmd, "the Python orchestrator");
    check_flow(&agent, "vm-py", &summary, pid).await;
    assert!(
        summary["not_found"]
            .as_str()
            .is_some_and(|m| m.contains("not found")),
        "{summary}"
    );
}
