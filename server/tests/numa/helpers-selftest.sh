#!/bin/sh
# Host-side self-test of checks.sh and placement.sh, run by numa_guest.rs with busybox sh (no guest,
# no agent): a stand-in memplacectl answers each helper, and every helper must report FAIL when
# memplacectl fails or its answer lacks what the helper needs, and PASS when the answer is right.
# Checks named *-ok must PASS and checks named *-fails must FAIL; numa_guest.rs lists them all
# (HELPER_SELFTEST_PASS, HELPER_SELFTEST_FAIL).
#
# Needs MEMPLACE_WORK (scratch directory) and MEMPLACE_NODE_SYS (a directory with node0/cpulist
# "0" and node1/cpulist "1", standing for /sys/devices/system/node).
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/checks.sh"
. "$HERE/placement.sh"
NODES=2

# The stand-in: prints ANSWER, and exits with STATUS (with a message on stderr when non-zero).
ANSWER='{}' STATUS=0
memplacectl() {
    printf '%s\n' "$ANSWER"
    [ "$STATUS" -eq 0 ] || echo "memplacectl (stand-in): failing with $STATUS" >&2
    return "$STATUS"
}
answer() { ANSWER=$1 STATUS=$2; }

answer '{"pages_populated":8192}' 0
step populate-ok populate vm r
answer '{"pages_populated":8192}' 14
step populate-fails populate vm r

answer '{"ranges":[{"offset":0,"state":"applied"}]}' 0
step set-policy-ok set_policy vm r --mode bind --nodes 1
answer '{"ranges":[{"offset":0,"state":"applied"}]}' 13
step set-policy-fails set_policy vm r --mode bind --nodes 1
answer '{"generation":3}' 0
step set-policy-without-ranges-fails set_policy vm r --mode bind --nodes 1

answer '{"handoff_token":"t0k","strategy":"shared-policy","backend":"memfd"}' 0
step region-create-ok region_create vm r 1M
answer '{"handoff_token":"t0k"}' 6
step region-create-fails region_create vm r 1M
answer '{"strategy":"shared-policy","backend":"memfd"}' 0
step region-create-without-token-fails region_create vm r 1M

answer '{"status":"active","ranges":[{"state":"applied"}]}' 0
check expect-region-ok expect_region vm r status=active ranges.0.state=applied
answer '{"status":"active"}' 5
check expect-region-fails expect_region vm r status=active
answer '{"status":"active","ranges":[{"state":"pending"}]}' 0
check expect-region-wrong-value-fails expect_region vm r status=active ranges.0.state=applied

PLACED='{"nodes":[{"node":1,"pages":8192}],"pages_not_present":0,"pages_misplaced":0,"pages_unknown":0}'
answer "$PLACED" 0
check expect-placement-ok expect_placement vm r 1:8192 0
check expect-placement-wrong-node-fails expect_placement vm r 0:8192 0
answer "$PLACED" 14
check expect-placement-fails expect_placement vm r 1:8192 0
answer '{"nodes":[{"node":1,"pages":8192}],"pages_not_present":0,"pages_misplaced":0,"pages_unknown":3}' 0
check expect-placement-unknown-fails expect_placement vm r 1:8192 0
# Which way each range was counted (expect_counted_from reads the last expect_placement's answer).
answer '{"nodes":[{"node":1,"pages":8192}],"pages_not_present":0,"pages_misplaced":0,"pages_unknown":0,"ranges":[{"offset":0,"nodes":[{"node":1,"pages":8192}],"counted_from_pid":42}]}' 0
check expect-placement-with-ranges-ok expect_placement vm r 1:8192 0
check expect-counted-from-ok expect_counted_from 42
check expect-counted-from-wrong-pid-fails expect_counted_from 0
check expect-counted-from-extra-range-fails expect_counted_from 42 0
answer '{"nodes":[{"node":1,"pages":8192}],"pages_not_present":0,"pages_misplaced":0,"pages_unknown":0,"ranges":[{"offset":0},{"offset":4096,"counted_from_pid":0}]}' 0
check expect-placement-two-ranges-ok expect_placement vm r 1:8192 0
check expect-counted-from-missing-field-fails expect_counted_from 0 0
check expect-counted-from-unlisted-range-fails expect_counted_from 0

check expect-exit-ok expect_exit 18 sh -c 'exit 18'
check expect-exit-fails expect_exit 18 true

# `check` runs its command under `set -e`: a command failing in the middle of a function fails it.
fails_midway() {
    false
    echo "not reached"
}
check check-set-e-fails fails_midway
# A pipeline fails when any of its commands fails (pipefail), in `step` too.
fails_in_pipe() { false | cat; }
step step-pipefail-fails fails_in_pipe

# The stand-in memplacectl fails every delete: deletes_wait reports it.
answer '' 9
region_delete vm a
region_delete vm b
step deletes-wait-fails deletes_wait
answer '' 0
region_delete vm c
step deletes-wait-ok deletes_wait

# Pinning a process (standing in for the agent) to node 0's CPUs, and seeing it is not on node 1's.
sleep 600 &
AGENT_PID=$!
step agent-pin-ok agent_pin 0
check agent-on-node0-ok expect_agent_on 0
check agent-on-node1-fails expect_agent_on 1

# A holder or agent that is gone when it should be stopped is a failure of its own (named
# holder-gone and agent-stop-TAG).
kill "$AGENT_PID"
wait "$AGENT_PID"
holder_stop "$AGENT_PID"
AGENT_TAG=gone-fails
agent_stop
echo MEMPLACE-DONE
