#!/usr/bin/env bash
# Instructions per request on the example auth server itself, per audit mode, counted by callgrind: the whole
# process (every thread: tokio's, sqlx's SQLite threads, the audit worker) while wrk sends GET /api/auth/me over
# loopback. Instruction counts do not move with the host's noise, which in end-to-end runs (benches/load.sh) is
# as large as the layer's own cost; this script says what the layer adds to the real server, where load.sh says
# what that costs in requests/s.
#
#   bash benches/server_cost.sh             # MODES="off naive layer-null-sink layer-stalled-sink layer-jsonl layer"
#   MODES="off layer" DURATION=30 bash benches/server_cost.sh
#   CACHE_SIM=1 MODES="off naive layer-null-sink" bash benches/server_cost.sh   # also L1 misses per request
#
# Each server runs under `valgrind --tool=callgrind` (about 50× slower), gets 5 s of warm-up, then its counters
# are zeroed, wrk runs for DURATION seconds (8 connections), and the counters are dumped: start-up and shutdown
# are left out. Read the figures with three caveats:
# - user space only: the kernel's work (sockets, SQLite's file writes) is not counted;
# - work driven by time (the worker's flush ticks, metrics publishing) weighs ~50× more per request than at full
#   speed, and the audit worker's batches are smaller (fewer events wait for it);
# - valgrind runs one thread at a time, so the threads' hand-offs cost what they cost on one core.
# With CACHE_SIM=1, callgrind also simulates the caches (about 2× slower again) and the script prints the level-1
# misses per request: instruction fetches (I1) and data reads and writes (D1). On this server a request's user
# time followed them more than its instructions (BENCHMARKS.md §4, eighth session).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-20}
PORT=${PORT:-3957}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
# shellcheck source=benches/load/modes.sh
. benches/load/modes.sh
need_wrk
read -r -a MODES <<< "${MODES:-off naive layer-null-sink layer-stalled-sink layer-jsonl layer}"
cachesim=(); [ "${CACHE_SIM:-0}" = 1 ] && cachesim=(--cache-sim=yes)

build_server
work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

printf '%-20s %9s %14s %10s %16s' mode requests 'instr/request' 'vs first' 'Rust allocations'
[ ${#cachesim[@]} = 0 ] && echo || printf ' %12s %12s\n' 'I1 misses' 'D1 misses'
off=
for mode in "${MODES[@]}"; do
  dir="$work/$mode"; mkdir -p "$dir"; base="http://127.0.0.1:$PORT"
  # shellcheck disable=SC2086
  (cd "$dir" && exec env JWT_SECRET=load-test-secret valgrind --tool=callgrind "${cachesim[@]}" --callgrind-out-file="$dir/cg.out" \
     "$BIN" --addr "127.0.0.1:$PORT" ${ARGS[$mode]} >"$dir/server.log" 2>&1) &
  server=$!
  for _ in $(seq 1 300); do curl -s -o /dev/null "$base/api/audit/stats" && break; sleep 0.2; done
  token=$(bench_token "$base")
  [ -n "$token" ] || { echo "$mode: could not log in (see $dir/server.log)" >&2; exit 1; }
  auth=(-H "Authorization: Bearer $token")
  wrk -t1 -c8 -d5s "${auth[@]}" "$base/api/auth/me" >/dev/null
  callgrind_control --zero "$server" >/dev/null 2>&1
  line=$(wrk -t1 -c8 -d"${DURATION}s" "${auth[@]}" -s benches/load/report.lua "$base/api/auth/me" | grep '^RESULT')
  callgrind_control --dump "$server" >/dev/null 2>&1
  kill -INT "$server"; wait "$server" 2>/dev/null || true; server=""
  requests=$(sed -n 's/.*requests=\([0-9]*\).*/\1/p' <<< "$line")
  errors=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<< "$line")
  [ "$errors" = 0 ] || { echo "$mode: $errors errors under wrk" >&2; exit 1; }
  dump=$(ls "$dir"/cg.out.* | head -1)
  total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
  allocs=$(callgrind_annotate --tree=caller --threshold=100 "$dump" 2>/dev/null \
    | sed -n 's/.*< ???:__rustc::__rust_alloc (\([0-9,]*\)x).*/\1/p' | head -1 | tr -d ,)
  per=$(echo "$total / $requests" | bc -l)
  [ -n "$off" ] || off=$per
  printf '%-20s %9d %14.0f %+9.1f%% %16.1f' "$mode" "$requests" "$per" "$(echo "($per / $off - 1) * 100" | bc -l)" \
    "$(echo "${allocs:-0} / $requests" | bc -l)"
  if [ ${#cachesim[@]} = 0 ]; then echo; continue; fi
  # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
  awk -v n="$requests" '/^(summary|totals):/ {printf " %12.0f %12.0f\n", $5 / n, ($6 + $7) / n; exit}' "$dump"
done
