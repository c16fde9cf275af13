"""Soak: 20,000 jobs, 4 real worker processes, 10 % of attempts fail."""

import collections
import signal

from conftest import list_key, spawn_worker, wait_for

N = 20_000


def test_soak_every_job_ends_once(db, r, tmp_path):
    db.execute("INSERT INTO queue.queues (queue_name, backoff_base, backoff_max) VALUES ('soak', '5 ms', '50 ms')")
    assert db.execute(f"""SELECT count(*) FROM queue.enqueue_many('soak',
        (SELECT jsonb_agg(jsonb_build_object('n', g)) FROM generate_series(1, {N}) g), 'normal', 2)""").fetchone()[0] == N
    outs = [tmp_path / f"worker{i}.txt" for i in range(4)]
    workers = [spawn_worker("work", "soak", out, FAIL_RATE="0.1") for out in outs]
    try:
        wait_for(lambda: db.execute(
            "SELECT count(*) FROM queue.jobs WHERE status IN ('completed', 'failed')").fetchone()[0] == N,
            timeout=240, interval=0.5, what="every job to end")
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            assert w.wait(timeout=30) == 0

    states = dict(db.execute("SELECT status, count(*) FROM queue.jobs GROUP BY status").fetchall())
    assert set(states) <= {"completed", "failed"} and sum(states.values()) == N, states
    assert states.get("failed", 0) > 0, "with 10 % failures and 2 attempts some jobs must die"

    completions = collections.Counter(int(x) for out in outs for x in out.read_text().split())
    assert max(completions.values()) == 1, "a job was completed twice"
    completed = {x[0] for x in db.execute("SELECT id FROM queue.jobs WHERE status = 'completed'").fetchall()}
    assert set(completions) == completed
    # Each dead job failed both its attempts, with the handler's error.
    bad = db.execute("""SELECT count(*) FROM queue.jobs WHERE status = 'failed'
                        AND (attempt_count <> 2 OR jsonb_array_length(errors) <> 2)""").fetchone()[0]
    assert bad == 0
    for p in ("high", "normal", "low"):
        assert r.llen(list_key("soak", p)) == 0
    wait_for(lambda: r.llen("queue_pg:deadletter:queue") == states["failed"], what="one DLQ entry per dead job")
