"""Chaos soak: jobs flow through queue_pg while a fault injector breaks things, and every job must
still end as planned.

A producer enqueues the jobs over the run; worker processes (the Python example worker, through
chaos_worker.py) work them; every few seconds the injector does one of: freeze Redis (SIGSTOP) for
3 s, restart Redis without persistence, FLUSHALL, SIGKILL the bridge, `pg_ctl stop -m immediate`
and start, SIGKILL a worker, VACUUM FULL of queue.jobs and queue.redis_outbox. A supervisor
restarts the workers the injector killed; a worker that exits by itself is a failure (the example
worker rides out outages of Postgres and Redis).

Plans, by the job's number n: 1 % fail every attempt (dead after 5), 5 % fail their first attempt,
0.2 % run past their 2 s lease (kept alive by heartbeats), the rest complete at once. About 10 %
of attempts fail by plan.

At the end it checks: no job lost, none enqueued twice, every job completed or dead as planned,
each completion counted once in queue.stats, on the SQL path no attempt completed twice (the fast
path has no exclusive claim: after a rescue two deliveries of one attempt may both run), the Redis
lists and report streams empty, one dead-letter entry in Redis for each dead job (however often
Redis lost them), no worker that exited by itself; and prints a table. A lease that expires
because a fault killed its worker counts as a failed attempt (the backoff rule), so a job whose
every attempt was cut short is dead by the rule: the table counts those apart.

    .venv/bin/python bench/chaos/chaos.py                      # long mode: 100,000 jobs, 8 workers,
                                                               # at least 30 faults of every kind
    .venv/bin/python bench/chaos/chaos.py --jobs 3000 --workers 4 --min-each 1   # a short run
    .venv/bin/python bench/chaos/chaos.py --path sql           # the workers on the SQL path
                                                               # (default: the fast path)

It starts its own stack (scripts/stack.sh, QPG_HOME=/tmp/queue_pg_chaos) and stops it at the end.
"""

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import redis as redis_py

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack.sh"
WORKER = Path(__file__).resolve().parent / "chaos_worker.py"
QUEUE = "chaos"
MAX_ATTEMPTS = 5
PLANNED_RUNS = {"ok": 1, "long": 1, "fail_first": 2, "dead": MAX_ATTEMPTS}
FAULTS = ["freeze_redis", "restart_redis", "flushall", "kill_bridge", "crash_postgres",
          "kill_worker", "vacuum_full"]


def plan_of(n):
    if n % 100 == 0:
        return "dead"
    if n % 100 < 6:
        return "fail_first"
    if n % 500 == 50:
        return "long"
    return "ok"


def payload_of(n):
    p = {"n": n, "plan": plan_of(n)}
    if p["plan"] == "long":
        p["sleep"] = 3
    return p


