#!/usr/bin/env python3
"""A small kustomize renderer for memplace's own manifests.

`kustomize build` and `kubectl kustomize` are not always installed where the tests run, so this
renders the subset of kustomize that deploy/kubernetes uses:

  resources (files and directories), namespace, images, configMapGenerator (files and literals;
  behavior create, merge or replace; the content-hash name suffix and the references to it in
  pod templates), and patches, both strategic merge (merge keys of pod specs, null, and
  `$patch: delete|replace`) and JSON 6902.

It refuses any other kustomization field or patch directive instead of ignoring it, so a
manifest that starts using more of kustomize fails here loudly rather than rendering wrong.
validate_k8s.py also compares its output with kubectl's or kustomize's where one is installed.

Usage: kustomize_lite.py DIR   (prints the rendered objects as a YAML stream)
"""

import copy
import hashlib
import json
import os
import sys

import yaml

SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "configMapGenerator",
    "patches",
}

# Kinds the namespace transformer leaves alone.
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "StorageClass",
    "CustomResourceDefinition",
    "PersistentVolume",
    "RuntimeClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}

# Strategic-merge keys of the lists in a pod spec (the only place these manifests patch lists).
# A list without a merge key is replaced whole, as the API server's strategic merge does.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "env": "name",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "resourceClaims": "name",
}


class RenderError(Exception):
    """The kustomization cannot be rendered, or uses kustomize features this renderer lacks."""


class _Delete:
    pass


_DELETE = _Delete()


