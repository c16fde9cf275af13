//! The bridge's main loop: one wait, then the duties in a fixed order, each when it is due.
//!
//! ```text
//! loop:
//!   wait (the only one): until a commit wakes the bridge, a duty falls due, or a signal
//!   connect to Redis if not connected (and the backoff allows)
//!   maintenance     Postgres upkeep: outcome counts, expired leases, pruning  (poll interval)
//!   redis_loss      did Redis lose its data? then dispatch its jobs again  (new connection, poll interval)
//!   memory_check    job hash TTLs and dead-letter trimming, a slice at a time  (memory_check_interval)
//!   rescue          jobs popped but never started: dispatch again  (poll interval)
//!   state_sync      committed state changes to Redis  (after commits, poll interval)
//!   dispatch        queued jobs to Redis, pipelined  (every cycle)
//!   restore         after Redis lost data: dead letters and job hashes back, a batch a cycle
//! ```
//!
//! State sync runs before dispatch, so a job hash that dispatch writes (`migrated`) is never
//! overwritten by an older state. Each duty returns counts, logged here.
//!
//! Exit paths: SIGTERM or postmaster death end the loop (exit code 1, so that a terminated bridge
//! is started again; at shutdown nothing is restarted); an ERROR (or panic) exits with a failure
//! and the postmaster restarts the bridge after its restart time. Jobs are marked only after
//! Redis acknowledged them, so no exit path loses one.

use super::context::{config_reloaded, start_worker, Context};
use super::dispatch::Dispatch;
use super::maintenance::Maintenance;
use super::memory_check::MemoryCheck;
use super::redis_loss::RedisLoss;
use super::report;
use super::rescue::Rescue;
use super::restore::Restore;
use super::shared::{self, shutdown_requested};
use super::state_sync::StateSync;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn queue_pg_bridge_main(_arg: pg_sys::Datum) {
    // Losing a `migrated` mark in a crash only means pushing that job again (at-least-once),
    // so the bridge's own commits need not wait for the WAL flush.
    let database = start_worker("queue_pg bridge", &["SET synchronous_commit = off"]);
    shared::publish_bridge_process();
    log!("queue_pg bridge: started in database \"{database}\"");

    let mut bridge = Bridge::new();
    while bridge.wait() {
        bridge.cycle();
    }
    shared::clear_bridge_process();
    log!("queue_pg bridge: stopped");
    // Exit code 1, not 0: a bridge stopped by pg_terminate_backend() is started again after its
    // restart time (exit code 0 would unregister it until the server restarts). At server
    // shutdown the postmaster restarts nothing.
    unsafe { pg_sys::proc_exit(1) };
}

/// The shortest time between the starts of two cycles while jobs wait to be dispatched.
const MIN_CYCLE_GAP: Duration = Duration::from_millis(2);
/// The shortest time between the starts of two cycles while commits only changed job states
/// (workers' start, complete, fail: job hashes to update in Redis, nothing to dispatch).
const STATE_SYNC_GAP: Duration = Duration::from_millis(20);

/// What commits left for the bridge since it last looked.
#[derive(Clone, Copy, Default)]
struct Pending {
    /// Jobs became `queued`.
    queued: bool,
    /// Job states changed (outbox rows to apply).
    states: bool,
}

/// When the next cycle starts, given the last one's start: once the gap has passed if commits
/// left work, otherwise when the earliest duty is due (and the gap has passed).
fn next_cycle_at(last: Instant, pending: Pending, next_due: Instant) -> Instant {
    let gap_end = last
        + if pending.queued {
            MIN_CYCLE_GAP
        } else {
            STATE_SYNC_GAP
        };
    if pending.queued || pending.states {
        gap_end
    } else {
        next_due.max(gap_end)
    }
}

/// How long to wait on the latch until `until`: latch waits count whole milliseconds, so less
/// than one left means now (a gap may end up to 1 ms short; rounding up instead would delay every
/// cycle). None: start now.
fn latch_wait(until: Instant, now: Instant) -> Option<Duration> {
    let ms = until.saturating_duration_since(now).as_millis() as u64;
    (ms > 0).then(|| Duration::from_millis(ms))
}

struct Bridge {
    cx: Context,
    maintenance: Maintenance,
    redis_loss: RedisLoss,
    memory_check: MemoryCheck,
    rescue: Rescue,
    state_sync: StateSync,
    dispatch: Dispatch,
    restore: Restore,
    /// When the last cycle started (None before the first).
    last_cycle: Option<Instant>,
}

