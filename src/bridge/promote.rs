//! Scheduled jobs (a future `run_at`) and retrying jobs (waiting out their backoff) become
//! `queued` once due; dispatch then pushes them like any other queued job.

use crate::lifecycle::Sql;
use crate::spi_plans::types::INT8;
use crate::spi_plans::{self, with_plan};
use pgrx::spi::SpiClient;
use std::time::Duration;

/// At most this many jobs per promotion statement, so one statement stays short.
const PROMOTE_LIMIT: i64 = 10_000;

static PROMOTE_DUE: Sql = Sql::new(
    "
    WITH due AS (
        SELECT id FROM queue.jobs
        WHERE status IN {waiting} AND run_at <= now()
        ORDER BY run_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED),
    promoted AS (
        UPDATE queue.jobs j SET status = {queued}, updated_at = now()
        FROM due WHERE j.id = due.id
        RETURNING j.id)
    SELECT min(id) FROM promoted",
);

static NEXT_DUE: Sql = Sql::new(
    "
    SELECT (EXTRACT(EPOCH FROM (min(run_at) - clock_timestamp())) * 1000)::bigint
    FROM queue.jobs WHERE status IN {waiting}",
);

/// Promotes due jobs; returns the lowest id promoted, if any. Runs inside the caller's
/// transaction.
pub fn promote_due(client: &mut SpiClient<'_>) -> Option<i64> {
    spi_plans::update(client, &PROMOTE_DUE, &[INT8], None, &[PROMOTE_LIMIT.into()])
        .and_then(|t| t.first().get_one::<i64>())
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: promoting due jobs failed: {e}"))
}

/// How long until the next scheduled or retrying job falls due (None if there is none;
/// zero if one is due already).
pub fn next_due_in(client: &mut SpiClient<'_>) -> Option<Duration> {
    with_plan(client, &NEXT_DUE, &[], |client, plan| {
        client.select(plan, Some(1), &[])?.first().get_one::<i64>()
    })
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: reading the next due time failed: {e}"))
    .map(|ms| Duration::from_millis(ms.max(0) as u64))
}
