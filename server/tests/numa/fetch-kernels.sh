#!/bin/bash
# Fetches the Debian kernels the NUMA guest tests boot, and makes sure the host has the tools to boot them.
#
# Three kernels are wanted, each with its KVM modules decompressed:
#   old  bookworm's 6.1 cloud kernel (linux-image-6.1.*-cloud-amd64), Debian 12's default: no
#        guest_memfd at all (the kernel matrix);
#   lts  the newest 6.12 cloud kernel (linux-image-6.12.*-cloud-amd64), booted without KVM by the
#        NUMA scenario and with it by the kernel matrix;
#   new  the newest >= 6.19 cloud kernel of sid or forky, because guest_memfd has a shared memory
#        policy only from 6.19 on.
#
# Packages come through private apt lists under the cache directory, so the system's apt sources are
# never touched. The Debian mirror is the one the system's apt sources name (or MEMPLACE_DEBIAN_MIRROR).
#
# Prints on stdout, one per line, for KIND in old, lts and new: KIND_version= KIND_vmlinuz=
# KIND_modules= (a directory of .ko files plus a `load-order` file). Everything else goes to stderr.
#
# Environment:
#   MEMPLACE_KERNEL_CACHE          cache directory (default /var/cache/memplace-test-kernels)
#   MEMPLACE_KERNEL_MAX_AGE_DAYS   reuse a chosen kernel this long before looking for a newer one (default 7)
#   MEMPLACE_KERNEL_REFRESH=1      look for newer kernels now
#   MEMPLACE_LTS_SERIES            kernel series of the lts kernel (default 6.12)
#   MEMPLACE_LTS_SUITES            suites searched for it (default "trixie bookworm-backports")
#   MEMPLACE_OLD_SERIES            kernel series of the old kernel (default 6.1)
#   MEMPLACE_OLD_SUITES            suites searched for it (default "bookworm")
#   MEMPLACE_NEW_SUITES            suites searched for the new kernel (default "sid forky")
#   MEMPLACE_NEW_MIN               oldest acceptable new kernel (default 6.19)
#   MEMPLACE_DEBIAN_MIRROR         Debian archive URL, when the system's apt sources name none
set -euo pipefail

CACHE=${MEMPLACE_KERNEL_CACHE:-/var/cache/memplace-test-kernels}
MAX_AGE_DAYS=${MEMPLACE_KERNEL_MAX_AGE_DAYS:-7}
LTS_SERIES=${MEMPLACE_LTS_SERIES:-6.12}
LTS_SUITES=${MEMPLACE_LTS_SUITES:-trixie bookworm-backports}
OLD_SERIES=${MEMPLACE_OLD_SERIES:-6.1}
OLD_SUITES=${MEMPLACE_OLD_SUITES:-bookworm}
NEW_SUITES=${MEMPLACE_NEW_SUITES:-sid forky}
NEW_MIN=${MEMPLACE_NEW_MIN:-6.19}
# The KVM module for the AMD-V that QEMU's TCG emulates with `-cpu max`; its dependencies come along.
KVM_ROOT_MODULE=kvm-amd

log() { echo "fetch-kernels: $*" >&2; }
die() { echo "fetch-kernels: ERROR: $*" >&2; exit 1; }

# debian_mirror, apt_root, apt_update, version_ge and KEYRING.
# shellcheck source=../../../.ci/private-apt.sh
source "$(dirname "$0")/../../../.ci/private-apt.sh"

# --- host tools ---------------------------------------------------------------------------------

# Prints the Debian packages whose tools are missing.
missing_host_packages() {
    command -v qemu-system-x86_64 >/dev/null || echo qemu-system-x86
    # The guest's /bin/busybox must be static; Debian's dynamic `busybox` package installs the same path.
    if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then echo busybox-static; fi
    command -v xz >/dev/null || echo xz-utils
    { command -v numactl && command -v numastat; } >/dev/null || echo numactl
    command -v dpkg-deb >/dev/null || echo dpkg
}

ensure_host_packages() {
    local missing
    missing=$(missing_host_packages | xargs)
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        die "missing host packages: $missing; install them (apt-get install $missing) or run as root"
    fi
    log "installing host packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2 || die "apt-get update failed"
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $missing >&2 || die "could not install: $missing"
    missing=$(missing_host_packages | xargs)
    [ -z "$missing" ] || die "still missing after install: $missing"
}

# --- private apt --------------------------------------------------------------------------------

# Prints the real package names known to the private lists that start with $1.
pkgnames() { apt-cache "${APT[@]}" pkgnames "$1" 2>/dev/null | sort -u; }

