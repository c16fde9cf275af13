//! Dispatch's statements and Redis commands: read a batch of queued jobs and number it in push
//! order, push it to Redis (one MULTI/EXEC per queue, one round trip per node), and mark the jobs
//! `migrated` only after Redis acknowledged (the loop around them is `dispatch`). The mark of one
//! batch and the read of the next share a transaction; the bridge never waits for Redis inside a
//! transaction.
//!
//! Each message takes the next number of `queue.dispatch_order` (a job's `dispatch_seq`): lists
//! are FIFO, so a list holds exactly the jobs pushed to it from its oldest entry on, which is how
//! the bridge knows, from the list itself, which jobs are in it (`list_tails`).
//!
//! A crash between the push and the mark leaves the jobs `queued`, so they are pushed again:
//! delivery is at-least-once, and `queue.start` lets only one worker hold a job.

use super::redis_loss;
use super::shared;
use crate::lifecycle::Sql;
use crate::lifecycle::{JobState, Priority};
use crate::redis::client::Sent;
use crate::redis::wire::{self, JobHash, ListEntry};
use crate::redis::{iso_utc, iso_utc_from_pg, Client, Group, Keys, Replies};
use crate::spi_plans::types::{INT8, INT8_ARRAY};
use crate::spi_plans::{self, first_value, required, with_plan};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::spi::SpiClient;
use serde_json::value::RawValue;
use std::time::SystemTime;

/// A queued job as the bridge reads it.
pub struct Job {
    pub id: i64,
    pub queue: String,
    pub priority: Priority,
    pub payload: Box<RawValue>,
    pub attempt_count: i32,
    pub max_attempts: i32,
    pub enqueued_at: String,
    /// Its place in the push order ([`number`]).
    pub seq: i64,
}

/// Jobs Redis acknowledged, with their place in the push order.
#[derive(Default)]
pub struct Pushed {
    pub ids: Vec<i64>,
    pub seqs: Vec<i64>,
    /// Queues whose epoch key was missing at this push (cluster), with the first number of the
    /// push: Redis may have lost what it held of them before (`redis_loss` looks).
    pub epoch_missing: Vec<(String, i64)>,
    /// Writes to Redis nodes it took.
    pub round_trips: u64,
}

static READ_BATCH: Sql = Sql::new(
    r#"
    SELECT j.id, j.queue_name, j.priority, j.payload::text, j.attempt_count, j.max_attempts,
           j.created_at
    FROM queue.jobs j
    WHERE j.status = {queued} AND j.id > $2
      AND NOT EXISTS (SELECT 1 FROM queue.queues q WHERE q.queue_name = j.queue_name AND q.paused)
    ORDER BY j.id
    LIMIT $1"#,
);

/// Ids per step of the sweep for queued jobs that nothing announced (see `dispatch`).
pub const SWEEP_IDS: i64 = 5000;

// From the first queued id above $1 (gaps in the ids are skipped), $2 ids: the lowest queued id
// of an unpaused queue among them, and the last id of the range (NULL when no id above $1 is
// queued: the sweep is done). Reads only the queued jobs' index, over a bounded range.
static SWEEP: Sql = Sql::new(
    "
    WITH first AS (SELECT min(id) AS id FROM queue.jobs WHERE status = {queued} AND id > $1)
    SELECT (SELECT min(j.id) FROM queue.jobs j, first
            WHERE j.status = {queued} AND j.id >= first.id AND j.id < first.id + $2
              AND NOT EXISTS (SELECT 1 FROM queue.queues q
                              WHERE q.queue_name = j.queue_name AND q.paused)),
           (SELECT id + $2 - 1 FROM first)",
);

// Only jobs still `queued`: one that a worker already started (it may pop a job before this
// mark) or that was cancelled meanwhile keeps the state its own transaction gave it. SKIP LOCKED:
// the bridge never waits for a worker's transaction, so it can never be part of a deadlock with
// one (a skipped job that stays `queued`, because no worker started it after all, is pushed again
// by the bridge's next sweep; `start` drops a duplicate).
static MARK_MIGRATED: Sql = Sql::new(
    "
    UPDATE queue.jobs j
    SET status = {migrated}, dispatched_at = now(), dispatch_seq = b.seq, updated_at = now()
    FROM (SELECT x.id, b.seq
          FROM unnest($1::bigint[], $2::bigint[]) AS b(id, seq)
          JOIN queue.jobs x ON x.id = b.id
          WHERE x.status = {queued}
          FOR UPDATE OF x SKIP LOCKED) b
    WHERE j.id = b.id",
);

/// Marks what Redis acknowledged as `migrated`. Runs inside the caller's transaction.
pub fn mark_migrated(client: &mut SpiClient<'_>, pushed: Pushed) {
    if pushed.ids.is_empty() {
        return;
    }
    let args = [pushed.ids.into(), pushed.seqs.into()];
    spi_plans::update(
        client,
        &MARK_MIGRATED,
        &[INT8_ARRAY, INT8_ARRAY],
        None,
        &args,
    )
    .map(|_| ())
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: marking jobs migrated failed: {e}"));
}

