#!/bin/sh
# The kernel matrix's capability scenario (busybox sh, as /scenario.sh by /init): what memplace does
# on this kernel, run on each kernel of the matrix (Debian's 6.1, 6.12 and newest 7.x) in a 2-node
# guest with KVM under TCG (`-cpu max`).
#
# Besides check lines it prints one `MEMPLACE-MATRIX KEY=VALUE` line per row of README's table
# "What memplace does on each kernel"; the harness (`kernel_matrix` in numa_guest.rs) builds the
# table from them and compares it with README. Values are words that do not change between runs of
# one kernel series (no sizes, pids or patch versions).
. /lib/memplace-test/checks.sh
. /lib/memplace-test/placement.sh
set -uo pipefail

NODES=${MEMPLACE_NODES:?memplace.nodes missing from the kernel command line}
LAST=$((NODES - 1))
MB=32
PAGES=$((MB * 256))

# row KEY VALUE: one row of the table. Kept in a file and printed at the end, since a `step`'s
# output goes to the log only on failure.
ROWS=$WORK/matrix.rows
: >"$ROWS"
row() { echo "MEMPLACE-MATRIX $1=$2" >>"$ROWS"; }

# info_row KEY PATH: a row from `memplacectl info`'s capabilities.
info_row() {
    local v
    v=$(flat_get "$WORK/info.flat" "capabilities.$2")
    case $v in
        true) v=yes ;;
        false) v=no ;;
    esac
    row "$1" "${v:-missing}"
}

probe() {
    ctl_json info info || return 1
    grep '^capabilities\.' "$WORK/info.flat"
}

# A memfd region BIND {last}: created, populated, every page on the last node in GetPlacement and
# in a holder's numa_maps. The holder keeps the file through the restart (MEMFD_HOLDER).
MEMFD_HOLDER=""
memfd_case() {
    region_create vm-m ram ${MB}M --policy "bind:$LAST" || return 1
    row memfd-strategy "$(flat_get "$WORK/create.flat" strategy)"
    populate vm-m ram || return 1
    expect_placement vm-m ram "$LAST:$PAGES" 0 || return 1
    holder_start vm-m ram ${MB}M || return 1
    MEMFD_HOLDER=$HOLDER_PID
    expect_holder "$HOLDER_PID" $((MB << 20)) "$LAST:$PAGES" 0
}

# A guest_memfd region BIND {last}: where the kernel has guest_memfd, placed like the memfd (by the
# agent's populate); where it has none, refused with FAILED_PRECONDITION (exit 19) and a reason.
gmem_case() {
    local status=0
    memplacectl -o json region create vm-m gmem --size ${MB}M --backend guest-memfd \
        --policy "bind:$LAST" >"$WORK/gmem.json" 2>"$WORK/gmem.err" || status=$?
    cat "$WORK/gmem.json" "$WORK/gmem.err"
    case $status in
        0)
            json_flat <"$WORK/gmem.json" >"$WORK/gmem.flat" || return 1
            row gmem-strategy "$(flat_get "$WORK/gmem.flat" strategy)"
            populate vm-m gmem || return 1
            expect_placement vm-m gmem "$LAST:$PAGES" 0 || return 1
            row gmem-bind-populate-placement "pages on node $LAST"
            ;;
        19)
            row gmem-strategy "refused (FAILED_PRECONDITION)"
            grep -q 'does not support guest_memfd' "$WORK/gmem.err" || {
                echo "the refusal does not say why"
                return 1
            }
            row gmem-bind-populate-placement "refused: kernel does not support guest_memfd"
            ;;
        *)
            echo "region create exited $status, want 0 or 19"
            return 1
            ;;
    esac
}

# SIGKILL and restart while a holder keeps the memfd: the region is back (taken from the holder
# with pidfd_getfd), applied, with its pages on the last node.
restart_case() {
    [ -n "$MEMFD_HOLDER" ] || { echo "no holder: the memfd case failed"; return 1; }
    agent_kill || return 1
    agent_start matrix on_node 0 || return 1
    expect_region vm-m ram status=active ranges.0.state=applied ranges.0.observed.mode=bind \
        "ranges.0.observed.nodes.0=$LAST" "holder_pid=$MEMFD_HOLDER" || return 1
    expect_placement vm-m ram "$LAST:$PAGES" 0
}

note "kernel matrix on $(uname -r), $NODES nodes"
row kernel-series "$(uname -r | cut -d. -f1-2)"
check matrix-kvm test -c /dev/kvm
step matrix-agent-start agent_start matrix on_node 0 || exit 0
if step matrix-probe probe; then
    info_row kvm-usable kvm_usable
    info_row guest-memfd guest_memfd_supported
    info_row guest-memfd-shared-policy guest_memfd_shared_policy
    info_row guest-memfd-interleave-exact guest_memfd_interleave_exact
    info_row memfd-shared-policy memfd_shared_policy
    info_row hugetlb-shared-policy hugetlb_shared_policy
    info_row preferred-many preferred_many_supported
    info_row weighted-interleave weighted_interleave_supported
    info_row pidfd-getfd pidfd_getfd_supported
fi
step matrix-memfd memfd_case && row memfd-bind-populate-placement "pages on node $LAST"
step matrix-gmem gmem_case
step matrix-restart restart_case && row restart-sigkill "region back, applied, pages intact"
[ -n "$MEMFD_HOLDER" ] && holder_stop "$MEMFD_HOLDER"
agent_stop
cat "$ROWS"
exit 0
