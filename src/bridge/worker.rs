//! The bridge's main loop. One cycle: promote due jobs, then drain queued jobs into Redis batch
//! by batch, then sleep on the latch until a commit wakes it, the next scheduled job falls due,
//! a Redis retry is due, or `queue.poll_interval` passes.
//!
//! Where a cycle reads queued jobs from: not from the lowest id, which would mean walking past
//! every job of a paused queue on every cycle, but from the lowest id that became `queued` since
//! the last cycle. Backends publish that id at commit (`wake`); the bridge's own promotions and
//! re-dispatches lower it themselves; after a cycle that did not drain (Redis failed) the next
//! starts where this one did. Jobs made `queued` by other means (a prepared transaction committed
//! later, a hand-written UPDATE) are found by a sweep that starts every `SWEEP_INTERVAL` and
//! looks at `dispatch::SWEEP_IDS` ids per cycle, so that no cycle walks a whole paused backlog.
//!
//! Exit paths: SIGTERM or postmaster death end the loop (exit code 1, so that a terminated bridge
//! is started again; at shutdown nothing is restarted); an ERROR
//! (or panic) exits with a failure and the postmaster restarts the bridge after its restart time.
//! Jobs are marked only after Redis acknowledged them, so no exit path loses one.

use super::dispatch::{self, Job, Pushed};
use super::memory::MemoryTask;
use super::promote;
use super::redis_link::RedisLink;
use super::shared;
use super::{rescue, sync};
use crate::redis::Keys;
use crate::settings;
use crate::spi_plans::with_plan;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn queue_pg_bridge_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = settings::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // Losing a `migrated` mark in a crash only means pushing that job again (at-least-once),
    // so the bridge's own commits need not wait for the WAL flush.
    BackgroundWorker::transaction(|| Spi::run("SET synchronous_commit = off"))
        .expect("SET synchronous_commit failed");
    shared::publish_bridge_process();
    log!("queue_pg bridge: started in database \"{database}\"");

    let mut bridge = Bridge::new();
    let mut last_cycle = Instant::now();
    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            bridge.reload();
        }
        if !wait_for_gap(last_cycle) {
            break;
        }
        last_cycle = Instant::now();
        let sleep = bridge.cycle();
        if !BackgroundWorker::wait_latch(Some(sleep)) {
            break;
        }
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

/// Under a stream of commits the bridge runs at most one cycle per gap, so that the jobs or
/// state changes of many commits share a cycle instead of each paying for one. A commit that
/// queues jobs cuts the longer gap short. False if the bridge should stop.
fn wait_for_gap(last_cycle: Instant) -> bool {
    loop {
        let gap = if shared::queued_pending() {
            MIN_CYCLE_GAP
        } else {
            STATE_SYNC_GAP
        };
        let Some(rest) = gap.checked_sub(last_cycle.elapsed()) else {
            return true;
        };
        if gap == MIN_CYCLE_GAP {
            unsafe { pg_sys::pg_usleep(rest.as_micros() as std::ffi::c_long) };
            return true;
        }
        // Woken by a commit (which may have queued jobs), a signal, or the end of the gap.
        if !BackgroundWorker::wait_latch(Some(rest)) || shutdown_requested() {
            return false;
        }
    }
}

