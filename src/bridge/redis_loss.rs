//! Duty: notice that Redis lost data (restarted without persistence, FLUSHALL, a failover to an
//! empty replica, one master of a cluster coming back empty, keys evicted): an epoch key the
//! bridge set is gone. Then at once, without waiting for `start_timeout`, every migrated job in
//! no Redis list (`list_tails`) and not started is dispatched again, and the rest of what Redis
//! held is put back by `restore`. A job still waiting in its list is left alone: an epoch key
//! that was evicted on its own costs nothing but the look. Checked on every new connection,
//! before any other duty uses it, and once per poll interval.
//!
//! One server has one epoch key, `queue_pg:bridge:epoch`. A cluster loses data per master, so
//! there each queue has its own, `queue_pg:{<queue>}:epoch`, in the queue's slot: it moves with
//! the slot when the cluster is resharded and is lost exactly when the queue's lists are. Every
//! push to a queue also sets it, in the push's MULTI (`push`), so a loss is noticed at the first
//! push after it (`Context::suspect_queues`) even before this check runs.

use super::context::{extension_ready, in_transaction, Context};
use super::episode::Episode;
use super::list_tails;
use super::report::{Count, Level};
use super::timer::Every;
use crate::redis::{Client, Group};
use crate::settings;
use pgrx::prelude::*;
use std::time::Instant;

const LOST: &str = "Redis lost data (an epoch key of the bridge is gone); dispatching again {n} jobs that are in no Redis list (further losses in this episode are counted and summed up once there has been none for a minute)";

#[derive(Default)]
pub struct RedisLoss {
    every: Every,
    episode: Episode,
}

impl RedisLoss {
    pub fn due(&self, cx: &Context, now: Instant) -> bool {
        cx.redis.connected()
            && (cx.redis.fresh()
                || !cx.suspect_queues.is_empty()
                || self.every.due(settings::poll_interval(), now))
    }

    pub fn next_run(&self) -> Instant {
        self.every.next(settings::poll_interval())
    }

    /// Looks for epoch keys that are gone, dispatches again what is in no list, and only then
    /// sets them again: a bridge that dies in between finds them gone once more (and looks
    /// again), never a loss forgotten.
    pub fn run(&mut self, cx: &mut Context, now: Instant) -> Vec<Count> {
        self.every.ran(now);
        let keys = &cx.keys;
        // The epoch keys to look at: one server's one, or per queue with migrated jobs (none
        // while the extension is not installed). `due` made sure a connection is open.
        let epochs: Vec<(String, Option<String>)> = if !cx.redis.is_cluster() {
            vec![(keys.epoch(), None)]
        } else {
            in_transaction(|client| {
                extension_ready(client).then(|| list_tails::migrated_lists(client, None))
            })
            .into_iter()
            .flatten()
            .map(|(q, _)| q)
            .fold(Vec::<String>::new(), |mut qs, q| {
                if qs.last() != Some(&q) {
                    qs.push(q);
                }
                qs
            })
            .into_iter()
            .map(|q| (keys.queue_epoch(&q), Some(q)))
            .collect()
        };
        // Queues whose keys could be read count even if others' could not (their master is
        // down): the link fails, and the rest is looked at on its next connection.
        let missing = if epochs.is_empty() {
            Some(Vec::new())
        } else {
            cx.redis
                .run_partial(|client| missing_epochs(client, &epochs))
        };
        // This connection has been checked (or has failed and is gone).
        cx.redis.take_fresh();
        let mut counts = Vec::new();
        let Some(missing) = missing else {
            return counts; // Redis failed: looked at again on the next connection
        };
        // What may be lost: everything (one server), or these queues' jobs numbered below a
        // bound (a cluster: all of a queue whose epoch is gone; those pushed before the push
        // that found it gone, which may be the queue's first).
        let whole = missing.iter().any(|(_, q)| q.is_none());
        let suspects = std::mem::take(&mut cx.suspect_queues);
        let mut queues: Vec<(String, i64)> = missing
            .iter()
            .filter_map(|(_, q)| q.clone().map(|q| (q, i64::MAX)))
            .collect();
        queues.extend(suspects.iter().cloned());
        if whole || !queues.is_empty() {
            let scope = (!whole).then_some(queues.as_slice());
            let Some(requeued) = dispatch_in_no_list(cx, scope) else {
                // Redis failed meanwhile: the epoch keys stay unset, so the next look finds
                // them gone again; the suspects (whose keys their push did set) are kept.
                cx.suspect_queues = suspects;
                return counts;
            };
            if requeued > 0 {
                cx.read_from.rewind();
            }
            // The rest of what Redis held goes back too; not after a queue's first push only
            // (its epoch key was missing because it had never been set).
            if !missing.is_empty() || requeued > 0 {
                cx.restore_wanted = true;
            }
            cx.redis.run(|client| set_epochs(client, &missing));
            // An epoch key missing while every job is in its list (a first start, or the key
            // evicted on its own) lost nothing.
            if requeued > 0 {
                let first = self.episode.occurred(now, requeued as u64);
                counts.push(Count::new(
                    requeued,
                    if first { Level::Warning } else { Level::Debug },
                    LOST,
                ));
            }
        }
        if let Some(totals) = self.episode.end_if_quiet(now) {
            counts.push(Count::new(1, Level::Log, totals.summary("Redis data loss")));
        }
        counts
    }
}

