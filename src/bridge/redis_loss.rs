//! Duty: notice that Redis lost its data (restarted without persistence, FLUSHALL, a failover to
//! an empty replica): the epoch key the bridge set is gone. Then every job that was in Redis and
//! that no worker started goes back to `queued`, and dispatch pushes it again. Checked on every
//! new connection, before any other duty uses it, and once per poll interval.

use super::context::{extension_ready, in_transaction, Context};
use super::report::{Count, Level};
use super::timer::Every;
use crate::lifecycle::Sql;
use crate::redis::{Conn, Keys};
use crate::settings;
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
        let missing = cx.redis.run(|con| epoch_was_missing(con, keys));
        // This connection has been checked (or has failed and is gone).
        cx.redis.take_fresh();
        let mut requeued = 0;
        if missing == Some(true) {
            let n = in_transaction(|client| {
                extension_ready(client).then(|| requeue_all_migrated(client))
            });
            if let Some(n) = n {
                requeued = n;
            }
            if requeued > 0 {
                cx.read_from.rewind();
            }
        }
        vec![Count::new(
            requeued,
            Level::Warning,
            "Redis lost its data; dispatching {n} jobs again",
        )]
    }
}

/// Sets the epoch key if it is missing; true if it was missing (Redis is new or lost its data).
fn epoch_was_missing(con: &mut Conn, keys: &Keys) -> Result<bool, String> {
    let token = format!(
        "{}-{}",
        unsafe { pg_sys::MyProcPid },
        crate::redis::iso_utc(std::time::SystemTime::now())
    );
    let set: Option<String> = redis::cmd("SET")
        .arg(keys.epoch())
        .arg(token)
        .arg("NX")
        .query(con)
        .map_err(|e| e.to_string())?;
    Ok(set.is_some())
}

/// Every job Redis had and no worker started goes back to `queued`. Returns how many.
fn requeue_all_migrated(client: &mut SpiClient<'_>) -> usize {
    client
        .update(&*REQUEUE_ALL_MIGRATED, None, &[])
        .map(|t| t.len())
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: re-queueing migrated jobs failed: {e}"))
}
