#!/bin/sh
# The guest of server/tests/vmm_exec.rs and vmm_attach.rs (run as /scenario.sh by init.sh): writes
# random data into the guest's RAM (a tmpfs file) and checks it every few seconds, until QEMU is
# killed. Its console lines:
#   RAMCHECK MARKER <text>       <text> is also written into RAM, for the host to find in the file
#   RAMCHECK WROTE <MiB> <md5>   the data is written; <md5> is its checksum
#   RAMCHECK OK <n> <md5>        check number <n> read the data back intact
#   RAMCHECK FAIL <n> <detail>   check number <n> did not
# Kernel argument memplace.ramcheck_mb=N sets the amount of data (default 32 MiB);
# MEMPLACE_RAMCHECK_DIR where it is kept (default /dev/shm/ramcheck) and MEMPLACE_RAMCHECK_MD5SUM the
# md5sum it runs (the host's test of this script, tests/ram_check.rs, sets both). A checksum that
# cannot be had, or is not one, is a FAIL: never an empty OK.
set -euo pipefail

MB=${MEMPLACE_RAMCHECK_MB:-32}
DIR=${MEMPLACE_RAMCHECK_DIR:-/dev/shm/ramcheck}
MD5SUM=${MEMPLACE_RAMCHECK_MD5SUM:-md5sum}
mkdir -p "$DIR"

# The md5 of file $1, or a failure if md5sum fails or prints no 32-hex-digit sum.
sum() {
    local s
    s=$("$MD5SUM" "$1" | cut -d' ' -f1) || return 1
    case "$s" in
        "" | *[!0-9a-f]*) return 1 ;;
    esac
    [ ${#s} -eq 32 ] || return 1
    echo "$s"
}

# A marker the host cannot know before the guest prints it.
head -c 16 /dev/urandom >"$DIR/seed"
if ! SEED=$(sum "$DIR/seed"); then
    echo "RAMCHECK FAIL 0 no checksum of 16 random bytes for the marker"
    exit 1
fi
MARKER="MEMPLACE-GUEST-RAM-$(echo "$SEED" | cut -c1-24)"
printf '%s\n' "$MARKER" >"$DIR/marker"
echo "RAMCHECK MARKER $MARKER"

if ! dd if=/dev/urandom of="$DIR/data" bs=1M count="$MB" 2>/dev/null; then
    echo "RAMCHECK FAIL 0 cannot write $MB MiB into $DIR"
    exit 1
fi
if ! WANT=$(sum "$DIR/data"); then
    echo "RAMCHECK FAIL 0 no checksum of the $MB MiB written"
    exit 1
fi
echo "RAMCHECK WROTE $MB $WANT"

n=0
while :; do
    n=$((n + 1))
    GOT=$(sum "$DIR/data") || GOT="(no checksum)"
    MARK=$(cat "$DIR/marker") || MARK="(unreadable)"
    if [ "$GOT" = "$WANT" ] && [ "$MARK" = "$MARKER" ]; then
        echo "RAMCHECK OK $n $GOT"
    else
        echo "RAMCHECK FAIL $n data $GOT, wanted $WANT; marker $MARK"
    fi
    sleep 2
done