/// Dispatches again at once the migrated jobs that are in no Redis list: all, or those of
/// `queues` numbered below each one's bound (the highest given: a key missing now bounds
/// nothing, and a later push that found it gone again bounds less). Returns how many; None if
/// Redis failed.
fn dispatch_in_no_list(cx: &mut Context, queues: Option<&[(String, i64)]>) -> Option<usize> {
    let names: Option<Vec<String>> =
        queues.map(|q| q.iter().map(|(name, _)| name.clone()).collect());
    let bound = |queue: &str| {
        queues.map_or(i64::MAX, |q| {
            q.iter()
                .filter(|(name, _)| name == queue)
                .map(|(_, b)| *b)
                .max()
                .unwrap_or(i64::MAX)
        })
    };
    let lists = in_transaction(|client| {
        extension_ready(client).then(|| list_tails::migrated_lists(client, names.as_deref()))
    });
    let Some(lists) = lists.filter(|l| !l.is_empty()) else {
        return Some(0); // nothing migrated (or no extension yet): nothing to look for
    };
    let keys = &cx.keys;
    let tails = cx
        .redis
        .run(|client| list_tails::read(client, keys, &lists))?;
    Some(in_transaction(|client| {
        let starts = list_tails::starts(client, &lists, &tails);
        lists
            .iter()
            .zip(starts)
            .filter_map(|(list, start)| {
                let below = start?.min(bound(&list.0));
                Some(list_tails::requeue_below(client, list, below))
            })
            .sum()
    }))
}

/// The value the bridge gives an epoch key: who set it, and when.
pub fn epoch_token() -> String {
    format!(
        "{}-{}",
        unsafe { pg_sys::MyProcPid },
        crate::redis::iso_utc(std::time::SystemTime::now())
    )
}

/// Which of the epoch keys are gone (one round trip per master), and the first error.
fn missing_epochs(
    client: &mut Client,
    epochs: &[(String, Option<String>)],
) -> (Vec<(String, Option<String>)>, Option<String>) {
    let groups = epochs
        .iter()
        .map(|(key, _)| {
            let mut g = Group::on_key(key.clone());
            g.cmd("EXISTS").arg(key);
            g
        })
        .collect();
    let mut error = None;
    let mut missing = Vec::new();
    for (epoch, reply) in epochs.iter().zip(client.run(groups)) {
        match reply {
            Ok(values) if matches!(values.first(), Some(redis::Value::Int(0))) => {
                missing.push(epoch.clone())
            }
            Ok(_) => {}
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    (missing, error)
}

/// Sets the epoch keys again (`SET NX`: a push may have set one meanwhile).
fn set_epochs(client: &mut Client, epochs: &[(String, Option<String>)]) -> Result<(), String> {
    let token = epoch_token();
    let groups = epochs
        .iter()
        .map(|(key, _)| {
            let mut g = Group::on_key(key.clone());
            g.cmd("SET").arg(key).arg(&token).arg("NX");
            g
        })
        .collect();
    client.run_all(groups).map(|_| ())
}
