//! The lifecycle's transitions as set-based statements, each in the caller's transaction: start,
//! heartbeat, complete and fail take a batch of jobs (the SQL functions pass one, the report
//! applier a whole batch, lease expiry every expired lease), change them, and note each change
//! for Redis (`queue.redis_outbox`, applied by the bridge after commit). Which state a report may
//! move a job from is `report_rule`; the statements check the same states again.
//!
//! Each statement finds its jobs by `id = ANY(ids)` (the primary key) before joining them to the
//! per-job values, so a plan cached while `queue.jobs` was small costs at most one scan of the
//! table, never one per job; and the one-job forms tell the planner that it is one job.

use super::backoff::{self, Outcome};
use super::report_rule::Locked;
use super::{JobState, Sql};
use crate::settings;
use crate::spi_plans::{self, optional, required, types::*};
use pgrx::datum::{Interval, JsonB};
use pgrx::spi::{SpiClient, SpiTupleTable};

static LOCK: Sql = Sql::new(
    "
    SELECT j.id, j.queue_name, j.status, j.attempt_count, j.max_attempts,
           (EXTRACT(EPOCH FROM q.backoff_base) * 1000)::bigint,
           (EXTRACT(EPOCH FROM q.backoff_max) * 1000)::bigint
    FROM queue.jobs j LEFT JOIN queue.queues q ON q.queue_name = j.queue_name
    WHERE j.id = ANY($1)
    ORDER BY j.id
    FOR UPDATE OF j",
);

/// Locks the jobs among `ids` that exist (in id order, so that two batches never deadlock) and
/// returns them.
pub fn lock(client: &mut SpiClient<'_>, ids: &[i64]) -> Result<Vec<Locked>, String> {
    let rows = spi_plans::update(client, &LOCK, &[INT8_ARRAY], None, &[ids.to_vec().into()])
        .map_err(|e| format!("locking jobs failed: {e}"))?;
    rows.map(|row| {
        Ok(Locked {
            id: required(row.get(1), "id")?,
            queue: required(row.get(2), "queue_name")?,
            status: JobState::parse(&required::<String>(row.get(3), "status")?)?,
            attempt_count: required(row.get(4), "attempt_count")?,
            max_attempts: required(row.get(5), "max_attempts")?,
            backoff_base_ms: optional(row.get(6), "backoff_base")?,
            backoff_max_ms: optional(row.get(7), "backoff_max")?,
        })
    })
    .collect()
}

// Each transition's statement comes in two forms from one text: for one job, scalar arguments
// (`j.id = $1`: a primary-key probe, whatever the plan cache holds, and the cost of the old
// one-row statements); for a batch, arrays, the jobs found by `id = ANY($1)` before they are
// joined to their values.
macro_rules! start_sql {
    ($input:literal, $match:literal) => {
        concat!(
            "WITH input AS (",
            $input,
            "),
            claimed AS (
                UPDATE queue.jobs j
                SET status = {running}, started_at = now(), updated_at = now(),
                    lease_expires_at = now() + COALESCE(i.lease,
                        (SELECT q.lease FROM queue.queues q WHERE q.queue_name = j.queue_name),
                        $3 * interval '1 millisecond')
                FROM input i
                WHERE ",
            $match,
            " AND j.id = i.id AND j.status IN ({queued}, {migrated})
                RETURNING j.id, j.queue_name, j.payload, j.attempt_count + 1 AS attempt,
                          j.max_attempts, j.lease_expires_at),
            noted AS (INSERT INTO queue.redis_outbox (job_id, event, status, queue_name)
                      SELECT id, 'state', {running}, queue_name FROM claimed)
            SELECT * FROM claimed"
        )
    };
}
// The lease: the call's, else the queue's, else queue.lease ($3 ms).
static START_ONE: Sql = Sql::new(start_sql!(
    "SELECT $1::bigint AS id, $2::interval AS lease",
    "j.id = $1"
));
static START_MANY: Sql = Sql::new(start_sql!(
    "SELECT * FROM unnest($1::bigint[], $2::interval[]) AS t(id, lease)",
    "j.id = ANY($1)"
));

