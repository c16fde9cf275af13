"""The job lifecycle: backoff, dead letters, replay, cancel, concurrent start, state errors."""

import json
import threading
import time

import psycopg
import pytest

from conftest import connect, list_key, pop, wait_for

DLQ = "queue_pg:deadletter:queue"


def row(db, job_id, *cols):
    return db.execute(f"SELECT {', '.join(cols)} FROM queue.jobs WHERE id = %s", (job_id,)).fetchone()


def start(db, job_id, lease=None):
    return db.execute("SELECT * FROM queue.start(%s, %s)", (job_id, lease)).fetchone()


def test_documented_scenario_backoff_then_dead_letter(db, r):
    job_id = db.execute(
        """SELECT queue.enqueue('docs', '{"doc": 7}', 'high', max_attempts => 3)""").fetchone()[0]
    expected_delays = [2000, 4000]
    for attempt in (1, 2, 3):
        msg = pop(r, "docs", timeout=10)
        assert msg and msg["id"] == job_id and msg["attempt"] == attempt
        got = start(db, job_id)
        assert got[0] == job_id and got[3] == attempt and got[4] == 3
        before = time.time()
        result = db.execute("SELECT queue.fail(%s, %s, %s)", (job_id, f"boom {attempt}", attempt)).fetchone()[0]
        assert result["attempt_count"] == attempt
        if attempt < 3:
            delay = expected_delays[attempt - 1]
            assert result["status"] == "retry_scheduled" and result["retry_delay_ms"] == delay
            status, run_at, failed_at = row(db, job_id, "status", "extract(epoch from run_at)", "failed_at")
            assert status == "retry_scheduled" and failed_at is None
            assert delay / 1000 - 0.2 <= float(run_at) - before <= delay / 1000 + 0.2
            # The hash follows: retry_scheduled with its delay.
            wait_for(lambda: r.hget(f"queue_pg:job:{job_id}", "status") == "retry_scheduled")
            assert r.hget(f"queue_pg:job:{job_id}", "retry_delay") == str(delay)
            # Not in Redis before its delay, and there within the bridge's tick after it.
            assert pop(r, "docs", timeout=delay / 1000 - 0.5) is None
            msg = pop(r, "docs", timeout=3)
            arrived = time.time()
            assert msg is not None and msg["attempt"] == attempt + 1
            assert delay / 1000 - 0.1 <= arrived - before <= delay / 1000 + 1.2
            r.rpush(list_key("docs", "high"), json.dumps(msg))  # put it back for the next pop
        else:
            assert result["status"] == "failed"
            assert result["retry_delay_ms"] is None and result["run_at"] is None

    status, attempts, failed_at, last_error, errors = row(
        db, job_id, "status", "attempt_count", "failed_at", "last_error_message", "errors")
    assert (status, attempts, last_error) == ("failed", 3, "boom 3")
    assert failed_at is not None
    assert [(e["attempt"], e["error"]) for e in errors] == [(1, "boom 1"), (2, "boom 2"), (3, "boom 3")]
    assert all("at" in e for e in errors)
    assert db.execute("SELECT count(*) FROM queue.dead_letters WHERE id = %s", (job_id,)).fetchone()[0] == 1

    wait_for(lambda: r.llen(DLQ) == 1, what="the dead-letter entry")
    entry = json.loads(r.lindex(DLQ, 0))
    assert set(entry) == {"id", "queue_name", "payload", "error", "failed_at", "attempt_count", "original_priority"}
    assert entry["id"] == job_id and entry["queue_name"] == "docs" and entry["payload"] == {"doc": 7}
    assert entry["error"] == "boom 3" and entry["attempt_count"] == 3 and entry["original_priority"] == "high"
    assert entry["failed_at"]
    assert r.get(f"queue_pg:deadletter:{job_id}") == "moved"
    assert 604800 - 10 <= r.ttl(f"queue_pg:deadletter:{job_id}") <= 604800
    job_hash = r.hgetall(f"queue_pg:job:{job_id}")
    assert job_hash["status"] == "failed" and job_hash["error"] == "boom 3" and job_hash["failed_at"]
    assert 86400 - 10 <= r.ttl(f"queue_pg:job:{job_id}") <= 86400


