#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster (queue_pg preloaded) and a redis-server, on non-default ports.
#
#   scripts/stack.sh up            # wipe QPG_HOME, initdb, start both, CREATE EXTENSION queue_pg
#   scripts/stack.sh down          # stop both (the data stays in QPG_HOME until the next up)
#   scripts/stack.sh redis-stop    # stop Redis only (fault tests)
#   scripts/stack.sh redis-start   # start Redis again, empty (no persistence)
#   scripts/stack.sh pg-stop       # stop PostgreSQL (fast shutdown)
#   scripts/stack.sh pg-kill       # stop PostgreSQL as a crash would (immediate shutdown)
#   scripts/stack.sh pg-start      # start PostgreSQL again
#   scripts/stack.sh pg-ensure     # start PostgreSQL unless it is running
#   scripts/stack.sh psql [args]   # psql into the cluster
#   scripts/stack.sh env           # the settings below, for `eval`
#   scripts/stack.sh redis-url     # the Redis URL the extension uses
#
# Settings (environment): QPG_HOME (default /tmp/queue_pg), QPG_PGPORT (15432),
# QPG_REDIS_PORT (16379), QPG_REDIS_PASSWORD (none), QPG_EXTRA_PRELOAD (none; more libraries for
# shared_preload_libraries, e.g. pg_stat_statements, which the tests use to measure the bridge).
# Every port the scripts use is below 32768, outside Linux's ephemeral range (32768-60999): a
# server restarted on an ephemeral port can find it taken by some client's outgoing connection
# and fail with "Address already in use".
set -euo pipefail

QPG_HOME=${QPG_HOME:-/tmp/queue_pg}
QPG_PGPORT=${QPG_PGPORT:-15432}
QPG_REDIS_PORT=${QPG_REDIS_PORT:-16379}
QPG_REDIS_PASSWORD=${QPG_REDIS_PASSWORD:-}
QPG_EXTRA_PRELOAD=${QPG_EXTRA_PRELOAD:-}
BIN=/usr/lib/postgresql/15/bin
PGDATA="$QPG_HOME/pgdata"

as_postgres() { runuser -u postgres -- "$@"; }

redis_url() {
    if [ -n "$QPG_REDIS_PASSWORD" ]; then
        echo "redis://:$QPG_REDIS_PASSWORD@127.0.0.1:$QPG_REDIS_PORT"
    else
        echo "redis://127.0.0.1:$QPG_REDIS_PORT"
    fi
}

redis_cli() {
    if [ -n "$QPG_REDIS_PASSWORD" ]; then
        REDISCLI_AUTH="$QPG_REDIS_PASSWORD" redis-cli -p "$QPG_REDIS_PORT" "$@"
    else
        redis-cli -p "$QPG_REDIS_PORT" "$@"
    fi
}

redis_start() {
    local auth=()
    [ -z "$QPG_REDIS_PASSWORD" ] || auth=(--requirepass "$QPG_REDIS_PASSWORD")
    redis-server --port "$QPG_REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
        --pidfile "$QPG_HOME/redis.pid" --logfile "$QPG_HOME/redis.log" --dir "$QPG_HOME" \
        --save '' --appendonly no "${auth[@]}"
    for _ in $(seq 100); do
        redis_cli ping 2>/dev/null | grep -q PONG && return 0
        sleep 0.05
    done
    echo "redis-server did not start; see $QPG_HOME/redis.log" >&2
    return 1
}

redis_stop() {
    local pid
    pid=$(cat "$QPG_HOME/redis.pid" 2>/dev/null || true)
    redis_cli shutdown nosave >/dev/null 2>&1 || true
    # Also by pid, in case it runs on another port than this environment says.
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        if ! redis_cli ping >/dev/null 2>&1 && { [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; }; then
            return 0
        fi
        sleep 0.05
    done
    echo "redis-server did not stop" >&2
    return 1
}

pg_start() { as_postgres "$BIN/pg_ctl" -D "$PGDATA" -l "$QPG_HOME/postgres.log" -w -t 120 start >/dev/null; }

pg_stop() {
    if [ -f "$PGDATA/postmaster.pid" ]; then
        as_postgres "$BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >/dev/null 2>&1 ||
            as_postgres "$BIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null
    fi
}

up() {
    pg_stop
    redis_stop
    rm -rf "$QPG_HOME"
    mkdir -p "$QPG_HOME"
    chown postgres: "$QPG_HOME"
    as_postgres "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust --no-sync >/dev/null
    cat >>"$PGDATA/postgresql.conf" <<CONF
port = $QPG_PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$QPG_HOME'
shared_preload_libraries = 'queue_pg${QPG_EXTRA_PRELOAD:+,$QPG_EXTRA_PRELOAD}'
queue.database = 'postgres'
queue.redis_url = '$(redis_url)'
max_connections = 200
shared_buffers = 256MB
max_wal_size = 4GB
log_line_prefix = '%m [%p] %b '
CONF
    # Every statement recorded, nested or not (the tests read the bridge's own statements).
    case "$QPG_EXTRA_PRELOAD" in
        *pg_stat_statements*) echo "pg_stat_statements.track = all" >>"$PGDATA/postgresql.conf" ;;
    esac
    redis_start
    pg_start
    psql_ -q -c "CREATE EXTENSION IF NOT EXISTS queue_pg"
    echo "postgres: port $QPG_PGPORT (psql -h $QPG_HOME -p $QPG_PGPORT -U postgres), redis: port $QPG_REDIS_PORT"
}

psql_() { psql -h "$QPG_HOME" -p "$QPG_PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }

case "${1:-}" in
    up) up ;;
    down) pg_stop; redis_stop ;;
    redis-stop) redis_stop ;;
    redis-start) redis_start ;;
    pg-stop) as_postgres "$BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null ;;
    pg-kill) as_postgres "$BIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null ;;
    pg-start) pg_start ;;
    pg-ensure) as_postgres "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null || pg_start ;;
    redis-cli) shift; redis_cli "$@" ;;
    psql) shift; psql_ "$@" ;;
    env) echo "QPG_HOME=$QPG_HOME QPG_PGPORT=$QPG_PGPORT QPG_REDIS_PORT=$QPG_REDIS_PORT" ;;
    redis-url) redis_url ;;
    *) sed -n '2,21p' "$0"; exit 2 ;;
esac
