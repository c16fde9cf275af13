"""A queue_pg worker in Python (redis-py + psycopg 3), on either documented worker loop:

    fast path (default): BLMPOP up to BATCH jobs  ->  handle() each  ->  XADD complete / fail
                         reports (pipelined; `start` and heartbeats only for jobs that run long)
    SQL path:            BRPOP  ->  queue.start(id)  ->  handle()  ->  queue.complete / queue.fail

    pip install -r requirements.txt
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
    REDIS_URL=redis://127.0.0.1:6379 QUEUES=emails,reports python worker.py

Put your work in handle(). Delivery is at-least-once: a job may run again after a crash, so make
handle() safe to repeat (idempotent). When Redis or Postgres goes away, the worker waits for it
(retrying after 0.1 s, then up to every 5 s; one log line when it goes, one when it is back),
keeps the job in hand and reports its outcome once it can; only SIGTERM stops it. Settings
(environment): DATABASE_URL, REDIS_URL (rediss://
for TLS, with an ACL user: rediss://user:password@host:port), REDIS_TLS_CA_FILE (a PEM file of the
CAs that may sign the server's certificate; default: the system's), REDIS_CLUSTER (1: REDIS_URL
holds comma-separated seed URLs of a Redis Cluster; the worker then pops one queue's lists at a
time, in turn), QUEUES (comma-separated, highest priority lists first across them),
QUEUE_PG_PREFIX (queue_pg),
SHUTDOWN_GRACE_S (10: on SIGTERM, how long the job in hand may still run before it is failed,
and so retried later, instead of completed), QUEUE_PG_PATH (fast, or sql), and for the fast path
BATCH (10: jobs per pop) and LEASE_S (30: a job still running after a third of it is reported
started with this lease, then kept alive by a heartbeat every third; keep that third below
queue.start_timeout). The SQL path takes its lease from the queue (queue.lease).
"""

import json
import os
import signal
import sys
import threading
import time

import psycopg
import redis
import redis.cluster
from psycopg.types.json import Jsonb
from urllib.parse import urlparse as parse_url

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
QUEUES = [q for q in os.environ.get("QUEUES", "default").split(",") if q]
REDIS_TLS_CA_FILE = os.environ.get("REDIS_TLS_CA_FILE")
REDIS_CLUSTER = os.environ.get("REDIS_CLUSTER") == "1"
PREFIX = os.environ.get("QUEUE_PG_PREFIX", "queue_pg")
SHUTDOWN_GRACE_S = float(os.environ.get("SHUTDOWN_GRACE_S", "10"))
PATH = os.environ.get("QUEUE_PG_PATH", "fast")
BATCH = int(os.environ.get("BATCH", "10"))
LEASE_S = float(os.environ.get("LEASE_S", "30"))
SHUTDOWN_ERROR = "worker shut down (SIGTERM) before the job finished"


def handle(job_id, attempt, payload):
    """Your work goes here: return a JSON-serialisable result, or raise to fail the attempt
    (the exception's text becomes the job's error). This example's handler understands
    {"sleep": seconds} and {"fail": "message"}, so the test suite can drive it."""
    if isinstance(payload, dict):
        if "sleep" in payload:
            time.sleep(payload["sleep"])
        if "fail" in payload:
            raise RuntimeError(payload["fail"])
    return {"worker": "python", "attempt": attempt}


stopping = threading.Event()


def on_signal(signum, _frame):
    log(f"{signal.Signals(signum).name}: finishing the job in hand, then stopping")
    stopping.set()


def log(message):
    print(f"[python worker {os.getpid()}] {message}", file=sys.stderr, flush=True)


class Stopped(Exception):
    """SIGTERM arrived while a server was unreachable."""


