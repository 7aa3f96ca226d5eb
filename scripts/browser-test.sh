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

# shellcheck source=scripts/test-host.sh
. "$ROOT/scripts/test-host.sh"
test_host_manifest browser -e "s|^stock = \"\\(.*\\)\"|stock = \"\\1,<b>bold</b>=0\"|" \
  -e "s#^catalog = \"\\(.*\\)\"#catalog = \"\\1; <b>bold</b> | <i>Bold</i> | 100\"#"
ADMIN_TOKEN="browser-$RANDOM-$RANDOM-$(date +%s%N)"
printf '\n[admin]\nport = %d\ntoken = "%s"\n' "$((BASE + 90))" "$ADMIN_TOKEN" >>"$WORK/app.toml"

test_host_start
# The console lists every component of the manifest, by name.
COMPONENTS="$(scripts/services.sh --manifest "$WORK/app.toml" names | sort | paste -sd, -)"
ADMIN_URL="http://127.0.0.1:$((BASE + 90))"
SCREENSHOT_DIR="${SCREENSHOT_DIR:-/tmp}"
mkdir -p "$SCREENSHOT_DIR"
CONSOLE_SCREENSHOT="$(cd "$SCREENSHOT_DIR" && pwd)/shop-console.png"

cd tests/browser
if ! GATEWAY_URL="$GATEWAY_URL" ADMIN_URL="$ADMIN_URL" ADMIN_TOKEN="$ADMIN_TOKEN" \
  CONSOLE_SCREENSHOT="$CONSOLE_SCREENSHOT" ORDERS_TOPIC="${PREFIX}orders" COMPONENTS="$COMPONENTS" node --test order.test.mjs console.test.mjs; then
  echo "--- host log ---"; tail -n 50 "$WORK/host.log"
  exit 1
fi
echo "console screenshot: $CONSOLE_SCREENSHOT"
