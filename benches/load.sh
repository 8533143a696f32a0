#!/usr/bin/env bash
# End-to-end load run: the example auth server in each audit mode under wrk, on loopback only, bounded in time.
#
#   bash benches/load.sh                # DURATION=8 REPEATS=3 CONNECTIONS=32 by default
#
# It starts one server per mode (fresh databases, all pinned to CPU 0), registers one user on each, then runs wrk
# pinned to CPU 1 against GET /api/auth/me (bearer token) and POST /api/auth/login, then GET /api/auth/me over one
# connection (the latency a durable event adds), REPEATS times per mode, interleaved (each round starting one mode
# further on, each run on a quiet machine), and reports the median requests/s, p50, p99 and p99.9 latency (for
# requests/s and p99 also the median over the rounds of each mode's ratio to off in the same round), errors (socket
# errors and non-2xx), and each server's peak RSS; and, with the servers pinned, the CPU each request cost: CPU 0's
# busy time (the kernel's share included) and the server's threads by name (tokio's, sqlx's SQLite threads, the
# rest). Installs wrk from Debian's packages if it is missing. Then, unless SPILL_OUTAGE=0, runs
# benches/load_spill_outage.sh: the spill with the Postgres audit sink frozen for 15 s.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-8}
REPEATS=${REPEATS:-3}
CONNECTIONS=${CONNECTIONS:-32}
PORT=${PORT:-3917}
OUT=${OUT:-target/load-results.md}

# shellcheck source=benches/load/modes.sh
. benches/load/modes.sh
need_wrk
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN0=(taskset -c 0); PIN1=(taskset -c 1); else PIN0=(); PIN1=(); fi

