//! The bridge's periodic `queue.optimize_memory()`: every `queue.memory_check_interval` it trims
//! the dead-letter list if Redis is under memory pressure and starts a sweep over the job hashes,
//! which then advances a slice per maintenance pass so that dispatch never waits long behind it.
//! Redis calls and Postgres lookups alternate; neither waits while the other is held.

use super::redis_link::RedisLink;
use super::worker::in_transaction;
use crate::monitor::memory::{self, Sweep};
use crate::redis::Keys;
use crate::settings;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How long one maintenance pass may spend sweeping.
const SLICE: Duration = Duration::from_millis(10);

pub struct MemoryTask {
    last_check: Instant,
    sweep: Option<Sweep>,
}

impl Default for MemoryTask {
    /// The first check is due one interval after the bridge starts.
    fn default() -> Self {
        MemoryTask {
            last_check: Instant::now(),
            sweep: None,
        }
    }
}

impl MemoryTask {
    /// Starts a check when one is due, and advances the current sweep by one slice.
    pub fn run_slice(&mut self, redis: &mut RedisLink, keys: &Keys) {
        let mut sweep = match self.sweep.take() {
            Some(sweep) => sweep,
            None if self.last_check.elapsed() >= settings::memory_check_interval() => {
                self.last_check = Instant::now();
                let Some(trimmed) = redis.run(|con| memory::trim_dead_letters(con, keys)) else {
                    return;
                };
                if trimmed > 0 {
                    warning!("queue_pg bridge: Redis used over 80 % of its maxmemory; trimmed {trimmed} old entries from the dead-letter list (dead jobs stay in queue.dead_letters)");
                }
                Sweep::new(keys)
            }
            None => return,
        };
        let until = Instant::now() + SLICE;
        while Instant::now() < until {
            let Some(ids) = redis.run(|con| sweep.scan(con)) else {
                return; // Redis failed: the next check starts over
            };
            if !ids.is_empty() {
                let live = in_transaction(|client| memory::unfinished(client, &ids));
                if redis
                    .run(|con| sweep.expire(con, keys, &ids, &live))
                    .is_none()
                {
                    return;
                }
            }
            if sweep.done() {
                if sweep.report.expired > 0 {
                    log!(
                        "queue_pg bridge: gave {} finished jobs' Redis hashes their TTL",
                        sweep.report.expired
                    );
                }
                return;
            }
        }
        self.sweep = Some(sweep);
    }
}
