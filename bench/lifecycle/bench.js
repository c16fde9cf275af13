// Full job lifecycle, queue_pg against graphile-worker, on the same Postgres in the same run.
//
// For each worker count: enqueue N no-op jobs in statements of 100 (queue.enqueue_many /
// graphile_worker.add_jobs) while the workers run, and time until every job is complete.
// queue_pg workers follow the documented loop (BRPOP -> queue.start -> queue.complete), one Redis
// connection per worker; the "complete_many" variant acknowledges in batches instead.
// graphile-worker runs its own runner with `concurrency` = the worker count.
//
//   node bench.js            (QPG_HOME, QPG_PGPORT, QPG_REDIS_PORT from bench/run.sh)

const { Pool } = require("pg");
const Redis = require("ioredis");
const { run } = require("graphile-worker");

const N = Number(process.env.LIFECYCLE_JOBS || 10000);
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
async function bridgeCpu(admin) {
  const { rows } = await admin.query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'queue_pg bridge'");
  if (!rows.length) return 0;
  const fields = fs.readFileSync(`/proc/${rows[0].pid}/stat`, "utf8").split(") ")[1].split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

async function waitFor(pred) {
  while (!(await pred())) await sleep(5);
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

(async () => {
  const admin = new Pool({ ...pgConfig, max: 2 });
  // Let graphile-worker install its schema once, outside the timings.
  const warm = await run({ pgPool: quietPool({ ...pgConfig, max: 2 }), concurrency: 1, noHandleSignals: true,
    logger: new (require("graphile-worker").Logger)(() => () => {}), taskList: { noop: async () => {} } });
  await warm.stop();
  console.log(`\n(d) full lifecycle of ${N.toLocaleString()} no-op jobs (enqueue in statements of 100 -> worker -> complete),`);
  console.log(`    median of ${ROUNDS} interleaved rounds (all rounds in brackets)`);
  console.log("    workers   graphile-worker   queue_pg complete   ratio   queue_pg complete_many   ratio");
  for (const w of WORKERS) {
    const runs = { g: [], q: [], qm: [] };
    const bridge = { q: [], qm: [] };
    for (let round = 0; round < ROUNDS; round++) {
      runs.g.push(await graphile(admin, w));
      for (const [key, batchAck] of [["q", false], ["qm", true]]) {
        const { rate, bridgeMs } = await queuePg(admin, w, batchAck);
        runs[key].push(rate);
        bridge[key].push(bridgeMs);
      }
    }
    const [g, q, qm] = [median(runs.g), median(runs.q), median(runs.qm)];
    console.log(`    ${String(w).padStart(7)}   ${g.toFixed(0).padStart(10)} jobs/s   ${q.toFixed(0).padStart(10)} jobs/s   ${(q / g).toFixed(2).padStart(5)}   ${qm.toFixed(0).padStart(15)} jobs/s   ${(qm / g).toFixed(2).padStart(5)}`);
    const all = (xs) => xs.map((x) => x.toFixed(0)).join(", ");
    console.log(`              [${all(runs.g)}]   [${all(runs.q)}]   [${all(runs.qm)}]`);
    console.log(`              queue_pg's bridge: ${median(bridge.q).toFixed(0)} ms CPU per 1,000 jobs (complete), ${median(bridge.qm).toFixed(0)} ms (complete_many)`);
  }
  await admin.end();
})().catch((e) => { console.error(e); process.exit(1); });
