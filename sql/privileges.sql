-- Roles and privileges, applied last (after every function exists).
--
--   queue_producer  enqueue, enqueue_many, and the enqueue_row trigger on its own tables
--   queue_worker    start, heartbeat, complete, complete_many, fail
--   queue_admin     every function, and the tables themselves
--   pg_monitor      health, metrics, prometheus
--
-- No one else may call anything: EXECUTE is revoked from PUBLIC on every function. The
-- functions act on the tables for their callers (who have no rights on them), so they run with
-- the owner's rights (SECURITY DEFINER), on a search_path fixed to pg_catalog and pg_temp (last),
-- and name everything of their own schema-qualified: no caller's function, operator or table can
-- stand in for one they use. queue.enqueue_row() runs with the rights of the one who fires the
-- trigger (it only calls queue.enqueue), on the same fixed search_path.

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
