"""Roles and privileges: LOGIN roles that are members of one of queue_producer, queue_worker,
queue_admin or pg_monitor can call what their role allows and nothing else (SQLSTATE 42501,
nothing changed); no one but queue_admin touches the tables; a producer cannot make a SECURITY
DEFINER function run its own functions, operators or tables, nor read or set queue.redis_url."""

import psycopg
import pytest

from conftest import ENV, list_key, pop, wait_for

LOGINS = {"p_login": "queue_producer", "w_login": "queue_worker", "a_login": "queue_admin",
          "m_login": "pg_monitor", "nobody_login": None}

# What each role may call (queue_admin: everything). %(job)s is a job in the right state.
CALLS = {
    "queue_producer": ["SELECT queue.enqueue('priv', '{}')",
                       "SELECT * FROM queue.enqueue_many('priv', '[1, 2]')"],
    "queue_worker": ["SELECT * FROM queue.start(%(job)s)",
                     "SELECT queue.heartbeat(%(job)s)",
                     "SELECT queue.fail(%(job)s, 'first')",
                     "SELECT queue.complete_many(ARRAY[%(job)s]::bigint[])",
                     "SELECT queue.complete(%(job)s)"],
    "admin_only": ["SELECT queue.cancel(%(job)s)", "SELECT queue.replay_dead(%(job)s)",
                   "SELECT queue.replay_dead_all()", "SELECT queue.pause('priv')",
                   "SELECT queue.resume('priv')", "SELECT queue.optimize_memory()"],
    "pg_monitor": ["SELECT queue.health()", "SELECT * FROM queue.metrics()",
                   "SELECT queue.prometheus()"],
}
TABLES = ["queue.jobs", "queue.queues", "queue.redis_outbox", "queue.stats", "queue.rejected_reports"]
WRITES = ["INSERT INTO {t} DEFAULT VALUES", "UPDATE {t} SET queue_name = queue_name",
          "DELETE FROM {t}"]


@pytest.fixture
def logins(db):
    for name, role in LOGINS.items():
        if not db.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
            db.execute(f"CREATE ROLE {name} LOGIN")
        if role:
            db.execute(f"GRANT {role} TO {name}")
    yield
    db.execute("DROP SCHEMA IF EXISTS evil CASCADE")


def connect_as(user):
    return psycopg.connect(f"host={ENV['QPG_HOME']} port={ENV['QPG_PGPORT']} user={user} dbname=postgres",
                           autocommit=True)


def denied(conn, sql, params=None):
    try:
        conn.execute(sql, params)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


def permitted(conn, sql, params=None):
    """True unless the call is refused for lack of privilege (other errors mean it ran)."""
    try:
        conn.execute(sql, params)
    except psycopg.errors.InsufficientPrivilege:
        return False
    except psycopg.Error:
        pass
    return True


def snapshot(db):
    return db.execute("SELECT count(*), string_agg(id || status || attempt_count, ',' ORDER BY id) "
                      "FROM queue.jobs").fetchone()


def test_each_role_calls_what_it_may_and_nothing_else(db, r, logins):
    job = db.execute("SELECT queue.enqueue('priv', '{}', max_attempts => 2)").fetchone()[0]
    wait_for(lambda: r.llen(list_key("priv")) == 1)
    for login, role in LOGINS.items():
        allowed = {sql for key, calls in CALLS.items() for sql in calls
                   if role == "queue_admin" or key == role}
        with connect_as(login) as conn:
            for sql in [s for calls in CALLS.values() for s in calls if s not in allowed]:
                before = snapshot(db)
                assert denied(conn, sql, {"job": job}), (login, sql)
                assert snapshot(db) == before, (login, sql)
            for table in TABLES:
                for write in WRITES + ["SELECT * FROM {t}"]:
                    sql = write.format(t=table)
                    if role == "queue_admin":
                        continue
                    assert denied(conn, sql), (login, sql)
            if role == "pg_monitor":
                for sql in CALLS["pg_monitor"]:
                    conn.execute(sql)
    # What each role may call works, as that role: a producer's job, worked by a worker.
    with connect_as("p_login") as producer, connect_as("w_login") as worker:
        mine = producer.execute("SELECT queue.enqueue('priv2', '{\"n\": 1}')").fetchone()[0]
        assert pop(r, "priv2")["id"] == mine
        attempt = worker.execute("SELECT attempt FROM queue.start(%s)", (mine,)).fetchone()[0]
        worker.execute("SELECT queue.heartbeat(%s, attempt => %s)", (mine, attempt))
        assert worker.execute("SELECT queue.fail(%s, 'once', %s)", (mine, attempt)).fetchone()[0]["status"] \
            == "retry_scheduled"
    db.execute("UPDATE queue.jobs SET run_at = now() WHERE id = %s", (mine,))
    assert pop(r, "priv2")["attempt"] == 2
    with connect_as("w_login") as worker:
        worker.execute("SELECT * FROM queue.start(%s)", (mine,))
        worker.execute("SELECT queue.complete(%s, '{\"ok\": true}', 2)", (mine,))
    assert db.execute("SELECT status, result FROM queue.jobs WHERE id = %s", (mine,)).fetchone() == \
        ("completed", {"ok": True})
    with connect_as("a_login") as admin:
        for sql in [s for calls in CALLS.values() for s in calls]:
            assert permitted(admin, sql, {"job": job}), sql
        admin.execute("UPDATE queue.queues SET paused = true WHERE queue_name = 'priv'")
        assert admin.execute("SELECT count(*) FROM queue.jobs").fetchone()[0] >= 2


