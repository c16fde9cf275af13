//! Ending an attempt: `queue.complete`, `queue.complete_many` and `queue.fail` (whose backoff and
//! dead-letter rule lives in `lifecycle::failure`). Each changes the job in the caller's
//! transaction and notes the change for Redis, which the bridge applies after commit.

use super::errors::{null_argument, spi_failed};
use super::jobs::explain_not_running;
use crate::bridge::wake::wake_on_commit;
use crate::lifecycle::failure::fail_attempt;
use crate::lifecycle::Sql;
use crate::spi_plans::{self, types::*};
use pgrx::datum::JsonB;
use pgrx::prelude::*;

static COMPLETE: Sql = Sql::new(
    "
    WITH done AS (
        UPDATE queue.jobs
        SET status = {completed}, completed_at = now(), updated_at = now(), result = $2,
            lease_expires_at = NULL
        WHERE id = $1 AND status = {running} AND ($3::int IS NULL OR attempt_count + 1 = $3)
        RETURNING id, queue_name)
    INSERT INTO queue.redis_outbox (job_id, event, status, queue_name)
    SELECT id, 'state', {completed}, queue_name FROM done
    RETURNING job_id",
);

static COMPLETE_MANY: Sql = Sql::new(
    "
    WITH done AS (
        UPDATE queue.jobs
        SET status = {completed}, completed_at = now(), updated_at = now(), lease_expires_at = NULL
        WHERE id = ANY($1) AND status = {running}
        RETURNING id, queue_name)
    INSERT INTO queue.redis_outbox (job_id, event, status, queue_name)
    SELECT id, 'state', {completed}, queue_name FROM done
    RETURNING job_id",
);

/// running → completed.
#[pg_extern(volatile, parallel_unsafe)]
fn complete(
    job_id: Option<i64>,
    result: default!(Option<JsonB>, "NULL"),
    attempt: default!(Option<i32>, "NULL"),
) {
    let id = job_id.unwrap_or_else(|| null_argument("job_id"));
    let args = [id.into(), result.into(), attempt.into()];
    Spi::connect_mut(|client| {
        let done = spi_plans::update(client, &COMPLETE, &[INT8, JSONB, INT4], Some(1), &args)
            .map(|t| t.len())
            .unwrap_or_else(|e| spi_failed("complete", e));
        if done == 0 {
            explain_not_running(client, id, attempt, "complete");
        }
    });
    wake_on_commit();
}

/// Completes the running jobs among `job_ids`; returns how many. Ids that are not running (a
/// cancelled job, a duplicate) are skipped, so a fast worker can acknowledge in bulk.
#[pg_extern(volatile, parallel_unsafe)]
fn complete_many(job_ids: Option<Vec<Option<i64>>>) -> i32 {
    let ids: Vec<i64> = job_ids
        .unwrap_or_else(|| null_argument("job_ids"))
        .into_iter()
        .flatten()
        .collect();
    let done = Spi::connect_mut(|client| {
        spi_plans::update(client, &COMPLETE_MANY, &[INT8_ARRAY], None, &[ids.into()])
            .map(|t| t.len())
    })
    .unwrap_or_else(|e| spi_failed("complete_many", e));
    if done > 0 {
        wake_on_commit();
    }
    done as i32
}

/// Records a failed attempt of a running job: a retry after the backoff, or the dead-letter queue.
#[pg_extern(volatile, parallel_unsafe)]
fn fail(job_id: Option<i64>, error: Option<&str>, attempt: default!(Option<i32>, "NULL")) -> JsonB {
    let id = job_id.unwrap_or_else(|| null_argument("job_id"));
    let error = error.unwrap_or_else(|| null_argument("error"));
    let result = Spi::connect_mut(|client| match fail_attempt(client, id, error, attempt) {
        Ok(Some(outcome)) => outcome,
        Ok(None) => explain_not_running(client, id, attempt, "fail"),
        Err(e) => spi_failed("queue.fail", e),
    });
    wake_on_commit();
    result
}
