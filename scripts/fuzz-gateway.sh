#!/usr/bin/env bash
# Property-based fuzzing of the gateway against its own OpenAPI document
# (GET /openapi.json) with schemathesis, on a freshly started host with its
# own ports and topic prefix on a real broker (KAFKA_BROKERS, default
# 127.0.0.1:9092). Fails on any server error (5xx), any response that breaks
# its documented schema, and any undocumented status code.
#
#   FUZZ_EXAMPLES   test cases per operation and phase (default 300)
#   FUZZ_SEED       schemathesis seed (default: random, printed)
#
# schemathesis is installed once, pinned, into .venv-tools/schemathesis
# (or $TOOLS_DIR/schemathesis); needs python3 with venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SCHEMATHESIS_VERSION=4.32.5
VENV="${TOOLS_DIR:-$ROOT/.venv-tools}/schemathesis"
# shellcheck source=scripts/venv.sh
. "$ROOT/scripts/venv.sh"
venv_install "$VENV" "schemathesis==$SCHEMATHESIS_VERSION"

# shellcheck source=scripts/test-host.sh
. "$ROOT/scripts/test-host.sh"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
test_host_manifest fuzz
test_host_start

SEED="${FUZZ_SEED:-$RANDOM}"
echo "fuzz-gateway: $GATEWAY_URL, seed $SEED, ${FUZZ_EXAMPLES:-300} examples per operation"
status=0
"$VENV/bin/schemathesis" run "$GATEWAY_URL/openapi.json" \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance \
  --mode all \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "${FUZZ_EXAMPLES:-300}" \
  --seed "$SEED" \
  --workers 2 \
  --request-timeout 20 \
  --continue-on-failure \
  --no-color || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- host log (last 50 lines) ---"; tail -n 50 "$WORK/host.log"
  exit "$status"
fi
if grep -q "panicked" "$WORK/host.log"; then
  echo "fuzz-gateway: the host panicked:"; grep -m5 "panicked" "$WORK/host.log"
  exit 1
fi
echo "fuzz-gateway: ok"
