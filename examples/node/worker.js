// A queue_pg worker in Node.js (ioredis + pg), on either documented worker loop:
//
//   fast path (default): BLMPOP up to BATCH jobs  ->  handle() each  ->  XADD complete / fail
//                        reports (pipelined; `start` and heartbeats only for jobs that run long)
//   SQL path:            BRPOP  ->  queue.start(id)  ->  handle()  ->  queue.complete / queue.fail
//
//   npm ci
//   DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
//   REDIS_URL=redis://127.0.0.1:6379 QUEUES=emails,reports node worker.js
//
// Put your work in handle(). Delivery is at-least-once: a job may run again after a crash, so
// make handle() safe to repeat (idempotent). When Redis or Postgres goes away, the worker waits
// for it (retrying after 0.1 s, then up to every 5 s; one log line when it goes, one when it is
// back), keeps the job in hand and reports its outcome once it can; only SIGTERM stops it.
// Settings (environment): DATABASE_URL, REDIS_URL
// (rediss:// for TLS, with an ACL user: rediss://user:password@host:port), REDIS_TLS_CA_FILE (a PEM
// file of the CAs that may sign the server's certificate; default: the system's), REDIS_CLUSTER
// (1: REDIS_URL holds comma-separated seed URLs of a Redis Cluster; the worker then pops one
// queue's lists at a time, in turn), QUEUES (comma-separated, highest priority lists first across them), QUEUE_PG_PREFIX (queue_pg),
// SHUTDOWN_GRACE_S (10: on SIGTERM, how long the job in hand may still run before it is failed,
// and so retried later, instead of completed), QUEUE_PG_PATH (fast, or sql), and for the fast
// path BATCH (10: jobs per pop) and LEASE_S (30: a job still running after a third of it is
// reported started with this lease, then kept alive by a heartbeat every third; keep that third
// below queue.start_timeout). The SQL path takes its lease from the queue (queue.lease).
'use strict';

const Redis = require('ioredis');
const { Client } = require('pg');

const DATABASE_URL = process.env.DATABASE_URL || 'postgresql://postgres@127.0.0.1:5432/postgres';
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const QUEUES = (process.env.QUEUES || 'default').split(',').filter(Boolean);
const REDIS_TLS_CA_FILE = process.env.REDIS_TLS_CA_FILE;
const REDIS_CLUSTER = process.env.REDIS_CLUSTER === '1';
const PREFIX = process.env.QUEUE_PG_PREFIX || 'queue_pg';
const SHUTDOWN_GRACE_MS = 1000 * Number(process.env.SHUTDOWN_GRACE_S || '10');
const PATH = process.env.QUEUE_PG_PATH || 'fast';
const BATCH = Number(process.env.BATCH || '10');
const LEASE_MS = 1000 * Number(process.env.LEASE_S || '30');
const SHUTDOWN_ERROR = 'worker shut down (SIGTERM) before the job finished';

// Your work goes here: return (or resolve to) a JSON-serialisable result, or throw (reject) to
// fail the attempt; the error's message becomes the job's error. This example's handler
// understands {"sleep": seconds} and {"fail": "message"}, so the test suite can drive it.
async function handle(jobId, attempt, payload) {
  if (payload && typeof payload === 'object') {
    if (payload.sleep) await new Promise((resolve) => setTimeout(resolve, payload.sleep * 1000));
    if (payload.fail) throw new Error(payload.fail);
  }
  return { worker: 'node', attempt };
}

const log = (message) => console.error(`[node worker ${process.pid}] ${message}`);

let stopping = false;
let onStop = () => {};
const stopped = new Promise((resolve) => { onStop = resolve; });
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    log(`${signal}: finishing the job in hand, then stopping`);
    stopping = true;
    onStop();
  });
}

class Stopped extends Error {}

// A connection to Redis or Postgres that rides out an outage: a call that fails for want of the
// server is tried again on a new connection, after 0.1 s, then twice as long each time up to
// 5 s, until it works (or SIGTERM). The log says once that the server is unreachable and once
// that it is back, not once per retry.
class Link {
  constructor(name, connect, isOutage) {
    Object.assign(this, { name, connect, isOutage, conn: null, down: false });
  }

  async call(fn) {
    for (let delay = 100; ; delay = Math.min(delay * 2, 5000)) {
      try {
        if (!this.conn) this.conn = await this.connect();
        const result = await fn(this.conn);
        if (this.down) log(`${this.name} reachable again`);
        this.down = false;
        return result;
      } catch (e) {
        if (!this.isOutage(e)) throw e;
        this.close();
        if (!this.down) log(`${this.name} unreachable (${e.message}); retrying until it is back`);
        this.down = true;
        if (stopping) throw new Stopped();
        await Promise.race([new Promise((resolve) => setTimeout(resolve, delay)), stopped]);
        if (stopping) throw new Stopped();
      }
    }
  }

