#!/usr/bin/env bash
# Adds a service (`just new-service NAME [--lang js]`): one folder and one
# manifest block, so that `just run` serves it with no other edit.
#
#   components/NAME/          from templates/service-rust (a handler on the WIT
#                             world through the SDK, unit tests on MemoryHost)
#                             or, with --lang js, templates/service-js
#                             (componentize-js, as components/email-js)
#   Cargo.toml                NAME joins the workspace members (Rust only)
#   app.toml                  [components.NAME]: the next free port, the topic
#                             NAME, group NAME-service, explicit grants
#   deploy/app.container.toml the same block, as the image's manifest must
#                             serve what app.toml serves
#
# NAME: lowercase letters, digits and dashes, starting with a letter; not a
# component or folder that exists. Nothing is written when a check fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "new-service: $*" >&2; exit 1; }
usage() { die "usage: just new-service NAME [--lang rust|js]"; }

NAME=""
LANG_="rust"
while [ $# -gt 0 ]; do
  case "$1" in
    --lang) [ $# -ge 2 ] || usage; LANG_="$2"; shift 2 ;;
    --lang=*) LANG_="${1#--lang=}"; shift ;;
    -*) usage ;;
    *) [ -z "$NAME" ] || usage; NAME="$1"; shift ;;
  esac
done
[ -n "$NAME" ] || usage
case "$LANG_" in rust | js) ;; *) die "unknown language ${LANG_@Q}: rust or js" ;; esac
[[ "$NAME" =~ ^[a-z][a-z0-9]*(-[a-z0-9]+)*$ ]] ||
  die "${NAME@Q} is not a service name: lowercase letters, digits and single dashes, starting with a letter"
[ "${#NAME}" -le 40 ] || die "${NAME@Q} is longer than 40 characters"
case "$NAME" in
  timer | dead-letters | gateway | host | sdk | events) die "${NAME@Q} is taken by the host or the workspace" ;;
esac
[ ! -e "components/$NAME" ] || die "components/$NAME exists already"
if scripts/services.sh names | grep -qx -- "$NAME"; then die "app.toml has a component $NAME already"; fi
if grep -q "^name = \"$NAME\"$" components/*/Cargo.toml host/Cargo.toml gateway/Cargo.toml bench/Cargo.toml 2>/dev/null; then
  die "a crate of the workspace is named $NAME already"
fi

PORT="$(scripts/services.sh next-port)"
# The Rust type: the name in CamelCase (order-audit: OrderAudit).
TYPE="$(echo "$NAME" | awk -F- '{ for (i = 1; i <= NF; i++) printf "%s%s", toupper(substr($i, 1, 1)), substr($i, 2) }')"

write_folder() {
  local template="templates/service-$LANG_" file out
  mkdir -p "components/$NAME"
  (cd "$template" && find . -type f ! -path './node_modules/*') | while read -r file; do
    out="components/$NAME/${file#./}"
    mkdir -p "$(dirname "$out")"
    sed -e "s/__NAME__/$NAME/g" -e "s/__TYPE__/$TYPE/g" "$template/$file" >"$out"
    [ ! -x "$template/$file" ] || chmod +x "$out"
  done
}

# Adds "components/NAME" after the last "components/..." member.
add_member() {
  awk -v member="    \"components/$NAME\"," '
    { lines[NR] = $0 }
    /^members = \[/ { inside = 1 }
    inside && /^[ \t]*"components\// { last = NR }
    inside && /^\]/ { inside = 0 }
    END { for (i = 1; i <= NR; i++) { print lines[i]; if (i == last) print member } }
  ' Cargo.toml >Cargo.toml.new
  grep -q "\"components/$NAME\"" Cargo.toml.new || { rm -f Cargo.toml.new; die "found no workspace members list in Cargo.toml"; }
  mv Cargo.toml.new Cargo.toml
  printf '[profile.release.package.%s]\nopt-level = "s"\n' "$NAME" >>Cargo.toml
}

# The manifest block, with the .wasm where `file` says.
block() {
  local wasm="$1" wasi='["stderr"]'
  # componentize-js components import the clocks and random as well.
  [ "$LANG_" = rust ] || wasi='["clocks", "random", "stderr"]'
  cat <<BLOCK

# Added by \`just new-service $NAME\`: components/$NAME.
[components.$NAME]
wasm = "$wasm"
port = $PORT
topics = ["$NAME"]
group = "$NAME-service"
instance_reuse = 1000
# Grants: what it may publish ("topic:Type"; anything else is dead-lettered)
# and its WASI capabilities.
publishes = []
wasi = $wasi
BLOCK
}

write_folder
[ "$LANG_" = js ] || add_member
block "target/wasm32-wasip2/release/$NAME.wasm" >>app.toml
block "components/$NAME.wasm" >>deploy/app.container.toml

echo "new-service: components/$NAME ($LANG_), app.toml [components.$NAME] on port $PORT, topic $NAME"
if [ "$LANG_" = rust ]; then
  echo "  test it:  cargo test -p $NAME"
else
  echo "  the image builds Rust services only: serve $NAME from \`just run\`"
fi
echo "  serve it: just run   (then: curl http://127.0.0.1:$PORT/events)"