class Stack:
    def __init__(self, env):
        self.env = dict(os.environ, **env)

    def run(self, *args):
        subprocess.run([str(STACK), *args], env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def dsn(self):
        return f"host={self.env['QPG_HOME']} port={self.env['QPG_PGPORT']} user=postgres dbname=postgres"

    def connect(self, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return psycopg.connect(self.dsn(), autocommit=True, connect_timeout=3)
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def redis(self, timeout=1.0):
        return redis_py.Redis(port=int(self.env["QPG_REDIS_PORT"]), socket_timeout=timeout,
                              socket_connect_timeout=timeout, decode_responses=True)

    def redis_pid(self):
        return int(Path(self.env["QPG_HOME"], "redis.pid").read_text())


class Soak:
    def __init__(self, stack, jobs, workers, min_each, gap, produce_s, log_dir, worker_path):
        self.stack = stack
        self.worker_path = worker_path
        self.jobs = jobs
        self.n_workers = workers
        self.min_each = min_each
        self.gap = gap
        self.produce_s = produce_s
        self.log_dir = Path(log_dir)
        self.stop = threading.Event()
        self.faults = collections.Counter()
        self.last_fault_at = None
        self.workers = []
        self.restarts = 0
        # Workers the injector killed (by pid), and workers that exited by themselves.
        self.killed = set()
        self.exits = 0
        self.peak_jobs = 0
        self.peak_redis = 0
        self.produced = threading.Event()
        self.lock = threading.Lock()
        self.errors = []

    # --- setup -------------------------------------------------------------------------------
    def prepare(self):
        db = self.stack.connect()
        for name, value in [("start_timeout", "3s"), ("poll_interval", "200ms")]:
            db.execute(f"ALTER SYSTEM SET queue.{name} = '{value}'")
        db.execute("SELECT pg_reload_conf()")
        # TRUNCATE gives way to the bridge's transactions (which lock these tables in other
        # orders) instead of deadlocking with them, and tries again.
        for _ in range(100):
            try:
                with db.transaction():
                    db.execute("SET LOCAL lock_timeout = '100ms'")
                    db.execute("TRUNCATE queue.jobs, queue.queues, queue.redis_outbox, queue.stats "
                               "RESTART IDENTITY")
                break
            except psycopg.errors.LockNotAvailable:
                time.sleep(0.05)
        else:
            raise RuntimeError("could not TRUNCATE queue_pg's tables")
        db.execute("DROP TABLE IF EXISTS public.chaos_chunks")
        db.execute("CREATE TABLE public.chaos_chunks (k int PRIMARY KEY)")
        db.execute("""INSERT INTO queue.queues (queue_name, backoff_base, backoff_max, lease)
                      VALUES (%s, '10 ms', '200 ms', '2 s')""", (QUEUE,))
        db.close()
        self.stack.redis().flushall()

    # --- the threads -------------------------------------------------------------------------
    def produce(self):
        """Enqueues the jobs in chunks, paced over produce_s; a chunk whose commit is in doubt
        (the connection broke) is looked up by its marker row, never enqueued twice."""
        chunk = 250
        chunks = (self.jobs + chunk - 1) // chunk
        started = time.monotonic()
        db = self.stack.connect()
        for k in range(chunks):
            ns = range(k * chunk + 1, min((k + 1) * chunk, self.jobs) + 1)
            payloads = json.dumps([payload_of(n) for n in ns])
            while True:
                try:
                    with db.transaction():
                        db.execute("SELECT count(*) FROM queue.enqueue_many(%s, %s::jsonb, 'normal', %s)",
                                   (QUEUE, payloads, MAX_ATTEMPTS))
                        db.execute("INSERT INTO public.chaos_chunks VALUES (%s)", (k,))
                    break
                except psycopg.Error:
                    db.close()
                    db = self.stack.connect()
                    if db.execute("SELECT 1 FROM public.chaos_chunks WHERE k = %s", (k,)).fetchone():
                        break
            due = started + self.produce_s * (k + 1) / chunks
            time.sleep(max(0.0, due - time.monotonic()))
        db.close()
        self.produced.set()

    def start_worker(self, i):
        env = dict(self.stack.env,
                   DATABASE_URL=f"postgresql://postgres@/postgres?host={self.stack.env['QPG_HOME']}"
                                f"&port={self.stack.env['QPG_PGPORT']}",
                   REDIS_URL=f"redis://127.0.0.1:{self.stack.env['QPG_REDIS_PORT']}",
                   QUEUES=QUEUE, CHAOS_RUN_LOG=str(self.log_dir / f"runs-{i}.log"),
                   # The fast path's lease is the worker's: 2 s, like the queue's on the SQL path.
                   QUEUE_PG_PATH=self.worker_path, LEASE_S="2")
        out = open(self.log_dir / f"worker-{i}.log", "a")
        return subprocess.Popen([sys.executable, str(WORKER)], env=env, stdout=out, stderr=out)

    def supervise(self):
        self.workers = [self.start_worker(i) for i in range(self.n_workers)]
        while not self.stop.is_set():
            for i, w in enumerate(self.workers):
                if w.poll() is not None:
                    with self.lock:
                        if w.pid not in self.killed:
                            self.exits += 1
                        self.workers[i] = self.start_worker(i)
                        self.restarts += 1
            time.sleep(0.2)

    def watch(self):
        db = None
        r = self.stack.redis(timeout=0.5)
        while not self.stop.is_set():
            try:
                db = db or self.stack.connect(timeout=5)
                n = db.execute("SELECT count(*) FROM queue.jobs").fetchone()[0]
                self.peak_jobs = max(self.peak_jobs, n)
            except psycopg.Error:
                db = None
            try:
                self.peak_redis = max(self.peak_redis, int(r.info("memory")["used_memory"]))
            except redis_py.RedisError:
                pass
            time.sleep(1)

    def wait_until_up(self):
        """Faults go in one at a time: each on a system that is up again after the last."""
        db = self.stack.connect()
        deadline = time.monotonic() + 60
        while db.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'queue_pg bridge'"
                         ).fetchone()[0] == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the bridge did not come back")
            time.sleep(0.1)
        self.stack.redis().ping()
        return db

    def inject(self, kind, db):
        if kind == "freeze_redis":
            pid = self.stack.redis_pid()
            os.kill(pid, signal.SIGSTOP)
            time.sleep(3)
            os.kill(pid, signal.SIGCONT)
        elif kind == "restart_redis":
            self.stack.run("redis-stop")
            self.stack.run("redis-start")
        elif kind == "flushall":
            self.stack.redis().flushall()
        elif kind == "kill_bridge":
            pid = db.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'queue_pg bridge'"
                             ).fetchone()[0]
            os.kill(pid, signal.SIGKILL)
        elif kind == "crash_postgres":
            self.stack.run("pg-kill")
            self.stack.run("pg-start")
        elif kind == "kill_worker":
            with self.lock:
                alive = [w for w in self.workers if w.poll() is None]
                if alive:
                    victim = random.choice(alive)
                    self.killed.add(victim.pid)
                    victim.kill()
        elif kind == "vacuum_full":
            db.execute("VACUUM FULL queue.jobs")
            db.execute("VACUUM FULL queue.redis_outbox")

    def injector(self):
        rng = random.Random(4711)
        bag = []
        while not self.stop.is_set():
            if self.produced.is_set() and min(self.faults[k] for k in FAULTS) >= self.min_each:
                return
            if not bag:
                bag = FAULTS[:]
                rng.shuffle(bag)
            kind = bag.pop()
            time.sleep(rng.uniform(*self.gap))
            try:
                db = self.wait_until_up()
                self.inject(kind, db)
                db.close()
            except Exception as e:  # noqa: BLE001 - a fault that could not be injected is reported
                self.errors.append(f"{kind}: {e}")
                continue
            self.faults[kind] += 1
            self.last_fault_at = time.monotonic()

    # --- the run -----------------------------------------------------------------------------
    def run(self, drain_timeout):
        self.prepare()
        started = time.monotonic()
        threads = [threading.Thread(target=f, daemon=True)
                   for f in (self.produce, self.supervise, self.watch)]
        for t in threads:
            t.start()
        inj = threading.Thread(target=self.injector, daemon=True)
        inj.start()
        inj.join()
        self.produced.wait()
        last_fault = self.last_fault_at or time.monotonic()
        db = self.stack.connect()
        deadline = time.monotonic() + drain_timeout
        while True:
            done = db.execute("SELECT count(*) FROM queue.jobs WHERE status IN ('completed', 'failed')"
                              ).fetchone()[0]
            if done >= self.jobs:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        drain_s = time.monotonic() - last_fault
        self.stop.set()
        for w in self.workers:
            w.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
        report = self.analyse(db)
        report.update(drain_s=drain_s, total_s=time.monotonic() - started,
                      faults=dict(self.faults), restarts=self.restarts, worker_exits=self.exits,
                      peak_jobs=self.peak_jobs, peak_redis=self.peak_redis,
                      injector_errors=self.errors)
        db.close()
        return report

    def analyse(self, db):
        rows = db.execute("""SELECT id, (payload->>'n')::int, payload->>'plan', status, attempt_count,
                                    COALESCE((SELECT array_agg(e->>'error') FROM jsonb_array_elements(errors) e),
                                             '{}')
                             FROM queue.jobs""").fetchall()
        seen = collections.Counter(n for _, n, *_ in rows)
        runs = collections.Counter()
        ok_runs = collections.Counter()
        for path in self.log_dir.glob("runs-*.log"):
            for line in path.read_text().split("\n"):
                if line:
                    outcome, job, attempt = line.split()
                    runs[int(job)] += 1
                    if outcome == "ok":
                        ok_runs[(int(job), int(attempt))] += 1
        states = collections.Counter(status for _, _, _, status, _, _ in rows)
        wrong, extra_runs, reasons, died_of_faults = [], 0, collections.Counter(), 0
        for job, n, plan, status, attempts, errors in rows:
            unplanned = [e for e in errors if not e.startswith("RuntimeError: planned failure")]
            if plan == "dead":
                as_planned = status == "failed" and attempts == MAX_ATTEMPTS
            elif status == "failed" and attempts == MAX_ATTEMPTS and unplanned:
                # Faults cut short every attempt this job had (each a failed attempt, by the
                # backoff rule): dead is the rule's answer, and it is reported apart.
                as_planned = True
                died_of_faults += 1
            else:
                as_planned = status == "completed"
            if not as_planned:
                wrong.append((job, n, plan, status, attempts, errors))
            extra_runs += max(0, runs[job] - PLANNED_RUNS[plan])
            for e in errors:
                if not e.startswith("RuntimeError: planned failure"):
                    reasons[e] += 1
        r = self.stack.redis(timeout=5)
        # The dead-letter list, once a restore after the last loss has put it back.
        dead_ids = {job for job, _, _, status, _, _ in rows if status == "failed"}
        entries = []
        for _ in range(150):
            entries = [json.loads(e)["id"] for e in r.lrange("queue_pg:deadletter:queue", 0, -1)]
            if set(entries) == dead_ids:
                break
            time.sleep(0.2)
        waiting = sum(r.llen(f"queue_pg:{{{QUEUE}}}:{p}") for p in ("high", "normal", "low"))
        reports_waiting = r.xlen(f"queue_pg:{{{QUEUE}}}:reports")
        counted = db.execute("SELECT COALESCE(sum(completed), 0)::int FROM queue.stats "
                             "WHERE queue_name = %s", (QUEUE,)).fetchone()[0]
        return dict(
            jobs=self.jobs,
            lost=self.jobs - len(seen),
            enqueued_twice=sum(1 for c in seen.values() if c > 1),
            completed=states["completed"],
            dead=states["failed"],
            died_of_faults=died_of_faults,
            dead_planned=sum(1 for n in range(1, self.jobs + 1) if plan_of(n) == "dead"),
            not_as_planned=wrong[:20],
            not_as_planned_count=len(wrong),
            completed_twice_in_one_attempt=sum(1 for c in ok_runs.values() if c > 1),
            handler_runs=sum(runs.values()),
            extra_runs=extra_runs,
            unplanned_failures=dict(reasons),
            redis_waiting=waiting,
            reports_waiting=reports_waiting,
            completions_counted_wrong=abs(counted - states["completed"]),
            dead_letter_entries=len(entries),
            dead_letters_missing=len(dead_ids - set(entries)),
            dead_letters_of_live_jobs=len(set(entries) - dead_ids),
            worker_path=self.worker_path,
        )