build_server
load_before=$(cut -d' ' -f1 /proc/loadavg)
work=$(mktemp -d)
servers=""
cleanup() { [ -n "$servers" ] && kill $servers 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
results="$work/results.tsv"
: > "$results"

# The modes (benches/load/modes.sh); MODES="off layer …" runs a subset.
read -r -a MODES <<< "${MODES:-off naive layer layer-batch-512 layer-durable layer-durable-batch-1 layer-stalled-sink inline inline-pool-1}"
declare -A PIDS TOKENS PORTS

# Every mode gets its own server (fresh databases), all started up front, so that the runs can be interleaved
# (off, layer, … then again) and slow drift on a shared machine spreads evenly over the modes.
i=0
for mode in "${MODES[@]}"; do
  port=$((PORT + i)); i=$((i + 1)); PORTS[$mode]=$port
  dir="$work/$mode"; mkdir -p "$dir"
  # shellcheck disable=SC2086
  (cd "$dir" && exec env JWT_SECRET=load-test-secret "${PIN0[@]}" "$BIN" --addr "127.0.0.1:$port" ${ARGS[$mode]} \
     >"$dir/server.log" 2>&1) &
  PIDS[$mode]=$!
done
servers="${PIDS[*]}"
for mode in "${MODES[@]}"; do
  base="http://127.0.0.1:${PORTS[$mode]}"
  for _ in $(seq 1 100); do curl -s -o /dev/null "$base/api/audit/stats" && break; sleep 0.1; done
  TOKENS[$mode]=$(bench_token "$base")
done
# The inline modes stall even the set-up login, and with a stalled sink the durable login answers 503; all servers
# share the JWT secret, so the `off` server's token stands in (the inline servers still stall on their first database access, which is the point).
for mode in "${MODES[@]}"; do TOKENS[$mode]=${TOKENS[$mode]:-${TOKENS[off]}}; done
cat benches/load/login.lua benches/load/report.lua > "$work/login.lua"

# Where each request's CPU goes: CPU 0's busy time (user, system, interrupts: everything the server costs the
# core it is pinned to, the kernel's share included), and the server's own threads' run time by name (tokio's
# workers, sqlx's SQLite threads, the rest), from /proc. Printed as milliseconds over one wrk run.
cpu0_ms() { awk '$1 == "cpu0" {print ($2 + $3 + $4 + $7 + $8 + $9) * 1000 / '"$(getconf CLK_TCK)"'}' /proc/stat; }
threads_ms() {
  for task in /proc/"$1"/task/*; do
    echo "$(cat "$task/comm" 2>/dev/null) $(cut -d' ' -f1 "$task/schedstat" 2>/dev/null)"
  done | awk '$2 == "" {next} $1 ~ /^tokio-rt/ {t += $2; next} $1 ~ /^sqlx-sqlite/ {q += $2; next} {o += $2}
              END {printf "%.1f %.1f %.1f", t / 1e6, q / 1e6, o / 1e6}'
}
cpu_fields() {  # before-snapshot after-snapshot -> key=value pairs for the RESULT line
  read -r c0 t0 q0 o0 <<< "$1"; read -r c1 t1 q1 o1 <<< "$2"
  awk -v c="$c0 $c1" -v t="$t0 $t1" -v q="$q0 $q1" -v o="$o0 $o1" 'function d(p, a) {split(p, a, " "); return a[2] - a[1]}
    BEGIN {printf "cpu0_ms=%.1f runtime_ms=%.1f sqlx_ms=%.1f other_ms=%.1f", d(c), d(t), d(q), d(o)}'
}
snapshot() { echo "$(cpu0_ms) $(threads_ms "$1")"; }
# Before each run: the page cache written back (`sync`), and every server idle (its CPU time still for 0.1 s; at
# most 5 s). A server that writes goes on after its run ends (a batch, a checkpoint, the kernel writing its pages
# back); without this, that work would fall into the next run, another mode's.
servers_ticks() { for pid in "${PIDS[@]}"; do awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null; done | awk '{t += $1} END {print t + 0}'; }
settle() {
  timeout 30 sync || true
  local before after
  for _ in $(seq 1 50); do
    before=$(servers_ticks); sleep 0.1; after=$(servers_ticks)
    [ "$after" = "$before" ] && break
  done
}

# ENDPOINTS="me me1" runs a subset. me1: one connection, one request at a time: the latency a durable event adds (about one sink commit).
read -r -a ENDPOINTS <<< "${ENDPOINTS:-me login me1}"
for endpoint in "${ENDPOINTS[@]}"; do
  for r in $(seq 1 "$REPEATS"); do
    # Each round starts one mode further on (off, layer, … then layer, …, off), so no mode always runs first
    # or right after another.
    shift_by=$(((r - 1) % ${#MODES[@]}))
    for mode in "${MODES[@]:shift_by}" "${MODES[@]:0:shift_by}"; do
      base="http://127.0.0.1:${PORTS[$mode]}"
      # One request at a time against a server that stalls every request tells nothing.
      if [ "$endpoint" = me1 ]; then case $mode in inline*) continue ;; esac; fi
      settle
      before=$(snapshot "${PIDS[$mode]}")
      if [ "$endpoint" = me1 ]; then
        line=$("${PIN1[@]}" wrk -t1 -c1 -d"${DURATION}s" --timeout 10s \
          -H "Authorization: Bearer ${TOKENS[$mode]}" -s benches/load/report.lua "$base/api/auth/me" | grep '^RESULT')
      elif [ "$endpoint" = me ]; then
        line=$("${PIN1[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s \
          -H "Authorization: Bearer ${TOKENS[$mode]}" -s benches/load/report.lua "$base/api/auth/me" | grep '^RESULT')
      else
        line=$("${PIN1[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s -s "$work/login.lua" \
          "$base/api/auth/login" | grep '^RESULT')
      fi
      line="$line $(cpu_fields "$before" "$(snapshot "${PIDS[$mode]}")")"
      echo "$mode	$endpoint	$r	$line" >> "$results"
      echo "$mode $endpoint run $r: $line" >&2
    done
  done
  for mode in "${MODES[@]}"; do
    echo "$mode	rss_$endpoint	0	RESULT rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/${PIDS[$mode]}/status")" >> "$results"
    # The pipeline's counters so far: what was written, and what was not (dropped, lost, abandoned, spill full);
    # for the naive layer, what its drain took and what a full channel refused.
    counters=$(curl -s "http://127.0.0.1:${PORTS[$mode]}/api/audit/stats" | python3 -c 'import json, sys
try: body = json.load(sys.stdin)
except ValueError: body = {}
s, naive = body.get("stats") or {}, body.get("naive") or {}
not_written = sum(v for k, v in s.items() if k.startswith("dropped_") or k in ("lost", "abandoned", "spill_full"))
print("written=%d not_written=%d" % (s.get("written", 0) + naive.get("drained", 0), not_written + naive.get("full", 0)))')
    echo "$mode	audit_$endpoint	0	RESULT $counters" >> "$results"
  done
done
for mode in "${MODES[@]}"; do kill -INT "${PIDS[$mode]}" 2>/dev/null || true; done
wait 2>/dev/null || true
servers=""

load_after=$(cut -d' ' -f1 /proc/loadavg)
python3 - "$results" "$DURATION" "$REPEATS" "$CONNECTIONS" "${#PIN0[@]}" "$load_before" "$load_after" > "$OUT" <<'PY'
import sys, statistics, collections
path, duration, repeats, conns, pinned, load_before, load_after = sys.argv[1:]
runs = collections.defaultdict(list)
rss = {}
audit = {}
for line in open(path):
    label, endpoint, _, result = line.rstrip("\n").split("\t")
    fields = dict(kv.split("=") for kv in result.split()[1:])
    if endpoint.startswith("rss_"):
        rss[(label, endpoint[4:])] = int(fields["rss_kib"])
    elif endpoint.startswith("audit_"):
        audit[(label, endpoint[6:])] = {k: int(v) for k, v in fields.items()}
    else:
        runs[(label, endpoint)].append({k: float(v) for k, v in fields.items()})
labels = list(dict.fromkeys(l for l, _ in runs))
order = ["me", "login", "me1"]


def counted(label, endpoint, key):
    """A counter's growth over the runs on `endpoint` (the counters are cumulative over the endpoints, in order)."""
    done = [e for e in order if (label, e) in audit]
    if (label, endpoint) not in audit:
        return 0
    before = done[done.index(endpoint) - 1] if done.index(endpoint) > 0 else None
    return audit[(label, endpoint)][key] - (audit[(label, before)][key] if before else 0)
print(f"wrk -t1 -c{conns} -d{duration}s, {repeats} interleaved runs per mode, medians; servers on CPU 0, wrk on CPU 1.")
print(f"1-minute load average before the runs: {load_before}, after: {load_after} (the runs' own two busy cores).")
print("Peak RSS is the server's VmHWM after all runs on that endpoint (the login runs come second).")
print("Audit events: written, and not written (dropped at a full queue, lost, abandoned), over all runs on that")
print("endpoint, from the server's /api/audit/stats; a healthy sink that did not write everything did less work.\n")
titles = {"me": "GET /api/auth/me", "login": "POST /api/auth/login",
          "me1": "GET /api/auth/me, one connection (wrk -c1)"}
for endpoint, title in titles.items():
    if not any(e == endpoint for _, e in runs):
        continue
    print(f"### {title}\n")
    print("| mode | req/s | vs off | vs off, per round | vs layer | p50 ms | p99 ms | p99 vs off | p99 vs off, per round "
          "| p99 vs layer | p99.9 ms | errors | peak RSS MiB | audit written | audit not written |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    med = lambda l, k: statistics.median(r[k] for r in runs[(l, endpoint)])
    ratio = lambda l, k, base: med(l, k) / med(base, k) if (base, endpoint) in runs else float("nan")

    def paired(l, k):
        """The median over the rounds of this mode's figure over off's in the same round: the runs of a round
        are seconds apart, so a host that drifts over the set moves both sides of each ratio alike."""
        if ("off", endpoint) not in runs:
            return float("nan")
        pairs = zip(runs[(l, endpoint)], runs[("off", endpoint)])
        return statistics.median(r[k] / o[k] for r, o in pairs)
    for label in labels:
        if (label, endpoint) not in runs:
            continue
        errors = int(sum(r["errors"] for r in runs[(label, endpoint)]))
        print(f"| {label} | {med(label, 'rps'):,.0f} | {ratio(label, 'rps', 'off'):.3f} | "
              f"{paired(label, 'rps'):.3f} | {ratio(label, 'rps', 'layer'):.3f} | {med(label, 'p50_us') / 1000:.2f} | "
              f"{med(label, 'p99_us') / 1000:.2f} | {ratio(label, 'p99_us', 'off'):.2f} | "
              f"{paired(label, 'p99_us'):.2f} | {ratio(label, 'p99_us', 'layer'):.2f} | "
              f"{med(label, 'p999_us') / 1000:.2f} | {errors} | "
              f"{rss.get((label, endpoint), 0) / 1024:.1f} | {counted(label, endpoint, 'written'):,} | "
              f"{counted(label, endpoint, 'not_written'):,} |")
    print()
    if pinned == "0":
        continue
    # CPU per request, median over the runs: what the whole of CPU 0 spent (the kernel's share included), and
    # the server's threads by name. "vs off" is the extra CPU 0 time per request, against off's median.
    per = lambda l, k: statistics.median(r[k] * 1000 / r["requests"] for r in runs[(l, endpoint)])
    print("CPU per request, µs (medians over the runs): CPU 0 in all, then the server's threads by name.\n")
    print("| mode | CPU 0 | extra vs off | tokio's threads | sqlx's SQLite threads | other threads |")
    print("|---|---|---|---|---|---|")
    for label in labels:
        if (label, endpoint) not in runs:
            continue
        extra = per(label, "cpu0_ms") - per("off", "cpu0_ms") if ("off", endpoint) in runs else float("nan")
        print(f"| {label} | {per(label, 'cpu0_ms'):.1f} | {extra:+.1f} | {per(label, 'runtime_ms'):.1f} | "
              f"{per(label, 'sqlx_ms'):.1f} | {per(label, 'other_ms'):.1f} |")
    print()
PY
cat "$OUT"

# The spill under a 15 s Postgres outage (skip with SPILL_OUTAGE=0).
if [ "${SPILL_OUTAGE:-1}" != 0 ]; then
  echo
  PORT=$((PORT + 20)) bash benches/load_spill_outage.sh
fi
