//! Nothing is lost: once per poll interval the bridge
//! - notices that Redis lost its data (its epoch key is gone) and dispatches again every job
//!   that was in Redis and not started;
//! - notices which jobs workers popped but never started (per list, `pushed - LLEN` messages
//!   have left it, since lists are FIFO) and dispatches them again after `queue.start_timeout`;
//! - fails running jobs whose lease expired ("lease expired"), by the backoff rule;
//! - prunes completed jobs older than `queue.completed_retention`, in bounded batches.

use crate::api::finish::fail_running_job;
use crate::redis::Keys;
use crate::settings;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

// Every statement that changes jobs workers may be changing too skips locked rows: the bridge
// never waits for a worker's transaction (and so is never part of a deadlock); a skipped job is
// handled on a later tick.
const REQUEUE_ALL_MIGRATED: &str = "
    UPDATE queue.jobs SET status = 'queued', dispatch_seq = NULL, popped_at = NULL, updated_at = now()
    WHERE id IN (SELECT id FROM queue.jobs WHERE status = 'migrated' FOR UPDATE SKIP LOCKED)";

const MIGRATED_LISTS: &str = "
    SELECT DISTINCT queue_name, priority FROM queue.jobs WHERE status = 'migrated'";

// Jobs at or below position $3 of their list have left it: note when that was first seen.
const NOTE_POPPED: &str = "
    UPDATE queue.jobs SET popped_at = now()
    WHERE id IN (SELECT id FROM queue.jobs
                 WHERE status = 'migrated' AND queue_name = $1 AND priority = $2
                   AND dispatch_seq <= $3 AND popped_at IS NULL
                 FOR UPDATE SKIP LOCKED)";

// Popped longer than start_timeout ago and still not started: dispatch again (not an attempt).
const REDISPATCH_UNSTARTED: &str = "
    UPDATE queue.jobs SET status = 'queued', dispatch_seq = NULL, popped_at = NULL, updated_at = now()
    WHERE id IN (SELECT id FROM queue.jobs
                 WHERE status = 'migrated' AND queue_name = $1 AND priority = $2
                   AND dispatch_seq <= $3 AND popped_at < now() - $4 * interval '1 millisecond'
                 FOR UPDATE SKIP LOCKED)";

const EXPIRED_LEASES: &str = "
    SELECT id FROM queue.jobs
    WHERE status = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT 500
    FOR UPDATE SKIP LOCKED";

const PRUNE_COMPLETED: &str = "
    DELETE FROM queue.jobs WHERE id IN (
        SELECT id FROM queue.jobs
        WHERE status = 'completed' AND completed_at < now() - $1 * interval '1 second'
        ORDER BY completed_at
        LIMIT 5000)";

/// Sets the epoch key if it is missing; true if it was missing (Redis is new or lost its data).
pub fn epoch_was_missing(con: &mut redis::Connection, keys: &Keys) -> Result<bool, String> {
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
pub fn requeue_all_migrated(client: &mut SpiClient<'_>) -> usize {
    client
        .update(REQUEUE_ALL_MIGRATED, None, &[])
        .map(|t| t.len())
        .unwrap_or_else(|e| panic!("queue_pg bridge: re-queueing migrated jobs failed: {e}"))
}

/// The lists that hold migrated jobs.
pub fn migrated_lists(client: &SpiClient<'_>) -> Vec<(String, String)> {
    client
        .select(MIGRATED_LISTS, None, &[])
        .map(|rows| {
            rows.filter_map(|r| Some((r.get::<String>(1).ok()??, r.get::<String>(2).ok()??)))
                .collect()
        })
        .unwrap_or_else(|e| panic!("queue_pg bridge: listing migrated jobs failed: {e}"))
}

/// For each list, how many of its messages have left it (`pushed - LLEN`), in one round trip.
pub fn popped_counts(
    con: &mut redis::Connection,
    keys: &Keys,
    lists: &[(String, String)],
) -> Result<Vec<i64>, String> {
    let mut pipe = redis::pipe();
    for (queue, priority) in lists {
        pipe.cmd("GET").arg(keys.pushed_counter(queue, priority));
        pipe.cmd("LLEN").arg(keys.list(queue, priority));
    }
    let replies: Vec<(Option<i64>, i64)> = pipe.query(con).map_err(|e| e.to_string())?;
    Ok(replies
        .into_iter()
        .map(|(pushed, len)| pushed.unwrap_or(0) - len)
        .collect())
}

/// Notes newly popped jobs and dispatches again those popped longer than start_timeout ago.
/// Returns how many were dispatched again.
pub fn redispatch_unstarted(
    client: &mut SpiClient<'_>,
    lists: &[(String, String)],
    popped: &[i64],
) -> usize {
    let timeout_ms = settings::start_timeout_ms();
    let mut again = 0;
    for ((queue, priority), &upto) in lists.iter().zip(popped) {
        if upto <= 0 {
            continue;
        }
        let list = [queue.as_str().into(), priority.as_str().into(), upto.into()];
        client
            .update(NOTE_POPPED, None, &list)
            .unwrap_or_else(|e| panic!("queue_pg bridge: noting popped jobs failed: {e}"));
        let args = [
            queue.as_str().into(),
            priority.as_str().into(),
            upto.into(),
            timeout_ms.into(),
        ];
        again += client
            .update(REDISPATCH_UNSTARTED, None, &args)
            .map(|t| t.len())
            .unwrap_or_else(|e| {
                panic!("queue_pg bridge: re-dispatching unstarted jobs failed: {e}")
            });
    }
    again
}

/// Fails running jobs whose lease expired, by the backoff rule. Returns how many.
pub fn expire_leases(client: &mut SpiClient<'_>) -> usize {
    let ids: Vec<i64> = client
        .update(EXPIRED_LEASES, None, &[])
        .map(|rows| {
            rows.filter_map(|r| r.get::<i64>(1).ok().flatten())
                .collect()
        })
        .unwrap_or_else(|e| panic!("queue_pg bridge: finding expired leases failed: {e}"));
    for &id in &ids {
        fail_running_job(client, id, "lease expired", None);
    }
    ids.len()
}

/// Deletes one bounded batch of old completed jobs. Returns how many.
pub fn prune_completed(client: &mut SpiClient<'_>) -> usize {
    client
        .update(
            PRUNE_COMPLETED,
            None,
            &[settings::completed_retention_s().into()],
        )
        .map(|t| t.len())
        .unwrap_or_else(|e| panic!("queue_pg bridge: pruning completed jobs failed: {e}"))
}
