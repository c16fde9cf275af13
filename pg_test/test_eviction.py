"""Redis under memory pressure: keys evicted or deleted never strand a job, never start a storm of
dispatches, and health() says what it sees. The bridge tells which jobs a list still holds from
the list itself (its oldest entry and the push order), never from a counter Redis can lose."""

import json
import os
import subprocess
import sys
import time

import psycopg
import pytest

from conftest import ENV, PREFIX, ROOT, connect, list_key, set_config, wait_for
from test_health import health

PAYLOAD = {"body": "x" * 280}


def dispatched_total(db):
    return health(db)["bridge"]["dispatched_total"]


def enqueue(db, queue, n, payload=None):
    db.execute("SELECT queue.enqueue_many(%s, (SELECT jsonb_agg(%s::jsonb) FROM generate_series(1, %s)))",
               (queue, json.dumps(payload if payload is not None else {}), n))


def migrated(db, queue):
    return db.execute("SELECT count(*) FROM queue.jobs WHERE queue_name = %s AND status = 'migrated'",
                      (queue,)).fetchone()[0]


def ids_in(r, queue):
    return [json.loads(m)["id"] for m in r.lrange(list_key(queue), 0, -1)]


@pytest.fixture
def evicting(r):
    """The suite's Redis with `maxmemory-policy allkeys-lru` (maxmemory is reset by clean_state)."""
    r.config_set("maxmemory-policy", "allkeys-lru")
    yield r
    r.config_set("maxmemory", 0)
    r.config_set("maxmemory-policy", "noeviction")


@pytest.mark.parametrize("deleted", ["list", "list and epoch key"])
def test_a_deleted_list_is_dispatched_again_once_and_a_backlog_never(db, r, deleted):
    set_config(db, start_timeout="3s", poll_interval="200ms")
    enqueue(db, "lost", 1000)
    enqueue(db, "backlog", 5000)
    wait_for(lambda: migrated(db, "lost") == 1000 and migrated(db, "backlog") == 5000, timeout=30,
             what="6,000 jobs in Redis")
    backlog = sorted(ids_in(r, "backlog"))
    assert len(backlog) == 5000
    before = dispatched_total(db)
    r.delete(list_key("lost"))
    if deleted != "list":
        r.delete(f"{PREFIX}:bridge:epoch")
    # Postgres still places the 1,000 jobs in Redis; health shows the gap.
    q = health(db)["queues"]["lost"]
    assert (q["migrated"], q["normal"], q["missing"]) == (1000, 0, 1000), q
    lost_at = time.monotonic()
    wait_for(lambda: r.llen(list_key("lost")) == 1000, timeout=20, what="the 1,000 jobs pushed again")
    if deleted == "list":
        # Nothing said they were lost but the list itself: they come back after start_timeout
        # (a worker might have held them until then).
        assert time.monotonic() - lost_at >= 2.5, "dispatched again before start_timeout"
    # Each of the 1,000 is in its list once, pushed once more; the backlog nobody pops was
    # never pushed again.
    time.sleep(4)  # more than start_timeout: any further dispatch would show
    assert sorted(ids_in(r, "lost")) == list(range(1, 1001))
    assert sorted(ids_in(r, "backlog")) == backlog
    assert dispatched_total(db) - before == 1000
    q = health(db)["queues"]["lost"]
    assert (q["migrated"], q["normal"], q["missing"], q["stranded"]) == (1000, 1000, 0, 0), q


