#!/usr/bin/env bash
# Proves the published crate is what users get: packages tower-audit (`cargo package`), unpacks the .crate, and
# builds a new crate made of the README's quick start: its `[dependencies]` block (with tower-audit pointing at
# the unpacked package, not this source tree) and its code. A file left out of the package, or a path that only
# exists in the repository, fails here.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

cargo package --no-verify --allow-dirty --quiet
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
crate="target/package/tower-audit-$version.crate"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$crate" -C "$work"

mkdir -p "$work/consumer/src"
# The README's first ```toml block (under "Quick start") and first ```rust block after it.
python3 - "$root/README.md" "$work" "$version" <<'PY'
import re, sys
readme, work, version = sys.argv[1:]
text = open(readme).read()
start = text.index("## Quick start")
toml = re.search(r"```toml\n(.*?)```", text[start:], re.S).group(1)
code = re.search(r"```rust[^\n]*\n(.*?)```", text[start:], re.S).group(1)
package = f'tower-audit = {{ path = "{work}/tower-audit-{version}" }}'
toml, n = re.subn(r'^tower-audit = .*$', package, toml, flags=re.M)
assert n == 1, "the quick start's [dependencies] must name tower-audit once"
header = '[package]\nname = "consumer"\nversion = "0.0.0"\nedition = "2024"\npublish = false\n\n[workspace]\n\n'
open(f"{work}/consumer/Cargo.toml", "w").write(header + toml)
open(f"{work}/consumer/src/main.rs", "w").write(code)
PY
echo "building the README's quick start against $crate" >&2
CARGO_TARGET_DIR="$root/target/consumer" cargo build --quiet --manifest-path "$work/consumer/Cargo.toml"
echo "ok: the packaged crate builds the README's quick start"
