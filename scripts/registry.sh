#!/usr/bin/env bash
# A schema registry with the Confluent-compatible REST API (Apicurio
# Registry, in-memory storage) on 127.0.0.1 for development and tests.
#
#   scripts/registry.sh start   fetch Apicurio Registry from Maven Central once, start it (idempotent)
#   scripts/registry.sh stop    stop the registry started here
#   scripts/registry.sh url     print the base URL of its Confluent-compatible API
#   scripts/registry.sh java    print the Java 21+ it runs on (exit 1 if there is none)
#
# Maven Central serves the registry's Quarkus distribution as a tar.gz
# (classifier `all`) of io.apicurio:apicurio-registry-app; it needs Java 21
# or newer (REGISTRY_JAVA, else the newest JDK under /usr/lib/jvm that is).
# Everything lives under $REGISTRY_HOME_DIR (default .registry/ in the repo);
# REGISTRY_PORT (default 8089) and REGISTRY_MANAGEMENT_PORT (default 8099).
# Nothing is kept across a restart: storage is in memory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${REGISTRY_VERSION:-3.3.3}"
HOME_DIR="${REGISTRY_HOME_DIR:-$ROOT/.registry}"
PORT="${REGISTRY_PORT:-8089}"
MANAGEMENT_PORT="${REGISTRY_MANAGEMENT_PORT:-8099}"
DIST="$HOME_DIR/apicurio-registry-$VERSION"
PIDFILE="$HOME_DIR/registry.pid"
LOG="$HOME_DIR/registry.log"
URL="http://127.0.0.1:$PORT/apis/ccompat/v7"

log() { echo "registry.sh: $*" >&2; }

fetch() {
  if [ -f "$DIST/.complete" ]; then return; fi
  log "fetching io.apicurio:apicurio-registry-app:$VERSION (tar.gz, classifier all, ~160 MB) from Maven Central"
  mkdir -p "$HOME_DIR/download" "$DIST"
  mvn -q -B -Dmaven.repo.local="$HOME_DIR/m2" org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy \
    -Dartifact="io.apicurio:apicurio-registry-app:$VERSION:tar.gz:all" -DoutputDirectory="$HOME_DIR/download"
  tar xzf "$HOME_DIR/download/apicurio-registry-app-$VERSION-all.tar.gz" -C "$DIST"
  rm -rf "$HOME_DIR/m2" "$HOME_DIR/download"
  touch "$DIST/.complete"
}

# A java of version 21 or newer.
java_bin() {
  local candidates=("${REGISTRY_JAVA:-}" "$(command -v java || true)")
  for dir in $(ls -d /usr/lib/jvm/*/ 2>/dev/null | sort -rV); do candidates+=("${dir%/}/bin/java"); done
  for java in "${candidates[@]}"; do
    [ -n "$java" ] && [ -x "$java" ] || continue
    local major
    major="$("$java" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)"
    if [ -n "$major" ] && [ "$major" -ge 21 ]; then
      echo "$java"
      return 0
    fi
  done
  log "Apicurio Registry $VERSION needs Java 21 or newer; none found (set REGISTRY_JAVA)"
  return 1
}

running() {
  [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

answers() {
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/subjects")" = 200 ]
}

wait_ready() {
  for _ in $(seq 1 240); do
    if answers; then return 0; fi
    if ! running; then
      log "registry exited during start; last lines of $LOG:"
      tail -n 30 "$LOG" >&2 || true
      return 1
    fi
    sleep 0.5
  done
  log "registry did not answer on $URL within 120 s"
  return 1
}

start() {
  if running; then
    log "already running (pid $(cat "$PIDFILE")) on $URL"
    wait_ready
    return
  fi
  fetch
  local java
  java="$(java_bin)"
  log "starting Apicurio Registry $VERSION on $URL (log in $LOG)"
  (
    # On a line of its own: `cd && java &` would put the subshell, not
    # java, in the background, and $! would be the subshell's.
    cd "$DIST"
    nohup "$java" -Xmx512m -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$PORT" \
      -Dquarkus.management.host=127.0.0.1 -Dquarkus.management.port="$MANAGEMENT_PORT" \
      -jar quarkus-run.jar >"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
  )
  wait_ready
  log "ready on $URL"
}

stop() {
  if ! running; then
    log "not running"
    rm -f "$PIDFILE"
    return
  fi
  local pid
  pid="$(cat "$PIDFILE")"
  kill "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url) echo "$URL" ;;
  java) java_bin ;;
  *)
    echo "usage: $0 start|stop|url|java" >&2
    exit 2
    ;;
esac
