#!/usr/bin/env python3
"""Prove the deploy checks can fail: break one thing at a time and expect the right complaint.

Each mutation copies deploy/ (and the workspace files the Dockerfile check reads) into a
temporary tree, changes one line, runs the checker on that tree, and requires exit status 1
with the expected message. A checker that passed a broken manifest would make this fail.

Usage: mutations.py [REPO_ROOT]
"""

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

DS = "deploy/kubernetes/base/daemonset.yaml"
BASE_TOML = "deploy/kubernetes/base/memplaced.toml"
OVERLAY_PATCH = "deploy/kubernetes/overlays/example/daemonset-kvm-device-plugin.yaml"
VMM = "deploy/kubernetes/examples/vmm-pod.yaml"
BASE_KUSTOMIZATION = "deploy/kubernetes/base/kustomization.yaml"
DOCKERFILE = "deploy/Dockerfile"
UNIT = "deploy/systemd/memplaced.service"

K8S, DOCKER, SYSTEMD = "validate_k8s.py", "check_dockerfile.py", "check_systemd.py"

# (checker, file, text to replace, replacement, expected message)
MUTATIONS = [
    (K8S, DS, "hostPID: true", "hostPID: false", "hostPID must be true"),
    (K8S, DS, "hostPID: true", "hostPid: true", "is invalid for Kubernetes"),
    (K8S, DS, "                - SYS_NICE\n", "                - SYS_NICE\n                - SYS_ADMIN\n",
     "capabilities.add must be exactly"),
    (K8S, DS, "privileged: false", "privileged: true", "must not be privileged"),
    (K8S, DS, "type: CharDevice", "type: File", "must have type CharDevice"),
    (K8S, DS, "path: /sys\n", "path: /\n", "hostPath / is not one the agent needs"),
    (K8S, DS, "seccompProfile:\n              type: Unconfined",
     "seccompProfile:\n              type: RuntimeDefault", "RuntimeDefault blocks move_pages"),
    (K8S, DS, "priorityClassName: system-node-critical", "priorityClassName: system-cluster-critical",
     "priorityClassName must be system-node-critical"),
    (K8S, DS, "maxUnavailable: 1", "maxUnavailable: 2", "maxUnavailable must be 1"),
    (K8S, DS, "maxSurge: 0", "maxSurge: 1", "maxSurge must be 0"),
    (K8S, DS, "terminationGracePeriodSeconds: 15", "terminationGracePeriodSeconds: 30",
     "terminationGracePeriodSeconds must be"),
    (K8S, DS, "livenessProbe:", "x-livenessProbe:", "livenessProbe is missing"),
    (K8S, DS, '"/run/memplace/memplace.sock", "health"]\n            periodSeconds: 10\n            timeoutSeconds: 5\n            failureThreshold: 2',
     '"/tmp/memplace.sock", "health"]\n            periodSeconds: 10\n            timeoutSeconds: 5\n            failureThreshold: 2',
     "readinessProbe must exec"),
    (K8S, DS, "              cpu: 100m\n              memory: 128Mi", "              cpu: 100m\n              memory: 2Gi",
     "memory request must be below the limit"),
    (K8S, BASE_TOML, "shutdown_grace_secs = 10", "shutdown_grace_secs = 20",
     "terminationGracePeriodSeconds must be"),
    (K8S, BASE_TOML, 'log_format = "json"', 'log_format = "json"\nbogus_key = 1', "unknown key 'bogus_key'"),
    (K8S, BASE_TOML, 'log_format = "json"', 'log_format = "human"', "log_format must be json"),
    (K8S, BASE_TOML, 'metrics_addr = "0.0.0.0:9464"', 'metrics_addr = "0.0.0.0:9000"',
     "metrics containerPort is not metrics_addr's port"),
    (K8S, OVERLAY_PATCH, "          volumeMounts:\n            - mountPath: /dev/kvm\n              $patch: delete\n", "",
     "volumeMount /dev/kvm names no volume"),
    (K8S, VMM, "path: /run/memplace\n        type: Directory", "path: /run/memplace/handoff.sock\n        type: Socket",
     "mounts a socket file"),
    # Rendered by the real kustomize: a missing resource fails the build, and a renamed generator
    # no longer matches the name the DaemonSet mounts (kustomize rewrites only matching names).
    (K8S, BASE_KUSTOMIZATION, "  - daemonset.yaml\n", "  - daemonset.yml\n", "`kustomize build` failed"),
    (K8S, BASE_KUSTOMIZATION, "  - name: memplaced-config\n", "  - name: memplaced-settings\n",
     "ConfigMap memplaced-config is not rendered"),
    (DOCKER, DOCKERFILE, "COPY --from=builder", "COPY --from=build", "names no earlier stage"),
    (DOCKER, DOCKERFILE, "COPY client ./client", "COPY clients ./client", "does not exist in the repository"),
    (DOCKER, DOCKERFILE, "COPY client ./client\n", "", "does not copy client"),
    (DOCKER, DOCKERFILE, "cargo build --release --locked", "cargo build --release", "does not run `cargo build"),
    (DOCKER, DOCKERFILE, "USER 0:0\n", "", "sets no USER"),
    (DOCKER, DOCKERFILE, "WORKDIR /src", "WORKDIRR /src", "unknown instruction WORKDIRR"),
    (DOCKER, DOCKERFILE, "/out/memplacectl /usr/local/bin/", "/usr/local/bin/", "does not install /usr/local/bin/memplacectl"),
    (DOCKER, DOCKERFILE, "FROM runtime-base AS runtime-prebuilt", "FROM ${RUNTIME_IMAGE} AS runtime-prebuilt",
     "must be built FROM the same runtime stage"),
    (DOCKER, DOCKERFILE, "COPY memplaced memplacectl /usr/local/bin/", "COPY memplaced /usr/local/bin/",
     "must copy exactly memplaced and memplacectl"),
    (SYSTEMD, UNIT, "CapabilityBoundingSet=CAP_SYS_PTRACE CAP_SYS_NICE CAP_CHECKPOINT_RESTORE",
     "CapabilityBoundingSet=CAP_SYS_PTRACE CAP_SYS_NICE CAP_CHECKPOINT_RESTORE CAP_SYS_ADMIN", "CapabilityBoundingSet must be exactly"),
    (SYSTEMD, UNIT, "ProtectSystem=strict", "ProtectSystem=full", "ProtectSystem must be strict"),
    (SYSTEMD, UNIT, "TimeoutStopSec=15s", "TimeoutStopSec=90s", "TimeoutStopSec"),
    (SYSTEMD, UNIT, "Restart=on-failure", "Restart=always", "Restart must be on-failure"),
    (SYSTEMD, UNIT, "SystemCallFilter=@system-service pidfd_getfd", "SystemCallFilter=@system-service",
     "blocks syscalls the agent needs: ['pidfd_getfd']"),
    (SYSTEMD, UNIT, "Restart=on-failure", "Restart=on-failure\nRestartt=always", "systemd-analyze verify complained"),
]


