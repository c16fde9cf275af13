//! Bringing dead jobs back: `queue.replay_dead` and `queue.replay_dead_all`. The job goes back
//! to `queued` with its attempts reset and its error history kept; after commit the bridge removes
//! its Redis dead-letter entry and marker.

use super::errors::{invalid_argument, null_argument, spi_failed, wrong_state};
use super::jobs::status_of;
use super::validate;
use crate::bridge::wake::wake_on_commit_queued;
use crate::lifecycle::Sql;
use crate::spi_plans::types::{INT8, TEXT};
use crate::spi_plans::{self, required};
use pgrx::datum::JsonB;
use pgrx::prelude::*;

static REPLAY: Sql = Sql::new(
    "
    WITH picked AS (
        SELECT id FROM queue.jobs
        WHERE status = {failed} AND ($1::bigint IS NULL OR id = $1)
          AND ($2::text IS NULL OR queue_name = $2)
        ORDER BY failed_at, id
        LIMIT $3
        FOR UPDATE SKIP LOCKED),
    replayed AS (
        UPDATE queue.jobs j
        SET status = {queued}, attempt_count = 0, last_error_message = NULL, failed_at = NULL,
            run_at = now(), started_at = NULL, lease_expires_at = NULL, dispatch_seq = NULL,
            updated_at = now()
        FROM picked WHERE j.id = picked.id
        RETURNING j.id, j.queue_name)
    INSERT INTO queue.redis_outbox (job_id, event, status, queue_name)
    SELECT id, 'replayed', {queued}, queue_name FROM replayed
    RETURNING job_id",
);

fn replay(id: Option<i64>, queue_name: Option<&str>, max_jobs: i64) -> usize {
    let ids: Vec<i64> = Spi::connect_mut(|client| {
        let args = [id.into(), queue_name.into(), max_jobs.into()];
        spi_plans::update(client, &REPLAY, &[INT8, TEXT, INT8], None, &args)
            .map_err(|e| e.to_string())
            .and_then(|rows| rows.map(|r| required(r.get::<i64>(1), "id")).collect())
    })
    .unwrap_or_else(|e| spi_failed("replay", e));
    if let Some(&first) = ids.iter().min() {
        wake_on_commit_queued(first);
    }
    ids.len()
}

/// That dead job, and only that one, goes back to `queued`.
#[pg_extern(volatile, parallel_unsafe)]
fn replay_dead(job_id: Option<i64>) -> JsonB {
    let id = job_id.unwrap_or_else(|| null_argument("job_id"));
    if replay(Some(id), None, 1) == 0 {
        let status = Spi::connect(|client| status_of(client, id));
        wrong_state(format!(
            "queue_pg: cannot replay job {id}: it is {status}, not failed (dead)"
        ));
    }
    JsonB(serde_json::json!({"success": true, "job_id": id}))
}

/// Replays up to `max_jobs` dead jobs, oldest death first, of one queue or all; returns how many.
#[pg_extern(volatile, parallel_unsafe)]
fn replay_dead_all(
    queue_name: default!(Option<&str>, "NULL"),
    max_jobs: default!(Option<i32>, "1000"),
) -> i32 {
    let queue_name = queue_name.map(|q| validate::queue_name(Some(q)));
    let max_jobs = max_jobs.unwrap_or_else(|| null_argument("max_jobs"));
    if max_jobs < 1 {
        invalid_argument(format!(
            "queue_pg: max_jobs must be at least 1, not {max_jobs}"
        ));
    }
    replay(None, queue_name, i64::from(max_jobs)) as i32
}
