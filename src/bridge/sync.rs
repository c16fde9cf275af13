//! Redis follows Postgres after commit: the bridge applies `queue.redis_outbox` (written by the
//! lifecycle functions in their transactions) to the job hashes and the dead-letter list, then
//! deletes the rows it applied by their ids. Every Redis command is idempotent, so a crash in
//! between only means applying a change twice.
//!
//! Outcomes are counted into `queue.stats` without waiting for Redis: once per poll interval
//! [`count_outcomes`] counts the rows not counted yet and marks them, and the delete counts
//! whatever it removes unmarked, in its own transaction. Either way a row is counted once.

use super::shared;
use crate::redis::{iso_utc, iso_utc_from_pg, Conn, Keys};
use crate::settings;
use crate::spi_plans::types::{INT8, INT8_ARRAY};
use crate::spi_plans::{self, optional, required, with_plan};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::spi::SpiClient;
use std::time::SystemTime;

/// One outbox row with the job's current state (None when the job no longer exists).
pub struct Change {
    id: i64,
    job_id: i64,
    replayed: bool,
    /// The state the job entered with this change.
    entered: String,
    job: Option<JobState>,
}

struct JobState {
    status: String,
    queue: String,
    attempt_count: i32,
    error: Option<String>,
    failed_at: Option<String>,
    retry_delay_ms: Option<i64>,
    payload: String,
    priority: String,
}

// One primary-key lookup per outbox row: the LIMIT keeps Postgres from flattening the LATERAL
// subquery into a join, which it planned as a hash join over all of queue.jobs (a full scan in
// every bridge cycle). Only a dead job's payload is needed (for its dead-letter entry).
const READ_OUTBOX: &str = "
    SELECT o.id, o.job_id, o.event, o.status AS entered, j.status, j.queue_name,
           j.attempt_count, j.last_error_message, j.failed_at, j.retry_delay_ms, j.payload,
           j.priority
    FROM (SELECT id, job_id, event, status FROM queue.redis_outbox ORDER BY id LIMIT $1) o
    LEFT JOIN LATERAL (
        SELECT status, queue_name, attempt_count, last_error_message, failed_at,
               (EXTRACT(EPOCH FROM (run_at - updated_at)) * 1000)::bigint AS retry_delay_ms,
               CASE WHEN status = 'failed' THEN payload::text END AS payload, priority
        FROM queue.jobs WHERE id = o.job_id
        LIMIT 1) j ON true";

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
           count(*) FILTER (WHERE status = 'completed'),
           count(*) FILTER (WHERE status = 'retry_scheduled'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled')
    FROM rows
    WHERE status IN ('completed', 'retry_scheduled', 'failed', 'cancelled')
    GROUP BY 1, 2"
    };
}

// Deletes the applied rows and counts the outcomes among them not counted yet.
const DELETE_APPLIED: &str = concat!(
    "
    WITH deleted AS (
        DELETE FROM queue.redis_outbox WHERE id = ANY($1::bigint[])
        RETURNING queue_name, status, at, counted),
    rows AS (SELECT * FROM deleted WHERE NOT counted)",
    count_rows!(),
    add_to_stats!()
);

// Counts the outcomes among the rows still waiting for Redis, once: monitoring does not wait for
// Redis to come back.
const COUNT_WAITING: &str = concat!(
    "
    WITH rows AS (
        UPDATE queue.redis_outbox SET counted = true
        WHERE NOT counted AND status IN ('completed', 'retry_scheduled', 'failed', 'cancelled')
        RETURNING queue_name, status, at)",
    count_rows!(),
    add_to_stats!()
);

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

/// Adds the dead-letter entry once: the marker doubles as the guard against a second LPUSH.
const ADD_DEAD_LETTER: &str = "
    if redis.call('SET', KEYS[1], 'moved', 'NX', 'EX', ARGV[1]) then
        redis.call('LPUSH', KEYS[2], ARGV[2])
        return 1
    end
    return 0";

