# Check helpers for guest scenarios (busybox sh), installed as /lib/memplace-test/checks.sh.
#
# Every result is one serial console line that the host-side test reads:
#   MEMPLACE-CHECK PASS <name>
#   MEMPLACE-CHECK FAIL <name> <detail>
# Names must not contain spaces. Every name that a guest prints as PASS is declared in the harness
# (`expected_checks` in server/tests/numa_guest.rs): a declared check that does not pass fails the
# guest, and so does a PASS that is not declared. `fail` alone (no PASS) needs no declaration.
#
# Exit statuses are real throughout: pipelines report their first failing command (pipefail), an
# unset variable is an error, and a COMMAND run by `check` runs under `set -e` as well.
set -uo pipefail

# check NAME COMMAND [ARG]...: runs COMMAND (a program or a shell function) in a subshell under
# `set -e`, so any command of a function that fails unguarded fails the check, and reports it. On
# failure its output is shown indented, and its last line becomes the detail. Returns its status.
check() {
    _check_name=$1
    shift
    _check_status=0
    _check_out=$(set -e; "$@" 2>&1) || _check_status=$?
    if [ "$_check_status" -eq 0 ]; then
        echo "MEMPLACE-CHECK PASS $_check_name"
    else
        [ -n "$_check_out" ] && printf '%s\n' "$_check_out" | sed 's/^/    | /'
        _check_detail=$(printf '%s\n' "$_check_out" | sed '/^[[:space:]]*$/d' | tail -n 1)
        echo "MEMPLACE-CHECK FAIL $_check_name exit $_check_status: ${_check_detail:-no output}"
    fi
    return "$_check_status"
}

# step NAME COMMAND [ARG]...: like check, but COMMAND runs in this shell, so the variables it sets
# (AGENT_PID, HOLDER_PID) stay set. That shell cannot run under `set -e` (a failed check must not
# end the scenario), so a step's function must return a real status itself: `|| return 1` after
# every command that matters. Its output goes to the log only on failure.
step() {
    _step_name=$1
    shift
    _step_status=0
    "$@" >/tmp/memplace-step.out 2>&1 || _step_status=$?
    if [ "$_step_status" -eq 0 ]; then
        echo "MEMPLACE-CHECK PASS $_step_name"
    else
        sed 's/^/    | /' /tmp/memplace-step.out
        _step_detail=$(sed '/^[[:space:]]*$/d' /tmp/memplace-step.out | tail -n 1)
        echo "MEMPLACE-CHECK FAIL $_step_name exit $_step_status: ${_step_detail:-no output}"
    fi
    return "$_step_status"
}

# pass NAME / fail NAME DETAIL...: report a result decided by the scenario itself.
pass() { echo "MEMPLACE-CHECK PASS $1"; }
fail() {
    _fail_name=$1
    shift
    echo "MEMPLACE-CHECK FAIL $_fail_name $*"
}

# note TEXT...: a line for the log only.
note() { echo "memplace: $*"; }
