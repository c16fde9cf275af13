//! Redis follows Postgres after commit: the bridge applies `queue.redis_outbox` (written by the
//! lifecycle functions in their transactions) to the job hashes and the dead-letter list, then
//! deletes the rows it applied, counting the outcomes among them into `queue.stats` in the same
//! transaction (so each is counted once). Every Redis command is idempotent, so a crash in between
//! only means applying a change twice.

use super::shared;
use crate::redis::{iso_utc, iso_utc_from_pg, Keys};
use crate::settings;
use crate::spi_plans::types::{INT8, TEXT_ARRAY};
use crate::spi_plans::{self, with_plan};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::spi::SpiClient;
use std::time::SystemTime;

/// One outbox row with the job's current state (None when the job no longer exists).
pub struct Change {
    ctid: String,
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
    SELECT o.ctid::text, o.job_id, o.event, o.status AS entered, j.status, j.queue_name,
           j.attempt_count, j.last_error_message, j.failed_at, j.retry_delay_ms, j.payload,
           j.priority
    FROM (SELECT ctid, job_id, event, status FROM queue.redis_outbox LIMIT $1) o
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

// Deletes the applied rows and counts the outcomes among them, per queue and minute.
const DELETE_APPLIED: &str = concat!(
    "
    WITH applied AS (
        DELETE FROM queue.redis_outbox WHERE ctid = ANY($1::tid[])
        RETURNING queue_name, status, at)
    INSERT INTO queue.stats AS s (queue_name, minute, completed, retried, failed, cancelled)
    SELECT queue_name, date_trunc('minute', at),
           count(*) FILTER (WHERE status = 'completed'),
           count(*) FILTER (WHERE status = 'retry_scheduled'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled')
    FROM applied
    WHERE status IN ('completed', 'retry_scheduled', 'failed', 'cancelled')
    GROUP BY 1, 2",
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

/// Reads up to `limit` pending changes. Runs inside the caller's transaction.
pub fn read_changes(client: &mut SpiClient<'_>, limit: usize) -> Vec<Change> {
    with_plan(client, READ_OUTBOX, &[INT8], |client, plan| {
        let rows = client.select(plan, None, &[(limit as i64).into()])?;
        Ok::<_, pgrx::spi::SpiError>(
            rows.map(|row| {
                let status: Option<String> = row.get(5).ok().flatten();
                Change {
                    ctid: row.get(1).ok().flatten().unwrap_or_default(),
                    job_id: row.get(2).ok().flatten().unwrap_or_default(),
                    replayed: row.get::<String>(3).ok().flatten().as_deref() == Some("replayed"),
                    entered: row.get(4).ok().flatten().unwrap_or_default(),
                    job: status.map(|status| JobState {
                        queue: row.get(6).ok().flatten().unwrap_or_default(),
                        attempt_count: row.get(7).ok().flatten().unwrap_or_default(),
                        error: row.get(8).ok().flatten(),
                        failed_at: row
                            .get::<TimestampWithTimeZone>(9)
                            .ok()
                            .flatten()
                            .map(|t| iso_utc_from_pg(t.into_inner())),
                        retry_delay_ms: (status == "retry_scheduled")
                            .then(|| row.get::<i64>(10).ok().flatten())
                            .flatten(),
                        payload: row.get(11).ok().flatten().unwrap_or_else(|| "null".into()),
                        priority: row.get(12).ok().flatten().unwrap_or_default(),
                        status,
                    }),
                }
            })
            .collect(),
        )
    })
    .unwrap_or_else(|e| panic!("queue_pg bridge: reading the Redis outbox failed: {e}"))
}

/// Deletes the applied rows and counts their outcomes. Runs inside the caller's transaction.
pub fn delete_applied(client: &mut SpiClient<'_>, changes: &[Change]) {
    if changes.is_empty() {
        return;
    }
    let ctids: Vec<String> = changes.iter().map(|c| c.ctid.clone()).collect();
    spi_plans::update(client, DELETE_APPLIED, &[TEXT_ARRAY], None, &[ctids.into()])
        .map(|_| ())
        .unwrap_or_else(|e| panic!("queue_pg bridge: deleting applied outbox rows failed: {e}"));
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
        .unwrap_or_else(|e| panic!("queue_pg bridge: folding old queue.stats minutes failed: {e}"));
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
pub fn apply(con: &mut redis::Connection, keys: &Keys, changes: &[Change]) -> Result<(), String> {
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