/// queued/migrated → running for each of `ids`, with its lease (None: the queue's or the
/// setting's). Returns the started jobs: id, queue_name, payload, attempt, max_attempts,
/// lease_expires_at.
pub fn start<'conn>(
    client: &mut SpiClient<'conn>,
    ids: Vec<i64>,
    leases: Vec<Option<Interval>>,
) -> Result<SpiTupleTable<'conn>, String> {
    let lease_ms = settings::lease_ms().into();
    let result = match (ids.as_slice(), leases.as_slice()) {
        ([id], [lease]) => {
            let args = [(*id).into(), (*lease).into(), lease_ms];
            spi_plans::update(client, &START_ONE, &[INT8, INTERVAL, INT8], None, &args)
        }
        _ => {
            let args = [ids.into(), leases.into(), lease_ms];
            let types = [INT8_ARRAY, INTERVAL_ARRAY, INT8];
            spi_plans::update(client, &START_MANY, &types, None, &args)
        }
    };
    result.map_err(|e| e.to_string())
}

macro_rules! heartbeat_sql {
    ($input:literal, $match:literal) => {
        concat!(
            "WITH input AS (",
            $input,
            ")
            UPDATE queue.jobs j
            SET lease_expires_at = now() + COALESCE(i.lease,
                    (SELECT q.lease FROM queue.queues q WHERE q.queue_name = j.queue_name),
                    $4 * interval '1 millisecond'),
                updated_at = now()
            FROM input i
            WHERE ",
            $match,
            " AND j.id = i.id AND j.status = {running}
              AND (i.attempt IS NULL OR j.attempt_count + 1 = i.attempt)
            RETURNING j.id, j.lease_expires_at"
        )
    };
}
static HEARTBEAT_ONE: Sql = Sql::new(heartbeat_sql!(
    "SELECT $1::bigint AS id, $2::interval AS lease, $3::int AS attempt",
    "j.id = $1"
));
static HEARTBEAT_MANY: Sql = Sql::new(heartbeat_sql!(
    "SELECT * FROM unnest($1::bigint[], $2::interval[], $3::int[]) AS t(id, lease, attempt)",
    "j.id = ANY($1)"
));

/// Extends the lease of each running job among `ids` (at `attempts`, where given). Returns
/// id and the new lease end of each.
pub fn heartbeat<'conn>(
    client: &mut SpiClient<'conn>,
    ids: Vec<i64>,
    leases: Vec<Option<Interval>>,
    attempts: Vec<Option<i32>>,
) -> Result<SpiTupleTable<'conn>, String> {
    let lease_ms = settings::lease_ms().into();
    let result = match (ids.as_slice(), leases.as_slice(), attempts.as_slice()) {
        ([id], [lease], [attempt]) => {
            let args = [(*id).into(), (*lease).into(), (*attempt).into(), lease_ms];
            let types = [INT8, INTERVAL, INT4, INT8];
            spi_plans::update(client, &HEARTBEAT_ONE, &types, None, &args)
        }
        _ => {
            let args = [ids.into(), leases.into(), attempts.into(), lease_ms];
            let types = [INT8_ARRAY, INTERVAL_ARRAY, INT4_ARRAY, INT8];
            spi_plans::update(client, &HEARTBEAT_MANY, &types, None, &args)
        }
    };
    result.map_err(|e| e.to_string())
}