class Link:
    """A connection to Redis or Postgres that rides out an outage: a call that fails for want of
    the server is tried again on a new connection, after 0.1 s, then twice as long each time up
    to 5 s, until it works (or SIGTERM). The log says once that the server is unreachable and
    once that it is back, not once per retry."""

    def __init__(self, name, connect, errors):
        self.name, self.connect, self.errors = name, connect, errors
        self.conn = None
        self.down = False

    def call(self, fn):
        delay = 0.1
        while True:
            try:
                if self.conn is None:
                    self.conn = self.connect()
                result = fn(self.conn)
            except self.errors as e:
                self.close()
                if not self.down:
                    first_line = (str(e).strip().splitlines() or [""])[0]
                    log(f"{self.name} unreachable ({type(e).__name__}: {first_line}); retrying until it is back")
                    self.down = True
                if stopping.wait(delay):
                    raise Stopped from e
                delay = min(delay * 2, 5)
                continue
            if self.down:
                log(f"{self.name} reachable again")
                self.down = False
            return result

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close, too
                pass
            self.conn = None


# Redis is away: no answer (LOADING is a ConnectionError too), read-only during a failover, or a
# cluster that cannot be reached or does not cover every slot.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError,
              redis.exceptions.RedisClusterException, redis.exceptions.ClusterDownError)
POSTGRES_DOWN = (psycopg.OperationalError,)


def heartbeat_until(done, job_id, attempt, lease_s):
    """Extends the lease every third of it until `done` is set, on a connection of its own,
    opened only when a job runs that long."""
    interval = max(lease_s / 3, 0.5)
    db = None
    try:
        while not done.wait(interval):
            try:
                db = db or psycopg.connect(DATABASE_URL, autocommit=True)
                db.execute("SELECT queue.heartbeat(%s, attempt => %s)", (job_id, attempt))
            except POSTGRES_DOWN:
                db = None  # Postgres is away: the next beat tries a new connection
    except psycopg.Error as e:  # cancelled, or the lease was lost: the end will say so
        log(f"heartbeat for job {job_id} failed: {e}")
    finally:
        if db is not None:
            db.close()


def run_handler(job_id, attempt, payload, tick=None, tick_s=None):
    """Runs handle() on a thread of its own; returns {"result": …} or {"error": …}. While it
    runs, calls tick() every tick_s seconds. After SIGTERM the handler has SHUTDOWN_GRACE_S
    more; then the attempt fails (and is retried later)."""
    outcome = {}

    def work():
        try:
            outcome["result"] = handle(job_id, attempt, payload)
        except Exception as e:  # noqa: BLE001 - any failure of the handler fails the attempt
            outcome["error"] = f"{type(e).__name__}: {e}"

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    deadline = None
    next_tick = time.monotonic() + tick_s if tick else None
    while worker.is_alive():
        worker.join(0.05)
        if next_tick is not None and time.monotonic() >= next_tick and worker.is_alive():
            tick()
            next_tick += tick_s
        if stopping.is_set() and deadline is None:
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
        if deadline is not None and time.monotonic() > deadline and worker.is_alive():
            return {"error": SHUTDOWN_ERROR}
    return dict(outcome)


def run(pg, job_id, attempt, payload, lease_s):
    """The SQL path: the job was started with queue.start; heartbeats and the end go through SQL.
    The outcome is reported even if Postgres is away meanwhile: once it is back (the attempt
    token makes a report that already went through harmless)."""
    done = threading.Event()
    beat = threading.Thread(target=heartbeat_until, args=(done, job_id, attempt, lease_s), daemon=True)
    beat.start()
    outcome = run_handler(job_id, attempt, payload)
    done.set()

    def report(db):
        try:
            if "error" in outcome:
                db.execute("SELECT queue.fail(%s, %s, %s)", (job_id, outcome["error"], attempt))
            else:
                db.execute("SELECT queue.complete(%s, %s, %s)", (job_id, Jsonb(outcome["result"]), attempt))
        except psycopg.errors.ObjectNotInPrerequisiteState as e:
            # Cancelled meanwhile, or the lease expired and the job moved on (or this report
            # already went through before a reconnect): nothing to report.
            log(f"job {job_id}: {e}")
    pg.call(report)


class Reports:
    """The fast path's reports: XADD to the job's queue's report stream, sent in one pipeline
    per batch of jobs (or at once, for a job that runs long). While Redis is away they wait here
    and go once it is back."""

    def __init__(self, link):
        self.link = link
        self.pending = []

    def add(self, queue, job_id, attempt, op, **fields):
        entry = {"id": job_id, "attempt": attempt, "op": op}
        entry.update(fields)
        self.pending.append((f"{PREFIX}:{{{queue}}}:reports", entry))

    def flush(self):
        if self.pending:
            def send(r):
                pipe = r.pipeline(transaction=False)
                for stream, entry in self.pending:
                    pipe.xadd(stream, entry)
                pipe.execute()
            self.link.call(send)
            self.pending = []


