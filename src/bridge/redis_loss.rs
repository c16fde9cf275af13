//! Duty: notice that Redis lost its data (restarted without persistence, FLUSHALL, a failover to
//! an empty replica, one master of a cluster coming back empty): an epoch key the bridge set is
//! gone. Then every job that was in the lost part and that no worker started goes back to
//! `queued`, and dispatch pushes it again. Checked on every new connection, before any other
//! duty uses it, and once per poll interval.
//!
//! One server has one epoch key, `queue_pg:bridge:epoch`. A cluster loses data per master, so
//! there each queue has its own, `queue_pg:{<queue>}:epoch`, in the queue's slot: it moves with
//! the slot when the cluster is resharded and is lost exactly when the queue's lists are. Every
//! push to a queue also sets it, in the push's MULTI (`push`), so a loss is noticed at the first
//! push after it even before this check runs. Either way the rest of what Redis held is put
//! back by `restore`.

use super::context::{extension_ready, in_transaction, Context};
use super::report::{Count, Level};
use super::timer::Every;
use crate::lifecycle::{queues_in_state, Sql};
use crate::redis::{Client, Group, Keys};
use crate::settings;
use crate::spi_plans::types::{INT8_ARRAY, TEXT};
use crate::spi_plans::{self, required};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::time::Instant;

// Skips rows a worker holds: the bridge never waits for a worker's transaction (and so is never
// part of a deadlock); a skipped job is handled on a later pass.
static REQUEUE_ALL_MIGRATED: Sql = Sql::new(
    "
    UPDATE queue.jobs SET status = {queued}, dispatch_seq = NULL, updated_at = now()
    WHERE id IN (SELECT id FROM queue.jobs WHERE status = {migrated} FOR UPDATE SKIP LOCKED)",
);

// One queue's migrated jobs, except those of `$2` (just pushed, so in Redis).
static REQUEUE_QUEUE_MIGRATED: Sql = Sql::new(
    "
    UPDATE queue.jobs SET status = {queued}, dispatch_seq = NULL, updated_at = now()
    WHERE id IN (SELECT id FROM queue.jobs
                 WHERE status = {migrated} AND queue_name = $1 AND id <> ALL($2)
                 FOR UPDATE SKIP LOCKED)",
);

static MIGRATED_QUEUES: Sql = Sql::new(concat!(
    "WITH RECURSIVE ",
    queues_in_state!("{migrated}"),
    " SELECT queue_name FROM names WHERE queue_name IS NOT NULL"
));

#[derive(Default)]
pub struct RedisLoss {
    every: Every,
}

impl RedisLoss {
    pub fn due(&self, cx: &Context, now: Instant) -> bool {
        cx.redis.connected() && (cx.redis.fresh() || self.every.due(settings::poll_interval(), now))
    }

    pub fn next_run(&self) -> Instant {
        self.every.next(settings::poll_interval())
    }

    pub fn run(&mut self, cx: &mut Context, now: Instant) -> Vec<Count> {
        self.every.ran(now);
        let keys = &cx.keys;
        let cluster = cx.redis.run(|client| Ok(client.is_cluster()));
        let lost = match cluster {
            Some(false) => cx
                .redis
                .run(|client| epoch_was_missing(client, keys))
                .map(|missing| missing.then_some(Lost::All)),
            Some(true) => {
                let queues = in_transaction(|client| {
                    extension_ready(client).then(|| migrated_queues(client))
                });
                let queues = queues.unwrap_or_default();
                cx.redis
                    .run(|client| queue_epochs_missing(client, keys, &queues))
                    .map(|lost| (!lost.is_empty()).then_some(Lost::Queues(lost)))
            }
            None => None,
        };
        // This connection has been checked (or has failed and is gone).
        cx.redis.take_fresh();
        let lost = lost.flatten();
        cx.restore_wanted |= lost.is_some();
        let requeued = match lost {
            None => 0,
            Some(lost) => in_transaction(|client| {
                if !extension_ready(client) {
                    return 0;
                }
                match &lost {
                    Lost::All => requeue_all_migrated(client),
                    Lost::Queues(queues) => queues
                        .iter()
                        .map(|q| requeue_lost_queue(client, q, &[]))
                        .sum(),
                }
            }),
        };
        if requeued > 0 {
            cx.read_from.rewind();
        }
        vec![Count::new(
            requeued,
            Level::Warning,
            "Redis lost its data; dispatching {n} jobs again",
        )]
    }
}

enum Lost {
    All,
    Queues(Vec<String>),
}

/// The value the bridge gives an epoch key: who set it, and when.
pub fn epoch_token() -> String {
    format!(
        "{}-{}",
        unsafe { pg_sys::MyProcPid },
        crate::redis::iso_utc(std::time::SystemTime::now())
    )
}

/// Sets the epoch key if it is missing; true if it was missing (Redis is new or lost its data).
fn epoch_was_missing(client: &mut Client, keys: &Keys) -> Result<bool, String> {
    let mut cmd = redis::cmd("SET");
    cmd.arg(keys.epoch()).arg(epoch_token()).arg("NX");
    let set: Option<String> = client.query(&keys.epoch(), cmd)?;
    Ok(set.is_some())
}

/// Sets each queue's epoch key where it is missing (one round trip per master); returns those
/// queues.
fn queue_epochs_missing(
    client: &mut Client,
    keys: &Keys,
    queues: &[String],
) -> Result<Vec<String>, String> {
    let token = epoch_token();
    let groups = queues
        .iter()
        .map(|q| {
            let mut g = Group::on_key(keys.queue_epoch(q));
            g.cmd("SET").arg(keys.queue_epoch(q)).arg(&token).arg("NX");
            g
        })
        .collect();
    let replies = client.run_all(groups)?;
    Ok(queues
        .iter()
        .zip(replies)
        .filter(|(_, r)| !matches!(r.first(), Some(redis::Value::Nil)))
        .map(|(q, _)| q.clone())
        .collect())
}

/// The queues that have migrated jobs: a loose index scan, one probe per queue.
fn migrated_queues(client: &mut SpiClient<'_>) -> Vec<String> {
    client
        .select(&*MIGRATED_QUEUES, None, &[])
        .map_err(|e| e.to_string())
        .and_then(|rows| {
            rows.map(|r| required::<String>(r.get(1), "queue_name"))
                .collect()
        })
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: listing migrated queues failed: {e}"))
}

/// Every job Redis had and no worker started goes back to `queued`. Returns how many.
fn requeue_all_migrated(client: &mut SpiClient<'_>) -> usize {
    client
        .update(&*REQUEUE_ALL_MIGRATED, None, &[])
        .map(|t| t.len())
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: re-queueing migrated jobs failed: {e}"))
}

/// A queue's data was lost: its migrated jobs, except `pushed` (in Redis since the loss), go
/// back to `queued`. Runs inside the caller's transaction; returns how many.
pub fn requeue_lost_queue(client: &mut SpiClient<'_>, queue: &str, pushed: &[i64]) -> usize {
    let args = [queue.into(), pushed.to_vec().into()];
    spi_plans::update(
        client,
        &REQUEUE_QUEUE_MIGRATED,
        &[TEXT, INT8_ARRAY],
        None,
        &args,
    )
    .map(|t| t.len())
    .unwrap_or_else(|e| {
        pgrx::error!("queue_pg bridge: re-queueing the jobs of queue {queue} failed: {e}")
    })
}