def table(report):
    f = report["faults"]
    lines = ["| what | count |", "|---|---:|", f"| worker path | {report['worker_path']} |"]
    lines += [f"| fault: {k.replace('_', ' ')} | {f.get(k, 0)} |" for k in FAULTS]
    lines += [
        f"| jobs enqueued | {report['jobs']:,} |",
        f"| jobs completed | {report['completed']:,} |",
        f"| jobs dead (planned: {report['dead_planned']:,}) | {report['dead']:,} |",
        f"| of which: every attempt cut short by faults | {report['died_of_faults']} |",
        f"| jobs lost | {report['lost']} |",
        f"| jobs not ending as planned | {report['not_as_planned_count']} |",
        f"| attempts completed twice | {report['completed_twice_in_one_attempt']} |",
        f"| handler runs (beyond the plan) | {report['handler_runs']:,} ({report['extra_runs']:,}) |",
    ]
    for reason, n in sorted(report["unplanned_failures"].items(), key=lambda x: -x[1]):
        lines.append(f"| unplanned failed attempts: {reason} | {n:,} |")
    lines += [
        f"| dead-letter entries in Redis (missing, of jobs not dead) | {report['dead_letter_entries']:,} ({report['dead_letters_missing']}, {report['dead_letters_of_live_jobs']}) |",
        f"| workers restarted after the injector killed them; exited by themselves | {report['restarts'] - report['worker_exits']}; {report['worker_exits']} |",
        f"| messages left in the Redis lists, reports left in the stream | {report['redis_waiting']}, {report['reports_waiting']} |",
        f"| drain after the last fault | {report['drain_s']:.1f} s |",
        f"| whole run | {report['total_s']:.0f} s |",
        f"| peak rows in queue.jobs | {report['peak_jobs']:,} |",
        f"| peak Redis used_memory | {report['peak_redis'] / 1e6:.1f} MB |",
    ]
    return "\n".join(lines)


