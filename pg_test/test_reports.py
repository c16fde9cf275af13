"""The worker fast path: reports through Redis (XADD to the queue's report stream), applied to
Postgres by the report applier with the same rules as the SQL functions; batch pop (BLMPOP)."""

import json
import os
import signal
import time

from conftest import (PREFIX, after_crash_restart, applier_pid, list_key, pop, rejected, report,
                      set_config, stack,
                      wait_for)

DLQ = "queue_pg:deadletter:queue"


def row(db, job_id, *cols):
    return db.execute(f"SELECT {', '.join(cols)} FROM queue.jobs WHERE id = %s", (job_id,)).fetchone()


def status(db, job_id):
    return row(db, job_id, "status")[0]


def stream_len(r, queue):
    return r.xlen(f"{PREFIX}:{{{queue}}}:reports")


def applied(r, queue):
    """Waits until the applier has applied (and removed) every report of the queue's stream."""
    wait_for(lambda: stream_len(r, queue) == 0, what="the reports to be applied")


class Paused:
    """Stops the report applier (SIGSTOP) so that reports pile up, then lets it go on. Its Redis
    connection is closed too: a read it had blocked in would otherwise still receive what is
    added meanwhile (into its socket buffer)."""

    def __init__(self, db, r):
        self.pid = applier_pid(db)
        self.r = r

    def __enter__(self):
        os.kill(self.pid, signal.SIGSTOP)
        for client in self.r.client_list():
            if client["name"] == "queue_pg-reports":
                self.r.client_kill_filter(_id=client["id"])
        return self

    def __exit__(self, *exc):
        os.kill(self.pid, signal.SIGCONT)


def test_backoff_then_dead_letter_through_reports(db, r):
    job_id = db.execute(
        """SELECT queue.enqueue('docs', '{"doc": 7}', 'high', max_attempts => 3)""").fetchone()[0]
    for attempt in (1, 2, 3):
        msg = pop(r, "docs", timeout=10)
        assert msg and msg["id"] == job_id and msg["attempt"] == attempt
        if attempt == 2:  # an explicit start this time: the others start implicitly
            report(r, "docs", job_id, attempt, "start")
        before = time.time()
        report(r, "docs", job_id, attempt, "fail", error=f"boom {attempt}")
        if attempt < 3:
            delay = [2000, 4000][attempt - 1]
            wait_for(lambda: status(db, job_id) == "retry_scheduled", what="the fail report applied")
            applied_at = time.time()
            attempts, run_at = row(db, job_id, "attempt_count", "extract(epoch from run_at)")
            assert attempts == attempt
            print("applied after", applied_at - before)
            assert delay / 1000 - 0.2 <= float(run_at) - before <= delay / 1000 + (applied_at - before) + 0.1
            wait_for(lambda: r.hget(f"queue_pg:job:{job_id}", "retry_delay") == str(delay))
            if attempt == 2:
                assert applied_at - before < 0.5, "the report waited for a poll interval"
        else:
            wait_for(lambda: status(db, job_id) == "failed", what="the last fail report applied")

    attempts, last_error, errors = row(db, job_id, "attempt_count", "last_error_message", "errors")
    assert (attempts, last_error) == (3, "boom 3")
    assert [(e["attempt"], e["error"]) for e in errors] == [(1, "boom 1"), (2, "boom 2"), (3, "boom 3")]
    wait_for(lambda: r.llen(DLQ) == 1, what="the dead-letter entry")
    entry = json.loads(r.lindex(DLQ, 0))
    assert set(entry) == {"id", "queue_name", "payload", "error", "failed_at", "attempt_count", "original_priority"}
    assert entry["id"] == job_id and entry["queue_name"] == "docs" and entry["payload"] == {"doc": 7}
    assert entry["error"] == "boom 3" and entry["attempt_count"] == 3 and entry["original_priority"] == "high"
    assert r.get(f"queue_pg:deadletter:{job_id}") == "moved"
    applied(r, "docs")
    assert rejected(db) == {}

    # Replayed, it runs again and completes through a report, with its result.
    db.execute("SELECT queue.replay_dead(%s)", (job_id,))
    msg = pop(r, "docs")
    assert msg["id"] == job_id and msg["attempt"] == 1
    report(r, "docs", job_id, 1, "complete", result='{"sent": true}')
    wait_for(lambda: status(db, job_id) == "completed", what="the complete report applied")
    assert row(db, job_id, "result")[0] == {"sent": True}
    wait_for(lambda: r.hget(f"queue_pg:job:{job_id}", "status") == "completed")
    wait_for(lambda: r.llen(DLQ) == 0, what="the replayed job's dead-letter entry removed")


