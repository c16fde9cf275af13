"""Upgrades: 0.1.0, built from its git tag, installed and used; then the current build installed
and `ALTER EXTENSION queue_pg UPDATE` run on a database with jobs in every state and their Redis
entries.

Runs its own cluster and redis-server (other ports) and swaps the installed extension files: the
0.1.0 package (scripts/build_release.sh 0.1.0, which scripts/test.sh runs) in, then the current
build back. Files are replaced by rename, never rewritten in place, so the suite's own cluster,
which has the current library mapped, is not disturbed; the current files are put back at the end
whatever happens.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
import redis as redis_py

from conftest import ENV as SUITE_ENV, ROOT, STACK, PREFIX, list_ids, wait_for

FROM_VERSION = "0.1.0"
RELEASE_TREE = ROOT / "target" / "releases" / FROM_VERSION
PG_CONFIG = "/usr/lib/postgresql/15/bin/pg_config"

ENV = dict(
    SUITE_ENV,
    QPG_HOME=SUITE_ENV["QPG_HOME"] + "_upgrade",
    QPG_PGPORT=str(int(SUITE_ENV["QPG_PGPORT"]) + 1),
    QPG_REDIS_PORT=str(int(SUITE_ENV["QPG_REDIS_PORT"]) + 1),
    QPG_EXTRA_PRELOAD="",
)


def pg_config(flag):
    return subprocess.run([PG_CONFIG, flag], check=True, capture_output=True, text=True).stdout.strip()


LIBDIR = Path(pg_config("--pkglibdir"))
EXTDIR = Path(pg_config("--sharedir")) / "extension"


def installed_files():
    return [LIBDIR / "queue_pg.so", *sorted(EXTDIR.glob("queue_pg.control")), *sorted(EXTDIR.glob("queue_pg--*.sql"))]


def put(src, dest):
    """Replaces dest by a copy of src through a rename (a mapped library keeps its old file)."""
    tmp = dest.with_name(dest.name + ".upgrade-test")
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def install_tree(tree):
    """Installs a `cargo pgrx package` tree (its usr/ mirrors the system's)."""
    for f in installed_files():
        if f.suffix == ".sql":
            f.unlink()
    for src in (tree / "usr").rglob("*"):
        if src.is_file():
            put(src, Path("/") / src.relative_to(tree))


def stack(*args):
    subprocess.run([str(STACK), *args], env=ENV, check=True, stdout=subprocess.DEVNULL)


def dsn(db="postgres"):
    return f"host={ENV['QPG_HOME']} port={ENV['QPG_PGPORT']} user=postgres dbname={db}"


def connect(db="postgres"):
    return psycopg.connect(dsn(db), autocommit=True)


def server_log():
    return (Path(ENV["QPG_HOME"]) / "postgres.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def swapped_install():
    if not (RELEASE_TREE / ".built").exists():
        pytest.fail(f"no {FROM_VERSION} package: run scripts/build_release.sh {FROM_VERSION} first")
    saved = Path(tempfile.mkdtemp(prefix="queue_pg_current_"))
    current = installed_files()
    assert (LIBDIR / "queue_pg.so") in current and any(f.name == "queue_pg.control" for f in current)
    for f in current:
        shutil.copy2(f, saved / f.name)
    try:
        install_tree(RELEASE_TREE)
        yield saved
    finally:
        try:
            stack("down")
        finally:
            for f in installed_files():
                if f.suffix == ".sql":
                    f.unlink()
            for f in saved.iterdir():
                put(f, (LIBDIR if f.suffix == ".so" else EXTDIR) / f.name)
            shutil.rmtree(saved)


def dead_letter_ids(r):
    return [json.loads(e)["id"] for e in r.lrange(f"{PREFIX}:deadletter:queue", 0, -1)]


def jobs_snapshot(db):
    """Every job with what a user sees of it: state, counts, history, payload, timestamps."""
    return db.execute(
        """SELECT id, queue_name, payload, priority, status, attempt_count, max_attempts, run_at,
                  dedupe_key, created_at, started_at, lease_expires_at, completed_at, failed_at,
                  last_error_message, result, errors
           FROM queue.jobs ORDER BY id"""
    ).fetchall()


def schema_dump(db):
    """`pg_dump --schema-only` of one database, with the extension's member objects spelled out
    (--binary-upgrade: a plain dump shows only CREATE EXTENSION, which would prove nothing), minus
    what differs between any two databases: object ids, sequence positions (data) and the
    \\connect to the database by name."""
    out = subprocess.run(
        ["pg_dump", "--schema-only", "--binary-upgrade", "--no-comments", "-d", dsn(db)],
        check=True, capture_output=True, text=True,
    ).stdout
    # pg_upgrade's bookkeeping: oids, the tables' frozen xids, the dump's one-time token.
    out = re.sub(r"UPDATE pg_catalog\.pg_class\nSET relfrozenxid = [^\n]*\nWHERE oid = [^\n]*\n", "", out)
    kept = []
    for line in out.splitlines():
        if ("binary_upgrade_set_next_" in line or "pg_catalog.setval(" in line
                or line.startswith(("--", "\\connect", "\\restrict", "\\unrestrict"))):
            continue
        # The config tables' oids in binary_upgrade_create_empty_extension.
        kept.append(re.sub(r"'\{[0-9,]+\}'", "'{oids}'", line))
    return "\n".join(l for l in kept if l.strip())


def test_update_from_0_1_0_keeps_every_job_and_ends_at_a_fresh_schema(swapped_install):
    stack("up")  # initdb, Redis, CREATE EXTENSION queue_pg: 0.1.0 is what is installed now
    r = redis_py.Redis(port=int(ENV["QPG_REDIS_PORT"]), decode_responses=True)
    db = connect()
    assert db.execute("SELECT extversion FROM pg_extension WHERE extname = 'queue_pg'").fetchone()[0] == FROM_VERSION

    # Jobs in every state, through 0.1.0's own API and bridge.
    db.execute("INSERT INTO queue.queues (queue_name, backoff_base) VALUES ('slow', interval '1 hour')")
    db.execute("INSERT INTO queue.queues (queue_name, paused) VALUES ('held', true)")
    q = lambda sql, *a: db.execute(sql, a).fetchone()[0]
    queued = q("SELECT queue.enqueue('held', '{\"n\": 1}')")
    scheduled = q("SELECT queue.enqueue('live', '{\"n\": 2}', run_at => now() + interval '1 day')")
    migrated, running, completed, retrying, dead, cancelled, replayed = [
        q("SELECT queue.enqueue(%s, %s::jsonb, %s, %s)", queue, f'{{"n": {n}}}', prio, attempts)
        for n, (queue, prio, attempts) in enumerate(
            [("live", "normal", 5), ("live", "high", 5), ("live", "low", 5), ("slow", "normal", 5),
             ("live", "normal", 1), ("live", "normal", 5), ("live", "normal", 1)], start=3)
    ]
    wait_for(lambda: q("SELECT count(*) FROM queue.jobs WHERE status = 'migrated'") == 7,
             what="0.1.0's bridge to dispatch")
    db.execute("SELECT * FROM queue.start(%s, interval '1 hour')", (running,))
    for job in (completed, retrying, dead, replayed):
        db.execute("SELECT * FROM queue.start(%s)", (job,))
    db.execute("SELECT queue.complete(%s, '{\"ok\": true}')", (completed,))
    db.execute("SELECT queue.fail(%s, 'flaky')", (retrying,))
    db.execute("SELECT queue.fail(%s, 'boom')", (dead,))
    db.execute("SELECT queue.fail(%s, 'first life')", (replayed,))
    db.execute("SELECT queue.replay_dead(%s)", (replayed,))
    wait_for(lambda: dead in dead_letter_ids(r), what="the dead job's dead-letter entry")
    wait_for(lambda: replayed in list_ids(r, "live"), what="the replayed job back in Redis")
    wait_for(lambda: q("SELECT count(*) FROM queue.redis_outbox") == 0, what="the outbox to drain")

    # Changes Redis has not followed yet: made while Redis holds every write, so they are still
    # in the outbox when the server stops, and the 0.2.0 bridge must apply them.
    r.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
    paused_at = time.monotonic()
    try:
        with connect() as other:
            assert other.execute("SELECT queue.cancel(%s)", (cancelled,)).fetchone()[0] is True
        assert q("SELECT count(*) FROM queue.redis_outbox") >= 1
        states = dict(db.execute("SELECT status, count(*) FROM queue.jobs GROUP BY status").fetchall())
        assert states == {"queued": 1, "scheduled": 1, "migrated": 2, "running": 1, "completed": 1,
                          "retry_scheduled": 1, "failed": 1, "cancelled": 1}, states
        before = jobs_snapshot(db)
        assert dict((row[0], row[16]) for row in before)[replayed][0]["error"] == "first life"
        db.close()

        # The current build: library first (a restart), SQL objects still 0.1.0's.
        stack("pg-stop")
        for f in swapped_install.iterdir():
            put(f, (LIBDIR if f.suffix == ".so" else EXTDIR) / f.name)
        stack("pg-start")
        db = connect()
        health = q("SELECT queue.health()")
        assert health["status"] == "unhealthy", health
        assert health["sql_version"] == FROM_VERSION and health["version"] != FROM_VERSION, health
        assert "ALTER EXTENSION queue_pg UPDATE" in health["error"], health
        for call in ["SELECT queue.enqueue('live', '{}')", "SELECT queue.pause('live')",
                     "SELECT queue.replay_dead_all()", "SELECT * FROM queue.metrics()"]:
            with pytest.raises(psycopg.Error) as err:
                db.execute(call)
            assert err.value.sqlstate == "55000", (call, err.value)
            assert "ALTER EXTENSION queue_pg UPDATE" in str(err.value), call
        wait_for(lambda: re.search(r"queue_pg bridge: waiting .*version 0\.1\.0; run ALTER EXTENSION", server_log()),
                 what="the bridge to say why it waits")
        assert jobs_snapshot(db) == before, "nothing changed while the versions differ"

        db.execute("ALTER EXTENSION queue_pg UPDATE")
        version = q("SELECT extversion FROM pg_extension WHERE extname = 'queue_pg'")
        assert version == health["version"], version
        assert jobs_snapshot(db) == before, "every job keeps its state and history"
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
    assert time.monotonic() - paused_at < 55, "Redis was unpaused by its own timeout, not the test"

    # Redis follows the changes 0.1.0 left in the outbox; what 0.1.0 put in Redis is still used.
    wait_for(lambda: r.hget(f"{PREFIX}:job:{cancelled}", "status") == "cancelled", timeout=15,
             what="the cancel made before the update to reach Redis")
    wait_for(lambda: q("SELECT count(*) FROM queue.redis_outbox") == 0, what="the outbox to drain")
    assert r.exists(f"{PREFIX}:deadletter:{dead}")
    assert r.hget(f"{PREFIX}:job:{running}", "status") == "running"

    # The bridge goes on dispatching: the held queue, and new jobs.
    db.execute("SELECT queue.resume('held')")
    fresh = q("SELECT queue.enqueue('live', '{\"n\": 99}')")
    wait_for(lambda: queued in list_ids(r, "held") and fresh in list_ids(r, "live"),
             what="the 0.2.0 bridge to dispatch")
    # Workers finish jobs 0.1.0 dispatched, by SQL and by the fast path.
    db.execute("SELECT * FROM queue.start(%s)", (migrated,))
    db.execute("SELECT queue.complete(%s)", (migrated,))
    db.execute("SELECT queue.complete(%s)", (running,))
    r.xadd(f"{PREFIX}:{{live}}:reports", {"id": replayed, "attempt": 1, "op": "complete"})
    wait_for(lambda: q("SELECT status FROM queue.jobs WHERE id = %s", replayed) == "completed",
             what="a fast-path report on a job 0.1.0 replayed")
    done = dict(db.execute("SELECT id, status FROM queue.jobs").fetchall())
    assert done[migrated] == done[running] == "completed"
    assert q("SELECT errors FROM queue.jobs WHERE id = %s", replayed)[0]["error"] == "first life"
    assert q("SELECT queue.health()")["status"] in ("healthy", "degraded")  # degraded: a dead job

    # The schema after the update is a fresh install's.
    db.execute("CREATE DATABASE fresh")
    with connect("fresh") as f:
        f.execute("CREATE EXTENSION queue_pg")
    upgraded, installed = schema_dump("postgres"), schema_dump("fresh")
    assert "CREATE TABLE queue.jobs" in installed and "ALTER EXTENSION queue_pg ADD" in installed
    dumps = Path(ENV["QPG_HOME"])
    (dumps / "schema_fresh.sql").write_text(installed)
    (dumps / "schema_updated.sql").write_text(upgraded)
    if upgraded != installed:
        import difflib
        diff = "\n".join(difflib.unified_diff(installed.splitlines(), upgraded.splitlines(),
                                              "fresh install", "updated", lineterm="", n=2))
        pytest.fail("the updated schema differs from a fresh install's:\n" + diff[:6000])
    db.close()