def kill_once(db, r, queue):
    job_id = db.execute(f"SELECT queue.enqueue('{queue}', '{{}}', max_attempts => 1)").fetchone()[0]
    msg = pop(r, queue)
    assert msg["id"] == job_id
    start(db, job_id)
    assert db.execute("SELECT queue.fail(%s, 'fatal')", (job_id,)).fetchone()[0]["status"] == "failed"
    return job_id


def test_replay_dead_brings_back_that_job_only(db, r):
    a, b = kill_once(db, r, "dead"), kill_once(db, r, "dead")
    wait_for(lambda: r.llen(DLQ) == 2 and r.exists(f"queue_pg:deadletter:{a}", f"queue_pg:deadletter:{b}") == 2)
    assert db.execute("SELECT queue.replay_dead(%s)", (a,)).fetchone()[0] == {"success": True, "job_id": a}
    msg = pop(r, "dead")
    assert msg["id"] == a and msg["attempt"] == 1
    wait_for(lambda: r.llen(DLQ) == 1, what="a's entry removed")
    assert json.loads(r.lindex(DLQ, 0))["id"] == b
    assert not r.exists(f"queue_pg:deadletter:{a}")
    assert r.get(f"queue_pg:deadletter:{b}") == "moved"
    status, attempts, last_error, errors = row(db, a, "status", "attempt_count", "last_error_message", "errors")
    assert status == "migrated" and attempts == 0 and last_error is None
    assert len(errors) == 1  # the history is kept across replays
    assert row(db, b, "status")[0] == "failed"
    # The replayed job runs again normally.
    assert start(db, a)[3] == 1
    db.execute("SELECT queue.complete(%s)", (a,))


def test_replay_dead_all(db, r):
    ids = [kill_once(db, r, "many_dead") for _ in range(3)]
    other = kill_once(db, r, "other_dead")
    assert db.execute("SELECT queue.replay_dead_all('many_dead', 2)").fetchone()[0] == 2
    assert db.execute("SELECT queue.replay_dead_all('many_dead')").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM queue.dead_letters").fetchone()[0] == 1
    assert {m["id"] for m in (pop(r, "many_dead") for _ in ids)} == set(ids)
    wait_for(lambda: r.llen(DLQ) == 1 and json.loads(r.lindex(DLQ, 0))["id"] == other)


