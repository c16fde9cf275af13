"""queue_pg benchmarks. Each figure is printed next to a baseline measured in the same run.

(a) enqueue throughput: pgbench, 8 clients, `SELECT queue.enqueue(...)` against a bare INSERT of
    the same row into a plain table with the same columns, constraints and indexes.
(b) commit-to-Redis latency at a steady 1,000 jobs/s (pgbench --rate), measured from the
    enqueueing statement's clock_timestamp() (so it includes the commit itself) to the moment a
    BRPOP consumer receives the message; then again with 200,000 jobs waiting in a paused queue.
(c) drain: a backlog of 100,000 committed jobs, from resume() to the last one in Redis, against
    pushing the same 100,000 messages straight to Redis from a pipelined client (no Postgres);
    then the same drain to a TLS-only redis-server (rediss://, an ACL user, certificates made
    with openssl), against the plain drain of the same run.
(f) Redis Cluster: a drain of 100,000 jobs over 50 queues and the commit-to-Redis latency at
    1,000 jobs/s, against a three-master Redis Cluster (scripts/redis_cluster.sh, ports
    15530-15532) and against the single redis-server, side by side in the same run.
(e) monitoring: health(), metrics() and prometheus() latency with 100 queues and 1,000,000 rows
    in queue.jobs (95 % completed over the last day, 2 % dead, 3 % live), against the naive way
    to get the same counts (GROUP BY queue, status over queue.jobs) and against `SELECT 1`.
"""


import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time

import psycopg
import redis as redis_py

HOME = os.environ["QPG_HOME"]
PGPORT = os.environ["QPG_PGPORT"]
REDIS_PORT = int(os.environ["QPG_REDIS_PORT"])
DSN = f"host={HOME} port={PGPORT} user=postgres dbname=postgres"
PAYLOAD = '{"to": "ada@example.com", "template": "welcome", "n": 1}'


def db():
    return psycopg.connect(DSN, autocommit=True)


def pgbench(script, clients, seconds, extra=()):
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script + "\n")
    out = subprocess.run(
        ["/usr/lib/postgresql/15/bin/pgbench", "-h", HOME, "-p", PGPORT, "-U", "postgres", "-n",
         "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
         "-f", f.name, *extra, "postgres"],
        check=True, capture_output=True, text=True).stdout
    os.unlink(f.name)
    return float(re.search(r"tps = ([\d.]+)", out).group(1))


def reset(conn, r):
    conn.execute("TRUNCATE queue.jobs, queue.queues, queue.redis_outbox, bench.plain_jobs")
    conn.execute("CHECKPOINT")
    r.flushall()
    # Without its epoch key the bridge would take the flush for Redis losing its data and push
    # again whatever was dispatched by then; the tables are empty, so nothing was lost.
    r.set("queue_pg:bridge:epoch", "bench")


