-- queue.enqueue_row(): a row-level AFTER trigger that enqueues one job per changed row, in the
-- application's own transaction (the job commits or rolls back with the change):
--
--   CREATE TRIGGER users_welcome AFTER INSERT ON users
--       FOR EACH ROW EXECUTE FUNCTION queue.enqueue_row('emails');          -- or ('emails', 'high')
--
-- Payload: {"table": "<schema>.<table>", "op": "INSERT" | "UPDATE" | "DELETE",
--           "new": <the new row as JSON, null for DELETE>, "old": <the old row, null for INSERT>}.
-- The queue name and priority follow queue.enqueue()'s rules; they are checked when a row fires
-- the trigger (CREATE TRIGGER does not look at trigger arguments).
CREATE FUNCTION queue.enqueue_row() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_WHEN <> 'AFTER' THEN
        RAISE EXCEPTION 'queue_pg: queue.enqueue_row() must run as a row-level AFTER trigger; trigger "%" on %.% fires % % FOR EACH %',
                TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_WHEN, TG_OP, TG_LEVEL
            USING ERRCODE = 'triggered_action_exception',
                  HINT = 'CREATE TRIGGER ... AFTER INSERT OR UPDATE OR DELETE ON ... FOR EACH ROW EXECUTE FUNCTION queue.enqueue_row(''queue_name'' [, ''priority'']);';
    END IF;
    IF TG_NARGS NOT IN (1, 2) THEN
        RAISE EXCEPTION 'queue_pg: queue.enqueue_row() takes a queue name and an optional priority; trigger "%" on %.% gives % arguments',
                TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_NARGS
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM queue.enqueue(
        TG_ARGV[0],
        jsonb_build_object(
            'table', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
            'op', TG_OP,
            'new', CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
            'old', CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END),
        CASE WHEN TG_NARGS = 2 THEN TG_ARGV[1] ELSE 'normal' END);
    RETURN NULL;
END
$$;
