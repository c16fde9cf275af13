//! A failed attempt, in the caller's transaction: another attempt after the backoff or, with the
//! attempts used up, the dead-letter queue; the error joins the job's history and the change is
//! noted for Redis. `queue.fail` and the bridge's lease expiry both come here.

use super::backoff::{self, Outcome};
use super::{JobState, Sql};
use crate::settings;
use crate::spi_plans::{self, optional, required, types::*};
use pgrx::datum::JsonB;
use pgrx::spi::SpiClient;

// The job's attempt and its queue's backoff settings, with the job locked for the update.
static LOCK_FOR_FAIL: Sql = Sql::new(
    "
    SELECT j.status, j.attempt_count, j.max_attempts,
           (EXTRACT(EPOCH FROM q.backoff_base) * 1000)::bigint,
           (EXTRACT(EPOCH FROM q.backoff_max) * 1000)::bigint
    FROM queue.jobs j LEFT JOIN queue.queues q ON q.queue_name = j.queue_name
    WHERE j.id = $1
    FOR UPDATE OF j",
);

// $3: the retry delay in ms, NULL when the job is dead.
static RECORD_FAILURE: Sql = Sql::new(
    "
    WITH f AS (
        UPDATE queue.jobs
        SET status = CASE WHEN $3::bigint IS NULL THEN {failed} ELSE {retry_scheduled} END,
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
        'run_at', CASE WHEN status = {retry_scheduled} THEN run_at END)
    FROM f",
);

/// Fails the current attempt of running job `id` (of attempt `attempt`, if given). Returns the
/// outcome as `queue.fail` reports it, `Ok(None)` if the job is not running at that attempt
/// (the caller says why), or the error of a statement that failed.
pub fn fail_attempt(
    client: &mut SpiClient<'_>,
    id: i64,
    error: &str,
    attempt: Option<i32>,
) -> Result<Option<JsonB>, String> {
    let row = spi_plans::update(client, &LOCK_FOR_FAIL, &[INT8], Some(1), &[id.into()])
        .map_err(|e| e.to_string())
        .and_then(|t| {
            let Some(row) = t.first().get_heap_tuple().map_err(|e| e.to_string())? else {
                return Ok(None);
            };
            Ok(Some((
                JobState::parse(&required::<String>(row.get(1), "status")?)?,
                required::<i32>(row.get(2), "attempt_count")?,
                required::<i32>(row.get(3), "max_attempts")?,
                optional::<i64>(row.get(4), "backoff_base")?,
                optional::<i64>(row.get(5), "backoff_max")?,
            )))
        })
        .map_err(|e| format!("locking job {id} failed: {e}"))?;
    let Some((status, attempt_count, max_attempts, base_ms, max_ms)) = row else {
        return Ok(None);
    };
    if status != JobState::Running || attempt.is_some_and(|a| a != attempt_count + 1) {
        return Ok(None);
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
        &RECORD_FAILURE,
        &[INT8, INT4, INT8, TEXT],
        Some(1),
        &[id.into(), attempts.into(), delay_ms.into(), error.into()],
    )
    .map_err(|e| e.to_string())
    .and_then(|t| required(t.first().get_one::<JsonB>(), "the failure's outcome"))
    .map(Some)
    .map_err(|e| format!("recording the failure of job {id} failed: {e}"))
}
