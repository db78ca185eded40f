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
# Every name printed as PASS must be declared in `expected_checks` of server/tests/numa_guest.rs,
# for the guests that run it: a declared check that does not pass fails the guest (so a section
# that stops early cannot go unnoticed), and so does a PASS that is not declared.
# Write scratch files to /dev/shm or /tmp (both tmpfs).

. /lib/memplace-test/checks.sh
set -uo pipefail

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
    numastat -m >/tmp/numastat.out
    columns=$(awk '/^ *Node 0/ { print gsub(/Node/, "") }' /tmp/numastat.out)
    head -n 8 /tmp/numastat.out
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
    grep anon= /tmp/numa_maps || true
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
# Every placement is read twice: by the agent (GetPlacement, `memplacectl placement`) and, where a
# holder maps the region, from the holder's /proc/PID/numa_maps. Both are compared with the nodes
# the policy must produce (placement.sh), never with "some pages exist".

. /lib/memplace-test/placement.sh

MB=32                          # region size of each check
PAGES=$(pages_of_mb $MB)       # 8192
HALF=$((PAGES / 2))
TOL_INTERLEAVE=$((PAGES / 100)) # interleave by file offset is exact; 1% is the stated tolerance
CGROOT=/sys/fs/cgroup
WEIGHTS=/sys/kernel/mm/mempolicy/weighted_interleave
# MEMPLACE_SELFTEST=wrong-node (kernel argument memplace.selftest=wrong-node): expect node 0 where
# BIND puts the pages on the last node, so both placement checks of bind-one-node must FAIL, and
# the kernel policy bind:0 where it is bind:LAST, so its kernel-policy check must FAIL too.
SELFTEST=${MEMPLACE_SELFTEST:-}

# The agents of the scenario run on node 0's CPU (the confined agent excepted), and Populate
# allocates in the agent's threads: so a policy on other nodes is never mistaken for local
# allocation, and where a range must land on node 0, its populate runs with the agent moved to the
# last node (populate_on).
#
# Two nodes for BIND and PREFERRED_MANY: on 4 nodes 1 and the last, leaving node 0 (the agent's)
# out, so both pages on the pair and the kernel's policy are checked. On 2 nodes the pair is every
# node, where no placement can tell the policy from local allocation: only the kernel's policy,
# read from a holder's numa_maps, is checked there.
if [ "$NODES" -gt 2 ]; then
    PAIR="1,$LAST" PAIR_SHOWN="1,$LAST" PAIR_WANT="1+$LAST:$PAGES"
else
    PAIR="0,1" PAIR_SHOWN="0-1" PAIR_WANT=-
fi

# mode_case NAME EXPECTED TOLERANCE KERNEL-POLICY POLICY [POLICY-SET-ARGS...]: a memfd region is
# created with POLICY (MODE[:NODES]), or, with POLICY "-", gets its policy from `policy set ARGS`;
# the agent populates it, and GetPlacement and a holder's numa_maps must both show EXPECTED (not
# compared when EXPECTED is "-"). Unless KERNEL-POLICY is "-", the holder's numa_maps must show
# that policy (expect_holder_policy): the check for policies that place like local allocation.
mode_case() {
    local name=$1 want=$2 tol=$3 kpolicy=$4 policy=$5
    shift 5
    if [ "$policy" = - ]; then
        step "$name-create" region_create vm-modes "$name" ${MB}M || return 1
        step "$name-policy" set_policy vm-modes "$name" "$@" || {
            region_delete vm-modes "$name"
            return 1
        }
    else
        step "$name-create" region_create vm-modes "$name" ${MB}M --policy "$policy" || return 1
    fi
    if step "$name-populate" populate vm-modes "$name"; then
        [ "$want" = - ] || check "$name-agent" expect_placement vm-modes "$name" "$want" "$tol"
        if step "$name-hold" holder_start vm-modes "$name" ${MB}M; then
            [ "$want" = - ] ||
                check "$name-numa-maps" expect_holder "$HOLDER_PID" $((MB << 20)) "$want" "$tol"
            [ "$kpolicy" = - ] ||
                check "$name-kernel-policy" expect_holder_policy "$HOLDER_PID" $((MB << 20)) "$kpolicy"
            holder_stop "$HOLDER_PID"
        fi
    fi
    region_delete vm-modes "$name"
}