// $4: also from queued/migrated (an implicit start, for reports).
macro_rules! complete_sql {
    ($input:literal, $match:literal) => {
        concat!(
            "WITH input AS (", $input, "),
            done AS (
                UPDATE queue.jobs j
                SET status = {completed}, completed_at = now(), updated_at = now(),
                    started_at = CASE WHEN j.status = {running} THEN j.started_at ELSE now() END,
                    result = i.result::jsonb, lease_expires_at = NULL
                FROM input i
                WHERE ", $match, " AND j.id = i.id
                  AND (j.status = {running} OR ($4 AND j.status IN ({queued}, {migrated})))
                  AND (i.attempt IS NULL OR j.attempt_count + 1 = i.attempt)
                RETURNING j.id, j.queue_name)
            INSERT INTO queue.redis_outbox (job_id, event, status, queue_name)
            SELECT id, 'state', {completed}, queue_name FROM done
            RETURNING job_id"
        )
    };
}
static COMPLETE_ONE: Sql = Sql::new(complete_sql!(
    "SELECT $1::bigint AS id, $2::text AS result, $3::int AS attempt",
    "j.id = $1"
));
static COMPLETE_MANY: Sql = Sql::new(complete_sql!(
    "SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[]) AS t(id, result, attempt)",
    "j.id = ANY($1)"
));

/// One job to complete: its result as JSON text, and the attempt, when known.
pub struct Done {
    pub id: i64,
    pub result: Option<String>,
    pub attempt: Option<i32>,
}

/// → completed for each of `done` that is running (or, with `implicit_start`, queued or
/// migrated) at its attempt. Returns how many changed.
pub fn complete(
    client: &mut SpiClient<'_>,
    mut done: Vec<Done>,
    implicit_start: bool,
) -> Result<usize, String> {
    let result = if done.len() == 1 {
        let d = done.pop().expect("one job");
        let args = [
            d.id.into(),
            d.result.into(),
            d.attempt.into(),
            implicit_start.into(),
        ];
        let types = [INT8, TEXT, INT4, BOOL];
        spi_plans::update(client, &COMPLETE_ONE, &types, None, &args)
    } else {
        let mut ids = Vec::with_capacity(done.len());
        let mut results = Vec::with_capacity(done.len());
        let mut attempts = Vec::with_capacity(done.len());
        for d in done {
            ids.push(d.id);
            results.push(d.result);
            attempts.push(d.attempt);
        }
        let args = [
            ids.into(),
            results.into(),
            attempts.into(),
            implicit_start.into(),
        ];
        let types = [INT8_ARRAY, TEXT_ARRAY, INT4_ARRAY, BOOL];
        spi_plans::update(client, &COMPLETE_MANY, &types, None, &args)
    };
    result.map(|t| t.len()).map_err(|e| e.to_string())
}

// Per job: $2 the attempts used, $3 the retry delay in ms (NULL: dead), $4 the error. The
// attempt count is checked too: the outcome was computed from it.
macro_rules! record_failures_sql {
    ($input:literal, $match:literal) => {
        concat!(
            "WITH input AS (", $input, "),
            f AS (
                UPDATE queue.jobs j
                SET status = CASE WHEN i.delay_ms IS NULL THEN {failed} ELSE {retry_scheduled} END,
                    attempt_count = i.attempts,
                    run_at = CASE WHEN i.delay_ms IS NULL THEN j.run_at
                                  ELSE now() + i.delay_ms * interval '1 millisecond' END,
                    started_at = CASE WHEN j.status = {running} THEN j.started_at ELSE now() END,
                    failed_at = CASE WHEN i.delay_ms IS NULL THEN now() END,
                    last_error_message = i.error,
                    errors = j.errors || jsonb_build_array(
                        jsonb_build_object('attempt', i.attempts, 'error', i.error, 'at', now())),
                    lease_expires_at = NULL,
                    updated_at = now()
                FROM input i
                WHERE ", $match, " AND j.id = i.id
                  AND j.status IN ({running}, {queued}, {migrated})
                  AND j.attempt_count = i.attempts - 1
                RETURNING j.id, j.status, j.run_at, j.queue_name, i.attempts, i.delay_ms),
            noted AS (INSERT INTO queue.redis_outbox (job_id, event, status, queue_name)
                      SELECT id, 'state', status, queue_name FROM f)
            SELECT id, jsonb_build_object(
                'status', status,
                'attempt_count', attempts,
                'retry_delay_ms', delay_ms,
                'run_at', CASE WHEN status = {retry_scheduled} THEN run_at END)
            FROM f"
        )
    };
}
static RECORD_FAILURE: Sql = Sql::new(record_failures_sql!(
    "SELECT $1::bigint AS id, $2::int AS attempts, $3::bigint AS delay_ms, $4::text AS error",
    "j.id = $1"
));
static RECORD_FAILURES: Sql = Sql::new(record_failures_sql!(
    "SELECT * FROM unnest($1::bigint[], $2::int[], $3::bigint[], $4::text[])
     AS t(id, attempts, delay_ms, error)",
    "j.id = ANY($1)"
));

