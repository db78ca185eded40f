//! The deployment artifacts under deploy/ are valid and say what the agent needs.
//!
//! The checks themselves are Python scripts in deploy/tests/ (the Kubernetes schemas come from
//! the PyPI package kubernetes-validate); these tests run them and fail with their output.
//! `deploy_checks_catch_broken_manifests` breaks the manifests one line at a time to prove the
//! checks can fail, and `agent_accepts_the_deployed_config_files` has the real memplaced
//! parse every config file the deployment ships.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("server/ has a parent")
        .to_path_buf()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Fails with a clear message when python3 or one of its needed packages is missing.
fn require_python_module(module: &str, install: &str) {
    let probe = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output();
    match probe {
        Err(e) => panic!("python3 is needed for the deploy checks and could not run: {e}"),
        Ok(out) if !out.status.success() => panic!(
            "the Python module {module} is missing, so the deploy manifests cannot be checked.\n\
             Install it with: {install}\n{}",
            text(&out)
        ),
        Ok(_) => {}
    }
}

/// Runs deploy/tests/SCRIPT with the repository root (and extra args) and requires success.
fn run_check(script: &str, extra: &[&str]) {
    require_python_module("yaml", "pip install pyyaml");
    let root = repo_root();
    let out = Command::new("python3")
        .arg(root.join("deploy/tests").join(script))
        .arg(&root)
        .args(extra)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("could not run python3 {script}: {e}"));
    let log = text(&out);
    println!("{log}");
    assert!(
        out.status.success(),
        "deploy/tests/{script} failed ({}):\n{log}",
        out.status
    );
}

#[test]
fn kubernetes_manifests_render_and_validate() {
    require_python_module("kubernetes_validate", "pip install kubernetes-validate");
    run_check("validate_k8s.py", &[]);
}

#[test]
fn dockerfile_parses_and_copies_what_exists() {
    run_check("check_dockerfile.py", &[]);
}

#[test]
fn systemd_unit_is_hardened_and_verifies() {
    // systemd-analyze verify needs ExecStart to exist: the check points a temporary copy of
    // the unit at the memplaced that cargo built for this test.
    run_check("check_systemd.py", &[env!("CARGO_BIN_EXE_memplaced")]);
}

#[test]
fn deploy_checks_catch_broken_manifests() {
    require_python_module("kubernetes_validate", "pip install kubernetes-validate");
    run_check("mutations.py", &[]);
}

/// Runs memplaced with args; kills it if it has not exited within the timeout (a memplaced
/// that ignored --check-config would start serving instead).
fn run_agent(args: &[&Path], flags: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_memplaced"));
    // Only the file under test may configure it: memplaced reads MEMPLACE_* variables too.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MEMPLACE_") {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .args(args)
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start memplaced");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().expect("wait for memplaced").is_some() {
            let out = child.wait_with_output().expect("memplaced output");
            return (out.status.code(), text(&out));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("memplaced output");
            panic!(
                "memplaced {args:?} {flags:?} was still running after 20 s: --check-config must \
                 check and exit\n{}",
                text(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agent_accepts_the_deployed_config_files() {
    let root = repo_root();
    let files = [
        "deploy/kubernetes/base/memplaced.toml",
        "deploy/kubernetes/overlays/example/memplaced.toml",
        "deploy/systemd/memplaced.toml",
    ];
    for file in files {
        let path = root.join(file);
        let (code, log) = run_agent(&[Path::new("--config"), &path], &["--check-config"]);
        assert_eq!(
            code,
            Some(0),
            "memplaced --config {file} --check-config rejected a shipped config:\n{log}"
        );
    }

    // The control: the same check must reject what the agent does not know, or the loop
    // above proved nothing.
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("unknown-key.toml");
    std::fs::write(&bad, "log_format = \"json\"\nno_such_key = 1\n").expect("write config");
    let (code, log) = run_agent(&[Path::new("--config"), &bad], &["--check-config"]);
    assert!(
        code.is_some_and(|c| c != 0),
        "memplaced --check-config accepted an unknown key (exit {code:?}), so it does not \
         check the config file (deny_unknown_fields):\n{log}"
    );
}
