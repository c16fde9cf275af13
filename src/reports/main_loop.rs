//! The report applier's loop. Its one wait is the blocking read itself (`XREAD BLOCK`, bounded
//! by `BLOCK` plus `queue.redis_timeout`), or the latch while Redis is down or nothing is
//! watched.
//!
//! ```text
//! loop:
//!   connect to Redis if not connected (a new connection reads every stream from its start)
//!   streams        which queues' report streams to read  (poll interval, a queue new to the bridge)
//!   remove         reports applied earlier whose removal failed
//!   read           XREAD up to queue.batch_size reports per stream, blocking up to BLOCK
//!                  (in a cluster: per slot, without blocking, then CLUSTER_PAUSE if none)
//!   apply          one transaction, committed synchronously (apply)
//!   remove         XDEL what that transaction applied or rejected
//! ```
//!
//! Reports leave Redis only after the commit that applied them is durable, so a crash anywhere
//! loses none. One that is applied and then read again (the applier died before its XDEL) is
//! rejected by the attempt token or the job's state, never applied twice.

use super::apply::{apply, Applied};
use super::shared;
use super::streams::Streams;
use crate::bridge::context::{config_reloaded, in_transaction, start_worker};
use crate::bridge::redis_link::RedisLink;
use crate::bridge::shared::{self as bridge_shared, shutdown_requested, unix_micros};
use crate::bridge::timer::Every;
use crate::bridge::wake::wake_on_commit;
use crate::redis::report::{entry_ms, parse_xread, Entry};
use crate::redis::{Client, Group, Keys};
use crate::settings;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How long one read blocks waiting for reports.
const BLOCK: Duration = Duration::from_millis(100);
/// In a cluster, where reads do not block: the pause after a read that found nothing.
const CLUSTER_PAUSE: Duration = Duration::from_millis(20);
/// Rejected reports are logged at most this often (with counts since the last line).
const REJECT_LOG_EVERY: Duration = Duration::from_secs(10);

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn queue_pg_reports_main(_arg: pg_sys::Datum) {
    // A report is removed from Redis right after the commit that applied it: that commit must
    // be durable first, whatever the server's default. And batches vary from one report to
    // thousands: each statement is planned for the batch at hand and the table as it is now.
    let database = start_worker(
        "queue_pg reports",
        &[
            "SET synchronous_commit = on",
            "SET plan_cache_mode = force_custom_plan",
        ],
    );
    shared::publish_process(true);
    log!("queue_pg reports: started in database \"{database}\"");
    let mut applier = Applier::new();
    while applier.wait() {
        applier.cycle();
    }
    shared::publish_process(false);
    log!("queue_pg reports: stopped");
    // As the bridge: exit code 1, so that a terminated applier is started again.
    unsafe { pg_sys::proc_exit(1) };
}

struct Applier {
    link: RedisLink,
    keys: Keys,
    streams: Streams,
    refresh: Every,
    /// The bridge's `queues_generation` at the last refresh.
    generation: u64,
    /// Entries applied (or rejected) whose XDEL failed: removed before the next read.
    unremoved: Vec<(String, Vec<String>)>,
    /// Sleep on the latch until then before the next cycle (Redis down, nothing to watch).
    idle_until: Option<Instant>,
    rejects: RejectLog,
}

impl Applier {
    fn new() -> Applier {
        Applier {
            link: RedisLink::for_worker("queue_pg reports", false),
            keys: Keys::new(settings::redis_prefix()),
            streams: Streams::default(),
            refresh: Every::default(),
            generation: 0,
            unremoved: Vec::new(),
            idle_until: None,
            rejects: RejectLog::default(),
        }
    }

    /// False when the applier should stop.
    fn wait(&mut self) -> bool {
        loop {
            if shutdown_requested() {
                return false;
            }
            if config_reloaded() {
                self.keys = Keys::new(settings::redis_prefix());
                self.streams.rename(&self.keys);
                self.link.reload();
            }
            let Some(until) = self.idle_until else {
                return true;
            };
            let left = until.saturating_duration_since(Instant::now());
            if left < Duration::from_millis(1) {
                self.idle_until = None;
                return true;
            }
            if !BackgroundWorker::wait_latch(Some(left)) {
                return false;
            }
        }
    }

    fn idle(&mut self, for_: Duration) {
        self.idle_until = Some(Instant::now() + for_.max(Duration::from_millis(1)));
    }

    fn cycle(&mut self) {
        self.cycle_steps();
        self.link.end_cycle();
    }

