//! Duty: dispatch. Drains committed `queued` jobs into Redis, batch by batch, pipelined: while
//! Postgres marks batch k-1 `migrated` and reads batch k+1 (one transaction), Redis applies
//! batch k, whose reply is read between the two transactions. No transaction is open while the
//! bridge waits for Redis.
//!
//! The drain's first transaction also promotes scheduled and retrying jobs that fell due and
//! takes a step of the sweep: both can lower where the drain reads from, and sharing the
//! transaction keeps an idle cycle at one transaction.
//!
//! Where a drain reads from: see `context::ReadFrom`. Jobs made `queued` by other means (a
//! prepared transaction committed later, a hand-written UPDATE) are found by a sweep that starts
//! every `SWEEP_INTERVAL` and looks at `push::SWEEP_IDS` ids per drain, so that no drain walks a
//! whole paused backlog.

use super::context::{extension_ready, in_transaction, Context};
use super::memory_gate;
use super::promote;
use super::push::{self, InFlight, Job, Pushed};
use super::report::{Count, Level};
use super::shared::{self, shutdown_requested};
use super::timer::Every;
use crate::settings;
use pgrx::spi::SpiClient;
use std::time::{Duration, Instant};

/// How often a sweep for unannounced queued jobs starts.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

pub struct Dispatch {
    /// Where the sweep goes on from (None: not sweeping).
    sweep: Option<i64>,
    sweep_timer: Every,
    /// When the next scheduled or retrying job falls due.
    next_due: Option<Instant>,
    /// Redis is nearly full (`memory_gate`): when to look again.
    held_until: Option<Instant>,
}

impl Default for Dispatch {
    /// The first sweep starts one interval after the bridge.
    fn default() -> Dispatch {
        Dispatch {
            sweep: None,
            sweep_timer: Every::starting_now(),
            next_due: None,
            held_until: None,
        }
    }
}

impl Dispatch {
    /// Dispatch runs every cycle; between cycles it wants one when a waiting job falls due.
    pub fn next_run(&self) -> Option<Instant> {
        [self.next_due, self.held_until].into_iter().flatten().min()
    }

