# Shared by benches/load.sh, benches/load_spill_outage.sh and benches/server_cost.sh (sourced from the project
# root): wrk, the example auth server's build, its audit modes, and signing in to a server.

# Installs wrk from Debian's packages if it is missing.
need_wrk() {
  command -v wrk >/dev/null && return
  echo "installing wrk" >&2
  apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null
}

# Builds the example auth server (release) and sets BIN to it.
build_server() {
  cargo build --release --example auth_server --features sqlite,postgres,metrics >&2
  BIN=$PWD/target/release/examples/auth_server
}

# `layer` makes the auth actions durable (the default: register, login, refresh, logout) and /me best effort;
# `layer-durable` makes /me durable too, and `layer-durable-batch-1` turns group commit off (one sink write per
# event, Kubernetes' blocking-strict); `layer-batch-512` writes SQLite batches of 512 (the layer's default) where
# the example writes 128 (`SqliteSink::SUGGESTED_BATCH_SIZE`); `layer-jsonl` (not in the default set) writes JSON
# lines instead of SQLite; `layer-null-sink` runs the whole pipeline into a sink that keeps nothing, and `naive` a
# naive layer (seven fields into a channel nobody writes anywhere: the floor any audit middleware starts from);
# `off-again` is off once more, a server of its own: how far two identical servers differ is the method's error.
declare -A ARGS=(
  [off]="--audit off --db-pool-size 5"
  [off-again]="--audit off --db-pool-size 5"
  [layer]="--audit layer --audit-sink sqlite --db-pool-size 5"
  [layer-batch-512]="--audit layer --audit-sink sqlite --audit-batch-size 512 --db-pool-size 5"
  [layer-durable]="--audit layer --audit-sink sqlite --durable all --db-pool-size 5"
  [layer-durable-batch-1]="--audit layer --audit-sink sqlite --durable all --audit-batch-size 1 --db-pool-size 5"
  [layer-jsonl]="--audit layer --audit-sink jsonl --db-pool-size 5"
  [layer-stalled-sink]="--audit layer --audit-sink stalled --durable none --db-pool-size 5"
  [layer-null-sink]="--audit layer --audit-sink null --durable none --db-pool-size 5"
  [naive]="--audit naive --db-pool-size 5"
  [inline]="--audit inline --db-pool-size 5"
  [inline-pool-1]="--audit inline --db-pool-size 1"
)

# Registers the benchmark user on the server at $1 (ignored if it exists) and prints an access token for it, or
# nothing if the server refused to log in.
bench_token() {
  curl -s -o /dev/null -XPOST "$1/api/auth/register" -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","password":"benchmark password","country":"FR","annual_income":1,"timezone":"Europe/Paris"}'
  curl -s -XPOST "$1/api/auth/login" -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","password":"benchmark password"}' \
    | python3 -c 'import json,sys
try: print(json.load(sys.stdin).get("access_token",""))
except ValueError: print("")'
}