def test_health_names_jobs_stranded_past_start_timeout_until_they_are_back(db, r):
    set_config(db, start_timeout="2s", poll_interval="200ms")
    enqueue(db, "stuck", 300)
    wait_for(lambda: migrated(db, "stuck") == 300, timeout=20, what="300 jobs in Redis")
    assert health(db)["status"] == "healthy"
    r.delete(list_key("stuck"))
    # Another transaction holds the rows, so the bridge cannot dispatch them again.
    holder = connect(autocommit=False)
    try:
        holder.execute("SELECT id FROM queue.jobs WHERE queue_name = 'stuck' FOR UPDATE")

        def stranded():
            h = health(db)
            return h if h["queues"]["stuck"]["stranded"] == 300 else None
        h = wait_for(stranded, timeout=15, interval=0.2, what="health to name the stranded jobs")
        q = h["queues"]["stuck"]
        assert (q["status"], q["migrated"], q["missing"], q["normal"]) == ("degraded", 300, 300, 0), q
        assert h["status"] == "degraded"
        assert any("queue stuck: 300 jobs have been in no Redis list" in x for x in h["reasons"]), h["reasons"]
    finally:
        holder.rollback()
        holder.close()
    wait_for(lambda: r.llen(list_key("stuck")) == 300 and migrated(db, "stuck") == 300, timeout=15,
             what="the jobs pushed again and marked")
    wait_for(lambda: health(db)["status"] == "healthy", timeout=10, what="health back to healthy")
    q = health(db)["queues"]["stuck"]
    assert (q["status"], q["migrated"], q["missing"], q["stranded"]) == ("healthy", 300, 0, 0), q


def start_python_workers(n, queue):
    env = dict(os.environ,
               DATABASE_URL=f"postgresql://postgres@127.0.0.1:{ENV['QPG_PGPORT']}/postgres",
               REDIS_URL=f"redis://127.0.0.1:{ENV['QPG_REDIS_PORT']}", QUEUES=queue)
    procs = []
    for _ in range(n):
        proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "python" / "worker.py")],
                                env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", "a worker did not start"
        procs.append(proc)
    return procs


def test_allkeys_lru_4mb_30000_jobs_4_workers_all_complete_without_a_dispatch_storm(db, evicting):
    r = evicting
    set_config(db, start_timeout="5s", poll_interval="200ms")
    r.config_set("maxmemory", "4mb")
    before = dispatched_total(db)
    evicted_before = r.info("stats")["evicted_keys"]
    workers = start_python_workers(4, "pressed")
    started = time.monotonic()
    try:
        enqueue(db, "pressed", 30_000, PAYLOAD)

        def done():
            return db.execute("SELECT count(*) FROM queue.jobs WHERE queue_name = 'pressed' "
                              "AND status = 'completed'").fetchone()[0] == 30_000
        wait_for(done, timeout=300, interval=1, what="all 30,000 jobs completed")
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=30)
    took = time.monotonic() - started
    evicted = r.info("stats")["evicted_keys"] - evicted_before
    dispatched = dispatched_total(db) - before
    print(f"\n30,000 jobs under allkeys-lru, maxmemory 4mb, 4 Python workers: all completed in "
          f"{took:.0f} s; Redis evicted {evicted} keys; dispatched_total {dispatched} "
          f"({dispatched / 30_000:.2f} per job)")
    assert evicted > 0, "Redis evicted nothing: the test did not put it under pressure"
    assert dispatched <= 2 * 30_000, f"a dispatch storm: {dispatched} dispatches for 30,000 jobs"


def test_a_full_redis_keeps_jobs_in_postgres_until_it_has_room(db, r):
    # noeviction (the default): over 90 % of maxmemory the bridge pushes nothing more, which
    # keeps room for workers' reports; the jobs wait in Postgres, visibly.
    used = r.info("memory")["used_memory"]
    r.config_set("maxmemory", int(used / 0.95))
    time.sleep(1.5)  # without a maxmemory the bridge looks once a second
    try:
        enqueue(db, "roomless", 200)
        time.sleep(2)
        queued = db.execute("SELECT count(*) FROM queue.jobs WHERE queue_name = 'roomless' "
                            "AND status = 'queued'").fetchone()[0]
        assert (queued, r.llen(list_key("roomless"))) == (200, 0)
        log = open(os.path.join(ENV["QPG_HOME"], "postgres.log")).read()
        assert "Redis has no room for more jobs" in log
    finally:
        r.config_set("maxmemory", 0)
    wait_for(lambda: r.llen(list_key("roomless")) == 200 and migrated(db, "roomless") == 200, timeout=10,
             what="the jobs pushed and marked once there is room")
