"""A frozen Redis (SIGSTOP: the kernel still accepts connections, nothing ever answers): every SQL
call that touches Redis returns within queue.redis_timeout in total, whatever the number of
queues; the bridge holds no transaction while it waits; everything is delivered after the thaw;
a fast shutdown stays prompt."""

import os
import signal
import time

import psycopg
import pytest

from conftest import (ENV, bridge_pid, list_ids, list_key, pop, reconnect_after_restart,
                      set_config, stack, wait_for)

TIMEOUT_S = 1.0
SLACK_S = 0.5


def redis_pid():
    with open(os.path.join(ENV["QPG_HOME"], "redis.pid")) as f:
        return int(f.read())


class Frozen:
    """Redis stopped by SIGSTOP for the duration of a with-block."""

    def __enter__(self):
        self.pid = redis_pid()
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        os.kill(self.pid, signal.SIGCONT)


def timed(db, sql):
    """Runs sql; returns (seconds, result or the exception)."""
    start = time.monotonic()
    try:
        result = db.execute(sql).fetchall()
    except psycopg.Error as e:
        result = e
    return time.monotonic() - start, result


def bridge_transaction(db):
    return db.execute("""SELECT xact_start, backend_xid, backend_xmin FROM pg_stat_activity
                         WHERE backend_type = 'queue_pg bridge'""").fetchone()


@pytest.mark.parametrize("queues", [1, 500])
def test_every_redis_call_returns_within_the_timeout(db, r, queues):
    db.execute("INSERT INTO queue.queues (queue_name) SELECT 'q' || g FROM generate_series(1, %s) g",
               (queues,))
    db.execute(f"SET queue.redis_timeout = '{int(TIMEOUT_S * 1000)}ms'")
    assert db.execute("SELECT queue.health()->>'status'").fetchone()[0] == "healthy"
    with Frozen():
        took, h = timed(db, "SELECT queue.health()")
        assert took < TIMEOUT_S + SLACK_S, f"health() took {took:.2f} s"
        h = h[0][0]
        assert h["status"] == "unhealthy" and h["redis"]["status"] == "unhealthy"
        assert "redis_timeout" in h["redis"]["error"], h["redis"]["error"]
        # Unknown list lengths are null, not 0.
        assert h["queues"]["q1"]["normal"] is None

        took, rows = timed(db, "SELECT * FROM queue.metrics()")
        assert took < TIMEOUT_S + SLACK_S, f"metrics() took {took:.2f} s"
        assert len(rows) == queues and all(row[8] is None for row in rows)

        took, text = timed(db, "SELECT queue.prometheus()")
        assert took < TIMEOUT_S + SLACK_S, f"prometheus() took {took:.2f} s"
        assert "queue_pg_redis_up 0" in text[0][0]

        took, err = timed(db, "SELECT queue.optimize_memory()")
        assert took < TIMEOUT_S + SLACK_S, f"optimize_memory() took {took:.2f} s"
        assert isinstance(err, psycopg.errors.ConnectionFailure), err

        # Enqueueing never needs Redis.
        took, _ = timed(db, "SELECT queue.enqueue('q1', '{}')")
        assert took < 0.5


def test_the_bridge_waits_without_a_transaction_and_delivers_after_the_thaw(db, r):
    set_config(db, redis_timeout="3s")
    db.execute("SELECT queue.enqueue('thaw', '0')")
    wait_for(lambda: r.llen(list_key("thaw")) == 1, what="the first job in Redis")
    with Frozen():
        ids = [x[0] for x in db.execute(
            "SELECT * FROM queue.enqueue_many('thaw', (SELECT jsonb_agg(g) FROM generate_series(1, 200) g))")]
        # Sampled over the freeze, once the bridge has read the batch and is blocked on Redis:
        # it holds no transaction while it waits.
        time.sleep(0.5)
        samples = []
        for _ in range(25):
            samples.append(bridge_transaction(db))
            time.sleep(0.1)
        assert all(s == (None, None, None) for s in samples), samples
        queued = db.execute("SELECT count(*) FROM queue.jobs WHERE status = 'queued'").fetchone()[0]
        assert queued == 200
    wait_for(lambda: r.llen(list_key("thaw")) == 201, timeout=30, what="every job after the thaw")
    got = {pop(r, "thaw", timeout=1)["id"] for _ in range(201)}
    assert set(ids) <= got


def test_fast_shutdown_stays_prompt_with_redis_frozen(db, r):
    set_config(db, redis_timeout="30s")
    first = db.execute("SELECT queue.enqueue('shut', '1')").fetchone()[0]
    wait_for(lambda: r.llen(list_key("shut")) == 1)
    with Frozen():
        second = db.execute("SELECT queue.enqueue('shut', '2')").fetchone()[0]  # the bridge now waits on Redis
        time.sleep(0.5)
        db.close()
        start = time.monotonic()
        stack("pg-stop")
        took = time.monotonic() - start
        stack("pg-start")
    assert took < 5, f"pg_ctl stop -m fast took {took:.1f} s with the bridge waiting on Redis"
    db = reconnect_after_restart()
    db.execute("ALTER SYSTEM RESET queue.redis_timeout")
    db.execute("SELECT pg_reload_conf()")
    wait_for(lambda: bridge_pid(db), timeout=30, what="the bridge after the restart")
    # The push the stopped bridge had sent may reach Redis at the thaw, and the new bridge pushes
    # the job again (at-least-once: start() drops the duplicate). Both jobs are there.
    wait_for(lambda: {first, second} <= set(list_ids(r, "shut")), timeout=30,
             what="the second job after the thaw")
    wait_for(lambda: db.execute("SELECT count(*) FROM queue.jobs WHERE status = 'migrated'").fetchone()[0] == 2,
             what="both jobs marked migrated")
    db.close()
