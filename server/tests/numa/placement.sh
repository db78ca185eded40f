# Helpers of the memplace guest scenario (busybox sh), installed as /lib/memplace-test/placement.sh:
# agents, regions, holders, and the two independent readings of where pages are (the agent's
# GetPlacement and the holder's /proc/PID/numa_maps), compared against expected nodes.
#
# Page counts are written as "NODE:PAGES ..." lists. An expectation may name a group of nodes,
# "1+3:8192", when the kernel may pick any node of the group; every node not named must hold 0
# pages. A tolerance (in pages) applies to each named node or group, and to each unnamed node.
# Needs NODES (node count) from the scenario.
#
# Every helper returns a real status (see checks.sh): helpers run as a `step` use `|| return 1`
# after each command that matters, since that shell does not run under `set -e`.
set -uo pipefail

PAGE=4096
WORK=${MEMPLACE_WORK:-/tmp/memplace-scenario}
NODE_SYS=${MEMPLACE_NODE_SYS:-/sys/devices/system/node}
mkdir -p "$WORK"
AGENT_PID="" AGENT_TAG="" HOLDER_PID="" DELETES=""

# json_flat: JSON on stdin to one PATH=VALUE line per scalar, e.g. nodes.0.pages=8192.
json_flat() {
    awk '
        function path(   p, d) {
            p = ""
            for (d = 1; d <= depth; d++) p = p (d > 1 ? "." : "") (kind[d] == "o" ? key[d] : idx[d])
            return p
        }
        { text = text $0 "\n" }
        END {
            n = length(text); i = 1; depth = 0; wantkey = 0
            while (i <= n) {
                c = substr(text, i, 1)
                if (c == "{") { kind[++depth] = "o"; wantkey = 1; i++ }
                else if (c == "[") { kind[++depth] = "a"; idx[depth] = 0; wantkey = 0; i++ }
                else if (c == "}" || c == "]") { depth--; wantkey = 0; i++ }
                else if (c == ",") { if (kind[depth] == "a") idx[depth]++; else wantkey = 1; i++ }
                else if (c == ":") { wantkey = 0; i++ }
                else if (index(" \t\r\n", c)) i++
                else if (c == "\"") {
                    s = ""; i++
                    while (i <= n && (c = substr(text, i, 1)) != "\"") {
                        if (c == "\\") { i++; c = substr(text, i, 1) }
                        s = s c; i++
                    }
                    i++
                    if (wantkey && kind[depth] == "o") key[depth] = s
                    else print path() "=" s
                } else {
                    s = ""
                    while (i <= n && !index(",}] \t\r\n", c = substr(text, i, 1))) { s = s c; i++ }
                    print path() "=" s
                }
            }
        }'
}

# flat_get FILE PATH: the value at PATH of a json_flat file.
flat_get() { sed -n "s/^$2=//p" "$1"; }

# ctl_json NAME ARGS...: `memplacectl -o json ARGS` into $WORK/NAME.json, flattened into
# $WORK/NAME.flat. When memplacectl fails, shows its output and exit status and fails with it.
ctl_json() {
    local name=$1 status=0
    shift
    memplacectl -o json "$@" >"$WORK/$name.json" 2>"$WORK/$name.err" || status=$?
    if [ "$status" -ne 0 ]; then
        cat "$WORK/$name.json" "$WORK/$name.err"
        echo "memplacectl $*: exit $status"
        return "$status"
    fi
    json_flat <"$WORK/$name.json" >"$WORK/$name.flat"
}

# --- agents --------------------------------------------------------------------------------------

