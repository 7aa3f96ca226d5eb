#!/usr/bin/env bash
# End-to-end benchmark on a real Apache Kafka broker (`just bench`, which
# builds the components and the host first).
#
#   scripts/bench.sh [SUITE OPTIONS]     e.g. --closed 32 --rates 100 --open-duration-s 10
#
# Starts the broker (scripts/kafka.sh), then the host the way `just run` does,
# with a copy of app.toml whose state_dir is a fresh temporary directory and
# whose topics and consumer groups carry a fresh `bench-XXXXXXXX.` prefix, so
# runs neither pile up nor see each other's events, and with the admin API on
# behind a one-off token. Measures the time until every port answers /health,
# runs `bench suite` (closed and open loops with each component's stage costs,
# then a hot swap under load, then the same closed loop without a shadow run
# and with payment-v2, payment-trap and payment-spin shadowing payment, the
# candidates `just build-test-components` builds, skipped without them; see
# `cargo run -p bench -- suite --help`) and
# `bench email-js-e2e` (the same closed loop with the Rust, then the
# JavaScript email build serving, swapped through the admin API), stops
# the host with SIGTERM, runs `bench physical` (plain Kafka relays moving the
# run's record flow: the broker's limit), `bench wasm` (each component's
# logic per event, natively and through the host library), `bench store`
# (the redb store alone filling with 100,000 orders' commits: its size and
# commit rate as it grows) and `bench email-js` (the JavaScript email build
# against the Rust one: size, compile and cache-load time, instantiation and
# cost per event), then starts
# PostgreSQL (scripts/postgres.sh) and runs `bench scale` (the email
# component alone on 1, 2 and 3 hosts sharing PostgreSQL, then on one host
# with redb, each host on the manifest's ports plus 100, 200, 300), and
# deletes the run's topics. Results: the tables on stdout, JSON in
# target/bench/, the host's log in target/bench/host.log, the scale hosts'
# in target/bench/scale/. BENCH_PORT_OFFSET=10000 moves every port
# (3001-3005 become 13001-13005, the admin API 3090 becomes 13090), to run
# beside a host on the usual ports.
#
# BENCH_ONLY=suite stops after `bench suite` (the host stopped, the topics
# deleted), e.g. the shadow phase alone, short:
#
#   BENCH_ONLY=suite scripts/bench.sh --closed --rates --swap-duration-s 0 --shadow-duration-s 5
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$TARGET/bench"
# Added to every port of the manifest, to run beside a host on the usual ports.
PORT_OFFSET="${BENCH_PORT_OFFSET:-0}"
# `suite`: nothing after `bench suite`; empty: everything.
ONLY="${BENCH_ONLY:-}"
case "$ONLY" in
  "" | suite) ;;
  *) echo "bench.sh: BENCH_ONLY is 'suite' or empty, not '$ONLY'" >&2; exit 2 ;;
esac
STOP_TIMEOUT_S=30

log() { echo "bench.sh: $*" >&2; }

scripts/kafka.sh start
# The component crates the bench links natively (its path dependencies in
# components/), and the bench where their generic logic is instantiated, at
# the opt-level of the .wasm build (Cargo.toml), so that `bench wasm`
# compares like with like; the host keeps `just run`'s build.
NATIVE_OPT=()
for crate in $(sed -n 's|^\([a-z0-9-]*\) = { path = "\.\./components/.*|\1|p' bench/Cargo.toml) shop-sdk bench; do
  NATIVE_OPT+=(--config "profile.dev.package.$crate.opt-level=\"s\"")
done
cargo build -q -p bench "${NATIVE_OPT[@]}"
BENCH="$TARGET/debug/bench"

RUN_ID="bench-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
ADMIN_TOKEN="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
WORK="$(mktemp -d -t shop-bench.XXXXXX)"
MANIFEST="$WORK/app.toml"
HOST_PID=""
mkdir -p "$OUT"

stop_host() {
  [ -n "$HOST_PID" ] && kill -0 "$HOST_PID" 2>/dev/null || return 0
  local start_ns end_ns
  start_ns=$(date +%s%N)
  kill -TERM "$HOST_PID"
  for _ in $(seq 1 $((STOP_TIMEOUT_S * 20))); do
    kill -0 "$HOST_PID" 2>/dev/null || break
    sleep 0.05
  done
  if kill -0 "$HOST_PID" 2>/dev/null; then
    log "host did not stop within $STOP_TIMEOUT_S s of SIGTERM; killing it"
    kill -KILL "$HOST_PID" 2>/dev/null || true
  else
    end_ns=$(date +%s%N)
    log "host stopped $(((end_ns - start_ns) / 1000000)) ms after SIGTERM"
  fi
  wait "$HOST_PID" 2>/dev/null || true
  HOST_PID=""
}

