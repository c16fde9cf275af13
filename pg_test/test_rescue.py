"""Nothing is lost: dead workers, dropped messages, a Redis that lost its data."""

import json
import os
import signal
import time

from conftest import list_key, pop, set_config, spawn_worker, wait_for


def row(db, job_id, *cols):
    return db.execute(f"SELECT {', '.join(cols)} FROM queue.jobs WHERE id = %s", (job_id,)).fetchone()


def test_worker_killed_after_start_lease_expires_and_another_completes(db, r):
    db.execute("INSERT INTO queue.queues (queue_name, backoff_base) VALUES ('leased', '100 ms')")
    job_id = db.execute("SELECT queue.enqueue('leased', '{\"n\": 1}')").fetchone()[0]
    worker = spawn_worker("hold", "leased")  # pops, starts with a 1 s lease, then hangs
    assert int(worker.stdout.readline()) == job_id
    assert row(db, job_id, "status")[0] == "running"
    worker.send_signal(signal.SIGKILL)
    worker.wait()

    # Lease expiry counts as a failed attempt; after the backoff the job is dispatched again.
    msg = pop(r, "leased", timeout=10)
    assert msg is not None and msg["id"] == job_id and msg["attempt"] == 2
    status, attempts, errors = row(db, job_id, "status", "attempt_count", "errors")
    assert attempts == 1 and [e["error"] for e in errors] == ["lease expired"]
    got = db.execute("SELECT * FROM queue.start(%s)", (job_id,)).fetchone()
    assert got[3] == 2
    db.execute("SELECT queue.complete(%s, NULL, 2)", (job_id,))
    assert row(db, job_id, "status")[0] == "completed"


def test_popped_but_never_started_is_dispatched_again_after_start_timeout(db, r):
    set_config(db, start_timeout="1s")
    job_id = db.execute("SELECT queue.enqueue('dropped', '{}')").fetchone()[0]
    before_pop = time.time()
    worker = spawn_worker("pop-only", "dropped")  # pops and exits without starting
    assert int(worker.stdout.readline()) == job_id
    worker.wait()
    msg = pop(r, "dropped", timeout=10)
    assert msg is not None and msg["id"] == job_id
    assert time.time() - before_pop >= 1.0, "dispatched again before start_timeout"
    assert msg["attempt"] == 1, "a lost delivery is not an attempt"
    assert row(db, job_id, "attempt_count")[0] == 0
    assert db.execute("SELECT * FROM queue.start(%s)", (job_id,)).fetchone() is not None


def test_a_backlog_nobody_pops_is_never_dispatched_twice(db, r):
    set_config(db, start_timeout="1s")
    assert db.execute("SELECT count(*) FROM queue.enqueue_many('backlog', "
                      "(SELECT jsonb_agg(g) FROM generate_series(1, 5000) g))").fetchone()[0] == 5000
    wait_for(lambda: db.execute("SELECT count(*) FROM queue.jobs WHERE status = 'migrated'").fetchone()[0] == 5000,
             timeout=30)
    time.sleep(3.5)  # start_timeout and a few bridge ticks
    assert r.llen(list_key("backlog")) == 5000
    assert db.execute("SELECT count(*) FROM queue.jobs WHERE status = 'migrated'").fetchone()[0] == 5000
    assert db.execute("SELECT count(*) FROM queue.jobs WHERE dispatched_at > now() - interval '3 seconds'").fetchone()[0] == 0, \
        "a job was pushed again"


def test_flushall_with_1000_migrated_jobs_each_completes_exactly_once(db, r):
    ids = [x[0] for x in db.execute(
        "SELECT * FROM queue.enqueue_many('flushed', (SELECT jsonb_agg(g) FROM generate_series(1, 1000) g))").fetchall()]
    wait_for(lambda: db.execute("SELECT count(*) FROM queue.jobs WHERE status = 'migrated'").fetchone()[0] == 1000,
             timeout=30)
    r.flushall()
    wait_for(lambda: r.llen(list_key("flushed")) == 1000, timeout=15, what="every job dispatched again")
    log = open(os.path.join(os.environ.get("QPG_TEST_HOME", "/tmp/queue_pg_test"), "postgres.log")).read()
    # Well before start_timeout (60 s): the loss was noticed, and said (once per episode: an
    # earlier test's loss within the last minute may have said it already).
    assert "Redis lost data (an epoch key of the bridge is gone); dispatching again" in log

    started = []
    while (msg := pop(r, "flushed", timeout=1)) is not None:
        if db.execute("SELECT * FROM queue.start(%s)", (msg["id"],)).fetchone():
            started.append(msg["id"])
            db.execute("SELECT queue.complete(%s)", (msg["id"],))
    assert sorted(started) == ids
    assert db.execute("SELECT count(*) FROM queue.jobs WHERE status = 'completed'").fetchone()[0] == 1000


def test_completed_jobs_are_pruned_after_retention(db, r):
    db.execute("""
        INSERT INTO queue.jobs (queue_name, payload, status, max_attempts, completed_at)
        SELECT 'old', '{}', 'completed', 5, now() - interval '2 days' FROM generate_series(1, 12000)""")
    recent = db.execute("""
        INSERT INTO queue.jobs (queue_name, payload, status, max_attempts, completed_at)
        VALUES ('old', '{}', 'completed', 5, now()) RETURNING id""").fetchone()[0]
    # Bounded batches: 5,000 per bridge tick, so the 12,000 go over several ticks.
    wait_for(lambda: db.execute("SELECT count(*) FROM queue.jobs WHERE queue_name = 'old'").fetchone()[0] == 1,
             timeout=15, what="old completed jobs pruned")
    assert row(db, recent, "status")[0] == "completed"