# agent_start TAG [WRAPPER...]: starts memplaced (prefixed by WRAPPER, which must exec it, e.g.
# `on_node 0`) with its state and sockets under $WORK/TAG, points memplacectl at it and waits
# until it serves. Sets AGENT_PID. Restarting a TAG reuses its state.
agent_start() {
    local dir tries=0
    AGENT_TAG=$1
    shift
    dir=$WORK/agent-$AGENT_TAG
    mkdir -p "$dir/state" "$dir/run" || return 1
    export MEMPLACE_SOCKET=$dir/run/memplace.sock MEMPLACE_HANDOFF_SOCKET=$dir/run/handoff.sock
    rm -f "$MEMPLACE_SOCKET" || return 1
    echo "--- start $(date +%T) $*" >>"$dir/agent.log"
    MEMPLACE_LOG_LEVEL=info "$@" memplaced --state-dir "$dir/state" --runtime-dir "$dir/run" \
        --metrics-addr off --reconcile-interval-secs 0 >>"$dir/agent.log" 2>&1 &
    AGENT_PID=$!
    while ! memplacectl health >/dev/null 2>&1; do
        if ! kill -0 "$AGENT_PID" 2>/dev/null || [ "$tries" -ge 600 ]; then
            echo "memplaced ($AGENT_TAG) did not start serving:"
            tail -n 15 "$dir/agent.log"
            return 1
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
    echo "memplaced ($AGENT_TAG) serving as pid $AGENT_PID, $(grep Cpus_allowed_list /proc/"$AGENT_PID"/status)"
}

# agent_stop: waits for the deletes, then SIGTERM and wait. Reports `FAIL region-delete` when a
# delete failed, and `FAIL agent-stop-TAG` when the agent was already gone (it died during the
# checks). Returns non-zero then.
agent_stop() {
    local ok=0
    deletes_wait >"$WORK/deletes.out" || { fail region-delete "$(tail -n 1 "$WORK/deletes.out")"; ok=1; }
    if ! kill -TERM "$AGENT_PID" 2>/dev/null; then
        fail "agent-stop-$AGENT_TAG" "memplaced ($AGENT_TAG) pid $AGENT_PID was gone before it was stopped"
        ok=1
    fi
    wait "$AGENT_PID" 2>/dev/null
    return $ok
}
# agent_kill: waits for the deletes, then SIGKILL (no cleanup at all) and wait; a step.
agent_kill() {
    deletes_wait || return 1
    kill -KILL "$AGENT_PID" || return 1
    wait "$AGENT_PID" 2>/dev/null
    ! kill -0 "$AGENT_PID" 2>/dev/null
}

# node_cpus NODE: the node's cpulist, e.g. "1" or "2-3".
node_cpus() {
    local cpus
    cpus=$(cat "$NODE_SYS/node$1/cpulist") || return 1
    [ -n "$cpus" ] || { echo "node $1 has no CPU" >&2; return 1; }
    echo "$cpus"
}

# on_node NODE COMMAND...: runs COMMAND (exec) on NODE's CPUs only; a WRAPPER for agent_start and
# holder_start.
on_node() {
    local cpus
    cpus=$(node_cpus "$1") || return 1
    shift
    exec taskset -c "$cpus" "$@"
}

# expect_agent_on NODE: every thread of the agent may run on NODE's CPUs only. Populate allocates
# in the agent's threads, so where a policy could be mistaken for local allocation (BIND to the
# node the agent runs on), the agent is kept off the policy's nodes.
expect_agent_on() {
    local cpus t got bad=0 count=0
    cpus=$(node_cpus "$1") || return 1
    [ -n "$AGENT_PID" ] && [ -d /proc/"$AGENT_PID"/task ] || { echo "no agent running"; return 1; }
    for t in /proc/"$AGENT_PID"/task/*; do
        got=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "$t/status") || return 1
        count=$((count + 1))
        [ "$got" = "$cpus" ] || { echo "thread ${t##*/} may run on cpus $got"; bad=1; }
    done
    echo "memplaced pid $AGENT_PID: $count threads, want all on node $1 (cpus $cpus)"
    return $bad
}

# agent_pin NODE: moves every thread of the running agent to NODE's CPUs (threads it starts later
# inherit that), and checks it.
agent_pin() {
    local cpus
    cpus=$(node_cpus "$1") || return 1
    taskset -a -p -c "$cpus" "$AGENT_PID" >/dev/null || return 1
    expect_agent_on "$1"
}

