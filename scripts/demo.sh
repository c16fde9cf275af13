#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), starts a throwaway PostgreSQL 15 with queue_pg preloaded
# and a local redis-server (scripts/stack.sh), and walks through the life of some jobs:
# enqueue from SQL, watch the bridge move them into Redis, pop, start, complete and fail them
# like a worker would, see the backoff and the dead-letter queue, replay a dead job, and print
# queue.health().
# Stops what it started at the end; QPG_KEEP=1 leaves both running for you to explore.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
export QPG_HOME=${QPG_HOME:-/tmp/queue_pg_demo} QPG_PGPORT=${QPG_PGPORT:-15452} QPG_REDIS_PORT=${QPG_REDIS_PORT:-16399}
scripts/stack.sh up
if [ -z "${QPG_KEEP:-}" ]; then trap 'scripts/stack.sh down' EXIT; fi

sql() { scripts/stack.sh psql -X "$@"; }
rcli() { scripts/stack.sh redis-cli "$@"; }
step() { printf '\n\033[1;34m-- %s\033[0m\n' "$*"; }

step "Enqueue jobs from SQL, inside a transaction (nothing reaches Redis before COMMIT)"
sql -c "BEGIN;
SELECT queue.enqueue('emails', '{\"to\": \"ada@example.com\", \"template\": \"welcome\"}') AS welcome_job;
SELECT queue.enqueue('emails', '{\"to\": \"ops@example.com\", \"template\": \"alert\"}', 'high') AS urgent_job;
SELECT count(*) AS ids FROM queue.enqueue_many('thumbnails', '[{\"img\": 1}, {\"img\": 2}, {\"img\": 3}]');
SELECT queue.enqueue('reports', '{\"month\": \"2026-11\"}', run_at => now() + interval '2 seconds') AS scheduled_job;
COMMIT;"

step "A rolled-back enqueue never reaches Redis"
sql -c "BEGIN; SELECT queue.enqueue('emails', '{\"to\": \"nobody\"}'); ROLLBACK;"

sleep 0.5
step "The bridge moved the committed jobs to Redis and marked them migrated"
sql -c "SELECT id, queue_name, priority, status, run_at > now() AS in_future FROM queue.jobs ORDER BY id;"
for key in 'queue_pg:{emails}:high' 'queue_pg:{emails}:normal' 'queue_pg:{thumbnails}:normal'; do
    echo "LRANGE $key:"
    rcli lrange "$key" 0 -1 | sed 's/^/    /'
done

step "A worker pops the next email job (high before normal)"
rcli brpop 'queue_pg:{emails}:high' 'queue_pg:{emails}:normal' 'queue_pg:{emails}:low' 1 | sed 's/^/    /'

step "The scheduled report arrives once it is due"
sleep 2.2
rcli lrange 'queue_pg:{reports}:normal' 0 -1 | sed 's/^/    /'
sql -c "SELECT id, queue_name, status FROM queue.jobs WHERE queue_name = 'reports';"

step "Pause a queue: it keeps accepting jobs, the bridge holds them back"
sql -c "SELECT queue.pause('thumbnails'); SELECT queue.enqueue('thumbnails', '{\"img\": 4}');" >/dev/null
sleep 0.3
sql -c "SELECT id, status FROM queue.jobs WHERE queue_name = 'thumbnails' ORDER BY id;"
sql -c "SELECT queue.resume('thumbnails');" >/dev/null
sleep 0.3
echo "after resume: $(rcli llen 'queue_pg:{thumbnails}:normal') jobs in queue_pg:{thumbnails}:normal"

step "A worker starts the popped job and completes it"
sql -c "SELECT id, queue_name, attempt, lease_expires_at > now() AS leased FROM queue.start(2);" \
    -c "SELECT queue.complete(2, '{\"sent\": true}', 1);" -c "SELECT id, status, result FROM queue.jobs WHERE id = 2;"

step "Another job fails: retried after the backoff (2 s for the first retry)"
job=$(rcli rpop 'queue_pg:{emails}:normal' | sed 's/^{"id":\([0-9]*\),.*/\1/')
sql -c "SELECT * FROM queue.start($job);" >/dev/null
sql -c "SELECT queue.fail($job, 'SMTP timeout', 1);"
sql -c "SELECT id, status, attempt_count, round(extract(epoch FROM run_at - now())) AS retry_in_s, last_error_message FROM queue.jobs WHERE id = $job;"

step "A job with max_attempts 1 fails for good: the dead-letter queue"
dead=$(sql -Atc "SELECT queue.enqueue('reports', '{\"month\": \"broken\"}', max_attempts => 1);")
sleep 0.3
rcli rpop 'queue_pg:{reports}:normal' >/dev/null
sql -c "SELECT * FROM queue.start($dead);" >/dev/null
sql -c "SELECT queue.fail($dead, 'template missing');"
sleep 0.3
sql -c "SELECT id, queue_name, error, attempt_count FROM queue.dead_letters;"
echo "LRANGE queue_pg:deadletter:queue:"; rcli lrange 'queue_pg:deadletter:queue' 0 -1 | sed 's/^/    /'
sql -c "SELECT queue.replay_dead($dead);"
sleep 0.3
echo "after replay: dead letters $(rcli llen 'queue_pg:deadletter:queue'), job $dead is $(sql -Atc "SELECT status FROM queue.jobs WHERE id = $dead")"

step "queue.health(): Redis, the queues on both sides, recent outcomes, dead letters, the bridge"
sql -Atc "SELECT jsonb_pretty(queue.health());"

if [ -n "${QPG_KEEP:-}" ]; then
    cat <<EOF

Still running. The example workers (examples/) read these; paste them into your shell:

    export DATABASE_URL='postgresql://postgres@127.0.0.1:$QPG_PGPORT/postgres'
    export REDIS_URL='$(scripts/stack.sh redis-url)'
    export QUEUES='emails,thumbnails,reports'

then run a worker, e.g. (after pip install -r examples/python/requirements.txt):
    python3 examples/python/worker.py
psql:  QPG_HOME=$QPG_HOME QPG_PGPORT=$QPG_PGPORT scripts/stack.sh psql
stop:  QPG_HOME=$QPG_HOME QPG_PGPORT=$QPG_PGPORT QPG_REDIS_PORT=$QPG_REDIS_PORT scripts/stack.sh down
EOF
fi
