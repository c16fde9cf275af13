-- queue_pg 0.1.0 -> 0.2.0, run by ALTER EXTENSION queue_pg UPDATE (in one transaction).
-- Every job, its state and its history stay; afterwards the schema is what a fresh 0.2.0 install
-- creates (the upgrade test compares the two). Install the 0.2.0 library and restart Postgres
-- first: until this script has run, the new library waits and says so (log, queue.health()).
-- The index builds below hold a SHARE lock on queue.jobs while they run (enqueues wait).
\echo Use "ALTER EXTENSION queue_pg UPDATE" to load this file. \quit

-- Retention per queue (NULL: the queue.*_retention setting). Added last, as in a fresh install.
ALTER TABLE queue.queues
    ADD COLUMN completed_retention interval CHECK (completed_retention >= interval '0'),
    ADD COLUMN dead_retention      interval CHECK (dead_retention >= interval '0'),
    ADD COLUMN cancelled_retention interval CHECK (cancelled_retention >= interval '0');

-- Finished jobs by queue and age, for pruning each queue after its own retention.
DROP INDEX queue.jobs_completed_idx;
CREATE INDEX jobs_completed_idx ON queue.jobs (queue_name, completed_at) WHERE status = 'completed';
CREATE INDEX jobs_cancelled_idx ON queue.jobs (queue_name, updated_at) WHERE status = 'cancelled';

-- The outbox gains a key (first column, so the table is rebuilt), the 'pruned' event and the
-- `counted` flag. Its rows are changes Redis has yet to follow: they move over in their order,
-- none counted yet (0.1.0 counted outcomes when it applied them, which the new bridge now does).
ALTER TABLE queue.redis_outbox RENAME TO redis_outbox_0_1_0;
-- Its constraint's name is taken schema-wide: free it for the new table.
ALTER TABLE queue.redis_outbox_0_1_0 DROP CONSTRAINT redis_outbox_event_check;
CREATE TABLE queue.redis_outbox (
    id         bigserial PRIMARY KEY,
    job_id     bigint NOT NULL,
    event      text NOT NULL CHECK (event IN ('state', 'replayed', 'pruned')),
    status     text NOT NULL,
    queue_name text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    counted    boolean NOT NULL DEFAULT false
);
INSERT INTO queue.redis_outbox (job_id, event, status, queue_name, at)
    SELECT job_id, event, status, queue_name, at FROM queue.redis_outbox_0_1_0 ORDER BY at;
DROP TABLE queue.redis_outbox_0_1_0;

-- Worker fast path: reports the applier dropped, per queue and reason.
CREATE TABLE queue.rejected_reports (
    queue_name  text NOT NULL,
    reason      text NOT NULL,
    count       bigint NOT NULL,
    last_at     timestamptz NOT NULL,
    last_job_id bigint,
    PRIMARY KEY (queue_name, reason)
);
SELECT pg_catalog.pg_extension_config_dump('queue.rejected_reports', '');

-- queue.metrics() shows the fast path's figures: three more columns.
DROP FUNCTION queue.metrics();
CREATE FUNCTION queue.metrics() RETURNS TABLE (
	"queue_name" TEXT,
	"paused" bool,
	"queued" bigint,
	"scheduled" bigint,
	"migrated" bigint,
	"running" bigint,
	"retry_scheduled" bigint,
	"dead_letters" bigint,
	"redis_high" bigint,
	"redis_normal" bigint,
	"redis_low" bigint,
	"oldest_age_s" double precision,
	"completed_last_hour" bigint,
	"retried_last_hour" bigint,
	"failed_last_hour" bigint,
	"cancelled_last_hour" bigint,
	"completed_total" bigint,
	"retried_total" bigint,
	"failed_total" bigint,
	"cancelled_total" bigint,
	"reports_waiting" bigint,
	"oldest_report_age_ms" bigint,
	"reports_rejected_total" bigint
)
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'metrics_wrapper';
-- As in 0.1.0: its small scans cost less without parallel workers.
ALTER FUNCTION queue.metrics() SET max_parallel_workers_per_gather = 0;

-- The bridge numbers its pushes from one sequence instead of a counter per list kept in Redis
-- (which Redis can lose). Numbers continue above every position 0.1.0 gave, so each list's
-- jobs stay in push order; 0.1.0's `queue_pg:{<queue>}:<priority>:pushed` keys are unused now.
-- (A 0.1.0 counter that Redis had lost and restarted gave lower numbers to newer jobs: the jobs
-- such a list holds may then be pushed once more after queue.start_timeout; `start` drops them.)
CREATE SEQUENCE queue.dispatch_order;
SELECT pg_catalog.setval('queue.dispatch_order', max(dispatch_seq)) FROM queue.jobs WHERE dispatch_seq > 0;
SELECT pg_catalog.pg_extension_config_dump('queue.dispatch_order', '');

-- Roles and privileges, as a fresh install sets them (0.1.0 had none: PUBLIC could call
-- everything). The same statements as the install's last step.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['queue_producer', 'queue_worker', 'queue_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;

DO $$
DECLARE
    f record;
BEGIN
    FOR f IN
        SELECT p.oid::pg_catalog.regprocedure AS sig, p.proname, l.lanname
        FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang
        WHERE p.pronamespace = 'queue'::pg_catalog.regnamespace
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f.sig);
        IF f.lanname = 'c' THEN
            EXECUTE pg_catalog.format('ALTER FUNCTION %s SECURITY DEFINER', f.sig);
        END IF;
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO queue_admin', f.sig);
        IF f.proname IN ('enqueue', 'enqueue_many', 'enqueue_row') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO queue_producer', f.sig);
        ELSIF f.proname IN ('start', 'heartbeat', 'complete', 'complete_many', 'fail') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO queue_worker', f.sig);
        ELSIF f.proname IN ('health', 'metrics', 'prometheus') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO pg_monitor', f.sig);
        END IF;
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA queue TO queue_producer, queue_worker, queue_admin, pg_monitor;
GRANT ALL ON ALL TABLES IN SCHEMA queue TO queue_admin;
GRANT ALL ON ALL SEQUENCES IN SCHEMA queue TO queue_admin;
