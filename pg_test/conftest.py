"""End-to-end test harness: a real PostgreSQL 15 cluster with queue_pg preloaded and a real
redis-server, both started by scripts/stack.sh for the whole session and stopped at its end.

Tests talk to them the way users do: SQL through psycopg, Redis through redis-py.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
import redis as redis_py

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "scripts" / "stack.sh"
ENV = dict(
    os.environ,
    QPG_HOME=os.environ.get("QPG_TEST_HOME", "/tmp/queue_pg_test"),
    QPG_PGPORT=os.environ.get("QPG_TEST_PGPORT", "15442"),
    QPG_REDIS_PORT=os.environ.get("QPG_TEST_REDIS_PORT", "16389"),
    # test_schema measures the statements the bridge runs.
    QPG_EXTRA_PRELOAD="pg_stat_statements",
)
PREFIX = "queue_pg"


def stack(*args):
    subprocess.run([str(STACK), *args], env=ENV, check=True, stdout=subprocess.DEVNULL)


def dsn():
    return f"host={ENV['QPG_HOME']} port={ENV['QPG_PGPORT']} user=postgres dbname=postgres"


def connect(autocommit=True):
    return psycopg.connect(dsn(), autocommit=autocommit)


def redis_client():
    return redis_py.Redis(port=int(ENV["QPG_REDIS_PORT"]), decode_responses=True)


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Polls predicate until it returns a truthy value; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def list_key(queue, priority="normal"):
    return f"{PREFIX}:{{{queue}}}:{priority}"


def list_ids(r, queue, priority="normal"):
    """Ids of the messages waiting in one Redis list, oldest (next to pop) first."""
    return [json.loads(m)["id"] for m in reversed(r.lrange(list_key(queue, priority), 0, -1))]


def bridge_pid(db):
    row = db.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'queue_pg bridge'"
    ).fetchone()
    return row[0] if row else None


def applier_pid(db):
    """The pid of the report applier (the background worker that applies workers' reports)."""
    got = db.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'queue_pg reports'").fetchone()
    return got[0] if got else None


def report(r, queue, job_id, attempt, op, **fields):
    """A worker's report on the fast path: XADD to the queue's report stream."""
    entry = {"id": job_id, "attempt": attempt, "op": op}
    entry.update({k: v for k, v in fields.items() if v is not None})
    return r.xadd(f"{PREFIX}:{{{queue}}}:reports", entry)


def rejected(db, queue=None):
    """{reason: count} of the reports the applier dropped (in one queue, or all)."""
    rows = db.execute("SELECT reason, sum(count)::int FROM queue.rejected_reports "
                      "WHERE %s::text IS NULL OR queue_name = %s GROUP BY reason", (queue, queue)).fetchall()
    return dict(rows)


def reconnect_after_restart(timeout=30.0):
    """A connection once the cluster accepts them again (after a crash restart)."""

    def attempt():
        try:
            return connect()
        except psycopg.OperationalError:
            return None

    return wait_for(attempt, timeout=timeout, interval=0.2, what="postgres to accept connections")


def after_crash_restart(old_conn):
    """After a backend was killed: waits until the postmaster has thrown out every backend
    (old_conn dies with them) and accepts connections again; returns a fresh connection."""

    def old_is_dead():
        try:
            old_conn.execute("SELECT 1")
            return False
        except psycopg.Error:
            return True

    wait_for(old_is_dead, timeout=30, interval=0.05, what="the postmaster to restart the backends")
    return reconnect_after_restart()


def spawn_worker(mode, queue, out_file=None, **env):
    """Starts pg_test/worker_proc.py as a real process against the test stack."""
    import sys
    args = [sys.executable, str(Path(__file__).parent / "worker_proc.py"), mode, queue]
    if out_file:
        args.append(str(out_file))
    return subprocess.Popen(args, env=dict(ENV, **env), stdout=subprocess.PIPE, text=True)


def outbox_applied(db, timeout=10):
    """Waits until the bridge has applied every state change to Redis (and counted it)."""
    wait_for(lambda: db.execute("SELECT count(*) FROM queue.redis_outbox").fetchone()[0] == 0,
             timeout=timeout, what="the bridge to apply the Redis outbox")


def pop(r, queue, timeout=10):
    """A worker's BRPOP over the queue's three lists: the message, or None."""
    got = r.brpop([list_key(queue, p) for p in ("high", "normal", "low")], timeout=timeout)
    return json.loads(got[1]) if got else None


def set_config(db, **settings):
    """ALTER SYSTEM + reload, for settings the bridge reads (reset after each test)."""
    for name, value in settings.items():
        db.execute(f"ALTER SYSTEM SET queue.{name} = '{value}'")
    db.execute("SELECT pg_reload_conf()")
    time.sleep(0.2)


@pytest.fixture(scope="session")
def stack_up():
    stack("up")
    yield
    if not os.environ.get("QPG_KEEP_STACK"):
        stack("down")


@pytest.fixture
def db(stack_up):
    conn = reconnect_after_restart()
    yield conn
    conn.close()


@pytest.fixture
def r(stack_up):
    client = redis_client()
    yield client
    client.close()


def truncate_all(db):
    """Empties queue_pg's tables. The bridge's transactions lock these tables in other orders than
    TRUNCATE does, so the two can deadlock; a short lock_timeout makes TRUNCATE give way (before
    either side's deadlock check, which would abort the bridge's transaction) and try again."""
    for _ in range(100):
        try:
            with db.transaction():
                db.execute("SET LOCAL lock_timeout = '100ms'")
                db.execute("TRUNCATE queue.jobs, queue.queues, queue.redis_outbox, queue.stats, queue.rejected_reports RESTART IDENTITY")
            return
        except psycopg.errors.LockNotAvailable:
            time.sleep(0.05)
    raise AssertionError("could not TRUNCATE queue_pg's tables")


@pytest.fixture(autouse=True)
def clean_state(request, stack_up):
    """Every test starts from empty tables, an empty Redis, default settings, a running bridge."""
    # A test may leave Redis stopped or Postgres restarting: bring both back first.
    r = redis_client()
    try:
        r.ping()
        r.config_set("maxmemory", 0)
    except (redis_py.ConnectionError, redis_py.AuthenticationError, redis_py.ResponseError):
        stack("redis-stop")
        stack("redis-start")
    stack("pg-ensure")  # a test that failed between pg-kill and pg-start left it stopped
    db = reconnect_after_restart()
    db.execute("ALTER SYSTEM RESET ALL")
    db.execute("SELECT pg_reload_conf()")
    truncate_all(db)
    r.flushall()
    # The bridge would take the flush for Redis losing its data (its epoch key is gone) and, on
    # its next tick, dispatch again whatever a test has in Redis by then. The tables are empty,
    # so there is nothing to dispatch again: put the key back at once.
    r.set(f"{PREFIX}:bridge:epoch", "test")
    wait_for(lambda: bridge_pid(db), timeout=30, what="the bridge to run")
    wait_for(lambda: applier_pid(db), timeout=30, what="the report applier to run")
    db.close()
    r.close()
    yield
