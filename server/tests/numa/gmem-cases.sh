#!/bin/sh
# The guest_memfd cases, run inside a guest whose kernel has guest_memfd (busybox sh, as /scenario.sh
# by /init). The host-side runner (`gmem_cases.rs`, included by numa_guest.rs) packs the test
# binaries at their build paths, writes /lib/memplace-test/gmem-cases.list and judges the lines
# printed here.
#
# gmem-cases.list has one case per line: BINARY TEST-NAME (a test marked #[ignore] as a guest_memfd
# case). Each case runs alone, as `BINARY --ignored --exact TEST-NAME`, and reports
#   MEMPLACE-CHECK PASS gmem-case:TEST-NAME
# only when the binary exits 0 and says it ran exactly one test: an exact name that matches nothing
# runs zero tests and exits 0, which must not count.
. /lib/memplace-test/checks.sh
set -uo pipefail

LIST=/lib/memplace-test/gmem-cases.list
CASE_TIMEOUT=${MEMPLACE_GMEM_CASE_TIMEOUT:-900}

# The cgroup case charges a child of the memory controller: /init mounted cgroup2 (Debian's 7.x has
# no cgroup v1 memory controller), and the case uses v2 where v1 is missing.
cgroup2_memory() {
    grep -qw memory /sys/fs/cgroup/cgroup.controllers
}
check gmem-guest-cgroup2-memory cgroup2_memory

# The guest itself must have what the cases need, or every case would fail for the same reason.
probe_kvm() {
    [ -c /dev/kvm ] || { echo "/dev/kvm is missing"; return 1; }
}
check gmem-guest-kvm probe_kvm

[ -s "$LIST" ] || { fail gmem-case-list "$LIST is missing or empty"; exit 1; }
note "kernel $(uname -r): $(wc -l <"$LIST") guest_memfd cases"

while read -r bin name; do
    [ -n "$bin" ] || continue
    out=/tmp/gmem-case.out
    start=$(date +%s)
    status=0
    # Each case gets a fresh temp dir, as it would on a host; the tests write only under it.
    (cd /tmp && TMPDIR=/tmp timeout -s KILL "$CASE_TIMEOUT" "$bin" --ignored --exact "$name" \
        --test-threads=1 --nocapture) </dev/null >"$out" 2>&1 || status=$?
    took=$(($(date +%s) - start))
    if [ "$status" -eq 0 ] && grep -q 'test result: ok\. 1 passed' "$out"; then
        echo "MEMPLACE-CHECK PASS gmem-case:$name"
        note "gmem case $name: passed in ${took}s"
    else
        sed 's/^/    | /' "$out" | tail -n 60
        if [ "$status" -eq 0 ]; then
            detail="exit 0 but did not run exactly one test"
        elif [ "$status" -eq 137 ]; then
            detail="killed after ${CASE_TIMEOUT}s"
        else
            detail="exit $status after ${took}s"
        fi
        fail "gmem-case:$name" "$detail"
    fi
done <"$LIST"
