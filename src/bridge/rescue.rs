//! Nothing is lost: once per poll interval the bridge
//! - notices that Redis lost its data (its epoch key is gone) and dispatches again every job
//!   that was in Redis and not started;
//! - notices which jobs workers popped but never started (per list, `pushed - LLEN` messages
//!   have left it, since lists are FIFO) and dispatches them again after `queue.start_timeout`.
//!   The bridge remembers, per list, how far it had been popped at each tick ([`PopHistory`]):
//!   a job at or below the position popped `start_timeout` ago and still `migrated` was popped
//!   at least that long ago and never started. No per-job bookkeeping is written;
//! - fails running jobs whose lease expired ("lease expired"), by the backoff rule;
//! - prunes completed jobs older than `queue.completed_retention`, in bounded batches.

use crate::api::finish::fail_running_job;
use crate::redis::{Conn, Keys};
use crate::settings;
use crate::spi_plans::required;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

// Every statement that changes jobs workers may be changing too skips locked rows: the bridge
// never waits for a worker's transaction (and so is never part of a deadlock); a skipped job is
// handled on a later tick.
const REQUEUE_ALL_MIGRATED: &str = "
    UPDATE queue.jobs SET status = 'queued', dispatch_seq = NULL, updated_at = now()
    WHERE id IN (SELECT id FROM queue.jobs WHERE status = 'migrated' FOR UPDATE SKIP LOCKED)";

// The (queue, priority) lists that hold migrated jobs: a loose index scan, one probe per list,
// however many jobs wait in them.
const MIGRATED_LISTS: &str = "
    WITH RECURSIVE lists AS (
        (SELECT queue_name, priority FROM queue.jobs WHERE status = 'migrated'
         ORDER BY queue_name, priority LIMIT 1)
        UNION ALL
        SELECT n.queue_name, n.priority
        FROM lists l, LATERAL (
            SELECT queue_name, priority FROM queue.jobs
            WHERE status = 'migrated' AND (queue_name, priority) > (l.queue_name, l.priority)
            ORDER BY queue_name, priority LIMIT 1) n)
    SELECT queue_name, priority FROM lists";

// Left their list (positions up to $3) at least start_timeout ago and still not started:
// dispatch again (not an attempt).
const REDISPATCH_UNSTARTED: &str = "
    UPDATE queue.jobs SET status = 'queued', dispatch_seq = NULL, updated_at = now()
    WHERE id IN (SELECT id FROM queue.jobs
                 WHERE status = 'migrated' AND queue_name = $1 AND priority = $2
                   AND dispatch_seq <= $3
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
pub fn epoch_was_missing(con: &mut Conn, keys: &Keys) -> Result<bool, String> {
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
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: re-queueing migrated jobs failed: {e}"))
}

/// The lists that hold migrated jobs.
pub fn migrated_lists(client: &SpiClient<'_>) -> Vec<(String, String)> {
    client
        .select(MIGRATED_LISTS, None, &[])
        .map_err(|e| e.to_string())
        .and_then(|rows| {
            rows.map(|r| {
                Ok((
                    required(r.get::<String>(1), "queue_name")?,
                    required(r.get::<String>(2), "priority")?,
                ))
            })
            .collect()
        })
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: listing migrated jobs failed: {e}"))
}

/// For each list, how many of its messages have left it (`pushed - LLEN`), in one round trip.
pub fn popped_counts(
    con: &mut Conn,
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

/// Per list, how far it had been popped (`pushed - LLEN`) at each tick, for `start_timeout`.
#[derive(Default)]
pub struct PopHistory {
    lists: HashMap<(String, String), VecDeque<(Instant, i64)>>,
}

impl PopHistory {
    /// Records this tick's observation and returns, per list, the position popped at least
    /// `timeout` ago (0 when there is no observation that old yet).
    pub fn observe(
        &mut self,
        lists: &[(String, String)],
        popped: &[i64],
        timeout: Duration,
    ) -> Vec<i64> {
        let now = Instant::now();
        let mut due = Vec::with_capacity(lists.len());
        for (list, &upto) in lists.iter().zip(popped) {
            let seen = self.lists.entry(list.clone()).or_default();
            // A counter that went back (Redis lost its data) starts a new history.
            if seen.back().is_some_and(|&(_, last)| upto < last) {
                seen.clear();
            }
            seen.push_back((now, upto));
            // Keep the newest observation that is at least `timeout` old, and everything newer.
            while seen.len() > 1 && now.duration_since(seen[1].0) >= timeout {
                seen.pop_front();
            }
            due.push(match seen.front() {
                Some(&(at, upto)) if now.duration_since(at) >= timeout => upto,
                _ => 0,
            });
        }
        due
    }
}

/// Dispatches again the jobs at or below `due` of each list that are still `migrated`.
/// Returns how many.
pub fn redispatch_unstarted(
    client: &mut SpiClient<'_>,
    lists: &[(String, String)],
    due: &[i64],
) -> usize {
    let mut again = 0;
    for ((queue, priority), &upto) in lists.iter().zip(due) {
        if upto <= 0 {
            continue;
        }
        let args = [queue.as_str().into(), priority.as_str().into(), upto.into()];
        again += client
            .update(REDISPATCH_UNSTARTED, None, &args)
            .map(|t| t.len())
            .unwrap_or_else(|e| {
                pgrx::error!("queue_pg bridge: re-dispatching unstarted jobs failed: {e}")
            });
    }
    again
}

/// Fails running jobs whose lease expired, by the backoff rule. Returns how many.
pub fn expire_leases(client: &mut SpiClient<'_>) -> usize {
    let ids: Vec<i64> = client
        .update(EXPIRED_LEASES, None, &[])
        .map_err(|e| e.to_string())
        .and_then(|rows| rows.map(|r| required(r.get::<i64>(1), "id")).collect())
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: finding expired leases failed: {e}"));
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
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: pruning completed jobs failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Vec<(String, String)> {
        vec![("emails".into(), "normal".into())]
    }

    #[test]
    fn nothing_is_due_before_the_timeout() {
        let mut h = PopHistory::default();
        let t = Duration::from_secs(3600);
        assert_eq!(h.observe(&list(), &[5], t), vec![0]);
        assert_eq!(h.observe(&list(), &[9], t), vec![0]);
    }

    #[test]
    fn a_position_popped_longer_ago_than_the_timeout_is_due() {
        let mut h = PopHistory::default();
        let t = Duration::from_millis(30);
        h.observe(&list(), &[5], t);
        std::thread::sleep(Duration::from_millis(40));
        // Popped up to 5 at least 30 ms ago; 9 only now.
        assert_eq!(h.observe(&list(), &[9], t), vec![5]);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(h.observe(&list(), &[9], t), vec![9]);
    }

    #[test]
    fn a_counter_that_went_back_starts_a_new_history() {
        let mut h = PopHistory::default();
        let t = Duration::from_millis(20);
        h.observe(&list(), &[50], t);
        std::thread::sleep(Duration::from_millis(30));
        // Redis lost its data: the counter restarted at 2. Old positions mean nothing now.
        assert_eq!(h.observe(&list(), &[2], t), vec![0]);
    }
}