    /// One drain. Returns how many jobs Redis acknowledged.
    pub fn run(&mut self, cx: &mut Context, now: Instant) -> Vec<Count> {
        if self.sweep.is_none() && self.sweep_timer.due(SWEEP_INTERVAL, now) {
            self.sweep_timer.ran(now);
            self.sweep = Some(0);
        }
        let limit = settings::batch_size();
        let mut redis_ok = cx.redis.connected();
        let mut from = cx.read_from.take();
        let mut opening = Some(self.sweep);
        let mut to_mark = Pushed::default();
        let mut in_flight: Option<InFlight> = None;
        let mut after_id = from.saturating_sub(1);
        let mut dispatched = 0;
        let mut counts = Vec::new();
        // Redis was too full to take more (`memory_gate`): the rest waits in Postgres.
        let mut held = false;
        // Held back before: look again before reading anything.
        if redis_ok && cx.memory_gate.holding() {
            let (allowed, say) = cx.memory_gate.allows(&mut cx.redis, &cx.keys, now);
            held = !allowed;
            counts.extend(say.map(|s| Count::new(1, Level::Warning, s)));
        }
        // Read another batch only after a full one: a partial batch means the backlog is empty.
        let mut read_more = true;
        loop {
            let read =
                (redis_ok && read_more && !held && !shutdown_requested()).then_some(after_id);
            let marking = std::mem::take(&mut to_mark);
            let opened = opening.take();
            let step = in_transaction(|client| Step::run(client, opened, marking, read, limit));
            if let Some(o) = &step.opening {
                if !o.extension_ready {
                    redis_ok = false; // nothing read: the next drain starts here again
                    break;
                }
                if let Some(also) = o.also_from {
                    from = from.min(also);
                }
                if opened.is_some_and(|sweep| sweep.is_some()) {
                    self.sweep = o.sweep_next;
                }
            }
            if let Some(due_in) = step.next_due_in {
                self.next_due = due_in.map(|d| Instant::now() + d);
            }
            if let Some(batch) = in_flight.take() {
                redis_ok &= collect(cx, batch, &mut to_mark, &mut dispatched);
            }
            read_more = step.batch.len() == limit;
            // Redis may be too full to take the batch: asked only now, with no reply pending.
            if !step.batch.is_empty() {
                let (allowed, say) = cx
                    .memory_gate
                    .allows(&mut cx.redis, &cx.keys, Instant::now());
                held = !allowed;
                counts.extend(say.map(|s| Count::new(1, Level::Warning, s)));
            }
            if let Some(last) = step.batch.last().filter(|_| !held) {
                after_id = last.id;
                let keys = &cx.keys;
                cx.memory_gate.pushed(&step.batch);
                match cx
                    .redis
                    .run(|client| Ok(push::send(client, keys, &step.batch)))
                {
                    Some(batch) if read_more => in_flight = Some(batch),
                    // Nothing to overlap with: take the reply now, mark it in the next step.
                    Some(batch) => {
                        redis_ok &= collect(cx, batch, &mut to_mark, &mut dispatched);
                    }
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
        // commits publish from here on. Otherwise the next drain starts where this one did.
        cx.read_from
            .drained(redis_ok && !held && !shutdown_requested(), from);
        self.held_until = held.then(|| Instant::now() + memory_gate::RECHECK);
        shared::publish_new_queues();
        counts.push(Count::new(
            dispatched,
            Level::Debug,
            "{n} jobs pushed to Redis",
        ));
        counts.extend(
            cx.memory_gate
                .episode_over(now)
                .map(|s| Count::new(1, Level::Log, s)),
        );
        counts
    }
}

/// What the drain's first transaction found besides a batch.
struct Opening {
    extension_ready: bool,
    /// The lowest id below the read position that became `queued`: promoted, or found by the
    /// sweep.
    also_from: Option<i64>,
    /// Where the sweep goes on from (None: done).
    sweep_next: Option<i64>,
}

/// One transaction of the drain.
struct Step {
    opening: Option<Opening>,
    batch: Vec<Job>,
    /// Read once the backlog is empty: when the next waiting job falls due (None: none waits).
    next_due_in: Option<Option<Duration>>,
}

impl Step {
    /// Opens the drain if `opening` is given (with the sweep position, if sweeping), marks what
    /// Redis acknowledged, then reads the batch after `read` (if given).
    fn run(
        client: &mut SpiClient<'_>,
        opening: Option<Option<i64>>,
        acknowledged: Pushed,
        read: Option<i64>,
        limit: usize,
    ) -> Step {
        let opening = opening.map(|sweep| open(client, sweep));
        if opening.as_ref().is_some_and(|o| !o.extension_ready) {
            return Step {
                opening,
                batch: Vec::new(),
                next_due_in: None,
            };
        }
        push::mark_migrated(client, acknowledged);
        let also_from = opening.as_ref().and_then(|o| o.also_from);
        let mut batch = match read {
            Some(after_id) => {
                let after_id = also_from.map_or(after_id, |also| after_id.min(also - 1));
                push::read_batch(client, after_id, limit)
            }
            None => Vec::new(),
        };
        push::number(client, &mut batch);
        let next_due_in = batch.is_empty().then(|| promote::next_due_in(client));
        Step {
            opening,
            batch,
            next_due_in,
        }
    }
}

/// The drain's opening: is the extension there; promote due jobs; a step of the sweep.
fn open(client: &mut SpiClient<'_>, sweep: Option<i64>) -> Opening {
    if !extension_ready(client) {
        return Opening {
            extension_ready: false,
            also_from: None,
            sweep_next: None,
        };
    }
    let mut also_from = promote::promote_due(client);
    let mut sweep_next = None;
    if let Some(pos) = sweep {
        let (found, next) = push::sweep_step(client, pos);
        also_from = also_from.into_iter().chain(found).min();
        sweep_next = next;
    }
    Opening {
        extension_ready: true,
        also_from,
        sweep_next,
    }
}

/// Reads the replies of a sent batch and adds what Redis acknowledged to `to_mark`; false if
/// Redis failed (for some queues of the batch, or all).
fn collect(
    cx: &mut Context,
    batch: InFlight,
    to_mark: &mut Pushed,
    dispatched: &mut usize,
) -> bool {
    let Some((pushed, failed)) = cx.redis.run_partial(|client| {
        let (pushed, error) = push::receive(client, batch);
        let failed = error.is_some();
        ((pushed, failed), error)
    }) else {
        return false;
    };
    shared::add_dispatched(pushed.ids.len() as u64);
    shared::add_push_batch(pushed.round_trips);
    *dispatched += pushed.ids.len();
    to_mark.ids.extend(pushed.ids);
    to_mark.seqs.extend(pushed.seqs);
    // A queue whose epoch key was gone: `redis_loss` looks at its lists in the next cycle.
    cx.suspect_queues.extend(pushed.epoch_missing);
    !failed
}
