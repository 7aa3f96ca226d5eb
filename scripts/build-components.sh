#!/usr/bin/env bash
# Builds every service component the manifest serves (`just build-components`;
# never the host): the Rust crates in one cargo call, then each JavaScript
# service (components/*/build.sh, which needs node and npm), the ones
# app.toml names and the ones that may be swapped in (email-js).
#
#   scripts/build-components.sh [--manifest FILE]     default FILE: app.toml
#
# First makes sure the pinned toolchain (rust-toolchain.toml) has the
# wasm32-wasip2 target: rustup installs a toolchain file's `targets` only
# with the toolchain itself, never into a release installed before, where
# the build would fail with "can't find crate for `std`".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# shellcheck source=scripts/wasm-target.sh
. scripts/wasm-target.sh
ensure_wasm_target

crates=()
js=()
while read -r kind what; do
  case "$kind" in
    rust) crates+=(-p "$what") ;;
    js) js+=("$what") ;;
  esac
done < <(scripts/services.sh "$@" builds)
if [ "${#crates[@]}" -gt 0 ]; then
  cargo build --release --target wasm32-wasip2 "${crates[@]}"
fi
for dir in components/*/; do
  [ -x "$dir/build.sh" ] || continue
  case " ${js[*]} " in *" ${dir%/} "*) ;; *) js+=("${dir%/}") ;; esac
done
for dir in "${js[@]}"; do
  "$dir/build.sh"
done