set_weights() {
    for f in auto __auto_type; do
        [ -e "$WEIGHTS/$f" ] && { echo 0 >"$WEIGHTS/$f" || return 1; }
    done
    for n in $(seq 0 "$LAST"); do echo 1 >"$WEIGHTS/node$n" || return 1; done
    echo 3 >"$WEIGHTS/node0" && echo 1 >"$WEIGHTS/node$LAST" || return 1
    grep . "$WEIGHTS"/*
}

every_mode() {
    if [ "$SELFTEST" = wrong-node ]; then
        note "self-test: bind-one-node expects node 0 and policy bind:0, which the pages must not have"
        mode_case bind-one-node "0:$PAGES" 0 bind:0 "bind:$LAST"
        return
    fi
    mode_case bind-one-node "$LAST:$PAGES" 0 - "bind:$LAST"
    mode_case bind-two-nodes "$PAIR_WANT" 0 "bind:$PAIR_SHOWN" "bind:$PAIR"
    mode_case preferred "$LAST:$PAGES" 0 - - --mode preferred --nodes "$LAST"
    mode_case preferred-many "$PAIR_WANT" 0 "prefer (many):$PAIR_SHOWN" "preferred-many:$PAIR"
    mode_case interleave-2 "0:$HALF $LAST:$HALF" "$TOL_INTERLEAVE" - "interleave:0,$LAST"
    if [ "$NODES" -ge 4 ]; then
        q=$((PAGES / 4))
        mode_case interleave-4 "0:$q 1:$q 2:$q 3:$q" "$TOL_INTERLEAVE" - interleave:0-3
    fi
    if step weighted-interleave-weights set_weights; then
        mode_case weighted-interleave "0:$((PAGES * 3 / 4)) $LAST:$((PAGES / 4))" "$TOL_INTERLEAVE" \
            - - --mode weighted-interleave --nodes "0,$LAST"
    fi
}

# per_range_case VM: one region, three ranges on different nodes: [0,8M) BIND 0, [8M,16M) BIND
# last, [16M,32M) INTERLEAVE over all nodes. Each range is populated on its own, with the agent on
# a node its policy leaves out (the last node for range a, node 0 for range b). Each range's
# placement is checked, then a holder that touches only the first 8 MiB and one that touches
# everything.
per_range_case() {
    local vm=$1 q=$((PAGES / 4)) share=$((HALF / NODES)) all="" totals n
    step "per-range-$vm-create" region_create "$vm" ranges ${MB}M --policy "interleave:0-$LAST" || return 1
    if step "per-range-$vm-policy-a" set_policy "$vm" ranges --length 8M --mode bind --nodes 0 &&
        step "per-range-$vm-policy-b" set_policy "$vm" ranges --offset 8M --length 8M --mode bind --nodes "$LAST" &&
        step "per-range-$vm-populate-a" populate_on "$LAST" "$vm" ranges --length 8M &&
        step "per-range-$vm-populate-b" populate_on 0 "$vm" ranges --offset 8M --length 8M &&
        step "per-range-$vm-populate-c" populate "$vm" ranges --offset 16M; then
        for n in $(seq 0 "$LAST"); do all="$all $n:$share"; done
        totals="0:$((q + share)) $LAST:$((q + share))"
        for n in $(seq 1 $((LAST - 1))); do totals="$totals $n:$share"; done
        check "per-range-$vm-agent" expect_placement "$vm" ranges "$totals" "$TOL_INTERLEAVE"
        check "per-range-$vm-agent-a" expect_range_placement 0 0 "0:$q" 0
        check "per-range-$vm-agent-b" expect_range_placement 1 $((8 << 20)) "$LAST:$q" 0
        check "per-range-$vm-agent-c" expect_range_placement 2 $((16 << 20)) "$all" "$TOL_INTERLEAVE"
        if step "per-range-$vm-hold-8M" holder_start "$vm" ranges 8M; then
            check "per-range-$vm-numa-maps-a" expect_holder "$HOLDER_PID" $((MB << 20)) "0:$q" 0
            # The holder maps the whole file but faulted only 8 MiB, and each range is a part of
            # its mapping: the agent counts every range in its own window, exactly as before.
            check "per-range-$vm-held-agent" expect_placement "$vm" ranges "$totals" "$TOL_INTERLEAVE"
            check "per-range-$vm-held-by-window" expect_counted_from 0 0 0
            holder_stop "$HOLDER_PID"
        fi
        if step "per-range-$vm-hold-all" holder_start "$vm" ranges ${MB}M; then
            check "per-range-$vm-numa-maps-all" expect_holder "$HOLDER_PID" $((MB << 20)) "$totals" "$TOL_INTERLEAVE"
            holder_stop "$HOLDER_PID"
        fi
    fi
    region_delete "$vm" ranges
}

# A populated range moves from node 0 to the last node with `policy set --migrate`; the holder
# keeps it mapped throughout and sees every page on the last node afterwards. The agent populates
# from the last node, so the pages on node 0 before the move are the policy's doing.
migrate_case() {
    step migrate-create region_create vm-migrate r ${MB}M --policy bind:0 || return 1
    if step migrate-populate populate_on "$LAST" vm-migrate r &&
        step migrate-hold holder_start vm-migrate r ${MB}M; then
        check migrate-before-numa-maps expect_holder "$HOLDER_PID" $((MB << 20)) "0:$PAGES" 0
        step migrate-set-policy set_policy vm-migrate r --mode bind --nodes "$LAST" --migrate &&
            check migrate-reported expect_migrated "$PAGES"
        check migrate-after-agent expect_placement vm-migrate r "$LAST:$PAGES" 0
        # The holder maps the whole file and every page of it: GetPlacement read its numa_maps.
        check migrate-after-by-holder expect_counted_from "$HOLDER_PID"
        check migrate-after-numa-maps expect_holder "$HOLDER_PID" $((MB << 20)) "$LAST:$PAGES" 0
        # The first half alone is a part of the holder's mapping: counted in the agent's window.
        check migrate-after-half-agent expect_placement vm-migrate r "$LAST:$HALF" 0 --length $((MB / 2))M
        check migrate-after-half-by-window expect_counted_from 0
        holder_stop "$HOLDER_PID"
    fi
    region_delete vm-migrate r
}

expect_migrated() {
    moved=$(flat_get "$WORK/policy.flat" pages_migrated)
    failed=$(flat_get "$WORK/policy.flat" pages_migrate_failed)
    echo "pages migrated $moved, failed $failed; want $1 and 0"
    [ "$moved" = "$1" ] && [ "$failed" = 0 ]
}

# SIGKILL the agent while holders keep the fds, then restart it. Before: a memfd region (and on
# the KVM guest a guest_memfd region, see gmem_before_restart) BIND to the last node, half
# populated by the agent, half held by a holder on node 0's CPU. After: the regions, their policy
# and their pages are intact, and memory allocated after the restart still lands on the last node:
# faulted by a new holder on node 0's CPU, and (guest_memfd) populated by the agent.
restart_case() {
    local gen memfd_holder="" gmem_holder=""
    if step restart-create region_create vm-restart r ${MB}M --policy "bind:$LAST"; then
        gen=$(flat_get "$WORK/create.flat" generation)
        if step restart-populate-half populate vm-restart r --length $((MB / 2))M &&
            step restart-hold holder_start vm-restart r $((MB / 2))M numactl --cpunodebind=0; then
            memfd_holder=$HOLDER_PID
            check restart-before-numa-maps expect_holder "$memfd_holder" $((MB << 20)) "$LAST:$HALF" 0
        fi
    fi
    if [ "${MEMPLACE_KVM:-0}" = 1 ]; then
        gmem_before_restart && gmem_holder=$HOLDER_PID
    fi
    step restart-sigkill agent_kill
    step restart-agent-back agent_start main on_node 0 || return 1
    check restart-agent-on-node0 expect_agent_on 0
    if [ -n "$memfd_holder" ]; then
        check restart-intent-intact expect_region vm-restart r status=active "generation=$gen" \
            strategy=shared-policy ranges.0.state=applied ranges.0.observed.mode=bind \
            "ranges.0.observed.nodes.0=$LAST" "holder_pid=$memfd_holder"
        check restart-pages-intact expect_placement vm-restart r "$LAST:$HALF" 0 --length $((MB / 2))M
        if step restart-hold-more holder_start vm-restart r ${MB}M numactl --cpunodebind=0; then
            check restart-new-pages-numa-maps expect_holder "$HOLDER_PID" $((MB << 20)) "$LAST:$PAGES" 0
            check restart-new-pages-agent expect_placement vm-restart r "$LAST:$PAGES" 0
            holder_stop "$HOLDER_PID"
        fi
        holder_stop "$memfd_holder"
    fi
    region_delete vm-restart r
    if [ -n "$gmem_holder" ]; then
        gmem_after_restart
        holder_stop "$gmem_holder"
    fi
    [ "${MEMPLACE_KVM:-0}" = 1 ] && region_delete vm-gmem g
    return 0
}

# BIND to a node with less free memory than the region: Populate is refused with
# RESOURCE_EXHAUSTED (memplacectl exit 18) and nothing was allocated.
capacity_case() {
    local free_mb big
    free_mb=$(($(node_meminfo "$LAST" MemFree) / 1024))
    big=$((free_mb + 64))
    step capacity-create region_create vm-capacity big ${big}M --policy "bind:$LAST" || return 1
    check capacity-refused expect_exit 18 memplacectl populate vm-capacity big
    check capacity-nothing-allocated expect_nothing_allocated vm-capacity big $((big * 256))
    region_delete vm-capacity big
}

expect_nothing_allocated() {
    ctl_json placement placement "$1" "$2" || return 1
    absent=$(flat_get "$WORK/placement.flat" pages_not_present)
    echo "pages not present: $absent of $3"
    [ "$absent" = "$3" ]
}

# Populate with --cgroup charges the named memory cgroup (v2) for the pages.
cgroup_case() {
    local before after cg=$CGROOT/memplace-vm
    step cgroup-setup sh -c "echo +memory >$CGROOT/cgroup.subtree_control && mkdir -p $cg && cat $cg/memory.current" ||
        return 1
    step cgroup-create region_create vm-cgroup r ${MB}M --policy "bind:$LAST" || return 1
    before=$(cat $cg/memory.current)
    step cgroup-populate populate vm-cgroup r --cgroup "$cg"
    after=$(cat $cg/memory.current)
    check cgroup-charged expect_growth "$before" "$after" $((MB << 20))
    check cgroup-placement expect_placement vm-cgroup r "$LAST:$PAGES" 0
    region_delete vm-cgroup r
}

expect_growth() {
    echo "memory.current $1 -> $2, grew by $(($2 - $1)) bytes; want at least 95% of $3"
    [ $(($2 - $1)) -ge $(($3 * 95 / 100)) ]
}

# guest_memfd with the kernel's shared policy (6.19+ with KVM), 48 MiB: BIND to the last node
# after creation; the agent populates the first 16 MiB, a holder on node 0's CPU faults the next
# 16 MiB. Both must land on the last node. Leaves HOLDER_PID holding it for the restart.
GMEM_MB=$((MB + MB / 2))
gmem_before_restart() {
    step gmem-create region_create vm-gmem g ${GMEM_MB}M --backend guest-memfd || return 1
    check gmem-shared-policy expect_region vm-gmem g strategy=shared-policy backend=guest-memfd
    step gmem-policy set_policy vm-gmem g --mode bind --nodes "$LAST" || return 1
    step gmem-populate populate vm-gmem g --length $((MB / 2))M &&
        check gmem-populate-agent expect_placement vm-gmem g "$LAST:$HALF" 0 --length $((MB / 2))M
    step gmem-hold holder_start vm-gmem g ${MB}M numactl --cpunodebind=0 || return 1
    check gmem-holder-faults-numa-maps expect_holder "$HOLDER_PID" $((GMEM_MB << 20)) "$LAST:$PAGES" 0
    check gmem-holder-faults-agent expect_placement vm-gmem g "$LAST:$PAGES" 0 --length ${MB}M
    return 0
}

# After the SIGKILL and restart, with the first holder keeping the fd: the policy is intact, a new
# holder on node 0's CPU faults 8 MiB more, and the agent populates the rest; all on the last node.
gmem_after_restart() {
    local total
    total=$(pages_of_mb $GMEM_MB)
    check gmem-intent-intact expect_region vm-gmem g status=active strategy=shared-policy \
        ranges.0.state=applied ranges.0.observed.mode=bind "ranges.0.observed.nodes.0=$LAST"
    if step gmem-hold-after-restart holder_start vm-gmem g $((MB + 8))M numactl --cpunodebind=0; then
        step gmem-populate-after-restart populate vm-gmem g &&
            check gmem-after-restart-agent expect_placement vm-gmem g "$LAST:$total" 0
        holder_stop "$HOLDER_PID"
    fi
    if step gmem-hold-all-after-restart holder_start vm-gmem g ${GMEM_MB}M numactl --cpunodebind=0; then
        check gmem-after-restart-numa-maps expect_holder "$HOLDER_PID" $((GMEM_MB << 20)) "$LAST:$total" 0
        holder_stop "$HOLDER_PID"
    fi
}

# A real guest on guest_memfd placed by memplace (KVM guests). memplace-test-vmm, on node 0's CPU,
# creates its own KVM VM and a 32 MiB guest_memfd, binds it as guest RAM and adopts it into an
# agent of its own; SetPolicy BIND {last} is set while no page exists yet, and only then does the
# guest run: each SIGUSR1 runs guest code that writes every page of the next 16 MiB (the VMM
# reads the pattern back). Each pass is read twice: GetPlacement, and the growth of the last
# node's FilePages in its sysfs meminfo (guest_memfd pages are file pages of that node). Between
# the passes the agent is SIGKILLed and restarted: it must hold the VMM's guest_memfd again (same
# st_dev:st_ino among its fds), with the intent intact, and the second pass lands on the last
# node too. QEMU 11.1 (Debian sid) cannot back a non-confidential VM's RAM with guest_memfd (see
# the top-level README's "A VMM on guest_memfd"), hence this minimal VMM.
VMM_MB=$MB
vmm_case() {
    local half all before
    half=$(pages_of_mb $((VMM_MB / 2)))
    all=$(pages_of_mb $VMM_MB)
    step vmm-agent-start agent_start vmm || return 1
    if ! step vmm-start vmm_start vm-vmm ram ${VMM_MB}M $((VMM_MB / 2))M numactl --cpunodebind=0; then
        agent_stop
        return 1
    fi
    check vmm-adopted expect_region vm-vmm ram backend=guest-memfd strategy=shared-policy \
        status=active "holder_pid=$VMM_PID"
    check vmm-agent-holds-gmem expect_holds_file "$AGENT_PID" "$VMM_GMEM"
    check vmm-untouched-before-policy expect_nothing_allocated vm-vmm ram "$all"
    step vmm-policy set_policy vm-vmm ram --mode bind --nodes "$LAST"
    check vmm-untouched-after-policy expect_nothing_allocated vm-vmm ram "$all"
    before=$(node_meminfo "$LAST" FilePages)
    if step vmm-guest-pass-1 vmm_pass 1; then
        check vmm-pass-1-meminfo expect_file_pages_growth "$LAST" "$before" "$half"
        check vmm-pass-1-agent expect_placement vm-vmm ram "$LAST:$half" 0 --length $((VMM_MB / 2))M
    fi
    step vmm-agent-sigkill agent_kill
    if step vmm-agent-back agent_start vmm; then
        check vmm-agent-holds-gmem-after-restart expect_holds_file "$AGENT_PID" "$VMM_GMEM"
        check vmm-intent-intact expect_region vm-vmm ram status=active strategy=shared-policy \
            "holder_pid=$VMM_PID" ranges.0.state=applied ranges.0.observed.mode=bind \
            "ranges.0.observed.nodes.0=$LAST"
        before=$(node_meminfo "$LAST" FilePages)
        if step vmm-guest-pass-2 vmm_pass 2; then
            check vmm-pass-2-meminfo expect_file_pages_growth "$LAST" "$before" "$half"
            check vmm-pass-2-agent expect_placement vm-vmm ram "$LAST:$all" 0
        fi
    fi
    holder_stop "$VMM_PID"
    region_delete vm-vmm ram
    agent_stop
}

# vmm_start VM NAME SIZE PASS [WRAPPER...]: starts memplace-test-vmm (under WRAPPER, which must exec
# it) with two passes of PASS bytes, and waits for its adopt. Sets VMM_PID, VMM_GMEM (dev:ino of
# its guest_memfd) and VMM_OUT.
vmm_start() {
    local vm=$1 name=$2 size=$3 pass=$4 token tries=0
    shift 4
    VMM_OUT=$WORK/vmm.$vm.$name
    VMM_PID="" VMM_GMEM=""
    token=$(memplacectl token "$vm") || return 1
    : >"$VMM_OUT"
    "$@" memplace-test-vmm --handoff-socket "$MEMPLACE_HANDOFF_SOCKET" --token "$token" \
        "$vm" "$name" --size "$size" --pass "$pass" --pass "$pass" >"$VMM_OUT" 2>&1 &
    VMM_PID=$!
    until grep -q '^vmm: adopted' "$VMM_OUT"; do
        if ! kill -0 "$VMM_PID" 2>/dev/null || [ "$tries" -ge 1200 ]; then
            echo "memplace-test-vmm did not adopt:"
            cat "$VMM_OUT"
            return 1
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
    cat "$VMM_OUT"
    VMM_GMEM=$(sed -n 's/^vmm: adopted .* gmem \([0-9]*:[0-9]*\) .*/\1/p' "$VMM_OUT")
    [ -n "$VMM_GMEM" ]
}

