#!/usr/bin/env bash
# End-to-end load run: the example auth server in each audit mode under wrk, on loopback only, bounded in time.
#
#   bash benches/load.sh                # DURATION=8 REPEATS=3 CONNECTIONS=32 by default
#
# For each mode it starts a fresh server (fresh databases) pinned to CPU 0, registers one user, then runs wrk
# pinned to CPU 1 against GET /api/auth/me (bearer token) and POST /api/auth/login, REPEATS times each, and
# reports the median requests/s, p50, p99 and p99.9 latency, errors (socket errors and non-2xx), and the
# server's peak RSS. Installs wrk from Debian's packages if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-8}
REPEATS=${REPEATS:-3}
CONNECTIONS=${CONNECTIONS:-32}
PORT=${PORT:-3917}
OUT=${OUT:-target/load-results.md}

if ! command -v wrk >/dev/null; then
  echo "installing wrk" >&2
  apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null
fi
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN0=(taskset -c 0); PIN1=(taskset -c 1); else PIN0=(); PIN1=(); fi

cargo build --release --example auth_server --features sqlite,postgres >&2
BIN=$PWD/target/release/examples/auth_server
work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
base="http://127.0.0.1:$PORT"
results="$work/results.tsv"
: > "$results"

run_mode() { # label audit sink pool
  local label=$1 audit=$2 sink=$3 pool=$4 dir="$work/$1"
  mkdir -p "$dir"
  (cd "$dir" && exec env JWT_SECRET=load-test-secret "${PIN0[@]}" "$BIN" --addr "127.0.0.1:$PORT" --audit "$audit" --audit-sink "$sink" --db-pool-size "$pool" \
     >"$dir/server.log" 2>&1) &
  server=$!
  for _ in $(seq 1 100); do curl -s -o /dev/null "$base/api/audit/stats" && break; sleep 0.1; done
  curl -s -o /dev/null -XPOST "$base/api/auth/register" -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","password":"benchmark password","country":"FR","annual_income":1,"timezone":"Europe/Paris"}'
  local token
  token=$(curl -s -XPOST "$base/api/auth/login" -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","password":"benchmark password"}' | python3 -c 'import json,sys; print(json.load(sys.stdin).get("access_token",""))')
  for endpoint in me login; do
    for r in $(seq 1 "$REPEATS"); do
      local line
      if [ "$endpoint" = me ]; then
        line=$("${PIN1[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s -H "Authorization: Bearer $token" \
          -s benches/load/report.lua "$base/api/auth/me" | grep '^RESULT')
      else
        cat benches/load/login.lua benches/load/report.lua > "$work/login.lua"
        line=$("${PIN1[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s -s "$work/login.lua" \
          "$base/api/auth/login" | grep '^RESULT')
      fi
      echo "$label	$endpoint	$r	$line" >> "$results"
      echo "$label $endpoint run $r: $line" >&2
    done
  done
  local rss
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$server/status")
  echo "$label	rss	0	RESULT rss_kib=$rss" >> "$results"
  kill -INT "$server"; wait "$server" 2>/dev/null || true; server=""
}

run_mode off off sqlite 5
run_mode layer layer sqlite 5
run_mode layer-stalled-sink layer stalled 5
run_mode inline inline sqlite 5
run_mode inline-pool-1 inline sqlite 1

python3 - "$results" "$DURATION" "$REPEATS" "$CONNECTIONS" > "$OUT" <<'PY'
import sys, statistics, collections
path, duration, repeats, conns = sys.argv[1:]
runs = collections.defaultdict(list)
rss = {}
for line in open(path):
    label, endpoint, _, result = line.rstrip("\n").split("\t")
    fields = dict(kv.split("=") for kv in result.split()[1:])
    if endpoint == "rss":
        rss[label] = int(fields["rss_kib"])
    else:
        runs[(label, endpoint)].append({k: float(v) for k, v in fields.items()})
labels = list(dict.fromkeys(l for l, _ in runs))
print(f"wrk -t1 -c{conns} -d{duration}s, {repeats} runs each, medians; server on CPU 0, wrk on CPU 1.\n")
for endpoint in ("me", "login"):
    title = "GET /api/auth/me" if endpoint == "me" else "POST /api/auth/login"
    print(f"### {title}\n")
    print("| mode | req/s | vs off | p50 ms | p99 ms | p99 vs off | p99.9 ms | errors | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    med = lambda l, k: statistics.median(r[k] for r in runs[(l, endpoint)])
    for label in labels:
        rps, p99 = med(label, "rps"), med(label, "p99_us")
        base_rps, base_p99 = med("off", "rps"), med("off", "p99_us")
        errors = int(sum(r["errors"] for r in runs[(label, endpoint)]))
        print(f"| {label} | {rps:,.0f} | {rps / base_rps:.3f} | {med(label, 'p50_us') / 1000:.2f} | "
              f"{p99 / 1000:.2f} | {p99 / base_p99:.2f} | {med(label, 'p999_us') / 1000:.2f} | {errors} | "
              f"{rss.get(label, 0) / 1024:.1f} |")
    print()
PY
cat "$OUT"