cleanup() {
  local status=$?
  stop_host
  cp "$WORK/host.log" "$OUT/host.log" 2>/dev/null || true
  if [ "$status" -ne 0 ] && [ -f "$WORK/host.log" ]; then
    log "last lines of the host's log ($OUT/host.log):"
    tail -n 20 "$WORK/host.log" >&2
  fi
  # The host may have stopped just now: its groups empty once its sessions
  # time out (10 s).
  "$BENCH" delete-topics --prefix "$RUN_ID." --patience-s 15 || log "the topics $RUN_ID.* were not deleted"
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The manifest's paths are relative to its own directory: make the component
# files and the compile cache absolute (the cache is shared with `just run`),
# point state_dir at the fresh directory, and give topics and groups the
# run's prefix.
awk -v root="$ROOT" -v work="$WORK" -v prefix="$RUN_ID." -v offset="$PORT_OFFSET" -v ports="$WORK/ports" '
  function absolute(line) {
    if (line ~ /=[ \t]*"[^\/]/) sub(/"/, "\"" root "/", line)
    return line
  }
  # The admin API on its default port, moved like the others.
  function admin_port() { print "port = " (3090 + offset); print "admin " (3090 + offset) > ports; admin_done = 1 }
  /^[ \t]*\[/ {
    if (section == "admin" && !admin_done) admin_port()
    section = $0; gsub(/[][ \t]/, "", section)
    print
    if (section == "kafka") { print "topic_prefix = \"" prefix "\""; kafka = 1 }
    if (section == "runtime") { print "state_dir = \"" work "/state\""; runtime = 1 }
    if (section == "admin") admin = 1
    next
  }
  section == "kafka" && /^[ \t]*topic_prefix[ \t]*=/ { next }
  # Static members do not leave their group on shutdown, and a group with
  # members cannot be deleted; a one-off host has nothing to take back.
  section == "kafka" && /^[ \t]*instance_id[ \t]*=/ { next }
  section == "runtime" && /^[ \t]*state_dir[ \t]*=/ { next }
  section == "runtime" && /^[ \t]*cache_dir[ \t]*=/ { print absolute($0); cache = 1; next }
  section == "admin" && /^[ \t]*port[ \t]*=[ \t]*[0-9]+/ {
    port = $0; sub(/^[^=]*=[ \t]*/, "", port); port = int(port) + offset
    print "port = " port
    print "admin " port > ports
    admin_done = 1
    next
  }
  /^[ \t]*wasm[ \t]*=/ { print absolute($0); next }
  /^[ \t]*port[ \t]*=[ \t]*[0-9]+/ && (section == "gateway" || section ~ /^components\.[^.]+$/) {
    port = $0; sub(/^[^=]*=[ \t]*/, "", port); port = int(port) + offset
    print "port = " port
    print section " " port > ports
    next
  }
  { print }
  END {
    if (section == "admin" && !admin_done) admin_port()
    if (!kafka) print "\n[kafka]\ntopic_prefix = \"" prefix "\""
    if (!runtime) print "\n[runtime]\nstate_dir = \"" work "/state\""
    if (!admin) { print "\n[admin]"; admin_port() }
  }
' app.toml >"$MANIFEST"
if ! grep -q '^[[:space:]]*cache_dir[[:space:]]*=' "$MANIFEST"; then
  # A key for the [runtime] table, wherever the awk put it.
  sed -i "/^\[runtime\]/a cache_dir = \"$ROOT/.component-cache\"" "$MANIFEST"
fi

GATEWAY_PORT=""
ADMIN_PORT=""
HEALTH_URLS=""
COMPONENTS=""
while read -r section port; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    log "port $port ($section) is taken: stop the host using it, or set BENCH_PORT_OFFSET (e.g. 10000)"
    exit 1
  fi
  case "$section" in
    admin) ADMIN_PORT=$port; continue ;;
    gateway) GATEWAY_PORT=$port ;;
    components.*) COMPONENTS="${COMPONENTS:+$COMPONENTS,}${section#components.}=http://127.0.0.1:$port/health" ;;
  esac
  HEALTH_URLS="${HEALTH_URLS:+$HEALTH_URLS,}http://127.0.0.1:$port/health"
done <"$WORK/ports"
[ -n "$GATEWAY_PORT" ] || { log "app.toml has no [gateway] port"; exit 1; }