# vmm_pass N: SIGUSR1 to the VMM, which runs the guest over its next span; waits for its answer.
vmm_pass() {
    local tries=0
    kill -USR1 "$VMM_PID" || return 1
    until grep -q -e "^vmm: pass $1 " -e '^vmm: error' "$VMM_OUT"; do
        if ! kill -0 "$VMM_PID" 2>/dev/null || [ "$tries" -ge 1200 ]; then
            echo "memplace-test-vmm did not finish pass $1:"
            break
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
    cat "$VMM_OUT"
    grep -q "^vmm: pass $1 .*guest halted, pattern ok" "$VMM_OUT"
}

# expect_holds_file PID DEV:INO: one of PID's fds is the file DEV:INO.
expect_holds_file() {
    local f
    for f in /proc/"$1"/fd/*; do
        if [ "$(stat -L -c '%d:%i' "$f" 2>/dev/null)" = "$2" ]; then
            echo "pid $1 holds $2 as $f -> $(readlink "$f")"
            return 0
        fi
    done
    echo "pid $1 holds no fd of file $2"
    return 1
}

# expect_file_pages_growth NODE BEFORE_KB PAGES: the node's FilePages grew by PAGES pages, within
# FILE_PAGES_TOL: the node's other file pages (tmpfs logs, page cache) move by a page or two while
# the guest runs (one run here: 4,095 and 4,095 for 4,096 written, and +1 page between the passes).
FILE_PAGES_TOL=16
expect_file_pages_growth() {
    local now grew
    now=$(node_meminfo "$1" FilePages)
    grew=$(((now - $2) / 4))
    echo "node $1 FilePages $2 kB -> $now kB: grew by $grew pages, want $3 within $FILE_PAGES_TOL"
    [ "$grew" -ge $(($3 - FILE_PAGES_TOL)) ] && [ "$grew" -le $(($3 + FILE_PAGES_TOL)) ]
}

# Interleave on guest_memfd (KVM guests): the agent's start-up probe (a 16-page guest_memfd
# interleaved over nodes 0 and 1, faulted, its pages' nodes counted) finds it exact on the new
# kernel (7.2 takes the interleave index from the page offset; 6.19 to 7.1 did not), so SetPolicy
# INTERLEAVE on a guest_memfd region gives no warning, and the agent's populate splits the pages
# evenly between the two nodes.
gmem_interleave_case() {
    check gmem-interleave-probe-exact expect_info capabilities.guest_memfd_interleave_exact=true
    step gmem-interleave-create region_create vm-gmem-il r ${MB}M --backend guest-memfd || return 1
    if step gmem-interleave-policy set_policy vm-gmem-il r --mode interleave --nodes "0,$LAST"; then
        check gmem-interleave-no-warning expect_no_warning
        step gmem-interleave-populate populate vm-gmem-il r &&
            check gmem-interleave-agent expect_placement vm-gmem-il r "0:$HALF $LAST:$HALF" 0
    fi
    region_delete vm-gmem-il r
}

# The warning path, on the same kernel: an agent whose probe result is overridden to "not exact"
# (MEMPLACE_TEST_GMEM_INTERLEAVE_EXACT=false, because no Debian kernel from 6.19 to 7.1 comes with
# its KVM modules) applies SetPolicy INTERLEAVE on a guest_memfd region, answers with a warning
# and logs a POLICY_WARNING event; BIND on the same region gets no warning.
gmem_interleave_warning_case() {
    step gmem-il-warn-agent agent_start il-warn env MEMPLACE_TEST_GMEM_INTERLEAVE_EXACT=false || return 1
    check gmem-il-warn-info expect_info capabilities.guest_memfd_interleave_exact=false
    if step gmem-il-warn-create region_create vm-il-warn r ${MB}M --backend guest-memfd; then
        if step gmem-il-warn-policy set_policy vm-il-warn r --mode interleave --nodes "0,$LAST"; then
            check gmem-il-warning expect_flat_match "$WORK/policy.flat" warnings.0 \
                "^interleave on guest_memfd is not exact on kernel .* the policy was applied as asked\$"
            check gmem-il-warning-applied expect_region vm-il-warn r ranges.0.state=applied \
                ranges.0.observed.mode=interleave
            check gmem-il-warning-event expect_event vm-il-warn policy-warning "interleave on guest_memfd is not exact"
        fi
        step gmem-il-warn-bind set_policy vm-il-warn r --mode bind --nodes "$LAST" &&
            check gmem-il-bind-no-warning expect_no_warning
        region_delete vm-il-warn r
    fi
    agent_stop
}

# expect_flat_match FILE PATH REGEX: the json_flat field matches REGEX (grep -E).
expect_flat_match() {
    local got
    got=$(flat_get "$1" "$2")
    echo "$2: '$got', want /$3/"
    printf '%s\n' "$got" | grep -Eq "$3"
}

# expect_event VM KIND TEXT: the VM's event log has a KIND event whose message contains TEXT.
expect_event() {
    memplacectl events --vm "$1" >"$WORK/events.out" || return 1
    cat "$WORK/events.out"
    grep " $2 " "$WORK/events.out" | grep -qF "$3"
}

# expect_info PATH=VALUE...: fields of `memplacectl info` (GetNodeInfo) have these values.
expect_info() {
    memplacectl -o json info | json_flat >"$WORK/info.flat" || return 1
    grep '^capabilities\.guest_memfd_interleave' "$WORK/info.flat"
    expect_flat "$WORK/info.flat" "$@"
}

# expect_no_warning: the last set_policy's answer carries no warning.
expect_no_warning() {
    if grep '^warnings\.' "$WORK/policy.flat"; then
        return 1
    fi
    echo "no warnings"
}

# Without KVM (the 6.12 guests) a guest_memfd region is refused with FAILED_PRECONDITION (19).
guest_memfd_unsupported() {
    status=0
    memplacectl region create vm-gmem g --size ${MB}M --backend guest-memfd >"$WORK/gmem.out" 2>&1 ||
        status=$?
    cat "$WORK/gmem.out"
    echo "exit $status, want 19 and a message naming KVM"
    [ "$status" -eq 19 ] && grep -q KVM "$WORK/gmem.out"
}

# An agent confined by a cpuset cgroup: cpus = the last node's CPU, mems = nodes 1..last.
# LOCAL and DEFAULT: Populate allocates in the agent's worker threads, so LOCAL means their node,
# and DEFAULT falls back to their task policy (none: local allocation); both put every page on
# the last node. RELATIVE: the kernel folds relative node ids onto the allowed set, so relative
# {1} is the second allowed node (node 2 of {1,2,3}), or node 1 when only {1} is allowed
# (1 mod 1 = 0), and the kernel reports the relative mask as given. Plain BIND {0} is refused
# there (INVALID_ARGUMENT, exit 13). STATIC {1} places on node 1 and the kernel reports the static
# flag back; the rebinding that STATIC changes happens only when the cpuset changes later, which is
# not shown. On 2 nodes every allowed page is on node 1, the agent's own node, so each case also
# checks the policy the kernel shows in a holder's numa_maps.
confined_agent_checks() {
    local cg=$CGROOT/memplace-agent relative_node=$((1 + 1 % LAST))
    step cpuset-setup sh -c "echo +cpuset >$CGROOT/cgroup.subtree_control && mkdir -p $cg &&
        echo 1-$LAST >$cg/cpuset.mems && echo $LAST >$cg/cpuset.cpus && cat $cg/cpuset.mems.effective" ||
        return 1
    step agent-confined-start agent_start confined sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$cg" ||
        return 1
    check agent-confined-cpuset expect_confined "$AGENT_PID"
    mode_case local "$LAST:$PAGES" 0 local local
    mode_case default "$LAST:$PAGES" 0 default default
    mode_case relative "$relative_node:$PAGES" 0 "bind=relative:$relative_node" \
        - --mode bind --nodes 1 --relative
    check relative-reported expect_flat "$WORK/policy.flat" ranges.0.state=applied \
        ranges.0.observed.relative_nodes=true ranges.0.observed.nodes.0=1
    check bind-outside-cpuset-refused expect_exit 13 set_policy_fresh vm-cpuset outside --mode bind --nodes 0
    mode_case static "1:$PAGES" 0 "bind=static:1" - --mode bind --nodes 1 --static
    check static-reported expect_flat "$WORK/policy.flat" ranges.0.state=applied \
        ranges.0.observed.static_nodes=true ranges.0.observed.nodes.0=1
    agent_stop
}

expect_confined() {
    grep -E '^(Mems|Cpus)_allowed_list' /proc/"$1"/status
    grep -Eq "^Mems_allowed_list:[[:space:]]*(1-$LAST|$LAST)\$" /proc/"$1"/status &&
        grep -Eq "^Cpus_allowed_list:[[:space:]]*$LAST\$" /proc/"$1"/status
}

set_policy_fresh() {
    local vm=$1 name=$2 status
    shift 2
    region_create "$vm" "$name" ${MB}M >/dev/null || return 99
    status=0
    memplacectl policy set "$vm" "$name" "$@" || status=$?
    memplacectl region delete "$vm" "$name" || return 98
    return $status
}

# The task-policy strategy (the one guest_memfd uses without a shared policy) forced on memfd:
# the agent's workers allocate under a thread policy per range.
task_policy_agent_checks() {
    step agent-task-policy-start agent_start task-policy on_node 0 env MEMPLACE_FORCE_STRATEGY=task-policy ||
        return 1
    check agent-task-policy-on-node0 expect_agent_on 0
    if step task-policy-create region_create vm-task r ${MB}M --policy "bind:$LAST"; then
        check task-policy-strategy expect_region vm-task r strategy=task-policy &&
            step task-policy-populate populate vm-task r &&
            check task-policy-bind-agent expect_placement vm-task r "$LAST:$PAGES" 0 &&
            if step task-policy-hold holder_start vm-task r ${MB}M; then
                check task-policy-bind-numa-maps expect_holder "$HOLDER_PID" $((MB << 20)) "$LAST:$PAGES" 0
                holder_stop "$HOLDER_PID"
            fi
        region_delete vm-task r
    fi
    per_range_case vm-task
    agent_stop
}

# A nested QEMU (the host's Debian QEMU 7.2, packed into the initramfs) on memplace regions, on the
# 2-node 6.12 guest. `-accel tcg -S`: the vCPU never runs (nested TCG inside TCG is very slow, and
# no guest code is needed), and prealloc=on makes QEMU's own threads fault every page of guest RAM
# at start-up. Debian's QEMU has no qtest accelerator. QEMU runs on node 0's CPU through
# `memplacectl exec`, on a 48 MiB region (a size no other QEMU mapping has) created BIND {last}:
# its numa_maps and GetPlacement must show every page on the last node. Then a pattern is written
# through QEMU's fd, the region moves to node 0 with `policy set --migrate`, and both readings must
# show every page on node 0 with the content unchanged. A second QEMU given
# `host-nodes=0,policy=interleave` mbinds its region's file itself: GetRegion must show the range
# drifted (the agent's periodic reconcile is off), `memplacectl reconcile` must report it drifted
# and re-applied, a drift-found event names it, and GetRegion shows it applied again.
NQ_MB=48
nested_qemu_case() {
    local pages fd sum q2=""
    pages=$(pages_of_mb $NQ_MB)
    step nested-qemu-agent-start agent_start nested on_node 0 || return 1
    if step nested-qemu-create region_create vm-q ram ${NQ_MB}M --policy "bind:$LAST"; then
        if step nested-qemu-start nested_qemu_start vm-q prealloc=on; then
            local q1=$QEMU_PID
            check nested-qemu-numa-maps-node1 expect_holder "$q1" $((NQ_MB << 20)) "$LAST:$pages" 0
            check nested-qemu-placement expect_placement vm-q ram "$LAST:$pages" 0
            fd=$(qemu_ram_fd "$q1")
            if step nested-qemu-pattern nested_qemu_pattern "$q1" "$fd"; then
                sum=$(cat "$WORK/nq.sum")
                step nested-qemu-migrate set_policy vm-q ram --mode bind --nodes 0 --migrate &&
                    check nested-qemu-migrated-numa-maps expect_holder "$q1" $((NQ_MB << 20)) "0:$pages" 0
                check nested-qemu-migrated-placement expect_placement vm-q ram "0:$pages" 0
                check nested-qemu-intact expect_sum "$q1" "$fd" "$sum"
            fi
            nested_qemu_stop "$q1"
        fi
        region_delete vm-q ram
    fi
    if step nested-qemu-drift-create region_create vm-q2 ram ${NQ_MB}M --policy "bind:$LAST"; then
        if step nested-qemu-host-nodes-start nested_qemu_start vm-q2 prealloc=off,host-nodes=0,policy=interleave; then
            q2=$QEMU_PID
            check nested-qemu-host-nodes-drift expect_region vm-q2 ram ranges.0.state=drifted
            check nested-qemu-reconcile expect_reconcile
            check nested-qemu-drift-event expect_drift_event vm-q2 ram
            check nested-qemu-repaired expect_region vm-q2 ram ranges.0.state=applied \
                ranges.0.observed.mode=bind "ranges.0.observed.nodes.0=$LAST"
            nested_qemu_stop "$q2"
        fi
        region_delete vm-q2 ram
    fi
    attached_qemu_case
    agent_stop
}

# nested_qemu_start VM BACKEND-OPTIONS: QEMU through `memplacectl exec` on node 0's CPU, its guest
# RAM the VM's region `ram`; waits until its mapping of the region has every page (prealloc=on)
# or, with a policy= option, until QEMU has set that policy on it. Sets QEMU_PID.
nested_qemu_start() {
    local vm=$1 opts=$2 out=$WORK/qemu.$1
    QEMU_PID=""
    : >"$out"
    on_node 0 memplacectl exec "$vm" -- qemu-system-x86_64 -accel tcg -S -machine pc -nodefaults \
        -display none -monitor none -serial none -m ${NQ_MB}M \
        -object "memory-backend-file,id=m0,size=${NQ_MB}M,mem-path={path:ram},share=on,$opts" \
        -machine memory-backend=m0 >"$out" 2>&1 &
    QEMU_PID=$!
    nested_qemu_wait "$vm" "$opts" "$out"
}

# nested_qemu_wait VM BACKEND-OPTIONS OUT: waits (at most 120 s) until QEMU_PID's guest RAM mapping
# has every page, or the policy its options name.
nested_qemu_wait() {
    local vm=$1 opts=$2 out=$3 tries=0 line
    while :; do
        line=$(holder_line "$QEMU_PID" $((NQ_MB << 20)) 2>/dev/null) || line=""
        case $opts in
            *policy=interleave*) echo "$line" | grep -q ' interleave:0 ' && break ;;
            *) [ "$(echo "$line" | awk '{ for (i = 2; i <= NF; i++) if ($i ~ /^N[0-9]+=/) {
                split($i, kv, "="); s += kv[2] } } END { print s + 0 }')" -eq "$(pages_of_mb $NQ_MB)" ] && break ;;
        esac
        if ! kill -0 "$QEMU_PID" 2>/dev/null || [ "$tries" -ge 1200 ]; then
            echo "QEMU of $vm did not start (numa_maps: '$line'):"
            cat "$out"
            return 1
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
    echo "QEMU pid $QEMU_PID: $line"
    cat "$out"
}

# A QEMU started without memplace, on its own `memory-backend-memfd` (prealloc=on, on node 0's CPU,
# so every page is on node 0), is taken over with `memplacectl attach --pid`, then moved with
# `policy set --migrate` to BIND {last}: QEMU's numa_maps and GetPlacement must show every page on
# the last node. This is the attach path's placement proof; the host has one node.
attached_qemu_case() {
    local pages opts=prealloc=on out=$WORK/qemu.attach
    pages=$(pages_of_mb $NQ_MB)
    : >"$out"
    on_node 0 qemu-system-x86_64 -accel tcg -S -machine pc -nodefaults -display none \
        -monitor none -serial none -m ${NQ_MB}M \
        -object "memory-backend-memfd,id=m0,size=${NQ_MB}M,share=on,$opts" \
        -machine memory-backend=m0 >"$out" 2>&1 &
    QEMU_PID=$!
    step nested-qemu-attach-start nested_qemu_wait vm-att "$opts" "$out" || {
        kill -KILL "$QEMU_PID" 2>/dev/null
        return 1
    }
    local q=$QEMU_PID
    check nested-qemu-attach-before-node0 expect_holder "$q" $((NQ_MB << 20)) "0:$pages" 0
    if step nested-qemu-attach attach_qemu vm-att "$q"; then
        local name
        name=$(cat "$WORK/attach.name")
        step nested-qemu-attach-migrate set_policy vm-att "$name" --mode bind --nodes "$LAST" --migrate &&
            check "nested-qemu-attach-numa-maps-node$LAST" expect_holder "$q" $((NQ_MB << 20)) "$LAST:$pages" 0
        check "nested-qemu-attach-placement-node$LAST" expect_placement vm-att "$name" "$LAST:$pages" 0
        region_delete vm-att "$name"
    fi
    nested_qemu_stop "$q"
}

# attach_qemu VM PID: `memplacectl attach VM --pid PID`; the answer must have exactly one region,
# a memfd of the backend's size, whose name goes to $WORK/attach.name.
attach_qemu() {
    ctl_json attach attach "$1" --pid "$2" || return 1
    cat "$WORK/attach.flat"
    expect_flat "$WORK/attach.flat" regions.0.backend=memfd "regions.0.size_bytes=$((NQ_MB << 20))" regions.1.name= ||
        return 1
    flat_get "$WORK/attach.flat" regions.0.name >"$WORK/attach.name" || return 1
    [ -s "$WORK/attach.name" ]
}

nested_qemu_stop() {
    kill -TERM "$1" 2>/dev/null || { fail nested-qemu-gone "QEMU pid $1 exited before it was stopped"; return 1; }
    wait "$1" 2>/dev/null
    return 0
}

# qemu_ram_fd PID: the fd of QEMU's guest RAM, from its mem-path=/proc/self/fd/N.
qemu_ram_fd() {
    tr '\0' '\n' </proc/"$1"/cmdline | sed -n 's/.*mem-path=\/proc\/self\/fd\/\([0-9]*\),.*/\1/p'
}