def load_yaml_stream(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _key(obj):
    meta = obj.get("metadata", {})
    return (obj.get("kind"), meta.get("namespace"), meta.get("name"))


# ---------------------------------------------------------------------------------------------
# configMapGenerator


def _go_json(value):
    """json.Marshal's output for maps of strings: sorted keys, no spaces, HTML escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def configmap_hash(cm):
    """kustomize's name suffix for a generated ConfigMap (api/hasher).

    kustomize 5 hashes an empty name: it looks the name up at a path that generated objects
    do not have yet. Matching its suffix exactly is a nicety; validate_k8s.py compares renders
    with the suffixes masked.
    """
    encoded = {"kind": "ConfigMap", "name": "", "data": cm.get("data", {})}
    if cm.get("immutable"):
        encoded["immutable"] = True
    if cm.get("binaryData"):
        encoded["binaryData"] = cm["binaryData"]
    digest = hashlib.sha256(_go_json(encoded).encode("utf-8")).hexdigest()
    table = {"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}
    return "".join(table.get(c, c) for c in digest[:10])


def _generate_configmap(spec, base_dir):
    unknown = set(spec) - {"name", "namespace", "files", "literals", "behavior"}
    if unknown:
        raise RenderError(f"configMapGenerator fields not supported: {sorted(unknown)}")
    data = {}
    for entry in spec.get("files", []):
        key, _, path = entry.partition("=") if "=" in entry else (os.path.basename(entry), "", entry)
        full = os.path.join(base_dir, path)
        if not os.path.isfile(full):
            raise RenderError(f"configMapGenerator {spec['name']}: no file {full}")
        with open(full, encoding="utf-8") as f:
            data[key] = f.read()
    for entry in spec.get("literals", []):
        key, sep, value = entry.partition("=")
        if not sep:
            raise RenderError(f"configMapGenerator literal without '=': {entry!r}")
        data[key] = value
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": spec["name"]}, "data": data}
    if "namespace" in spec:
        cm["metadata"]["namespace"] = spec["namespace"]
    return cm


# ---------------------------------------------------------------------------------------------
# Patches


def strategic_merge(base, patch, field=None):
    """Apply a strategic-merge patch value to a base value; returns the new value."""
    if isinstance(patch, dict):
        directive = patch.get("$patch")
        if directive == "delete":
            return _DELETE
        if directive == "replace":
            return {k: v for k, v in patch.items() if k != "$patch"}
        if directive not in (None, "merge"):
            raise RenderError(f"unsupported $patch directive {directive!r}")
        if not isinstance(base, dict):
            base = {}
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if k == "$patch":
                continue
            if k.startswith("$"):
                raise RenderError(f"unsupported strategic-merge directive {k}")
            if v is None:
                out.pop(k, None)
                continue
            merged = strategic_merge(out.get(k), v, k)
            if merged is _DELETE:
                out.pop(k, None)
            else:
                out[k] = merged
        return out
    if isinstance(patch, list):
        return _merge_list(base if isinstance(base, list) else [], patch, field)
    return copy.deepcopy(patch)


def _merge_list(base, patch, field):
    if any(isinstance(i, dict) and i.get("$patch") == "replace" and len(i) == 1 for i in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and i.get("$patch"))]
    key = MERGE_KEYS.get(field)
    if key is None or not all(isinstance(i, dict) for i in patch):
        for item in patch:
            if isinstance(item, dict) and "$patch" in item:
                raise RenderError(f"$patch in list {field!r}, which has no merge key here")
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for item in patch:
        if key not in item:
            raise RenderError(f"patch item in {field!r} lacks its merge key {key!r}: {item}")
        idx = next((i for i, b in enumerate(out) if isinstance(b, dict) and b.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                del out[idx]
            continue
        if idx is None:
            out.append(strategic_merge({}, item, None))
        else:
            out[idx] = strategic_merge(out[idx], item, None)
    return out


def _pointer(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, parts):
    cur = doc
    for p in parts:
        if isinstance(cur, list):
            cur = cur[int(p)]
        elif isinstance(cur, dict):
            cur = cur[p]
        else:
            raise KeyError(p)
    return cur


def json6902(doc, ops):
    """Apply RFC 6902 operations to a copy of doc."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind = op.get("op")
        parts = _pointer(op.get("path", ""))
        try:
            if kind == "test":
                if _walk(doc, parts) != op["value"]:
                    raise RenderError(f"JSON patch test failed at {op['path']}")
                continue
            if kind in ("move", "copy"):
                src = _pointer(op["from"])
                value = copy.deepcopy(_walk(doc, src))
                if kind == "move":
                    parent = _walk(doc, src[:-1])
                    if isinstance(parent, list):
                        del parent[int(src[-1])]
                    else:
                        del parent[src[-1]]
                kind, op = "add", {"path": op["path"], "value": value}
            parent = _walk(doc, parts[:-1])
            last = parts[-1]
            if kind == "add":
                if isinstance(parent, list):
                    if last == "-":
                        parent.append(copy.deepcopy(op["value"]))
                    else:
                        parent.insert(int(last), copy.deepcopy(op["value"]))
                else:
                    parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                if isinstance(parent, list):
                    del parent[int(last)]
                else:
                    del parent[last]
            elif kind == "replace":
                if isinstance(parent, list):
                    parent[int(last)] = copy.deepcopy(op["value"])
                else:
                    if last not in parent:
                        raise RenderError(f"JSON patch replace of missing {op['path']}")
                    parent[last] = copy.deepcopy(op["value"])
            else:
                raise RenderError(f"unknown JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise RenderError(f"JSON patch {op} does not apply: {e!r}") from e
    return doc


def _matches(obj, target):
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise RenderError(f"patch target fields not supported: {sorted(unknown)}")
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    meta = obj.get("metadata", {})
    checks = {
        "group": group,
        "version": version,
        "kind": obj.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    return all(checks[k] == v for k, v in target.items())


def _apply_patch(objects, entry, base_dir):
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise RenderError(f"patch fields not supported: {sorted(unknown)}")
    if ("path" in entry) == ("patch" in entry):
        raise RenderError("a patch needs exactly one of path and patch")
    if "path" in entry:
        with open(os.path.join(base_dir, entry["path"]), encoding="utf-8") as f:
            text = f.read()
    else:
        text = entry["patch"]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) != 1:
        raise RenderError(f"a patch must hold one document, got {len(docs)}")
    body = docs[0]
    if isinstance(body, list):
        if "target" not in entry:
            raise RenderError("a JSON 6902 patch needs a target")
        hits = [i for i, o in enumerate(objects) if _matches(o, entry["target"])]
        apply = lambda o: json6902(o, body)  # noqa: E731
    elif isinstance(body, dict):
        target = entry.get("target") or {"kind": body.get("kind"),
                                         "name": body.get("metadata", {}).get("name")}
        if body.get("metadata", {}).get("namespace") and "target" not in entry:
            target["namespace"] = body["metadata"]["namespace"]
        hits = [i for i, o in enumerate(objects) if _matches(o, target)]

        def apply(o):
            patched = strategic_merge(o, {k: v for k, v in body.items() if k != "metadata"} | {
                "metadata": {k: v for k, v in body.get("metadata", {}).items()
                             if k not in ("name", "namespace")}})
            return patched
    else:
        raise RenderError("a patch must be a mapping (strategic merge) or a list (JSON 6902)")
    if not hits:
        raise RenderError(f"patch matches no object: {entry.get('target') or entry.get('path')}")
    for i in hits:
        objects[i] = apply(objects[i])


# ---------------------------------------------------------------------------------------------
# Transformers


def _pod_specs(obj):
    spec = obj.get("spec", {})
    if obj.get("kind") == "Pod":
        yield spec
    elif "template" in spec and isinstance(spec["template"], dict):
        yield spec["template"].get("spec", {})
    if obj.get("kind") == "CronJob":
        yield spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})


