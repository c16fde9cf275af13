"""queue.enqueue_row(): one job per changed row with the documented payload, in the application's
transaction; misuse is a clear ERROR that changes nothing."""

import json

import psycopg
import pytest

from conftest import list_key, wait_for


@pytest.fixture
def users(db):
    db.execute("DROP SCHEMA IF EXISTS app CASCADE")
    db.execute("CREATE SCHEMA app")
    db.execute("CREATE TABLE app.users (id int PRIMARY KEY, email text NOT NULL, plan text)")
    yield "app.users"
    db.execute("DROP SCHEMA app CASCADE")


def jobs(db):
    return db.execute("SELECT queue_name, priority, payload FROM queue.jobs ORDER BY id").fetchall()


def test_insert_update_delete_each_enqueue_one_job(db, r, users):
    db.execute("""CREATE TRIGGER users_events AFTER INSERT OR UPDATE OR DELETE ON app.users
                  FOR EACH ROW EXECUTE FUNCTION queue.enqueue_row('user_events', 'high')""")
    db.execute("INSERT INTO app.users VALUES (1, 'ada@example.com', 'free')")
    db.execute("UPDATE app.users SET plan = 'pro' WHERE id = 1")
    db.execute("DELETE FROM app.users WHERE id = 1")
    ada = {"id": 1, "email": "ada@example.com", "plan": "free"}
    assert jobs(db) == [
        ("user_events", "high", {"table": "app.users", "op": "INSERT", "new": ada, "old": None}),
        ("user_events", "high", {"table": "app.users", "op": "UPDATE", "new": dict(ada, plan="pro"), "old": ada}),
        ("user_events", "high", {"table": "app.users", "op": "DELETE", "new": None, "old": dict(ada, plan="pro")}),
    ]
    # Committed, so dispatched like any job (each statement here committed on its own).
    wait_for(lambda: r.llen(list_key("user_events", "high")) == 3)
    ops = [json.loads(m)["payload"]["op"] for m in reversed(r.lrange(list_key("user_events", "high"), 0, -1))]
    assert ops == ["INSERT", "UPDATE", "DELETE"]


def test_one_job_per_row_and_default_priority(db, users):
    db.execute("""CREATE TRIGGER users_events AFTER INSERT ON app.users
                  FOR EACH ROW EXECUTE FUNCTION queue.enqueue_row('signups')""")
    db.execute("INSERT INTO app.users SELECT i, 'u' || i || '@example.com' FROM generate_series(1, 3) i")
    got = jobs(db)
    assert [(q, p, j["new"]["id"]) for q, p, j in got] == [("signups", "normal", i) for i in (1, 2, 3)]


def test_a_rolled_back_change_enqueues_nothing(db, r, users):
    db.execute("""CREATE TRIGGER users_events AFTER INSERT ON app.users
                  FOR EACH ROW EXECUTE FUNCTION queue.enqueue_row('signups')""")
    with db.transaction(force_rollback=True):
        db.execute("INSERT INTO app.users VALUES (1, 'ada@example.com')")
        assert len(jobs(db)) == 1  # visible inside the transaction
    with db.transaction():
        db.execute("INSERT INTO app.users VALUES (2, 'bob@example.com')")
        with db.transaction(force_rollback=True):  # a savepoint rolled back
            db.execute("INSERT INTO app.users VALUES (3, 'eve@example.com')")
    assert [j["new"]["id"] for _, _, j in jobs(db)] == [2]
    wait_for(lambda: r.llen(list_key("signups")) == 1)
    assert json.loads(r.lindex(list_key("signups"), 0))["payload"]["new"]["id"] == 2


@pytest.mark.parametrize("trigger, sqlstate, message", [
    ("BEFORE INSERT ON app.users FOR EACH ROW EXECUTE FUNCTION queue.enqueue_row('q')",
     "09000", "must run as a row-level AFTER trigger"),
    ("AFTER INSERT ON app.users FOR EACH STATEMENT EXECUTE FUNCTION queue.enqueue_row('q')",
     "09000", "must run as a row-level AFTER trigger"),
    ("AFTER INSERT ON app.users FOR EACH ROW EXECUTE FUNCTION queue.enqueue_row()",
     "22023", "takes a queue name and an optional priority"),
    ("AFTER INSERT ON app.users FOR EACH ROW EXECUTE FUNCTION queue.enqueue_row('q', 'high', 'x')",
     "22023", "takes a queue name and an optional priority"),
    ("AFTER INSERT ON app.users FOR EACH ROW EXECUTE FUNCTION queue.enqueue_row('no spaces')",
     "22023", "invalid queue name"),
    ("AFTER INSERT ON app.users FOR EACH ROW EXECUTE FUNCTION queue.enqueue_row('q', 'urgent')",
     "22023", "invalid priority"),
])
def test_misuse_is_an_error_that_changes_nothing(db, users, trigger, sqlstate, message):
    db.execute(f"CREATE TRIGGER users_events {trigger}")
    with pytest.raises(psycopg.Error) as err:
        db.execute("INSERT INTO app.users VALUES (1, 'ada@example.com')")
    assert err.value.sqlstate == sqlstate and message in str(err.value)
    assert db.execute("SELECT count(*) FROM app.users").fetchone()[0] == 0
    assert jobs(db) == []


def test_called_outside_a_trigger_is_an_error(db):
    with pytest.raises(psycopg.Error) as err:
        db.execute("SELECT queue.enqueue_row()")
    assert "trigger" in str(err.value)