# nested_qemu_pattern PID FD: random bytes over the whole of guest RAM, written through QEMU's fd
# (prealloc placed the pages already; writing replaces their content only), and their checksum.
nested_qemu_pattern() {
    [ -n "$2" ] || { echo "no mem-path fd in QEMU's command line"; return 1; }
    dd if=/dev/urandom of=/proc/"$1"/fd/"$2" bs=1M count=$NQ_MB conv=notrunc 2>&1 || return 1
    md5sum </proc/"$1"/fd/"$2" | cut -d ' ' -f 1 >"$WORK/nq.sum" || return 1
    echo "pattern checksum $(cat "$WORK/nq.sum")"
}

# expect_sum PID FD SUM: the content read through QEMU's fd has checksum SUM.
expect_sum() {
    local now
    now=$(md5sum </proc/"$1"/fd/"$2" | cut -d ' ' -f 1)
    echo "checksum $now, before the migration $3"
    [ "$now" = "$3" ]
}

expect_reconcile() {
    ctl_json reconcile reconcile --vm vm-q2 || return 1
    cat "$WORK/reconcile.flat"
    expect_flat "$WORK/reconcile.flat" ranges_drifted=1 ranges_reapplied=1 ranges_failed=0
}

# expect_drift_event VM NAME: the VM's event log has a drift-found event naming the region.
expect_drift_event() {
    memplacectl -o json events --vm "$1" >"$WORK/events.json" || return 1
    cat "$WORK/events.json"
    grep -Ei '"kind": *"drift[-_]found"' "$WORK/events.json" | grep -q "\"name\": *\"$2\""
}