def make_tree(repo, tmp):
    shutil.copytree(os.path.join(repo, "deploy"), os.path.join(tmp, "deploy"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Cargo.toml", "Cargo.lock"):
        shutil.copy(os.path.join(repo, name), tmp)
    # The Dockerfile check only needs the copied sources to exist.
    for name in os.listdir(repo):
        if name not in ("deploy", "Cargo.toml", "Cargo.lock", ".git", "target"):
            os.symlink(os.path.join(repo, name), os.path.join(tmp, name))


def main(argv):
    repo = os.path.abspath(argv[1] if len(argv) > 1 else os.path.join(HERE, "..", ".."))
    # Every mutation runs: a missing tool is a failure, never a skip.
    if shutil.which("systemd-analyze") is None:
        print("FATAL: systemd-analyze is not installed (Debian package systemd), so the mutations "
              "that only systemd can catch cannot run; .ci/test installs it")
        return 2
    sys.path.insert(0, HERE)
    import validate_k8s  # noqa: E402
    try:
        # Fetched once (or taken from MEMPLACE_KUSTOMIZE) and handed to every run below.
        kustomize = validate_k8s.kustomize_binary()
    except RuntimeError as e:
        print(f"FATAL: no kustomize, so the Kubernetes mutations cannot run: {e}")
        return 2
    failures, ran = [], 0
    for checker, rel, old, new, message in MUTATIONS:
        label = f"{rel}: {old.strip().splitlines()[0]!r} -> {(new.strip().splitlines() or [''])[0]!r}"
        with tempfile.TemporaryDirectory() as tmp:
            make_tree(repo, tmp)
            path = os.path.join(tmp, rel)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if text.count(old) != 1:
                failures.append(f"{label}: the text to mutate occurs {text.count(old)} times (update mutations.py)")
                print(f"FAIL: {failures[-1]}")
                continue
            with open(path, "w", encoding="utf-8") as f:
                f.write(text.replace(old, new))
            env = dict(os.environ, MEMPLACE_KUSTOMIZE=kustomize)
            proc = subprocess.run([sys.executable, os.path.join(tmp, "deploy", "tests", checker), tmp],
                                  capture_output=True, text=True, env=env)
            ran += 1
            output = proc.stdout + proc.stderr
            if proc.returncode == 1 and message in output:
                print(f"caught: {label}")
            else:
                failures.append(f"{label}: {checker} exited {proc.returncode} without {message!r}")
                print(f"FAIL: {failures[-1]}\n{output}")
    if failures:
        print(f"mutations: {len(failures)} not caught, {ran - len(failures)} caught")
        return 1
    print(f"mutations: all {ran} caught")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
