#!/bin/bash
# Fetches kustomize, the renderer validate_k8s.py checks the Kubernetes manifests with, and prints the
# path of its binary on stdout. Everything else goes to stderr.
#
# kustomize comes from Debian's `kustomize` package (a Go binary that needs only libc) of sid or
# forky, fetched with `apt-get download` through a private apt list under the cache directory and
# unpacked with `dpkg-deb -x`: the system's apt sources are never touched and nothing is installed.
# The Debian mirror is the one the system's apt sources name (or MEMPLACE_DEBIAN_MIRROR), as for the
# NUMA test kernels (server/tests/numa/fetch-kernels.sh).
#
# Environment:
#   MEMPLACE_TOOL_CACHE          cache directory (default /var/cache/memplace-test-tools)
#   MEMPLACE_KUSTOMIZE_SUITES    suites searched (default "sid forky")
#   MEMPLACE_KUSTOMIZE_MIN       oldest acceptable upstream version (default 5.0)
#   MEMPLACE_TOOL_MAX_AGE_DAYS   reuse the fetched binary this long before looking for a newer one (default 30)
#   MEMPLACE_DEBIAN_MIRROR       Debian archive URL, when the system's apt sources name none
set -euo pipefail

CACHE=${MEMPLACE_TOOL_CACHE:-/var/cache/memplace-test-tools}
SUITES=${MEMPLACE_KUSTOMIZE_SUITES:-sid forky}
MIN=${MEMPLACE_KUSTOMIZE_MIN:-5.0}
MAX_AGE_DAYS=${MEMPLACE_TOOL_MAX_AGE_DAYS:-30}

log() { echo "fetch-kustomize: $*" >&2; }
die() { echo "fetch-kustomize: ERROR: $*" >&2; exit 1; }

# debian_mirror, apt_root, apt_update, version_ge and KEYRING.
# shellcheck source=../../.ci/private-apt.sh
source "$(dirname "$0")/../../.ci/private-apt.sh"

# works BINARY: prints the version of a kustomize that runs.
works() { "$1" version 2>/dev/null | head -n1; }

main() {
    command -v apt-get >/dev/null || die "apt-get is needed to fetch kustomize from Debian"
    command -v dpkg-deb >/dev/null || die "dpkg-deb is needed to unpack kustomize"
    [ -r "$KEYRING" ] || die "$KEYRING is missing (Debian package debian-archive-keyring)"
    if ! mkdir -p "$CACHE" 2>/dev/null || [ ! -w "$CACHE" ]; then
        die "cannot write $CACHE; set MEMPLACE_TOOL_CACHE to a writable directory"
    fi
    exec 9>"$CACHE/.lock-kustomize"
    flock 9

    local bin=$CACHE/kustomize/bin/kustomize marker=$CACHE/kustomize/.complete
    if [ -x "$bin" ] && [ -f "$marker" ] && [ -z "$(find "$marker" -mmin "+$((MAX_AGE_DAYS * 1440))")" ] &&
        [ -n "$(works "$bin")" ]; then
        echo "$bin"
        return
    fi

    local -a APT
    # shellcheck disable=SC2086
    apt_root "$CACHE/apt-kustomize" $SUITES
    if ! apt_update "$SUITES"; then
        if [ -x "$bin" ] && [ -n "$(works "$bin")" ]; then
            log "WARNING: apt-get update failed; keeping the cached $bin"
            echo "$bin"
            return
        fi
        die "apt-get update of $SUITES failed and no kustomize is cached"
    fi
    local version upstream
    version=$(apt-cache "${APT[@]}" policy kustomize 2>/dev/null | sed -n 's/^[[:space:]]*Candidate:[[:space:]]*//p')
    [ -n "$version" ] && [ "$version" != "(none)" ] || die "no kustomize package in suites: $SUITES"
    upstream=${version#*:}
    upstream=${upstream%%[-+~]*}
    version_ge "$upstream" "$MIN" || die "kustomize $version in $SUITES is older than $MIN"

    local tmp
    tmp=$(mktemp -d "$CACHE/unpack.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    log "downloading kustomize $version"
    (cd "$tmp" && apt-get "${APT[@]}" download "kustomize=$version" >&2) || die "apt-get download kustomize=$version failed"
    dpkg-deb -x "$tmp"/kustomize_*.deb "$tmp/root"
    [ -x "$tmp/root/usr/bin/kustomize" ] || die "the kustomize package has no usr/bin/kustomize"
    [ -n "$(works "$tmp/root/usr/bin/kustomize")" ] || die "the downloaded kustomize does not run"
    rm -rf "$CACHE/kustomize"
    mkdir -p "$CACHE/kustomize/bin"
    mv "$tmp/root/usr/bin/kustomize" "$bin"
    echo "$version" >"$marker"
    log "kustomize $(works "$bin") in $bin"
    echo "$bin"
}

main "$@"