def test_two_workers_start_the_same_job_exactly_one_wins(db, r):
    ids = [row[0] for row in db.execute(
        "SELECT * FROM queue.enqueue_many('race', (SELECT jsonb_agg(g) FROM generate_series(1, 50) g))").fetchall()]
    wins = {job_id: 0 for job_id in ids}
    barrier = threading.Barrier(2)

    def worker():
        with connect() as conn:
            for job_id in ids:
                barrier.wait()
                if conn.execute("SELECT * FROM queue.start(%s)", (job_id,)).fetchone():
                    wins[job_id] += 1

    threads = [threading.Thread(target=worker) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert set(wins.values()) == {1}

    # And when one start holds the row lock, the other waits and then gets no row.
    job_id = db.execute("SELECT queue.enqueue('race', '1')").fetchone()[0]
    with connect(autocommit=False) as first:
        assert first.execute("SELECT * FROM queue.start(%s)", (job_id,)).fetchone()
        result = {}
        t = threading.Thread(target=lambda: result.update(row=start(connect(), job_id)))
        t.start()
        time.sleep(0.3)
        assert t.is_alive(), "the second start did not wait for the first"
        first.commit()
        t.join()
    assert result["row"] is None


def test_cancel_queued_migrated_and_running(db, r):
    # queued (its queue paused): never dispatched
    db.execute("SELECT queue.pause('c')")
    queued = db.execute("SELECT queue.enqueue('c', '1')").fetchone()[0]
    assert db.execute("SELECT queue.cancel(%s)", (queued,)).fetchone()[0] is True
    db.execute("SELECT queue.resume('c')")
    # migrated: the message is still in Redis; start drops it
    migrated = db.execute("SELECT queue.enqueue('c', '2')").fetchone()[0]
    wait_for(lambda: row(db, migrated, "status")[0] == "migrated")
    assert db.execute("SELECT queue.cancel(%s)", (migrated,)).fetchone()[0] is True
    msg = pop(r, "c")
    assert msg["id"] == migrated, "the cancelled queued job must not have been dispatched"
    assert start(db, migrated) is None
    # running: the worker's next call is an ERROR
    running = db.execute("SELECT queue.enqueue('c', '3')").fetchone()[0]
    assert pop(r, "c")["id"] == running
    assert start(db, running)
    assert db.execute("SELECT queue.cancel(%s)", (running,)).fetchone()[0] is True
    for call in ("SELECT queue.complete(%s)", "SELECT queue.fail(%s, 'x')", "SELECT queue.heartbeat(%s)"):
        with pytest.raises(psycopg.Error) as raised:
            db.execute(call, (running,))
        assert raised.value.sqlstate == "55000" and "cancelled" in str(raised.value)
    assert {row(db, i, "status")[0] for i in (queued, migrated, running)} == {"cancelled"}
    assert r.llen(list_key("c")) == 0
    # a finished job: false
    assert db.execute("SELECT queue.cancel(%s)", (running,)).fetchone()[0] is False
    wait_for(lambda: r.hget(f"queue_pg:job:{running}", "status") == "cancelled")
    assert 0 < r.ttl(f"queue_pg:job:{running}") <= 86400


def test_hash_follows_running_and_completed(db, r):
    job_id = db.execute("SELECT queue.enqueue('h', '1')").fetchone()[0]
    assert pop(r, "h")["id"] == job_id
    start(db, job_id)
    wait_for(lambda: r.hget(f"queue_pg:job:{job_id}", "status") == "running")
    assert r.ttl(f"queue_pg:job:{job_id}") == -1  # unfinished: no TTL
    db.execute("""SELECT queue.complete(%s, '{"ok": true}', 1)""", (job_id,))
    wait_for(lambda: r.hget(f"queue_pg:job:{job_id}", "status") == "completed")
    assert 86400 - 10 <= r.ttl(f"queue_pg:job:{job_id}") <= 86400
    assert row(db, job_id, "result")[0] == {"ok": True}


def test_complete_many_completes_only_running_jobs(db, r):
    ids = [row[0] for row in db.execute(
        "SELECT * FROM queue.enqueue_many('cm', '[1, 2, 3, 4]')").fetchall()]
    for job_id in ids[:3]:
        assert pop(r, "cm")["id"] == job_id
        start(db, job_id)
    db.execute("SELECT queue.cancel(%s)", (ids[2],))
    assert db.execute("SELECT queue.complete_many(%s)", (ids,)).fetchone()[0] == 2
    assert [row(db, i, "status")[0] for i in ids] == ["completed", "completed", "cancelled", "migrated"]
    assert db.execute("SELECT queue.complete_many(%s)", (ids,)).fetchone()[0] == 0


def test_heartbeat_extends_the_lease(db, r):
    job_id = db.execute("SELECT queue.enqueue('hb', '1')").fetchone()[0]
    assert pop(r, "hb")["id"] == job_id
    lease_end = start(db, job_id, "10 seconds")[5]
    new_end = db.execute("SELECT queue.heartbeat(%s, interval '1 hour', 1)", (job_id,)).fetchone()[0]
    assert (new_end - lease_end).total_seconds() > 3000
    assert row(db, job_id, "lease_expires_at")[0] == new_end


STATE_ERRORS = [
    ("SELECT * FROM queue.start(NULL)", "22004"),
    ("SELECT * FROM queue.start(999999999)", "P0002"),
    ("SELECT * FROM queue.start({queued}, interval '-1 second')", "22023"),
    ("SELECT queue.heartbeat(999999999)", "P0002"),
    ("SELECT queue.heartbeat({queued})", "55000"),
    ("SELECT queue.heartbeat({running}, NULL, 2)", "55000"),
    ("SELECT queue.complete(NULL)", "22004"),
    ("SELECT queue.complete(999999999)", "P0002"),
    ("SELECT queue.complete({queued})", "55000"),
    ("SELECT queue.complete({done})", "55000"),
    ("SELECT queue.complete({running}, NULL, 7)", "55000"),
    ("SELECT queue.complete_many(NULL)", "22004"),
    ("SELECT queue.fail(999999999, 'x')", "P0002"),
    ("SELECT queue.fail({queued}, 'x')", "55000"),
    ("SELECT queue.fail({running}, NULL)", "22004"),
    ("SELECT queue.fail({running}, 'x', 2)", "55000"),
    ("SELECT queue.cancel(NULL)", "22004"),
    ("SELECT queue.cancel(999999999)", "P0002"),
    ("SELECT queue.replay_dead(NULL)", "22004"),
    ("SELECT queue.replay_dead(999999999)", "P0002"),
    ("SELECT queue.replay_dead({running})", "55000"),
    ("SELECT queue.replay_dead({done})", "55000"),
    ("SELECT queue.replay_dead_all('bad name')", "22023"),
    ("SELECT queue.replay_dead_all(NULL, 0)", "22023"),
    ("SELECT queue.replay_dead_all(NULL, NULL)", "22004"),
]


@pytest.mark.parametrize("sql,sqlstate", STATE_ERRORS, ids=[c[0] for c in STATE_ERRORS])
def test_calls_that_do_not_fit_the_state_are_errors_and_change_nothing(db, r, sql, sqlstate):
    db.execute("SELECT queue.pause('s')")
    queued, running, done = [x[0] for x in db.execute("SELECT * FROM queue.enqueue_many('s', '[1, 2, 3]')").fetchall()]
    start(db, running)
    start(db, done)
    db.execute("SELECT queue.complete(%s)", (done,))
    snapshot = "SELECT array_agg(ROW(id, status, attempt_count, updated_at, lease_expires_at)::text ORDER BY id) FROM queue.jobs"
    wait_for(lambda: db.execute("SELECT count(*) FROM queue.redis_outbox").fetchone()[0] == 0,
             what="the bridge to apply the setup's changes")
    before = db.execute(snapshot).fetchone()[0], db.execute("SELECT count(*) FROM queue.redis_outbox").fetchone()[0]
    with pytest.raises(psycopg.Error) as raised:
        db.execute(sql.format(queued=queued, running=running, done=done))
    assert raised.value.sqlstate == sqlstate, raised.value
    assert "queue_pg" in str(raised.value)
    after = db.execute(snapshot).fetchone()[0], db.execute("SELECT count(*) FROM queue.redis_outbox").fetchone()[0]
    assert after == before


def test_per_queue_lease_and_backoff_settings(db, r):
    db.execute("INSERT INTO queue.queues (queue_name, lease, backoff_base, backoff_max) "
               "VALUES ('tuned', '2 seconds', '100 ms', '300 ms')")
    ids = [x[0] for x in db.execute("SELECT * FROM queue.enqueue_many('tuned', '[1, 2]', 'normal', 5)").fetchall()]
    assert [pop(r, "tuned")["id"] for _ in ids] == ids
    got = start(db, ids[0])
    lease_s = db.execute("SELECT extract(epoch FROM %s - now())", (got[5],)).fetchone()[0]
    assert 1.5 < float(lease_s) <= 2.0
    delays = []
    for attempt in (1, 2, 3):
        if attempt > 1:
            wait_for(lambda: row(db, ids[0], "status")[0] == "migrated", what="the retry dispatched")
        start(db, ids[0])
        delays.append(db.execute("SELECT queue.fail(%s, 'x')", (ids[0],)).fetchone()[0]["retry_delay_ms"])
    assert delays == [200, 300, 300]  # 100 ms * 2^n, capped at 300 ms
    # The call's lease wins over the queue's.
    lease_end = start(db, ids[1], "1 hour")[5]
    assert float(db.execute("SELECT extract(epoch FROM %s - now())", (lease_end,)).fetchone()[0]) > 3000


def test_jitter_spreads_the_delay_within_its_fraction(db, r):
    db.execute("SET queue.backoff_jitter = 0.5")
    ids = [x[0] for x in db.execute(
        "SELECT * FROM queue.enqueue_many('jit', (SELECT jsonb_agg(g) FROM generate_series(1, 20) g))").fetchall()]
    wait_for(lambda: r.llen(list_key("jit")) == 20)
    delays = []
    for job_id in ids:
        start(db, job_id)
        delays.append(db.execute("SELECT queue.fail(%s, 'x')", (job_id,)).fetchone()[0]["retry_delay_ms"])
    assert all(1000 <= d <= 3000 for d in delays), delays  # 2000 ms +/- 50 %
    assert len(set(delays)) > 5, delays
