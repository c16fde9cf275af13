"""Bad input gets an ERROR with a fitting SQLSTATE and changes nothing."""

import psycopg
import pytest

BIG = "'\"" + "x" * 200 + "\"'"

CASES = [
    # enqueue
    ("SELECT queue.enqueue(NULL, '{}')", "22004"),
    ("SELECT queue.enqueue('', '{}')", "22023"),
    ("SELECT queue.enqueue('bad name', '{}')", "22023"),
    ("SELECT queue.enqueue('emails!', '{}')", "22023"),
    ("SELECT queue.enqueue('q/x', '{}')", "22023"),
    ("SELECT queue.enqueue(repeat('a', 65), '{}')", "22023"),
    ("SELECT queue.enqueue('emails', NULL)", "22004"),
    ("SELECT queue.enqueue('emails', '{}', NULL)", "22004"),
    ("SELECT queue.enqueue('emails', '{}', 'HIGH')", "22023"),
    ("SELECT queue.enqueue('emails', '{}', 'urgent')", "22023"),
    ("SELECT queue.enqueue('emails', '{}', 'normal', 0)", "22023"),
    ("SELECT queue.enqueue('emails', '{}', 'normal', 1001)", "22023"),
    ("SELECT queue.enqueue('emails', '{}', 'normal', -5)", "22023"),
    (f"SELECT queue.enqueue('emails', {BIG})", "54000"),
    # enqueue_many
    ("SELECT * FROM queue.enqueue_many(NULL, '[1]')", "22004"),
    ("SELECT * FROM queue.enqueue_many('bad name', '[1]')", "22023"),
    ("SELECT * FROM queue.enqueue_many('emails', NULL)", "22004"),
    ("SELECT * FROM queue.enqueue_many('emails', '{\"a\": 1}')", "22023"),
    ("SELECT * FROM queue.enqueue_many('emails', '42')", "22023"),
    ("SELECT * FROM queue.enqueue_many('emails', 'null')", "22023"),
    ("SELECT * FROM queue.enqueue_many('emails', '[1]', 'Low')", "22023"),
    ("SELECT * FROM queue.enqueue_many('emails', '[1]', NULL)", "22004"),
    ("SELECT * FROM queue.enqueue_many('emails', '[1]', 'low', 0)", "22023"),
    (f"SELECT * FROM queue.enqueue_many('emails', jsonb_build_array(1, {BIG}::jsonb, 2))", "54000"),
    # pause / resume
    ("SELECT queue.pause(NULL)", "22004"),
    ("SELECT queue.pause('no spaces')", "22023"),
    ("SELECT queue.resume(NULL)", "22004"),
    ("SELECT queue.resume(repeat('z', 65))", "22023"),
]


def counts(db):
    return db.execute(
        "SELECT (SELECT count(*) FROM queue.jobs), (SELECT count(*) FROM queue.queues)"
    ).fetchone()


@pytest.mark.parametrize("sql,sqlstate", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_an_error_and_changes_nothing(db, sql, sqlstate):
    db.execute("SET queue.max_payload_bytes = 100")
    db.execute("SELECT queue.enqueue('emails', '{}')")  # something to compare against
    before = counts(db)
    with pytest.raises(psycopg.Error) as raised:
        db.execute(sql)
    assert raised.value.sqlstate == sqlstate, raised.value
    assert "queue_pg" in str(raised.value)
    assert counts(db) == before


def test_payload_limit_counts_json_text_bytes(db):
    db.execute("SET queue.max_payload_bytes = 10")
    # '"12345678"' is exactly 10 bytes of JSON text: accepted. One more byte is not.
    db.execute("""SELECT queue.enqueue('emails', '"12345678"')""")
    with pytest.raises(psycopg.Error) as raised:
        db.execute("""SELECT queue.enqueue('emails', '"123456789"')""")
    assert raised.value.sqlstate == "54000"
    # Multi-byte characters count as bytes.
    with pytest.raises(psycopg.Error):
        db.execute("""SELECT queue.enqueue('emails', '"ééééé"')""")


def test_valid_edge_values_are_accepted(db):
    db.execute("SELECT queue.enqueue(repeat('a', 64), '{}')")
    db.execute("SELECT queue.enqueue('A-z_0.9', '{}', 'low', 1)")
    db.execute("SELECT queue.enqueue('emails', '{}', 'high', 1000)")
    db.execute("SELECT * FROM queue.enqueue_many('emails', '[]')")
    assert db.execute("SELECT count(*) FROM queue.jobs").fetchone()[0] == 3
