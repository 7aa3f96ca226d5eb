#!/usr/bin/env bash
# Runs the frontend and admin console tests in headless Chromium against a
# freshly started host on its own ports and topics (real broker when
# KAFKA_BROKERS is set). The console's screenshot is kept in $SCREENSHOT_DIR
# (default /tmp) as shop-console.png.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm install --no-audit --no-fund)
fi

WORK="$(mktemp -d)"
HOST_PID=""
cleanup() {
  if [ -n "$HOST_PID" ] && kill -0 "$HOST_PID" 2>/dev/null; then
    kill -TERM "$HOST_PID" && wait "$HOST_PID" || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

BASE=$((20000 + RANDOM % 20000))
PREFIX="browser-$(date +%s)-$RANDOM-"
sed -e "s|^port = 3005|port = $((BASE + 5))|" \
    -e "s|^port = 3001|port = $((BASE + 1))|" \
    -e "s|^port = 3002|port = $((BASE + 2))|" \
    -e "s|^port = 3003|port = $((BASE + 3))|" \
    -e "s|^port = 3004|port = $((BASE + 4))|" \
    -e "s|^topic_prefix = \"\"|topic_prefix = \"$PREFIX\"|" \
    -e "s|^wasm = \"target/|wasm = \"$ROOT/target/|" \
    -e "s|^stock = \"\\(.*\\)\"|stock = \"\\1,<b>bold</b>=0\"|" \
    app.toml >"$WORK/app.toml"
ADMIN_TOKEN="browser-$RANDOM-$RANDOM-$(date +%s%N)"
printf '\n[admin]\nport = %d\ntoken = "%s"\n' "$((BASE + 90))" "$ADMIN_TOKEN" >>"$WORK/app.toml"

"$ROOT/target/debug/host" run --manifest "$WORK/app.toml" >"$WORK/host.log" 2>&1 &
HOST_PID=$!
GATEWAY_URL="http://127.0.0.1:$((BASE + 5))"
ADMIN_URL="http://127.0.0.1:$((BASE + 90))"
SCREENSHOT_DIR="${SCREENSHOT_DIR:-/tmp}"
mkdir -p "$SCREENSHOT_DIR"
CONSOLE_SCREENSHOT="$(cd "$SCREENSHOT_DIR" && pwd)/shop-console.png"
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$((BASE + 2))/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$HOST_PID" 2>/dev/null; then cat "$WORK/host.log"; exit 1; fi
  sleep 0.5
done

cd tests/browser
if ! GATEWAY_URL="$GATEWAY_URL" ADMIN_URL="$ADMIN_URL" ADMIN_TOKEN="$ADMIN_TOKEN" \
  CONSOLE_SCREENSHOT="$CONSOLE_SCREENSHOT" ORDERS_TOPIC="${PREFIX}orders" node --test order.test.mjs console.test.mjs; then
  echo "--- host log ---"; tail -n 50 "$WORK/host.log"
  exit 1
fi
echo "console screenshot: $CONSOLE_SCREENSHOT"