# populate_on NODE VM NAME [ARGS...]: populate with the agent's threads on NODE, then back on node
# 0 (where the agents of the scenario run, see memplace_checks).
populate_on() {
    local node=$1 status=0
    shift
    agent_pin "$node" || return 1
    populate "$@" || status=1
    agent_pin 0 || return 1
    return $status
}

# --- regions -------------------------------------------------------------------------------------

# region_create VM NAME SIZE [ARGS...]: creates a region and keeps the VM's handoff token.
region_create() {
    local vm=$1 name=$2 size=$3
    shift 3
    local token
    ctl_json create region create "$vm" "$name" --size "$size" "$@" || return 1
    token=$(flat_get "$WORK/create.flat" handoff_token) || return 1
    [ -n "$token" ] || { cat "$WORK/create.json"; echo "no handoff_token in the answer"; return 1; }
    echo "$token" >"$WORK/token.$vm" || return 1
    echo "created $vm/$name: $(flat_get "$WORK/create.flat" strategy), $(flat_get "$WORK/create.flat" backend)"
}

# expect_region VM NAME PATH=VALUE...: fields of `region get --fresh` have these values: what the
# kernel shows now, not the region's last check (which a reconcile pass refreshes only every
# interval).
expect_region() {
    local vm=$1 name=$2
    shift 2
    ctl_json region region get "$vm" "$name" --fresh || return 1
    expect_flat "$WORK/region.flat" "$@"
}

# expect_flat FILE PATH=VALUE...: fields of a json_flat file have these values.
expect_flat() {
    local file=$1 bad=0 want got
    shift
    for want in "$@"; do
        got=$(flat_get "$file" "${want%%=*}")
        echo "${want%%=*}: '$got', want '${want#*=}'"
        [ "$got" = "${want#*=}" ] || bad=1
    done
    [ "$bad" = 0 ] || grep -E '^ranges\.' "$file"
    return $bad
}

# populate VM NAME [ARGS...]: populates and shows the agent's answer; fails when memplacectl does.
populate() {
    ctl_json populate populate "$@" || return 1
    tr '\n' ' ' <"$WORK/populate.flat" || return 1
    echo
}

# set_policy VM NAME [ARGS...]: `policy set`, the region's ranges and any migrate counts shown.
set_policy() {
    ctl_json policy policy set "$@" || return 1
    grep -E '^(ranges\.[0-9]+\.(offset|intended|observed|state)|pages_)' "$WORK/policy.flat" | tr '\n' ' ' ||
        { echo "no ranges in the answer"; return 1; }
    echo
}

# region_delete VM NAME: deletes in the background (each call takes most of a second under TCG);
# deletes_wait waits for them, and fails, naming them, when any failed; it runs before the agent is
# stopped or killed. Call region_delete only from the scenario's own shell (not inside `check`),
# since DELETES must survive.
region_delete() {
    memplacectl region delete "$1" "$2" >"$WORK/delete.$1.$2.out" 2>&1 </dev/null &
    DELETES="$DELETES $!:$1.$2"
}
deletes_wait() {
    local job ok=0
    for job in $DELETES; do
        wait "${job%%:*}" && continue
        echo "region delete ${job#*:} failed: $(tail -n 1 "$WORK/delete.${job#*:}.out")"
        ok=1
    done
    DELETES=""
    return $ok
}

# expect_exit CODE COMMAND...: COMMAND exits with CODE (its output shown).
expect_exit() {
    local want=$1 got=0
    shift
    "$@" || got=$?
    echo "exit $got, want $want"
    [ "$got" -eq "$want" ]
}

# --- where pages are -----------------------------------------------------------------------------

# compare_counts WHAT ACTUAL EXPECTED TOLERANCE: see the top of this file.
compare_counts() {
    echo "$1: got {$2} want {$3} within $4 pages"
    awk -v got="$2" -v want="$3" -v tol="$4" -v nodes="$NODES" 'BEGIN {
        n = split(got, g, " ")
        for (i = 1; i <= n; i++) { split(g[i], kv, ":"); have[kv[1]] += kv[2] }
        m = split(want, w, " ")
        bad = 0
        for (i = 1; i <= m; i++) {
            split(w[i], kv, ":")
            k = split(kv[1], group, "+")
            sum = 0
            for (j = 1; j <= k; j++) { sum += have[group[j]]; named[group[j]] = 1 }
            d = sum - kv[2]
            if (d < 0) d = -d
            if (d > tol) { printf "node %s holds %d pages, want %d\n", kv[1], sum, kv[2]; bad++ }
        }
        for (node in have)
            if (!(node in named) && have[node] > tol) {
                printf "node %s holds %d pages, want 0\n", node, have[node]; bad++
            }
        exit bad > 0
    }'
}

