# Helpers of the memplace guest scenario (busybox sh), installed as /lib/memplace-test/placement.sh:
# agents, regions, holders, and the two independent readings of where pages are (the agent's
# GetPlacement and the holder's /proc/PID/numa_maps), compared against expected nodes.
#
# Page counts are written as "NODE:PAGES ..." lists. An expectation may name a group of nodes,
# "1+3:8192", when the kernel may pick any node of the group; every node not named must hold 0
# pages. A tolerance (in pages) applies to each named node or group, and to each unnamed node.
# Needs NODES (node count) from the scenario.

PAGE=4096
WORK=/tmp/memplace-scenario
mkdir -p "$WORK"

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

# --- agents --------------------------------------------------------------------------------------

# agent_start TAG [WRAPPER...]: starts memplaced (prefixed by WRAPPER, which must exec it, e.g.
# `numactl --cpunodebind=1`) with its state and sockets under $WORK/TAG, points memplacectl at it
# and waits until it serves. Sets AGENT_PID. Restarting a TAG reuses its state.
agent_start() {
    local dir tries=0
    AGENT_TAG=$1
    shift
    dir=$WORK/agent-$AGENT_TAG
    mkdir -p "$dir/state" "$dir/run"
    export MEMPLACE_SOCKET=$dir/run/memplace.sock MEMPLACE_HANDOFF_SOCKET=$dir/run/handoff.sock
    rm -f "$MEMPLACE_SOCKET"
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
    echo "memplaced ($AGENT_TAG) serving as pid $AGENT_PID"
}

# agent_stop: SIGTERM and wait. agent_kill: SIGKILL and wait (no cleanup at all).
agent_stop() {
    deletes_wait
    kill -TERM "$AGENT_PID" 2>/dev/null
    wait "$AGENT_PID" 2>/dev/null
    return 0
}
agent_kill() {
    deletes_wait
    kill -KILL "$AGENT_PID"
    wait "$AGENT_PID" 2>/dev/null
    ! kill -0 "$AGENT_PID" 2>/dev/null
}

# --- regions -------------------------------------------------------------------------------------

# region_create VM NAME SIZE [ARGS...]: creates a region and keeps the VM's handoff token.
region_create() {
    local vm=$1 name=$2 size=$3
    shift 3
    memplacectl -o json region create "$vm" "$name" --size "$size" "$@" >"$WORK/create.json" || {
        cat "$WORK/create.json"
        return 1
    }
    json_flat <"$WORK/create.json" >"$WORK/create.flat"
    flat_get "$WORK/create.flat" handoff_token >"$WORK/token.$vm"
    echo "created $vm/$name: $(flat_get "$WORK/create.flat" strategy), $(flat_get "$WORK/create.flat" backend)"
}

# expect_region VM NAME PATH=VALUE...: fields of `region get` have these values.
expect_region() {
    local vm=$1 name=$2
    shift 2
    memplacectl -o json region get "$vm" "$name" | json_flat >"$WORK/region.flat" || return 1
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

# populate VM NAME [ARGS...]: populates and shows the agent's answer.
populate() {
    memplacectl -o json populate "$@" | json_flat | tr '\n' ' '
    echo
    return 0
}

# set_policy VM NAME [ARGS...]: `policy set`, the region's ranges and any migrate counts shown.
set_policy() {
    memplacectl -o json policy set "$@" | json_flat >"$WORK/policy.flat" || return 1
    grep -E '^(ranges\.[0-9]+\.(offset|intended|observed|state)|pages_)' "$WORK/policy.flat" | tr '\n' ' '
    echo
}

# region_delete VM NAME: deletes in the background (each call takes most of a second under TCG);
# deletes_wait waits for them, and runs before the agent is stopped or killed.
region_delete() {
    memplacectl region delete "$1" "$2" >/dev/null 2>>"$WORK/delete.err" &
    DELETES="$DELETES $!"
}
deletes_wait() {
    [ -z "$DELETES" ] || wait $DELETES
    DELETES=""
}

# expect_exit CODE COMMAND...: COMMAND exits with CODE (its output shown).
expect_exit() {
    local want=$1 got
    shift
    "$@"
    got=$?
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
    memplacectl -o json placement "$vm" "$name" "$@" | json_flat >"$WORK/placement.flat" || return 1
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

holder_stop() {
    [ -n "$1" ] || return 0
    kill -TERM "$1" 2>/dev/null
    wait "$1" 2>/dev/null
    return 0
}

# holder_counts PID SIZE: "NODE:PAGES ..." of the holder's mapping of SIZE bytes, read from its
# /proc/PID/numa_maps (pages mapped in the holder's page tables), independent of the agent.
holder_counts() {
    local start="" range _rest from to line
    while read -r range _rest; do
        from=${range%-*} to=${range#*-}
        if [ $((0x$to - 0x$from)) -eq "$2" ]; then
            [ -z "$start" ] || { echo "two mappings of $2 bytes in pid $1" >&2; return 1; }
            start=$from
        fi
    done </proc/"$1"/maps
    [ -n "$start" ] || { echo "no mapping of $2 bytes in pid $1" >&2; return 1; }
    line=$(grep "^0*$start " /proc/"$1"/numa_maps)
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

# size_mb_pages MIB: pages in MIB MiB.
pages_of_mb() { echo $(($1 * 1024 * 1024 / PAGE)); }