fn shutdown_requested() -> bool {
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

struct Bridge {
    keys: Keys,
    redis: RedisLink,
    /// Whether the extension exists in the bridge's database, as last logged.
    extension_present: Option<bool>,
    /// When the rescue and pruning pass last ran (once per poll interval).
    last_maintenance: Instant,
    /// How far each list had been popped, tick by tick (for `queue.start_timeout`).
    pops: rescue::PopHistory,
    /// Every queued job of an unpaused queue below this id is in Redis, except those published
    /// in shared memory since (i64::MAX: all are; 0: read from the start).
    scan_from: i64,
    /// Where the sweep for unannounced queued jobs goes on from (None: not sweeping).
    sweep: Option<i64>,
    /// When the last sweep started.
    last_sweep: Instant,
    /// When `queue.stats` minutes were last folded into totals (None: not yet).
    last_fold: Option<Instant>,
    memory: MemoryTask,
}

/// What one transaction of the drain loop found.
struct Step {
    extension_present: bool,
    batch: Vec<Job>,
    next_due_in: Option<Duration>,
    /// Pending Redis changes (read by the first step of a cycle).
    changes: Vec<sync::Change>,
    /// The lowest id below the scan position that the first step found queued: promoted from
    /// scheduled or retrying, or found by the sweep.
    also_from: Option<i64>,
    /// Where the sweep goes on from after this cycle's step (None: done).
    sweep_next: Option<i64>,
}

/// Runs `f` in a transaction of its own with an SPI connection. An ERROR or panic inside is
/// published as the bridge's last error (for `queue.health()`) before it ends the bridge, which
/// the postmaster then restarts; Postgres logs it.
pub fn in_transaction<R>(f: impl FnOnce(&mut SpiClient<'_>) -> R) -> R {
    let f = AssertUnwindSafe(f);
    let run = AssertUnwindSafe(move || {
        BackgroundWorker::transaction(move || {
            let f = f; // the whole wrapper, not just its field
            Spi::connect_mut(|client| (f.0)(client))
        })
    });
    match std::panic::catch_unwind(run) {
        Ok(r) => r,
        Err(payload) => {
            shared::record_error(&panic_message(payload.as_ref()));
            std::panic::resume_unwind(payload)
        }
    }
}

/// The message of an ERROR or panic caught in the bridge.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    use pgrx::pg_sys::panic::CaughtError;
    if let Some(e) = payload.downcast_ref::<CaughtError>() {
        let report = match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
            CaughtError::RustPanic { ereport, .. } => ereport,
        };
        return report.message().to_owned();
    }
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "the bridge panicked".into())
}

fn extension_present(client: &mut SpiClient<'_>) -> bool {
    with_plan(client, EXTENSION_PRESENT, &[], |client, plan| {
        client.select(plan, Some(1), &[])?.first().get_one::<bool>()
    })
    .map(|present| present == Some(true))
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: checking for the extension failed: {e}"))
}

/// How often a sweep for unannounced queued jobs starts (see the module doc).
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// How often `queue.stats` minutes that left the last hour are folded into the totals.
const STATS_FOLD_INTERVAL: Duration = Duration::from_secs(60);

/// At most this many outbox rows per Redis round trip.
const SYNC_BATCH: usize = 1000;

const EXTENSION_PRESENT: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'queue_pg')";

impl Bridge {
    fn new() -> Self {
        Bridge {
            keys: Keys::new(settings::redis_prefix()),
            redis: RedisLink::from_settings(),
            extension_present: None,
            last_maintenance: Instant::now(),
            pops: rescue::PopHistory::default(),
            scan_from: 0,
            sweep: None,
            last_sweep: Instant::now(),
            last_fold: None,
            memory: MemoryTask::default(),
        }
    }

    fn reload(&mut self) {
        self.keys = Keys::new(settings::redis_prefix());
        self.redis.reload();
    }

