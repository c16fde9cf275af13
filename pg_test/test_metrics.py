"""queue.metrics() and queue.prometheus(): the right numbers for a known state, outcomes counted
per minute and folded into totals, and an exposition that a real Prometheus parser reads and
that matches metrics()."""

import json
import math

from prometheus_client.parser import text_string_to_metric_families

from conftest import bridge_pid, list_key, outbox_applied, stack, wait_for

COLUMNS = ["queue_name", "paused", "queued", "scheduled", "migrated", "running", "retry_scheduled",
           "dead_letters", "redis_high", "redis_normal", "redis_low", "oldest_age_s",
           "completed_last_hour", "retried_last_hour", "failed_last_hour", "cancelled_last_hour",
           "completed_total", "retried_total", "failed_total", "cancelled_total",
           "reports_waiting", "oldest_report_age_ms", "reports_rejected_total"]


def metrics(db):
    cur = db.execute("SELECT * FROM queue.metrics()")
    assert [d.name for d in cur.description] == COLUMNS
    return {row[0]: dict(zip(COLUMNS, row)) for row in cur.fetchall()}


def known_state(db, r):
    """m1: every state; m2: paused with two queued jobs; m3: settings only."""
    db.execute("INSERT INTO queue.queues (queue_name, backoff_base) VALUES ('m1', '1 hour'), ('m3', NULL)")
    db.execute("SELECT queue.pause('m2')")
    ids = [x[0] for x in db.execute("SELECT * FROM queue.enqueue_many('m1', '[1, 2, 3, 4, 5]')").fetchall()]
    db.execute("SELECT queue.enqueue('m1', '6', 'high')")
    dead = db.execute("SELECT queue.enqueue('m1', '7', 'low', max_attempts => 1)").fetchone()[0]
    db.execute("SELECT queue.enqueue('m1', '8', run_at => now() + interval '1 hour')")
    wait_for(lambda: (r.llen(list_key("m1")), r.llen(list_key("m1", "low"))) == (5, 1))
    popped = [json.loads(r.rpop(list_key("m1")))["id"] for _ in range(4)] + [
        json.loads(r.rpop(list_key("m1", "low")))["id"]]
    assert popped == ids[:4] + [dead]
    for job_id in popped:
        db.execute("SELECT * FROM queue.start(%s)", (job_id,))
    db.execute("SELECT queue.complete(%s)", (ids[0],))
    db.execute("SELECT queue.fail(%s, 'again')", (ids[1],))
    db.execute("SELECT queue.cancel(%s)", (ids[3],))
    db.execute("SELECT queue.fail(%s, 'boom')", (dead,))
    db.execute("SELECT * FROM queue.enqueue_many('m2', '[1, 2]', 'low')")
    outbox_applied(db)
    # Outcomes from 90 minutes ago: in the totals, not in the last hour.
    db.execute("INSERT INTO queue.stats VALUES ('m1', date_trunc('minute', now()) - interval '90 minutes', 100, 10, 2, 1)")


def test_metrics_report_a_known_state(db, r):
    known_state(db, r)
    m = metrics(db)
    assert sorted(m) == ["m1", "m2", "m3"]
    m1 = m["m1"]
    assert m1["oldest_age_s"] > 0
    del m1["oldest_age_s"]
    assert m1 == dict(
        queue_name="m1", paused=False, queued=0, scheduled=1, migrated=2, running=1,
        retry_scheduled=1, dead_letters=1, redis_high=1, redis_normal=1, redis_low=0,
        completed_last_hour=1, retried_last_hour=1, failed_last_hour=1, cancelled_last_hour=1,
        completed_total=101, retried_total=11, failed_total=3, cancelled_total=2,
        reports_waiting=0, oldest_report_age_ms=None, reports_rejected_total=0)
    m2 = m["m2"]
    assert m2["paused"] is True and m2["queued"] == 2 and m2["oldest_age_s"] > 0
    assert (m2["redis_high"], m2["redis_normal"], m2["redis_low"]) == (0, 0, 0)
    assert m2["completed_total"] == 0 and m2["dead_letters"] == 0
    m3 = m["m3"]
    assert all(m3[c] == 0 for c in COLUMNS[2:] if c != "oldest_report_age_ms") and m3["paused"] is False
    assert m3["oldest_report_age_ms"] is None

    # health() agrees: the same per-queue figures, summed outcomes of the last hour.
    h = db.execute("SELECT queue.health()").fetchone()[0]
    q = h["queues"]["m1"]
    assert (q["high"], q["normal"], q["low"]) == (1, 1, 0)
    assert (q["queued"], q["scheduled"], q["retry_scheduled"], q["running"]) == (0, 1, 1, 1)
    assert h["recent_jobs"] == {"completed": 1, "failed": 1, "retried": 1, "window": "1 hour"}
    assert h["dead_letter_queue"]["depth"] == 1


