"""Redis over TLS with an ACL user: a redis-server that speaks only TLS (certificates made here with
openssl) and whose default user is off. The bridge, the report applier, health() and
optimize_memory() connect through `rediss://user:password@host:port` and queue.redis_tls_ca_file;
so do the example workers. A wrong CA, and a plain redis:// URL against the TLS port, fail clearly
and in time, and no output shows the password."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
import redis as redis_py

from conftest import ENV, PREFIX, dsn, list_key, outbox_applied, set_config, wait_for
from test_examples import build, stop

PORT = int(ENV["QPG_REDIS_PORT"]) + 2
USER, PASSWORD = "qpg_bridge", "tls-acl-pw-8125"
URL = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{PORT}"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
            "-subj", f"/CN=queue_pg test {name}", cwd=d)


@pytest.fixture(scope="module")
def tls_redis():
    """A TLS-only redis-server with an ACL user; yields the directory of its certificates."""
    d = Path(ENV["QPG_HOME"]) / "tls"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    make_ca(d, "ca")
    make_ca(d, "other_ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.cnf", cwd=d)
    # The server's OS user (postgres) reads the CA files and the password file.
    os.chmod(ENV["QPG_HOME"], 0o755)
    os.chmod(d, 0o755)
    for f in ("ca.crt", "other_ca.crt"):
        os.chmod(d / f, 0o644)
    (d / "redis.conf").write_text(f"""