/// One step of the sweep after id `after`: the lowest id there that dispatch should read from,
/// if any, and where the next step goes on from (None: the sweep is done).
pub fn sweep_step(client: &mut SpiClient<'_>, after: i64) -> (Option<i64>, Option<i64>) {
    let args = [after.into(), SWEEP_IDS.into()];
    with_plan(client, &SWEEP, &[INT8, INT8], |client, plan| {
        client
            .select(plan, Some(1), &args)?
            .first()
            .get_two::<i64, i64>()
    })
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: sweeping queued jobs failed: {e}"))
}

/// Reads up to `limit` queued jobs of unpaused queues with ids above `after_id`, oldest first.
/// (`after_id` skips the batch still in flight to Redis, which is not marked yet.) A row that
/// does not decode is an ERROR, never a message made of defaults.
pub fn read_batch(client: &mut SpiClient<'_>, after_id: i64, limit: usize) -> Vec<Job> {
    let args = [(limit as i64).into(), after_id.into()];
    with_plan(client, &READ_BATCH, &[INT8, INT8], |client, plan| {
        let rows = client
            .select(plan, None, &args)
            .map_err(|e| e.to_string())?;
        rows.map(|row| {
            Ok(Job {
                id: required(row.get(1), "id")?,
                queue: required(row.get(2), "queue_name")?,
                priority: Priority::parse(&required::<String>(row.get(3), "priority")?)?,
                payload: RawValue::from_string(required(row.get(4), "payload")?)
                    .map_err(|e| format!("payload: {e}"))?,
                attempt_count: required(row.get(5), "attempt_count")?,
                max_attempts: required(row.get(6), "max_attempts")?,
                enqueued_at: iso_utc_from_pg(
                    required::<TimestampWithTimeZone>(row.get(7), "created_at")?.into_inner(),
                ),
                seq: 0, // numbered by `number` once the batch is read
            })
        })
        .collect::<Result<Vec<_>, String>>()
    })
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: reading queued jobs failed: {e}"))
}

// Takes `$1` numbers of the push order at once (only the bridge draws from it): returns the last.
static TAKE_NUMBERS: &str = "
    SELECT pg_catalog.setval('queue.dispatch_order',
                             pg_catalog.nextval('queue.dispatch_order') + $1 - 1)";

/// Gives the jobs of a batch their places in the push order, in the batch's (id) order, which is
/// the order they go into each list. Runs inside the caller's transaction.
pub fn number(client: &mut SpiClient<'_>, batch: &mut [Job]) {
    if batch.is_empty() {
        return;
    }
    let args = [(batch.len() as i64).into()];
    let last = with_plan(client, TAKE_NUMBERS, &[INT8], |client, plan| {
        client
            .update(plan, Some(1), &args)
            .and_then(|t| first_value::<i64>(t, 1))
    })
    .map_err(|e| e.to_string())
    .and_then(|v| v.ok_or_else(|| "no value".to_string()))
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: numbering a batch failed: {e}"));
    let first = last - batch.len() as i64 + 1;
    for (job, seq) in batch.iter_mut().zip(first..) {
        job.seq = seq;
    }
}

/// The list entry workers pop. `attempt` is the attempt this delivery is for.
pub fn message(job: &Job) -> String {
    wire::to_json(&ListEntry {
        id: job.id,
        queue: job.queue.as_str().into(),
        priority: job.priority,
        payload: &job.payload,
        attempt: job.attempt_count + 1,
        max_attempts: job.max_attempts,
        enqueued_at: job.enqueued_at.as_str().into(),
    })
}

/// A batch sent to Redis whose replies have not been read yet.
pub struct InFlight {
    sent: Sent,
    /// Per queue group: the queue, and its jobs' ids and places in the push order.
    queues: Vec<(String, Vec<(i64, i64)>)>,
    /// Whether each queue group starts with its epoch check (cluster only).
    epochs: bool,
    round_trips: u64,
}

/// One queue's jobs of a batch, per list.
type Lists<'a> = Vec<(Priority, Vec<&'a Job>)>;