/// What the backoff rule makes of a failed attempt of `job`.
pub fn failure_outcome(job: &Locked) -> Outcome {
    backoff::outcome(
        job.attempt_count,
        job.max_attempts,
        job.backoff_base_ms
            .unwrap_or_else(settings::backoff_base_ms),
        job.backoff_max_ms.unwrap_or_else(settings::backoff_max_ms),
        settings::backoff_jitter(),
        backoff::unit_random(),
    )
}

/// One failed attempt: the job (locked, and checked by the caller to be running or, for a
/// report, waiting), what the backoff rule made of it, and the error.
pub struct Failure<'a> {
    pub id: i64,
    pub outcome: Outcome,
    pub error: &'a str,
}

/// Records failed attempts: each job retries after its backoff or, with its attempts used up,
/// is dead (the dead-letter queue); the error joins its history. Returns each job's outcome as
/// `queue.fail` reports it, by id.
pub fn fail(
    client: &mut SpiClient<'_>,
    failures: &[Failure<'_>],
) -> Result<Vec<(i64, JsonB)>, String> {
    let mut ids = Vec::with_capacity(failures.len());
    let mut attempts = Vec::with_capacity(failures.len());
    let mut delays = Vec::with_capacity(failures.len());
    let mut errors = Vec::with_capacity(failures.len());
    for f in failures {
        let (used, delay) = match f.outcome {
            Outcome::Retry { attempts, delay_ms } => (attempts, Some(delay_ms)),
            Outcome::Dead { attempts } => (attempts, None),
        };
        ids.push(f.id);
        attempts.push(used);
        delays.push(delay);
        errors.push(f.error);
    }
    let rows = match (
        ids.as_slice(),
        attempts.as_slice(),
        delays.as_slice(),
        errors.as_slice(),
    ) {
        ([id], [used], [delay], [error]) => {
            let args = [
                (*id).into(),
                (*used).into(),
                (*delay).into(),
                (*error).into(),
            ];
            let types = [INT8, INT4, INT8, TEXT];
            spi_plans::update(client, &RECORD_FAILURE, &types, None, &args)
        }
        _ => {
            let args = [ids.into(), attempts.into(), delays.into(), errors.into()];
            let types = [INT8_ARRAY, INT4_ARRAY, INT8_ARRAY, TEXT_ARRAY];
            spi_plans::update(client, &RECORD_FAILURES, &types, None, &args)
        }
    }
    .map_err(|e| format!("recording failed attempts failed: {e}"))?;
    rows.map(|row| {
        Ok((
            required(row.get(1), "id")?,
            required(row.get(2), "outcome")?,
        ))
    })
    .collect()
}

/// Fails the current attempt of job `id` if it is running (at `attempt`, if given): the one-job
/// case of [`fail`], for `queue.fail` and lease expiry. `Ok(None)`: the job is not running at
/// that attempt (the caller says why).
pub fn fail_one(
    client: &mut SpiClient<'_>,
    id: i64,
    error: &str,
    attempt: Option<i32>,
) -> Result<Option<JsonB>, String> {
    let Some(job) = lock(client, &[id])?.pop() else {
        return Ok(None);
    };
    if job.status != JobState::Running || attempt.is_some_and(|a| a != job.attempt()) {
        return Ok(None);
    }
    let failure = Failure {
        id,
        outcome: failure_outcome(&job),
        error,
    };
    Ok(fail(client, &[failure])?.pop().map(|(_, outcome)| outcome))
}
