#!/usr/bin/env python3
"""Validate memplace's Kubernetes manifests.

For deploy/kubernetes/base and every deploy/kubernetes/overlays/*:
  1. render the kustomization with the real `kustomize build` (Debian's kustomize package, which
     fetch-kustomize.sh downloads into a cache; MEMPLACE_KUSTOMIZE names another binary). Without
     kustomize the check cannot run and fails;
  2. validate every rendered object, and every file in deploy/kubernetes/examples, against the
     Kubernetes JSON schemas with kubernetes-validate, strictly (unknown fields are errors), for
     the oldest Kubernetes these manifests support and the newest the package knows;
  3. check what the agent needs and what it must not get: the exact capabilities, hostPID, the
     /dev/kvm device, the host paths and the config file they must agree with, probes, update
     strategy, grace period, priority, resources.

Usage: validate_k8s.py [REPO_ROOT]   (default: two levels up from this file)
Exit status 0 when every check passed, 1 when one failed, 2 when it could not run.
"""

import os
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import memplaced_config  # noqa: E402

try:
    import kubernetes_validate
    import kubernetes_validate.utils as kv_utils
except ImportError:
    print("FATAL: the Python package kubernetes-validate is not installed, so the manifests "
          "cannot be validated against the Kubernetes schemas. Install it with:\n"
          "    pip install kubernetes-validate")
    sys.exit(2)

# The oldest Kubernetes these manifests are written for: securityContext.appArmorProfile and
# volumeMounts[].recursiveReadOnly exist from 1.30 on.
OLDEST_K8S = "1.30"
CONFIG_PATH = "/etc/memplace/memplaced.toml"
AGENT_CAPABILITIES = {"SYS_PTRACE", "SYS_NICE", "CHECKPOINT_RESTORE"}
# hostPath -> (type, read-only): all the host the agent may see. Anything else is a new privilege.
HOST_PATHS = {
    "/run/memplace": ("DirectoryOrCreate", False),
    "/var/lib/memplace": ("DirectoryOrCreate", False),
    "/sys": ("Directory", True),
    "/dev/kvm": ("CharDevice", False),
}


class Checks:
    def __init__(self):
        self.ok = 0
        self.failed = []

    def expect(self, cond, what):
        if cond:
            self.ok += 1
        else:
            self.failed.append(what)
            print(f"FAIL: {what}")
        return cond


def quantity(q):
    """A Kubernetes quantity as a float (bytes or cores)."""
    q = str(q)
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", q)
    if not m:
        raise ValueError(f"not a quantity: {q}")
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(m.group(1)) * units[m.group(2)]


# ---------------------------------------------------------------------------------------------
# Rendering


def kustomize_binary():
    """The kustomize binary: $MEMPLACE_KUSTOMIZE, else the one fetch-kustomize.sh fetches from
    Debian (cached). Raises RuntimeError with the reason when there is none."""
    given = os.environ.get("MEMPLACE_KUSTOMIZE")
    if given:
        if not os.access(given, os.X_OK):
            raise RuntimeError(f"MEMPLACE_KUSTOMIZE={given} is not an executable")
        return given
    fetch = os.path.join(HERE, "fetch-kustomize.sh")
    proc = subprocess.run(["bash", fetch], capture_output=True, text=True)
    path = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not os.access(path, os.X_OK):
        raise RuntimeError(f"{fetch} could not fetch kustomize (exit {proc.returncode}):\n"
                           f"{proc.stdout}{proc.stderr}")
    return path