port 0
tls-port {PORT}
bind 127.0.0.1
tls-cert-file {d}/server.crt
tls-key-file {d}/server.key
tls-ca-cert-file {d}/ca.crt
tls-auth-clients no
user default off
user {USER} on >{PASSWORD} ~* &* +@all
save ""
appendonly no
daemonize yes
pidfile {d}/redis.pid
logfile {d}/redis.log
dir {d}
""")
    subprocess.run(["redis-server", str(d / "redis.conf")], check=True)
    client = tls_client(d)
    wait_for(lambda: ping(client), timeout=10, what="the TLS redis-server to start")
    yield d
    try:
        client.shutdown(nosave=True)
    except redis_py.ConnectionError:
        pass
    wait_for(lambda: not ping(client), timeout=10, what="the TLS redis-server to stop")


def tls_client(d):
    return redis_py.Redis.from_url(URL, ssl_ca_certs=str(d / "ca.crt"), decode_responses=True,
                                   socket_timeout=5)


def ping(client):
    try:
        return client.ping()
    except redis_py.ConnectionError:
        return False


def health(db):
    return db.execute("SELECT queue.health()").fetchone()[0]


def unhealthy_within_a_second(db, **settings):
    """health() under these settings and a 1 s redis_timeout: unhealthy Redis, in time."""
    set_config(db, **settings)
    db.execute("SET queue.redis_timeout = '1s'")
    start = time.monotonic()
    h = health(db)
    assert time.monotonic() - start < 2
    assert h["status"] == "unhealthy" and h["redis"]["status"] == "unhealthy", h
    return h


def server_log():
    return (Path(ENV["QPG_HOME"]) / "postgres.log").read_text(errors="replace")


def test_dispatch_health_and_optimize_memory_over_tls_with_an_acl_user(db, tls_redis):
    tr = tls_client(tls_redis)
    tr.flushall()
    set_config(db, redis_url=URL, redis_tls_ca_file=tls_redis / "ca.crt")
    h = wait_for(lambda: (lambda h: h if h["status"] == "healthy" else None)(health(db)),
                 what="health() over TLS")
    assert h["redis"]["ping"] == "PONG" and h["redis"]["error"] is None, h["redis"]
    job = db.execute("SELECT queue.enqueue('tls', '{\"n\": 1}')").fetchone()[0]
    wait_for(lambda: tr.llen(list_key("tls")) == 1, what="the bridge to push over TLS")
    assert json.loads(tr.lindex(list_key("tls"), 0))["id"] == job
    # Both of queue_pg's background workers hold a connection as the ACL user.
    names = lambda: {c["name"]: c["user"] for c in tr.client_list()}
    wait_for(lambda: names().get("queue_pg-bridge") == USER and names().get("queue_pg-reports") == USER,
             what="the bridge and the applier connected as the ACL user")

    # A worker on the fast path reports over TLS; the applier applies it.
    msg = json.loads(tr.rpop(list_key("tls")))
    tr.xadd(f"{PREFIX}:{{tls}}:reports", {"id": job, "attempt": msg["attempt"], "op": "complete"})
    wait_for(lambda: db.execute("SELECT status FROM queue.jobs WHERE id = %s", (job,)).fetchone()[0]
             == "completed", what="the report applied")
    outbox_applied(db)
    tr.persist(f"{PREFIX}:job:{job}")  # a finished job's hash without its TTL
    done = db.execute("SELECT queue.optimize_memory()").fetchone()[0]
    assert done["expired"] >= 1, done
    assert tr.ttl(f"{PREFIX}:job:{job}") > 0
    assert PASSWORD not in json.dumps(h) + json.dumps(done)


def test_large_pipelines_and_replies_cross_tls_intact(db, tls_redis):
    # Hundreds of kilobytes each way: the bridge's pushes (many TLS records per write) and the
    # applier's XREAD replies (many records per read) are split and joined correctly.
    tr = tls_client(tls_redis)
    set_config(db, redis_url=URL, redis_tls_ca_file=tls_redis / "ca.crt")
    blob = "x" * 4000
    payloads = json.dumps([{"n": n, "blob": blob} for n in range(300)])
    ids = [row[0] for row in db.execute("SELECT * FROM queue.enqueue_many('tls_big', %s)", (payloads,)).fetchall()]
    wait_for(lambda: tr.llen(list_key("tls_big")) == 300, what="300 large messages pushed over TLS")
    messages = [json.loads(m) for m in tr.lrange(list_key("tls_big"), 0, -1)]
    assert sorted(m["id"] for m in messages) == sorted(ids)
    assert all(m["payload"]["blob"] == blob for m in messages)
    pipe = tr.pipeline(transaction=False)
    for m in messages:
        pipe.xadd(f"{PREFIX}:{{tls_big}}:reports",
                  {"id": m["id"], "attempt": 1, "op": "complete", "result": json.dumps({"echo": blob})})
    pipe.execute()
    wait_for(lambda: db.execute("SELECT count(*) FROM queue.jobs WHERE queue_name = 'tls_big' AND "
                                "status = 'completed' AND result->>'echo' = %s", (blob,)).fetchone()[0] == 300,
             timeout=20, what="300 large reports applied over TLS")


def test_the_password_may_come_from_a_file(db, tls_redis):
    pw_file = Path(ENV["QPG_HOME"]) / "redis_password"
    pw_file.write_text(PASSWORD + "\n")
    shutil.chown(pw_file, "postgres")
    os.chmod(pw_file, 0o600)
    set_config(db, redis_url=f"rediss://{USER}@127.0.0.1:{PORT}",
               redis_tls_ca_file=tls_redis / "ca.crt", redis_password_file=pw_file)
    h = wait_for(lambda: (lambda h: h if h["redis"]["status"] == "healthy" else None)(health(db)),
                 what="health() with the password from the file")
    assert h["redis"]["ping"] == "PONG"
    job = db.execute("SELECT queue.enqueue('tls_file', '{}')").fetchone()[0]
    tr = tls_client(tls_redis)
    wait_for(lambda: tr.llen(list_key("tls_file")) == 1, what="the bridge to push")
    assert db.execute("SELECT status FROM queue.jobs WHERE id = %s", (job,)).fetchone()[0] == "migrated"
    # A monitoring role reads every setting (pg_read_all_settings), but the password is in none.
    db.execute("DROP ROLE IF EXISTS tls_monitor")
    db.execute("CREATE ROLE tls_monitor LOGIN IN ROLE pg_monitor")
    try:
        with psycopg.connect(dsn().replace("user=postgres", "user=tls_monitor"), autocommit=True) as mon:
            seen = mon.execute("SELECT string_agg(setting, ' ') FROM pg_settings WHERE name LIKE 'queue.%'").fetchone()[0]
            assert f"rediss://{USER}@127.0.0.1:{PORT}" in seen and str(pw_file) in seen
            assert PASSWORD not in seen
            assert mon.execute("SELECT queue.health()").fetchone()[0]["redis"]["status"] == "healthy"
    finally:
        db.execute("DROP ROLE tls_monitor")


def test_a_wrong_ca_fails_clearly_in_health_and_the_log_without_secrets(db, tls_redis):
    h = unhealthy_within_a_second(db, redis_url=URL, redis_tls_ca_file=tls_redis / "other_ca.crt")
    error = h["redis"]["error"]
    assert "certificate" in error and "UnknownIssuer" in error, error
    # The bridge says so in the log, and in health().
    wait_for(lambda: "certificate" in (health(db)["bridge"]["last_error"] or ""),
             what="the bridge's TLS error in health()")
    line = wait_for(lambda: [l for l in server_log().splitlines()
                             if "queue_pg bridge: Redis at" in l and "UnknownIssuer" in l],
                    what="the bridge's TLS error in the log")
    assert f"rediss://{USER}:***@127.0.0.1:{PORT}" in line[-1], line[-1]
    # (Postgres's own "parameter changed" line on reload is outside the extension's control.)
    ours = [l for l in server_log().splitlines() if "parameter \"queue.redis_url\" changed" not in l]
    assert not [l for l in ours if PASSWORD in l]
    assert PASSWORD not in json.dumps(health(db))

    # Verification can only be skipped by the setting named for it.
    set_config(db, redis_tls_insecure_skip_verify="on")
    h = wait_for(lambda: (lambda h: h if h["redis"]["status"] == "healthy" else None)(health(db)),
                 what="health() with verification skipped")
    assert h["redis"]["ping"] == "PONG"


def test_a_plain_url_against_the_tls_port_fails_clearly_not_by_hanging(db, tls_redis):
    h = unhealthy_within_a_second(db, redis_url=f"redis://{USER}:{PASSWORD}@127.0.0.1:{PORT}")
    assert "rediss://" in h["redis"]["error"], h["redis"]["error"]
    assert PASSWORD not in json.dumps(h)


def test_a_tls_url_against_a_plain_port_fails_clearly_within_the_timeout(db, tls_redis):
    h = unhealthy_within_a_second(db, redis_url=f"rediss://127.0.0.1:{ENV['QPG_REDIS_PORT']}",
                                  redis_tls_ca_file=tls_redis / "ca.crt")
    assert "does the server speak TLS on this port?" in h["redis"]["error"], h["redis"]["error"]


@pytest.mark.parametrize("lang", ["python", "node", "rust"])
def test_example_workers_work_over_tls(db, tls_redis, lang):
    set_config(db, redis_url=URL, redis_tls_ca_file=tls_redis / "ca.crt")
    queue = f"tls_{lang}"
    command = build(lang)
    ids = [db.execute("SELECT queue.enqueue(%s, %s, 'normal', 1)", (queue, json.dumps(p))).fetchone()[0]
           for p in ({"n": 1}, {"n": 2}, {"fail": "nope"})]
    for path in ("fast", "sql"):
        env = dict(os.environ,
                   DATABASE_URL=f"postgresql://postgres@127.0.0.1:{ENV['QPG_PGPORT']}/postgres",
                   REDIS_URL=URL, REDIS_TLS_CA_FILE=str(tls_redis / "ca.crt"),
                   QUEUES=queue, QUEUE_PG_PATH=path)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready", f"the {lang} worker did not start"
            if path == "sql":
                more = db.execute("SELECT queue.enqueue(%s, '{\"n\": 3}')", (queue,)).fetchone()[0]
                ids.append(more)
            wait_for(lambda: db.execute(
                "SELECT count(*) FROM queue.jobs WHERE id = ANY(%s) AND status IN ('completed', 'failed')",
                (ids,)).fetchone()[0] == len(ids), timeout=30, what=f"the {lang} worker ({path}) over TLS")
        finally:
            assert stop(proc) == 0
    states = dict(db.execute("SELECT id, status FROM queue.jobs WHERE id = ANY(%s)", (ids,)).fetchall())
    assert [states[i] for i in ids] == ["completed", "completed", "failed", "completed"], states
