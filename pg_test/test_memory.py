"""queue.optimize_memory(): TTLs for finished jobs' hashes, never touching an unfinished job's
hash, trimming the dead-letter list under memory pressure; the bridge runs it periodically
"""

import json
import time

import psycopg
import pytest

from conftest import PREFIX, set_config, stack, wait_for

FINISHED = 10_000
UNFINISHED = 1_000


def job_key(job_id):
    return f"{PREFIX}:job:{job_id}"


def optimize(db):
    return db.execute("SELECT queue.optimize_memory()").fetchone()[0]


def make_jobs(db, finished, unfinished):
    """Rows straight into queue.jobs (the bridge has nothing to do with them): `finished`
    completed, failed and cancelled jobs, then `unfinished` scheduled and running ones (far in
    the future, so neither promotion nor lease expiry touches them). Returns both id lists."""
    db.execute("""
        INSERT INTO queue.jobs (queue_name, payload, status, max_attempts, completed_at, failed_at)
        SELECT 'mem', '{}', s, 5, CASE WHEN s = 'completed' THEN now() END,
               CASE WHEN s = 'failed' THEN now() END
        FROM generate_series(1, %s) i,
             LATERAL (SELECT (ARRAY['completed', 'failed', 'cancelled'])[1 + i %% 3] AS s) x
        ORDER BY i""", (finished,))
    db.execute("""
        INSERT INTO queue.jobs (queue_name, payload, status, max_attempts, run_at, lease_expires_at)
        SELECT 'mem', '{}', CASE WHEN i %% 2 = 0 THEN 'scheduled' ELSE 'running' END, 5,
               now() + interval '1 day', now() + interval '1 day'
        FROM generate_series(1, %s) i ORDER BY i""", (unfinished,))
    ids = [x[0] for x in db.execute("SELECT id FROM queue.jobs ORDER BY id").fetchall()]
    return ids[:finished], ids[finished:]


def write_hashes(r, ids, status):
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hset(job_key(job_id), mapping={"status": status, "queue": "mem"})
    pipe.execute()


def ttls(r, ids):
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.ttl(job_key(job_id))
    return pipe.execute()


def test_finished_hashes_get_a_ttl_and_unfinished_ones_stay(db, r):
    set_config(db, memory_check_interval="1h")  # the bridge's own run stays out of the way
    finished, unfinished = make_jobs(db, FINISHED, UNFINISHED)
    # Postgres decides, not the hash: half of each side's hashes claim the other side's status.
    write_hashes(r, finished[::2], "completed")
    write_hashes(r, finished[1::2], "running")
    write_hashes(r, unfinished[::2], "completed")
    write_hashes(r, unfinished[1::2], "migrated")
    pruned = [10_000_000 + i for i in range(100)]  # hashes of jobs no longer in Postgres
    write_hashes(r, pruned, "completed")
    r.expire(job_key(finished[0]), 100)  # already has a TTL: left as it is
    r.set(f"{PREFIX}:job:not-a-number", "x")  # not a hash: SCAN's TYPE filter skips it

    report = optimize(db)
    assert set(report) == {"scanned", "expired", "kept", "trimmed", "memory_before", "memory_after", "maxmemory"}
    assert report["scanned"] >= FINISHED + UNFINISHED + len(pruned)  # SCAN may repeat a key
    assert report["expired"] == FINISHED - 1 + len(pruned)
    assert report["kept"] >= UNFINISHED
    assert report["trimmed"] == 0 and report["memory_before"] > 0 and report["memory_after"] > 0
    assert report["maxmemory"] == int(r.config_get("maxmemory")["maxmemory"])

    day = 86_400
    finished_ttls = ttls(r, finished[1:] + pruned)
    assert all(day - 60 < t <= day for t in finished_ttls)
    assert 0 < ttls(r, finished[:1])[0] <= 100
    assert ttls(r, unfinished) == [-1] * UNFINISHED  # every unfinished job's hash stays, no TTL
    assert r.type(f"{PREFIX}:job:not-a-number") == "string"

    again = optimize(db)
    assert again["expired"] == 0 and again["kept"] >= UNFINISHED


def test_dead_letter_list_is_trimmed_under_memory_pressure(db, r):
    set_config(db, memory_check_interval="1h")
    dead = []
    for i in range(20):
        job_id = db.execute("SELECT queue.enqueue('dlq', %s, max_attempts => 1)", (json.dumps(i),)).fetchone()[0]
        db.execute("SELECT * FROM queue.start(%s)", (job_id,))
        db.execute("SELECT queue.fail(%s, 'boom')", (job_id,))
        dead.append(job_id)
    dlq = f"{PREFIX}:deadletter:queue"
    wait_for(lambda: r.llen(dlq) == 20, what="the dead letters in Redis")
    # Older dead letters (at the tail): 3,000 entries of 1 KB.
    filler = [json.dumps({"id": 1_000_000 + i, "error": "x" * 1000}) for i in range(3000)]
    r.rpush(dlq, *filler)
    used = r.info("memory")["used_memory"]
    r.config_set("maxmemory", int(used / 0.9))  # 90 % used
    try:
        report = optimize(db)
        assert report["trimmed"] > 0
        assert report["maxmemory"] == int(used / 0.9)
        assert report["memory_after"] < report["memory_before"]
        length = r.llen(dlq)
        assert length == 3020 - report["trimmed"]
        assert report["memory_after"] <= 0.8 * report["maxmemory"] or length == 0
        # The newest entries (the head) are what stays; Postgres keeps every dead job.
        if length:
            assert json.loads(r.lindex(dlq, 0))["id"] == dead[-1]
        assert db.execute("SELECT count(*) FROM queue.dead_letters").fetchone()[0] == 20
    finally:
        r.config_set("maxmemory", 0)
    # Without pressure nothing is trimmed.
    before = r.llen(dlq)
    assert optimize(db)["trimmed"] == 0 and r.llen(dlq) == before


def test_the_bridge_runs_it_every_memory_check_interval(db, r):
    finished, unfinished = make_jobs(db, 2000, 200)
    write_hashes(r, finished, "completed")
    write_hashes(r, unfinished, "running")
    set_config(db, memory_check_interval="1s")
    wait_for(lambda: -1 not in ttls(r, finished), timeout=15, interval=0.2,
             what="the bridge to give the finished jobs' hashes a TTL")
    assert ttls(r, unfinished) == [-1] * 200


def test_optimize_memory_with_redis_down_is_a_clear_error(db, r):
    stack("redis-stop")
    db.execute("SET queue.redis_timeout = '1s'")
    start = time.monotonic()
    with pytest.raises(psycopg.errors.SqlclientUnableToEstablishSqlconnection) as err:
        optimize(db)
    assert time.monotonic() - start < 2
    assert "Redis" in str(err.value)


def test_optimize_memory_runs_only_in_the_bridges_database(db, r):
    r.hset(f"{PREFIX}:job:1", "status", "running")
    db.execute("DROP DATABASE IF EXISTS qpg_other")
    db.execute("CREATE DATABASE qpg_other")
    try:
        with psycopg.connect(db.info.dsn.replace("dbname=postgres", "dbname=qpg_other"), autocommit=True) as other:
            other.execute("CREATE EXTENSION queue_pg")
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
                other.execute("SELECT queue.optimize_memory()")
            assert 'must run in database "postgres"' in str(err.value)
    finally:
        db.execute("DROP DATABASE qpg_other")
    assert r.ttl(f"{PREFIX}:job:1") == -1
