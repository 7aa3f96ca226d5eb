#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft) on 127.0.0.1 for development and tests.
#
#   scripts/kafka.sh start   fetch Kafka from Maven Central once, start the broker (idempotent)
#   scripts/kafka.sh stop    stop the broker started here
#   scripts/kafka.sh status  exit 0 when the broker answers
#
# The configuration, the data and the log live under $KAFKA_HOME_DIR (default: .kafka/ in
# the repo), the jars under $KAFKA_LIB_DIR (default: in .kafka/), so that a second broker
# (tests that stop one) with its own KAFKA_HOME_DIR, KAFKA_PORT (default 9092) and
# KAFKA_CONTROLLER_PORT (default 9093) shares them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The newest 4.x that Maven Central serves here; KAFKA_VERSION=4.1.0 (or any
# 4.x) runs another. A data directory formatted by an older 4.x is served as
# is: its metadata.version stays until `kafka-features.sh upgrade` raises it.
KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
HOME_DIR="${KAFKA_HOME_DIR:-$ROOT/.kafka}"
PORT="${KAFKA_PORT:-9092}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
# Bump the suffix when the dependency list below changes, so that it is fetched again.
LIB="${KAFKA_LIB_DIR:-$ROOT/.kafka/lib-$KAFKA_VERSION-2}"
DATA="$HOME_DIR/data"
PIDFILE="$HOME_DIR/kafka.pid"
LOG="$HOME_DIR/kafka.log"

log() { echo "kafka.sh: $*" >&2; }

fetch() {
  if [ -f "$LIB/.complete" ]; then return; fi
  log "fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its dependencies from Maven Central"
  mkdir -p "$LIB" "$HOME_DIR"
  local pom="$HOME_DIR/pom.xml"
  cat >"$pom" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.shop</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>2.24.3</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>2.24.3</version>
    </dependency>
  </dependencies>
</project>
EOF
  mvn -q -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$LIB" -DincludeScope=runtime
  touch "$LIB/.complete"
}

running() {
  [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

answers() {
  # A TCP connect is enough to know the listener is up; readiness of the
  # controller quorum is checked by the metadata request in wait_ready.
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

wait_ready() {
  for _ in $(seq 1 120); do
    if answers; then
      if command -v kcat >/dev/null 2>&1; then
        if kcat -b "127.0.0.1:$PORT" -L -m 2 >/dev/null 2>&1; then return 0; fi
      else
        return 0
      fi
    fi
    if ! running; then
      log "broker exited during start; last lines of $LOG:"
      tail -n 30 "$LOG" >&2 || true
      return 1
    fi
    sleep 0.5
  done
  log "broker did not answer on 127.0.0.1:$PORT within 60 s"
  return 1
}

start() {
  if running; then
    log "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"
    wait_ready
    return
  fi
  fetch
  # 0700: the broker's log segments hold every event (customers' names and
  # addresses among them); a data directory from before is closed too.
  mkdir -p -m 0700 "$DATA"
  chmod 0700 "$DATA"
  local props="$HOME_DIR/server.properties"
  cat >"$props" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$DATA
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.retention.hours=168
EOF
  local cp="$LIB/*"
  # Kafka 4.1 to 4.4 log through slf4j 1.x: log4j-slf4j-impl binds it to log4j2,
  # whose default configuration prints to the console at log4j2.level.
  local java_opts=(-Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true -Dlog4j2.level=INFO)
  if [ ! -f "$DATA/meta.properties" ]; then
    log "formatting storage in $DATA"
    java "${java_opts[@]}" -cp "$cp" kafka.tools.StorageTool format \
      -t "shop-dev-cluster-0000001" -c "$props" --standalone >>"$LOG" 2>&1 ||
      java "${java_opts[@]}" -cp "$cp" kafka.tools.StorageTool format \
        -t "shop-dev-cluster-0000001" -c "$props" >>"$LOG" 2>&1
  fi
  log "starting Apache Kafka $KAFKA_VERSION (KRaft) on 127.0.0.1:$PORT, data in $DATA, log in $LOG"
  nohup java "${java_opts[@]}" -cp "$cp" kafka.Kafka "$props" >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  wait_ready
  log "ready on 127.0.0.1:$PORT"
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
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "broker did not stop within 30 s; killing it"
    kill -9 "$pid" || true
  fi
  rm -f "$PIDFILE"
  log "stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) running && answers ;;
  fetch) fetch ;;
  *)
    echo "usage: $0 start|stop|status|fetch" >&2
    exit 2
    ;;
esac
