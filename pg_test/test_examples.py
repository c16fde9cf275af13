"""The example workers in examples/ (Python, Node.js, Rust), each started as a real process on
each worker path (the fast path: reports through Redis; the SQL path): a mixed batch enqueued from
SQL ends completed or dead-lettered with the handler's error text, a long job survives on
heartbeats, and SIGTERM mid-job loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ENV, PREFIX, ROOT, wait_for

EXAMPLES = ROOT / "examples"


def build(lang):
    """The worker's command line, after installing it the ecosystem's normal way (a no-op when
    scripts/test.sh already did)."""
    if lang == "python":
        return [sys.executable, str(EXAMPLES / "python" / "worker.py")]
    if lang == "node":
        if not (EXAMPLES / "node" / "node_modules").is_dir():
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                           cwd=EXAMPLES / "node", check=True)
        return ["node", str(EXAMPLES / "node" / "worker.js")]
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=EXAMPLES / "rust", check=True)
    return [str(EXAMPLES / "rust" / "target" / "release" / "queue-pg-worker")]


BUILT = {}


@pytest.fixture(scope="module", params=[(lang, path) for lang in ("python", "node", "rust")
                                        for path in ("fast", "sql")], ids=lambda p: f"{p[0]}-{p[1]}")
def lang(request):
    name, path = request.param
    if name not in BUILT:
        BUILT[name] = build(name)
    return name, path, BUILT[name]


def start_worker(command, path, queue, grace="10"):
    # On the fast path the worker's lease: 2 s, so that the 3 s job lives on heartbeats.
    env = dict(os.environ,
               DATABASE_URL=f"postgresql://postgres@127.0.0.1:{ENV['QPG_PGPORT']}/postgres",
               REDIS_URL=f"redis://127.0.0.1:{ENV['QPG_REDIS_PORT']}",
               QUEUES=queue, SHUTDOWN_GRACE_S=grace, QUEUE_PG_PATH=path, LEASE_S="2")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", "the worker did not start"
    return proc


def stop(proc, timeout=10):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the worker did not stop within {timeout} s of SIGTERM")


def status(db, job_id):
    return db.execute("SELECT status FROM queue.jobs WHERE id = %s", (job_id,)).fetchone()[0]


def enqueue(db, queue, payload, priority="normal"):
    return db.execute("SELECT queue.enqueue(%s, %s, %s)", (queue, json.dumps(payload), priority)).fetchone()[0]


def test_a_mixed_batch_ends_completed_or_dead_lettered(db, r, lang):
    name, path, command = lang
    queue = f"ex_{name}_{path}"
    # Fast retries, and a lease shorter than the slow job: only heartbeats keep it.
    db.execute("""INSERT INTO queue.queues (queue_name, max_attempts, backoff_base, backoff_max, lease)
                  VALUES (%s, 3, '10 ms', '50 ms', '2 s')""", (queue,))
    ok = [enqueue(db, queue, {"n": i}) for i in range(10)]
    ok += [enqueue(db, queue, {"n": 100 + i}, "high") for i in range(2)]
    failing = {enqueue(db, queue, {"fail": f"boom {name} {i}"}): f"boom {name} {i}" for i in range(2)}
    slow = enqueue(db, queue, {"sleep": 3})
    worker = start_worker(command, path, queue)
    try:
        wait_for(lambda: db.execute(
            "SELECT count(*) FROM queue.jobs WHERE queue_name = %s AND status IN ('completed', 'failed')",
            (queue,)).fetchone()[0] == len(ok) + len(failing) + 1, timeout=60, interval=0.1,
            what=f"the {name} worker to finish the batch")
    finally:
        assert stop(worker) == 0
    for job_id in ok + [slow]:
        row = db.execute("SELECT status, attempt_count, result FROM queue.jobs WHERE id = %s", (job_id,)).fetchone()
        assert row[0] == "completed" and row[1] == 0, (job_id, row)
        assert row[2] == {"worker": name, "attempt": 1}
    # The bridge pushes dead-letter entries shortly after the commit that killed the job.
    wait_for(lambda: {json.loads(e)["id"] for e in r.lrange(f"{PREFIX}:deadletter:queue", 0, -1)}
             >= set(failing), what="the dead-letter entries")
    dead_letters = [json.loads(e) for e in r.lrange(f"{PREFIX}:deadletter:queue", 0, -1)]
    for job_id, message in failing.items():
        row = db.execute("SELECT status, attempt_count, last_error_message, errors FROM queue.jobs WHERE id = %s",
                         (job_id,)).fetchone()
        assert row[0] == "failed" and row[1] == 3
        assert message in row[2]
        assert [e["attempt"] for e in row[3]] == [1, 2, 3] and all(message in e["error"] for e in row[3])
        entry = [e for e in dead_letters if e["id"] == job_id]
        assert len(entry) == 1 and message in entry[0]["error"] and entry[0]["attempt_count"] == 3


def test_sigterm_mid_job_loses_nothing(db, r, lang):
    name, path, command = lang
    queue = f"ex_term_{name}_{path}"
    # Within the grace period the job in hand completes, then the worker exits; what still waits
    # in Redis stays there for the next worker.
    worker = start_worker(command, path, queue, grace="10")
    short = enqueue(db, queue, {"sleep": 1.5})
    wait_for(lambda: status(db, short) == "running", what="the job to start")
    waiting = enqueue(db, queue, {"n": 1})
    t0 = time.monotonic()
    assert stop(worker) == 0
    assert time.monotonic() - t0 < 8
    wait_for(lambda: status(db, short) == "completed", what="the job in hand completed")
    wait_for(lambda: status(db, waiting) == "migrated")
    assert r.llen(f"{PREFIX}:{{{queue}}}:normal") == 1

    # Past the grace period the attempt fails, so the job is retried later: not lost.
    db.execute("SELECT queue.cancel(%s)", (waiting,))
    worker = start_worker(command, path, queue, grace="0.5")
    long = enqueue(db, queue, {"sleep": 60})
    wait_for(lambda: status(db, long) == "running", what="the long job to start")
    t0 = time.monotonic()
    assert stop(worker) == 0
    assert time.monotonic() - t0 < 5
    wait_for(lambda: status(db, long) != "running", what="the attempt cut short to be failed")
    row = db.execute("SELECT status, attempt_count, last_error_message FROM queue.jobs WHERE id = %s",
                     (long,)).fetchone()
    assert row == ("retry_scheduled", 1, "worker shut down (SIGTERM) before the job finished")


@pytest.mark.parametrize("path", ["fast", "sql"])
@pytest.mark.parametrize("lang", ["python", "node", "rust"])
def test_example_workers_ride_out_postgres_and_redis_restarts(db, lang, path):
    """Postgres stopped (immediate) for 5 s and started, then Redis stopped for 5 s and started,
    while the worker works through 500 jobs: it never exits, every job ends completed, and its
    log says once per outage that a server went away and once that it is back."""
    from conftest import reconnect_after_restart, set_config, stack

    command = build(lang)
    queue = f"outage_{lang}_{path}"
    # A start that commits as Postgres is killed never answers: the worker's retry finds the job
    # held (by its own lost call) and drops it, and the job comes back when that lease expires.
    set_config(db, lease="15s")
    db.execute("SELECT count(*) FROM queue.enqueue_many(%s, (SELECT jsonb_agg(jsonb_build_object('sleep', 0.02))"
               " FROM generate_series(1, 500)))", (queue,))
    env = dict(os.environ,
               DATABASE_URL=f"postgresql://postgres@127.0.0.1:{ENV['QPG_PGPORT']}/postgres",
               REDIS_URL=f"redis://127.0.0.1:{ENV['QPG_REDIS_PORT']}", QUEUES=queue, QUEUE_PG_PATH=path,
               BATCH="5")
    log_file = Path(ENV["QPG_HOME"]) / f"{queue}.log"
    with open(log_file, "w") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        done = lambda: db.execute("SELECT count(*) FROM queue.jobs WHERE queue_name = %s AND status = 'completed'",
                                  (queue,)).fetchone()[0]
        wait_for(lambda: done() >= 50, timeout=30, what="the first jobs completed")
        db.close()
        stack("pg-kill")
        time.sleep(5)
        stack("pg-start")
        db = reconnect_after_restart()
        assert proc.poll() is None, "the worker exited while Postgres was down"
        wait_for(lambda: done() >= 200, timeout=60, what="jobs completed after Postgres came back")
        stack("redis-stop")
        time.sleep(5)
        stack("redis-start")
        assert proc.poll() is None, "the worker exited while Redis was down"
        wait_for(lambda: done() == 500, timeout=90, interval=0.2, what="all 500 jobs completed")
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    log = log_file.read_text()
    # On the fast path the worker never talks to Postgres.
    pg_lines = 1 if path == "sql" else 0
    assert log.count("Postgres unreachable") == pg_lines, log
    assert log.count("Postgres reachable again") == pg_lines, log
    assert log.count("Redis unreachable") == 1 and log.count("Redis reachable again") == 1, log
