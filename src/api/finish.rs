//! Ending an attempt: `queue.complete`, `queue.complete_many` and `queue.fail` (the backoff and
//! dead-letter rule). Each changes the job in the caller's transaction and notes the change for
//! Redis, which the bridge applies after commit.

use super::backoff::{self, Outcome};
use super::errors::{null_argument, spi_failed};
use super::jobs::explain_not_running;
use crate::bridge::wake::wake_on_commit;
use crate::settings;
use crate::spi_plans::{self, optional, required, types::*};
use pgrx::datum::JsonB;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

const COMPLETE: &str = "
    WITH done AS (
        UPDATE queue.jobs
        SET status = 'completed', completed_at = now(), updated_at = now(), result = $2,
            lease_expires_at = NULL
        WHERE id = $1 AND status = 'running' AND ($3::int IS NULL OR attempt_count + 1 = $3)
        RETURNING id, queue_name)
    INSERT INTO queue.redis_outbox (job_id, event, status, queue_name)
    SELECT id, 'state', 'completed', queue_name FROM done
    RETURNING job_id";

const COMPLETE_MANY: &str = "
    WITH done AS (
        UPDATE queue.jobs
        SET status = 'completed', completed_at = now(), updated_at = now(), lease_expires_at = NULL
        WHERE id = ANY($1) AND status = 'running'
        RETURNING id, queue_name)
    INSERT INTO queue.redis_outbox (job_id, event, status, queue_name)
    SELECT id, 'state', 'completed', queue_name FROM done
    RETURNING job_id";

// The job's attempt and its queue's backoff settings, with the job locked for the update.
const LOCK_FOR_FAIL: &str = "
    SELECT j.status, j.attempt_count, j.max_attempts,
           (EXTRACT(EPOCH FROM q.backoff_base) * 1000)::bigint,
           (EXTRACT(EPOCH FROM q.backoff_max) * 1000)::bigint
    FROM queue.jobs j LEFT JOIN queue.queues q ON q.queue_name = j.queue_name
    WHERE j.id = $1
    FOR UPDATE OF j";

// $3: the retry delay in ms, NULL when the job is dead.
const RECORD_FAILURE: &str = "
    WITH f AS (
        UPDATE queue.jobs
        SET status = CASE WHEN $3::bigint IS NULL THEN 'failed' ELSE 'retry_scheduled' END,
            attempt_count = $2,
            run_at = CASE WHEN $3 IS NULL THEN run_at ELSE now() + $3 * interval '1 millisecond' END,
            failed_at = CASE WHEN $3 IS NULL THEN now() END,
            last_error_message = $4,
            errors = errors || jsonb_build_array(jsonb_build_object('attempt', $2, 'error', $4, 'at', now())),
            lease_expires_at = NULL,
            updated_at = now()
        WHERE id = $1
        RETURNING id, status, run_at, queue_name),
    noted AS (INSERT INTO queue.redis_outbox (job_id, event, status, queue_name)
              SELECT id, 'state', status, queue_name FROM f)
    SELECT jsonb_build_object(
        'status', status,
        'attempt_count', $2,
        'retry_delay_ms', $3,
        'run_at', CASE WHEN status = 'retry_scheduled' THEN run_at END)
    FROM f";

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
        let done = spi_plans::update(client, COMPLETE, &[INT8, JSONB, INT4], Some(1), &args)
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
        spi_plans::update(client, COMPLETE_MANY, &[INT8_ARRAY], None, &[ids.into()])
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
    let result = Spi::connect_mut(|client| fail_running_job(client, id, error, attempt));
    wake_on_commit();
    result
}

/// The backoff and dead-letter rule for one running job, in the caller's transaction. Used by
/// `queue.fail` and by the bridge for expired leases.
pub fn fail_running_job(
    client: &mut SpiClient<'_>,
    id: i64,
    error: &str,
    attempt: Option<i32>,
) -> JsonB {
    let row = spi_plans::update(client, LOCK_FOR_FAIL, &[INT8], Some(1), &[id.into()])
        .map_err(|e| e.to_string())
        .and_then(|t| {
            let Some(row) = t.first().get_heap_tuple().map_err(|e| e.to_string())? else {
                return Ok(None);
            };
            Ok(Some((
                required(row.get::<String>(1), "status")?,
                required(row.get::<i32>(2), "attempt_count")?,
                required(row.get::<i32>(3), "max_attempts")?,
                optional(row.get::<i64>(4), "backoff_base")?,
                optional(row.get::<i64>(5), "backoff_max")?,
            )))
        })
        .unwrap_or_else(|e| spi_failed("locking the job", e));
    let Some((status, attempt_count, max_attempts, base_ms, max_ms)) = row else {
        explain_not_running(client, id, attempt, "fail")
    };
    if status != "running" || attempt.is_some_and(|a| a != attempt_count + 1) {
        explain_not_running(client, id, attempt, "fail");
    }
    let outcome = backoff::outcome(
        attempt_count,
        max_attempts,
        base_ms.unwrap_or_else(settings::backoff_base_ms),
        max_ms.unwrap_or_else(settings::backoff_max_ms),
        settings::backoff_jitter(),
        backoff::unit_random(),
    );
    let (attempts, delay_ms) = match outcome {
        Outcome::Retry { attempts, delay_ms } => (attempts, Some(delay_ms)),
        Outcome::Dead { attempts } => (attempts, None),
    };
    spi_plans::update(
        client,
        RECORD_FAILURE,
        &[INT8, INT4, INT8, TEXT],
        Some(1),
        &[id.into(), attempts.into(), delay_ms.into(), error.into()],
    )
    .map_err(|e| e.to_string())
    .and_then(|t| required(t.first().get_one::<JsonB>(), "the failure's outcome"))
    .unwrap_or_else(|e| spi_failed(&format!("recording the failure of job {id}"), e))
}
