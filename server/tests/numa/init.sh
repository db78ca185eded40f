#!/bin/sh
# /init of a memplace NUMA test guest (busybox sh): mounts the basics, loads the kernel modules that
# were packed, runs /scenario.sh, prints MEMPLACE-DONE and powers off.
#
# Kernel command line arguments `memplace.KEY=VALUE` reach the scenario as MEMPLACE_KEY=VALUE
# (KEY upper-cased), e.g. memplace.nodes=2 -> MEMPLACE_NODES=2.

# The initramfs has no /dev/console node of its own, so stdio is attached once devtmpfs is up.
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# A checkout under /tmp brings its test binaries into the initramfs at their /tmp/... build paths:
# a tmpfs over /tmp would hide them, so /tmp gets one only when the initramfs put nothing there.
if [ -z "$(ls -A /tmp 2>/dev/null)" ]; then
    mount -t tmpfs -o mode=1777 tmpfs /tmp
else
    chmod 1777 /tmp
fi
mount -t tmpfs -o mode=755 tmpfs /run
# No network device, but loopback is up so a scenario can talk to memplaced over TCP too.
ip link set lo up
if ! mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null; then
    echo "memplace-init: cgroup2 not mounted"
fi

for arg in $(cat /proc/cmdline); do
    case $arg in
        memplace.*=*)
            key=${arg#memplace.}
            key=$(echo "${key%%=*}" | tr 'a-z.-' 'A-Z__')
            export "MEMPLACE_$key=${arg#*=}"
            ;;
    esac
done
export PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/root

. /lib/memplace-test/checks.sh

if [ -f /lib/modules/memplace-test/load-order ]; then
    while read -r module; do
        check "insmod-${module%.ko}" insmod "/lib/modules/memplace-test/$module"
    done </lib/modules/memplace-test/load-order
fi

echo "memplace-init: kernel $(uname -r), running /scenario.sh"
/bin/sh /scenario.sh
status=$?
if [ "$status" -ne 0 ]; then
    echo "MEMPLACE-CHECK FAIL scenario-exit scenario.sh exited with status $status"
fi
echo "MEMPLACE-DONE"
sync
poweroff -f