def wait_until(predicate, timeout=600, interval=0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(interval)


def create_baseline_table(conn):
    """The bare-INSERT baseline: queue.jobs's columns, defaults, constraints and indexes."""
    conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
    conn.execute("DROP TABLE IF EXISTS bench.plain_jobs")
    conn.execute("CREATE TABLE bench.plain_jobs (LIKE queue.jobs INCLUDING ALL)")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_enqueue(conn, r, seconds):
    insert = ("INSERT INTO bench.plain_jobs (queue_name, payload, priority, status, max_attempts, run_at) "
              f"VALUES ('bench', '{PAYLOAD}', 'normal', 'queued', 5, now());")
    enqueue = f"SELECT queue.enqueue('bench', '{PAYLOAD}');"
    results = {}
    dispatch_cpu = []  # (bridge CPU s, redis CPU s, jobs) during the committed enqueue runs
    # Interleave two rounds so that drift (checkpoints, cache) hits both sides alike.
    for round_ in range(2):
        for name, script in (("bare INSERT", insert), ("queue.enqueue", enqueue),
                             ("bare INSERT, rolled back", f"BEGIN;\n{insert}\nROLLBACK;"),
                             ("queue.enqueue, rolled back", f"BEGIN;\n{enqueue}\nROLLBACK;")):
            reset(conn, r)
            if name == "queue.enqueue":
                bridge = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'queue_pg bridge'").fetchone()[0]
                redis_pid = r.info("server")["process_id"]
                before = cpu_seconds(bridge), cpu_seconds(redis_pid)
            tps = pgbench(script, 8, seconds)
            results.setdefault(name, []).append(tps)
            if name == "queue.enqueue":
                dispatch_cpu.append((cpu_seconds(bridge) - before[0], cpu_seconds(redis_pid) - before[1], tps * seconds))
    reset(conn, r)
    print(f"\n(a) enqueue throughput, pgbench -c 8 -M prepared -T {seconds}, mean of 2 interleaved rounds")
    print("    committed: each enqueue is also dispatched to Redis by the bridge while pgbench runs;")
    print("    rolled back: the statement's own cost, without commit, fsync or dispatch")
    ratios = {}
    for name, runs in results.items():
        base = statistics.mean(results["bare INSERT" if "rolled" not in name else "bare INSERT, rolled back"])
        tps = statistics.mean(runs)
        ratios[name] = tps / base
        print(f"    {name:28s} {tps:9.0f} tx/s   ratio {tps / base:5.2f}   (runs: {', '.join(f'{x:.0f}' for x in runs)})")
    bridge_s, redis_s, jobs = (sum(x[i] for x in dispatch_cpu) for i in range(3))
    wall = seconds * len(dispatch_cpu)
    print(f"    during the committed enqueue runs the bridge used {100 * bridge_s / wall:.0f} % of a core "
          f"({1e6 * bridge_s / jobs:.0f} us per job), redis-server {100 * redis_s / wall:.0f} %")
    return ratios


def bench_latency(conn, r, seconds, rate=1000, paused_backlog=0, client=None, flush=None):
    (flush or (lambda: reset(conn, r)))()
    if paused_backlog:
        conn.execute("SELECT queue.pause('parked')")
        for start in range(0, paused_backlog, 50_000):
            conn.execute("SELECT count(*) FROM queue.enqueue_many('parked', "
                         "(SELECT jsonb_agg(g) FROM generate_series(%s::int, %s::int) g))",
                         (start + 1, min(start + 50_000, paused_backlog)))
        conn.execute("VACUUM ANALYZE queue.jobs")
    latencies = []
    stop = threading.Event()

    def consume():
        c = (client or (lambda: redis_py.Redis(port=REDIS_PORT)))()
        while not stop.is_set():
            got = c.brpop(["queue_pg:{latency}:normal"], timeout=1)
            if got:
                now = time.time()
                latencies.append(now - json.loads(got[1])["payload"]["t"])

    consumer = threading.Thread(target=consume)
    consumer.start()
    script = "SELECT queue.enqueue('latency', jsonb_build_object('t', extract(epoch from clock_timestamp())));"
    tps = pgbench(script, 4, seconds, extra=("--rate", str(rate)))
    time.sleep(1)
    stop.set()
    consumer.join()
    lat = sorted(x * 1000 for x in latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    backlog = f", {paused_backlog:,} jobs waiting in a paused queue" if paused_backlog else ""
    if client:
        backlog += ", Redis Cluster"
    print(f"\n(b) commit-to-Redis latency at {rate} jobs/s for {seconds} s{backlog} ({tps:.0f} tx/s achieved, {len(lat)} jobs)")
    print(f"    p50 {p(0.50):.2f} ms   p90 {p(0.90):.2f} ms   p99 {p(0.99):.2f} ms   max {lat[-1]:.2f} ms")
    return p(0.50), p(0.99)


def bench_drain(conn, r, n=100_000):
    bridge_rate = drain_backlog(conn, r, n)
    # Baseline: the same messages pushed straight to Redis, 500 per pipelined round trip.
    key = "queue_pg:{drain}:normal"
    messages = r.lrange(key, 0, -1)
    r.delete(key)
    t0 = time.monotonic()
    for i in range(0, n, 500):
        pipe = r.pipeline(transaction=True)
        pipe.lpush(key, *messages[i:i + 500])
        pipe.execute()
    redis_s = time.monotonic() - t0
    print(f"\n(c) drain of a {n:,}-job backlog")
    print(f"    bridge (Postgres -> Redis, marked migrated)  {bridge_rate:9.0f} jobs/s  ({n / bridge_rate:.2f} s)")
    print(f"    redis-py pipelined LPUSH only, no Postgres    {n / redis_s:9.0f} jobs/s  ({redis_s:.2f} s)")
    print(f"    ratio bridge / bare Redis push: {redis_s * bridge_rate / n:.2f}")

    with tls_redis() as (url, ca, tr):
        conn.execute(f"ALTER SYSTEM SET queue.redis_url = '{url}'")
        conn.execute(f"ALTER SYSTEM SET queue.redis_tls_ca_file = '{ca}'")
        conn.execute("SELECT pg_reload_conf()")
        try:
            tls_rate = drain_backlog(conn, tr, n)
        finally:
            conn.execute("ALTER SYSTEM RESET queue.redis_url")
            conn.execute("ALTER SYSTEM RESET queue.redis_tls_ca_file")
            conn.execute("SELECT pg_reload_conf()")
    print(f"    bridge over TLS (rediss://, an ACL user)      {tls_rate:9.0f} jobs/s  ({n / tls_rate:.2f} s)")
    print(f"    ratio TLS / plain: {tls_rate / bridge_rate:.2f}")
    return bridge_rate


class tls_redis:
    """A TLS-only redis-server with an ACL user on the next port, for the drain over TLS."""

    def __enter__(self):
        self.dir = os.path.join(HOME, "tls")
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(HOME, 0o755)
        os.chmod(self.dir, 0o755)
        ssl = lambda *a: subprocess.run(["openssl", *a], cwd=self.dir, check=True, capture_output=True)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        ssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=bench CA")
        ssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
        with open(os.path.join(self.dir, "san.cnf"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\n")
        ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.cnf")
        os.chmod(os.path.join(self.dir, "ca.crt"), 0o644)
        port, password = REDIS_PORT + 1, "bench-tls-pw"
        d = self.dir
        subprocess.run(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                        "--tls-cert-file", f"{d}/server.crt", "--tls-key-file", f"{d}/server.key",
                        "--tls-ca-cert-file", f"{d}/ca.crt", "--tls-auth-clients", "no",
                        "--user", "default", "off", "--user", "bench", "on", f">{password}", "~*", "&*", "+@all",
                        "--save", "", "--appendonly", "no", "--daemonize", "yes",
                        "--pidfile", f"{d}/redis.pid", "--logfile", f"{d}/redis.log"], check=True)
        url = f"rediss://bench:{password}@127.0.0.1:{port}"
        self.r = redis_py.Redis.from_url(url, ssl_ca_certs=f"{d}/ca.crt", decode_responses=False)
        wait_until(lambda: self._up(), timeout=10)
        return url, f"{d}/ca.crt", self.r

    def _up(self):
        try:
            return self.r.ping()
        except redis_py.ConnectionError:
            return False

    def __exit__(self, *exc):
        try:
            self.r.shutdown(nosave=True)
        except redis_py.ConnectionError:
            pass


def drain_backlog(conn, r, n):
    """Jobs/s of the bridge draining a paused backlog of `n` jobs into Redis `r`."""
    reset(conn, r)
    conn.execute("SELECT queue.pause('drain')")
    for start in range(0, n, 10_000):
        conn.execute(
            "SELECT count(*) FROM queue.enqueue_many('drain', (SELECT jsonb_agg(jsonb_build_object('n', g, 'to', 'ada@example.com')) "
            "FROM generate_series(%s::int, %s::int) g))", (start + 1, start + 10_000))
    conn.execute("VACUUM ANALYZE queue.jobs")
    key = "queue_pg:{drain}:normal"
    t0 = time.monotonic()
    conn.execute("SELECT queue.resume('drain')")
    wait_until(lambda: r.llen(key) >= n)
    bridge_s = time.monotonic() - t0
    wait_until(lambda: conn.execute("SELECT count(*) FROM queue.jobs WHERE status = 'migrated'").fetchone()[0] == n)
    return n / bridge_s


CLUSTER_BASE = 15530
CLUSTER_QUEUES = [f"d{i}" for i in range(50)]


def drain_queues(conn, flush, waiting, n):
    """Jobs/s of the bridge draining a paused backlog of `n` jobs spread over 50 queues."""
    flush()
    per = n // len(CLUSTER_QUEUES)
    conn.execute("SELECT queue.pause(q) FROM unnest(%s::text[]) q", (CLUSTER_QUEUES,))
    for q in CLUSTER_QUEUES:
        conn.execute("SELECT count(*) FROM queue.enqueue_many(%s, (SELECT jsonb_agg(jsonb_build_object("
                     "'n', g, 'to', 'ada@example.com')) FROM generate_series(1, %s) g))", (q, per))
    conn.execute("VACUUM ANALYZE queue.jobs")
    t0 = time.monotonic()
    conn.execute("SELECT queue.resume(q) FROM unnest(%s::text[]) q", (CLUSTER_QUEUES,))
    wait_until(lambda: waiting() >= per * len(CLUSTER_QUEUES), interval=0.01)
    took = time.monotonic() - t0
    wait_until(lambda: conn.execute(
        "SELECT count(*) FROM queue.jobs WHERE status = 'migrated'").fetchone()[0] == per * len(CLUSTER_QUEUES))
    return per * len(CLUSTER_QUEUES) / took


def bench_cluster(conn, r, seconds, n=100_000):
    from redis.cluster import RedisCluster

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "scripts", "redis_cluster.sh")
    cdir = os.path.join(HOME, "cluster")
    subprocess.run([script, "up", cdir, str(CLUSTER_BASE), "3"], check=True, stdout=subprocess.DEVNULL)
    nodes = [redis_py.Redis(port=CLUSTER_BASE + i) for i in range(3)]
    cluster = lambda: RedisCluster(host="127.0.0.1", port=CLUSTER_BASE)
    keys = [f"queue_pg:{{{q}}}:normal" for q in CLUSTER_QUEUES]

    def waiting_in(client):
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.llen(k)
        return sum(pipe.execute())

    def flush_cluster():
        conn.execute("TRUNCATE queue.jobs, queue.queues, queue.redis_outbox")
        conn.execute("CHECKPOINT")
        for node in nodes:
            node.flushall()

    try:
        single = drain_queues(conn, lambda: reset(conn, r), lambda: waiting_in(r), n)
        _, single_p99 = bench_latency(conn, r, seconds)
        conn.execute("ALTER SYSTEM SET queue.redis_mode = 'cluster'")
        conn.execute(f"ALTER SYSTEM SET queue.redis_url = 'redis://127.0.0.1:{CLUSTER_BASE},"
                     f"redis://127.0.0.1:{CLUSTER_BASE + 1}'")
        conn.execute("SELECT pg_reload_conf()")
        wait_until(lambda: conn.execute("SELECT queue.health()").fetchone()[0]["redis"]["mode"] == "cluster",
                   timeout=20)
        cc = cluster()
        spread = {cc.get_node_from_key(k).port for k in keys}
        clustered = drain_queues(conn, flush_cluster, lambda: waiting_in(cc), n)
        _, cluster_p99 = bench_latency(conn, r, seconds, client=cluster, flush=flush_cluster)
    finally:
        conn.execute("ALTER SYSTEM RESET queue.redis_mode")
        conn.execute("ALTER SYSTEM RESET queue.redis_url")
        conn.execute("SELECT pg_reload_conf()")
        subprocess.run([script, "down", cdir], check=True)
    print(f"\n(f) Redis Cluster ({len(spread)} masters hold the 50 queues) against one redis-server")
    print(f"    drain of {n:,} jobs over 50 queues: single {single:9.0f} jobs/s, cluster {clustered:9.0f} jobs/s,"
          f" ratio cluster / single {clustered / single:.2f}")
    print(f"    commit-to-Redis p99 at 1,000 jobs/s: single {single_p99:.2f} ms, cluster {cluster_p99:.2f} ms,"
          f" ratio cluster / single {cluster_p99 / single_p99:.2f}")


def timed(conn, sql, n):
    """Median and 95th percentile of n calls, in ms."""
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.execute(sql).fetchall()
        took.append((time.perf_counter() - t0) * 1000)
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.95) - 1]