def run_fast(reports, message):
    """The fast path: no claim in Postgres. A job still running after a third of LEASE_S is
    reported started (with that lease), then kept alive by a heartbeat every third of it."""
    queue, job_id, attempt = message["queue"], message["id"], message["attempt"]
    lease_ms = int(LEASE_S * 1000)
    started = []

    def tick():
        reports.add(queue, job_id, attempt, "heartbeat" if started else "start", lease_ms=lease_ms)
        started.append(True)
        reports.flush()

    outcome = run_handler(job_id, attempt, message["payload"], tick, LEASE_S / 3)
    if "error" in outcome:
        reports.add(queue, job_id, attempt, "fail", error=outcome["error"])
    else:
        reports.add(queue, job_id, attempt, "complete", result=json.dumps(outcome["result"]))


def pop_lists():
    """The lists each pop covers: all of them on one server (highest priority first across the
    queues); in a Redis Cluster, one queue's three (they share a slot), taken in turn. And how
    long each pop waits: about a second per round, so that SIGTERM is noticed within a second."""
    lists = [[f"{PREFIX}:{{{q}}}:{p}" for p in ("high", "normal", "low")] for q in QUEUES]
    pops = lists if REDIS_CLUSTER else [[k for p in range(3) for k in (l[p] for l in lists)]]
    return pops, max(0.05, 1 / len(pops))


def main_fast(link):
    reports = Reports(link)
    pops, wait = pop_lists()
    print("ready", flush=True)
    while not stopping.is_set():
        for keys in pops:
            # Up to BATCH jobs from the first list that has any: high before normal before low.
            popped = link.call(lambda r: r.blmpop(wait, len(keys), *keys, direction="RIGHT", count=BATCH))
            if popped is None:
                continue
            for raw in popped[1]:
                if stopping.is_set():
                    # Popped and never run: the start-timeout rescue dispatches these again.
                    break
                run_fast(reports, json.loads(raw))
            reports.flush()


def connect_redis():
    # Every Redis call is bounded: pops wait 1 s, so a reply later than 5 s means Redis hangs.
    tls = {"ssl_ca_certs": REDIS_TLS_CA_FILE} if REDIS_TLS_CA_FILE else {}
    if REDIS_CLUSTER:
        seeds = [redis.cluster.ClusterNode(u.hostname, u.port) for u in map(parse_url, REDIS_URL.split(","))]
        return redis.cluster.RedisCluster.from_url(REDIS_URL.split(",")[0], startup_nodes=seeds,
                                                   socket_timeout=5, socket_connect_timeout=5, **tls)
    return redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5, **tls)


def main():
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    redis_link = Link("Redis", connect_redis, REDIS_DOWN)
    pg = Link("Postgres", lambda: psycopg.connect(DATABASE_URL, autocommit=True), POSTGRES_DOWN)
    try:
        if PATH == "fast":
            main_fast(redis_link)
        else:
            main_sql(redis_link, pg)
    except Stopped:
        pass  # SIGTERM during an outage: what is in hand goes back by its lease or rescue
    redis_link.close()
    pg.close()
    log("stopped")


def main_sql(redis_link, pg):
    pops, wait = pop_lists()
    pg.call(lambda db: None)  # connected before saying ready
    print("ready", flush=True)
    while not stopping.is_set():
        for keys in pops:
            popped = redis_link.call(lambda r: r.brpop(keys, timeout=wait))
            if popped is None:
                continue
            message = json.loads(popped[1])
            row = pg.call(lambda db: db.execute(
                "SELECT id, attempt, payload, EXTRACT(EPOCH FROM lease_expires_at - now())::float8 "
                "FROM queue.start(%s)", (message["id"],)).fetchone())
            if row is None:
                continue  # cancelled, finished, held by another worker, or a stale duplicate
            run(pg, *row)


if __name__ == "__main__":
    main()
