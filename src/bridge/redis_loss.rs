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
use crate::redis::{Client, Group};
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

    /// Looks for epoch keys that are gone, dispatches again what they stood for, and only then
    /// sets them again: a bridge that dies in between finds them gone once more (and dispatches
    /// again, which `start` and the attempt token make harmless), never a loss forgotten.
    pub fn run(&mut self, cx: &mut Context, now: Instant) -> Vec<Count> {
        self.every.ran(now);
        let keys = &cx.keys;
        // The epoch keys to look at: one server's one, or per queue with migrated jobs (none
        // while the extension is not installed). `due` made sure a connection is open.
        let epochs: Vec<(String, Option<String>)> = if !cx.redis.is_cluster() {
            vec![(keys.epoch(), None)]
        } else {
            in_transaction(|client| extension_ready(client).then(|| migrated_queues(client)))
                .into_iter()
                .flatten()
                .map(|q| (keys.queue_epoch(&q), Some(q)))
                .collect()
        };
        // Queues whose keys could be read count even if others' could not (their master is
        // down): the link fails, and the rest is looked at on its next connection.
        let missing = if epochs.is_empty() {
            None
        } else {
            cx.redis
                .run_partial(|client| missing_epochs(client, &epochs))
        };
        // This connection has been checked (or has failed and is gone).
        cx.redis.take_fresh();
        let Some(missing) = missing.filter(|m| !m.is_empty()) else {
            return Vec::new();
        };
        cx.restore_wanted = true;
        let requeued = in_transaction(|client| {
            if !extension_ready(client) {
                return 0;
            }
            missing
                .iter()
                .map(|(_, queue)| match queue {
                    None => requeue_all_migrated(client),
                    Some(q) => requeue_lost_queue(client, q, &[]),
                })
                .sum()
        });
        if requeued > 0 {
            cx.read_from.rewind();
        }
        cx.redis.run(|client| set_epochs(client, &missing));
        vec![Count::new(
            requeued,
            Level::Warning,
            "Redis lost its data; dispatching {n} jobs again",
        )]
    }
}

/// The value the bridge gives an epoch key: who set it, and when.
pub fn epoch_token() -> String {
    format!(
        "{}-{}",
        unsafe { pg_sys::MyProcPid },
        crate::redis::iso_utc(std::time::SystemTime::now())
    )
}

/// Which of the epoch keys are gone (one round trip per master), and the first error.
fn missing_epochs(
    client: &mut Client,
    epochs: &[(String, Option<String>)],
) -> (Vec<(String, Option<String>)>, Option<String>) {
    let groups = epochs
        .iter()
        .map(|(key, _)| {
            let mut g = Group::on_key(key.clone());
            g.cmd("EXISTS").arg(key);
            g
        })
        .collect();
    let mut error = None;
    let mut missing = Vec::new();
    for (epoch, reply) in epochs.iter().zip(client.run(groups)) {
        match reply {
            Ok(values) if matches!(values.first(), Some(redis::Value::Int(0))) => {
                missing.push(epoch.clone())
            }
            Ok(_) => {}
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    (missing, error)
}

/// Sets the epoch keys again (`SET NX`: a push may have set one meanwhile).
fn set_epochs(client: &mut Client, epochs: &[(String, Option<String>)]) -> Result<(), String> {
    let token = epoch_token();
    let groups = epochs
        .iter()
        .map(|(key, _)| {
            let mut g = Group::on_key(key.clone());
            g.cmd("SET").arg(key).arg(&token).arg("NX");
            g
        })
        .collect();
    client.run_all(groups).map(|_| ())
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
