#!/usr/bin/env bash
# Interop with clients we did not write: the official CloudEvents SDK for
# Python publishes OrderPlaced events (binary and structured mode) to a
# freshly started host and reads every event of their sagas back, each
# parsed by the SDK and its data validated against schemas/ with
# `jsonschema` (tests/interop/cloudevents_sdk.py says what is checked).
# Real broker: KAFKA_BROKERS (default 127.0.0.1:9092).
#
# The Python packages are installed once, pinned, into .venv-tools/interop
# (or $TOOLS_DIR/interop); needs python3 with venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PACKAGES=(cloudevents==2.2.0 jsonschema==4.26.0 confluent-kafka==2.16.2)
VENV="${TOOLS_DIR:-$ROOT/.venv-tools}/interop"
# shellcheck source=scripts/venv.sh
. "$ROOT/scripts/venv.sh"
venv_install "$VENV" "${PACKAGES[@]}"

# shellcheck source=scripts/test-host.sh
. "$ROOT/scripts/test-host.sh"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
test_host_manifest interop
test_host_start

status=0
TOPIC_PREFIX="$PREFIX" SCHEMAS_DIR="$ROOT/schemas" "$VENV/bin/python" tests/interop/cloudevents_sdk.py || status=$?
if [ "$status" -ne 0 ]; then
  echo "interop-test: failed; the host's log:" >&2
  tail -n 40 "$WORK/host.log" >&2
fi
exit "$status"
