"""The Redis outbox: rows have a real key, so a VACUUM FULL between the bridge's read and its
delete loses no Redis change; outcomes are counted while Redis is down, and only once."""

import json
import os
import signal
import time

from conftest import ENV, list_key, outbox_applied, pop, set_config, stack, wait_for

DLQ = "queue_pg:deadletter:queue"


def started_jobs(db, r, queue, n):
    """n jobs of `queue` with max_attempts 1, popped and started: running."""
    ids = [x[0] for x in db.execute(
        "SELECT * FROM queue.enqueue_many(%s, (SELECT jsonb_agg(g) FROM generate_series(1, %s) g), 'normal', 1)",
        (queue, n))]
    wait_for(lambda: r.llen(list_key(queue)) == n, what=f"{n} jobs of {queue} in Redis")
    for _ in range(n):
        assert db.execute("SELECT count(*) FROM queue.start(%s)", (pop(r, queue)["id"],)).fetchone()[0] == 1
    return ids


def test_vacuum_full_between_read_and_delete_loses_no_change(db, r):
    # Maintenance stays out of the way (it would wait on the frozen Redis first).
    set_config(db, redis_timeout="20s", poll_interval="1h")
    first = started_jobs(db, r, "vf", 20)
    second = started_jobs(db, r, "vf", 100)
    outbox_applied(db)
    # A fresh table with 10 dead tuples at its start: VACUUM FULL will move every live row 10
    # places forward, so rows read later sit where the rows the bridge read used to be.
    db.execute("TRUNCATE queue.redis_outbox")
    db.execute("""DO $$ BEGIN
        INSERT INTO queue.redis_outbox (job_id, event, status, queue_name)
        SELECT -g, 'state', 'running', 'junk' FROM generate_series(1, 10) g;
        DELETE FROM queue.redis_outbox WHERE job_id < 0; END $$""")
    pid = int(open(os.path.join(ENV["QPG_HOME"], "redis.pid")).read())
    os.kill(pid, signal.SIGSTOP)
    try:
        # One commit: the bridge reads these 20 rows, then waits on the frozen Redis to apply them.
        with db.transaction():
            for job_id in first:
                db.execute("SELECT queue.fail(%s, 'first')", (job_id,))
        time.sleep(1)
        # Rows the bridge has not read, committed while it waits.
        with db.transaction():
            for job_id in second:
                db.execute("SELECT queue.fail(%s, 'second')", (job_id,))
        moved_before = db.execute("SELECT count(*) FROM queue.redis_outbox").fetchone()[0]
        assert moved_before == 120
        db.execute("VACUUM FULL queue.redis_outbox")  # the bridge holds no lock: no wait
    finally:
        os.kill(pid, signal.SIGCONT)
    outbox_applied(db, timeout=30)
    entries = [json.loads(e) for e in r.lrange(DLQ, 0, -1)]
    assert sorted(e["id"] for e in entries) == sorted(first + second)
    for job_id in first + second:
        assert r.hget(f"queue_pg:job:{job_id}", "status") == "failed"
        assert r.ttl(f"queue_pg:job:{job_id}") > 0
        assert r.exists(f"queue_pg:deadletter:{job_id}")


def recent(db):
    return db.execute("SELECT queue.health()->'recent_jobs'").fetchone()[0]


def outcome_totals(db, queue):
    return db.execute("""SELECT completed_last_hour, retried_last_hour, failed_last_hour,
                                cancelled_last_hour, completed_total, retried_total, failed_total,
                                cancelled_total
                         FROM queue.metrics() WHERE queue_name = %s""", (queue,)).fetchone()


def test_outcomes_are_counted_while_redis_is_down_and_only_once(db, r):
    db.execute("INSERT INTO queue.queues (queue_name, max_attempts) VALUES ('oc', 2)")
    ids = started_jobs(db, r, "oc", 6)
    db.execute("UPDATE queue.jobs SET max_attempts = 2 WHERE id = ANY(%s)", (ids[4:],))
    outbox_applied(db)
    assert recent(db) == {"completed": 0, "failed": 0, "retried": 0, "window": "1 hour"}
    stack("redis-stop")
    try:
        db.execute("SELECT queue.complete(%s)", (ids[0],))
        db.execute("SELECT queue.complete(%s)", (ids[1],))
        db.execute("SELECT queue.fail(%s, 'dead')", (ids[2],))
        db.execute("SELECT queue.cancel(%s)", (ids[3],))
        db.execute("SELECT queue.fail(%s, 'again')", (ids[4],))
        expected = {"completed": 2, "failed": 1, "retried": 1, "window": "1 hour"}
        wait_for(lambda: recent(db) == expected, timeout=5, interval=0.2,
                 what="outcomes counted with Redis down")
        assert outcome_totals(db, "oc") == (2, 1, 1, 1, 2, 1, 1, 1)
        # Nothing reached Redis: the changes still wait in the outbox.
        assert db.execute("SELECT count(*) FROM queue.redis_outbox").fetchone()[0] == 5
    finally:
        stack("redis-start")
    r.set("queue_pg:bridge:epoch", "test")  # the restarted Redis is empty on purpose
    outbox_applied(db, timeout=30)
    assert r.hget(f"queue_pg:job:{ids[0]}", "status") == "completed"
    time.sleep(1.5)  # another maintenance pass: nothing counted again
    assert recent(db) == expected
    assert outcome_totals(db, "oc") == (2, 1, 1, 1, 2, 1, 1, 1)