def load_monitoring(conn, rows, queues):
    # 2,000 queued jobs wait in ten paused queues; everything else is in a state the bridge
    # leaves alone (completed, dead, scheduled or retrying in the future, running with a lease).
    conn.execute("INSERT INTO queue.queues (queue_name, paused) SELECT 'q' || i, i < 10 FROM generate_series(0, %s) i",
                 (queues - 1,))
    conn.execute("""
        INSERT INTO queue.jobs (queue_name, payload, status, max_attempts, attempt_count, run_at,
                                created_at, completed_at, failed_at, lease_expires_at, dispatch_seq)
        SELECT 'q' || (i / 1000 %% %(queues)s), '{"n": 1}', s, 5, 0,
               CASE WHEN s IN ('scheduled', 'retry_scheduled') THEN now() + interval '1 hour' ELSE now() END,
               now() - (i %% 86400) * interval '1 second',
               CASE WHEN s = 'completed' THEN now() - (i %% 86400) * interval '1 second' END,
               CASE WHEN s = 'failed' THEN now() - (i %% 86400) * interval '1 second' END,
               CASE WHEN s = 'running' THEN now() + interval '1 hour' END,
               CASE WHEN s = 'migrated' THEN i END
        FROM generate_series(1, %(rows)s) i,
             LATERAL (SELECT CASE
                 WHEN i %% 1000 < 950 THEN 'completed'
                 WHEN i %% 1000 < 970 THEN 'failed'
                 WHEN i %% 1000 < 975 THEN 'running'
                 WHEN i %% 1000 < 985 THEN 'migrated'
                 WHEN i %% 1000 < 992 THEN 'scheduled'
                 WHEN i %% 1000 < 997 THEN 'retry_scheduled'
                 WHEN i / 1000 %% %(queues)s < 10 THEN 'queued'
                 ELSE 'completed' END AS s) x""",
                 {"queues": queues, "rows": rows})
    # Two hours of per-minute outcomes per queue, plus older totals.
    conn.execute("""
        INSERT INTO queue.stats
        SELECT 'q' || q, date_trunc('minute', now()) - m * interval '1 minute', 100, 3, 1, 0
        FROM generate_series(0, %s) q, generate_series(0, 119) m""", (queues - 1,))
    conn.execute("VACUUM ANALYZE queue.jobs")
    conn.execute("VACUUM ANALYZE queue.stats")


