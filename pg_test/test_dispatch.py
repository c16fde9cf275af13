"""Committed jobs reach Redis as the documented list entry; rolled-back ones never do."""

import json
import os
import re
import time

from conftest import connect, list_ids, list_key, wait_for

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def status_of(db, job_id):
    return db.execute("SELECT status FROM queue.jobs WHERE id = %s", (job_id,)).fetchone()[0]


def sentinel(db, r, queue="sentinel"):
    """Enqueues and waits for a job the bridge handles after everything committed before it.
    Once it arrived, the bridge has run at least one full cycle over what came before."""
    job_id = db.execute("SELECT queue.enqueue(%s, '{}')", (queue,)).fetchone()[0]
    wait_for(lambda: job_id in list_ids(r, queue), what="the sentinel job in Redis")
    r.delete(list_key(queue))


def test_committed_enqueue_arrives_as_spec_json(db, r):
    job_id = db.execute(
        """SELECT queue.enqueue('emails', '{"to": "a@example.com", "n": [1, 2]}')"""
    ).fetchone()[0]
    popped = r.brpop([list_key("emails", p) for p in ("high", "normal", "low")], timeout=5)
    assert popped is not None, "the job never reached Redis"
    key, raw = popped
    assert key == "queue_pg:{emails}:normal"
    message = json.loads(raw)
    assert set(message) == {"id", "queue", "priority", "payload", "attempt", "max_attempts", "enqueued_at"}
    assert message["id"] == job_id
    assert message["queue"] == "emails"
    assert message["priority"] == "normal"
    assert message["payload"] == {"to": "a@example.com", "n": [1, 2]}
    assert message["attempt"] == 1
    assert message["max_attempts"] == 5
    assert ISO_MS.match(message["enqueued_at"]), message["enqueued_at"]

    # Marked migrated in Postgres once Redis acknowledged; the job hash says so too.
    wait_for(lambda: status_of(db, job_id) == "migrated", what="status migrated")
    job_hash = r.hgetall(f"queue_pg:job:{job_id}")
    assert job_hash["status"] == "migrated"
    assert job_hash["queue"] == "emails"
    assert job_hash["attempt_count"] == "0"
    assert ISO_MS.match(job_hash["queued_at"])


def test_priorities_land_in_their_lists_and_high_pops_first(db, r):
    db.execute("SELECT queue.pause('mixed')")
    low = db.execute("SELECT queue.enqueue('mixed', '\"l\"', 'low')").fetchone()[0]
    normal = db.execute("SELECT queue.enqueue('mixed', '\"n\"', 'normal')").fetchone()[0]
    high = db.execute("SELECT queue.enqueue('mixed', '\"h\"', 'high')").fetchone()[0]
    db.execute("SELECT queue.resume('mixed')")
    wait_for(lambda: sum(r.llen(list_key("mixed", p)) for p in ("high", "normal", "low")) == 3,
             what="three jobs in Redis")
    assert list_ids(r, "mixed", "low") == [low]
    assert list_ids(r, "mixed", "normal") == [normal]
    assert list_ids(r, "mixed", "high") == [high]

    keys = [list_key("mixed", p) for p in ("high", "normal", "low")]
    order = [json.loads(r.brpop(keys, timeout=1)[1])["id"] for _ in range(3)]
    assert order == [high, normal, low]


def test_custom_priority_and_max_attempts_are_carried(db, r):
    db.execute("INSERT INTO queue.queues (queue_name, max_attempts) VALUES ('q7', 7)")
    from_queue = db.execute("SELECT queue.enqueue('q7', '{}')").fetchone()[0]
    explicit = db.execute("SELECT queue.enqueue('q7', '{}', 'low', 2)").fetchone()[0]
    wait_for(lambda: r.llen(list_key("q7", "normal")) == 1 and r.llen(list_key("q7", "low")) == 1)
    by_id = {json.loads(m)["id"]: json.loads(m) for p in ("normal", "low")
             for m in r.lrange(list_key("q7", p), 0, -1)}
    assert by_id[from_queue]["max_attempts"] == 7
    assert by_id[explicit]["max_attempts"] == 2
    assert by_id[explicit]["priority"] == "low"


def test_rollback_never_reaches_redis(db, r):
    with connect(autocommit=False) as tx:
        job_id = tx.execute("SELECT queue.enqueue('rolled', '{}')").fetchone()[0]
        tx.rollback()
    sentinel(db, r)
    assert r.llen(list_key("rolled")) == 0
    assert not r.exists(f"queue_pg:job:{job_id}")
    assert db.execute("SELECT count(*) FROM queue.jobs WHERE queue_name = 'rolled'").fetchone()[0] == 0