log "starting the host (topics $RUN_ID.*, state in $WORK/state, log in $OUT/host.log)"
# `cargo run` as in `just run`: same profile and flags, and it execs the
# host in place, so $! is the host's pid. The admin API is on, for the hot
# swap, behind this run's own token.
# BENCH_HOST_PRELOAD=/path/lib.so preloads a library into the host alone
# (another malloc, for an A/B of allocators on the same build);
# BENCH_HOST_BIN=/path/to/a/host runs that build of the host instead (a copy
# of another commit's, for an A/B of two builds in turn), under any name.
HOST_CMD=(cargo run -q -p host --)
HOST_EXE=host
if [ -n "${BENCH_HOST_BIN:-}" ]; then
  HOST_CMD=("$BENCH_HOST_BIN")
  HOST_EXE="$(basename "$BENCH_HOST_BIN")"
fi
env -u HOST_MANIFEST HOST_ADMIN_TOKEN="$ADMIN_TOKEN" ${BENCH_HOST_PRELOAD:+LD_PRELOAD="$BENCH_HOST_PRELOAD"} \
  "${HOST_CMD[@]}" run --manifest "$MANIFEST" \
  >"$WORK/host.log" 2>&1 &
HOST_PID=$!

HEALTHY_MS="$("$BENCH" wait-healthy --pid "$HOST_PID" --exe-name "$HOST_EXE" --urls "$HEALTH_URLS" --out-dir "$OUT")"
BENCH_ADMIN_TOKEN="$ADMIN_TOKEN" "$BENCH" suite --host-pid "$HOST_PID" --gateway "http://127.0.0.1:$GATEWAY_PORT" \
  --orders-topic "$RUN_ID.orders" --components "$COMPONENTS" --admin-url "http://127.0.0.1:$ADMIN_PORT" \
  --swap-wasm "$TARGET/wasm32-wasip2/release/payment-v2.wasm" \
  --shadow-v2-wasm "$TARGET/wasm32-wasip2/release/payment-v2.wasm" \
  --shadow-trap-wasm "$TARGET/wasm32-wasip2/release/payment-trap.wasm" \
  --shadow-spin-wasm "$TARGET/wasm32-wasip2/release/payment-spin.wasm" \
  --healthy-ms "$HEALTHY_MS" --out-dir "$OUT" "$@"
if [ "$ONLY" = suite ]; then
  log "BENCH_ONLY=suite: stopping after the suite"
  exit 0
fi
# The email service in JavaScript serving instead of the Rust one: the same
# closed loop with each, swapped through the admin API (Rust again after).
BENCH_ADMIN_TOKEN="$ADMIN_TOKEN" "$BENCH" email-js-e2e --host-pid "$HOST_PID" \
  --gateway "http://127.0.0.1:$GATEWAY_PORT" --orders-topic "$RUN_ID.orders" --components "$COMPONENTS" \
  --admin-url "http://127.0.0.1:$ADMIN_PORT" --rust "$TARGET/wasm32-wasip2/release/email.wasm" \
  --js "$TARGET/wasm32-wasip2/release/email-js.wasm" --out-dir "$OUT"

# The rest runs without the host, which would compete for the machine.
stop_host
"$BENCH" physical --manifest "$MANIFEST" --prefix "$RUN_ID." --out-dir "$OUT"
"$BENCH" wasm --manifest "$MANIFEST" --out-dir "$OUT"
# The redb store alone, through the host's adapter, filling with 100,000
# orders' commits, handled ids pruned on a short horizon: size and commit
# rate every 10,000 orders (docs/performance.md, "The store as it grows").
"$BENCH" store --orders 100000 --out-dir "$OUT"
# Payment's throughput while the test component `misbehave` sleeps, spins,
# write-bombs, recurses or answers spinning queries beside it (no broker).
cargo build -q --release --target wasm32-wasip2 -p misbehave --lib
"$BENCH" isolation --manifest "$MANIFEST" --misbehave "$TARGET/wasm32-wasip2/release/misbehave.wasm" --out-dir "$OUT"
"$BENCH" email-js --manifest "$MANIFEST" --rust "$TARGET/wasm32-wasip2/release/email.wasm" \
  --js "$TARGET/wasm32-wasip2/release/email-js.wasm" --out-dir "$OUT"
# Hosts of its own, started from the host binary `cargo run` built above;
# it stops them, drops its schemas and deletes its topics itself, even on
# error or Ctrl-C.
scripts/postgres.sh start
DATABASE_URL="$(scripts/postgres.sh url)" "$BENCH" scale --manifest "$MANIFEST" --prefix "$RUN_ID." \
  --host-bin "$TARGET/debug/host" --out-dir "$OUT"
