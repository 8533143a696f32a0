#!/usr/bin/env bash
# Runs the sink benches (benches/sinks.rs) and prints each sink's rows/s at batch 512 against its ceiling measured
# in the same run, as a Markdown table for BENCHMARKS.md. Refuses (exit 3, no table) when the machine was busy
# when the run began: a 1-minute load average above 1.5 on 2 cores means figures 2-4x off. The load after the run
# is printed too; it includes the bench's own threads and the database server it drives.
#   bash benches/sinks.sh            (from the project root; Postgres at TOWER_AUDIT_PG_URL or the default)
set -euo pipefail
cd "$(dirname "$0")/.."
max_load=${MAX_LOAD:-1.5}
# Built first (the same features as CI builds them), so the check below sees the machine, not the build.
cargo bench --all-features --bench sinks --no-run 2>&1 | tail -n1 >&2
before=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$before" -v m="$max_load" 'BEGIN { exit !(l > m) }'; then
  echo "refused: the 1-minute load average is $before (> $max_load) before the run; wait for a quiet machine" >&2
  exit 3
fi
# Stale figures of a group this run skips (no Postgres) must not show.
rm -rf target/criterion/sink_* target/criterion/ceiling_*
cargo bench --all-features --bench sinks -- --noplot 2>&1 | grep -E '^(load|rows)|time:' >&2
after=$(cut -d' ' -f1 /proc/loadavg)
python3 - "$before" "$after" <<'EOF'
import json, sys, os
before, after = sys.argv[1:3]
def rate(group, batch=512):
    path = f"target/criterion/{group}/batch_{batch}/new/estimates.json"
    if not os.path.exists(path):
        return None
    median_ns = json.load(open(path))["median"]["point_estimate"]
    return batch / (median_ns / 1e9)
print(f"load average (1 min): {before} before, {after} after\n")
print("| sink | sink rows/s | ceiling rows/s | sink / ceiling |")
print("|---|---|---|---|")
for name in ["json_lines", "sqlite", "postgres"]:
    sink, ceiling = rate(f"sink_{name}"), rate(f"ceiling_{name}")
    if sink is None or ceiling is None:
        print(f"| {name} | (not run) | | |")
        continue
    print(f"| {name} | {sink:,.0f} | {ceiling:,.0f} | {sink / ceiling:.2f} |")
EOF
