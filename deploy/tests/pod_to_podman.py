#!/usr/bin/env python3
"""Turn the DaemonSet's pod template, as kustomize renders it, into one `podman create`.

Podman 4.3 (Debian bookworm) cannot run the template through `podman kube play`: it refuses
kind DaemonSet and ignores hostPID, seccompProfile, terminationGracePeriodSeconds and emptyDir
medium Memory. So every field of the template is mapped here, one by one, to the podman flag
that applies it (FIELDS below). A field this table does not know fails the translation: no
field is dropped silently. Fields that only a cluster acts on (the scheduler, the kubelet's
eviction, the DaemonSet controller) are listed as such and applied by nothing.

The hostPath directories that the DaemonSet creates (type DirectoryOrCreate: /run/memplace,
/var/lib/memplace) are moved under --root; the host resources it only reads (/sys, /dev/kvm)
stay where they are. The generated ConfigMap is written under --root and mounted read-only.

Mutations (--mutate, repeatable) break the rendered template before it is translated, for the
reverts that must make the container test fail:
  no-hostpid           delete spec.hostPID
  drop-cap:NAME        remove NAME from the container's capabilities.add
  no-socket-hostpath   the runtime volume (/run/memplace) becomes an emptyDir
  memory-limit:QTY     the container's memory limit (and request) become QTY (the test's
                       check of what a Populate past the limit does)

Usage: pod_to_podman.py RENDERED.yaml --root DIR --name NAME [--image IMG] [--mutate M]...
Prints a JSON object: {"create": [podman create arguments...], "table": [[field, how]...],
"socket_dir": host dir of /run/memplace or null, "state_dir": ..., "config": path}.
"""

import argparse
import json
import os
import re
import sys

import yaml

# Every field path of the pod template (lists as []), and how podman applies it. A value of
# None marks a path that the translation handles; the text is what the table prints.
FIELDS = {
    "metadata.labels.*": "--label KEY=VALUE",
    "spec.serviceAccountName": "cluster only: the agent never calls the API server; podman mounts no token",
    "spec.automountServiceAccountToken": "honoured by default: podman mounts no service account token",
    "spec.enableServiceLinks": "honoured by default: podman injects no service variables",
    "spec.priorityClassName": "cluster only: kubelet eviction order (podman never evicts)",
    "spec.nodeSelector.*": "cluster only: scheduling (the test's host is the VM host)",
    "spec.tolerations[].*": "cluster only: scheduling",
    "spec.hostPID": "--pid=host (podman kube play 4.3 ignores hostPID)",
    "spec.terminationGracePeriodSeconds": "--stop-timeout SECONDS: podman stop sends SIGTERM, SIGKILL after it (kube play 4.3 ignores it)",
    "spec.containers[].name": "--name POD-CONTAINER",
    "spec.containers[].image": "the image argument",
    "spec.containers[].imagePullPolicy": "--pull=missing (IfNotPresent)",
    "spec.containers[].args[]": "arguments after the image (the entrypoint stays)",
    "spec.containers[].ports[].*": "informational in Kubernetes too (no hostPort): the container has its own network namespace",
    "spec.containers[].resources.requests.cpu": "--cpu-shares (the kubelet's milliCPU*1024/1000)",
    "spec.containers[].resources.requests.memory": "cluster only: scheduling (the kubelet sets no cgroup v1 value for it)",
    "spec.containers[].resources.limits.cpu": "--cpus",
    "spec.containers[].resources.limits.memory": "--memory and --memory-swap (no swap, as the kubelet on cgroup v1)",
    "spec.containers[].securityContext.privileged": "not --privileged",
    "spec.containers[].securityContext.runAsUser": "--user UID:GID",
    "spec.containers[].securityContext.runAsGroup": "--user UID:GID",
    "spec.containers[].securityContext.runAsNonRoot": "checked here: false with runAsUser 0",
    "spec.containers[].securityContext.allowPrivilegeEscalation": "--security-opt no-new-privileges",
    "spec.containers[].securityContext.readOnlyRootFilesystem": "--read-only --read-only-tmpfs=false",
    "spec.containers[].securityContext.capabilities.drop[]": "--cap-drop",
    "spec.containers[].securityContext.capabilities.add[]": "--cap-add",
    "spec.containers[].securityContext.seccompProfile.type": "--security-opt seccomp=unconfined (kube play 4.3 ignores seccompProfile; its pod annotation works)",
    "spec.containers[].securityContext.appArmorProfile.type": "--security-opt apparmor=unconfined",
    "spec.containers[].startupProbe.*": "podman 4.3 has no startup probe: the test runs the command with podman exec, every periodSeconds, up to failureThreshold times",
    "spec.containers[].readinessProbe.*": "podman has no readiness probe: the test runs the command with podman exec",
    "spec.containers[].livenessProbe.*": "--health-cmd/--health-interval/--health-timeout/--health-retries (its timer needs systemd: the test runs podman healthcheck run)",
    "spec.containers[].volumeMounts[].*": "--mount type=bind (or tmpfs), read-only where readOnly",
    "spec.volumes[].name": "matched with volumeMounts",
    "spec.volumes[].configMap.name": "the rendered ConfigMap's data, written under --root, bound read-only",
    "spec.volumes[].hostPath.*": "bind mount; DirectoryOrCreate paths moved under --root and created",
    "spec.volumes[].emptyDir.*": "medium Memory with sizeLimit: --mount type=tmpfs,tmpfs-size (kube play 4.3 makes it disk)",
}

