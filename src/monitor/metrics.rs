//! `queue.metrics()`: one row per queue, for psql and postgres_exporter. The same figures as
//! `queue.health()` and `queue.prometheus()`; the Redis list lengths are NULL while Redis cannot
//! be asked (within `queue.redis_timeout`).

use super::figures::{self, QueueFigures};
use super::redis_probe::{probe, RedisProbe};
use pgrx::prelude::*;

/// Reads the per-queue figures and the rejected reports, then asks Redis for the lengths of the
/// queues' lists and report streams (outside SPI).
pub fn collect() -> (Vec<QueueFigures>, RedisProbe, Vec<(String, String, i64)>) {
    let (queues, rejected) = Spi::connect_mut(|client| {
        (
            figures::per_queue(client),
            figures::rejected_reports(client),
        )
    });
    let names: Vec<String> = queues.iter().map(|q| q.queue.clone()).collect();
    let redis = probe(&names);
    (queues, redis, rejected)
}

/// Per queue: jobs in each live state in Postgres, dead letters, the lengths of its Redis lists,
/// the age of its oldest waiting job, outcomes in the last hour and in total, and its workers'
/// reports (waiting in Redis, the oldest one's age, and how many were rejected). `failed_*`
/// counts jobs that died (dead-lettered); `retried_*` counts failed attempts that were retried.
// pgrx needs the row type spelled out here (a type alias hides the column names from it).
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn metrics() -> TableIterator<
    'static,
    (
        name!(queue_name, String),
        name!(paused, bool),
        name!(queued, i64),
        name!(scheduled, i64),
        name!(migrated, i64),
        name!(running, i64),
        name!(retry_scheduled, i64),
        name!(dead_letters, i64),
        name!(redis_high, Option<i64>),
        name!(redis_normal, Option<i64>),
        name!(redis_low, Option<i64>),
        name!(oldest_age_s, f64),
        name!(completed_last_hour, i64),
        name!(retried_last_hour, i64),
        name!(failed_last_hour, i64),
        name!(cancelled_last_hour, i64),
        name!(completed_total, i64),
        name!(retried_total, i64),
        name!(failed_total, i64),
        name!(cancelled_total, i64),
        name!(reports_waiting, Option<i64>),
        name!(oldest_report_age_ms, Option<i64>),
        name!(reports_rejected_total, i64),
    ),
> {
    let (queues, redis, rejected) = collect();
    let rows: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let list = |p: usize| redis.lists.get(i).map(|l| l[p]);
            let stream = redis.reports.get(i);
            let rejected_here = rejected
                .iter()
                .filter(|(queue, _, _)| *queue == q.queue)
                .map(|(_, _, n)| n)
                .sum();
            (
                q.queue,
                q.paused,
                q.queued,
                q.scheduled,
                q.migrated,
                q.running,
                q.retry_scheduled,
                q.dead,
                list(0),
                list(1),
                list(2),
                q.oldest_age_s,
                q.last_hour.completed,
                q.last_hour.retried,
                q.last_hour.failed,
                q.last_hour.cancelled,
                q.total.completed,
                q.total.retried,
                q.total.failed,
                q.total.cancelled,
                stream.map(|s| s.waiting),
                stream.and_then(|s| s.oldest_age_ms),
                rejected_here,
            )
        })
        .collect();
    TableIterator::new(rows)
}