impl Bridge {
    fn new() -> Bridge {
        Bridge {
            cx: Context::from_settings(),
            maintenance: Maintenance::default(),
            redis_loss: RedisLoss::default(),
            memory_check: MemoryCheck::default(),
            rescue: Rescue::default(),
            state_sync: StateSync::default(),
            dispatch: Dispatch::default(),
            restore: Restore::default(),
            last_cycle: None,
        }
    }

    /// The loop's one wait. Returns when the next cycle should start; false if the bridge
    /// should stop. Under a stream of commits the bridge runs at most one cycle per gap, so
    /// that the jobs or state changes of many commits share a cycle; a commit that queues jobs
    /// shortens the gap.
    fn wait(&mut self) -> bool {
        loop {
            if shutdown_requested() {
                return false;
            }
            if config_reloaded() {
                self.cx.reload();
            }
            let Some(last) = self.last_cycle else {
                return true;
            };
            let pending = Pending {
                queued: shared::queued_pending(),
                states: shared::states_pending(),
            };
            let until = next_cycle_at(last, pending, self.next_due());
            let Some(wait) = latch_wait(until, Instant::now()) else {
                return true;
            };
            // Woken early by a commit or a signal: the loop decides again.
            if !BackgroundWorker::wait_latch(Some(wait)) {
                return false;
            }
        }
    }

    /// When the earliest duty falls due (or the next Redis connection attempt).
    fn next_due(&self) -> Instant {
        let mut next = [
            self.maintenance.next_run(),
            self.redis_loss.next_run(),
            self.memory_check.next_run(),
            self.rescue.next_run(),
            self.state_sync.next_run(),
        ]
        .into_iter()
        .min()
        .expect("there are duties");
        if let Some(due) = self.dispatch.next_run() {
            next = next.min(due);
        }
        if let Some(due) = self.restore.next_run() {
            next = next.min(due);
        }
        if let Some(retry) = self.cx.redis.retry_in() {
            next = next.min(Instant::now() + retry.max(Duration::from_millis(1)));
        }
        next
    }

    fn cycle(&mut self) {
        let now = Instant::now();
        self.last_cycle = Some(now);
        let cx = &mut self.cx;
        cx.redis.connect();
        if self.maintenance.due(now) {
            report::log(&self.maintenance.run(now));
        }
        if self.redis_loss.due(cx, now) {
            report::log(&self.redis_loss.run(cx, now));
        }
        if self.memory_check.due(cx, now) {
            report::log(&self.memory_check.run(cx, now));
        }
        if self.rescue.due(cx, now) {
            report::log(&self.rescue.run(cx, now));
        }
        if self.state_sync.due(now) {
            report::log(&self.state_sync.run(cx, now));
        }
        report::log(&self.dispatch.run(cx, now));
        if self.restore.due(cx) {
            report::log(&self.restore.run(cx));
        }
        cx.redis.end_cycle();
        shared::record_cycle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn commits_that_queue_jobs_wait_the_short_gap_only() {
        let last = Instant::now();
        let far = last + Duration::from_secs(1);
        let queued = Pending {
            queued: true,
            states: true,
        };
        assert_eq!(next_cycle_at(last, queued, far), last + MIN_CYCLE_GAP);
        let states = Pending {
            queued: false,
            states: true,
        };
        assert_eq!(next_cycle_at(last, states, far), last + STATE_SYNC_GAP);
    }

    #[test]
    fn without_commits_the_earliest_duty_decides_but_never_before_the_gap() {
        let last = Instant::now();
        let idle = Pending::default();
        let later = last + Duration::from_millis(700);
        assert_eq!(next_cycle_at(last, idle, later), later);
        assert_eq!(next_cycle_at(last, idle, last), last + STATE_SYNC_GAP);
    }

    #[test]
    fn latch_waits_are_whole_milliseconds_rounded_down() {
        let now = Instant::now();
        assert_eq!(latch_wait(now, now), None);
        assert_eq!(latch_wait(now + MS / 2, now), None);
        assert_eq!(latch_wait(now + MS * 3 / 2, now), Some(MS));
        assert_eq!(latch_wait(now + MS * 20, now), Some(MS * 20));
        assert_eq!(latch_wait(now, now + MS), None, "past: now");
    }
}
