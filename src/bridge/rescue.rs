//! Duty: jobs that workers popped but never started are dispatched again. Per list, `pushed -
//! LLEN` messages have left it (lists are FIFO), and the bridge remembers, per list, how far it
//! had been popped at each pass ([`PopHistory`]): a job at or below the position popped
//! `queue.start_timeout` ago and still `migrated` was popped at least that long ago and never
//! started (its worker died, or dropped it). No per-job bookkeeping is written. Once per poll
//! interval, while Redis is reachable.

use super::context::{extension_ready, in_transaction, Context};
use super::report::{Count, Level};
use super::timer::Every;
use crate::lifecycle::{Priority, Sql};
use crate::redis::{Client, Group, Keys};
use crate::settings;
use crate::spi_plans::required;
use pgrx::spi::SpiClient;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

// The (queue, priority) lists that hold migrated jobs: a loose index scan, one probe per list,
// however many jobs wait in them.
static MIGRATED_LISTS: Sql = Sql::new(
    "
    WITH RECURSIVE lists AS (
        (SELECT queue_name, priority FROM queue.jobs WHERE status = {migrated}
         ORDER BY queue_name, priority LIMIT 1)
        UNION ALL
        SELECT n.queue_name, n.priority
        FROM lists l, LATERAL (
            SELECT queue_name, priority FROM queue.jobs
            WHERE status = {migrated} AND (queue_name, priority) > (l.queue_name, l.priority)
            ORDER BY queue_name, priority LIMIT 1) n)
    SELECT queue_name, priority FROM lists",
);

// Left their list (positions up to $3) at least start_timeout ago and still not started:
// dispatch again (not an attempt). Skips rows a worker holds: the bridge never waits for a
// worker's transaction (and so is never part of a deadlock); a skipped job waits for a later pass.
static REDISPATCH_UNSTARTED: Sql = Sql::new(
    "
    UPDATE queue.jobs SET status = {queued}, dispatch_seq = NULL, updated_at = now()
    WHERE id IN (SELECT id FROM queue.jobs
                 WHERE status = {migrated} AND queue_name = $1 AND priority = $2
                   AND dispatch_seq <= $3
                 FOR UPDATE SKIP LOCKED)",
);

#[derive(Default)]
pub struct Rescue {
    every: Every,
    pops: PopHistory,
}

impl Rescue {
    pub fn due(&self, cx: &Context, now: Instant) -> bool {
        cx.redis.connected() && self.every.due(settings::poll_interval(), now)
    }

    pub fn next_run(&self) -> Instant {
        self.every.next(settings::poll_interval())
    }

    pub fn run(&mut self, cx: &mut Context, now: Instant) -> Vec<Count> {
        self.every.ran(now);
        let again = self.pass(cx);
        if again > 0 {
            cx.read_from.rewind();
        }
        vec![Count::new(
            again,
            Level::Log,
            "{n} jobs were popped but not started within queue.start_timeout; dispatching them again",
        )]
    }

    fn pass(&mut self, cx: &mut Context) -> usize {
        let lists =
            in_transaction(|client| extension_ready(client).then(|| migrated_lists(client)));
        let Some(lists) = lists.filter(|l| !l.is_empty()) else {
            return 0;
        };
        let keys = &cx.keys;
        let Some(popped) = cx.redis.run(|client| popped_counts(client, keys, &lists)) else {
            return 0;
        };
        let timeout = Duration::from_millis(settings::start_timeout_ms() as u64);
        let due = self.pops.observe(&lists, &popped, timeout);
        in_transaction(|client| redispatch_unstarted(client, &lists, &due))
    }
}

/// The lists that hold migrated jobs.
fn migrated_lists(client: &SpiClient<'_>) -> Vec<(String, Priority)> {
    client
        .select(&*MIGRATED_LISTS, None, &[])
        .map_err(|e| e.to_string())
        .and_then(|rows| {
            rows.map(|r| {
                Ok((
                    required(r.get::<String>(1), "queue_name")?,
                    Priority::parse(&required::<String>(r.get(2), "priority")?)?,
                ))
            })
            .collect()
        })
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: listing migrated jobs failed: {e}"))
}

/// For each list, how many of its messages have left it (`pushed - LLEN`), in one round trip
/// per node.
fn popped_counts(
    client: &mut Client,
    keys: &Keys,
    lists: &[(String, Priority)],
) -> Result<Vec<i64>, String> {
    let groups = lists
        .iter()
        .map(|(queue, priority)| {
            let mut g = Group::on_key(keys.list(queue, *priority));
            g.cmd("GET").arg(keys.pushed_counter(queue, *priority));
            g.cmd("LLEN").arg(keys.list(queue, *priority));
            g
        })
        .collect();
    client
        .run_all(groups)?
        .into_iter()
        .map(|replies| {
            let (pushed, len): (Option<i64>, i64) =
                redis::from_redis_value(redis::Value::Array(replies)).map_err(|e| e.to_string())?;
            Ok(pushed.unwrap_or(0) - len)
        })
        .collect()
}

/// Per list, how far it had been popped (`pushed - LLEN`) at each tick, for `start_timeout`.
#[derive(Default)]
pub struct PopHistory {
    lists: HashMap<(String, Priority), VecDeque<(Instant, i64)>>,
}

impl PopHistory {
    /// Records this tick's observation and returns, per list, the position popped at least
    /// `timeout` ago (0 when there is no observation that old yet).
    pub fn observe(
        &mut self,
        lists: &[(String, Priority)],
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
fn redispatch_unstarted(
    client: &mut SpiClient<'_>,
    lists: &[(String, Priority)],
    due: &[i64],
) -> usize {
    let mut again = 0;
    for ((queue, priority), &upto) in lists.iter().zip(due) {
        if upto <= 0 {
            continue;
        }
        let args = [queue.as_str().into(), priority.as_str().into(), upto.into()];
        again += client
            .update(&*REDISPATCH_UNSTARTED, None, &args)
            .map(|t| t.len())
            .unwrap_or_else(|e| {
                pgrx::error!("queue_pg bridge: re-dispatching unstarted jobs failed: {e}")
            });
    }
    again
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Vec<(String, Priority)> {
        vec![("emails".into(), Priority::Normal)]
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