def _containers(pod_spec):
    for field in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod_spec.get(field, []) or []


def _split_image(image):
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    name, tag = image, None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        name, tag = image[:colon], image[colon + 1:]
    return name, tag, digest


def _set_images(objects, images):
    for rule in images:
        unknown = set(rule) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise RenderError(f"images fields not supported: {sorted(unknown)}")
        for obj in objects:
            for pod in _pod_specs(obj):
                for c in _containers(pod):
                    name, tag, digest = _split_image(c.get("image", ""))
                    if name != rule["name"]:
                        continue
                    name = rule.get("newName", name)
                    if "digest" in rule:
                        c["image"] = f"{name}@{rule['digest']}"
                    elif "newTag" in rule:
                        c["image"] = f"{name}:{rule['newTag']}"
                    else:
                        c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _rename_configmap_refs(objects, old, new):
    for obj in objects:
        for pod in _pod_specs(obj):
            for vol in pod.get("volumes", []) or []:
                if vol.get("configMap", {}).get("name") == old:
                    vol["configMap"]["name"] = new
                for src in vol.get("projected", {}).get("sources", []) or []:
                    if src.get("configMap", {}).get("name") == old:
                        src["configMap"]["name"] = new
            for c in _containers(pod):
                for env in c.get("env", []) or []:
                    ref = env.get("valueFrom", {}).get("configMapKeyRef")
                    if ref and ref.get("name") == old:
                        ref["name"] = new
                for env in c.get("envFrom", []) or []:
                    ref = env.get("configMapRef")
                    if ref and ref.get("name") == old:
                        ref["name"] = new


# ---------------------------------------------------------------------------------------------
# Build


def _build(directory, seen):
    directory = os.path.abspath(directory)
    if directory in seen:
        raise RenderError(f"kustomization cycle through {directory}")
    seen = seen | {directory}
    kpath = os.path.join(directory, "kustomization.yaml")
    if not os.path.isfile(kpath):
        raise RenderError(f"no kustomization.yaml in {directory}")
    kust = load_yaml_stream(kpath)[0]
    unknown = set(kust) - SUPPORTED_FIELDS
    if unknown:
        raise RenderError(f"{kpath}: kustomization fields not supported: {sorted(unknown)}")
    if kust.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{kpath}: kind must be Kustomization")

    objects, generated = [], set()
    for res in kust.get("resources", []):
        path = os.path.join(directory, res)
        if os.path.isdir(path):
            sub, sub_generated = _build(path, seen)
            objects += sub
            generated |= sub_generated
        elif os.path.isfile(path):
            objects += load_yaml_stream(path)
        else:
            raise RenderError(f"{kpath}: resource {res} does not exist")
    keys = [_key(o) for o in objects]
    if len(keys) != len(set(keys)):
        raise RenderError(f"{kpath}: duplicate objects {sorted(k for k in keys if keys.count(k) > 1)}")

    # Generators.
    for spec in kust.get("configMapGenerator", []):
        behavior = spec.get("behavior", "create")
        cm = _generate_configmap(spec, directory)
        existing = [i for i, o in enumerate(objects)
                    if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == spec["name"]
                    and ("namespace" not in spec or o["metadata"].get("namespace") == spec["namespace"])]
        if behavior == "create":
            if existing:
                raise RenderError(f"{kpath}: ConfigMap {spec['name']} exists; use behavior merge or replace")
            objects.append(cm)
            generated.add(("ConfigMap", spec["name"]))
        elif behavior in ("merge", "replace"):
            if len(existing) != 1:
                raise RenderError(f"{kpath}: behavior {behavior} needs one ConfigMap {spec['name']} from resources")
            old = objects[existing[0]]
            if behavior == "merge":
                old.setdefault("data", {}).update(cm["data"])
            else:
                old["data"] = cm["data"]
        else:
            raise RenderError(f"{kpath}: unknown generator behavior {behavior!r}")

    # Transformers, in kustomize's order: patches, namespace, images.
    for entry in kust.get("patches", []):
        _apply_patch(objects, entry, directory)
    if "namespace" in kust:
        for obj in objects:
            if obj.get("kind") not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
    _set_images(objects, kust.get("images", []))
    return objects, generated


def render(directory):
    """Render the kustomization in directory; returns the list of objects."""
    objects, generated = _build(directory, frozenset())
    # Name suffixes last, from the final data, and the pod templates' references to them.
    for obj in objects:
        if (obj.get("kind"), obj["metadata"]["name"]) in generated:
            old = obj["metadata"]["name"]
            new = f"{old}-{configmap_hash(obj)}"
            obj["metadata"]["name"] = new
            _rename_configmap_refs(objects, old, new)
    return objects


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    try:
        objects = render(argv[1])
    except RenderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
