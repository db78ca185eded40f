#!/bin/bash
# One idle run of the whole bench table, for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
if pgrep -x cargo >/dev/null || pgrep -f qemu-system >/dev/null || pgrep -x rustc >/dev/null; then
    echo "not idle: cargo/rustc/qemu running" >&2; pgrep -a -x cargo || true; exit 1
fi
cargo build --release -p memplacectl 2>&1 | tail -1
cargo bench -p memplace-server --bench table --no-run 2>&1 | tail -2
sync; echo 1 > /proc/sys/vm/drop_caches
uptime
cargo bench -p memplace-server --bench table 2>&1 | tee target/bench-idle.log
cp target/bench-table.json "server/benches/results/$(date +%F)-idle-table.json"
python3 server/benches/plot_p1.py target/bench-table.json "server/benches/results/$(date +%F)-idle-p1.svg"
python3 server/benches/plot_scale.py target/bench-table.json "server/benches/results/$(date +%F)-idle-scale.svg"
uptime
