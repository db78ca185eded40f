# shellcheck shell=bash
# Podman, buildah, runc and debootstrap from Debian, and podman's private config: sourced by
# deploy/build-image.sh and deploy/run-pod.sh, which define `log` and `die`.

CONTAINERS_CONF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/containers.conf
export CONTAINERS_CONF

ensure_container_tools() {
    local need=()
    command -v podman >/dev/null || need+=(podman)
    command -v buildah >/dev/null || need+=(buildah)
    command -v runc >/dev/null || need+=(runc)
    command -v debootstrap >/dev/null || need+=(debootstrap)
    [ ${#need[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${need[*]} (run as root, or apt-get install them)"
    log "installing Debian packages: ${need[*]}"
    apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2 ||
        die "could not install ${need[*]}"
}
