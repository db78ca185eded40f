#!/bin/sh
# The scenario run inside every NUMA test guest (busybox sh), as /scenario.sh by /init.
#
# Inputs, from the kernel command line through /init:
#   MEMPLACE_NODES    how many NUMA nodes the guest was given
#   MEMPLACE_NODE_MB  memory per node, MiB
#   MEMPLACE_KVM      1 when the guest is expected to have /dev/kvm (the KVM modules were packed)
# memplaced and memplacectl are in /usr/bin.
#
# Report each result with `check NAME COMMAND...` (or pass/fail) from checks.sh; the host-side test
# fails on any FAIL line, and /init reports a FAIL when this script exits non-zero (it aborted).
# Write scratch files to /dev/shm or /tmp (both tmpfs).

. /lib/memplace-test/checks.sh

NODES=${MEMPLACE_NODES:?memplace.nodes missing from the kernel command line}
NODE_MB=${MEMPLACE_NODE_MB:-0}
LAST=$((NODES - 1))
NODE_SYS=/sys/devices/system/node

# node_meminfo NODE FIELD: the field of the node's meminfo, in kB.
node_meminfo() {
    awk -v f="$2:" '$3 == f { print $4 }' "$NODE_SYS/node$1/meminfo"
}

expect_node_count() {
    count=$(ls -d "$NODE_SYS"/node[0-9]* | wc -l)
    echo "guest has $count nodes, wanted $NODES"
    [ "$count" -eq "$NODES" ]
}

# Every node has a CPU and at least half the memory it was given (the kernel keeps some).
expect_nodes_populated() {
    ok=0
    for n in $(seq 0 "$LAST"); do
        cpus=$(cat "$NODE_SYS/node$n/cpulist")
        total=$(node_meminfo "$n" MemTotal)
        echo "node $n: cpus '$cpus', MemTotal $total kB"
        [ -n "$cpus" ] || ok=1
        [ "$total" -ge $((NODE_MB * 1024 / 2)) ] || ok=1
    done
    return $ok
}

expect_numastat_columns() {
    columns=$(numastat -m | awk '/^ *Node 0/ { print gsub(/Node/, "") }')
    numastat -m | head -n 8
    echo "numastat -m shows $columns node columns, wanted $NODES"
    [ "$columns" -eq "$NODES" ]
}

# shmem_lands NODE MiB NUMACTL-ARGS...: writes MiB into a tmpfs file under `numactl ARGS`, then
# checks by the nodes' Shmem counters that at least 90% of it landed on NODE (or, with NODE "all",
# that every node got at least 80% of an even share).
shmem_lands() {
    want=$1 mib=$2
    shift 2
    file=/dev/shm/shmem-lands-$$
    for n in $(seq 0 "$LAST"); do eval "before_$n=$(node_meminfo "$n" Shmem)"; done
    if ! numactl "$@" dd if=/dev/zero of="$file" bs=1M count="$mib" 2>/tmp/dd.err; then
        cat /tmp/dd.err
        return 1
    fi
    ok=0
    for n in $(seq 0 "$LAST"); do
        eval "grew=\$(( $(node_meminfo "$n" Shmem) - before_$n ))"
        echo "node $n: Shmem grew by $grew kB"
        if [ "$want" = all ]; then
            [ "$grew" -ge $((mib * 1024 * 8 / 10 / NODES)) ] || ok=1
        elif [ "$n" -eq "$want" ]; then
            [ "$grew" -ge $((mib * 1024 * 9 / 10)) ] || ok=1
        fi
    done
    rm -f "$file"
    return $ok
}

# The anonymous pages of a process started under `numactl --membind=NODE` are on NODE, and its
# numa_maps shows the bind policy. File-backed mappings are left out: their page cache came first.
anon_lands() {
    numactl --membind="$1" cat /proc/self/numa_maps >/tmp/numa_maps
    grep anon= /tmp/numa_maps
    awk -v node="$1" '
        / anon=/ && !/ file=/ {
            anon++
            if ($2 != "bind:" node) { print "policy " $2 " on " $1; bad++ }
            for (i = 3; i <= NF; i++)
                if ($i ~ /^N[0-9]+=/ && $i !~ "^N" node "=") { print "page off node: " $0; bad++ }
        }
        END { if (anon == 0) { print "no anonymous mappings"; bad++ } exit (bad > 0) }
    ' /tmp/numa_maps
}

# --- harness sanity: the guest is the machine the test asked for ---------------------------------
sanity_checks() {
    note "kernel $(uname -r), $NODES nodes of $NODE_MB MiB, kvm ${MEMPLACE_KVM:-0}"
    check node-count expect_node_count
    check nodes-populated expect_nodes_populated
    check numastat-columns expect_numastat_columns
    check cgroup2-mounted grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts
    for n in $(seq 0 "$LAST"); do
        check "shmem-bind-node$n" shmem_lands "$n" 16 --membind="$n"
    done
    check shmem-interleave-all shmem_lands all $((8 * NODES)) --interleave=all
    check "anon-bind-node$LAST" anon_lands "$LAST"
    if [ "${MEMPLACE_KVM:-0}" = 1 ]; then
        check kvm-device test -c /dev/kvm
        check kvm-amd-loaded test -d /sys/module/kvm_amd
    fi
    check memplaced-runs memplaced --help
    check memplacectl-runs memplacectl --help
}

# --- memplace scenarios --------------------------------------------------------------------------
memplace_checks() {
    : # memplaced + memplacectl scenarios go here
}

sanity_checks
memplace_checks
# Reaching this line is what tells /init the scenario did not abort.
exit 0