def test_savepoint_rollback_keeps_only_the_kept_job(db, r):
    with connect(autocommit=False) as tx:
        kept = tx.execute("SELECT queue.enqueue('sp', '\"kept\"')").fetchone()[0]
        tx.execute("SAVEPOINT s")
        dropped = tx.execute("SELECT queue.enqueue('sp', '\"dropped\"')").fetchone()[0]
        tx.execute("ROLLBACK TO SAVEPOINT s")
        tx.commit()
    wait_for(lambda: r.llen(list_key("sp")) >= 1, what="the kept job")
    sentinel(db, r)
    assert list_ids(r, "sp") == [kept]
    assert not r.exists(f"queue_pg:job:{dropped}")


def test_commit_wakes_the_bridge_without_waiting_for_the_poll(db, r):
    # With a 60 s poll interval, only the commit-time wake-up can deliver within the timeout.
    from conftest import set_config
    set_config(db, poll_interval="60s")
    sentinel(db, r)  # the bridge is now asleep with the long timeout
    # The long poll is in force: a queued row written by hand (nothing wakes the bridge) waits.
    db.execute("INSERT INTO queue.jobs (queue_name, payload, status, max_attempts) VALUES ('quiet', '1', 'queued', 5)")
    time.sleep(2)
    assert r.llen(list_key("quiet")) == 0, "the bridge polled: the test would prove nothing"
    start = time.monotonic()
    job_id = db.execute("SELECT queue.enqueue('wake', '{}')").fetchone()[0]
    wait_for(lambda: job_id in list_ids(r, "wake"), timeout=5, what="the job in Redis")
    assert time.monotonic() - start < 0.5


def test_future_run_at_is_held_back_then_arrives_when_due(db, r):
    job_id, run_at = db.execute(
        "SELECT queue.enqueue('later', '{}', run_at => now() + interval '2 seconds'), now() + interval '2 seconds'"
    ).fetchone()
    assert status_of(db, job_id) == "scheduled"
    time.sleep(1.0)
    assert r.llen(list_key("later")) == 0, "a scheduled job was dispatched before its run_at"
    wait_for(lambda: r.llen(list_key("later")) == 1, timeout=5, what="the scheduled job")
    arrived = db.execute("SELECT now()").fetchone()[0]
    assert arrived >= run_at
    assert list_ids(r, "later") == [job_id]
    assert status_of(db, job_id) == "migrated"


def test_enqueue_many_10000(db, r):
    ids = [row[0] for row in db.execute(
        "SELECT * FROM queue.enqueue_many('bulk', (SELECT jsonb_agg(jsonb_build_object('n', g)) FROM generate_series(1, 10000) g))"
    ).fetchall()]
    assert len(ids) == 10000
    assert ids == sorted(ids) and len(set(ids)) == 10000
    wait_for(lambda: db.execute("SELECT count(*) FROM queue.jobs WHERE status = 'migrated'").fetchone()[0] == 10000,
             timeout=30, what="10,000 jobs marked migrated")
    sentinel(db, r)  # one more full bridge cycle: anything pushed twice would show now
    messages = [json.loads(m) for m in reversed(r.lrange(list_key("bulk"), 0, -1))]
    assert [m["id"] for m in messages] == ids  # each once, and FIFO: oldest pops first
    assert [m["payload"]["n"] for m in messages] == list(range(1, 10001))


def test_paused_queue_keeps_jobs_in_postgres_until_resumed(db, r):
    db.execute("SELECT queue.pause('held')")
    ids = [db.execute("SELECT queue.enqueue('held', %s)", (f'{{"i": {i}}}',)).fetchone()[0] for i in range(5)]
    sentinel(db, r)
    assert r.llen(list_key("held")) == 0
    statuses = db.execute("SELECT DISTINCT status FROM queue.jobs WHERE queue_name = 'held'").fetchall()
    assert statuses == [("queued",)]
    db.execute("SELECT queue.resume('held')")
    wait_for(lambda: r.llen(list_key("held")) == 5, what="the resumed queue's jobs")
    assert list_ids(r, "held") == ids


