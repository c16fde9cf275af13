// Full job lifecycle, queue_pg against graphile-worker, on the same Postgres in the same run.
//
// For each worker count: enqueue N (20,000) no-op jobs in statements of 100 (queue.enqueue_many /
// graphile_worker.add_jobs) while the workers run, and time until every job is complete.
// queue_pg's workers run each documented loop, one Redis connection per worker: the fast path
// (BLMPOP up to 10 jobs, one pipelined XADD `complete` report per job, applied to Postgres by the
// report applier), and the SQL path (BRPOP -> queue.start -> queue.complete, or batched
// queue.complete_many). graphile-worker runs its own runner with `concurrency` = the worker
// count. Then the fast path's report-to-Postgres latency at a steady 1,000 jobs/s.
//
//   node bench.js            (QPG_HOME, QPG_PGPORT, QPG_REDIS_PORT from bench/run.sh)
//   LIFECYCLE_JOBS, LIFECYCLE_WORKERS (1,4,16), LIFECYCLE_ROUNDS (3), LIFECYCLE_VARIANTS
//   (graphile,fast,complete,complete_many), LIFECYCLE_POP_COUNT (10), LATENCY_RATE (1000),
//   LATENCY_SECONDS (15)

const { Pool } = require("pg");
const Redis = require("ioredis");
const { run } = require("graphile-worker");