def bench_monitoring(conn, r, rows=1_000_000, queues=100, calls=50):
    reset(conn, r)
    conn.execute("TRUNCATE queue.stats")
    t0 = time.monotonic()
    load_monitoring(conn, rows, queues)
    states = conn.execute("SELECT status, count(*) FROM queue.jobs GROUP BY 1 ORDER BY 2 DESC").fetchall()
    print(f"\n(e) monitoring with {queues} queues and {rows:,} jobs (loaded in {time.monotonic() - t0:.0f} s: "
          + ", ".join(f"{n:,} {s}" for s, n in states) + f"); {calls} calls each, ms")
    naive = "SELECT queue_name, status, count(*) FROM queue.jobs GROUP BY 1, 2"
    results = {}
    for name, sql in [("queue.health()", "SELECT queue.health()"),
                      ("queue.metrics()", "SELECT * FROM queue.metrics()"),
                      ("queue.prometheus()", "SELECT queue.prometheus()"),
                      ("naive GROUP BY queue, status", naive),
                      ("SELECT 1", "SELECT 1")]:
        timed(conn, sql, 3)  # warm up
        results[name] = timed(conn, sql, calls)
        median, p95 = results[name]
        print(f"    {name:30} median {median:7.2f}   p95 {p95:7.2f}")
    for name in ("queue.health()", "queue.metrics()", "queue.prometheus()"):
        print(f"    ratio naive / {name}: {results['naive GROUP BY queue, status'][0] / results[name][0]:.1f}")
    conn.execute("TRUNCATE queue.jobs, queue.queues, queue.stats")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--only", choices=["enqueue", "latency", "drain", "cluster", "monitoring"])
    args = ap.parse_args()
    conn = db()
    r = redis_py.Redis(port=REDIS_PORT, decode_responses=False)
    print(f"queue_pg benchmarks on {os.cpu_count()} cores", flush=True)
    create_baseline_table(conn)
    if args.only in (None, "enqueue"):
        bench_enqueue(conn, r, args.seconds)
    if args.only in (None, "latency"):
        _, p99 = bench_latency(conn, r, max(args.seconds, 10))
        _, p99_parked = bench_latency(conn, r, max(args.seconds, 10), paused_backlog=200_000)
        print(f"    ratio p99 without / with the paused backlog: {p99 / p99_parked:.2f}")
    if args.only in (None, "drain"):
        bench_drain(conn, r)
    if args.only in (None, "cluster"):
        bench_cluster(conn, r, max(args.seconds, 10))
    if args.only in (None, "monitoring"):
        bench_monitoring(conn, r)


if __name__ == "__main__":
    main()