  close() {
    const conn = this.conn;
    this.conn = null;
    if (conn) Promise.resolve().then(() => (conn.end ? conn.end() : conn.disconnect())).catch(() => {});
  }
}

// A Redis error that is not the server's answer (a ReplyError) means Redis is away, and so do
// the answers of a server still loading its data, read-only during a failover, or a cluster
// that is down; so does a Postgres error that is not the server's (a socket error such as
// ECONNRESET), or of class 08 (connection) or 57P (shut down).
const redisDown = (e) => !(e instanceof Redis.ReplyError)
  || /^(LOADING|READONLY|MASTERDOWN|CLUSTERDOWN|TRYAGAIN)/.test(e.message);
const postgresDown = (e) => !e.severity || /^(08|57P)/.test(e.code); // a server error has a severity

async function connectPostgres() {
  const db = new Client({ connectionString: DATABASE_URL });
  db.on('error', () => {}); // a connection lost while idle: the next call notices
  await db.connect();
  return db;
}

// Runs handle(): resolves to { result } or { error }. After SIGTERM the handler has
// SHUTDOWN_GRACE_S more; then the attempt fails (and is retried later).
function runHandler(jobId, attempt, payload) {
  const work = Promise.resolve()
    .then(() => handle(jobId, attempt, payload))
    .then((result) => ({ result }), (e) => ({ error: `${(e && e.name) || 'Error'}: ${(e && e.message) || e}` }));
  const graceOver = stopped.then(() => new Promise((resolve) => {
    setTimeout(resolve, SHUTDOWN_GRACE_MS, { error: SHUTDOWN_ERROR });
  }));
  return Promise.race([work, graceOver]);
}

// The SQL path: the job was started with queue.start; heartbeats and the end go through SQL.
// The outcome is reported even if Postgres is away meanwhile: once it is back (the attempt token
// makes a report that already went through harmless).
async function run(pg, jobId, attempt, payload, leaseSeconds) {
  // Extend the lease every third of it while the handler runs (skipped while Postgres is away).
  const heartbeat = setInterval(() => {
    if (!pg.conn) return;
    pg.conn.query('SELECT queue.heartbeat($1, attempt => $2)', [jobId, attempt])
      .catch((e) => { if (!postgresDown(e)) log(`heartbeat for job ${jobId} failed: ${e.message}`); });
  }, Math.max(leaseSeconds / 3, 0.5) * 1000);
  const outcome = await runHandler(jobId, attempt, payload);
  clearInterval(heartbeat);
  await pg.call(async (db) => {
    try {
      if ('error' in outcome) {
        await db.query('SELECT queue.fail($1, $2, $3)', [jobId, outcome.error, attempt]);
      } else {
        await db.query('SELECT queue.complete($1, $2, $3)', [jobId, JSON.stringify(outcome.result ?? null), attempt]);
      }
    } catch (e) {
      // 55000: cancelled meanwhile, or the lease expired and the job moved on (or this report
      // already went through before a reconnect): nothing to report.
      if (e.code !== '55000') throw e;
      log(`job ${jobId}: ${e.message}`);
    }
  });
}

// The fast path's reports: XADD to the job's queue's report stream, sent in one pipeline per
// batch of jobs (or at once, for a job that runs long). While Redis is away they wait here and
// go once it is back.
class Reports {
  constructor(link) { this.link = link; this.pending = []; }

  add(queue, id, attempt, op, fields = {}) {
    const entry = ['id', id, 'attempt', attempt, 'op', op];
    for (const [k, v] of Object.entries(fields)) entry.push(k, v);
    this.pending.push([`${PREFIX}:{${queue}}:reports`, entry]);
  }

  // One pipeline per stream: in a Redis Cluster a pipeline stays within one slot.
  // Flushes run one after another (a heartbeat's may overlap the batch's): each takes what is
  // pending when it starts, and keeps it until Redis took it.
  flush() {
    this.last = (this.last || Promise.resolve()).catch(() => {}).then(() => this.send());
    return this.last;
  }

  async send() {
    const batch = this.pending;
    this.pending = [];
    if (batch.length === 0) return;
    try {
      await this.link.call(async (redis) => {
        const byStream = new Map();
        for (const [stream, entry] of batch) {
          if (!byStream.has(stream)) byStream.set(stream, redis.pipeline());
          byStream.get(stream).xadd(stream, '*', ...entry);
        }
        const results = await Promise.all([...byStream.values()].map((pipe) => pipe.exec()));
        for (const [err] of results.flat()) if (err) throw err;
      });
    } catch (e) {
      this.pending = batch.concat(this.pending); // SIGTERM, or a refused report: not sent
      throw e;
    }
  }
}

