//! Dispatch and restore hold back while Redis has no room. Jobs wait safely in Postgres; pushing
//! more into a full Redis only makes it refuse writes (`noeviction`: workers' reports too) or
//! evict keys (an eviction policy: whole ready lists, whose jobs must then be dispatched again).
//!
//! Room means, with `noeviction`, memory below [`HOLD_AT`] of `maxmemory` on every master. Under
//! an eviction policy Redis stays full of keys it may evict (job hashes of finished jobs), so
//! there what counts is what the ready lists hold: they may fill [`LISTS_AT`] of the masters'
//! `maxmemory` (added up in a cluster: lists crowded on one master may still make it evict, which
//! costs a second push, never a job), the rest being left to everything else. A Redis filled by
//! lists nobody pops holds every queue back: the lists are what Redis is full of.
//!
//! The gate looks, then lets through about half of the room it found before it looks again, so
//! a fast drain cannot overshoot between two looks; with no `maxmemory` set it looks once a
//! second.

use super::context::{extension_ready, in_transaction};
use super::episode::Episode;
use super::list_tails;
use super::push::Job;
use super::redis_link::RedisLink;
use crate::lifecycle::Priority;
use crate::redis::upkeep::{self, MasterMemory};
use crate::redis::{Client, Group, Keys};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// With `noeviction`: the share of a master's `maxmemory` above which nothing more is pushed.
pub const HOLD_AT: f64 = 0.9;
/// Under an eviction policy: the share of `maxmemory` the ready lists may fill.
pub const LISTS_AT: f64 = 0.5;
/// How often the gate looks while a limit is set (or it holds back), and while none is.
pub const RECHECK: Duration = Duration::from_millis(100);
const RECHECK_UNLIMITED: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct MemoryGate {
    checked_at: Option<Instant>,
    /// Bytes that may still be pushed before the next look (None: no master has a limit).
    budget: Option<i64>,
    held: bool,
    /// The queues pushed to, whose lists count under an eviction policy.
    queues: BTreeSet<String>,
    /// About how many bytes one pushed job takes (its message and hash), from what was pushed.
    job_bytes: Option<i64>,
    /// `queues` holds the queues with jobs in Redis from before this bridge started, too.
    seeded: bool,
    episode: Episode,
}

/// Bytes of room left: on the fullest master (`noeviction`), or for the ready lists, given
/// `listed` (jobs waiting in them and what each takes; an eviction policy). None when no master
/// has a `maxmemory`.
fn room(masters: &[MasterMemory], listed: Option<(i64, i64)>) -> Option<i64> {
    let limited = masters.iter().filter(|m| m.max > 0);
    if masters.iter().any(|m| m.max > 0 && m.evicting()) {
        let capacity: i64 = limited.map(|m| m.max).sum();
        let (jobs, each) = listed.unwrap_or((0, 0));
        return Some((capacity as f64 * LISTS_AT) as i64 - jobs * each);
    }
    limited
        .map(|m| (m.max as f64 * HOLD_AT) as i64 - m.used)
        .min()
}

impl MemoryGate {
    /// Whether another batch may be pushed now (call it with no reply pending on the link).
    /// Returns a line to log when it starts holding back (once per episode).
    pub fn allows(
        &mut self,
        redis: &mut RedisLink,
        keys: &Keys,
        now: Instant,
    ) -> (bool, Option<String>) {
        let every = if self.budget.is_some() {
            RECHECK
        } else {
            RECHECK_UNLIMITED
        };
        let stale = self
            .checked_at
            .is_none_or(|at| now.duration_since(at) >= every);
        let spent = self.budget.is_some_and(|b| b <= 0);
        if !(stale || (spent && !self.held)) {
            return (!self.held, None);
        }
        // A failed look lets dispatch go on: its own push fails then, and the link backs off.
        let Some(masters) = redis.run(upkeep::memory_per_master) else {
            return (true, None);
        };
        let listed = if masters.iter().any(|m| m.max > 0 && m.evicting()) {
            if !self.seeded {
                self.seed();
            }
            let queues = &self.queues;
            let Some(jobs) = redis.run(|client| listed_jobs(client, keys, queues)) else {
                return (true, None);
            };
            Some((jobs, self.job_bytes.unwrap_or(OVERHEAD)))
        } else {
            None
        };
        self.checked_at = Some(now);
        let room = room(&masters, listed);
        let was_held = self.held;
        self.held = room.is_some_and(|r| r <= 0);
        self.budget = room.map(|r| r / 2);
        let mut say = None;
        // Every look that holds back is part of the episode, so it ends a minute after the last.
        if self.held && self.episode.occurred(now, 0) && !was_held {
            say = Some(
                "Redis has no room for more jobs (see the memory figures of queue.health()); jobs wait in Postgres until workers take what Redis holds"
                    .to_string(),
            );
        }
        (!self.held, say)
    }

