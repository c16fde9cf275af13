#!/usr/bin/env bash
# Benchmarks, each against a baseline doing the same work in the same run; prints ratios.
#
#   bench/run.sh                 # all: enqueue vs bare INSERT, commit-to-Redis latency, drain,
#                                # monitoring at 1,000,000 rows,
#                                # and the full job lifecycle against graphile-worker (Node.js)
#   bench/run.sh --seconds 5     # shorter pgbench runs
#   bench/run.sh --only drain    # one of: enqueue, latency, drain, cluster, monitoring
#                                # (skips the lifecycle part)
#
# Uses its own throwaway cluster and Redis (ports 15462 / 16409, a Redis Cluster on 15530-15532),
# stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

export QPG_HOME=${QPG_BENCH_HOME:-/tmp/queue_pg_bench} QPG_PGPORT=${QPG_BENCH_PGPORT:-15462} QPG_REDIS_PORT=${QPG_BENCH_REDIS_PORT:-16409}

scripts/setup.sh
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import psycopg, redis" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r pg_test/requirements.txt
fi
scripts/stack.sh up
trap 'scripts/stack.sh down' EXIT
.venv/bin/python bench/bench.py "$@"
case " $* " in
    *" --only "*) ;;
    *)
        (cd bench/lifecycle && npm ci --no-audit --no-fund --loglevel=error >/dev/null &&
            node bench.js 2>&1 | grep -v "error handlers")
        ;;
esac
