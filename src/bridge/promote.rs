//! Scheduled jobs (a future `run_at`) and retrying jobs (waiting out their backoff) become
//! `queued` once due; dispatch then pushes them like any other queued job.

use std::time::Duration;

/// At most this many jobs per promotion statement, so one statement stays short.
const PROMOTE_LIMIT: i64 = 10_000;

const PROMOTE_DUE: &str = "
    WITH due AS (
        SELECT id FROM queue.jobs
        WHERE status IN ('scheduled', 'retry_scheduled') AND run_at <= now()
        ORDER BY run_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED)
    UPDATE queue.jobs j SET status = 'queued', updated_at = now()
    FROM due WHERE j.id = due.id";

const NEXT_DUE: &str = "
    SELECT GREATEST(0, EXTRACT(EPOCH FROM (min(run_at) - clock_timestamp())) * 1000)::bigint
    FROM queue.jobs WHERE status IN ('scheduled', 'retry_scheduled')";

/// Promotes due jobs; returns how many. Runs inside the caller's transaction.
pub fn promote_due(client: &mut pgrx::spi::SpiClient<'_>) -> usize {
    client
        .update(PROMOTE_DUE, None, &[PROMOTE_LIMIT.into()])
        .map(|t| t.len())
        .unwrap_or_else(|e| panic!("queue_pg bridge: promoting due jobs failed: {e}"))
}

/// How long until the next scheduled or retrying job falls due (None if there is none).
pub fn next_due_in(client: &pgrx::spi::SpiClient<'_>) -> Option<Duration> {
    client
        .select(NEXT_DUE, Some(1), &[])
        .ok()?
        .first()
        .get_one::<i64>()
        .ok()
        .flatten()
        .map(|ms| Duration::from_millis(ms.max(0) as u64))
}
