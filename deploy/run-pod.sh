#!/bin/bash
# Runs the DaemonSet's pod, as kustomize renders it, on this host under podman (no cluster):
# renders KUSTOMIZATION (default deploy/kubernetes/base) with the real kustomize, turns the
# DaemonSet's pod template into one `podman create` (deploy/tests/pod_to_podman.py lists how
# each field is applied), and starts it. The DirectoryOrCreate hostPaths (/run/memplace,
# /var/lib/memplace) are moved under ROOT, so the host's own directories are not touched.
#
# Usage: deploy/run-pod.sh --root ROOT [--name NAME] [--kustomization DIR] [--mutate M]...
# Writes ROOT/rendered.yaml and ROOT/pod.json (the translation), prints the field table on
# stderr, waits for the startup probe to pass and prints the container's name on stdout. A
# container of that name is replaced.
#
# Needs root and podman (installed from Debian when missing); podman runs with
# deploy/podman/containers.conf (CONTAINERS_CONF).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
log() { echo "run-pod: $*" >&2; }
die() { echo "run-pod: ERROR: $*" >&2; exit 1; }
# shellcheck source=podman/tools.sh
source "$HERE/podman/tools.sh"

ROOT= NAME=memplaced KUST=$HERE/kubernetes/base
MUT=()
while [ $# -gt 0 ]; do
    case $1 in
        --root) ROOT=$2; shift 2 ;;
        --name) NAME=$2; shift 2 ;;
        --kustomization) KUST=$2; shift 2 ;;
        --mutate) MUT+=(--mutate "$2"); shift 2 ;;
        *) die "unknown argument $1" ;;
    esac
done
[ -n "$ROOT" ] || die "--root is required"
[ "$(id -u)" = 0 ] || die "run as root"
ensure_container_tools
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
KUST=$(cd "$KUST" && pwd) || die "no kustomization directory $KUST"
# conmon leaves an `oom` file in its working directory when the container is OOM-killed: keep it
# under ROOT.
cd "$ROOT"

KUSTOMIZE=${MEMPLACE_KUSTOMIZE:-$("$HERE/tests/fetch-kustomize.sh")}
"$KUSTOMIZE" build "$KUST" >"$ROOT/rendered.yaml" || die "kustomize build $KUST failed"
python3 "$HERE/tests/pod_to_podman.py" "$ROOT/rendered.yaml" --root "$ROOT" --name "$NAME" \
    "${MUT[@]}" >"$ROOT/pod.json" || die "the pod template could not be translated"
python3 - "$ROOT/pod.json" >&2 <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
print("run-pod: how each field of the pod template is applied:")
for field, how in p["table"]:
    print(f"  {field}: {how}")
PY
mapfile -d '' ARGS < <(python3 -c 'import json,sys; sys.stdout.write("".join(a+"\0" for a in json.load(open(sys.argv[1]))["create"]))' "$ROOT/pod.json")
podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
log "podman create ${ARGS[*]}"
podman create "${ARGS[@]}" >/dev/null || die "podman create failed"
podman start "$NAME" >/dev/null || die "podman start $NAME failed: $(podman logs "$NAME" 2>&1 | tail -n 20)"

# The startup probe, as the kubelet runs it (podman 4.3 has none): its command in the container
# every periodSeconds, up to failureThreshold times. The pod counts as started when it passes.
mapfile -t PROBE < <(python3 -c '
import json, sys
p = json.load(open(sys.argv[1]))["container"]["startupProbe"]
print(p.get("periodSeconds", 10)); print(p.get("failureThreshold", 3))
print("\n".join(p["exec"]["command"]))' "$ROOT/pod.json")
PERIOD=${PROBE[0]} TRIES=${PROBE[1]}
for ((i = 1; ; i++)); do
    if podman exec "$NAME" "${PROBE[@]:2}" >/dev/null 2>&1; then break; fi
    [ "$i" -lt "$TRIES" ] || die "the startup probe (${PROBE[*]:2}) did not pass in $TRIES tries ${PERIOD} s apart: $(podman logs "$NAME" 2>&1 | tail -n 20)"
    sleep "$PERIOD"
done
log "started: the startup probe passed"
echo "$NAME"
