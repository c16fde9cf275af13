"""Redis Cluster as the dispatch layer: three masters started here (scripts/redis_cluster.sh),
the bridge and the report applier in `queue.redis_mode = 'cluster'` with two seed URLs.

- Fifty queues over all three masters: dispatch (one round trip per node per batch, counted by
  the bridge), the lifecycle through SQL and through report streams, backoff, dead letters,
  replay, optimize_memory and health.
- One master killed and restarted empty while 10,000 jobs flow: exactly the jobs of its queues
  are dispatched again (an audit trigger records every job made `queued` again), nothing is
  lost, nothing completes twice.
- Slots migrated between masters with `redis-cli --cluster reshard` while jobs flow: every job is
  popped once and completed once.
"""

import collections
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
import redis as redis_py
from redis.cluster import RedisCluster

from conftest import ENV, PREFIX, dsn, list_key, set_config, wait_for

ROOT = Path(__file__).resolve().parent.parent
# The cluster bus listens on port + 10000; both stay below Linux's ephemeral ports (32768 on).
BASE = int(os.environ.get("QPG_TEST_CLUSTER_PORT", "15520"))
PORTS = [BASE, BASE + 1, BASE + 2]
DIR = Path(ENV["QPG_HOME"]) / "cluster"
SEEDS = f"redis://127.0.0.1:{BASE},redis://127.0.0.1:{BASE + 1}"