# expect_placement VM NAME EXPECTED TOLERANCE [--offset O --length L]: the agent's GetPlacement
# of the span has every page allocated, none misplaced, and EXPECTED pages per node. The answer is
# kept for expect_range_placement.
expect_placement() {
    local vm=$1 name=$2 want=$3 tol=$4
    shift 4
    ctl_json placement placement "$vm" "$name" "$@" || return 1
    placement_matches "" "$want" "$tol" "GetPlacement $vm/$name $*"
}

# expect_range_placement INDEX OFFSET EXPECTED TOLERANCE: the same for range INDEX (at byte
# OFFSET) of the last expect_placement's answer.
expect_range_placement() {
    local at
    at=$(flat_get "$WORK/placement.flat" "ranges.$1.offset")
    echo "range $1 is at offset $at, want $2"
    [ "$at" = "$2" ] || return 1
    placement_matches "ranges.$1." "$3" "$4" "GetPlacement range $1"
}

# expect_counted_from PID...: the last expect_placement's answer has one range per PID, and range
# i was counted from the i-th: a holder's pid (its /proc/PID/numa_maps, which map every allocated
# page of the range once) or 0 (the agent read-faulted the allocated pages into its own window).
expect_counted_from() {
    local i=0 want got
    for want in "$@"; do
        got=$(flat_get "$WORK/placement.flat" "ranges.$i.counted_from_pid")
        echo "range $i counted from pid ${got:-(none)}, want $want"
        [ "$got" = "$want" ] || return 1
        i=$((i + 1))
    done
    got=$(flat_get "$WORK/placement.flat" "ranges.$i.offset")
    [ -z "$got" ] || { echo "a range $i at $got is not expected"; return 1; }
}

