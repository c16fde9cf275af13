"""High availability: a primary and a streaming standby (pg_basebackup on loopback), both with
queue_pg preloaded. The standby runs neither the bridge nor the report applier, answers health()
and says it is a standby, and refuses writes with the standard read-only error. Jobs committed on
the primary, the primary killed (immediate shutdown) while the bridge dispatches, the standby
promoted: its bridge starts within seconds, every job reaches Redis from it, and a worker on the
SQL path completes each exactly once (the deliveries whose `migrated` mark did not reach the
standby come twice; `start` drops the second).

Runs its own primary, standby and redis-server, on other ports than the suite's."""

import json
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
import redis as redis_py

from conftest import ENV as SUITE_ENV, STACK, list_key, wait_for

ENV = dict(
    SUITE_ENV,
    QPG_HOME=SUITE_ENV["QPG_HOME"] + "_ha",
    QPG_PGPORT=str(int(SUITE_ENV["QPG_PGPORT"]) + 4),
    QPG_REDIS_PORT=str(int(SUITE_ENV["QPG_REDIS_PORT"]) + 3),
    QPG_EXTRA_PRELOAD="",
)
STANDBY_PORT = int(SUITE_ENV["QPG_PGPORT"]) + 5
BIN = "/usr/lib/postgresql/15/bin"
HOME = Path(ENV["QPG_HOME"])
STANDBY = HOME / "standby"
QUEUE = "ha"
JOBS = 5000


def stack(*args):
    subprocess.run([str(STACK), *args], env=ENV, check=True, stdout=subprocess.DEVNULL)


def as_postgres(*args):
    subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def connect(port):
    return psycopg.connect(f"host={HOME} port={port} user=postgres dbname=postgres", autocommit=True)


def workers_of(db):
    return {row[0] for row in db.execute(
        "SELECT backend_type FROM pg_stat_activity WHERE backend_type LIKE 'queue_pg %'").fetchall()}


@pytest.fixture
def primary_and_standby():
    stack("up")
    as_postgres(f"{BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", ENV["QPG_PGPORT"], "-U", "postgres",
                "-D", str(STANDBY), "-R", "-X", "stream", "--no-sync")
    with open(STANDBY / "postgresql.conf", "a") as conf:
        conf.write(f"port = {STANDBY_PORT}\n")
    as_postgres(f"{BIN}/pg_ctl", "-D", str(STANDBY), "-l", str(HOME / "standby.log"), "-w", "start")
    try:
        yield
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", f"{BIN}/pg_ctl", "-D", str(STANDBY),
                        "-m", "immediate", "-w", "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack("down")


def replayed_up_to(standby, lsn):
    return standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]


def test_the_standby_waits_and_takes_over_without_losing_or_repeating_a_job(primary_and_standby):
    r = redis_py.Redis(port=int(ENV["QPG_REDIS_PORT"]), decode_responses=True)
    primary, standby = connect(ENV["QPG_PGPORT"]), connect(STANDBY_PORT)
    wait_for(lambda: workers_of(primary) == {"queue_pg bridge", "queue_pg reports"},
             what="the primary's bridge and applier")

    # The standby: no bridge, no applier; health() answers and says what it is; writes fail.
    assert standby.execute("SELECT pg_is_in_recovery()").fetchone()[0]
    time.sleep(1)
    assert workers_of(standby) == set()
    h = standby.execute("SELECT queue.health()").fetchone()[0]
    assert h["role"] == "standby" and h["bridge"]["status"] == "standby", h
    assert h["reports"]["applier"] == "standby" and h["status"] == "healthy", h
    for call in ["SELECT queue.enqueue('ha', '{}')", "SELECT queue.enqueue_many('ha', '[1]')",
                 "SELECT queue.pause('ha')", "SELECT queue.replay_dead_all()", "SELECT queue.cancel(1)",
                 "SELECT * FROM queue.start(1)", "SELECT queue.complete_many('{1}')",
                 "SELECT queue.optimize_memory()"]:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            standby.execute(call)
    assert primary.execute("SELECT queue.health()").fetchone()[0]["role"] == "primary"

    # Jobs committed on the primary while its bridge dispatches them; every commit replicated;
    # then the primary dies at once, its latest `migrated` marks possibly not replicated.
    ids = []
    for start in range(0, JOBS, 500):
        payloads = json.dumps([{"n": n} for n in range(start, start + 500)])
        ids += [row[0] for row in primary.execute(
            "SELECT * FROM queue.enqueue_many(%s, %s)", (QUEUE, payloads)).fetchall()]
    lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    wait_for(lambda: replayed_up_to(standby, lsn), what="the standby to replay every job")
    subprocess.run([str(STACK), "pg-kill"], env=ENV, check=True)
    primary.close()
    on_primary_redis = sum(r.llen(list_key(QUEUE, p)) for p in ("high", "normal", "low"))

    # Promotion: the bridge and the applier start within seconds.
    promoted_at = time.monotonic()
    as_postgres(f"{BIN}/pg_ctl", "-D", str(STANDBY), "-w", "promote")
    wait_for(lambda: workers_of(standby) == {"queue_pg bridge", "queue_pg reports"}, timeout=10,
             what="the bridge to start after promotion")
    took = time.monotonic() - promoted_at
    assert standby.execute("SELECT queue.health()").fetchone()[0]["role"] == "primary"

    # Workers on the SQL path drain Redis; each job is started and completed once.
    done, dropped, lock = [], [0], threading.Lock()

    def work():
        rr = redis_py.Redis(port=int(ENV["QPG_REDIS_PORT"]), decode_responses=True)
        with connect(STANDBY_PORT) as db:
            while True:
                got = rr.brpop([list_key(QUEUE, p) for p in ("high", "normal", "low")], timeout=2)
                if got is None:
                    if db.execute("SELECT count(*) FROM queue.jobs WHERE status <> 'completed'").fetchone()[0] == 0:
                        return
                    continue
                job = json.loads(got[1])["id"]
                if db.execute("SELECT * FROM queue.start(%s)", (job,)).fetchone() is None:
                    with lock:
                        dropped[0] += 1
                    continue
                db.execute("SELECT queue.complete(%s)", (job,))
                with lock:
                    done.append(job)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "the workers did not finish"
    assert sorted(done) == sorted(ids), "each job completed exactly once"
    states = dict(standby.execute("SELECT status, count(*) FROM queue.jobs GROUP BY status").fetchall())
    assert states == {"completed": JOBS}, states
    print(f"\nbridge started {took:.2f} s after promote; {on_primary_redis} messages in Redis at the "
          f"crash; {dropped[0]} duplicate deliveries dropped by start")