# --- unpacking ----------------------------------------------------------------------------------

# Copies one module to $2 decompressed, naming it after the module.
decompress_module() {
    local src=$1 dest=$2
    case $src in
        *.ko.xz) xz -dc "$src" >"$dest" ;;
        *.ko.zst) zstd -qdc "$src" >"$dest" ;;
        *.ko.gz) gzip -dc "$src" >"$dest" ;;
        *.ko) cp "$src" "$dest" ;;
        *) die "unknown module format: $src" ;;
    esac
}

# Prints the `depends=` list of a decompressed module, one name a line.
module_depends() { tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | tr ',' '\n' | sed '/^$/d'; }

# Finds module NAME under the kernel tree $1 (module names use _ where files may use -).
find_module() {
    local tree=$1 name=$2 alt
    alt=${name//_/-}
    find "$tree" \( -name "$name.ko*" -o -name "$alt.ko*" \) -print -quit
}

# add_module TREE OUTDIR NAME: decompresses NAME and its dependencies, appending to load-order
# dependencies first.
add_module() {
    local tree=$1 out=$2 name=$3 src dep file
    name=${name//-/_}
    grep -qx "$name.ko" "$out/load-order" 2>/dev/null && return 0
    src=$(find_module "$tree" "$name")
    [ -n "$src" ] || die "module $name not found under $tree"
    file=$out/$name.ko
    decompress_module "$src" "$file"
    for dep in $(module_depends "$file"); do
        add_module "$tree" "$out" "$dep"
    done
    echo "$name.ko" >>"$out/load-order"
}

# unpack KIND VERSION DEB...: extracts vmlinuz and the KVM modules into the kernel cache.
unpack() {
    local kind=$1 version=$2 deb tmp dest vmlinuz tree
    shift 2
    dest=$CACHE/kernels/$version
    tmp=$(mktemp -d "$CACHE/unpack.XXXXXX")
    for deb in "$@"; do dpkg-deb -x "$deb" "$tmp"; done
    rm -rf "$dest.partial"
    mkdir -p "$dest.partial"
    vmlinuz=$(find "$tmp" \( -path "*/boot/vmlinuz-$version" -o -path "*/modules/$version/vmlinuz" \) -print -quit)
    [ -n "$vmlinuz" ] || die "no vmlinuz for $version in $*"
    cp "$vmlinuz" "$dest.partial/vmlinuz"
    tree=$(find "$tmp" -type d -path "*/modules/$version/kernel" -print -quit)
    [ -n "$tree" ] || die "no modules for $version in $*"
    mkdir -p "$dest.partial/modules"
    add_module "$tree" "$dest.partial/modules" "$KVM_ROOT_MODULE"
    rm -rf "$tmp" "$dest"
    mv "$dest.partial" "$dest"
    touch "$dest/.complete"
}

# download PKG...: downloads the packages into $CACHE/download.
download() {
    local dir=$CACHE/download
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$dir" && apt-get "${APT[@]}" download "$@" >&2) || die "apt-get download $* failed"
}

# --- choosing -----------------------------------------------------------------------------------

# Prints "VERSION PKG..." for the newest lts kernel, or nothing.
choose_lts() { choose_series "$LTS_SERIES"; }
# Prints "VERSION PKG..." for the newest old kernel, or nothing.
choose_old() { choose_series "$OLD_SERIES"; }

# choose_series SERIES: the newest linux-image-SERIES.*-cloud-amd64, whatever its ABI spelling
# (6.12.57+deb13-cloud-amd64, 6.1.0-41-cloud-amd64), or nothing.
choose_series() {
    local series=${1//./\\.}
    local name
    name=$(pkgnames "linux-image-$1." |
        grep -E "^linux-image-$series\.[0-9]+([+-][0-9a-z.+-]*)?-cloud-amd64\$" |
        grep -v -- '-unsigned$' | sort -V | tail -n1) || true
    [ -n "$name" ] || return 0
    local version=${name#linux-image-}
    echo "$version $name"
}

# Prints "VERSION PKG..." for the newest kernel >= NEW_MIN that comes with its modules, or nothing.
# Newer Debian kernels split the image into linux-binary-V (vmlinuz) and linux-modules-V; older
# ones ship both in linux-image-V.
choose_new() {
    local names version upstream
    names=$(pkgnames linux-)
    for version in $(echo "$names" | sed -n -E 's/^linux-(image|binary)-([0-9][^ ]*-cloud-amd64)$/\2/p' |
        sort -V -u -r); do
        upstream=${version%%+*}
        version_ge "$upstream" "$NEW_MIN" || continue
        if grep -qx "linux-binary-$version" <<<"$names"; then
            if grep -qx "linux-modules-$version" <<<"$names"; then
                echo "$version linux-binary-$version linux-modules-$version"
                return
            fi
            log "skipping $version: linux-binary without linux-modules"
        elif grep -qx "linux-image-$version" <<<"$names" &&
            ! apt-cache "${APT[@]}" depends "linux-image-$version" 2>/dev/null | grep -q "linux-binary-$version"; then
            echo "$version linux-image-$version"
            return
        fi
    done
}

# is_fresh FILE: FILE exists and is younger than MAX_AGE_DAYS.
is_fresh() {
    [ -f "$1" ] && [ -z "$(find "$1" -mmin "+$((MAX_AGE_DAYS * 1440))")" ]
}

# select_kernel KIND SUITES: sets SELECTED to a cached, complete kernel version of KIND.
select_kernel() {
    local kind=$1 suites=$2
    local marker=$CACHE/selected-$kind cached="" choice version
    SELECTED=""
    if [ -f "$marker" ]; then
        cached=$(cat "$marker")
        [ -f "$CACHE/kernels/$cached/.complete" ] || cached=""
    fi
    if [ -n "$cached" ] && [ "${MEMPLACE_KERNEL_REFRESH:-0}" != 1 ] && is_fresh "$marker"; then
        SELECTED=$cached
        return
    fi
    # shellcheck disable=SC2086
    apt_root "$CACHE/apt-$kind" $suites
    if ! apt_update "$suites"; then
        [ -n "$cached" ] || die "apt-get update of $suites failed and no $kind kernel is cached"
        log "WARNING: apt-get update failed; keeping cached $kind kernel $cached"
        SELECTED=$cached
        return
    fi
    choice=$("choose_$kind")
    if [ -z "$choice" ]; then
        case $kind in
            lts) die "no linux-image-$LTS_SERIES.*-cloud-amd64 package in suites: $suites" ;;
            old) die "no linux-image-$OLD_SERIES.*-cloud-amd64 package in suites: $suites" ;;
            new) die "no cloud-amd64 kernel >= $NEW_MIN with its modules in suites: $suites" ;;
        esac
    fi
    version=${choice%% *}
    if [ ! -f "$CACHE/kernels/$version/.complete" ]; then
        log "downloading $kind kernel $version"
        # shellcheck disable=SC2086
        download ${choice#* }
        unpack "$kind" "$version" "$CACHE"/download/*.deb
        rm -rf "$CACHE/download"
    fi
    echo "$version" >"$marker.tmp"
    mv "$marker.tmp" "$marker"
    SELECTED=$version
}

# Removes cached kernels that neither kind selects any more.
prune() {
    local dir keep
    keep=$(cat "$CACHE"/selected-* 2>/dev/null || true)
    for dir in "$CACHE"/kernels/*/; do
        [ -d "$dir" ] || continue
        grep -qxF "$(basename "$dir")" <<<"$keep" || rm -rf "$dir"
    done
}

main() {
    ensure_host_packages
    if ! mkdir -p "$CACHE/kernels" 2>/dev/null || [ ! -w "$CACHE" ]; then
        die "cannot write $CACHE; set MEMPLACE_KERNEL_CACHE to a writable directory"
    fi
    exec 9>"$CACHE/.lock"
    flock 9

    select_kernel lts "$LTS_SUITES"
    local lts=$SELECTED
    select_kernel new "$NEW_SUITES"
    local new=$SELECTED
    select_kernel old "$OLD_SUITES"
    local old=$SELECTED
    prune

    local kind version
    for kind in old lts new; do
        eval "version=\$$kind"
        # A kernel cached before modules were kept for every kind is unpacked again.
        if [ ! -s "$CACHE/kernels/$version/modules/load-order" ]; then
            rm -rf "$CACHE/selected-$kind" "$CACHE/kernels/$version"
            MEMPLACE_KERNEL_REFRESH=1 select_kernel "$kind" "$(eval echo "\$${kind^^}_SUITES")"
            version=$SELECTED
        fi
        [ -s "$CACHE/kernels/$version/modules/load-order" ] || die "kernel $version has no KVM modules"
        echo "${kind}_version=$version"
        echo "${kind}_vmlinuz=$CACHE/kernels/$version/vmlinuz"
        echo "${kind}_modules=$CACHE/kernels/$version/modules"
    done
}

main "$@"
