# Sourced by the scripts that test a freshly started host (browser-test.sh,
# fuzz-gateway.sh): app.toml with its own ports, topic prefix and state
# directory, the host started on it, stopped and cleaned up on exit.
#
#   test_host_manifest TAG [SED_ARGS...]  writes $WORK/app.toml (extra sed
#                                         arguments edit it further); sets
#                                         WORK, BASE (port P becomes BASE+P-3000:
#                                         BASE+1..5 for the shop) and PREFIX
#   test_host_start                       starts target/debug/host on it and
#                                         waits for the gateway and the order
#                                         service; sets HOST_PID, GATEWAY_URL
# Expects ROOT (the repo) and the current directory to be it.

WORK="$(mktemp -d)"
HOST_PID=""
test_host_cleanup() {
  if [ -n "$HOST_PID" ] && kill -0 "$HOST_PID" 2>/dev/null; then
    kill -TERM "$HOST_PID" && wait "$HOST_PID" || true
  fi
  rm -rf "$WORK"
}
trap test_host_cleanup EXIT

test_host_manifest() {
  local tag="$1"
  shift
  BASE=$((20000 + RANDOM % 20000))
  PREFIX="$tag-$(date +%s)-$RANDOM-"
  # Every port of the gateway and of each component the manifest has moves
  # by the same offset: 3001 becomes BASE+1, 3005 BASE+5.
  awk -v base="$BASE" '
    /^[ \t]*\[/ { section = $0; gsub(/[][ \t]/, "", section) }
    /^port = [0-9]+/ && (section == "gateway" || section ~ /^components\.[^.]+$/) { print "port = " (base + $3 - 3000); next }
    { print }
  ' app.toml |
    sed -e "s|^topic_prefix = \"\"|topic_prefix = \"$PREFIX\"|" \
      -e "s|^wasm = \"target/|wasm = \"$ROOT/target/|" \
      -e "s|^state_dir = .*|state_dir = \"$WORK/state\"|" \
      "$@" >"$WORK/app.toml"
}

test_host_start() {
  "$ROOT/target/debug/host" run --manifest "$WORK/app.toml" >"$WORK/host.log" 2>&1 &
  HOST_PID=$!
  GATEWAY_URL="http://127.0.0.1:$((BASE + 5))"
  for _ in $(seq 1 120); do
    if curl -fsS "$GATEWAY_URL/health" >/dev/null 2>&1 &&
      curl -fsS "http://127.0.0.1:$((BASE + 2))/health" >/dev/null 2>&1; then
      return 0
    fi
    if ! kill -0 "$HOST_PID" 2>/dev/null; then cat "$WORK/host.log"; exit 1; fi
    sleep 0.5
  done
  echo "test host not healthy within 60 s; its log:" >&2
  tail -n 50 "$WORK/host.log" >&2
  exit 1
}
