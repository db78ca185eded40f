#!/bin/bash
# Builds the memplace image (memplace:VERSION in the local podman/buildah store) from
# deploy/Dockerfile without any container registry:
#   - the base is Debian bookworm from `debootstrap --variant=minbase` (cached), made an image
#     with `podman import` (localhost/memplace-base:bookworm);
#   - the binaries are the workspace's own `cargo build --release --locked -p memplace-server
#     -p memplacectl` (or --bin-dir), built into the Dockerfile's `runtime-prebuilt` target,
#     whose runtime stage is the one the registry path (target `runtime`) uses.
# Prints the image name on stdout; everything else goes to stderr.
#
# Usage: deploy/build-image.sh [--bin-dir DIR] [--tag NAME]
#   --bin-dir DIR   take memplaced and memplacectl from DIR instead of building them (release)
#   --tag NAME      image name (default memplace:VERSION, VERSION from server/Cargo.toml)
#
# Needs root, and installs podman, buildah, runc and debootstrap from Debian when missing.
# Environment:
#   MEMPLACE_TOOL_CACHE          cache directory (default /var/cache/memplace-test-tools)
#   MEMPLACE_BASE_MAX_AGE_DAYS   rebuild the cached debootstrap base after this long (default 30)
#   MEMPLACE_DEBIAN_MIRROR       Debian archive URL, when the system's apt sources name none
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MEMPLACE_TOOL_CACHE:-/var/cache/memplace-test-tools}
MAX_AGE_DAYS=${MEMPLACE_BASE_MAX_AGE_DAYS:-30}
BASE=localhost/memplace-base:bookworm

log() { echo "build-image: $*" >&2; }
die() { echo "build-image: ERROR: $*" >&2; exit 1; }

# debian_mirror.
# shellcheck source=../.ci/private-apt.sh
source "$ROOT/.ci/private-apt.sh"
# ensure_container_tools and CONTAINERS_CONF.
# shellcheck source=podman/tools.sh
source "$ROOT/deploy/podman/tools.sh"

BIN_DIR=
TAG=
while [ $# -gt 0 ]; do
    case $1 in
        --bin-dir) BIN_DIR=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        *) die "unknown argument $1 (usage: build-image.sh [--bin-dir DIR] [--tag NAME])" ;;
    esac
done

VERSION=$(sed -n 's/^version[[:space:]]*=[[:space:]]*"\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n1)
[ -n "$VERSION" ] || VERSION=$(sed -n 's/^version[[:space:]]*=[[:space:]]*"\(.*\)"/\1/p' "$ROOT/server/Cargo.toml" | head -n1)
[ -n "$VERSION" ] || die "no version in Cargo.toml"
TAG=${TAG:-memplace:$VERSION}
REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)

# The debootstrap tree as a tarball in the cache, and the base image imported from it.
make_base() {
    local tar=$CACHE/bookworm-minbase/rootfs.tar
    mkdir -p "$CACHE/bookworm-minbase"
    exec 8>"$CACHE/.lock-bookworm-minbase"
    flock 8
    if [ ! -f "$tar" ] || [ -n "$(find "$tar" -mmin "+$((MAX_AGE_DAYS * 1440))")" ]; then
        local mirror tree
        mirror=$(debian_mirror)
        tree=$(mktemp -d "$CACHE/bookworm-minbase/tree.XXXXXX")
        log "debootstrap --variant=minbase bookworm from $mirror"
        debootstrap --variant=minbase bookworm "$tree" "$mirror" >&2 ||
            { rm -rf "$tree"; die "debootstrap of bookworm failed"; }
        # As debian:bookworm-slim: no package lists or caches in the image.
        rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin "$tree"/var/cache/apt/archives/*.deb
        tar --numeric-owner -C "$tree" -cf "$tar.new" .
        rm -rf "$tree"
        mv "$tar.new" "$tar"
        podman rmi -f "$BASE" >/dev/null 2>&1 || true
    fi
    if ! podman image exists "$BASE"; then
        log "podman import $tar as $BASE"
        podman import --change 'CMD ["/bin/bash"]' "$tar" "$BASE" >&2 || die "podman import failed"
    fi
    exec 8>&-
}

main() {
    [ "$(id -u)" = 0 ] || die "run as root (podman's store, debootstrap)"
    ensure_container_tools
    mkdir -p "$CACHE" || die "cannot create $CACHE; set MEMPLACE_TOOL_CACHE"
    make_base

    if [ -z "$BIN_DIR" ]; then
        log "cargo build --release --locked -p memplace-server -p memplacectl"
        (cd "$ROOT" && cargo build --release --locked -p memplace-server -p memplacectl >&2) ||
            die "cargo build failed"
        BIN_DIR=$ROOT/target/release
    fi
    local ctx
    ctx=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$ctx'" EXIT
    for b in memplaced memplacectl; do
        [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing"
        cp "$BIN_DIR/$b" "$ctx/"
    done
    # The image TAG names now; it is removed once the new build has taken the name.
    local old
    old=$(podman image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
    log "buildah bud --target runtime-prebuilt -t $TAG (base $BASE)"
    buildah bud --pull=false --target runtime-prebuilt -f "$ROOT/deploy/Dockerfile" \
        --build-arg "RUNTIME_IMAGE=$BASE" --build-arg "VERSION=$VERSION" \
        --build-arg "REVISION=$REVISION" -t "$TAG" "$ctx" >&2 || die "buildah bud failed"
    podman image exists "$TAG" || die "podman does not see $TAG after the build"
    if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$TAG")" ]; then
        podman rmi "$old" >/dev/null 2>&1 || log "the previous $TAG ($old) is still in use; kept"
    fi
    echo "$TAG"
}

main
