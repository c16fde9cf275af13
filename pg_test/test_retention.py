"""Retention: completed, dead and cancelled jobs older than their retention (the queue's own, else
the queue.*_retention setting) leave queue.jobs, a dead job's Redis dead-letter entry and marker
with it; younger ones and every unfinished job stay."""

import json

from conftest import outbox_applied, pop, set_config, wait_for

DLQ = "queue_pg:deadletter:queue"


def pop_job(r, queue, job_id):
    """Pops until the message of `job_id` (a cancelled job's message may still be in the list)."""
    for _ in range(10):
        if pop(r, queue)["id"] == job_id:
            return
    raise AssertionError(f"job {job_id} never arrived")


def dead_job(db, r, queue):
    job_id = db.execute("SELECT queue.enqueue(%s, '{}', max_attempts => 1)", (queue,)).fetchone()[0]
    pop_job(r, queue, job_id)
    db.execute("SELECT * FROM queue.start(%s)", (job_id,))
    db.execute("SELECT queue.fail(%s, 'fatal')", (job_id,))
    return job_id


def finished_job(db, r, queue, how):
    if how == "dead":
        return dead_job(db, r, queue)
    job_id = db.execute("SELECT queue.enqueue(%s, '{}')", (queue,)).fetchone()[0]
    if how == "cancelled":
        db.execute("SELECT queue.cancel(%s)", (job_id,))
    else:
        pop_job(r, queue, job_id)
        db.execute("SELECT * FROM queue.start(%s)", (job_id,))
        db.execute("SELECT queue.complete(%s)", (job_id,))
    return job_id


def age(db, job_id, days):
    """Makes a finished job look `days` old, by the column its retention counts from."""
    db.execute("""UPDATE queue.jobs SET completed_at = completed_at - %s * interval '1 day',
                         failed_at = failed_at - %s * interval '1 day',
                         updated_at = updated_at - %s * interval '1 day'
                  WHERE id = %s""", (days, days, days, job_id))


def exists(db, job_id):
    return db.execute("SELECT count(*) FROM queue.jobs WHERE id = %s", (job_id,)).fetchone()[0] == 1


def test_finished_jobs_past_their_retention_are_pruned_with_their_redis_entries(db, r):
    # Defaults: completed 1 day, dead 30 days, cancelled 7 days.
    jobs = {}
    for how, old, young in [("completed", 2, 0.5), ("dead", 31, 29), ("cancelled", 8, 6)]:
        jobs[how] = (finished_job(db, r, "ret", how), finished_job(db, r, "ret", how))
    outbox_applied(db)
    wait_for(lambda: r.llen(DLQ) == 2, what="both dead jobs' dead-letter entries")
    # Unfinished jobs, however old, stay.
    waiting = db.execute("SELECT queue.enqueue('ret', '{}', run_at => now() + interval '1 day')").fetchone()[0]
    db.execute("UPDATE queue.jobs SET created_at = now() - interval '400 days', "
               "updated_at = now() - interval '400 days' WHERE id = %s", (waiting,))
    for how, (old, young), (old_days, young_days) in zip(
            jobs, jobs.values(), [(2, 0.5), (31, 29), (8, 6)]):
        age(db, old, old_days)
        age(db, young, young_days)
    gone = [old for old, _ in jobs.values()]
    wait_for(lambda: not any(exists(db, j) for j in gone), what="the old finished jobs pruned")
    assert all(exists(db, young) for _, young in jobs.values())
    assert exists(db, waiting)
    # The pruned dead job's Redis entry and marker went with it; the young one's stayed.
    old_dead, young_dead = jobs["dead"]
    wait_for(lambda: r.llen(DLQ) == 1, what="the pruned dead job's dead-letter entry removed")
    assert json.loads(r.lindex(DLQ, 0))["id"] == young_dead
    assert not r.exists(f"queue_pg:deadletter:{old_dead}")
    assert r.get(f"queue_pg:deadletter:{young_dead}") == "moved"
    # Pruning is no outcome: the dead job was counted once, when it died.
    outbox_applied(db)
    assert db.execute("SELECT sum(failed)::int FROM queue.stats WHERE queue_name = 'ret'").fetchone()[0] == 2


def test_per_queue_retention_overrides_the_settings(db, r):
    set_config(db, dead_retention="1h", cancelled_retention="1h")
    db.execute("""INSERT INTO queue.queues (queue_name, dead_retention, cancelled_retention, completed_retention)
                  VALUES ('keep', '100 days', '100 days', '100 days'), ('drop', NULL, '1 minute', '0')""")
    keep = [finished_job(db, r, "keep", how) for how in ("dead", "cancelled", "completed")]
    drop_dead = dead_job(db, r, "drop")
    drop_cancelled = finished_job(db, r, "drop", "cancelled")
    drop_completed = finished_job(db, r, "drop", "completed")
    for job_id in keep + [drop_dead, drop_cancelled]:
        age(db, job_id, 2)
    # keep: 2 days old, under its own 100 days; drop: its dead job over the setting's hour, its
    # cancelled job over its own minute, its completed job over its own 0.
    wait_for(lambda: not any(exists(db, j) for j in (drop_dead, drop_cancelled, drop_completed)),
             what="drop's jobs pruned")
    assert all(exists(db, j) for j in keep)
