#!/usr/bin/env bash
# The spill under a Postgres outage: the auth server audits into Postgres through a disk spill; wrk loads
# GET /api/auth/me twice for DURATION seconds, first with Postgres healthy, then with every backend of the
# audit database frozen (SIGSTOP) for FREEZE seconds in the middle of the run. Then it waits for the backlog
# to drain and checks that nothing was dropped and that Postgres holds every event the server accepted.
#
#   bash benches/load_spill_outage.sh      # DURATION=25 FREEZE=15 CONNECTIONS=32; called by benches/load.sh
#
# Loopback only, bounded in time; needs Postgres at 127.0.0.1:5432 (user postgres, trust auth) and runs as a
# user that may signal its backends (root, or postgres). The audit database is created and dropped here.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-25}
FREEZE=${FREEZE:-15}
CONNECTIONS=${CONNECTIONS:-32}
PORT=${PORT:-3930}
OUT=${OUT:-target/load-spill-outage.md}
PSQL=(psql -X -q -t -A -h 127.0.0.1 -U postgres)
DB="tower_audit_load_$$"

# shellcheck source=benches/load/modes.sh
. benches/load/modes.sh
need_wrk
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN0=(taskset -c 0); PIN1=(taskset -c 1); else PIN0=(); PIN1=(); fi
build_server

work=$(mktemp -d)
server=""
thaw() { for pid in $("${PSQL[@]}" -d test -c "SELECT pid FROM pg_stat_activity WHERE datname = '$DB'" 2>/dev/null); do kill -CONT "$pid" 2>/dev/null || true; done; }
cleanup() {
  local status=$?
  thaw
  if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; fi
  "${PSQL[@]}" -d test -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
"${PSQL[@]}" -d test -c "CREATE DATABASE $DB" >/dev/null
URL="postgres://postgres@127.0.0.1:5432/$DB"

(cd "$work" && exec env JWT_SECRET=load-test-secret "${PIN0[@]}" "$BIN" --addr "127.0.0.1:$PORT" --audit layer \
   --audit-sink postgres --audit-url "$URL" --spill-dir "$work/spill" >"$work/server.log" 2>&1) &
server=$!
base="http://127.0.0.1:$PORT"
for _ in $(seq 1 100); do curl -s -o /dev/null "$base/api/audit/stats" && break; sleep 0.1; done
curl -s -o /dev/null -XPOST "$base/api/auth/register" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"benchmark password","country":"FR","annual_income":1,"timezone":"Europe/Paris"}'
token=$(curl -s -XPOST "$base/api/auth/login" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"benchmark password"}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

run() {
  "${PIN1[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s -H "Authorization: Bearer $token" \
    -s benches/load/report.lua "$base/api/auth/me" | grep '^RESULT'
}
# Freezes every backend of the audit database (new ones too, as the sink reconnects) for FREEZE seconds.
freeze() {
  local until=$((SECONDS + FREEZE))
  while [ "$SECONDS" -lt "$until" ]; do
    for pid in $("${PSQL[@]}" -d test -c "SELECT pid FROM pg_stat_activity WHERE datname = '$DB'"); do
      kill -STOP "$pid" 2>/dev/null || true
    done
    sleep 0.1
  done
  thaw
}

healthy=$(run)
echo "healthy: $healthy" >&2
after_healthy=$(curl -s "$base/api/audit/stats")
echo "stats after the healthy run: $after_healthy" >&2
( sleep $(((DURATION - FREEZE) / 2)); freeze ) &
freezer=$!
outage=$(run)
wait "$freezer"
echo "frozen for ${FREEZE}s: $outage" >&2

# Let the backlog drain (bounded), then compare the server's counters with what Postgres holds.
stats=""
for _ in $(seq 1 600); do
  stats=$(curl -s "$base/api/audit/stats")
  python3 -c 'import json,sys; s=json.loads(sys.argv[1])["stats"]; sys.exit(0 if s["queued"] == 0 else 1)' "$stats" && break
  sleep 0.1
done
rows=$("${PSQL[@]}" -d "$DB" -c "SELECT count(*) FROM audit_events WHERE kind <> 'audit.boot' AND kind <> 'audit.gap'")

status=0
python3 - "$healthy" "$outage" "$stats" "$rows" "$DURATION" "$FREEZE" "$CONNECTIONS" "$after_healthy" > "$OUT" <<'PY' || status=$?
import json, sys
healthy, outage, stats, rows, duration, freeze, conns, after_healthy = sys.argv[1:]
parse = lambda line: {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
h, o, s = parse(healthy), parse(outage), json.loads(stats)["stats"]
dropped = sum(s[k] for k in ("dropped_queue_full", "dropped_queue_bytes", "dropped_wait_timeout", "spill_full", "lost"))
print(f"wrk -t1 -c{conns} -d{duration}s against GET /api/auth/me, the audit sink Postgres through a disk spill;")
print(f"second run: every backend of the audit database frozen (SIGSTOP) for {freeze} s mid-run.\n")
print("| run | req/s | p50 ms | p99 ms | p99.9 ms | errors |")
print("|---|---|---|---|---|---|")
for name, r in (("healthy", h), (f"Postgres frozen {freeze} s", o)):
    print(f"| {name} | {r['rps']:,.0f} | {r['p50_us']/1000:.2f} | {r['p99_us']/1000:.2f} | {r['p999_us']/1000:.2f} | {int(r['errors'])} |")
print(f"\np99 frozen / healthy: **{o['p99_us'] / h['p99_us']:.2f}×**; req/s frozen / healthy: {o['rps'] / h['rps']:.2f}×")
print(f"\nAfter the backlog drained: accepted {s['accepted']}, written {s['written']}, dropped or lost {dropped}, "
      f"queued {s['queued']}, retries {s['retries']}, sink timeouts {s['sink_timeouts']}; rows in Postgres "
      f"(requests and security events): {rows}.")
# The stats request that read `s` is audited too, after its response: the table may hold its row, one more.
ok = dropped == 0 and s["queued"] == 0 and 0 <= int(rows) - s["accepted"] <= 1 and s["written"] == s["accepted"]
drops = lambda s: {k: v for k, v in s.items() if k.startswith("dropped_") or k in ("spill_full", "lost")}
print(f"\nDrops after the healthy run: {drops(json.loads(after_healthy)['stats'])}; at the end: {drops(s)}.")
print(f"\nEvery accepted event in Postgres, none dropped: **{'yes' if ok else 'NO'}**")
sys.exit(0 if ok else 1)
PY
cat "$OUT"
exit $status
