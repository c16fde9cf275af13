//! Duty: the bridge's own `queue.optimize_memory()`. Every `queue.memory_check_interval` it
//! trims the dead-letter list if Redis is under memory pressure and starts a sweep over the job
//! hashes, which then advances one short slice per poll interval, so that dispatch never waits
//! long behind it. Redis calls and Postgres lookups alternate; neither waits while the other is
//! held.

use super::context::{in_transaction, Context};
use super::report::{Count, Level};
use super::timer::Every;
use crate::lifecycle::unfinished_among;
use crate::redis::upkeep::{evicting_masters, trim_dead_letters, Sweep};
use crate::settings;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How long one slice may spend sweeping.
const SLICE: Duration = Duration::from_millis(10);

pub struct MemoryCheck {
    every: Every,
    slices: Every,
    sweep: Option<Sweep>,
    /// The evicting masters last logged (None: not checked yet).
    evicting: Option<Vec<(String, String)>>,
}

impl Default for MemoryCheck {
    /// The first check is due one interval after the bridge starts.
    fn default() -> MemoryCheck {
        MemoryCheck {
            every: Every::starting_now(),
            slices: Every::default(),
            sweep: None,
            evicting: None,
        }
    }
}

impl MemoryCheck {
    pub fn due(&self, cx: &Context, now: Instant) -> bool {
        cx.redis.connected()
            && match self.sweep {
                Some(_) => self.slices.due(settings::poll_interval(), now),
                None => self.every.due(settings::memory_check_interval(), now),
            }
    }

    pub fn next_run(&self) -> Instant {
        match self.sweep {
            Some(_) => self.slices.next(settings::poll_interval()),
            None => self.every.next(settings::memory_check_interval()),
        }
    }

    /// Starts a check when one is due, and advances the current sweep by one slice.
    pub fn run(&mut self, cx: &mut Context, now: Instant) -> Vec<Count> {
        self.slices.ran(now);
        let mut trimmed = 0;
        let mut sweep = match self.sweep.take() {
            Some(sweep) => sweep,
            None => {
                self.every.ran(now);
                let keys = &cx.keys;
                let Some(n) = cx.redis.run(|client| trim_dead_letters(client, keys)) else {
                    return Vec::new();
                };
                trimmed = n;
                if let Some(evicting) = cx.redis.run(evicting_masters) {
                    self.log_eviction(evicting);
                }
                Sweep::new(keys)
            }
        };
        let mut given_ttl = 0;
        match slice(cx, &mut sweep) {
            Slice::Going => self.sweep = Some(sweep),
            Slice::Done => given_ttl = sweep.report.expired,
            Slice::Failed => {} // the next check starts over
        }
        vec![
            Count::new(
                trimmed as usize,
                Level::Warning,
                "Redis used over 80 % of its maxmemory; trimmed {n} old entries from the dead-letter list (dead jobs stay in queue.dead_letters)",
            ),
            Count::new(
                given_ttl as usize,
                Level::Log,
                "gave {n} finished jobs' Redis hashes their TTL",
            ),
        ]
    }
}

impl MemoryCheck {
    /// One WARNING when a master may evict queue_pg's keys, one LOG when none may any more.
    fn log_eviction(&mut self, evicting: Vec<(String, String)>) {
        if self.evicting.as_ref() == Some(&evicting) {
            return;
        }
        if !evicting.is_empty() {
            let which: Vec<String> = evicting
                .iter()
                .map(|(addr, policy)| format!("{addr} ({policy})"))
                .collect();
            warning!(
                "queue_pg bridge: Redis may evict queue_pg's keys: maxmemory-policy is not noeviction at {}; jobs of an evicted list are dispatched again after queue.start_timeout (late, and some twice) and job hashes and dead letters go missing until they are put back. Set maxmemory-policy noeviction",
                which.join(", ")
            );
        } else if self.evicting.is_some() {
            log!("queue_pg bridge: every Redis master has maxmemory-policy noeviction now");
        }
        self.evicting = Some(evicting);
    }
}

enum Slice {
    Going,
    Done,
    Failed,
}

/// One slice of the sweep, at most `SLICE` long.
fn slice(cx: &mut Context, sweep: &mut Sweep) -> Slice {
    let until = Instant::now() + SLICE;
    while Instant::now() < until {
        let Some(ids) = cx.redis.run(|client| sweep.scan(client)) else {
            return Slice::Failed;
        };
        if !ids.is_empty() {
            let live = in_transaction(|client| unfinished_among(client, &ids));
            let keys = &cx.keys;
            if cx
                .redis
                .run(|client| sweep.expire(client, keys, &ids, &live))
                .is_none()
            {
                return Slice::Failed;
            }
        }
        if sweep.done() {
            return Slice::Done;
        }
    }
    Slice::Going
}
