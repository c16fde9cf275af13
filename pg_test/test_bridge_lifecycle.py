"""The bridge's own life: SIGTERM, SIGHUP, and the extension missing from its database."""

import os
import time

from conftest import bridge_pid, list_ids, list_key, set_config, stack, wait_for


def test_sigterm_stops_the_bridge_promptly_and_it_comes_back(db, r):
    pid = bridge_pid(db)
    start = time.monotonic()
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(lambda: bridge_pid(db) != pid, timeout=5, interval=0.01, what="the bridge to exit")
    assert time.monotonic() - start < 1.5
    new_pid = wait_for(lambda: bridge_pid(db), timeout=15, what="the bridge to be restarted")
    assert db.execute("SELECT queue.health()->'bridge'->>'pid'").fetchone()[0] == str(new_pid)
    job_id = db.execute("SELECT queue.enqueue('after_term', '{}')").fetchone()[0]
    wait_for(lambda: r.llen(list_key("after_term")) == 1, what="a job dispatched by the new bridge")
    assert list_ids(r, "after_term") == [job_id]


def test_sighup_rereads_settings(db, r):
    # Point the bridge at a port where no Redis listens: jobs stay in Postgres.
    set_config(db, redis_url="redis://127.0.0.1:1")
    job_id = db.execute("SELECT queue.enqueue('reload', '{}')").fetchone()[0]
    time.sleep(1.5)
    assert r.llen(list_key("reload")) == 0
    assert db.execute("SELECT status FROM queue.jobs WHERE id = %s", (job_id,)).fetchone()[0] == "queued"
    # Reset to the configured URL and reload: the job goes out.
    log_path = f"{__import__('conftest').ENV['QPG_HOME']}/postgres.log"
    offset = os.path.getsize(log_path)
    db.execute("ALTER SYSTEM RESET queue.redis_url")
    db.execute("SELECT pg_reload_conf()")
    wait_for(lambda: r.llen(list_key("reload")) == 1, timeout=10, what="the job after the reload")
    with open(log_path) as f:
        f.seek(offset)
        port = r.connection_pool.connection_kwargs["port"]
        assert f"Redis connection settings changed; now redis://127.0.0.1:{port}" in f.read()


def test_redis_password_never_logged(db, r):
    log_path = f"{__import__('conftest').ENV['QPG_HOME']}/postgres.log"
    offset = os.path.getsize(log_path)
    set_config(db, redis_url="redis://:s3cret-pw@127.0.0.1:1")
    db.execute("SELECT queue.enqueue('pw', '{}')")
    time.sleep(1)
    db.execute("ALTER SYSTEM RESET queue.redis_url")
    db.execute("SELECT pg_reload_conf()")
    wait_for(lambda: r.llen(list_key("pw")) == 1, timeout=10)
    with open(log_path) as f:
        f.seek(offset)
        lines = f.read().splitlines()
    assert any("redis://:***@127.0.0.1:1" in l for l in lines), "the redacted URL is logged"
    # Every line since, but Postgres's own "parameter changed" line on reload, which the
    # extension does not write.
    ours = [l for l in lines if 'parameter "queue.redis_url" changed to' not in l]
    assert not any("s3cret-pw" in l for l in ours), [l for l in ours if "s3cret-pw" in l]


def test_bridge_waits_while_the_extension_is_absent(db, r):
    db.execute("DROP EXTENSION queue_pg")
    try:
        time.sleep(1.5)  # the bridge notices, logs once, and keeps running
        pid = bridge_pid(db)
        assert pid is not None
        time.sleep(1.5)
        assert bridge_pid(db) == pid, "the bridge crashed or restarted while the extension was absent"
    finally:
        db.execute("CREATE EXTENSION queue_pg")
    job_id = db.execute("SELECT queue.enqueue('back', '{}')").fetchone()[0]
    wait_for(lambda: r.llen(list_key("back")) == 1, timeout=10, what="dispatch after CREATE EXTENSION")
    assert list_ids(r, "back") == [job_id]
