#!/usr/bin/env bash
# The services of a manifest, read from its `[components.NAME]` blocks: the
# one list the justfile, the scripts and the Dockerfile derive theirs from.
#
#   scripts/services.sh [--manifest FILE] names     component names, one a line
#   scripts/services.sh [--manifest FILE] builds    what to build: `rust CRATE` or `js DIR`
#                                                   for each .wasm the manifest serves
#   scripts/services.sh [--manifest FILE] ports     `NAME PORT` of each component
#   scripts/services.sh [--manifest FILE] next-port the next free port (after the
#                                                   gateway's and the components', not 3090)
#
# FILE defaults to app.toml. A component's build is found from its .wasm
# file's name: components/STEM/Cargo.toml is a Rust crate, components/STEM/
# build.sh a JavaScript service. Reads the manifest's plain `key = value`
# lines (what `just new-service` writes and app.toml holds); `host check`
# validates the rest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

MANIFEST="$ROOT/app.toml"
if [ "${1:-}" = "--manifest" ]; then
  MANIFEST="$2"
  shift 2
fi
[ -f "$MANIFEST" ] || { echo "services: no manifest at $MANIFEST" >&2; exit 1; }

# `NAME STEM PORT` for each [components.NAME] block, in the manifest's order;
# `gateway - PORT` for the gateway.
blocks() {
  awk '
    function value(line) { sub(/^[^=]*=[ \t]*/, "", line); sub(/[ \t]*#.*$/, "", line); gsub(/"/, "", line); return line }
    function flush() { if (name != "") print name, (stem == "" ? "-" : stem), (port == "" ? "-" : port); name = stem = port = "" }
    /^[ \t]*\[/ {
      flush()
      header = $0; gsub(/[][ \t]/, "", header)
      if (header ~ /^components\.[^.]+$/) name = substr(header, 12)
      else if (header == "gateway") name = "gateway"
      next
    }
    name != "" && /^[ \t]*wasm[ \t]*=/ { stem = value($0); sub(/^.*\//, "", stem); sub(/\.wasm$/, "", stem) }
    name != "" && /^[ \t]*port[ \t]*=/ { port = value($0) }
    END { flush() }
  ' "$MANIFEST"
}

case "${1:-}" in
  names) blocks | awk '$1 != "gateway" { print $1 }' ;;
  ports) blocks | awk '$1 != "gateway" { print $1, $3 }' ;;
  builds)
    blocks | awk '$1 != "gateway" { print $2 }' | sort -u | while read -r stem; do
      if [ -f "$ROOT/components/$stem/Cargo.toml" ]; then
        echo "rust $stem"
      elif [ -f "$ROOT/components/$stem/build.sh" ]; then
        echo "js components/$stem"
      else
        echo "services: no components/$stem/Cargo.toml or build.sh builds $stem.wasm ($MANIFEST)" >&2
        exit 1
      fi
    done
    ;;
  next-port)
    # 3090 is the admin API's default port.
    blocks | awk '$3 ~ /^[0-9]+$/ && $3 > max { max = $3 } END { p = (max ? max : 3000) + 1; if (p == 3090) p++; print p }'
    ;;
  *)
    echo "usage: scripts/services.sh [--manifest FILE] names|builds|ports|next-port" >&2
    exit 2
    ;;
esac
