#!/bin/bash
# Builds the initramfs of a NUMA test guest: static busybox, numactl and numastat, the given binaries
# with the shared libraries ldd names, optional kernel modules, the /init of this directory and a
# scenario script.
#
# Usage: build-initramfs.sh [--scenario FILE] [--modules DIR] [--bin FILE]... OUT
#   --scenario FILE  the guest's /scenario.sh (default: scenario.sh beside this script)
#   --modules DIR    .ko files and a `load-order` file (from fetch-kernels.sh), loaded by /init
#   --bin FILE       a binary for /usr/bin, debug info stripped (repeatable)
#   --file FILE      a file copied to the same absolute path (symlinks followed); a shared object's
#                    libraries come along as for --bin (repeatable; e.g. QEMU's firmware and modules)
#   --exe FILE       an executable copied to the same absolute path, debug info stripped, with its
#                    libraries (repeatable; e.g. test binaries that find memplaced by its build path)
#   --data FILE      a file copied to /lib/memplace-test/ under its own name (repeatable)
#   OUT              the uncompressed newc cpio archive to write
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SCENARIO=$HERE/scenario.sh
MODULES=""
BINS=()
FILES=()
EXES=()
DATA=()

die() { echo "build-initramfs: ERROR: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
        --scenario) SCENARIO=$2; shift 2 ;;
        --modules) MODULES=$2; shift 2 ;;
        --bin) BINS+=("$2"); shift 2 ;;
        --file) FILES+=("$2"); shift 2 ;;
        --exe) EXES+=("$2"); shift 2 ;;
        --data) DATA+=("$2"); shift 2 ;;
        -*) die "unknown option $1" ;;
        *) break ;;
    esac
done
[ $# -eq 1 ] || die "usage: $0 [--scenario FILE] [--modules DIR] [--bin FILE]... [--file FILE]... [--exe FILE]... [--data FILE]... OUT"
OUT=$1

BUSYBOX=/bin/busybox
if [ ! -x "$BUSYBOX" ] || ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is not a static busybox (install busybox-static)"
fi
[ -f "$SCENARIO" ] || die "no scenario $SCENARIO"
for tool in numactl numastat; do
    command -v "$tool" >/dev/null || die "$tool is missing on the host (install numactl)"
    BINS+=("$(command -v "$tool")")
done

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,lib/memplace-test}
cp "$BUSYBOX" "$STAGE/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
    [ -e "$STAGE/$applet" ] || ln -s /bin/busybox "$STAGE/$applet"
done

# copy_with_libs FILE: FILE into /usr/bin, plus every library and the loader that ldd names, at the
# paths ldd names them by, so the guest's loader finds them the way the host's does.
copy_with_libs() {
    local bin=$1 dest=${2:-} lib
    [ -f "$bin" ] || die "no binary $bin"
    [ -n "$dest" ] || dest=$STAGE/usr/bin/$(basename "$bin")
    mkdir -p "$(dirname "$dest")"
    strip --strip-debug -o "$dest" "$bin" 2>/dev/null || cp "$bin" "$dest"
    chmod 755 "$dest"
    ldd "$bin" >/dev/null 2>&1 || return 0 # static
    for lib in $(ldd "$bin" | sed -n -E 's/.*=> (\/[^ ]+).*/\1/p; s/^[[:space:]]*(\/[^ ]+) \(0x.*/\1/p'); do
        [ -e "$STAGE$lib" ] && continue
        mkdir -p "$STAGE$(dirname "$lib")"
        cp -L "$lib" "$STAGE$lib"
    done
    if ldd "$bin" | grep -q 'not found'; then
        die "$bin needs libraries the host lacks: $(ldd "$bin" | grep 'not found' | tr -s ' \n' ' ')"
    fi
}

for bin in "${BINS[@]}"; do copy_with_libs "$bin"; done
for file in "${FILES[@]}"; do
    case $file in
        /*) ;;
        *) die "--file needs an absolute path: $file" ;;
    esac
    [ -f "$file" ] || die "no file $file"
    if [[ $file == *.so ]]; then
        copy_with_libs "$file" "$STAGE$file"
    else
        mkdir -p "$STAGE$(dirname "$file")"
        cp -L "$file" "$STAGE$file"
    fi
done

for exe in "${EXES[@]}"; do
    case $exe in
        /*) copy_with_libs "$exe" "$STAGE$exe" ;;
        *) die "--exe needs an absolute path: $exe" ;;
    esac
done
for file in "${DATA[@]}"; do
    [ -f "$file" ] || die "no file $file"
    cp -L "$file" "$STAGE/lib/memplace-test/$(basename "$file")"
done

if [ -n "$MODULES" ]; then
    [ -s "$MODULES/load-order" ] || die "$MODULES has no load-order file"
    mkdir -p "$STAGE/lib/modules/memplace-test"
    while read -r module; do
        cp "$MODULES/$module" "$STAGE/lib/modules/memplace-test/"
    done <"$MODULES/load-order"
    cp "$MODULES/load-order" "$STAGE/lib/modules/memplace-test/"
fi

install -m 755 "$HERE/init.sh" "$STAGE/init"
install -m 644 "$HERE/checks.sh" "$STAGE/lib/memplace-test/checks.sh"
install -m 644 "$HERE/placement.sh" "$STAGE/lib/memplace-test/placement.sh"
install -m 755 "$SCENARIO" "$STAGE/scenario.sh"

mkdir -p "$(dirname "$OUT")"
(cd "$STAGE" && find . -mindepth 1 | sort | "$BUSYBOX" cpio -o -H newc -R 0:0) >"$OUT.tmp" 2>/dev/null
mv "$OUT.tmp" "$OUT"
