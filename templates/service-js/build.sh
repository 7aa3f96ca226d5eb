#!/usr/bin/env bash
# Builds the JavaScript __NAME__ service into a Wasm component of the world
# shop:service/service@0.2.0 (`just build-component __NAME__`).
#
#   components/__NAME__/build.sh [OUT]    default OUT: target/wasm32-wasip2/release/__NAME__.wasm
#
# Installs the locked toolchain (`npm ci`, from the npm registry) when
# package-lock.json changed since the last install, then runs the
# componentize-js CLI: StarlingMonkey (SpiderMonkey) plus src/, snapshotted
# with Wizer. WASI features the host does not grant are disabled (`http`,
# `fetch-event`: no wasi:http import). The build is skipped when the sources,
# the WIT world and the lock file are unchanged since the last one, so that
# the host's file watch does not see a rewritten file.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${1:-${CARGO_TARGET_DIR:-$ROOT/target}/wasm32-wasip2/release/__NAME__.wasm}"
cd "$HERE"

command -v node >/dev/null || { echo "__NAME__: node (and npm) are needed to build this component" >&2; exit 1; }

lock_sum="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ "$(cat node_modules/.shop-lock-sha256 2>/dev/null)" != "$lock_sum" ]; then
  echo "__NAME__: npm ci" >&2
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock_sum" > node_modules/.shop-lock-sha256
fi

inputs_sum="$(cat package-lock.json build.sh src/*.js "$ROOT"/wit/*.wit | sha256sum | cut -d' ' -f1)"
stamp="$OUT.inputs-sha256"
if [ -f "$OUT" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$inputs_sum" ]; then
  echo "__NAME__: $OUT is up to date" >&2
  exit 0
fi

mkdir -p "$(dirname "$OUT")"
tmp="$OUT.tmp.$$"
trap 'rm -f "$tmp"' EXIT
node_modules/.bin/componentize-js src/index.js \
  --wit "$ROOT/wit" --world-name service \
  --disable http fetch-event \
  -o "$tmp"
# Renamed into place so that the host's file watch never reads half a file.
mv "$tmp" "$OUT"
echo "$inputs_sum" > "$stamp"
echo "__NAME__: built $OUT ($(stat -c %s "$OUT") bytes)" >&2
