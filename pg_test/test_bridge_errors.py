"""An error is never read as a value: a row the bridge cannot decode, or a statement of the bridge
that fails, is an error in the log and in queue.health(), never a push of a made-up job."""

import os

from conftest import ENV, list_key, outbox_applied, wait_for

LOG = os.path.join(ENV["QPG_HOME"], "postgres.log")


def log_size():
    return os.path.getsize(LOG)


def log_since(offset):
    with open(LOG) as f:
        f.seek(offset)
        return f.read()


def last_error(db):
    return db.execute("SELECT queue.health()->'bridge'->>'last_error'").fetchone()[0]


def test_an_undecodable_row_is_an_error_not_a_made_up_job(db, r):
    offset = log_size()
    db.execute("ALTER TABLE queue.jobs ALTER COLUMN priority DROP NOT NULL")
    try:
        bad = db.execute("""INSERT INTO queue.jobs (queue_name, payload, priority, status, max_attempts)
                            VALUES ('undecodable', '{}', NULL, 'queued', 3) RETURNING id""").fetchone()[0]
        db.execute("SELECT queue.enqueue('undecodable', '{}')")  # wakes the bridge
        wait_for(lambda: "priority is NULL" in (last_error(db) or ""), timeout=15,
                 what="the decoding error in health()")
        wait_for(lambda: "priority is NULL" in log_since(offset), what="the error in the log")
        # Nothing was pushed for it: no list named after an empty priority, no job hash.
        assert not r.exists(list_key("undecodable", ""))
        assert not r.exists(f"queue_pg:job:{bad}")
        assert db.execute("SELECT status FROM queue.jobs WHERE id = %s", (bad,)).fetchone()[0] == "queued"
    finally:
        db.execute("DELETE FROM queue.jobs WHERE priority IS NULL")
        db.execute("ALTER TABLE queue.jobs ALTER COLUMN priority SET NOT NULL")
    # Without the bad row the bridge goes on: the good job arrives.
    wait_for(lambda: r.llen(list_key("undecodable")) == 1, timeout=20, what="the good job")


def test_a_failing_statement_of_the_bridge_is_an_error_in_the_log_and_in_health(db, r):
    offset = log_size()
    errors_before = db.execute("SELECT (queue.health()->'bridge'->>'errors_total')::int").fetchone()[0]
    db.execute("ALTER TABLE queue.redis_outbox RENAME COLUMN counted TO counted_renamed")
    try:
        job = db.execute("SELECT queue.enqueue('spi', '{}')").fetchone()[0]
        wait_for(lambda: r.llen(list_key("spi")) == 1, what="the job in Redis")
        db.execute("SELECT * FROM queue.start(%s)", (job,))
        db.execute("SELECT queue.complete(%s)", (job,))
        wait_for(lambda: "counted" in (last_error(db) or ""), timeout=15,
                 what="the failed statement in health()")
        errors = db.execute("SELECT (queue.health()->'bridge'->>'errors_total')::int").fetchone()[0]
        assert errors > errors_before
        wait_for(lambda: 'column "counted" does not exist' in log_since(offset),
                 what="the error in the log")
        # The change was not lost: it waits in the outbox.
        assert db.execute("SELECT count(*) FROM queue.redis_outbox WHERE job_id = %s", (job,)).fetchone()[0] >= 1
    finally:
        db.execute("ALTER TABLE queue.redis_outbox RENAME COLUMN counted_renamed TO counted")
    outbox_applied(db, timeout=20)
    assert r.hget(f"queue_pg:job:{job}", "status") == "completed"
    completed = db.execute("SELECT completed_total FROM queue.metrics() WHERE queue_name = 'spi'").fetchone()[0]
    assert completed == 1