    /// One cycle; returns how long to sleep before the next.
    ///
    /// Batches are pipelined: while Postgres marks batch k-1 and reads batch k+1, Redis applies
    /// batch k. The reply of batch k is read between the two transactions.
    fn cycle(&mut self) -> Duration {
        let mut sleep = settings::poll_interval();
        let limit = settings::batch_size();
        if self.last_maintenance.elapsed() >= settings::poll_interval() {
            self.last_maintenance = Instant::now();
            self.maintain();
        }
        let mut redis_ok = self.redis.get().is_some();
        if redis_ok && self.redis.take_fresh() {
            // Before the first push on a new connection: did Redis lose its data meanwhile?
            self.check_epoch();
        }
        let mut changes = Vec::new();
        let mut changes_applied = false;

        // State changes committed from here on wake the bridge again (for the next cycle).
        shared::states_wake_taken();
        let mut from = self.read_from();
        let sweep = self.sweep;
        let mut first = true;
        let mut to_mark = Pushed::default();
        let mut in_flight = None;
        let mut after_id = from.saturating_sub(1);
        // Read another batch only after a full one: a partial batch means the backlog is empty.
        let mut read_more = true;
        loop {
            let read = redis_ok && read_more && !shutdown_requested();
            let marking = std::mem::take(&mut to_mark);
            let step_sweep = sweep.filter(|_| first);
            let step = in_transaction(|client| {
                Self::step(client, first, marking, read, after_id, limit, step_sweep)
            });
            self.note_extension(step.extension_present);
            if let Some(also) = step.also_from {
                from = from.min(also);
            }
            if step_sweep.is_some() {
                self.sweep = step.sweep_next;
            }
            if first && !step.changes.is_empty() {
                // State changes go to Redis before this cycle's pushes, so that a job hash
                // written by dispatch (`migrated`) is not overwritten by an older state.
                changes = step.changes;
                let keys = &self.keys;
                changes_applied = self
                    .redis
                    .run(|con| sync::apply(con, keys, &changes))
                    .is_some();
                redis_ok &= changes_applied;
            }
            first = false;
            if let Some(due) = step.next_due_in {
                sleep = sleep.min(due);
            }
            if let Some(batch) = in_flight.take() {
                redis_ok &= self.collect(batch, &mut to_mark);
            }
            read_more = step.batch.len() == limit;
            if let Some(last) = step.batch.last() {
                after_id = last.id;
                let keys = &self.keys;
                match self.redis.run(|con| dispatch::send(con, keys, &step.batch)) {
                    Some(batch) if read_more => in_flight = Some(batch),
                    // Nothing to overlap with: take the reply now, mark it in the next step.
                    Some(batch) => redis_ok &= self.collect(batch, &mut to_mark),
                    None => redis_ok = false,
                }
            }
            // Done when nothing is in flight and nothing is left to mark. After a Redis failure
            // one more step marks what was acknowledged and reads nothing.
            if in_flight.is_none() && to_mark.ids.is_empty() {
                break;
            }
        }
        // Drained: every queued job of an unpaused queue is in Redis now, except those that
        // commits publish from here on. Otherwise the next cycle starts where this one did.
        self.scan_from = if redis_ok && !shutdown_requested() {
            i64::MAX
        } else {
            from
        };
        if changes_applied {
            self.sync(changes);
        }
        if let Some(retry) = self.redis.retry_in() {
            sleep = sleep.min(retry.max(Duration::from_millis(1)));
        }
        shared::record_cycle();
        sleep
    }

    /// The lowest id this cycle reads queued jobs from (see the module doc).
    /// Also starts a sweep when one is due.
    fn read_from(&mut self) -> i64 {
        if self.sweep.is_none() && self.last_sweep.elapsed() >= SWEEP_INTERVAL {
            self.last_sweep = Instant::now();
            self.sweep = Some(0);
        }
        shared::take_queued_from().min(self.scan_from)
    }

    /// Deletes changes already applied to Redis; then applies and deletes more while the outbox
    /// was full.
    fn sync(&mut self, mut changes: Vec<sync::Change>) {
        loop {
            let more = changes.len() == SYNC_BATCH;
            let next = in_transaction(|client| {
                sync::delete_applied(client, &changes);
                if more {
                    sync::read_changes(client, SYNC_BATCH)
                } else {
                    Vec::new()
                }
            });
            sync::publish_totals(&changes);
            changes = next;
            let keys = &self.keys;
            if changes.is_empty()
                || self
                    .redis
                    .run(|con| sync::apply(con, keys, &changes))
                    .is_none()
            {
                return;
            }
        }
    }

