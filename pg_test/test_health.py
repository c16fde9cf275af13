"""queue.health(): the documented shape and numbers, Redis down or hanging, the bridge stopped or
stalled."""

import json
import os
import signal
import socket
import threading
import time

from conftest import ENV, bridge_pid, list_key, outbox_applied, set_config, stack, wait_for


def health(db):
    return db.execute("SELECT queue.health()").fetchone()[0]


def test_health_reports_a_known_state(db, r):
    before = health(db)["bridge"]  # its totals live as long as the server
    dispatched_before = before["dispatched_total"]
    db.execute("INSERT INTO queue.queues (queue_name, backoff_base) VALUES ('h1', '1 hour')")
    db.execute("SELECT queue.pause('h2')")
    # h1: 2 in Redis (normal, high), 1 running, 1 retrying, 1 scheduled, 1 completed, 1 dead
    ids = [x[0] for x in db.execute("SELECT * FROM queue.enqueue_many('h1', '[1, 2, 3, 4]')").fetchall()]
    db.execute("SELECT queue.enqueue('h1', '5', 'high')")
    db.execute("SELECT queue.enqueue('h1', '6', run_at => now() + interval '1 hour')")
    dead = db.execute("SELECT queue.enqueue('h1', '7', max_attempts => 1)").fetchone()[0]
    wait_for(lambda: r.llen(list_key("h1")) == 5)
    # A worker took the normal list's first four messages and started all but ids[3], which it
    # put back; the high one waits.
    taken = [json.loads(r.rpop(list_key("h1"))) for _ in range(5)]
    assert [m["id"] for m in taken] == ids + [dead]
    r.rpush(list_key("h1"), json.dumps(taken[3]))
    for job_id in (ids[0], ids[1], ids[2], dead):
        db.execute("SELECT * FROM queue.start(%s)", (job_id,))
    db.execute("SELECT queue.fail(%s, 'again')", (ids[1],))
    db.execute("SELECT queue.complete(%s)", (ids[2],))
    db.execute("SELECT queue.fail(%s, 'dead')", (dead,))
    # h2 (paused): 2 queued in Postgres
    db.execute("SELECT * FROM queue.enqueue_many('h2', '[1, 2]', 'low')")
    outbox_applied(db)  # outcomes are counted as the bridge applies them

    h = health(db)
    assert set(h) == {"timestamp", "status", "reasons", "version", "role", "redis", "queues", "recent_jobs",
                      "dead_letter_queue", "bridge", "reports"}
    assert h["reasons"] == ["jobs died in the last hour: 1"], h["reasons"]
    assert h["role"] == "primary"
    assert h["version"] == db.execute("SELECT extversion FROM pg_extension WHERE extname = 'queue_pg'").fetchone()[0]
    assert set(h["redis"]) == {"status", "ping", "memory_used", "memory_used_percentage", "maxmemory_policy",
                               "connected_clients", "mode", "nodes", "error"}
    assert h["redis"]["maxmemory_policy"] == "noeviction"
    assert h["redis"]["mode"] == "standalone"
    [node] = h["redis"]["nodes"]
    assert node["addr"] == f"127.0.0.1:{ENV['QPG_REDIS_PORT']}" and node["role"] == "master", node
    assert node["reachable"] and node["error"] is None and node["memory_used"] > 0, node
    assert h["redis"]["status"] == "healthy" and h["redis"]["ping"] == "PONG" and h["redis"]["error"] is None
    assert isinstance(h["redis"]["memory_used"], int) and h["redis"]["memory_used"] > 0
    assert isinstance(h["redis"]["connected_clients"], int)
    q1, q2 = h["queues"]["h1"], h["queues"]["h2"]
    assert set(q1) == {"high", "normal", "low", "queued", "scheduled", "retry_scheduled", "running", "oldest_age_s",
                       "migrated", "missing", "stranded", "status", "reports_waiting", "oldest_report_age_ms"}
    assert (q1["high"], q1["normal"], q1["low"]) == (1, 1, 0)
    # Both migrated jobs are in their lists; nothing is stranded.
    assert (q1["migrated"], q1["missing"], q1["stranded"], q1["status"]) == (2, 0, 0, "healthy"), q1
    assert (q1["queued"], q1["scheduled"], q1["retry_scheduled"], q1["running"]) == (0, 1, 1, 1)
    assert (q2["high"], q2["normal"], q2["low"], q2["queued"]) == (0, 0, 0, 2)
    assert (q1["migrated"], q1["reports_waiting"], q1["oldest_report_age_ms"]) == (2, 0, None)
    assert h["reports"]["applier"] == "running" and h["reports"]["rejected"] == {}
    assert q2["oldest_age_s"] > 0
    assert h["recent_jobs"] == {"completed": 1, "failed": 1, "retried": 1, "window": "1 hour"}
    assert h["dead_letter_queue"]["depth"] == 1 and h["dead_letter_queue"]["oldest_failed_at"]
    b = h["bridge"]
    assert set(b) == {"status", "pid", "last_cycle_at", "lag_ms", "dispatched_total", "push_batches_total",
                      "push_round_trips_total", "restore", "errors_total", "last_error"}
    assert set(b["restore"]) == {"running", "dead_letters_total", "job_hashes_total"}
    assert b["restore"]["running"] is False
    # One server: one round trip per batch.
    batches = b["push_batches_total"] - before["push_batches_total"]
    assert b["push_round_trips_total"] - before["push_round_trips_total"] == batches > 0, b
    assert b["status"] == "running" and b["pid"] == bridge_pid(db)
    assert b["dispatched_total"] - dispatched_before == 6 and isinstance(b["lag_ms"], int)
    assert h["status"] == "degraded"  # a job died in the last hour