/// Removes the job's entries (they start with ARGV[1]) from the dead-letter list, and its marker.
const REMOVE_DEAD_LETTER: &str = "
    local removed = 0
    for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
        if string.sub(item, 1, #ARGV[1]) == ARGV[1] then
            removed = removed + redis.call('LREM', KEYS[1], 0, item)
        end
    end
    redis.call('DEL', KEYS[2])
    return removed";

/// Reads up to `limit` pending changes, oldest first. Runs inside the caller's transaction.
/// A row that does not decode is an ERROR (logged, and in `health()`), never a default.
pub fn read_changes(client: &mut SpiClient<'_>, limit: usize) -> Vec<Change> {
    with_plan(client, READ_OUTBOX, &[INT8], |client, plan| {
        let rows = client
            .select(plan, None, &[(limit as i64).into()])
            .map_err(|e| e.to_string())?;
        rows.map(|row| {
            let status: Option<String> = optional(row.get(5), "jobs.status")?;
            let job = match status {
                None => None,
                Some(status) => Some(JobState {
                    queue: required(row.get(6), "jobs.queue_name")?,
                    attempt_count: required(row.get(7), "jobs.attempt_count")?,
                    error: optional(row.get(8), "jobs.last_error_message")?,
                    failed_at: optional(row.get::<TimestampWithTimeZone>(9), "jobs.failed_at")?
                        .map(|t| iso_utc_from_pg(t.into_inner())),
                    retry_delay_ms: match status.as_str() {
                        "retry_scheduled" => Some(required(row.get(10), "the retry delay")?),
                        _ => None,
                    },
                    payload: match status.as_str() {
                        "failed" => required(row.get(11), "jobs.payload")?,
                        _ => String::new(),
                    },
                    priority: required(row.get(12), "jobs.priority")?,
                    status,
                }),
            };
            Ok(Change {
                id: required(row.get(1), "redis_outbox.id")?,
                job_id: required(row.get(2), "redis_outbox.job_id")?,
                replayed: required::<String>(row.get(3), "redis_outbox.event")? == "replayed",
                entered: required(row.get(4), "redis_outbox.status")?,
                job,
            })
        })
        .collect::<Result<Vec<_>, String>>()
    })
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: reading the Redis outbox failed: {e}"))
}

/// Deletes the applied rows and counts their outcomes not counted yet. Runs inside the caller's
/// transaction.
pub fn delete_applied(client: &mut SpiClient<'_>, changes: &[Change]) {
    if changes.is_empty() {
        return;
    }
    let ids: Vec<i64> = changes.iter().map(|c| c.id).collect();
    spi_plans::update(client, DELETE_APPLIED, &[INT8_ARRAY], None, &[ids.into()])
        .map(|_| ())
        .unwrap_or_else(|e| {
            pgrx::error!("queue_pg bridge: deleting applied outbox rows failed: {e}")
        });
}

/// Counts the outcomes of changes still waiting for Redis (see the module doc). Runs inside the
/// caller's transaction.
pub fn count_outcomes(client: &mut SpiClient<'_>) {
    spi_plans::update(client, COUNT_WAITING, &[], None, &[])
        .map(|_| ())
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: counting outcomes failed: {e}"));
}

/// The bridge's own totals, published once the transaction that counted them has committed.
pub fn publish_totals(changes: &[Change]) {
    let count = |state: &str| changes.iter().filter(|c| c.entered == state).count() as u64;
    shared::add_outcomes(count("retry_scheduled"), count("failed"));
}

/// Folds minutes older than an hour (and a little) into each queue's totals. Runs inside the caller's
/// transaction.
pub fn fold_stats(client: &mut SpiClient<'_>) {
    spi_plans::update(client, FOLD_STATS, &[], None, &[])
        .map(|_| ())
        .unwrap_or_else(|e| {
            pgrx::error!("queue_pg bridge: folding old queue.stats minutes failed: {e}")
        });
}

/// The dead-letter entry of a job (SPEC.md). It starts with `{"id":<id>,`, which is how
/// [`REMOVE_DEAD_LETTER`] finds it again.
fn dead_letter_entry(id: i64, job: &JobState) -> String {
    format!(
        r#"{{"id":{id},"queue_name":{},"payload":{},"error":{},"failed_at":{},"attempt_count":{},"original_priority":{}}}"#,
        json(&job.queue),
        job.payload,
        json(job.error.as_deref().unwrap_or("")),
        json(job.failed_at.as_deref().unwrap_or("")),
        job.attempt_count,
        json(&job.priority),
    )
}

fn dead_letter_prefix(id: i64) -> String {
    format!(r#"{{"id":{id},"#)
}

fn json(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

/// Applies the changes to Redis in one pipelined round trip: removals of replayed jobs'
/// dead-letter entries first, then each job's hash (once per job) and, for dead jobs, their entry.
pub fn apply(con: &mut Conn, keys: &Keys, changes: &[Change]) -> Result<(), String> {
    let now = iso_utc(SystemTime::now());
    let hash_ttl = settings::job_hash_ttl_s();
    let dead_ttl = settings::dead_letter_ttl_s();
    let mut pipe = redis::pipe();
    for c in changes.iter().filter(|c| c.replayed) {
        pipe.cmd("EVAL")
            .arg(REMOVE_DEAD_LETTER)
            .arg(2)
            .arg(keys.dead_letter_list())
            .arg(keys.dead_letter_marker(c.job_id))
            .arg(dead_letter_prefix(c.job_id))
            .ignore();
    }
    let mut seen = std::collections::HashSet::new();
    for c in changes {
        let Some(job) = c.job.as_ref().filter(|_| seen.insert(c.job_id)) else {
            continue;
        };
        let key = keys.job(c.job_id);
        let hset = pipe.cmd("HSET").arg(&key);
        hset.arg("status").arg(&job.status);
        hset.arg("queue").arg(&job.queue);
        hset.arg("attempt_count").arg(job.attempt_count);
        hset.arg("updated_at").arg(&now);
        if let Some(error) = &job.error {
            hset.arg("error").arg(error);
        }
        if let Some(delay) = job.retry_delay_ms {
            hset.arg("retry_delay").arg(delay);
        }
        if let Some(failed_at) = &job.failed_at {
            hset.arg("failed_at").arg(failed_at);
        }
        hset.ignore();
        if matches!(job.status.as_str(), "completed" | "failed" | "cancelled") {
            pipe.cmd("EXPIRE").arg(&key).arg(hash_ttl).ignore();
        } else {
            pipe.cmd("PERSIST").arg(&key).ignore();
        }
        if job.status == "failed" {
            pipe.cmd("EVAL")
                .arg(ADD_DEAD_LETTER)
                .arg(2)
                .arg(keys.dead_letter_marker(c.job_id))
                .arg(keys.dead_letter_list())
                .arg(dead_ttl)
                .arg(dead_letter_entry(c.job_id, job))
                .ignore();
        }
    }
    pipe.query::<()>(con).map_err(|e| e.to_string())
}