    /// The once-per-poll-interval pass: expired leases, pruning, folding old outcome counts,
    /// the rescue of jobs Redis lost or workers dropped, and a slice of the Redis memory check.
    fn maintain(&mut self) {
        let fold = self
            .last_fold
            .is_none_or(|at| at.elapsed() >= STATS_FOLD_INTERVAL);
        let done = in_transaction(|client| {
            extension_present(client).then(|| {
                sync::count_outcomes(client);
                if fold {
                    sync::fold_stats(client);
                }
                (
                    rescue::expire_leases(client),
                    rescue::prune_completed(client),
                )
            })
        });
        if fold && done.is_some() {
            self.last_fold = Some(Instant::now());
        }
        let Some((expired, pruned)) = done else {
            return;
        };
        if expired > 0 {
            log!("queue_pg bridge: {expired} running jobs' leases expired; counted as failed attempts");
        }
        if pruned > 0 {
            pgrx::debug1!("queue_pg bridge: pruned {pruned} completed jobs");
        }

        if !self.check_epoch() {
            return;
        }
        self.memory.run_slice(&mut self.redis, &self.keys);
        let lists = in_transaction(|client| rescue::migrated_lists(client));
        if lists.is_empty() {
            return;
        }
        let keys = &self.keys;
        let Some(popped) = self
            .redis
            .run(|con| rescue::popped_counts(con, keys, &lists))
        else {
            return;
        };
        let timeout = Duration::from_millis(settings::start_timeout_ms() as u64);
        let due = self.pops.observe(&lists, &popped, timeout);
        let n = in_transaction(|client| rescue::redispatch_unstarted(client, &lists, &due));
        if n > 0 {
            self.scan_from = 0;
            log!("queue_pg bridge: {n} jobs were popped but not started within queue.start_timeout; dispatching them again");
        }
    }

    /// If Redis lost its data (its epoch key is gone), every job it had and no worker started
    /// goes back to `queued`. False if Redis could not be asked.
    fn check_epoch(&mut self) -> bool {
        let keys = &self.keys;
        let answer = self.redis.run(|con| rescue::epoch_was_missing(con, keys));
        // This connection has been checked now: the cycle need not check it again.
        self.redis.take_fresh();
        match answer {
            None => false,
            Some(false) => true,
            Some(true) => {
                let n = in_transaction(|client| {
                    extension_present(client).then(|| rescue::requeue_all_migrated(client))
                });
                if let Some(n) = n.filter(|&n| n > 0) {
                    self.scan_from = 0;
                    warning!("queue_pg bridge: Redis lost its data; dispatching {n} jobs again");
                }
                true
            }
        }
    }

    /// Reads the reply of a sent batch and adds it to `to_mark`; false if Redis failed.
    fn collect(&mut self, batch: dispatch::InFlight, to_mark: &mut Pushed) -> bool {
        let Some(pushed) = self.redis.run(|con| dispatch::receive(con, batch)) else {
            return false;
        };
        shared::add_dispatched(pushed.ids.len() as u64);
        to_mark.ids.extend(pushed.ids);
        to_mark.seqs.extend(pushed.seqs);
        true
    }

    /// One transaction of the drain loop: mark what Redis acknowledged, then read the next batch.
    /// The first step of a cycle also checks the extension and promotes due jobs.
    fn step(
        client: &mut pgrx::spi::SpiClient<'_>,
        first: bool,
        acknowledged: Pushed,
        read: bool,
        after_id: i64,
        limit: usize,
        sweep: Option<i64>,
    ) -> Step {
        let mut step = Step {
            extension_present: true,
            batch: Vec::new(),
            next_due_in: None,
            changes: Vec::new(),
            also_from: None,
            sweep_next: None,
        };
        if first {
            step.extension_present = extension_present(client);
            if !step.extension_present {
                return step;
            }
            step.also_from = promote::promote_due(client);
            if let Some(pos) = sweep {
                let (found, next) = dispatch::sweep_step(client, pos);
                step.also_from = step.also_from.into_iter().chain(found).min();
                step.sweep_next = next;
            }
            if read {
                step.changes = sync::read_changes(client, SYNC_BATCH);
            }
        }
        dispatch::mark_migrated(client, acknowledged);
        if read {
            let after_id = match step.also_from {
                Some(also) => after_id.min(also - 1),
                None => after_id,
            };
            step.batch = dispatch::read_batch(client, after_id, limit);
        }
        if step.batch.is_empty() {
            step.next_due_in = promote::next_due_in(client);
        }
        step
    }

    fn note_extension(&mut self, present: bool) {
        if self.extension_present != Some(present) {
            if !present {
                log!(
                    "queue_pg bridge: extension queue_pg is not installed in database \"{}\"; waiting for CREATE EXTENSION queue_pg",
                    settings::database()
                );
            } else if self.extension_present.is_some() {
                log!("queue_pg bridge: extension queue_pg found; dispatching");
            }
            self.extension_present = Some(present);
        }
    }
}