def test_health_is_healthy_when_all_is_well(db, r):
    db.execute("SELECT queue.enqueue('fine', '1')")
    wait_for(lambda: r.llen(list_key("fine")) == 1)
    h = health(db)
    assert h["status"] == "healthy" and h["reasons"] == [], h


def test_an_evicting_redis_makes_health_degraded_and_the_bridge_warns_once(db, r):
    log = os.path.join(ENV["QPG_HOME"], "postgres.log")
    size = os.path.getsize(log)
    set_config(db, memory_check_interval="1s")
    r.config_set("maxmemory-policy", "allkeys-lru")
    try:
        h = health(db)
        assert h["status"] == "degraded", h
        assert h["redis"]["maxmemory_policy"] == "allkeys-lru"
        assert any("maxmemory-policy allkeys-lru" in reason for reason in h["reasons"]), h["reasons"]
        time.sleep(3.5)  # three memory checks
    finally:
        r.config_set("maxmemory-policy", "noeviction")
    h = wait_for(lambda: (lambda h: h if h["status"] == "healthy" else None)(health(db)),
                 what="health() healthy with noeviction")
    assert h["reasons"] == []
    wait_for(lambda: "noeviction now" in open(log).read()[size:], what="the bridge's all-clear")
    with open(log) as f:
        f.seek(size)
        new = f.read()
    assert new.count("Redis may evict queue_pg's keys") == 1, new


def test_redis_by_host_name_serves_health_and_the_bridge(db, r):
    # A host name is resolved within the call's deadline (on a helper thread), not only IPs.
    port = r.connection_pool.connection_kwargs["port"]
    set_config(db, redis_url=f"redis://localhost:{port}")
    h = health(db)
    assert h["redis"]["status"] == "healthy" and h["redis"]["ping"] == "PONG", h["redis"]
    # The bridge reconnects through the name too: a job arrives.
    job = db.execute("SELECT queue.enqueue('by_name', '{}')").fetchone()[0]
    wait_for(lambda: r.llen(list_key("by_name")) == 1, what="the job pushed via localhost")
    assert json.loads(r.lindex(list_key("by_name"), 0))["id"] == job


def test_health_with_redis_stopped_answers_unhealthy(db, r):
    # A password-protected Redis: first healthy through the URL with its password, then stopped.
    password = "s3cret-pw-4711"
    r.config_set("requirepass", password)
    port = r.connection_pool.connection_kwargs["port"]
    set_config(db, redis_url=f"redis://:{password}@127.0.0.1:{port}")
    db.execute("SET queue.redis_timeout = '1s'")
    wait_for(lambda: health(db)["status"] == "healthy", what="healthy with the password")
    errors_before = health(db)["bridge"]["errors_total"]
    try:
        stack("redis-stop")
        start = time.monotonic()
        h = health(db)
        took = time.monotonic() - start
        assert took < 1 + 1, f"health() took {took:.2f} s with a 1 s redis_timeout"
        assert h["status"] == "unhealthy" and h["redis"]["status"] == "unhealthy"
        assert h["redis"]["error"] and h["redis"]["ping"] is None
        h = wait_for(lambda: (lambda h: h if h["bridge"]["errors_total"] > errors_before else None)(health(db)),
                     what="the bridge's error")
        assert "Connection refused" in h["bridge"]["last_error"], h["bridge"]["last_error"]
        assert password not in json.dumps(h)
    finally:
        stack("redis-stop")
        stack("redis-start")


def test_health_with_a_hanging_redis_answers_within_the_timeout_and_hides_the_password(db, r):
    # A server that accepts connections and never answers.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        errors_before = health(db)["bridge"]["errors_total"]
        set_config(db, redis_url=f"redis://:hunter2-secret@127.0.0.1:{port}")
        db.execute("SET queue.redis_timeout = '1s'")
        start = time.monotonic()
        h = health(db)
        took = time.monotonic() - start
        assert took < 1 + 0.5, f"health() took {took:.2f} s with a 1 s redis_timeout"
        assert h["status"] == "unhealthy" and "redis_timeout" in h["redis"]["error"], h["redis"]
        assert "hunter2-secret" not in str(h)
        # The bridge times out against it too (the default redis_timeout, 2 s).
        h = wait_for(lambda: (lambda h: h if h["bridge"]["errors_total"] > errors_before else None)(health(db)),
                     timeout=15, what="the bridge's timeout")
        assert "redis_timeout" in h["bridge"]["last_error"], h["bridge"]["last_error"]
        assert "hunter2-secret" not in str(h)
    finally:
        stop.set()
        db.execute("ALTER SYSTEM RESET queue.redis_url")
        db.execute("SELECT pg_reload_conf()")
        server.close()
        for c in held:
            c.close()


def test_health_says_when_the_bridge_is_stopped_or_stalled(db, r):
    pid = bridge_pid(db)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: health(db)["bridge"]["status"] == "stalled", timeout=10, interval=0.2,
                 what="a stalled bridge")
        assert health(db)["status"] == "unhealthy"
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: health(db)["bridge"]["status"] == "running", timeout=10)

    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(lambda: health(db)["bridge"]["status"] == "stopped", timeout=5, interval=0.02,
             what="the bridge reported stopped before its restart")
    wait_for(lambda: health(db)["bridge"]["status"] == "running", timeout=15, what="the bridge back")
