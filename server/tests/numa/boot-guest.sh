#!/bin/bash
# Boots a NUMA test guest under QEMU TCG with one memory backend and one vCPU per node, and writes
# its serial console to a log. QEMU is killed after the timeout.
#
# Usage: boot-guest.sh [--nodes N] [--node-mb MIB] [--kvm] [--timeout SECS] [--append ARGS]
#                      --kernel VMLINUZ --initrd INITRAMFS --log FILE
#   --kvm  emulate AMD-V (-cpu max) so the guest can run KVM, and tell the scenario (memplace.kvm=1)
# Defaults come from MEMPLACE_NUMA_NODES (2), MEMPLACE_NUMA_NODE_MB (512) and
# MEMPLACE_GUEST_TIMEOUT_SECS (900).
#
# Exit status: QEMU's (0 after the guest powers off), or 124 when the timeout killed it.
set -euo pipefail

NODES=${MEMPLACE_NUMA_NODES:-2}
NODE_MB=${MEMPLACE_NUMA_NODE_MB:-512}
TIMEOUT=${MEMPLACE_GUEST_TIMEOUT_SECS:-900}
KVM=0
KERNEL="" INITRD="" LOG="" APPEND=""

die() { echo "boot-guest: ERROR: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case $1 in
        --nodes) NODES=$2; shift 2 ;;
        --node-mb) NODE_MB=$2; shift 2 ;;
        --kvm) KVM=1; shift ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --append) APPEND=$2; shift 2 ;;
        --kernel) KERNEL=$2; shift 2 ;;
        --initrd) INITRD=$2; shift 2 ;;
        --log) LOG=$2; shift 2 ;;
        *) die "unknown argument $1" ;;
    esac
done
[ -f "$KERNEL" ] || die "--kernel: no file '$KERNEL'"
[ -f "$INITRD" ] || die "--initrd: no file '$INITRD'"
[ -n "$LOG" ] || die "--log is required"
[ "$NODES" -ge 1 ] 2>/dev/null || die "--nodes must be a positive number"
[ "$NODE_MB" -ge 64 ] 2>/dev/null || die "--node-mb must be at least 64"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (install qemu-system-x86)"

# One host thread runs every vCPU (thread=single). With multi-threaded TCG, a vCPU can run a stale
# translation of kernel text that another vCPU just patched (jump labels are patched through an
# int3), and the guest kernel oopses with "int3" in a random place; on a loaded 2-core host this
# struck 2 of 4 guests at the agent's start. The scenario is sequential, so little is lost.
args=(-accel tcg,thread=single -m "$((NODES * NODE_MB))M" -smp "$NODES")
[ "$KVM" = 1 ] && args+=(-cpu max)
for ((n = 0; n < NODES; n++)); do
    args+=(-object "memory-backend-ram,id=mem$n,size=${NODE_MB}M"
        -numa "node,nodeid=$n,memdev=mem$n,cpus=$n")
done
args+=(-kernel "$KERNEL" -initrd "$INITRD"
    -append "console=ttyS0 quiet panic=-1 memplace.nodes=$NODES memplace.node_mb=$NODE_MB memplace.kvm=$KVM $APPEND"
    -nographic -no-reboot -nic none)

mkdir -p "$(dirname "$LOG")"
echo "boot-guest: qemu-system-x86_64 ${args[*]}" >"$LOG"
status=0
timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 "${args[@]}" </dev/null >>"$LOG" 2>&1 || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "boot-guest: QEMU killed after ${TIMEOUT}s" | tee -a "$LOG" >&2
    exit 124
fi
exit "$status"