// The fast path: no claim in Postgres. A job still running after a third of LEASE_S is reported
// started (with that lease), then kept alive by a heartbeat every third of it.
async function runFast(reports, message) {
  const { queue, id, attempt } = message;
  let started = false;
  const tick = setInterval(() => {
    reports.add(queue, id, attempt, started ? 'heartbeat' : 'start', { lease_ms: LEASE_MS });
    started = true;
    reports.flush().catch((e) => log(`reporting job ${id} running failed: ${e.message}`));
  }, LEASE_MS / 3);
  const outcome = await runHandler(id, attempt, message.payload);
  clearInterval(tick);
  if ('error' in outcome) reports.add(queue, id, attempt, 'fail', { error: outcome.error });
  else reports.add(queue, id, attempt, 'complete', { result: JSON.stringify(outcome.result ?? null) });
}

// The lists each pop covers: all of them on one server (highest priority first across the
// queues); in a Redis Cluster, one queue's three (they share a slot), taken in turn. And how long
// each pop waits: about a second per round, so that SIGTERM is noticed within a second.
function popLists() {
  const lists = QUEUES.map((q) => ['high', 'normal', 'low'].map((p) => `${PREFIX}:{${q}}:${p}`));
  const pops = REDIS_CLUSTER ? lists : [[0, 1, 2].flatMap((p) => lists.map((l) => l[p]))];
  return { pops, wait: Math.max(0.05, 1 / pops.length) };
}

async function mainFast(link) {
  const reports = new Reports(link);
  const { pops, wait } = popLists();
  console.log('ready');
  while (!stopping) {
    for (const keys of pops) {
      // Up to BATCH jobs from the first list that has any: high before normal before low.
      const popped = await link.call((redis) => redis.blmpop(wait, keys.length, ...keys, 'RIGHT', 'COUNT', BATCH));
      if (!popped) continue;
      for (const raw of popped[1]) {
        if (stopping) break; // popped and never run: the start-timeout rescue dispatches these again
        await runFast(reports, JSON.parse(raw));
      }
      await reports.flush();
    }
  }
}

function connectRedis() {
  // Every Redis call is bounded: pops wait 1 s, so a reply later than 5 s means Redis hangs.
  const options = { connectTimeout: 5000, commandTimeout: 5000 };
  if (REDIS_TLS_CA_FILE) options.tls = { ca: require('fs').readFileSync(REDIS_TLS_CA_FILE) };
  // No retries or offline queue of its own: a call fails at once while Redis is away, and the
  // Link retries it.
  Object.assign(options, { maxRetriesPerRequest: 0, enableOfflineQueue: false, retryStrategy: () => null });
  if (!REDIS_CLUSTER) return connected(new Redis(REDIS_URL, options));
  // Every node is reached as the first seed URL says (user, password, TLS).
  const seeds = REDIS_URL.split(',');
  const first = new URL(seeds[0]);
  if (first.username) options.username = decodeURIComponent(first.username);
  if (first.password) options.password = decodeURIComponent(first.password);
  if (first.protocol === 'rediss:') options.tls = options.tls || {};
  return connected(new Redis.Cluster(seeds, {
    redisOptions: options, enableOfflineQueue: false, clusterRetryStrategy: () => null,
  }));
}

// Resolves once the client is ready; rejects (and disconnects) if it cannot connect.
function connected(client) {
  client.on('error', () => {}); // reported by the call that fails
  return new Promise((resolve, reject) => {
    client.once('ready', () => resolve(client));
    client.once('end', () => reject(new Error('connection closed before it was ready')));
  });
}

async function main() {
  const redis = new Link('Redis', connectRedis, redisDown);
  const pg = new Link('Postgres', connectPostgres, postgresDown);
  try {
    if (PATH === 'fast') await mainFast(redis);
    else await mainSql(redis, pg);
  } catch (e) {
    if (!(e instanceof Stopped)) throw e; // SIGTERM during an outage: the job goes back by its lease
  }
  redis.close();
  pg.close();
  log('stopped');
  process.exit(0); // a handler abandoned after the grace period may still hold timers
}

async function mainSql(redis, pg) {
  const { pops, wait } = popLists();
  await pg.call(async () => {}); // connected before saying ready
  console.log('ready');
  while (!stopping) {
    for (const keys of pops) {
      const popped = await redis.call((r) => r.brpop(...keys, wait));
      if (!popped) continue;
      const message = JSON.parse(popped[1]);
      const { rows } = await pg.call((db) => db.query(
        'SELECT id, attempt, payload, EXTRACT(EPOCH FROM lease_expires_at - now())::float8 AS lease_s FROM queue.start($1)',
        [message.id],
      ));
      if (rows.length === 0) continue; // cancelled, finished, held by another worker, or a stale duplicate
      const job = rows[0];
      await run(pg, job.id, job.attempt, job.payload, job.lease_s);
    }
  }
}

main().catch((e) => {
  log(`fatal: ${e.stack || e}`);
  process.exit(1);
});