def test_cancel_while_a_report_is_in_flight(db, r):
    job_id = db.execute("SELECT queue.enqueue('mail', '{}')").fetchone()[0]
    assert pop(r, "mail")["id"] == job_id
    with Paused(db, r):
        report(r, "mail", job_id, 1, "complete")
        db.execute("SELECT queue.cancel(%s)", (job_id,))
    applied(r, "mail")
    assert status(db, job_id) == "cancelled"
    assert rejected(db, "mail") == {"cancelled": 1}


def test_a_stale_attempts_report_is_rejected_and_counted(db, r):
    job_id = db.execute("SELECT queue.enqueue('mail', '{}', max_attempts => 3)").fetchone()[0]
    assert pop(r, "mail")["attempt"] == 1
    report(r, "mail", job_id, 1, "fail", error="first")
    wait_for(lambda: status(db, job_id) == "retry_scheduled")
    db.execute("UPDATE queue.jobs SET run_at = now() WHERE id = %s", (job_id,))
    assert pop(r, "mail")["attempt"] == 2
    # The first delivery, still running somewhere, reports late.
    report(r, "mail", job_id, 1, "complete")
    report(r, "mail", job_id, 1, "heartbeat")
    applied(r, "mail")
    # The bridge marks a push right after Redis acknowledged it; the pop can come first.
    wait_for(lambda: status(db, job_id) == "migrated", what="the second push marked")
    assert rejected(db, "mail") == {"stale_attempt": 2}
    last = db.execute("SELECT last_job_id FROM queue.rejected_reports WHERE reason = 'stale_attempt'").fetchone()
    assert last == (job_id,)
    report(r, "mail", job_id, 2, "complete")
    wait_for(lambda: status(db, job_id) == "completed")
    assert row(db, job_id, "attempt_count")[0] == 1


def test_heartbeat_reports_keep_a_short_lease_alive(db, r):
    kept, dropped = (db.execute(f"SELECT queue.enqueue('slow', '{{\"n\": {n}}}')").fetchone()[0] for n in (1, 2))
    assert {pop(r, "slow")["id"], pop(r, "slow")["id"]} == {kept, dropped}
    report(r, "slow", kept, 1, "start", lease_ms=2000)
    report(r, "slow", dropped, 1, "start", lease_ms=2000)
    wait_for(lambda: status(db, kept) == "running" and status(db, dropped) == "running")
    t0 = time.time()
    while time.time() - t0 < 5:
        time.sleep(0.8)
        report(r, "slow", kept, 1, "heartbeat", lease_ms=2000)
    report(r, "slow", kept, 1, "complete")
    wait_for(lambda: status(db, kept) == "completed")
    assert row(db, kept, "attempt_count, errors") == (0, [])
    # The job without heartbeats lost its lease: a failed attempt, by the backoff rule.
    st, attempts, error = row(db, dropped, "status", "attempt_count", "last_error_message")
    assert st != "completed" and (attempts, error) == (1, "lease expired")


