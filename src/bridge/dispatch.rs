//! Dispatch: read a batch of queued jobs, push it to Redis in one pipelined MULTI/EXEC, and mark
//! the jobs `migrated` only after Redis acknowledged. The mark of one batch and the read of the
//! next share a transaction; no transaction is open while Redis is being talked to.
//!
//! A crash between the push and the mark leaves the jobs `queued`, so they are pushed again:
//! delivery is at-least-once, and `queue.start` lets only one worker hold a job.

use crate::redis::{iso_utc, Keys};
use std::time::SystemTime;

/// A queued job as the bridge reads it.
pub struct Job {
    pub id: i64,
    pub queue: String,
    pub priority: String,
    pub payload: String,
    pub attempt_count: i32,
    pub max_attempts: i32,
    pub enqueued_at: String,
}

/// Jobs Redis acknowledged, with their position in their list.
#[derive(Default)]
pub struct Pushed {
    pub ids: Vec<i64>,
    pub seqs: Vec<i64>,
}

const READ_BATCH: &str = r#"
    SELECT j.id, j.queue_name, j.priority, j.payload::text, j.attempt_count, j.max_attempts,
           to_char(j.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
    FROM queue.jobs j
    WHERE j.status = 'queued'
      AND NOT EXISTS (SELECT 1 FROM queue.queues q WHERE q.queue_name = j.queue_name AND q.paused)
    ORDER BY j.id
    LIMIT $1"#;

// SKIP LOCKED: a job a worker is starting or a user is cancelling right now is left alone
// (the bridge never waits on an application's lock); its own transaction decides its state.
const MARK_MIGRATED: &str = "
    UPDATE queue.jobs j
    SET status = 'migrated', dispatched_at = now(), dispatch_seq = b.seq, updated_at = now()
    FROM (SELECT x.id, b.seq
          FROM unnest($1::bigint[], $2::bigint[]) AS b(id, seq)
          JOIN queue.jobs x ON x.id = b.id
          WHERE x.status = 'queued'
          FOR UPDATE OF x SKIP LOCKED) b
    WHERE j.id = b.id";

/// Marks what Redis acknowledged as `migrated`. Runs inside the caller's transaction.
pub fn mark_migrated(client: &mut pgrx::spi::SpiClient<'_>, pushed: Pushed) {
    if pushed.ids.is_empty() {
        return;
    }
    client
        .update(
            MARK_MIGRATED,
            None,
            &[pushed.ids.into(), pushed.seqs.into()],
        )
        .unwrap_or_else(|e| panic!("queue_pg bridge: marking jobs migrated failed: {e}"));
}

/// Reads up to `limit` queued jobs of unpaused queues, oldest first.
pub fn read_batch(client: &pgrx::spi::SpiClient<'_>, limit: usize) -> Vec<Job> {
    let rows = client
        .select(READ_BATCH, None, &[(limit as i64).into()])
        .unwrap_or_else(|e| panic!("queue_pg bridge: reading queued jobs failed: {e}"));
    rows.map(|row| Job {
        id: row.get(1).ok().flatten().unwrap_or_default(),
        queue: row.get(2).ok().flatten().unwrap_or_default(),
        priority: row.get(3).ok().flatten().unwrap_or_default(),
        payload: row.get(4).ok().flatten().unwrap_or_else(|| "null".into()),
        attempt_count: row.get(5).ok().flatten().unwrap_or_default(),
        max_attempts: row.get(6).ok().flatten().unwrap_or_default(),
        enqueued_at: row.get(7).ok().flatten().unwrap_or_default(),
    })
    .collect()
}

/// The list entry workers pop (SPEC.md, "Redis layout"). `attempt` is the attempt this delivery is for.
pub fn message(job: &Job) -> String {
    format!(
        r#"{{"id":{},"queue":{},"priority":{},"payload":{},"attempt":{},"max_attempts":{},"enqueued_at":{}}}"#,
        job.id,
        json_string(&job.queue),
        json_string(&job.priority),
        job.payload,
        job.attempt_count + 1,
        job.max_attempts,
        json_string(&job.enqueued_at),
    )
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

/// Pushes `jobs` in one MULTI/EXEC round trip: per list, one LPUSH of its messages in id order
/// (so BRPOP takes the oldest first) and one INCRBY of its push counter; per job, its hash.
pub fn push(con: &mut redis::Connection, keys: &Keys, jobs: &[Job]) -> Result<Pushed, String> {
    let now = iso_utc(SystemTime::now());
    let mut pipe = redis::pipe();
    pipe.atomic();

    // Group by list, keeping id order within each list.
    let mut lists: Vec<((&str, &str), Vec<&Job>)> = Vec::new();
    for job in jobs {
        let list = (job.queue.as_str(), job.priority.as_str());
        match lists.iter_mut().find(|(l, _)| *l == list) {
            Some((_, members)) => members.push(job),
            None => lists.push((list, vec![job])),
        }
    }
    for ((queue, priority), members) in &lists {
        let lpush = pipe.cmd("LPUSH").arg(keys.list(queue, priority));
        for job in members {
            lpush.arg(message(job));
        }
        lpush.ignore();
        pipe.cmd("INCRBY")
            .arg(keys.pushed_counter(queue, priority))
            .arg(members.len());
    }
    for job in jobs {
        pipe.cmd("HSET")
            .arg(keys.job(job.id))
            .arg("status")
            .arg("migrated")
            .arg("queue")
            .arg(&job.queue)
            .arg("attempt_count")
            .arg(job.attempt_count)
            .arg("queued_at")
            .arg(&now)
            .arg("updated_at")
            .arg(&now)
            .ignore();
    }

    let counters: Vec<i64> = pipe.query(con).map_err(|e| e.to_string())?;
    let mut pushed = Pushed::default();
    for (((_, members), counter), _) in lists.iter().zip(counters).zip(0..) {
        let first = counter - members.len() as i64 + 1;
        for (k, job) in members.iter().enumerate() {
            pushed.ids.push(job.id);
            pushed.seqs.push(first + k as i64);
        }
    }
    Ok(pushed)
}