# DaemonSet fields outside the pod template: the controller's, with nothing to run.
CONTROLLER_FIELDS = ["selector", "updateStrategy", "minReadySeconds", "revisionHistoryLimit"]


def paths(obj, prefix=""):
    """Leaf paths of a YAML value, list indexes written []."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, list):
        for v in obj:
            yield from paths(v, prefix + "[]")
    else:
        yield prefix


def known(path):
    for pattern in FIELDS:
        rx = "^" + re.escape(pattern).replace(r"\[\]", r"\[\]").replace(r"\.\*", r"(\..+|\[\].*)") + "$"
        if re.match(rx, path):
            return pattern
    return None


def quantity_bytes(q):
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1000, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(q))
    if not m or (m.group(2) and m.group(2) not in units):
        raise SystemExit(f"pod_to_podman: cannot read the quantity {q!r}")
    return int(m.group(1)) * units.get(m.group(2), 1)


def millicpu(q):
    q = str(q)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def mutate(ds, mutations):
    spec = ds["spec"]["template"]["spec"]
    c = spec["containers"][0]
    for m in mutations:
        if m == "no-hostpid":
            if spec.pop("hostPID", None) is None:
                raise SystemExit("pod_to_podman: mutation no-hostpid: the template has no hostPID")
        elif m.startswith("drop-cap:"):
            cap = m.split(":", 1)[1]
            add = c["securityContext"]["capabilities"]["add"]
            if cap not in add:
                raise SystemExit(f"pod_to_podman: mutation {m}: {cap} is not added")
            add.remove(cap)
        elif m == "no-socket-hostpath":
            vols = [v for v in spec["volumes"] if v.get("hostPath", {}).get("path") == "/run/memplace"]
            if not vols:
                raise SystemExit("pod_to_podman: mutation no-socket-hostpath: no hostPath /run/memplace")
            del vols[0]["hostPath"]
            vols[0]["emptyDir"] = {}
        elif m.startswith("memory-limit:"):
            qty = m.split(":", 1)[1]
            quantity_bytes(qty)
            c["resources"]["limits"]["memory"] = qty
            c["resources"]["requests"]["memory"] = qty
        else:
            raise SystemExit(f"pod_to_podman: unknown mutation {m}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--root", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--image")
    ap.add_argument("--mutate", action="append", default=[])
    a = ap.parse_args()

    with open(a.rendered, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    dss = [d for d in docs if d.get("kind") == "DaemonSet"]
    if len(dss) != 1:
        raise SystemExit(f"pod_to_podman: {len(dss)} DaemonSets rendered, expected 1")
    ds = dss[0]
    configmaps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    for k in ds["spec"]:
        if k != "template" and k not in CONTROLLER_FIELDS:
            raise SystemExit(f"pod_to_podman: DaemonSet field spec.{k} is not handled")
    mutate(ds, a.mutate)
    tpl = ds["spec"]["template"]

    table = [[f"spec.{k}", "DaemonSet controller only (one pod, on this host)"] for k in CONTROLLER_FIELDS
             if k in ds["spec"]]
    unknown = []
    seen = set()
    for p in paths(tpl):
        pattern = known(p)
        if pattern is None:
            unknown.append(p)
        elif pattern not in seen:
            seen.add(pattern)
            table.append([pattern, FIELDS[pattern]])
    if unknown:
        raise SystemExit("pod_to_podman: fields of the pod template this translation does not handle "
                         "(add them to FIELDS with the flag that applies them): " + ", ".join(unknown))

    spec = tpl["spec"]
    if len(spec["containers"]) != 1:
        raise SystemExit("pod_to_podman: one container expected")
    c = spec["containers"][0]
    sc = c.get("securityContext", {})
    root = os.path.abspath(a.root)
    args = ["--name", a.name]
    for k, v in sorted(tpl.get("metadata", {}).get("labels", {}).items()):
        args += ["--label", f"{k}={v}"]
    if spec.get("hostPID"):
        args.append("--pid=host")
    if "terminationGracePeriodSeconds" in spec:
        args.append(f"--stop-timeout={int(spec['terminationGracePeriodSeconds'])}")
    policy = c.get("imagePullPolicy", "IfNotPresent")
    args.append({"IfNotPresent": "--pull=missing", "Always": "--pull=always", "Never": "--pull=never"}[policy])

    res = c.get("resources", {})
    if "cpu" in res.get("requests", {}):
        args.append(f"--cpu-shares={max(2, millicpu(res['requests']['cpu']) * 1024 // 1000)}")
    if "cpu" in res.get("limits", {}):
        args.append(f"--cpus={millicpu(res['limits']['cpu']) / 1000:g}")
    if "memory" in res.get("limits", {}):
        mem = quantity_bytes(res["limits"]["memory"])
        args += [f"--memory={mem}b", f"--memory-swap={mem}b"]
    for k in set(res.get("requests", {})) | set(res.get("limits", {})):
        if k not in ("cpu", "memory"):
            raise SystemExit(f"pod_to_podman: resource {k} is not handled (a device plugin's?)")

    if sc.get("privileged"):
        args.append("--privileged")
    if "runAsUser" in sc or "runAsGroup" in sc:
        args.append(f"--user={sc.get('runAsUser', 0)}:{sc.get('runAsGroup', 0)}")
    if sc.get("runAsNonRoot") and sc.get("runAsUser", 0) == 0:
        raise SystemExit("pod_to_podman: runAsNonRoot with runAsUser 0 would never start")
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    caps = sc.get("capabilities", {})
    for cap in caps.get("drop", []):
        args += ["--cap-drop", cap]
    for cap in caps.get("add", []):
        args += ["--cap-add", cap]
    seccomp = sc.get("seccompProfile", {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":
        raise SystemExit(f"pod_to_podman: seccompProfile {seccomp} is not handled")
    apparmor = sc.get("appArmorProfile", {}).get("type", "RuntimeDefault")
    if apparmor == "Unconfined":
        args += ["--security-opt", "apparmor=unconfined"]
    elif apparmor != "RuntimeDefault":
        raise SystemExit(f"pod_to_podman: appArmorProfile {apparmor} is not handled")

    live = c.get("livenessProbe")
    if live:
        args += ["--health-cmd", json.dumps(live["exec"]["command"]),
                 f"--health-interval={live.get('periodSeconds', 10)}s",
                 f"--health-timeout={live.get('timeoutSeconds', 1)}s",
                 f"--health-retries={live.get('failureThreshold', 3)}"]

    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    socket_dir = state_dir = config = None
    for m in c.get("volumeMounts", []):
        v = volumes.get(m["name"])
        if v is None:
            raise SystemExit(f"pod_to_podman: volumeMount {m['name']} names no volume")
        dst = m["mountPath"]
        ro = bool(m.get("readOnly"))
        if "hostPath" in v:
            hp = v["hostPath"]
            src = hp["path"]
            kind = hp.get("type", "")
            if kind == "DirectoryOrCreate":
                src = root + src
                os.makedirs(src, exist_ok=True)
            elif kind == "Directory":
                if not os.path.isdir(src):
                    raise SystemExit(f"pod_to_podman: hostPath {src} is not a directory")
            elif kind == "CharDevice":
                if not os.path.exists(src):
                    raise SystemExit(f"pod_to_podman: hostPath {src} does not exist (CharDevice)")
            else:
                raise SystemExit(f"pod_to_podman: hostPath type {kind!r} is not handled")
            if dst == "/run/memplace":
                socket_dir = src
            if dst == "/var/lib/memplace":
                state_dir = src
            args += ["--mount", f"type=bind,src={src},dst={dst}" + (",ro=true" if ro else "")]
        elif "configMap" in v:
            cm = configmaps.get(v["configMap"]["name"])
            if cm is None:
                raise SystemExit(f"pod_to_podman: ConfigMap {v['configMap']['name']} was not rendered")
            src = os.path.join(root, "configmap", v["configMap"]["name"])
            os.makedirs(src, exist_ok=True)
            for key, data in cm.get("data", {}).items():
                with open(os.path.join(src, key), "w", encoding="utf-8") as f:
                    f.write(data)
                config = os.path.join(src, key)
            args += ["--mount", f"type=bind,src={src},dst={dst}" + (",ro=true" if ro else "")]
        elif "emptyDir" in v:
            ed = v["emptyDir"]
            if ed.get("medium") == "Memory":
                opt = f"type=tmpfs,dst={dst}"
                if "sizeLimit" in ed:
                    opt += f",tmpfs-size={quantity_bytes(ed['sizeLimit'])}"
                args += ["--mount", opt]
            else:
                # A disk emptyDir: a fresh directory per pod, under --root.
                src = os.path.join(root, "emptydir", m["name"])
                os.makedirs(src, exist_ok=True)
                args += ["--mount", f"type=bind,src={src},dst={dst}"]
        else:
            raise SystemExit(f"pod_to_podman: volume {m['name']} has a source this translation does not handle")
        if m.get("recursiveReadOnly") not in (None, "IfPossible", "Disabled"):
            raise SystemExit(f"pod_to_podman: recursiveReadOnly {m['recursiveReadOnly']} is not handled")

    image = a.image or c["image"]
    create = args + [image] + [str(x) for x in c.get("args", [])]
    json.dump({"create": create, "table": table, "socket_dir": socket_dir, "state_dir": state_dir,
               "config": config, "container": c}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
