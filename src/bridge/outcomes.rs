//! Outcome counts in `queue.stats`, per queue and minute, counted from the outbox rows that
//! the lifecycle functions write, without waiting for Redis: once per poll interval
//! ([`count_waiting`], by the maintenance duty) the rows not counted yet are counted and marked;
//! when state sync deletes applied rows ([`delete_applied`]) it counts those still unmarked.
//! Either way a row is counted once, and no counter row is written by workers.

use crate::lifecycle::Sql;
use crate::spi_plans::{self, types::INT8_ARRAY};
use pgrx::spi::SpiClient;

/// Adds counts to `queue.stats` rows that may exist already: `INSERT INTO queue.stats AS s …`
/// followed by this.
macro_rules! add_to_stats {
    () => {
        "
    ON CONFLICT (queue_name, minute) DO UPDATE
    SET completed = s.completed + EXCLUDED.completed, retried = s.retried + EXCLUDED.retried,
        failed = s.failed + EXCLUDED.failed, cancelled = s.cancelled + EXCLUDED.cancelled"
    };
}

/// Counts outcome rows per queue and minute, from a CTE `rows (queue_name, status, at)`.
macro_rules! count_rows {
    () => {
        "
    INSERT INTO queue.stats AS s (queue_name, minute, completed, retried, failed, cancelled)
    SELECT queue_name, date_trunc('minute', at),
           count(*) FILTER (WHERE status = {completed}),
           count(*) FILTER (WHERE status = {retry_scheduled}),
           count(*) FILTER (WHERE status = {failed}),
           count(*) FILTER (WHERE status = {cancelled})
    FROM rows
    WHERE status IN {outcomes}
    GROUP BY 1, 2"
    };
}

// Deletes the applied rows and counts the outcomes among them not counted yet.
static DELETE_APPLIED: Sql = Sql::new(concat!(
    "
    WITH deleted AS (
        DELETE FROM queue.redis_outbox WHERE id = ANY($1::bigint[])
        RETURNING queue_name, status, at, counted),
    rows AS (SELECT * FROM deleted WHERE NOT counted)",
    count_rows!(),
    add_to_stats!()
));

// Counts the outcomes among the rows still waiting for Redis, once: monitoring does not wait for
// Redis to come back.
static COUNT_WAITING: Sql = Sql::new(concat!(
    "
    WITH rows AS (
        UPDATE queue.redis_outbox SET counted = true
        WHERE NOT counted AND status IN {outcomes}
        RETURNING queue_name, status, at)",
    count_rows!(),
    add_to_stats!()
));

// Minutes that left the last hour (what monitoring shows, with a little margin) fold into the
// queue's totals row at '-infinity'.
const FOLD_STATS: &str = concat!(
    "
    WITH old AS (
        DELETE FROM queue.stats
        WHERE minute < now() - interval '62 minutes' AND minute <> '-infinity'
        RETURNING *)
    INSERT INTO queue.stats AS s (queue_name, minute, completed, retried, failed, cancelled)
    SELECT queue_name, '-infinity', sum(completed), sum(retried), sum(failed), sum(cancelled)
    FROM old GROUP BY queue_name",
    add_to_stats!()
);

/// Deletes outbox rows applied to Redis and counts their outcomes not counted yet. Runs inside
/// the caller's transaction.
pub fn delete_applied(client: &mut SpiClient<'_>, ids: Vec<i64>) {
    if ids.is_empty() {
        return;
    }
    spi_plans::update(client, &DELETE_APPLIED, &[INT8_ARRAY], None, &[ids.into()])
        .map(|_| ())
        .unwrap_or_else(|e| {
            pgrx::error!("queue_pg bridge: deleting applied outbox rows failed: {e}")
        });
}

/// Counts the outcomes of changes still waiting for Redis. Runs inside the caller's transaction.
pub fn count_waiting(client: &mut SpiClient<'_>) {
    spi_plans::update(client, &COUNT_WAITING, &[], None, &[])
        .map(|_| ())
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: counting outcomes failed: {e}"));
}

/// Folds minutes older than an hour (and a little) into each queue's totals. Runs inside the
/// caller's transaction.
pub fn fold(client: &mut SpiClient<'_>) {
    spi_plans::update(client, FOLD_STATS, &[], None, &[])
        .map(|_| ())
        .unwrap_or_else(|e| {
            pgrx::error!("queue_pg bridge: folding old queue.stats minutes failed: {e}")
        });
}
