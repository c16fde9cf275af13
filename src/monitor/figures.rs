//! The figures every monitoring function shows, read once: per queue, the jobs in each state,
//! the oldest waiting job, dead letters, and outcomes (last hour and all time); plus the bridge's
//! lag. Cheap on big tables: each state is counted through its own partial index (live jobs
//! only, never the finished ones), and outcomes come from `queue.stats`, which the bridge keeps.

use crate::lifecycle::Sql;
use crate::spi_plans::{first_value, optional, required, with_plan};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

/// How many jobs entered each outcome state.
#[derive(Default, Clone, Copy, PartialEq, Debug)]
pub struct Outcomes {
    pub completed: i64,
    pub retried: i64,
    pub failed: i64,
    pub cancelled: i64,
}

#[derive(Default, Clone, Debug)]
pub struct QueueFigures {
    pub queue: String,
    pub paused: bool,
    pub queued: i64,
    pub scheduled: i64,
    pub migrated: i64,
    pub running: i64,
    pub retry_scheduled: i64,
    /// Dead jobs (`failed`): the dead-letter queue's depth for this queue.
    pub dead: i64,
    /// Age of the oldest job waiting for a worker (`queued` or `migrated`), 0 when none waits.
    pub oldest_age_s: f64,
    /// When the oldest dead job died (Postgres microseconds), if any.
    pub oldest_failed_at: Option<i64>,
    pub last_hour: Outcomes,
    pub total: Outcomes,
}

// One aggregate per partial index, each reading only the live jobs that index holds. (Run
// without parallel workers: for these small scans, starting workers costs more than it saves.)
static PER_QUEUE: Sql = Sql::new(
    "
    WITH live AS (
        SELECT queue_name, {queued} AS state, count(*) AS n,
               min(GREATEST(created_at, run_at)) AS oldest
        FROM queue.jobs WHERE status = {queued} GROUP BY queue_name
        UNION ALL
        SELECT queue_name, {migrated}, count(*), min(GREATEST(created_at, run_at))
        FROM queue.jobs WHERE status = {migrated} GROUP BY queue_name
        UNION ALL
        SELECT queue_name, status, count(*), NULL
        FROM queue.jobs WHERE status IN {waiting} GROUP BY queue_name, status
        UNION ALL
        SELECT queue_name, {running}, count(*), NULL
        FROM queue.jobs WHERE status = {running} GROUP BY queue_name
        UNION ALL
        SELECT queue_name, {failed}, count(*), min(failed_at)
        FROM queue.jobs WHERE status = {failed} GROUP BY queue_name),
    states AS (
        SELECT queue_name,
               sum(n) FILTER (WHERE state = {queued}) AS queued,
               sum(n) FILTER (WHERE state = {scheduled}) AS scheduled,
               sum(n) FILTER (WHERE state = {migrated}) AS migrated,
               sum(n) FILTER (WHERE state = {running}) AS running,
               sum(n) FILTER (WHERE state = {retry_scheduled}) AS retry_scheduled,
               sum(n) FILTER (WHERE state = {failed}) AS dead,
               min(oldest) FILTER (WHERE state IN ({queued}, {migrated})) AS oldest_waiting,
               min(oldest) FILTER (WHERE state = {failed}) AS oldest_failed
        FROM live GROUP BY queue_name),
    outcomes AS (
        SELECT queue_name,
               sum(completed) FILTER (WHERE minute > now() - interval '1 hour') AS completed_1h,
               sum(retried) FILTER (WHERE minute > now() - interval '1 hour') AS retried_1h,
               sum(failed) FILTER (WHERE minute > now() - interval '1 hour') AS failed_1h,
               sum(cancelled) FILTER (WHERE minute > now() - interval '1 hour') AS cancelled_1h,
               sum(completed) AS completed, sum(retried) AS retried,
               sum(failed) AS failed, sum(cancelled) AS cancelled
        FROM queue.stats GROUP BY queue_name),
    names AS (
        SELECT queue_name FROM queue.queues
        UNION SELECT queue_name FROM states
        UNION SELECT queue_name FROM outcomes)
    SELECT n.queue_name, COALESCE(q.paused, false),
           COALESCE(s.queued, 0)::int8, COALESCE(s.scheduled, 0)::int8,
           COALESCE(s.migrated, 0)::int8, COALESCE(s.running, 0)::int8,
           COALESCE(s.retry_scheduled, 0)::int8, COALESCE(s.dead, 0)::int8,
           COALESCE(EXTRACT(EPOCH FROM now() - s.oldest_waiting), 0)::float8,
           s.oldest_failed,
           COALESCE(o.completed_1h, 0)::int8, COALESCE(o.retried_1h, 0)::int8,
           COALESCE(o.failed_1h, 0)::int8, COALESCE(o.cancelled_1h, 0)::int8,
           COALESCE(o.completed, 0)::int8, COALESCE(o.retried, 0)::int8,
           COALESCE(o.failed, 0)::int8, COALESCE(o.cancelled, 0)::int8
    FROM names n
    LEFT JOIN queue.queues q ON q.queue_name = n.queue_name
    LEFT JOIN states s ON s.queue_name = n.queue_name
    LEFT JOIN outcomes o ON o.queue_name = n.queue_name
    ORDER BY n.queue_name",
);

