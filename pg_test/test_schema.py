"""The schema: kept by pg_dump, and indexed so that the bridge's statements do not slow down as
finished jobs pile up."""

import subprocess

from conftest import ENV, wait_for


def test_jobs_and_queues_survive_pg_dump(db):
    db.execute("SELECT queue.enqueue('dumped', '{\"keep\": \"me\"}')")
    db.execute("SELECT queue.pause('dumped')")
    dump = subprocess.run(
        ["/usr/lib/postgresql/15/bin/pg_dump", "-h", ENV["QPG_HOME"], "-p", ENV["QPG_PGPORT"],
         "-U", "postgres", "-d", "postgres"],
        check=True, capture_output=True, text=True).stdout
    assert "CREATE EXTENSION IF NOT EXISTS queue_pg" in dump
    jobs = dump[dump.index("COPY queue.jobs "):]
    assert '{"keep": "me"}' in jobs.split("\\.")[0]
    queues = dump[dump.index("COPY queue.queues "):]
    assert "dumped" in queues.split("\\.")[0]
    assert "queue.jobs_id_seq" in dump[dump.index("SELECT pg_catalog.setval"):]


# The bridge's dispatch read, its promotion of due jobs and its sweep for unannounced queued jobs
# (every 10 s), as pg_stat_statements records them (constants normalized to $n), with the calls
# a test window must see of each.
BRIDGE_STATEMENTS = {
    "dispatch read": ("%FROM queue.jobs j%WHERE j.status = $% AND j.id > $2%ORDER BY j.id%LIMIT $1", 20),
    "promotion": ("%WITH due AS (%FOR UPDATE SKIP LOCKED)%promoted AS (%", 20),
    "sweep": ("%WITH first AS (SELECT min(id) AS id FROM queue.jobs WHERE status = $% AND id > $1)%", 1),
}


def bridge_statement_blocks(db):
    """Shared blocks and calls so far of each statement above, run by the bridge."""
    got = {}
    for name, (pattern, _) in BRIDGE_STATEMENTS.items():
        row = db.execute("""
            SELECT sum(s.shared_blks_hit + s.shared_blks_read)::bigint, sum(s.calls)::bigint
            FROM pg_stat_statements s
            WHERE s.query LIKE %s AND s.query NOT LIKE '%%pg_stat_statements%%'""", (pattern,)).fetchone()
        got[name] = (row[0] or 0, row[1] or 0)  # (0, 0): not run yet
    return got


def blocks_per_call(db, queue):
    """Enqueues 20 jobs one at a time, each dispatched before the next, and waits for a sweep;
    returns the shared blocks the bridge's statements touched per call meanwhile."""
    before = bridge_statement_blocks(db)
    for _ in range(20):
        job = db.execute("SELECT queue.enqueue(%s, '{}')", (queue,)).fetchone()[0]
        wait_for(lambda: db.execute("SELECT status FROM queue.jobs WHERE id = %s", (job,)).fetchone()[0]
                 == "migrated", what="dispatch")
    after = wait_for(lambda: (lambda now: now if now["sweep"][1] > before["sweep"][1] else None)(
        bridge_statement_blocks(db)), timeout=15, interval=0.5, what="a sweep")
    per_call = {}
    for name, (_, least) in BRIDGE_STATEMENTS.items():
        calls = after[name][1] - before[name][1]
        assert calls >= least, (name, calls)
        per_call[name] = (after[name][0] - before[name][0]) / calls
    return per_call


def test_dispatch_cost_does_not_grow_with_finished_jobs(db):
    # No paused backlog here: each sweep step would read its jobs (and their queues), a cost that
    # grows with the backlog, not with finished jobs. That one is bench (b)'s.
    db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    db.execute("VACUUM ANALYZE queue.jobs")
    small = blocks_per_call(db, "idx")

    # 200,000 finished jobs later, the bridge's statements touch about the same pages per call.
    db.execute("""
        INSERT INTO queue.jobs (queue_name, payload, status, max_attempts, completed_at)
        SELECT 'done', jsonb_build_object('n', g), 'completed', 5, now() FROM generate_series(1, 200000) g""")
    db.execute("VACUUM ANALYZE queue.jobs")
    big = blocks_per_call(db, "idx")
    for name in BRIDGE_STATEMENTS:
        assert big[name] <= small[name] + 10, (name, small, big)