def test_dedupe_key_returns_the_unfinished_job(db, r):
    first = db.execute("SELECT queue.enqueue('d', '1', dedupe_key => 'k')").fetchone()[0]
    again = db.execute("SELECT queue.enqueue('d', '2', dedupe_key => 'k')").fetchone()[0]
    other = db.execute("SELECT queue.enqueue('d', '3', dedupe_key => 'other')").fetchone()[0]
    assert again == first and other != first
    assert db.execute("SELECT count(*) FROM queue.jobs WHERE queue_name = 'd'").fetchone()[0] == 2
    # Once the job is finished, the key is free again.
    db.execute("UPDATE queue.jobs SET status = 'completed' WHERE id = %s", (first,))
    fresh = db.execute("SELECT queue.enqueue('d', '4', dedupe_key => 'k')").fetchone()[0]
    assert fresh not in (first, other)


def test_json_null_payload_is_valid(db, r):
    job_id = db.execute("SELECT queue.enqueue('nulls', 'null'::jsonb)").fetchone()[0]
    wait_for(lambda: r.llen(list_key("nulls")) == 1)
    message = json.loads(r.lindex(list_key("nulls"), 0))
    assert message["id"] == job_id and message["payload"] is None


def test_idle_bridge_sleeps(db, r):
    """With nothing to do the bridge waits on its latch instead of spinning."""
    from conftest import bridge_pid

    sentinel(db, r)
    pid = bridge_pid(db)

    def cpu_ticks():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = cpu_ticks()
    time.sleep(2)
    used = (cpu_ticks() - before) / os.sysconf("SC_CLK_TCK")
    assert used < 0.2, f"the idle bridge used {used:.2f} s of CPU in 2 s"


def test_a_paused_backlog_does_not_hold_up_other_queues(db, r):
    # The bridge reads queued jobs from the lowest id that became queued since its last cycle,
    # not from the start: the paused backlog below is not walked again for every later commit.
    db.execute("SELECT queue.pause('backlog')")
    backlog = [x[0] for x in db.execute("SELECT * FROM queue.enqueue_many('backlog', "
                                        "(SELECT jsonb_agg(g) FROM generate_series(1, 20000) g))")]
    assert len(backlog) == 20000
    small = [db.execute("SELECT queue.enqueue('small', %s)", (str(i),)).fetchone()[0] for i in range(50)]
    wait_for(lambda: r.llen(list_key("small")) == 50)
    assert list_ids(r, "small") == small
    assert r.llen(list_key("backlog")) == 0
    db.execute("SELECT queue.resume('backlog')")  # every id counts again, however low
    wait_for(lambda: r.llen(list_key("backlog")) == 20000, timeout=30)
    assert list_ids(r, "backlog") == backlog


def test_jobs_that_become_queued_again_below_the_scan_position_are_dispatched(db, r):
    dead = db.execute("SELECT queue.enqueue('again', '\"dead\"', max_attempts => 1)").fetchone()[0]
    later = db.execute("SELECT queue.enqueue('again', '\"scheduled\"', run_at => now() + interval '1 second')").fetchone()[0]
    wait_for(lambda: r.llen(list_key("again")) == 1)
    assert json.loads(r.rpop(list_key("again")))["id"] == dead
    db.execute("SELECT * FROM queue.start(%s)", (dead,))
    db.execute("SELECT queue.fail(%s, 'boom')", (dead,))
    newer = [db.execute("SELECT queue.enqueue('again', %s)", (str(i),)).fetchone()[0] for i in range(5)]
    wait_for(lambda: r.llen(list_key("again")) == 5)
    # Lower ids than everything dispatched since: a replayed job and a promoted scheduled job.
    db.execute("SELECT queue.replay_dead(%s)", (dead,))
    wait_for(lambda: r.llen(list_key("again")) == 7, timeout=5)
    assert sorted(list_ids(r, "again")) == sorted(newer + [dead, later])


def test_jobs_made_queued_by_hand_are_dispatched_by_the_periodic_sweep(db, r):
    db.execute("SELECT queue.enqueue('byhand', '1')")
    wait_for(lambda: r.llen(list_key("byhand")) == 1)
    # Not through the API: nothing tells the bridge; its sweep (every 10 s) finds the jobs, also
    # across a gap of a billion ids.
    insert = ("INSERT INTO queue.jobs (queue_name, payload, status, max_attempts) "
              "VALUES ('byhand', '2', 'queued', 5) RETURNING id")
    low = db.execute(insert).fetchone()[0]
    db.execute("SELECT setval('queue.jobs_id_seq', 1000000000)")
    high = db.execute(insert).fetchone()[0]
    wait_for(lambda: r.llen(list_key("byhand")) == 3, timeout=25, interval=0.2)
    # Both, once each (a sweep already under way, past `low`, finds `high` first).
    assert sorted(list_ids(r, "byhand")[1:]) == [low, high]
