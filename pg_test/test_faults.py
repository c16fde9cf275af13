"""Faults lose no job: Redis down at commit time, the bridge killed mid-drain."""

import json
import os
import signal
import time

from conftest import ENV, after_crash_restart, bridge_pid, list_key, set_config, stack, wait_for


def all_ids(r, queue):
    return [json.loads(m)["id"] for m in r.lrange(list_key(queue), 0, -1)]


def test_enqueue_works_without_redis_and_everything_arrives_once_it_is_back(db, r):
    stack("redis-stop")
    # (That enqueue never waits on Redis, even a frozen one, test_frozen_redis shows.)
    ids = [db.execute("SELECT queue.enqueue('offline', %s)", (f'{{"i": {i}}}',)).fetchone()[0]
           for i in range(1000)]
    assert len(set(ids)) == 1000
    time.sleep(1)  # the bridge tries, fails, and backs off meanwhile
    queued = db.execute("SELECT count(*) FROM queue.jobs WHERE status = 'queued'").fetchone()[0]
    assert queued == 1000

    stack("redis-start")
    wait_for(lambda: r.llen(list_key("offline")) >= 1000, timeout=30, what="1,000 jobs in Redis")
    # The restarted Redis is empty: the bridge must not take the jobs it just pushed for jobs
    # that Redis lost. Give it a few ticks to do so wrongly.
    time.sleep(2.5)
    got = all_ids(r, "offline")
    assert sorted(got) == sorted(ids), "each job exactly once"
    wait_for(lambda: db.execute("SELECT count(*) FROM queue.jobs WHERE status = 'migrated'").fetchone()[0] == 1000)


def test_redis_outage_is_logged_once_per_change(db, r):
    log = os.path.join(os.environ.get("QPG_TEST_HOME", "/tmp/queue_pg_test"), "postgres.log")
    size = os.path.getsize(log)
    stack("redis-stop")
    db.execute("SELECT queue.enqueue('o', '{}')")
    time.sleep(4)  # several reconnect attempts
    stack("redis-start")
    wait_for(lambda: r.llen(list_key("o")) == 1, timeout=15)
    time.sleep(0.5)  # the report applier reconnects on its own backoff
    with open(log) as f:
        f.seek(size)
        new = f.read()
    # Once per change by the bridge; the report applier, which holds a connection of its own,
    # notices the outage only if it reads meanwhile (it idles while no queue is known), and then
    # also once.
    url = f"Redis at redis://127.0.0.1:{ENV['QPG_REDIS_PORT']}"
    assert new.count(f"queue_pg bridge: {url} unreachable") == 1, new
    assert new.count(f"queue_pg bridge: {url} reachable again") == 1, new
    applier = (new.count(f"queue_pg reports: {url} unreachable"),
               new.count(f"queue_pg reports: {url} reachable again"))
    assert applier in ((0, 0), (1, 1)), new


def test_bridge_killed_mid_drain_restarts_and_every_job_arrives(db, r):
    set_config(db, batch_size=5)
    db.execute("SELECT queue.pause('crash')")
    ids = [row[0] for row in db.execute(
        "SELECT * FROM queue.enqueue_many('crash', (SELECT jsonb_agg(g) FROM generate_series(1, 10000) g))"
    ).fetchall()]
    pid = bridge_pid(db)
    db.execute("SELECT queue.resume('crash')")
    wait_for(lambda: r.llen(list_key("crash")) >= 1000, timeout=30, interval=0.001, what="the drain to be under way")
    os.kill(pid, signal.SIGKILL)
    in_flight = r.llen(list_key("crash"))
    print(f"killed the bridge with {in_flight} of 10000 jobs in Redis")
    assert in_flight < 10000, "the drain finished before the kill: the test proves nothing"

    # A killed backend makes the postmaster restart every process; then the bridge comes back.
    db = after_crash_restart(db)
    set_config(db, batch_size=500)
    wait_for(lambda: bridge_pid(db) not in (None, pid), timeout=30, what="a new bridge")
    wait_for(lambda: len(set(all_ids(r, "crash"))) == 10000, timeout=60, what="every job in Redis")
    assert set(all_ids(r, "crash")) == set(ids)
    wait_for(lambda: db.execute(
        "SELECT count(*) FROM queue.jobs WHERE queue_name = 'crash' AND status = 'migrated'").fetchone()[0] == 10000,
        timeout=30, what="every job marked migrated")