    /// A batch was pushed.
    pub fn pushed(&mut self, batch: &[Job]) {
        if batch.is_empty() {
            return;
        }
        let bytes: i64 = batch
            .iter()
            .map(|j| j.payload.get().len() as i64)
            .sum::<i64>()
            + batch.len() as i64 * OVERHEAD;
        self.spent(bytes);
        self.job_bytes = Some(bytes / batch.len() as i64);
        for job in batch {
            if !self.queues.contains(&job.queue) {
                self.queues.insert(job.queue.clone());
            }
        }
    }

    /// About `bytes` went into Redis.
    pub fn spent(&mut self, bytes: i64) {
        if let Some(b) = &mut self.budget {
            *b -= bytes;
        }
    }

    /// Whether it held back at its last look.
    pub fn holding(&self) -> bool {
        self.held
    }

    /// The end of an episode of holding back, a minute after it last held back.
    pub fn episode_over(&mut self, now: Instant) -> Option<String> {
        if self.held {
            return None;
        }
        let totals = self.episode.end_if_quiet(now)?;
        Some(format!(
            "Redis has had room for a minute; dispatch held back at times over {} s before",
            totals.last.duration_since(totals.since).as_secs()
        ))
    }

    /// The queues with jobs in Redis already (this bridge pushed nothing yet, or little).
    fn seed(&mut self) {
        let lists = in_transaction(|client| {
            extension_ready(client).then(|| list_tails::migrated_lists(client, None))
        });
        if let Some(lists) = lists {
            self.queues.extend(lists.into_iter().map(|(q, _)| q));
            self.seeded = true;
        }
    }
}

/// Bytes a pushed job takes besides its payload: the rest of its message, its hash, and Redis's
/// bookkeeping of both.
const OVERHEAD: i64 = 400;

/// How many messages the ready lists of `queues` hold (one round trip per node).
fn listed_jobs(client: &mut Client, keys: &Keys, queues: &BTreeSet<String>) -> Result<i64, String> {
    let groups = queues
        .iter()
        .map(|q| {
            let mut g = Group::on_key(keys.list(q, Priority::Normal));
            for p in Priority::ALL {
                g.cmd("LLEN").arg(keys.list(q, p));
            }
            g
        })
        .collect();
    let mut total = 0;
    for replies in client.run_all(groups)? {
        for reply in replies {
            total += redis::from_redis_value::<i64>(reply).map_err(|e| e.to_string())?;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(used: i64, max: i64, evicting: bool) -> MasterMemory {
        MasterMemory {
            addr: "127.0.0.1:6379".into(),
            used,
            max,
            policy: if evicting {
                "allkeys-lru"
            } else {
                "noeviction"
            }
            .into(),
        }
    }

    #[test]
    fn without_eviction_the_fullest_master_decides() {
        assert_eq!(room(&[], None), None);
        assert_eq!(room(&[m(5_000, 0, false)], None), None, "no limit");
        assert_eq!(
            room(&[m(500, 1000, false), m(0, 0, false)], None),
            Some(400)
        );
        assert_eq!(
            room(&[m(500, 1000, false), m(950, 1000, false)], None),
            Some(-50)
        );
    }

    #[test]
    fn under_eviction_what_the_lists_hold_decides() {
        // Redis is full of keys it may evict; the lists hold 100 jobs of 1 kB.
        let full = [m(4_000_000, 4_000_000, true)];
        assert_eq!(room(&full, Some((100, 1000))), Some(1_900_000));
        assert_eq!(room(&full, Some((2_000, 1000))), Some(0));
        assert!(room(&full, Some((3_000, 1000))).unwrap() < 0);
        // A cluster's lists may fill half of all its masters.
        let cluster = [m(4_000_000, 4_000_000, true), m(1, 2_000_000, true)];
        assert_eq!(room(&cluster, Some((2_000, 1000))), Some(1_000_000));
    }
}