def test_batch_pop_takes_oldest_first_and_unstarted_jobs_are_rescued(db, r):
    set_config(db, start_timeout="1s")
    ids = [x[0] for x in db.execute(
        "SELECT * FROM queue.enqueue_many('batch', (SELECT jsonb_agg(g) FROM generate_series(1, 6) g))").fetchall()]
    urgent = db.execute("SELECT queue.enqueue('batch', '0', 'high')").fetchone()[0]
    wait_for(lambda: r.llen(list_key("batch")) == 6 and r.llen(list_key("batch", "high")) == 1)
    keys = [list_key("batch", p) for p in ("high", "normal", "low")]
    got = r.blmpop(1, 3, *keys, direction="RIGHT", count=4)
    assert got[0] == keys[0] and [json.loads(m)["id"] for m in got[1]] == [urgent]
    key, msgs = r.blmpop(1, 3, *keys, direction="RIGHT", count=4)
    assert [json.loads(m)["id"] for m in msgs] == ids[:4]
    # Started and finished through reports: the first two.
    for job_id in ids[:2]:
        report(r, "batch", job_id, 1, "complete")
    # Never reported: ids[2:4] and urgent go back to Redis after start_timeout, once each.
    wait_for(lambda: status(db, ids[0]) == "completed" and status(db, ids[1]) == "completed")
    wait_for(lambda: r.llen(list_key("batch")) == 4 and r.llen(list_key("batch", "high")) == 1,
             timeout=10, what="the popped, unstarted jobs dispatched again")
    again = [json.loads(m)["id"] for m in r.lrange(list_key("batch"), 0, -1)]
    assert sorted(again) == sorted(ids[2:])
    time.sleep(1.5)
    assert r.llen(list_key("batch")) == 4, "dispatched twice"


def test_bad_reports_are_rejected_by_reason_and_the_rest_of_the_batch_applies(db, r):
    db.execute("SELECT queue.enqueue('other', '{}')")
    good = [db.execute("SELECT queue.enqueue('mail', '{}')").fetchone()[0] for _ in range(3)]
    other = db.execute("SELECT id FROM queue.jobs WHERE queue_name = 'other'").fetchone()[0]
    for _ in good:
        pop(r, "mail")
    pop(r, "other")
    stream = f"{PREFIX}:{{mail}}:reports"
    with Paused(db, r):
        report(r, "mail", good[0], 1, "complete", result='{"ok": 1}')
        report(r, "mail", good[1], 1, "finish")                                # unknown op
        r.xadd(stream, {"id": good[1], "op": "complete"})                    # no attempt
        report(r, "mail", good[1], "one", "complete")                        # not a number
        report(r, "mail", good[1], 1, "complete", result="{not json")       # result not JSON
        report(r, "mail", other, 1, "complete")                              # another queue's job
        report(r, "mail", good[1], 1, "fail", error="x" * (2 * 1024 * 1024))  # 2 MB error
        report(r, "mail", 999999, 1, "complete")                             # no such job
        report(r, "mail", good[1], 1, "fail", error="short")
        report(r, "mail", good[2], 1, "start")
    applied(r, "mail")
    assert rejected(db, "mail") == {"unknown_op": 1, "malformed": 3, "other_queue": 1, "oversized": 1,
                                    "unknown_job": 1}
    assert row(db, good[0], "status", "result") == ("completed", {"ok": 1})
    assert row(db, good[1], "status", "attempt_count", "last_error_message") == ("retry_scheduled", 1, "short")
    assert status(db, good[2]) == "running"
    assert status(db, other) == "migrated", "another queue's job was changed"


