#!/usr/bin/env bash
# Runs the sink benches (benches/sinks.rs) RUNS times (default 3) and prints each sink's rows/s at batch 512
# against its ceilings measured in the same run, per run and the median, as a Markdown table for BENCHMARKS.md.
# Refuses (exit 3, no table) a run that would begin on a busy machine: a 1-minute load average above 1.5 on
# 2 cores means figures 2-4x off. It waits up to a minute for the load to fall before each run (a run's own
# threads and the database server it drives raise it). The load before and after each run is printed.
#   bash benches/sinks.sh            (from the project root; Postgres at TOWER_AUDIT_PG_URL or the default)
set -euo pipefail
cd "$(dirname "$0")/.."
max_load=${MAX_LOAD:-1.5}
runs=${RUNS:-3}
out=target/sinks-runs
rm -rf "$out" && mkdir -p "$out"
# Built first (the same features as CI builds them), so the load check sees the machine, not the build.
cargo bench --all-features --bench sinks --no-run 2>&1 | tail -n1 >&2
busy() { awk -v l="$(cut -d' ' -f1 /proc/loadavg)" -v m="$max_load" 'BEGIN { exit !(l > m) }'; }
for run in $(seq 1 "$runs"); do
  for _ in $(seq 1 12); do busy && sleep 5 || break; done
  if busy; then
    echo "refused: the 1-minute load average is $(cut -d' ' -f1 /proc/loadavg) (> $max_load) before run $run" >&2
    exit 3
  fi
  echo "run $run: load before $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/load" >&2
  # Stale figures of a group this run skips (no Postgres) must not show.
  rm -rf target/criterion/sink_* target/criterion/ceiling_*
  cargo bench --all-features --bench sinks -- --noplot 2>&1 | grep -E '^(load|rows)|time:' | tee -a "$out/log" >&2
  echo "run $run: load after $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/load" >&2
  mkdir -p "$out/$run" && cp -r target/criterion/sink_* target/criterion/ceiling_* "$out/$run/" 2>/dev/null || true
done
python3 - "$out" "$runs" <<'EOF'
import json, os, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
def rate(run, group, batch=512):
    path = f"{out}/{run}/{group}/batch_{batch}/new/estimates.json"
    if not os.path.exists(path):
        return None
    return batch / (json.load(open(path))["median"]["point_estimate"] / 1e9)
print(open(f"{out}/load").read())
print("| sink (ceiling) | sink rows/s, median | ceiling rows/s, median | sink / ceiling, per run | median |")
print("|---|---|---|---|---|")
for name, ceiling in [("json_lines", "json_lines"), ("sqlite", "sqlite"), ("postgres", "postgres"),
                      ("postgres", "postgres_copy")]:
    pairs = [(rate(r, f"sink_{name}"), rate(r, f"ceiling_{ceiling}")) for r in range(1, runs + 1)]
    pairs = [(s, c) for s, c in pairs if s and c]
    if not pairs:
        print(f"| {name} ({ceiling}) | (not run) | | | |")
        continue
    ratios = [s / c for s, c in pairs]
    print(f"| {name} ({ceiling}) | {statistics.median(s for s, _ in pairs):,.0f} | "
          f"{statistics.median(c for _, c in pairs):,.0f} | {', '.join(f'{r:.2f}' for r in ratios)} | "
          f"**{statistics.median(ratios):.2f}** |")
EOF
