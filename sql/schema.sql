-- queue_pg schema: the durable side of every job.
-- The bridge reads jobs here, pushes them to Redis, and marks them here only after Redis acknowledged.

-- Per-queue settings. A NULL column falls back to the matching queue.* setting (GUC).
CREATE TABLE queue.queues (
    queue_name   text PRIMARY KEY CHECK (queue_name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    max_attempts int CHECK (max_attempts BETWEEN 1 AND 1000),
    backoff_base interval CHECK (backoff_base >= interval '0'),
    backoff_max  interval CHECK (backoff_max >= interval '0'),
    lease        interval CHECK (lease > interval '0'),
    paused       boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- How long finished jobs stay in queue.jobs, counted from when they finished. (Last, where
    -- an upgrade from 0.1.0 adds them.)
    completed_retention interval CHECK (completed_retention >= interval '0'),
    dead_retention      interval CHECK (dead_retention >= interval '0'),
    cancelled_retention interval CHECK (cancelled_retention >= interval '0')
);

CREATE TABLE queue.jobs (
    id                 bigserial PRIMARY KEY,
    queue_name         text NOT NULL CHECK (queue_name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    payload            jsonb NOT NULL,
    priority           text NOT NULL DEFAULT 'normal' CHECK (priority IN ('high', 'normal', 'low')),
    status             text NOT NULL CHECK (status IN ('queued', 'scheduled', 'migrated', 'running',
                                                      'completed', 'retry_scheduled', 'failed', 'cancelled')),
    attempt_count      int NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    max_attempts       int NOT NULL CHECK (max_attempts BETWEEN 1 AND 1000),
    run_at             timestamptz NOT NULL DEFAULT now(),
    dedupe_key         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    lease_expires_at   timestamptz,
    completed_at       timestamptz,
    failed_at          timestamptz,
    last_error_message text,
    result             jsonb,
    errors             jsonb NOT NULL DEFAULT '[]',
    -- Dispatch bookkeeping, written by the bridge only.
    dispatched_at      timestamptz, -- when the bridge last pushed the job to Redis
    dispatch_seq       bigint       -- its place in the bridge's push order (queue.dispatch_order)
);

-- The bridge's push order: every message it pushes takes the next number, so within one Redis
-- list (FIFO) the jobs a list holds are exactly those numbered from its oldest entry on.
CREATE SEQUENCE queue.dispatch_order;

-- Every index below is partial on the states it serves, so the bridge's work and the size of
-- these indexes grow with the live jobs, never with the finished ones.

-- The bridge's dispatch scan: committed jobs waiting to be pushed, oldest first.
CREATE INDEX jobs_queued_idx ON queue.jobs (id) WHERE status = 'queued';
-- Promotion of scheduled and retrying jobs when they fall due.
CREATE INDEX jobs_due_idx ON queue.jobs (run_at) WHERE status IN ('scheduled', 'retry_scheduled');
-- One unfinished job per (queue, dedupe_key).
CREATE UNIQUE INDEX jobs_dedupe_idx ON queue.jobs (queue_name, dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status IN ('queued', 'scheduled', 'migrated', 'running', 'retry_scheduled');
-- Jobs that sit in Redis, by list and push order: what the rescue of jobs in no list reads.
CREATE INDEX jobs_migrated_idx ON queue.jobs (queue_name, priority, dispatch_seq) WHERE status = 'migrated';

-- Running jobs by lease end: the bridge's rescue of expired leases.
CREATE INDEX jobs_lease_idx ON queue.jobs (lease_expires_at) WHERE status = 'running';
-- Finished jobs by queue and age: pruning after their retention (queue.*_retention, or the
-- queue's own); dead ones also serve queue.dead_letters and replay_dead_all. A cancelled job
-- never changes again, so its updated_at is when it was cancelled.
CREATE INDEX jobs_completed_idx ON queue.jobs (queue_name, completed_at) WHERE status = 'completed';
CREATE INDEX jobs_failed_idx ON queue.jobs (queue_name, failed_at) WHERE status = 'failed';
CREATE INDEX jobs_cancelled_idx ON queue.jobs (queue_name, updated_at) WHERE status = 'cancelled';

-- Changes Redis must follow after commit (the job hash, the dead-letter list). SQL functions add a
-- row in the caller's transaction; the bridge applies it to Redis, then deletes it by its id (a
-- real key: a VACUUM FULL or CLUSTER between the bridge's read and its delete moves tuples).
-- 'state': make the job hash (and dead-letter entry) match the job's row; 'replayed' (a dead job
-- replayed) and 'pruned' (a dead job deleted after its retention): remove the job's dead-letter
-- entry and marker. `status` is the state the job entered. The bridge counts
-- outcomes into queue.stats once per poll interval whether or not Redis is reachable (`counted`),
-- and counts the rest in the transaction that deletes the rows, so each is counted once.
CREATE TABLE queue.redis_outbox (
    id         bigserial PRIMARY KEY,
    job_id     bigint NOT NULL,
    event      text NOT NULL CHECK (event IN ('state', 'replayed', 'pruned')),
    status     text NOT NULL,
    queue_name text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    counted    boolean NOT NULL DEFAULT false
);

-- Outcomes per queue and minute, for monitoring: how many attempts completed, were retried, died
-- (failed for good) or were cancelled. Only the bridge writes here (from the outbox), so workers
-- never contend on a counter row. Minutes that have left the last hour are folded into the queue's
-- row at minute '-infinity', which holds the totals from before.
CREATE TABLE queue.stats (
    queue_name text NOT NULL,
    minute     timestamptz NOT NULL,
    completed  bigint NOT NULL DEFAULT 0,
    retried    bigint NOT NULL DEFAULT 0,
    failed     bigint NOT NULL DEFAULT 0,
    cancelled  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (queue_name, minute)
);

-- Worker reports (docs/reference.md, "Worker fast path") that the report applier dropped because
-- they did not fit, per queue and reason, with the last job id among them. Only the applier
-- writes here, in the transaction that applied the rest of their batch.
CREATE TABLE queue.rejected_reports (
    queue_name  text NOT NULL,
    reason      text NOT NULL,
    count       bigint NOT NULL,
    last_at     timestamptz NOT NULL,
    last_job_id bigint,
    PRIMARY KEY (queue_name, reason)
);

-- Dead jobs: their durable record is the row in queue.jobs.
CREATE VIEW queue.dead_letters AS
    SELECT id, queue_name, payload, priority AS original_priority, attempt_count, max_attempts,
           last_error_message AS error, errors, failed_at, created_at
    FROM queue.jobs WHERE status = 'failed';

-- Tables created by the extension are user data: keep them in pg_dump.
SELECT pg_catalog.pg_extension_config_dump('queue.queues', '');
SELECT pg_catalog.pg_extension_config_dump('queue.jobs', '');
SELECT pg_catalog.pg_extension_config_dump('queue.jobs_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('queue.dispatch_order', '');
SELECT pg_catalog.pg_extension_config_dump('queue.stats', '');
SELECT pg_catalog.pg_extension_config_dump('queue.rejected_reports', '');