def cluster_script(*args):
    subprocess.run([str(ROOT / "scripts" / "redis_cluster.sh"), *map(str, args)], check=True,
                   stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cluster():
    cluster_script("up", DIR, BASE, 3)
    yield
    cluster_script("down", DIR)


def node(port):
    return redis_py.Redis(port=port, decode_responses=True, socket_timeout=5)


def cluster_client():
    return RedisCluster(host="127.0.0.1", port=BASE, decode_responses=True, socket_timeout=5)


def port_of(c, key):
    return c.get_node_from_key(key).port


def health(db):
    return db.execute("SELECT queue.health()").fetchone()[0]


def use_cluster(db):
    """Empty masters, the bridge and the applier on the cluster."""
    for p in PORTS:
        node(p).flushall()
    set_config(db, redis_mode="cluster", redis_url=SEEDS)

    def ready():
        h = health(db)
        return h["redis"]["mode"] == "cluster" and h["redis"]["status"] == "healthy" and h
    return wait_for(ready, timeout=20, what="health() on the cluster")


def queue_names(c, n, prefix):
    """n queue names whose slots are spread over every master."""
    names = [f"{prefix}{i}" for i in range(n)]
    assert {port_of(c, list_key(q)) for q in names} == set(PORTS)
    return names


def waiting(c, queues):
    return sum(c.llen(list_key(q, p)) for q in queues for p in ("high", "normal", "low"))


class Workers:
    """Threads that pop from the cluster (BRPOP over one queue's three lists, which share a slot)
    and run each job through queue.start and queue.complete, counting every pop and every
    completion per job id. Redis errors (a node down, a slot moving) mean: wait and pop again."""

    def __init__(self, queues, threads=8):
        self.pops = collections.Counter()
        self.completions = collections.Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.idle = [threading.Event() for _ in range(threads)]
        self.errors = collections.Counter()
        shares = [queues[i::threads] for i in range(threads)]
        self.threads = [threading.Thread(target=self.run, args=(i, share), daemon=True)
                        for i, share in enumerate(shares)]
        for t in self.threads:
            t.start()

    def run(self, n, queues):
        db = psycopg.connect(dsn(), autocommit=True)
        c = None
        while not self.stop.is_set():
            if self.paused.is_set():
                self.idle[n].set()
                time.sleep(0.01)
                continue
            self.idle[n].clear()
            try:
                c = c or cluster_client()
                for q in queues:
                    got = c.brpop([list_key(q, p) for p in ("high", "normal", "low")], timeout=0.01)
                    if not got:
                        continue
                    job = json.loads(got[1])["id"]
                    with self.lock:
                        self.pops[job] += 1
                    if db.execute("SELECT id FROM queue.start(%s)", (job,)).fetchone():
                        db.execute("SELECT queue.complete(%s)", (job,))
                        with self.lock:
                            self.completions[job] += 1
            except (redis_py.RedisError, IndexError, KeyError) as e:
                self.errors[type(e).__name__] += 1
                c = None
                time.sleep(0.05)
        db.close()

    def pause(self):
        self.paused.set()
        for e in self.idle:
            e.wait(10)

    def resume(self):
        self.paused.clear()

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(10)


def completed_count(db):
    return db.execute("SELECT count(*) FROM queue.jobs WHERE status = 'completed'").fetchone()[0]


@pytest.fixture
def requeue_audit(db):
    """Records every job the bridge makes `queued` again after it was in Redis (`migrated`)."""
    db.execute("CREATE TABLE public.requeued (job_id bigint, queue_name text)")
    db.execute("""
        CREATE FUNCTION public.note_requeue() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.requeued VALUES (NEW.id, NEW.queue_name); RETURN NEW; END $$""")
    db.execute("""
        CREATE TRIGGER note_requeue AFTER UPDATE ON queue.jobs FOR EACH ROW
        WHEN (OLD.status = 'migrated' AND NEW.status = 'queued')
        EXECUTE FUNCTION public.note_requeue()""")
    yield
    db.execute("DROP TRIGGER note_requeue ON queue.jobs")
    db.execute("DROP FUNCTION public.note_requeue()")
    db.execute("DROP TABLE public.requeued")


def test_fifty_queues_over_three_masters(db, cluster):
    c = cluster_client()
    use_cluster(db)
    queues = queue_names(c, 50, "cq")
    before = health(db)["bridge"]
    # One transaction: 1,000 jobs, 20 per queue, which the bridge takes in two batches of 500.
    with db.transaction():
        for q in queues:
            db.execute("SELECT queue.enqueue_many(%s, %s::jsonb, max_attempts => 2)",
                       (q, json.dumps([{"n": i} for i in range(20)])))
    wait_for(lambda: waiting(c, queues) == 1000, timeout=20, what="1,000 jobs in the cluster")
    after = health(db)["bridge"]
    batches = after["push_batches_total"] - before["push_batches_total"]
    trips = after["push_round_trips_total"] - before["push_round_trips_total"]
    # Each batch writes its 500 job hashes and 25 queues' lists to all three masters: one round
    # trip per master per batch (not one per queue or per key).
    assert (batches, trips) == (2, 6), (batches, trips)
    assert wait_for(lambda: db.execute(
        "SELECT count(*) = 1000 FROM queue.jobs WHERE status = 'migrated'").fetchone()[0])
    # Oldest first in every list, numbered in push order (which is how the bridge knows, from a
    # list's oldest entry, which jobs it holds).
    for q in queues:
        ids = [json.loads(m)["id"] for m in reversed(c.lrange(list_key(q), 0, -1))]
        assert ids == sorted(ids) and len(ids) == 20
        seqs = [s for (s,) in db.execute(
            "SELECT dispatch_seq FROM queue.jobs WHERE id = ANY(%s) ORDER BY id", (ids,)).fetchall()]
        assert seqs == sorted(seqs) and len(set(seqs)) == 20, seqs
        assert c.get(f"{PREFIX}:{{{q}}}:epoch")

    db.execute("SET queue.backoff_base = '10ms'")
    # Per queue: payload n=0 fails twice (dead), n=1 fails once then completes, n=2..9 through
    # SQL, n=10..19 through the queue's report stream.
    def work_once(q):
        while True:
            got = c.rpop(list_key(q))
            if got is None:
                return
            msg = json.loads(got)
            n = msg["payload"]["n"]
            if n >= 10:
                c.xadd(f"{PREFIX}:{{{q}}}:reports",
                       {"id": msg["id"], "attempt": msg["attempt"], "op": "complete"})
                continue
            assert db.execute("SELECT id FROM queue.start(%s)", (msg["id"],)).fetchone()
            if n == 0 or (n == 1 and msg["attempt"] == 1):
                db.execute("SELECT queue.fail(%s, 'boom')", (msg["id"],))
            else:
                db.execute("SELECT queue.complete(%s)", (msg["id"],))

    def settled():
        for q in queues:
            work_once(q)
        return db.execute("""
            SELECT count(*) FILTER (WHERE status = 'completed') = 950
               AND count(*) FILTER (WHERE status = 'failed') = 50
            FROM queue.jobs""").fetchone()[0]
    wait_for(settled, timeout=60, interval=0.1, what="every job completed or dead")

    # Dead letters: one entry per dead job in the list, a marker per job, each on its slot's master.
    dead = [r[0] for r in db.execute(
        "SELECT id FROM queue.jobs WHERE status = 'failed' ORDER BY id").fetchall()]
    dl = f"{PREFIX}:deadletter:queue"
    wait_for(lambda: c.llen(dl) == 50, what="50 dead-letter entries")
    assert sorted(json.loads(e)["id"] for e in c.lrange(dl, 0, -1)) == dead
    assert all(c.get(f"{PREFIX}:deadletter:{i}") == "moved" for i in dead)
    assert {port_of(c, f"{PREFIX}:deadletter:{i}") for i in dead} == set(PORTS)
    hashes = {i: c.hgetall(f"{PREFIX}:job:{i}") for i in dead}
    assert all(h["status"] == "failed" and h["attempt_count"] == "2" for h in hashes.values())

    # Replay: the entry and the marker go, the job runs again and completes.
    replayed = db.execute("SELECT queue.replay_dead_all()").fetchone()[0]
    assert replayed == 50
    wait_for(lambda: c.llen(dl) == 0, what="replayed jobs' entries removed")
    assert not any(c.exists(f"{PREFIX}:deadletter:{i}") for i in dead)

    def replayed_done():
        for q in queues:
            while (got := c.rpop(list_key(q))) is not None:
                msg = json.loads(got)
                assert db.execute("SELECT id FROM queue.start(%s)", (msg["id"],)).fetchone()
                db.execute("SELECT queue.complete(%s)", (msg["id"],))
        return completed_count(db) == 1000
    wait_for(replayed_done, timeout=30, interval=0.1, what="replayed jobs completed")
    wait_for(lambda: all(c.hget(f"{PREFIX}:job:{i}", "status") == "completed" for i in dead),
             what="job hashes of replayed jobs completed")

    # optimize_memory SCANs every master: it sees every job hash, wherever it lives.
    hashes_in_cluster = sum(len(node(p).keys(f"{PREFIX}:job:*")) for p in PORTS)
    assert hashes_in_cluster == 1000
    for p in PORTS:
        for k in node(p).keys(f"{PREFIX}:job:*"):
            node(p).persist(k)
    out = db.execute("SELECT queue.optimize_memory()").fetchone()[0]
    assert out["scanned"] == 1000 and out["expired"] == 1000 and out["kept"] == 0, out
    assert all(node(p).ttl(k) > 0 for p in PORTS for k in node(p).keys(f"{PREFIX}:job:*"))

    # health: every node, and every queue's figures read from its own master.
    h = health(db)
    nodes = {n["addr"]: n for n in h["redis"]["nodes"]}
    assert set(nodes) == {f"127.0.0.1:{p}" for p in PORTS}, nodes
    assert all(n["role"] == "master" and n["reachable"] and n["memory_used"] > 0
               for n in nodes.values()), nodes
    assert h["redis"]["memory_used"] == sum(n["memory_used"] for n in nodes.values())
    assert all(h["queues"][q]["normal"] == 0 and h["queues"][q]["reports_waiting"] == 0
               for q in queues), h["queues"]
    # (degraded, not healthy: 50 jobs died within the hour.)
    assert h["redis"]["status"] == "healthy" and h["bridge"]["status"] == "running", h
    # The reports were applied and removed from their streams.
    assert all(c.xlen(f"{PREFIX}:{{{q}}}:reports") == 0 for q in queues)
    assert db.execute("SELECT count(*) FROM queue.rejected_reports").fetchone()[0] == 0


def test_a_master_restarted_empty_redispatches_exactly_its_jobs(db, cluster, requeue_audit):
    c = cluster_client()
    use_cluster(db)
    queues = queue_names(c, 50, "kq")
    victim = PORTS[1]
    on_victim = {q for q in queues if port_of(c, list_key(q)) == victim}
    workers = Workers(queues)
    total = 10_000
    try:
        # 10,000 jobs enqueued in 100 transactions while the workers run.
        for chunk in range(100):
            with db.transaction():
                for k in range(100):
                    q = queues[(chunk * 100 + k) % 50]
                    db.execute("SELECT queue.enqueue(%s, '{}')", (q,))
            if chunk == 40:
                # Jobs wait in the victim's lists (workers paused) when it dies.
                workers.pause()
                wait_for(lambda: sum(node(victim).llen(list_key(q)) for q in on_victim) > 50,
                         what="jobs waiting on the victim")
                subprocess.run(["kill", "-9", (DIR / str(victim) / "redis.pid").read_text().strip()],
                               check=True)
                time.sleep(0.5)
                cluster_script("start-node", DIR, victim)
                wait_for(lambda: node(victim).cluster("info")["cluster_state"] == "ok",
                         timeout=20, what="the restarted master to rejoin")
                assert node(victim).dbsize() == 0
                workers.resume()
        wait_for(lambda: completed_count(db) == total, timeout=120, interval=0.2,
                 what="all 10,000 jobs completed")
    finally:
        workers.close()
    requeued = db.execute("SELECT job_id, queue_name FROM public.requeued").fetchall()
    # The jobs that were in the victim's lists came back; no job of another master did.
    assert requeued, "no job was dispatched again after the master lost its data"
    assert {q for _, q in requeued} <= on_victim, requeued
    assert len({j for j, _ in requeued}) == len(requeued)
    assert set(workers.completions) == {r[0] for r in db.execute("SELECT id FROM queue.jobs")}
    assert max(workers.completions.values()) == 1
    assert db.execute("SELECT count(*) FROM queue.jobs WHERE status <> 'completed'").fetchone()[0] == 0


def test_slots_migrated_while_jobs_flow(db, cluster, requeue_audit):
    c = cluster_client()
    use_cluster(db)
    source, target = PORTS[0], PORTS[2]
    source_id = node(source).execute_command("CLUSTER MYID")
    target_id = node(target).execute_command("CLUSTER MYID")
    # 40 queues spread as usual, and 10 in the source's lowest 200 slots, which the reshard moves.
    first = min(s for s, _ in slot_ranges(source))
    moving = []
    i = 0
    while len(moving) < 10:
        name = f"mq{i}"
        if first <= c.keyslot(list_key(name)) < first + 200:
            moving.append(name)
        i += 1
    queues = queue_names(c, 40, "sq") + moving
    workers = Workers(queues)
    total = 6_000
    reshard = None
    try:
        for chunk in range(60):
            with db.transaction():
                for k in range(100):
                    db.execute("SELECT queue.enqueue(%s, '{}')", (queues[(chunk * 100 + k) % 50],))
            if chunk == 10:
                reshard = subprocess.Popen(
                    ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{source}",
                     "--cluster-from", source_id, "--cluster-to", target_id,
                     "--cluster-slots", "200", "--cluster-yes", "--cluster-pipeline", "2"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(0.05)
        out, _ = reshard.communicate(timeout=120)
        assert reshard.returncode == 0, out
        wait_for(lambda: completed_count(db) == total, timeout=120, interval=0.2,
                 what="all jobs completed")
    finally:
        workers.close()
    assert all(port_of(cluster_client(), list_key(q)) == target for q in moving)
    assert db.execute("SELECT count(*) FROM public.requeued").fetchone()[0] == 0
    assert len(workers.pops) == total and max(workers.pops.values()) == 1
    assert len(workers.completions) == total and max(workers.completions.values()) == 1


def slot_ranges(port):
    """The slot ranges the master on `port` serves."""
    ranges = []
    for entry in node(port).execute_command("CLUSTER SLOTS"):
        if int(entry[2][1]) == port:
            ranges.append((int(entry[0]), int(entry[1])))
    return ranges


@pytest.mark.parametrize("lang", ["python", "node", "rust"])
def test_example_workers_work_against_the_cluster(db, cluster, lang):
    from test_examples import build, stop

    c = cluster_client()
    use_cluster(db)
    # Two queues on two different masters: the worker pops one queue's lists at a time.
    queues = [f"cx_{lang}_0"]
    i = 1
    while port_of(c, list_key(f"cx_{lang}_{i}")) == port_of(c, list_key(queues[0])):
        i += 1
    queues.append(f"cx_{lang}_{i}")
    command = build(lang)
    ids = []
    for path in ("fast", "sql"):
        for q in queues:
            ids += [db.execute("SELECT queue.enqueue(%s, %s, 'normal', 1)", (q, json.dumps(p))).fetchone()[0]
                    for p in ({"n": 1}, {"fail": "nope"})]
        env = dict(os.environ,
                   DATABASE_URL=f"postgresql://postgres@127.0.0.1:{ENV['QPG_PGPORT']}/postgres",
                   REDIS_URL=SEEDS, REDIS_CLUSTER="1", QUEUES=",".join(queues), QUEUE_PG_PATH=path)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready", f"the {lang} worker did not start"
            wait_for(lambda: db.execute(
                "SELECT count(*) FROM queue.jobs WHERE id = ANY(%s) AND status IN ('completed', 'failed')",
                (ids,)).fetchone()[0] == len(ids), timeout=30, what=f"the {lang} worker ({path})")
        finally:
            assert stop(proc) == 0
    states = [s for (s,) in db.execute(
        "SELECT status FROM queue.jobs WHERE id = ANY(%s) ORDER BY id", (ids,)).fetchall()]
    assert states == ["completed", "failed"] * 4, states
