"""The schema: kept by pg_dump, and indexed so that dispatch does not slow down as finished jobs
pile up."""

import subprocess

from conftest import ENV


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


def buffers_touched(db, sql):
    plan = db.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}").fetchone()[0][0]["Plan"]
    return plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)


# The bridge's dispatch read (src/bridge/dispatch.rs, READ_BATCH) and promotion scan
# (src/bridge/promote.rs, PROMOTE_DUE), with their parameters filled in.
DISPATCH_READ = """
    SELECT j.id, j.queue_name, j.priority, j.payload::text, j.attempt_count, j.max_attempts, j.created_at
    FROM queue.jobs j
    WHERE j.status = 'queued' AND j.id > 0
      AND NOT EXISTS (SELECT 1 FROM queue.queues q WHERE q.queue_name = j.queue_name AND q.paused)
    ORDER BY j.id LIMIT 500"""
DUE_SCAN = """
    SELECT id FROM queue.jobs
    WHERE status IN ('scheduled', 'retry_scheduled') AND run_at <= now()
    ORDER BY run_at LIMIT 10000"""


def test_dispatch_cost_does_not_grow_with_finished_jobs(db):
    db.execute("SELECT queue.pause('idx')")
    db.execute("SELECT count(*) FROM queue.enqueue_many('idx', (SELECT jsonb_agg(g) FROM generate_series(1, 100) g))")
    db.execute("VACUUM ANALYZE queue.jobs")
    small = buffers_touched(db, DISPATCH_READ), buffers_touched(db, DUE_SCAN)

    # 200,000 finished jobs later, the same scans touch about the same pages.
    db.execute("""
        INSERT INTO queue.jobs (queue_name, payload, status, max_attempts, completed_at)
        SELECT 'done', jsonb_build_object('n', g), 'completed', 5, now() FROM generate_series(1, 200000) g""")
    db.execute("VACUUM ANALYZE queue.jobs")
    big = buffers_touched(db, DISPATCH_READ), buffers_touched(db, DUE_SCAN)
    assert big[0] <= small[0] + 10, (small, big)
    assert big[1] <= small[1] + 10, (small, big)