def test_metrics_with_redis_unreachable_leave_list_lengths_null(db, r):
    db.execute("SELECT queue.enqueue('down', '1')")
    wait_for(lambda: r.llen(list_key("down")) == 1)
    stack("redis-stop")
    row = metrics(db)["down"]
    assert (row["redis_high"], row["redis_normal"], row["redis_low"]) == (None, None, None)
    assert row["migrated"] == 1


def test_old_minutes_fold_into_totals(db, r):
    db.execute("""INSERT INTO queue.stats VALUES
        ('f1', date_trunc('minute', now()) - interval '3 hours', 5, 1, 1, 0),
        ('f1', date_trunc('minute', now()) - interval '4 hours', 7, 0, 0, 1),
        ('f1', date_trunc('minute', now()) - interval '5 minutes', 1, 0, 0, 0)""")
    before = metrics(db)["f1"]
    # The bridge folds old minutes once a minute, and when it starts.
    db.execute("SELECT pg_terminate_backend(%s)", (bridge_pid(db),))
    wait_for(lambda: db.execute(
        "SELECT count(*) FROM queue.stats WHERE queue_name = 'f1'").fetchone()[0] == 2,
        timeout=20, what="the old minutes folded")
    rows = db.execute("SELECT minute = '-infinity', completed, retried, failed, cancelled FROM queue.stats "
                      "WHERE queue_name = 'f1' ORDER BY minute").fetchall()
    assert rows == [(True, 12, 1, 1, 1), (False, 1, 0, 0, 0)]
    after = metrics(db)["f1"]
    assert after == before
    assert (after["completed_total"], after["completed_last_hour"]) == (13, 1)


def samples(text):
    """{(name, frozenset(labels)): value} and {family: type} from a Prometheus exposition."""
    values, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        assert family.documentation, f"{family.name} has no HELP"
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in values, f"duplicate sample {key}"
            values[key] = s.value
    return values, types


def test_prometheus_output_parses_and_matches_metrics(db, r):
    # The bridge's counters live as long as the server: the test checks what known_state adds.
    before, _ = samples(db.execute("SELECT queue.prometheus()").fetchone()[0])
    known_state(db, r)
    text = db.execute("SELECT queue.prometheus()").fetchone()[0]
    values, types = samples(text)
    m = metrics(db)

    assert types["queue_pg_jobs"] == "gauge"
    assert types["queue_pg_job_outcomes"] == "counter"  # the parser strips _total
    assert types["queue_pg_bridge_dispatched"] == "counter"
    for line in text.splitlines():
        if line.startswith("# TYPE") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line

    def v(name, **labels):
        return values[(name, frozenset(labels.items()))]

    for queue, row in m.items():
        for state, column in [("queued", "queued"), ("scheduled", "scheduled"), ("migrated", "migrated"),
                              ("running", "running"), ("retry_scheduled", "retry_scheduled"),
                              ("failed", "dead_letters")]:
            assert v("queue_pg_jobs", queue=queue, state=state) == row[column], (queue, state)
        for priority in ("high", "normal", "low"):
            assert v("queue_pg_redis_list_jobs", queue=queue, priority=priority) == row[f"redis_{priority}"]
        for state, what in [("completed", "completed"), ("retry_scheduled", "retried"),
                            ("failed", "failed"), ("cancelled", "cancelled")]:
            assert v("queue_pg_job_outcomes_total", queue=queue, state=state) == row[f"{what}_total"]
            assert v("queue_pg_job_outcomes_last_hour", queue=queue, state=state) == row[f"{what}_last_hour"]
        assert v("queue_pg_queue_paused", queue=queue) == (1 if row["paused"] else 0)
        assert v("queue_pg_reports_waiting", queue=queue) == row["reports_waiting"]
        age = v("queue_pg_oldest_waiting_job_age_seconds", queue=queue)
        assert math.isclose(age, row["oldest_age_s"], abs_tol=5), (queue, age, row["oldest_age_s"])

    assert v("queue_pg_bridge_up") == 1 and v("queue_pg_redis_up") == 1
    assert v("queue_pg_report_applier_up") == 1
    assert v("queue_pg_bridge_redis_connected") == 1
    def added(name):
        return v(name) - before[(name, frozenset())]

    assert added("queue_pg_bridge_dispatched_total") == 7
    assert added("queue_pg_bridge_retried_total") == 1 and added("queue_pg_bridge_dead_lettered_total") == 1
    assert v("queue_pg_redis_memory_used_bytes") > 0