// How long the oldest job the bridge should have dispatched by now has been waiting (paused
// queues' jobs are not late).
static BRIDGE_LAG_MS: Sql = Sql::new(
    "
    SELECT COALESCE(EXTRACT(EPOCH FROM now() - GREATEST(j.created_at, j.run_at)) * 1000, 0)::int8
    FROM queue.jobs j
    WHERE j.status = {queued}
      AND NOT EXISTS (SELECT 1 FROM queue.queues q WHERE q.queue_name = j.queue_name AND q.paused)
    ORDER BY j.id LIMIT 1",
);

/// Every queue that has settings, jobs not yet pruned in a counted state, or outcomes.
pub fn per_queue(client: &mut SpiClient<'_>) -> Vec<QueueFigures> {
    with_plan(client, &PER_QUEUE, &[], |client, plan| {
        let rows = client
            .select(plan, None, &[])
            .unwrap_or_else(|e| error!("queue_pg: reading queue figures failed: {e}"));
        // Every count is COALESCEd in the query: a NULL or a decoding failure is an error.
        let decode = |r: pgrx::spi::SpiHeapTupleData<'_>| -> Result<QueueFigures, String> {
            let n = |i: usize| required(r.get::<i64>(i), "a count");
            let outcomes = |first: usize| -> Result<Outcomes, String> {
                Ok(Outcomes {
                    completed: n(first)?,
                    retried: n(first + 1)?,
                    failed: n(first + 2)?,
                    cancelled: n(first + 3)?,
                })
            };
            Ok(QueueFigures {
                queue: required(r.get::<String>(1), "queue_name")?,
                paused: required(r.get::<bool>(2), "paused")?,
                queued: n(3)?,
                scheduled: n(4)?,
                migrated: n(5)?,
                running: n(6)?,
                retry_scheduled: n(7)?,
                dead: n(8)?,
                oldest_age_s: required(r.get::<f64>(9), "oldest_age_s")?,
                oldest_failed_at: optional(r.get::<TimestampWithTimeZone>(10), "oldest_failed")?
                    .map(|t| t.into_inner()),
                last_hour: outcomes(11)?,
                total: outcomes(15)?,
            })
        };
        rows.map(decode)
            .collect::<Result<Vec<_>, String>>()
            .unwrap_or_else(|e| error!("queue_pg: reading queue figures failed: {e}"))
    })
}

/// The bridge's lag in milliseconds: 0 when nothing waits for it. A failed query is an ERROR.
pub fn bridge_lag_ms(client: &mut SpiClient<'_>) -> i64 {
    with_plan(client, &BRIDGE_LAG_MS, &[], |client, plan| {
        client
            .select(plan, Some(1), &[])
            .and_then(|t| first_value::<i64>(t, 1))
    })
    .unwrap_or_else(|e| error!("queue_pg: reading the bridge's lag failed: {e}"))
    .unwrap_or(0) // no row: nothing waits
}

/// Reports the applier dropped: (queue, reason, count), by queue and reason.
pub fn rejected_reports(client: &mut SpiClient<'_>) -> Vec<(String, String, i64)> {
    const REJECTED: &str =
        "SELECT queue_name, reason, count FROM queue.rejected_reports ORDER BY queue_name, reason";
    with_plan(client, REJECTED, &[], |client, plan| {
        let rows = client.select(plan, None, &[]).map_err(|e| e.to_string())?;
        rows.map(|r| {
            Ok((
                required(r.get::<String>(1), "queue_name")?,
                required(r.get::<String>(2), "reason")?,
                required(r.get::<i64>(3), "count")?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()
    })
    .unwrap_or_else(|e| error!("queue_pg: reading the rejected reports failed: {e}"))
}
