//! The bridge's main loop. One cycle: promote due jobs, then drain queued jobs into Redis batch
//! by batch, then sleep on the latch until a commit wakes it, the next scheduled job falls due,
//! a Redis retry is due, or `queue.poll_interval` passes.
//!
//! Exit paths: SIGTERM or postmaster death end the loop and the process exits cleanly; an ERROR
//! (or panic) exits with a failure and the postmaster restarts the bridge after its restart time.
//! Jobs are marked only after Redis acknowledged them, so no exit path loses one.

use super::dispatch::{self, Job, Pushed};
use super::promote;
use super::redis_link::RedisLink;
use super::shared;
use crate::redis::Keys;
use crate::settings;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::{Duration, SystemTime};

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
    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            bridge.reload();
        }
        let sleep = bridge.cycle();
        if !BackgroundWorker::wait_latch(Some(sleep)) {
            break;
        }
    }
    shared::clear_bridge_process();
    log!("queue_pg bridge: stopped");
}

fn shutdown_requested() -> bool {
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

struct Bridge {
    keys: Keys,
    redis: RedisLink,
    /// Whether the extension exists in the bridge's database, as last logged.
    extension_present: Option<bool>,
}

/// What one transaction of the drain loop found.
struct Step {
    extension_present: bool,
    batch: Vec<Job>,
    next_due_in: Option<Duration>,
}

const EXTENSION_PRESENT: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'queue_pg')";

impl Bridge {
    fn new() -> Self {
        Bridge {
            keys: Keys::new(settings::redis_prefix()),
            redis: RedisLink::from_settings(),
            extension_present: None,
        }
    }

    fn reload(&mut self) {
        self.keys = Keys::new(settings::redis_prefix());
        self.redis.reload();
    }

    /// One cycle; returns how long to sleep before the next.
    fn cycle(&mut self) -> Duration {
        let mut sleep = settings::poll_interval();
        let limit = settings::batch_size();
        let redis_ready = self.redis.get().is_some();

        // Each step marks the previous batch and reads the next in one transaction; the push
        // to Redis happens between transactions.
        let mut pushed = Pushed::default();
        let mut first = true;
        loop {
            let read = redis_ready && !shutdown_requested();
            let to_mark = std::mem::take(&mut pushed);
            let step = BackgroundWorker::transaction(move || {
                Spi::connect_mut(|client| Self::step(client, first, to_mark, read, limit))
            });
            first = false;
            self.note_extension(step.extension_present);
            if let Some(due) = step.next_due_in {
                sleep = sleep.min(due);
            }
            if step.batch.is_empty() {
                break;
            }
            let Some(con) = self.redis.get() else { break };
            match dispatch::push(con, &self.keys, &step.batch) {
                Ok(p) => {
                    shared::add_dispatched(p.ids.len() as u64);
                    pushed = p;
                }
                Err(e) => {
                    self.redis.failed(e);
                    break;
                }
            }
        }
        if let Some(retry) = self.redis.retry_in() {
            sleep = sleep.min(retry.max(Duration::from_millis(1)));
        }
        shared::record_cycle(unix_micros());
        sleep
    }

    /// One transaction of the drain loop: mark what Redis acknowledged, then read the next batch.
    /// The first step of a cycle also checks the extension and promotes due jobs.
    fn step(
        client: &mut pgrx::spi::SpiClient<'_>,
        first: bool,
        pushed: Pushed,
        read: bool,
        limit: usize,
    ) -> Step {
        let mut step = Step {
            extension_present: true,
            batch: Vec::new(),
            next_due_in: None,
        };
        if first {
            step.extension_present = client
                .select(EXTENSION_PRESENT, Some(1), &[])
                .ok()
                .and_then(|t| t.first().get_one::<bool>().ok().flatten())
                .unwrap_or(false);
            if !step.extension_present {
                return step;
            }
            promote::promote_due(client);
        }
        dispatch::mark_migrated(client, pushed);
        if read {
            step.batch = dispatch::read_batch(client, limit);
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

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