    fn cycle_steps(&mut self) {
        let now = Instant::now();
        let connected = self.link.connect();
        shared::set_redis_connected(connected);
        if !connected {
            self.idle(self.link.retry_in().unwrap_or(BLOCK));
            return;
        }
        if self.link.take_fresh() {
            self.streams.rewind();
        }
        // Every poll interval, and as soon as the bridge pushed to a queue new to it.
        let generation = bridge_shared::queues_generation();
        if self.refresh.due(settings::poll_interval(), now) || generation != self.generation {
            self.generation = generation;
            let (streams, keys) = (&mut self.streams, &self.keys);
            let present = in_transaction(|client| streams.refresh(client, keys));
            self.refresh.ran(now);
            if !present {
                self.idle(settings::poll_interval());
                return;
            }
        }
        if self.streams.is_empty() {
            // Until the bridge pushes to a queue: checked each BLOCK, as a read would.
            self.idle(BLOCK);
            return;
        }
        if !self.unremoved.is_empty() {
            let unremoved = &self.unremoved;
            if self.link.run(|client| remove(client, unremoved)).is_none() {
                return;
            }
            self.unremoved.clear();
        }
        let Some(read) = self.read() else {
            return;
        };
        if read.iter().all(Vec::is_empty) {
            if self.link.is_cluster() {
                self.idle(CLUSTER_PAUSE);
            }
            return;
        }
        let queues = self.streams.queues();
        let batch: Vec<(&str, &[Entry])> = queues
            .iter()
            .zip(&read)
            .map(|(q, entries)| (q.as_str(), entries.as_slice()))
            .collect();
        let applied = in_transaction(|client| {
            let applied = apply(client, &batch);
            if applied.applied > 0 {
                wake_on_commit();
            }
            applied
        });
        let oldest_ms = read
            .iter()
            .flatten()
            .filter_map(|e| entry_ms(&e.entry_id))
            .min();
        let at = unix_micros();
        let lag_us = oldest_ms.map_or(0, |ms| (at - ms as i64 * 1000).max(0));
        shared::record_batch(
            applied.applied as u64,
            applied.rejected_total() as u64,
            lag_us,
            at,
        );
        self.rejects.add(&applied);
        self.rejects.maybe_log(now);

        let done: Vec<(String, Vec<String>)> = self
            .streams
            .keys()
            .iter()
            .zip(&read)
            .filter(|(_, entries)| !entries.is_empty())
            .map(|(key, entries)| {
                (
                    key.clone(),
                    entries.iter().map(|e| e.entry_id.clone()).collect(),
                )
            })
            .collect();
        if self.link.run(|client| remove(client, &done)).is_none() {
            self.unremoved = done;
        }
    }

    /// One read of every watched stream, blocking up to BLOCK on one server. None if Redis
    /// failed (the link backs off).
    fn read(&mut self) -> Option<Vec<Vec<Entry>>> {
        let count = settings::batch_size();
        let max_bytes = settings::max_payload_bytes();
        let streams = &self.streams;
        let read = if self.link.is_cluster() {
            // What the reachable masters gave is applied even when another master is down.
            self.link
                .run_partial(|client| read_per_slot(client, streams, count, max_bytes))?
        } else {
            self.link.run_for(BLOCK, |client| {
                let group = streams.xread(count, BLOCK.as_millis() as u64);
                let mut replies = client.run_all(vec![group])?;
                let reply = replies.pop().and_then(|mut r| r.pop());
                parse_xread(reply.ok_or("no XREAD reply")?, streams.keys(), max_bytes)
            })?
        };
        for (i, entries) in read.iter().enumerate() {
            if let Some(last) = entries.last() {
                self.streams.advance(i, &last.entry_id);
            }
        }
        Some(read)
    }
}

/// In a cluster a blocking read could only cover one slot's streams: every slot's streams are
/// read without blocking, one round trip per master (and the applier pauses `CLUSTER_PAUSE`
/// when all were empty).
fn read_per_slot(
    client: &mut Client,
    streams: &Streams,
    count: usize,
    max_bytes: usize,
) -> (Vec<Vec<Entry>>, Option<String>) {
    let (groups, members): (Vec<Group>, Vec<Vec<usize>>) =
        streams.xread_per_slot(count).into_iter().unzip();
    let mut read: Vec<Vec<Entry>> = streams.keys().iter().map(|_| Vec::new()).collect();
    let mut error = None;
    for (replies, members) in client.run(groups).into_iter().zip(members) {
        let keys: Vec<String> = members.iter().map(|&i| streams.keys()[i].clone()).collect();
        let parsed = replies.and_then(|mut replies| {
            let reply = replies.pop().ok_or("no XREAD reply")?;
            parse_xread(reply, &keys, max_bytes)
        });
        match parsed {
            Ok(entries) => {
                for (entries, i) in entries.into_iter().zip(members) {
                    read[i] = entries;
                }
            }
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    (read, error)
}

/// XDEL the given entries of each stream, in one round trip per node.
fn remove(client: &mut Client, entries: &[(String, Vec<String>)]) -> Result<(), String> {
    let groups = entries
        .iter()
        .map(|(key, ids)| {
            let mut g = Group::on_key(key.clone());
            g.cmd("XDEL").arg(key).arg(ids);
            g
        })
        .collect();
    client.run_all(groups).map(|_| ())
}

/// Rejected reports, logged at most once per `REJECT_LOG_EVERY` with what came since.
#[derive(Default)]
struct RejectLog {
    pending: Applied,
    last: Option<Instant>,
}

impl RejectLog {
    fn add(&mut self, applied: &Applied) {
        for ((queue, reason), (n, job)) in &applied.rejected {
            self.pending.count_rejected(queue, *reason, *n, *job);
        }
    }

    fn maybe_log(&mut self, now: Instant) {
        let pending = &self.pending.rejected;
        if pending.is_empty() || self.last.is_some_and(|at| now < at + REJECT_LOG_EVERY) {
            return;
        }
        let parts: Vec<String> = std::mem::take(&mut self.pending)
            .rejected
            .into_iter()
            .map(|((queue, reason), (n, job))| {
                let reason = reason.as_str();
                match job {
                    Some(id) => format!("{n} {reason} in queue {queue} (last: job {id})"),
                    None => format!("{n} {reason} in queue {queue}"),
                }
            })
            .collect();
        warning!(
            "queue_pg reports: dropped reports that do not fit: {}; counted in queue.rejected_reports",
            parts.join(", ")
        );
        self.last = Some(now);
    }
}
