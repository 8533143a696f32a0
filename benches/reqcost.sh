#!/usr/bin/env bash
# Instructions per request for bare | naive | layer | trace (benches/reqcost.rs), counted by callgrind, by the
# slope between two run lengths (setup cancels out); "added" is each mode's figure less bare's.
# Instruction counts do not vary with machine load. Built with --all-features, as CI builds the benches.
#   bash benches/reqcost.sh [N1 N2]      (from the project root; needs valgrind)
#   MODES="bare layer sqlite" bash benches/reqcost.sh   (a subset; bare first: the others are given against it)
set -euo pipefail
n1=${1:-20000}; n2=${2:-60000}
cd "$(dirname "$0")/.."
bin=$(cargo bench --all-features --bench reqcost --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*reqcost[^"]*\)".*/\1/p' | tail -1)
[ -x "$bin" ] || { echo "could not build benches/reqcost.rs" >&2; exit 1; }
count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 | awk '/Collected/ {print $4}'; }
printf '%-6s %14s %10s\n' mode 'instr/request' added
bare=
for mode in ${MODES:-bare naive layer trace}; do
  a=$(count "$mode" "$n1"); b=$(count "$mode" "$n2")
  per=$(echo "($b - $a) / ($n2 - $n1)" | bc -l)
  [ -n "$bare" ] || bare=$per
  printf '%-6s %14.0f %+10.0f\n' "$mode" "$per" "$(echo "$per - $bare" | bc -l)"
done