def test_a_producer_cannot_hijack_what_the_functions_run_nor_touch_the_redis_url(db, r, logins):
    db.execute("DROP SCHEMA IF EXISTS evil CASCADE")
    db.execute("CREATE SCHEMA evil AUTHORIZATION p_login")
    with connect_as("p_login") as p:
        p.execute("CREATE TABLE evil.log (what text)")
        # Look-alikes of what the extension's statements use: functions, an operator, tables.
        for fn, args, returns, body in [
            ("now", "", "timestamptz", "pg_catalog.now()"),
            ("jsonb_build_object", "VARIADIC \"any\"", "jsonb", None),
            ("unnest", "anyarray", "SETOF anyelement", "pg_catalog.unnest($1)"),
            ("nextval", "regclass", "bigint", "pg_catalog.nextval($1)"),
        ]:
            if body is None:
                continue  # variadic "any" needs C; the other three suffice
            p.execute(f"""CREATE FUNCTION evil.{fn}({args}) RETURNS {returns} LANGUAGE plpgsql AS $$
                          BEGIN INSERT INTO evil.log VALUES ('{fn}'); RETURN {'QUERY SELECT ' if 'SETOF' in returns else ''}{body}; END $$""")
        p.execute("""CREATE FUNCTION evil.int8eq(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS $$
                     BEGIN INSERT INTO evil.log VALUES ('='); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$""")
        p.execute("CREATE OPERATOR evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.int8eq)")
        p.execute("CREATE TABLE evil.jobs (LIKE pg_catalog.pg_class)")
        p.execute("CREATE TABLE evil.queues (queue_name text)")
        p.execute("SET search_path = evil, pg_catalog")
        job = p.execute("SELECT queue.enqueue('priv', '{}')").fetchone()[0]
        p.execute("SELECT * FROM queue.enqueue_many('priv', '[1, 2, 3]')")
        # A table of the producer's own with the trigger: it enqueues, with the producer's rights.
        p.execute("CREATE TABLE evil.users (id int)")
        p.execute("CREATE TRIGGER users_welcome AFTER INSERT ON evil.users "
                  "FOR EACH ROW EXECUTE FUNCTION queue.enqueue_row('welcome')")
        p.execute("INSERT INTO evil.users VALUES (7)")
        assert p.execute("SELECT count(*) FROM evil.log").fetchone()[0] == 0, \
            "a caller's object ran inside a queue_pg function"
        assert db.execute("SELECT count(*) FROM queue.jobs WHERE queue_name = 'welcome'").fetchone()[0] == 1
        assert db.execute("SELECT status FROM queue.jobs WHERE id = %s", (job,)).fetchone()[0] in ("queued", "migrated")
        # The Redis URL (and its password) stays with superusers: not readable (42501), not
        # settable in a session (a reload setting: 55P02 for anyone), nor by ALTER SYSTEM (42501).
        for sql in ["SHOW queue.redis_url", "SELECT current_setting('queue.redis_url')",
                    "ALTER SYSTEM SET queue.redis_url = 'redis://evil:1'"]:
            assert denied(p, sql), sql
        for sql in ["SET queue.redis_url = 'redis://evil:1'",
                    "SELECT set_config('queue.redis_url', 'redis://evil:1', false)"]:
            with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.CantChangeRuntimeParam)):
                p.execute(sql)
    assert db.execute("SELECT setting FROM pg_settings WHERE name = 'queue.redis_url'").fetchone()[0] \
        .startswith("redis://127.0.0.1")