def failures(report):
    """What the soak requires; an empty list means it passed."""
    bad = []
    keys = ["lost", "enqueued_twice", "not_as_planned_count", "redis_waiting", "reports_waiting",
            "completions_counted_wrong", "dead_letters_missing", "dead_letters_of_live_jobs",
            "worker_exits"]
    if report["worker_path"] == "sql":
        keys.append("completed_twice_in_one_attempt")
    for key in keys:
        if report[key]:
            bad.append(f"{key} = {report[key]}")
    if report["completed"] + report["dead"] != report["jobs"]:
        bad.append("not every job ended")
    if report["injector_errors"]:
        bad.append(f"faults that could not be injected: {report['injector_errors']}")
    return bad


def soak(env, jobs, workers, min_each, gap=(1.5, 3.5), produce_s=None, drain_timeout=600,
         worker_path="fast"):
    stack = Stack(env)
    produce_s = produce_s if produce_s is not None else min_each * len(FAULTS) * sum(gap) / 2
    with tempfile.TemporaryDirectory(prefix="queue_pg_chaos_") as logs:
        return Soak(stack, jobs, workers, min_each, gap, produce_s, logs, worker_path).run(drain_timeout)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--min-each", type=int, default=30, help="faults of every kind, at least")
    p.add_argument("--path", choices=["fast", "sql"], default="fast", help="the workers' path")
    args = p.parse_args()
    env = dict(QPG_HOME="/tmp/queue_pg_chaos", QPG_PGPORT="55472", QPG_REDIS_PORT="56419")
    stack = Stack(env)
    stack.run("up")
    try:
        report = soak(env, args.jobs, args.workers, args.min_each, worker_path=args.path)
    finally:
        stack.run("down")
    print(table(report))
    bad = failures(report)
    for b in bad:
        print(f"FAILED: {b}")
    for job in report["not_as_planned"]:
        print(f"not as planned: {job}")
    print(json.dumps({k: v for k, v in report.items() if k != "not_as_planned"}, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