def render(kustomize, directory, rel, checks):
    """The objects `kustomize build DIRECTORY` renders, or None (a failed check) when it cannot."""
    proc = subprocess.run([kustomize, "build", directory], capture_output=True, text=True)
    if not checks.expect(proc.returncode == 0,
                         f"{rel}: `kustomize build` failed (exit {proc.returncode}): {proc.stderr.strip()}"):
        return None
    try:
        objects = [o for o in yaml.safe_load_all(proc.stdout) if o]
    except yaml.YAMLError as e:
        checks.expect(False, f"{rel}: `kustomize build` printed YAML that does not parse: {e}")
        return None
    checks.expect(bool(objects), f"{rel}: `kustomize build` rendered no objects")
    print(f"rendered {rel} with `{kustomize} build`: {len(objects)} objects")
    return objects


def load_yaml_stream(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ---------------------------------------------------------------------------------------------
# Schema validation


def k8s_versions(checks):
    shipped = kv_utils.all_versions()
    shipped_minor = {kv_utils.major_minor(v) for v in shipped}
    checks.expect(OLDEST_K8S in shipped_minor,
                  f"kubernetes-validate {kubernetes_validate.__version__} ships no schemas for "
                  f"Kubernetes {OLDEST_K8S} (it has {sorted(shipped_minor)})")
    return sorted({OLDEST_K8S, kv_utils.major_minor(kv_utils.latest_version())},
                  key=lambda v: tuple(int(x) for x in v.split(".")))


def validate_schema(obj, where, versions, checks):
    name = f"{where}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            checks.expect(True, name)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            checks.expect(False, f"{name} is invalid for Kubernetes {version}: {path}: {e.message}")
        except kv_utils.SchemaNotFoundError as e:
            checks.expect(False, f"{name}: {e.message}")
        except kv_utils.VersionNotSupportedError:
            checks.expect(False, f"{name}: kubernetes-validate has no schemas for {version}")


# ---------------------------------------------------------------------------------------------
# What the agent's DaemonSet must say


def config_of(objects, pod, where, checks):
    """The agent's effective config, read from the ConfigMap the pod mounts."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    container = pod["containers"][0]
    mount = next((m for m in container.get("volumeMounts", [])
                  if m["mountPath"] == os.path.dirname(CONFIG_PATH)), None)
    if not checks.expect(mount is not None, f"{where}: nothing mounted at {os.path.dirname(CONFIG_PATH)}"):
        return None
    cm_name = vols.get(mount["name"], {}).get("configMap", {}).get("name")
    cm = next((o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cm_name), None)
    if not checks.expect(cm is not None, f"{where}: the config volume's ConfigMap {cm_name} is not rendered"):
        return None
    text = cm.get("data", {}).get(os.path.basename(CONFIG_PATH))
    if not checks.expect(text is not None, f"{where}: ConfigMap {cm_name} has no {os.path.basename(CONFIG_PATH)}"):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        cfg, problems = memplaced_config.check(f.name)
    finally:
        os.unlink(f.name)
    for p in problems:
        checks.expect(False, f"{where}: ConfigMap {cm_name}: {p.split(': ', 1)[1]}")
    return cfg


def check_daemonset(objects, where, checks, is_base, workspace_version):
    dss = [o for o in objects if o["kind"] == "DaemonSet"]
    if not checks.expect(len(dss) == 1 and dss[0]["metadata"]["name"] == "memplaced",
                         f"{where}: expected one DaemonSet named memplaced, got {[d['metadata']['name'] for d in dss]}"):
        return None
    ds = dss[0]
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    containers = pod.get("containers", [])
    if not checks.expect(len(containers) == 1 and containers[0]["name"] == "memplaced",
                         f"{where}: expected the single container memplaced"):
        return None
    c = containers[0]
    cfg = config_of(objects, pod, where, checks)
    if cfg is None:
        return None

    # The config file and the command line.
    checks.expect(c.get("args") == ["--config", CONFIG_PATH] and "command" not in c,
                  f"{where}: args must be exactly --config {CONFIG_PATH} (got {c.get('command')} {c.get('args')})")
    checks.expect(cfg["log_format"] == "json", f"{where}: log_format must be json, is {cfg['log_format']}")

    # Namespaces, accounts.
    namespaces = [o for o in objects if o["kind"] == "Namespace"]
    if checks.expect(len(namespaces) == 1, f"{where}: expected one Namespace"):
        ns = namespaces[0]["metadata"]["name"]
        checks.expect(namespaces[0]["metadata"].get("labels", {}).get(
            "pod-security.kubernetes.io/enforce") == "privileged",
            f"{where}: Namespace {ns} must enforce the privileged Pod Security level")
        for o in objects:
            if o["kind"] != "Namespace":
                checks.expect(o["metadata"].get("namespace") == ns,
                              f"{where}: {o['kind']}/{o['metadata']['name']} is not in namespace {ns}")
    sa = next((o for o in objects if o["kind"] == "ServiceAccount"
               and o["metadata"]["name"] == pod.get("serviceAccountName")), None)
    checks.expect(sa is not None, f"{where}: serviceAccountName {pod.get('serviceAccountName')} is not rendered")
    checks.expect(pod.get("automountServiceAccountToken") is False,
                  f"{where}: the agent needs no API token (automountServiceAccountToken: false)")

    # Host namespaces.
    checks.expect(pod.get("hostPID") is True, f"{where}: hostPID must be true (pidfd_getfd on VMM pids)")
    checks.expect(not pod.get("hostNetwork"), f"{where}: hostNetwork must stay off")
    checks.expect(not pod.get("hostIPC"), f"{where}: hostIPC must stay off")

    # Security context: exactly what the agent needs.
    sc = c.get("securityContext", {})
    psc = pod.get("securityContext", {})
    checks.expect(not sc.get("privileged"), f"{where}: the container must not be privileged")
    caps = sc.get("capabilities", {})
    added = {a.removeprefix("CAP_") for a in caps.get("add", [])}
    checks.expect(added == AGENT_CAPABILITIES,
                  f"{where}: capabilities.add must be exactly {sorted(AGENT_CAPABILITIES)}, is {sorted(added)}")
    checks.expect(caps.get("drop") == ["ALL"], f"{where}: capabilities.drop must be [ALL]")
    checks.expect(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false")
    checks.expect(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem must be true")
    checks.expect(sc.get("runAsUser", psc.get("runAsUser")) == 0,
                  f"{where}: the agent runs as uid 0 (its capabilities apply to root only)")
    seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
    checks.expect(seccomp.get("type") in ("Unconfined", "Localhost"),
                  f"{where}: seccompProfile must be Unconfined or a Localhost profile: "
                  f"RuntimeDefault blocks move_pages (got {seccomp})")

    # Host paths.
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    for name, m in mounts.items():
        checks.expect(name in vols, f"{where}: volumeMount {m['mountPath']} names no volume ({name})")
    host = {}
    for name, v in vols.items():
        if "hostPath" not in v:
            continue
        path, kind = v["hostPath"]["path"], v["hostPath"].get("type")
        if not checks.expect(path in HOST_PATHS, f"{where}: hostPath {path} is not one the agent needs"):
            continue
        want_type, want_ro = HOST_PATHS[path]
        checks.expect(kind == want_type, f"{where}: hostPath {path} must have type {want_type}, has {kind}")
        m = mounts.get(name)
        if checks.expect(m is not None, f"{where}: hostPath volume {name} ({path}) is not mounted"):
            checks.expect(m["mountPath"] == path,
                          f"{where}: hostPath {path} must be mounted at the same path, is at {m['mountPath']}")
            checks.expect(bool(m.get("readOnly")) == want_ro,
                          f"{where}: hostPath {path} must be mounted {'read-only' if want_ro else 'read-write'}")
        host[path] = name
    for needed in ("/run/memplace", "/var/lib/memplace", "/sys"):
        checks.expect(needed in host, f"{where}: hostPath {needed} is missing")
    checks.expect(cfg["runtime_dir"] == "/run/memplace",
                  f"{where}: config runtime_dir {cfg['runtime_dir']} is not the mounted /run/memplace")
    checks.expect(cfg["state_dir"] == "/var/lib/memplace",
                  f"{where}: config state_dir {cfg['state_dir']} is not the mounted /var/lib/memplace")

    # KVM: the hostPath char device (base), or a device plugin's resource (an overlay's choice).
    res = c.get("resources", {})
    kvm_resources = [r for r in res.get("limits", {}) if "kvm" in r]
    if is_base:
        checks.expect("/dev/kvm" in host, f"{where}: /dev/kvm must be a hostPath CharDevice")
    else:
        checks.expect("/dev/kvm" in host or kvm_resources,
                      f"{where}: the agent gets no /dev/kvm (neither hostPath nor a device-plugin resource)")
    for r in kvm_resources:
        checks.expect(res.get("requests", {}).get(r) == res["limits"][r],
                      f"{where}: extended resource {r} needs equal requests and limits")

    # Scheduling.
    affinity = pod.get("affinity", {}).get("nodeAffinity")
    checks.expect(bool(pod.get("nodeSelector")) or bool(affinity),
                  f"{where}: needs a nodeSelector or node affinity for VM hosts")
    checks.expect(bool(pod.get("tolerations")), f"{where}: needs tolerations for VM hosts' taints")
    checks.expect(pod.get("priorityClassName") == "system-node-critical",
                  f"{where}: priorityClassName must be system-node-critical")
    strategy = spec.get("updateStrategy", {})
    rolling = strategy.get("rollingUpdate", {})
    checks.expect(strategy.get("type") == "RollingUpdate", f"{where}: updateStrategy must be RollingUpdate")
    checks.expect(rolling.get("maxUnavailable") in (1, "1"), f"{where}: maxUnavailable must be 1")
    checks.expect(rolling.get("maxSurge") in (None, 0, "0", "0%"),
                  f"{where}: maxSurge must be 0: two agents on one node would share the database")
    grace = cfg["shutdown_grace_secs"]
    checks.expect(pod.get("terminationGracePeriodSeconds") == grace + 5,
                  f"{where}: terminationGracePeriodSeconds must be shutdown_grace_secs ({grace}) + 5, "
                  f"is {pod.get('terminationGracePeriodSeconds')}")

    # Probes: exec memplacectl over the agent's own socket.
    probe_cmd = ["memplacectl", "--socket", f"{cfg['runtime_dir']}/memplace.sock", "health"]
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = c.get(kind)
        if kind != "startupProbe":
            checks.expect(probe is not None, f"{where}: {kind} is missing")
        if probe is not None:
            checks.expect(probe.get("exec", {}).get("command") == probe_cmd,
                          f"{where}: {kind} must exec {' '.join(probe_cmd)}, is {probe}")

    # Resources: set, and Burstable (requests below limits) so cpuset.mems is never narrowed.
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            checks.expect(r in res.get(kind, {}), f"{where}: resources.{kind}.{r} is missing")
    try:
        checks.expect(quantity(res["requests"]["memory"]) < quantity(res["limits"]["memory"]),
                      f"{where}: memory request must be below the limit (Burstable, see daemonset.yaml)")
    except (KeyError, ValueError):
        pass

    # Metrics: the configured port is the container's, and reachable from outside the pod.
    ports = {p.get("name"): p for p in c.get("ports", [])}
    if "metrics" in ports:
        checks.expect(cfg["metrics_addr"] != "off", f"{where}: a metrics port is declared but metrics_addr is off")
        checks.expect(ports["metrics"]["containerPort"] == memplaced_config.port_of(cfg["metrics_addr"]),
                      f"{where}: the metrics containerPort is not metrics_addr's port ({cfg['metrics_addr']})")
        checks.expect(not cfg["metrics_addr"].startswith(("127.", "localhost", "[::1]")),
                      f"{where}: metrics_addr {cfg['metrics_addr']} is loopback, unreachable in a pod")
    checks.expect(cfg["listen_tcp"] is None, f"{where}: the gRPC API must stay on the Unix socket (listen_tcp unset)")

    if is_base:
        checks.expect(c["image"] == f"memplace:{workspace_version}",
                      f"{where}: base image {c['image']} is not memplace:{workspace_version} (the workspace version)")
    return cfg


def check_vmm_example(obj, where, configs, checks):
    pod = obj["spec"]
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    run = [n for n, v in vols.items() if v.get("hostPath", {}).get("path") == "/run/memplace"]
    for n, v in vols.items():
        checks.expect(not v.get("hostPath", {}).get("path", "").endswith(".sock"),
                      f"{where}: volume {n} mounts a socket file; mount the directory /run/memplace")
    if not checks.expect(len(run) == 1, f"{where}: the VMM pod must mount hostPath /run/memplace"):
        return
    checks.expect(vols[run[0]]["hostPath"].get("type") == "Directory",
                  f"{where}: /run/memplace should be type Directory (wait for the agent, do not create it)")
    mounted = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] == run[0]]
    checks.expect(bool(mounted) and all(m.get("readOnly") for m in mounted),
                  f"{where}: the VMM should mount /run/memplace read-only")
    checks.expect(pod.get("nodeSelector", {}).get("memplace/vm-host") == "true",
                  f"{where}: the VMM pod must run on VM hosts (memplace/vm-host=true) like the agent")
    uid = pod.get("securityContext", {}).get("runAsUser", 0)
    allowed = [where_ for where_, cfg in configs.items()
               if uid in cfg["handoff_uids"] and (uid == 0 or int(cfg["socket_mode"][-1]) & 2)]
    checks.expect(bool(allowed), f"{where}: no rendered agent config lets uid {uid} use the handoff socket")


def workspace_version(repo):
    with open(os.path.join(repo, "Cargo.toml"), "rb") as f:
        return tomllib.load(f)["workspace"]["package"]["version"]


def main(argv):
    repo = os.path.abspath(argv[1] if len(argv) > 1 else os.path.join(HERE, "..", ".."))
    k8s = os.path.join(repo, "deploy", "kubernetes")
    checks = Checks()
    versions = k8s_versions(checks)
    print(f"kubernetes-validate {kubernetes_validate.__version__}, strict, Kubernetes {', '.join(versions)}")
    version = workspace_version(repo)
    try:
        kustomize = kustomize_binary()
    except RuntimeError as e:
        print(f"FATAL: no kustomize, so the manifests cannot be rendered: {e}")
        return 2

    targets = [os.path.join(k8s, "base")]
    overlays = os.path.join(k8s, "overlays")
    targets += sorted(os.path.join(overlays, d) for d in os.listdir(overlays)
                      if os.path.isfile(os.path.join(overlays, d, "kustomization.yaml")))
    checks.expect(len(targets) >= 2, "deploy/kubernetes/overlays has no overlay")
    configs = {}
    for target in targets:
        where = os.path.relpath(target, repo)
        objects = render(kustomize, target, where, checks)
        if objects is None:
            continue
        for obj in objects:
            validate_schema(obj, where, versions, checks)
        cfg = check_daemonset(objects, where, checks, target.endswith("base"), version)
        if cfg is not None:
            configs[where] = cfg

    examples = os.path.join(k8s, "examples")
    for name in sorted(os.listdir(examples)):
        if not name.endswith((".yaml", ".yml")):
            continue
        path = os.path.join(examples, name)
        where = os.path.relpath(path, repo)
        for obj in load_yaml_stream(path):
            validate_schema(obj, where, versions, checks)
            if obj.get("kind") == "Pod":
                check_vmm_example(obj, where, configs, checks)

    if checks.failed:
        print(f"validate_k8s: {len(checks.failed)} checks FAILED, {checks.ok} ok")
        return 1
    print(f"validate_k8s: all {checks.ok} checks ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