const N = Number(process.env.LIFECYCLE_JOBS || 20000);
const WORKERS = (process.env.LIFECYCLE_WORKERS || "1,4,16").split(",").map(Number);
const ROUNDS = Number(process.env.LIFECYCLE_ROUNDS || 3);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const pgConfig = { host: process.env.QPG_HOME, port: Number(process.env.QPG_PGPORT), user: "postgres", database: "postgres" };
const redisPort = Number(process.env.QPG_REDIS_PORT);
const quietPool = (config) => {
  const pool = new Pool(config);
  pool.on("error", () => {}); // idle clients dropped at shutdown
  return pool;
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const fs = require("fs");
// CPU seconds (user + system) the bridge process has used so far.
async function bridgeCpu(admin, type = "queue_pg bridge") {
  const { rows } = await admin.query("SELECT pid FROM pg_stat_activity WHERE backend_type = $1", [type]);
  if (!rows.length) return 0;
  const fields = fs.readFileSync(`/proc/${rows[0].pid}/stat`, "utf8").split(") ")[1].split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

const applierCpu = (admin) => bridgeCpu(admin, "queue_pg reports");

async function waitFor(pred, ms = 5) {
  while (!(await pred())) await sleep(ms);
}

async function enqueueAll(pool, statement) {
  for (let i = 0; i < N; i += 100) await pool.query(statement);
}

async function queuePg(admin, workers, batchAck) {
  await admin.query("TRUNCATE queue.jobs, queue.redis_outbox");
  const pool = new Pool({ ...pgConfig, max: workers + 1 });
  const redises = Array.from({ length: workers }, () => new Redis({ port: redisPort }));
  const keys = ["queue_pg:{bench}:high", "queue_pg:{bench}:normal", "queue_pg:{bench}:low"];
  let stopping = false;
  let acks = [];
  let done = 0;
  const flusher = batchAck && (async () => {
    while (!stopping || acks.length) {
      if (acks.length) {
        const ids = acks;
        acks = [];
        const r = await pool.query("SELECT queue.complete_many($1::bigint[]) AS n", [ids]);
        done += r.rows[0].n;
      } else await sleep(2);
    }
  })();
  const loop = async (redis) => {
    while (!stopping) {
      const got = await redis.brpop(...keys, 1);
      if (!got) continue;
      const msg = JSON.parse(got[1]);
      const started = await pool.query("SELECT attempt FROM queue.start($1)", [msg.id]);
      if (started.rowCount === 0) continue;
      if (batchAck) acks.push(msg.id);
      else {
        await pool.query("SELECT queue.complete($1, NULL, $2)", [msg.id, started.rows[0].attempt]);
        done++;
      }
    }
  };
  const loops = redises.map(loop);
  const cpu0 = await bridgeCpu(admin);
  const t0 = process.hrtime.bigint();
  await enqueueAll(admin, "SELECT count(*) FROM queue.enqueue_many('bench', (SELECT jsonb_agg(jsonb_build_object('n', g)) FROM generate_series(1, 100) g))");
  // Count acknowledgements in the workers; then check Postgres agrees.
  await waitFor(async () => done >= N);
  await waitFor(async () => Number((await admin.query("SELECT count(*) FROM queue.jobs WHERE status = 'completed'")).rows[0].count) === N);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const bridgeMs = ((await bridgeCpu(admin)) - cpu0) * 1000 * (1000 / N);
  stopping = true;
  await Promise.all(loops);
  if (flusher) await flusher;
  redises.forEach((r) => r.disconnect());
  await pool.end();
  return { rate: N / seconds, bridgeMs };
}

// The fast path: batch pop (BLMPOP, up to POP_COUNT jobs), then one pipelined XADD of a
// `complete` report per job; the report applier moves them into Postgres.
const POP_COUNT = Number(process.env.LIFECYCLE_POP_COUNT || 10);
// `workers` fast-path workers, one Redis connection each; `extra()` gives the report's fields
// beyond id, attempt and op, per batch.
function fastWorkers(workers, extra) {
  const redises = Array.from({ length: workers }, () => new Redis({ port: redisPort }));
  const keys = ["queue_pg:{bench}:high", "queue_pg:{bench}:normal", "queue_pg:{bench}:low"];
  let stopping = false;
  const loop = async (redis) => {
    while (!stopping) {
      const got = await redis.blmpop(1, 3, ...keys, "RIGHT", "COUNT", POP_COUNT);
      if (!got) continue;
      const pipe = redis.pipeline();
      const fields = extra();
      for (const m of got[1]) {
        const msg = JSON.parse(m);
        pipe.xadd("queue_pg:{bench}:reports", "*", "id", msg.id, "attempt", msg.attempt, "op", "complete", ...fields);
      }
      await pipe.exec();
    }
  };
  const loops = redises.map(loop);
  return {
    stop: async () => {
      stopping = true;
      await Promise.all(loops);
      redises.forEach((r) => r.disconnect());
    },
  };
}
async function queuePgFast(admin, workers) {
  await admin.query("TRUNCATE queue.jobs, queue.redis_outbox");
  const fleet = fastWorkers(workers, () => []);
  const cpu0 = await bridgeCpu(admin);
  const applier0 = await applierCpu(admin);
  const t0 = process.hrtime.bigint();
  await enqueueAll(admin, "SELECT count(*) FROM queue.enqueue_many('bench', (SELECT jsonb_agg(jsonb_build_object('n', g)) FROM generate_series(1, 100) g))");
  await waitFor(async () => Number((await admin.query("SELECT count(*) FROM queue.jobs WHERE status = 'completed'")).rows[0].count) === N, 10);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const bridgeMs = ((await bridgeCpu(admin)) - cpu0) * 1000 * (1000 / N);
  const applierMs = ((await applierCpu(admin)) - applier0) * 1000 * (1000 / N);
  await fleet.stop();
  return { rate: N / seconds, bridgeMs, applierMs };
}

async function graphile(admin, workers) {
  let done = 0;
  const runner = await run({
    pgPool: quietPool({ ...pgConfig, max: workers + 2 }),
    concurrency: workers,
    noHandleSignals: true,
    pollInterval: 1000,
    logger: new (require("graphile-worker").Logger)(() => () => {}),
    taskList: { noop: async () => { done++; } },
  });
  await admin.query("DELETE FROM graphile_worker._private_jobs");
  const t0 = process.hrtime.bigint();
  await enqueueAll(admin, "SELECT count(*) FROM graphile_worker.add_jobs((SELECT array_agg(ROW('noop', json_build_object('n', g), NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec) FROM generate_series(1, 100) g))");
  await waitFor(async () => done >= N && Number((await admin.query("SELECT count(*) FROM graphile_worker._private_jobs")).rows[0].count) === 0);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  await runner.stop();
  return N / seconds;
}

// Report-to-Postgres latency on the fast path at a steady rate: workers put the time of their XADD
// in the report's result; the applier's transaction stamps completed_at (its start, so the
// commit, a few ms at most, is not included).
async function fastLatency(admin, rate, seconds, workers) {
  await admin.query("TRUNCATE queue.jobs, queue.redis_outbox");
  // The wall clock, like Postgres's now().
  const fleet = fastWorkers(workers, () => ["result", JSON.stringify({ sent_ms: Date.now() })]);
  const perTick = rate / 100; // one statement every 10 ms
  const total = rate * seconds;
  const t0 = performance.now();
  for (let i = 0; i < total / perTick; i++) {
    await admin.query(`SELECT count(*) FROM queue.enqueue_many('bench', (SELECT jsonb_agg(g) FROM generate_series(1, ${perTick}) g))`);
    const next = t0 + (i + 1) * 10;
    const wait = next - performance.now();
    if (wait > 0) await sleep(wait);
  }
  const achieved = total / ((performance.now() - t0) / 1000);
  await waitFor(async () => Number((await admin.query("SELECT count(*) FROM queue.jobs WHERE status = 'completed'")).rows[0].count) === total, 10);
  await fleet.stop();
  const { rows } = await admin.query(`
    SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY ms) AS p, max(ms) AS max
    FROM (SELECT extract(epoch FROM completed_at) * 1000 - (result->>'sent_ms')::float8 AS ms
          FROM queue.jobs WHERE status = 'completed') t`);
  return { achieved, p: rows[0].p, max: rows[0].max, total };
}

const VARIANTS = (process.env.LIFECYCLE_VARIANTS || "graphile,fast,complete,complete_many").split(",");

(async () => {
  const admin = new Pool({ ...pgConfig, max: 2 });
  // Let graphile-worker install its schema once, outside the timings.
  const warm = await run({ pgPool: quietPool({ ...pgConfig, max: 2 }), concurrency: 1, noHandleSignals: true,
    logger: new (require("graphile-worker").Logger)(() => () => {}), taskList: { noop: async () => {} } });
  await warm.stop();
  const runners = {
    graphile: { label: "graphile-worker", run: async (w) => ({ rate: await graphile(admin, w) }) },
    fast: { label: `queue_pg fast path (BLMPOP ${POP_COUNT}, XADD reports)`, run: (w) => queuePgFast(admin, w) },
    complete: { label: "queue_pg SQL path (start, complete)", run: (w) => queuePg(admin, w, false) },
    complete_many: { label: "queue_pg SQL path (start, complete_many)", run: (w) => queuePg(admin, w, true) },
  };
  console.log(`\n(d) full lifecycle of ${N.toLocaleString()} no-op jobs (enqueue in statements of 100 -> worker -> complete),`);
  console.log(`    median of ${ROUNDS} interleaved rounds (all rounds in brackets); ratio against graphile-worker's median`);
  const all = (xs) => xs.map((x) => x.toFixed(0)).join(", ");
  for (const w of WORKERS) {
    const runs = Object.fromEntries(VARIANTS.map((v) => [v, []]));
    for (let round = 0; round < ROUNDS; round++) {
      for (const v of VARIANTS) runs[v].push(await runners[v].run(w));
    }
    console.log(`    ${w} worker${w === 1 ? "" : "s"}:`);
    const g = runs.graphile ? median(runs.graphile.map((r) => r.rate)) : NaN;
    for (const v of VARIANTS) {
      const rates = runs[v].map((r) => r.rate);
      const m = median(rates);
      const ratio = v === "graphile" || !runs.graphile ? "" : `ratio ${(m / g).toFixed(2)}`;
      let cpu = "";
      if (v !== "graphile") {
        cpu = `   CPU per 1,000 jobs: bridge ${median(runs[v].map((r) => r.bridgeMs)).toFixed(0)} ms`;
        if (v === "fast") cpu += `, report applier ${median(runs[v].map((r) => r.applierMs)).toFixed(0)} ms`;
      }
      console.log(`      ${runners[v].label.padEnd(44)} ${m.toFixed(0).padStart(6)} jobs/s  ${ratio.padEnd(10)} [${all(rates)}]${cpu}`);
    }
  }
  if (VARIANTS.includes("fast")) {
    const rate = Number(process.env.LATENCY_RATE || 1000);
    const seconds = Number(process.env.LATENCY_SECONDS || 15);
    const l = await fastLatency(admin, rate, seconds, 4);
    const f = (x) => Number(x).toFixed(2);
    console.log(`\n(d) fast path: report-to-Postgres latency at ${rate} jobs/s for ${seconds} s, 4 workers (${l.achieved.toFixed(0)} jobs/s achieved, ${l.total} jobs)`);
    console.log(`    from the worker's XADD to the applying transaction: p50 ${f(l.p[0])} ms   p90 ${f(l.p[1])} ms   p99 ${f(l.p[2])} ms   max ${f(l.max)} ms`);
  }
  await admin.end();
})().catch((e) => { console.error(e); process.exit(1); });
