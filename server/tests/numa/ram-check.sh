#!/bin/sh
# The guest of server/tests/vmm_exec.rs and vmm_attach.rs (run as /scenario.sh by init.sh): writes
# random data into the guest's RAM (a tmpfs file) and checks it every few seconds, until QEMU is
# killed. Its console lines:
#   RAMCHECK MARKER <text>       <text> is also written into RAM, for the host to find in the file
#   RAMCHECK WROTE <MiB> <md5>   the data is written; <md5> is its checksum
#   RAMCHECK OK <n> <md5>        check number <n> read the data back intact
#   RAMCHECK FAIL <n> <detail>   check number <n> did not
# Kernel argument memplace.ramcheck_mb=N sets the amount of data (default 32 MiB).
set -u

MB=${MEMPLACE_RAMCHECK_MB:-32}
DIR=/dev/shm/ramcheck
mkdir -p "$DIR"

# A marker the host cannot know before the guest prints it.
MARKER="MEMPLACE-GUEST-RAM-$(head -c 16 /dev/urandom | md5sum | cut -c1-24)"
printf '%s\n' "$MARKER" >"$DIR/marker"
echo "RAMCHECK MARKER $MARKER"

if ! dd if=/dev/urandom of="$DIR/data" bs=1M count="$MB" 2>/dev/null; then
    echo "RAMCHECK FAIL 0 cannot write $MB MiB into $DIR"
    exit 1
fi
WANT=$(md5sum "$DIR/data" | cut -d' ' -f1)
echo "RAMCHECK WROTE $MB $WANT"

n=0
while :; do
    n=$((n + 1))
    GOT=$(md5sum "$DIR/data" | cut -d' ' -f1)
    if [ "$GOT" = "$WANT" ] && [ "$(cat "$DIR/marker")" = "$MARKER" ]; then
        echo "RAMCHECK OK $n $GOT"
    else
        echo "RAMCHECK FAIL $n data $GOT, wanted $WANT; marker $(cat "$DIR/marker")"
    fi
    sleep 2
done
