#!/usr/bin/env bash
# Local PostgreSQL on 127.0.0.1 for development and tests (Debian's postgresql package).
#
#   scripts/postgres.sh start   install the package if root, initdb once, start, create `shop` (idempotent)
#   scripts/postgres.sh stop    stop the server started here
#   scripts/postgres.sh status  exit 0 when the server answers
#   scripts/postgres.sh url     print the connection URL (postgres://postgres@127.0.0.1:PORT/shop)
#
# Everything lives under $PG_HOME_DIR (default: .postgres/ in the repo): the cluster in data/,
# the unix socket in run/, the log in postgres.log. Override the port with PG_PORT (default 5432)
# and the binaries with PG_BIN_DIR (default: the newest /usr/lib/postgresql/*/bin).
#
# PostgreSQL refuses to run as root, so as root the server runs as the `postgres` OS user (the
# package creates it; so does this script if it is missing), which must then be able to reach
# the data directory. When the default one is out of its reach (a repo under a 0700 home such
# as /root), the data goes to /tmp/shop-postgres-<uid> instead, and start says so.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${PG_PORT:-5432}"
DB=shop
URL="postgres://postgres@127.0.0.1:$PORT/$DB"

log() { echo "postgres.sh: $*" >&2; }
die() {
  log "$*"
  exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as the OS user that owns the cluster: `postgres` when we are root, else us.
# From / so that a working directory that user cannot enter does not trouble initdb or pg_ctl.
as_pg() {
  if is_root; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

newest_bin_dir() {
  local initdb
  initdb="$( (ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null || true) | sort -V | tail -n 1)"
  if [ -n "$initdb" ]; then dirname "$initdb"; fi
}

install_package() {
  if is_root && command -v apt-get >/dev/null 2>&1; then
    log "PostgreSQL is not installed; installing Debian's postgresql package"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
  else
    log "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb). Install it with"
    log "  sudo apt-get install postgresql"
    die "or point PG_BIN_DIR at a directory holding initdb, pg_ctl, pg_isready and psql"
  fi
}

# Sets BIN to the directory of the server binaries (empty when there are none). With
# `install`, installs them first if need be.
find_binaries() {
  if [ -n "${PG_BIN_DIR:-}" ]; then
    BIN="$PG_BIN_DIR"
    [ -x "$BIN/initdb" ] || die "PG_BIN_DIR=$BIN holds no initdb"
    return
  fi
  BIN="$(newest_bin_dir)"
  if [ -z "$BIN" ] && [ "${1:-}" = install ]; then
    install_package
    BIN="$(newest_bin_dir)"
    [ -n "$BIN" ] || die "the postgresql package is installed but /usr/lib/postgresql/*/bin/initdb is not there"
  fi
}

ensure_os_user() {
  is_root || return 0
  if ! id -u postgres >/dev/null 2>&1; then
    log "creating the system user postgres to run the server (PostgreSQL refuses to run as root)"
    useradd --system --user-group --no-create-home --home-dir /var/lib/postgresql \
      --shell /bin/bash --comment "PostgreSQL administrator" postgres
  fi
}

# Prints the first directory on the way to $1 that the postgres user cannot search, if any.
unreachable_dir() {
  local path="$1" prefix="" part
  local IFS=/
  for part in $path; do
    [ -n "$part" ] || continue
    prefix="$prefix/$part"
    [ -d "$prefix" ] || return 0
    if ! as_pg test -x "$prefix"; then
      echo "$prefix"
      return 0
    fi
  done
}

# Sets HOME_DIR, DATA, RUN and LOG. As root, makes sure the postgres user can reach them;
# with `verbose`, says so when it falls back to /tmp.
choose_home() {
  HOME_DIR="${PG_HOME_DIR:-$ROOT/.postgres}"
  if is_root; then
    local blocked
    blocked="$(unreachable_dir "$HOME_DIR")"
    if [ -n "$blocked" ]; then
      if [ -n "${PG_HOME_DIR:-}" ]; then
        die "the postgres user cannot reach PG_HOME_DIR=$HOME_DIR: $blocked is not searchable by it. Fix: chmod o+x $blocked, or choose another PG_HOME_DIR"
      fi
      local fallback
      fallback="/tmp/shop-postgres-$(id -u)"
      if [ "${1:-}" = verbose ]; then
        log "the postgres user cannot reach $HOME_DIR ($blocked is not searchable by it; chmod o+x $blocked fixes that); using $fallback instead"
      fi
      HOME_DIR="$fallback"
    fi
  fi
  # Absolute and free of symlinks: the server runs from / and is found by its working directory.
  HOME_DIR="$(realpath -m "$HOME_DIR")"
  DATA="$HOME_DIR/data"
  RUN="$HOME_DIR/run"
  LOG="$HOME_DIR/postgres.log"
}

prepare_home() {
  mkdir -p "$HOME_DIR"
  if is_root; then
    chown postgres:postgres "$HOME_DIR"
    chmod 0750 "$HOME_DIR"
  fi
  as_pg mkdir -p "$RUN"
  as_pg test -w "$RUN" || die "the server's user cannot write the socket directory $RUN"
  # pg_ctl appends to the log as the server's user: create it as that user.
  as_pg touch "$LOG"
}

init_cluster() {
  if [ -f "$DATA/PG_VERSION" ]; then return; fi
  log "initdb in $DATA ($("$BIN/postgres" --version))"
  as_pg "$BIN/initdb" -D "$DATA" -A trust -U postgres --encoding=UTF8 --locale=C >>"$LOG" 2>&1 || {
    tail -n 30 "$LOG" >&2 || true
    die "initdb failed; the whole output is in $LOG"
  }
  echo "include_if_exists = 'shop.conf'" | as_pg tee -a "$DATA/postgresql.conf" >/dev/null
}

# Written at every start, so PG_PORT and PG_HOME_DIR changes take effect.
write_settings() {
  as_pg tee "$DATA/shop.conf" >/dev/null <<EOF
# Written by scripts/postgres.sh at every start; edits here are overwritten.
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '${RUN//\'/\'\'}'
max_connections = 200
shared_buffers = 128MB
# Durability is what the tests exercise: never turn these off here.
fsync = on
synchronous_commit = on
full_page_writes = on
EOF
}

server_pid() {
  if [ -f "$DATA/postmaster.pid" ]; then head -n 1 "$DATA/postmaster.pid"; fi
}

zombie() {
  [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d ' ' -f 1)" = Z ]
}

running() {
  local pid
  pid="$(server_pid)"
  [ -n "$pid" ] && ! zombie "$pid" &&
    as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

# A killed server is normally no trouble: pg_ctl and the postmaster ignore a postmaster.pid
# whose process is gone. But where nothing reaps orphans (a container whose PID 1 is not an
# init), the killed postmaster stays a zombie, kill -0 still finds it, and the postmaster would
# refuse to start ("lock file ... already exists"). A zombie runs nothing: drop its lock files.
clear_zombie_locks() {
  local pid lock
  pid="$(server_pid)"
  if [ -z "$pid" ] || ! zombie "$pid"; then return; fi
  log "the server recorded in $DATA/postmaster.pid (pid $pid) was killed and nobody reaped it; removing its lock files"
  as_pg rm -f "$DATA/postmaster.pid"
  for lock in "$RUN"/.s.PGSQL.*.lock; do
    if [ -f "$lock" ] && [ "$(head -n 1 "$lock")" = "$pid" ]; then as_pg rm -f "$lock"; fi
  done
}

# Live server processes of this data directory: programs named postgres, run by the server's
# user, working in $DATA (the postmaster chdirs into it; its children inherit that).
server_processes() {
  local proc user
  user="$(if is_root; then echo postgres; else id -un; fi)"
  for proc in /proc/[0-9]*; do
    if [ "$(cat "$proc/comm" 2>/dev/null)" = postgres ] &&
      [ "$(stat -c %U "$proc" 2>/dev/null)" = "$user" ] &&
      [ "$(readlink "$proc/cwd" 2>/dev/null)" = "$DATA" ]; then
      echo "${proc#/proc/}"
    fi
  done
}

# After the postmaster was killed, a backend busy with a query keeps running until it next
# waits, and holds the old shared memory, so a new postmaster refuses to start ("pre-existing
# shared memory block ... is still in use"). Only called when no postmaster runs on $DATA:
# whatever still works in it is such an orphan. SIGQUIT is how the postmaster itself stops
# them at once.
stop_orphans() {
  local pids
  pids="$(server_processes | paste -sd ' ')"
  if [ -z "$pids" ]; then return; fi
  log "processes of the killed server still run in $DATA (pids $pids); stopping them"
  # shellcheck disable=SC2086 # one argument per pid
  kill -QUIT $pids 2>/dev/null || true
  for _ in $(seq 1 20); do
    if [ -z "$(server_processes)" ]; then return; fi
    sleep 0.25
  done
  pids="$(server_processes | paste -sd ' ')"
  # shellcheck disable=SC2086
  if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null || true; fi
  sleep 0.5
}

answers() {
  "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -t 2
}

wait_ready() {
  for _ in $(seq 1 60); do
    if answers; then return 0; fi
    sleep 0.5
  done
  die "the server did not answer on 127.0.0.1:$PORT within 30 s; see $LOG"
}

ensure_database() {
  local psql=("$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres)
  if [ -z "$("${psql[@]}" -tAc "select 1 from pg_database where datname = '$DB'")" ]; then
    log "creating database $DB"
    "${psql[@]}" -c "create database $DB"
  fi
}

start() {
  find_binaries install
  ensure_os_user
  choose_home verbose
  clear_zombie_locks
  if running; then
    log "already running on 127.0.0.1:$PORT, data in $DATA"
    wait_ready
    ensure_database
    return
  fi
  if answers; then
    die "something else already answers on 127.0.0.1:$PORT (Debian's own cluster? see pg_lsclusters); stop it or set PG_PORT"
  fi
  stop_orphans
  prepare_home
  init_cluster
  write_settings
  log "starting PostgreSQL on 127.0.0.1:$PORT, data in $DATA, log in $LOG"
  # pg_ctl clears a postmaster.pid left by a killed server itself; -w waits until it accepts.
  if ! as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start >/dev/null; then
    log "the server did not start; last lines of $LOG:"
    tail -n 30 "$LOG" >&2 || true
    exit 1
  fi
  wait_ready
  ensure_database
  log "ready: $URL"
}

stop() {
  find_binaries
  choose_home
  if [ -z "$BIN" ] || ! running; then
    log "not running"
    return
  fi
  as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null
  log "stopped"
}

status() {
  find_binaries
  choose_home
  [ -n "$BIN" ] && running && answers
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  url) echo "$URL" ;;
  *)
    echo "usage: $0 start|stop|status|url" >&2
    exit 2
    ;;
esac