def test_a_report_lost_before_it_is_applied_means_the_job_runs_again(db, r):
    set_config(db, start_timeout="1s")
    for loss in ("flushall", "restart"):
        job_id = db.execute("SELECT queue.enqueue('lossy', '{}')").fetchone()[0]
        assert pop(r, "lossy")["id"] == job_id
        runs = 1
        with Paused(db, r):
            report(r, "lossy", job_id, 1, "complete")
            if loss == "flushall":
                r.flushall()
            else:
                stack("redis-stop")
                stack("redis-start")
        # Nothing applied it: the job is still waiting in Postgres, and comes back.
        msg = pop(r, "lossy", timeout=15)
        assert msg and msg["id"] == job_id and msg["attempt"] == 1
        assert status(db, job_id) in ("queued", "migrated")
        runs += 1
        report(r, "lossy", job_id, 1, "complete")
        wait_for(lambda: status(db, job_id) == "completed")
        time.sleep(1.5)
        assert pop(r, "lossy", timeout=1) is None, "completed, yet dispatched again"
        assert runs == 2


def test_crashes_with_thousands_of_reports_pending_lose_none_and_apply_none_twice(db, r):
    """The bridge SIGKILLed (the postmaster then restarts every backend, the applier mid-batch
    among them), then Postgres stopped as a crash would: afterwards every job is exactly where a
    clean run leaves it."""
    n_jobs = 3000
    ids = [x[0] for x in db.execute(
        "SELECT * FROM queue.enqueue_many('crashy', (SELECT jsonb_agg(g) FROM generate_series(1, %s) g), "
        "max_attempts => 1)", (n_jobs,)).fetchall()]
    keys = [list_key("crashy", p) for p in ("high", "normal", "low")]
    popped = []
    while len(popped) < n_jobs:
        got = r.blmpop(5, 3, *keys, direction="RIGHT", count=500)
        assert got, "the jobs did not arrive"
        popped += [json.loads(m) for m in got[1]]
    assert sorted(m["id"] for m in popped) == ids
    n = {m["id"]: m["payload"] for m in popped}
    with Paused(db, r):
        pipe = r.pipeline(transaction=False)
        for job_id in ids:
            stream = f"{PREFIX}:{{crashy}}:reports"
            if n[job_id] % 3 == 0:
                pipe.xadd(stream, {"id": job_id, "attempt": 1, "op": "start"})
            if n[job_id] % 10 == 0:
                pipe.xadd(stream, {"id": job_id, "attempt": 1, "op": "fail", "error": f"bad {n[job_id]}"})
            else:
                pipe.xadd(stream, {"id": job_id, "attempt": 1, "op": "complete",
                                   "result": json.dumps({"n": n[job_id]})})
        pipe.execute()
        total = stream_len(r, "crashy")
        bridge = db.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'queue_pg bridge'").fetchone()[0]
    wait_for(lambda: stream_len(r, "crashy") < total, interval=0.001, what="the first batch applied")
    os.kill(bridge, signal.SIGKILL)
    pending = stream_len(r, "crashy")
    print(f"killed the bridge with {pending} of {total} reports pending")
    assert pending >= 1000, "the reports were applied before the kill: the test proves nothing"
    db = after_crash_restart(db)
    stack("pg-kill")
    stack("pg-start")
    db = after_crash_restart(db)
    applied(r, "crashy")

    def done():
        return db.execute("SELECT count(*) FROM queue.jobs WHERE queue_name = 'crashy' "
                          "AND status IN ('completed', 'failed')").fetchone()[0] == n_jobs
    wait_for(done, timeout=30, what="every job finished")
    rows = db.execute("SELECT id, status, attempt_count, result, last_error_message, errors "
                      "FROM queue.jobs WHERE queue_name = 'crashy' ORDER BY id").fetchall()
    for job_id, st, attempts, result, error, errors in rows:
        k = n[job_id]
        if k % 10 == 0:
            assert (st, attempts, error) == ("failed", 1, f"bad {k}"), job_id
            assert [(e["attempt"], e["error"]) for e in errors] == [(1, f"bad {k}")], job_id
        else:
            assert (st, attempts, result, error, errors) == ("completed", 0, {"n": k}, None, []), job_id
    # Applied once each: reports read again after the crash were rejected, never applied.
    counts = rejected(db, "crashy")
    assert set(counts) <= {"finished", "wrong_state"}, counts
    wait_for(lambda: r.llen(DLQ) == n_jobs // 10, what="one dead-letter entry per dead job")


def test_monitoring_shows_waiting_reports_their_age_the_apply_lag_and_rejections(db, r):
    job_id = db.execute("SELECT queue.enqueue('seen', '{}')").fetchone()[0]
    assert pop(r, "seen")["id"] == job_id
    with Paused(db, r):
        report(r, "seen", job_id, 1, "complete")
        report(r, "seen", job_id, 1, "finish")
        r.xadd(f"{PREFIX}:{{seen}}:reports", {"id": job_id, "op": "complete"})
        time.sleep(0.5)
        health = db.execute("SELECT queue.health()").fetchone()[0]
        seen = health["queues"]["seen"]
        assert seen["reports_waiting"] == 3 and seen["oldest_report_age_ms"] >= 400
        assert seen["migrated"] == 1
        assert health["reports"]["oldest_waiting_ms"] >= 400
        waiting, age = db.execute("SELECT reports_waiting, oldest_report_age_ms FROM queue.metrics() "
                                  "WHERE queue_name = 'seen'").fetchone()
        assert waiting == 3 and age >= 400
        assert 'queue_pg_reports_waiting{queue="seen"} 3' in db.execute("SELECT queue.prometheus()").fetchone()[0]
    applied(r, "seen")
    assert status(db, job_id) == "completed"
    health = db.execute("SELECT queue.health()").fetchone()[0]
    assert health["reports"]["applier"] == "running"
    assert health["reports"]["rejected"] == {"unknown_op": 1, "malformed": 1}
    assert health["reports"]["applied_total"] >= 1
    assert health["reports"]["last_apply_lag_ms"] >= 400, "the batch waited while the applier was stopped"
    assert health["queues"]["seen"]["reports_waiting"] == 0
    assert health["queues"]["seen"]["oldest_report_age_ms"] is None
    assert db.execute("SELECT reports_rejected_total FROM queue.metrics() WHERE queue_name = 'seen'").fetchone() == (2,)
    text = db.execute("SELECT queue.prometheus()").fetchone()[0]
    assert 'queue_pg_reports_rejected_total{queue="seen",reason="unknown_op"} 1' in text
    assert 'queue_pg_reports_rejected_total{queue="seen",reason="malformed"} 1' in text
    assert "queue_pg_report_applier_up 1" in text


def test_a_stopped_applier_makes_health_unhealthy(db, r):
    db.execute("SELECT queue.enqueue('seen', '{}')")
    assert db.execute("SELECT queue.health()->>'status'").fetchone()[0] == "healthy"
    with Paused(db, r):
        pass  # only to learn its pid
    pid = applier_pid(db)
    os.kill(pid, signal.SIGTERM)  # it stops, and the postmaster starts it again after a second
    wait_for(lambda: db.execute("SELECT queue.health()->'reports'->>'applier'").fetchone()[0] == "stopped",
             interval=0.01, what="health() to see the applier stopped")
    assert db.execute("SELECT queue.health()->>'status'").fetchone()[0] == "unhealthy"
    wait_for(lambda: applier_pid(db) not in (None, pid), timeout=10, what="the applier started again")


def test_a_report_waiting_over_ten_seconds_makes_health_degraded(db, r):
    job_id = db.execute("SELECT queue.enqueue('seen', '{}')").fetchone()[0]
    assert pop(r, "seen")["id"] == job_id
    with Paused(db, r):
        report(r, "seen", job_id, 1, "complete")
        time.sleep(9)
        assert db.execute("SELECT queue.health()->>'status'").fetchone()[0] == "healthy"
        time.sleep(1.5)
        health = db.execute("SELECT queue.health()").fetchone()[0]
        assert health["status"] == "degraded" and health["reports"]["oldest_waiting_ms"] > 10_000
    applied(r, "seen")
    assert db.execute("SELECT queue.health()->>'status'").fetchone()[0] == "healthy"
