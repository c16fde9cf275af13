"""Redis rebuilt after it lost its data: 2,000 dead jobs and 1,000 unfinished ones, then a
FLUSHALL, and again a Redis restart without persistence. The dead-letter list comes back with
exactly its entries (same fields, newest first, no duplicates), every marker with no more than
the TTL it had left, every unfinished job's hash, and finished jobs' hashes with what is left of
their TTL. A dead job past queue.dead_letter_ttl is not put back."""

import json

import pytest

from conftest import PREFIX, outbox_applied, set_config, stack, wait_for

DL = f"{PREFIX}:deadletter:queue"


def load(db, r):
    """2,000 dead jobs (queue 'gone'), 1,000 unfinished ('live': 700 waiting in Redis, 200
    running, 100 waiting for a retry) and 100 completed ('done')."""
    db.execute("SELECT count(*) FROM queue.enqueue_many('gone', (SELECT jsonb_agg(jsonb_build_object('n', g))"
               " FROM generate_series(1, 2000) g), max_attempts => 1)")
    db.execute("SELECT count(*) FROM queue.enqueue_many('live', (SELECT jsonb_agg(g) FROM generate_series(1, 1000) g))")
    db.execute("SELECT count(*) FROM queue.enqueue_many('done', (SELECT jsonb_agg(g) FROM generate_series(1, 100) g))")
    wait_for(lambda: db.execute("SELECT count(*) = 3100 FROM queue.jobs WHERE status = 'migrated'").fetchone()[0],
             timeout=30, what="3,100 jobs in Redis")
    db.execute("SELECT count(s.id) FROM queue.jobs j, LATERAL queue.start(j.id) s WHERE j.queue_name = 'gone'")
    db.execute("SELECT count(queue.fail(id, 'boom ' || id)) FROM queue.jobs WHERE queue_name = 'gone'")
    db.execute("SELECT count(s.id) FROM queue.jobs j, LATERAL queue.start(j.id) s"
               " WHERE j.queue_name = 'done' OR (j.queue_name = 'live' AND j.id % 10 < 3)")
    db.execute("SET queue.backoff_base = '1h'")
    db.execute("SELECT count(queue.fail(id, 'later')) FROM queue.jobs WHERE queue_name = 'live' AND id % 10 = 0")
    db.execute("SELECT count(queue.complete(id)) FROM queue.jobs WHERE queue_name = 'done'")
    outbox_applied(db, timeout=30)
    wait_for(lambda: r.llen(DL) == 2000, timeout=30, what="2,000 dead-letter entries")


def health(db):
    return db.execute("SELECT queue.health()").fetchone()[0]


def snapshot(db, r):
    dead = [e for e in r.lrange(DL, 0, -1)]
    ids = [row[0] for row in db.execute("SELECT id FROM queue.jobs ORDER BY id").fetchall()]
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.hgetall(f"{PREFIX}:job:{i}")
        pipe.ttl(f"{PREFIX}:job:{i}")
        pipe.ttl(f"{PREFIX}:deadletter:{i}")
    got = pipe.execute()
    hashes = {i: (got[3 * k], got[3 * k + 1]) for k, i in enumerate(ids)}
    markers = {i: got[3 * k + 2] for k, i in enumerate(ids) if got[3 * k + 2] != -2}
    return dead, hashes, markers


def same_hash(before, after):
    """The fields a restore writes, as they were (the bridge's write times aside)."""
    keep = lambda h: {k: v for k, v in h.items() if k not in ("updated_at", "queued_at")}
    return keep(before) == keep(after)


def check_restored(db, r, before):
    dead, hashes, markers = before
    wait_for(lambda: not health(db)["bridge"]["restore"]["running"] and r.llen(DL) == 2000,
             timeout=30, what="the restore to finish")
    now_dead, now_hashes, now_markers = snapshot(db, r)
    # Exactly the entries (same fields), no duplicates, newest first (jobs that died in one
    # statement share their failed_at, and their order among themselves is arbitrary).
    entries = [json.loads(e) for e in now_dead]
    assert sorted(entries, key=lambda e: e["id"]) == sorted((json.loads(e) for e in dead), key=lambda e: e["id"])
    assert len({e["id"] for e in entries}) == len(entries)
    times = [e["failed_at"] for e in entries]
    assert times == sorted(times, reverse=True)
    assert set(now_markers) == set(markers)
    assert all(0 < now_markers[i] <= markers[i] for i in markers), "a marker outlives its TTL"
    states = dict(db.execute("SELECT id, status FROM queue.jobs").fetchall())
    for i, (h, ttl) in hashes.items():
        h2, ttl2 = now_hashes[i]
        assert same_hash(h, h2), (i, h, h2)
        if states[i] in ("completed", "failed"):
            assert 0 < ttl2 <= ttl, (i, ttl, ttl2)
        else:
            assert ttl2 == -1, (i, ttl2)


@pytest.mark.parametrize("loss", ["flushall", "restart"])
def test_redis_is_rebuilt_after_it_lost_its_data(db, r, loss):
    load(db, r)
    before = snapshot(db, r)
    restored = health(db)["bridge"]["restore"]
    if loss == "flushall":
        r.flushall()
    else:
        stack("redis-stop")
        stack("redis-start")
    check_restored(db, r, before)
    after = health(db)["bridge"]["restore"]
    assert after["dead_letters_total"] - restored["dead_letters_total"] == 2000
    # Every hash but those of the 700 jobs dispatched again (dispatch writes theirs).
    assert after["job_hashes_total"] - restored["job_hashes_total"] >= 2400
    # The live jobs waiting in Redis went back into their lists, once each.
    waiting = db.execute("SELECT count(*) FROM queue.jobs WHERE queue_name = 'live' AND status = 'migrated'").fetchone()[0]
    wait_for(lambda: r.llen(f"{PREFIX}:{{live}}:normal") == waiting, what="the live jobs dispatched again")


def test_a_dead_job_past_the_dead_letter_ttl_is_not_put_back(db, r):
    set_config(db, dead_letter_ttl="1h")
    ids = [row[0] for row in db.execute(
        "SELECT * FROM queue.enqueue_many('old', '[1, 2, 3]', max_attempts => 1)").fetchall()]
    wait_for(lambda: db.execute("SELECT count(*) = 3 FROM queue.jobs WHERE status = 'migrated'").fetchone()[0])
    for i in ids:
        db.execute("SELECT * FROM queue.start(%s)", (i,))
        db.execute("SELECT queue.fail(%s, 'boom')", (i,))
    outbox_applied(db)
    wait_for(lambda: r.llen(DL) == 3, what="three dead-letter entries")
    # One of them died two hours ago (as if), the other two just now.
    db.execute("UPDATE queue.jobs SET failed_at = now() - interval '2 hours' WHERE id = %s", (ids[0],))
    r.flushall()
    wait_for(lambda: r.llen(DL) == 2 and not health(db)["bridge"]["restore"]["running"],
             what="the two young entries back")
    assert sorted(json.loads(e)["id"] for e in r.lrange(DL, 0, -1)) == ids[1:]
    assert not r.exists(f"{PREFIX}:deadletter:{ids[0]}")
    assert all(0 < r.ttl(f"{PREFIX}:deadletter:{i}") <= 3600 for i in ids[1:])