# section NAME FUNCTION: runs one group of checks, with the guest's uptime in the log.
section() {
    note "$1 at $(cut -d ' ' -f 1 /proc/uptime) s"
    shift
    "$@"
}

memplace_checks() {
    section agent step agent-start agent_start main on_node 0 || return 0
    check agent-on-node0 expect_agent_on 0
    section modes every_mode
    [ -n "$SELFTEST" ] && return 0
    section per-range per_range_case vm-ranges
    section migrate migrate_case
    section capacity capacity_case
    section cgroup cgroup_case
    if [ "${MEMPLACE_KVM:-0}" != 1 ]; then
        section guest-memfd check gmem-unsupported guest_memfd_unsupported
        check gmem-interleave-probe-unknown expect_info capabilities.guest_memfd_interleave_exact=unknown
    else
        section guest-memfd-interleave gmem_interleave_case
    fi
    section restart restart_case
    agent_stop
    if [ "${MEMPLACE_KVM:-0}" = 1 ]; then
        section guest-memfd-interleave-warning gmem_interleave_warning_case
        section guest-vmm vmm_case
    fi
    section confined-agent confined_agent_checks
    section task-policy-agent task_policy_agent_checks
    if [ "$NODES" -eq 2 ] && [ "${MEMPLACE_KVM:-0}" != 1 ]; then
        section nested-qemu nested_qemu_case
    fi
    note "done at $(cut -d ' ' -f 1 /proc/uptime) s"
}

if [ -z "$SELFTEST" ]; then
    section sanity sanity_checks
fi
memplace_checks
# Reaching this line is what tells /init the scenario did not abort.
exit 0