# placement_matches PREFIX EXPECTED TOLERANCE WHAT: checks $WORK/placement.flat under PREFIX.
placement_matches() {
    local p=$1 got absent misplaced unknown ok=0
    got=$(awk -F= -v p="$p" '
        substr($1, 1, length(p)) == p {
            k = substr($1, length(p) + 1)
            if (k ~ /^nodes\.[0-9]+\.node$/) { split(k, a, "."); node[a[2]] = $2 }
            if (k ~ /^nodes\.[0-9]+\.pages$/) { split(k, a, "."); pages[a[2]] = $2 }
        }
        END { for (i in node) printf "%s:%s ", node[i], pages[i] }' "$WORK/placement.flat")
    absent=$(flat_get "$WORK/placement.flat" "${p}pages_not_present")
    misplaced=$(flat_get "$WORK/placement.flat" "${p}pages_misplaced")
    unknown=$(flat_get "$WORK/placement.flat" "${p}pages_unknown")
    echo "agent: not present $absent, misplaced $misplaced, unknown $unknown"
    [ "$absent" = 0 ] && [ "$misplaced" = 0 ] && [ "$unknown" = 0 ] || ok=1
    compare_counts "$4" "$got" "$2" "$3" || ok=1
    return $ok
}

# holder_start VM NAME TOUCH [WRAPPER...]: `memplacectl hold` (under WRAPPER, which must exec it)
# acquires the region's fd, maps it and write-faults its first TOUCH bytes. Sets HOLDER_PID.
holder_start() {
    local vm=$1 name=$2 touch=$3 out tries=0
    shift 3
    HOLDER_SEQ=$((${HOLDER_SEQ:-0} + 1))
    HOLDER_PID=""
    out=$WORK/holder.$vm.$name.$HOLDER_SEQ
    : >"$out"
    "$@" memplacectl hold "$vm" "$name" --token "$(cat "$WORK/token.$vm")" --touch "$touch" \
        >"$out" 2>&1 &
    HOLDER_PID=$!
    until grep -q '^holding' "$out"; do
        if ! kill -0 "$HOLDER_PID" 2>/dev/null || [ "$tries" -ge 1200 ]; then
            echo "holder of $vm/$name did not start:"
            cat "$out"
            return 1
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
    cat "$out"
}

# holder_stop PID: SIGTERM and wait. A holder that is already gone (it died while it should hold
# the region) is reported as `FAIL holder-gone`.
holder_stop() {
    [ -n "$1" ] || return 0
    if ! kill -TERM "$1" 2>/dev/null; then
        fail holder-gone "holder pid $1 exited before it was stopped"
        return 1
    fi
    wait "$1" 2>/dev/null
    return 0
}

# holder_line PID SIZE: the line of the holder's /proc/PID/numa_maps for its mapping of SIZE bytes.
holder_line() {
    local start="" range _rest from to
    while read -r range _rest; do
        from=${range%-*} to=${range#*-}
        if [ $((0x$to - 0x$from)) -eq "$2" ]; then
            [ -z "$start" ] || { echo "two mappings of $2 bytes in pid $1" >&2; return 1; }
            start=$from
        fi
    done </proc/"$1"/maps
    [ -n "$start" ] || { echo "no mapping of $2 bytes in pid $1" >&2; return 1; }
    grep "^0*$start " /proc/"$1"/numa_maps || { echo "no numa_maps line at $start in pid $1" >&2; return 1; }
}

# holder_counts PID SIZE: "NODE:PAGES ..." of the holder's mapping of SIZE bytes, read from its
# /proc/PID/numa_maps (pages mapped in the holder's page tables), independent of the agent.
holder_counts() {
    local line
    line=$(holder_line "$1" "$2") || return 1
    echo "numa_maps: $line" >&2
    echo "$line" | awk '{ for (i = 2; i <= NF; i++) if ($i ~ /^N[0-9]+=/) {
        split(substr($i, 2), kv, "="); printf "%s:%s ", kv[1], kv[2] } }'
}

# expect_holder PID SIZE EXPECTED TOLERANCE: the holder's numa_maps shows EXPECTED pages per node.
expect_holder() {
    local got
    got=$(holder_counts "$1" "$2") || return 1
    compare_counts "numa_maps of holder $1" "$got" "$3" "$4"
}

# expect_holder_policy PID SIZE POLICY: the policy the kernel shows for the start of the holder's
# mapping in /proc/PID/numa_maps is POLICY, as the kernel writes it ("bind:1,3", "prefer (many):0-1",
# "bind=static:1", "local", ...). For a memfd that is the file's shared policy at offset 0, read by
# the kernel independently of the agent; with none it is the holder's own task policy ("default").
expect_holder_policy() {
    local line got
    line=$(holder_line "$1" "$2") || return 1
    echo "numa_maps: $line"
    got=$(echo "$line" | sed -E 's/^[0-9a-f]+ //; s/ [a-z_]+=.*//') || return 1
    echo "kernel policy '$got', want '$3'"
    [ "$got" = "$3" ]
}

# size_mb_pages MIB: pages in MIB MiB.
pages_of_mb() { echo $(($1 * 1024 * 1024 / PAGE)); }