/// Sends `jobs` without waiting for the replies: per queue, one MULTI/EXEC in the queue's slot
/// with, per list, one LPUSH of its messages in push order (so BRPOP takes the oldest first); per
/// job, its hash. The bridge reads the replies with
/// [`receive`] after its next Postgres transaction, so Redis and Postgres work at the same time,
/// and no transaction is open while the bridge waits for Redis.
///
/// In a cluster each queue's MULTI also sets the queue's epoch key (`SET NX GET`), in the same
/// step as the push: a queue whose key was missing lived on a master that lost its data, and
/// `redis_loss` looks at once at what its lists hold.
pub fn send(client: &mut Client, keys: &Keys, jobs: &[Job]) -> InFlight {
    let now = iso_utc(SystemTime::now());
    let epochs = client.is_cluster();
    let before = client.round_trips();

    // Group by queue, then by list, keeping id order within each list.
    let mut queues: Vec<(&str, Lists)> = Vec::new();
    for job in jobs {
        let lists = match queues.iter_mut().find(|(q, _)| *q == job.queue) {
            Some((_, lists)) => lists,
            None => {
                queues.push((&job.queue, Vec::new()));
                &mut queues.last_mut().expect("just pushed").1
            }
        };
        match lists.iter_mut().find(|(p, _)| *p == job.priority) {
            Some((_, members)) => members.push(job),
            None => lists.push((job.priority, vec![job])),
        }
    }
    let mut groups = Vec::with_capacity(queues.len() + jobs.len());
    for (queue, lists) in &queues {
        shared::note_queue_pushed(queue);
        let mut group = Group::atomic_on_key(keys.queue_epoch(queue));
        if epochs {
            group
                .cmd("SET")
                .arg(keys.queue_epoch(queue))
                .arg(redis_loss::epoch_token())
                .arg("NX")
                .arg("GET");
        }
        for (priority, members) in lists {
            let lpush = group.cmd("LPUSH").arg(keys.list(queue, *priority));
            for job in members {
                lpush.arg(message(job));
            }
        }
        groups.push(group);
    }
    for job in jobs {
        let hash = JobHash {
            status: JobState::Migrated,
            queue: &job.queue,
            attempt_count: job.attempt_count,
            updated_at: &now,
            queued_at: Some(&now),
            error: None,
            retry_delay_ms: None,
            failed_at: None,
        };
        let key = keys.job(job.id);
        let mut group = Group::on_key(key.clone());
        group.cmd("HSET").arg(key).arg(&hash);
        groups.push(group);
    }
    let sent = client.send(groups);
    InFlight {
        queues: queues
            .iter()
            .map(|(q, lists)| {
                let jobs = lists
                    .iter()
                    .flat_map(|(_, members)| members.iter().map(|j| (j.id, j.seq)))
                    .collect();
                (q.to_string(), jobs)
            })
            .collect(),
        epochs,
        round_trips: client.round_trips() - before,
        sent,
    }
}

/// Reads the replies of a sent batch: what Redis acknowledged, and the first error (the jobs of
/// a queue whose push failed stay `queued`).
pub fn receive(client: &mut Client, batch: InFlight) -> (Pushed, Option<String>) {
    let before = client.round_trips();
    let mut replies = client.receive(batch.sent).into_iter();
    let mut pushed = Pushed {
        round_trips: batch.round_trips,
        ..Pushed::default()
    };
    let mut error = None;
    for (queue, jobs) in batch.queues {
        let reply = replies.next().unwrap_or_else(|| Err("no reply".into()));
        match acknowledged(reply, batch.epochs) {
            Ok(epoch_missing) => {
                if epoch_missing {
                    let first = jobs.iter().map(|j| j.1).min().unwrap_or(i64::MAX);
                    pushed.epoch_missing.push((queue, first));
                }
                for (id, seq) in jobs {
                    pushed.ids.push(id);
                    pushed.seqs.push(seq);
                }
            }
            Err(e) => {
                error.get_or_insert(format!("pushing to queue {queue}: {e}"));
            }
        }
    }
    // A job hash that failed to be written is written again with the job's next change; its
    // job is in its list, so it counts as pushed.
    if let Some(Err(e)) = replies.find(Result::is_err) {
        error.get_or_insert(format!("writing a job hash: {e}"));
    }
    pushed.round_trips += client.round_trips() - before;
    (pushed, error)
}

/// A queue group's EXEC replies, [the epoch's old value,] then one LPUSH reply per list: whether
/// the epoch key was missing.
fn acknowledged(reply: Replies, epochs: bool) -> Result<bool, String> {
    let values = reply?;
    match (epochs, values.first()) {
        (false, _) => Ok(false),
        (true, Some(old)) => Ok(matches!(old, redis::Value::Nil)),
        (true, None) => Err("an empty EXEC reply".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_the_list_entry_for_the_next_attempt() {
        let job = Job {
            id: 42,
            queue: "emails".into(),
            priority: Priority::Normal,
            payload: RawValue::from_string(r#"{"to": "a@b.c"}"#.into()).unwrap(),
            attempt_count: 2,
            max_attempts: 5,
            enqueued_at: "2026-11-30T12:00:00.000Z".into(),
            seq: 1,
        };
        assert_eq!(
            message(&job),
            r#"{"id":42,"queue":"emails","priority":"normal","payload":{"to": "a@b.c"},"attempt":3,"max_attempts":5,"enqueued_at":"2026-11-30T12:00:00.000Z"}"#
        );
    }
}
