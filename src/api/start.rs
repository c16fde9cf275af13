//! A worker claims the job it popped (`queue.start`) and keeps its lease alive
//! (`queue.heartbeat`).

use super::errors::{invalid_argument, null_argument, spi_failed, unknown_job};
use super::jobs::{explain_not_running, id_was_issued};
use crate::bridge::wake::wake_on_commit;
use crate::lifecycle::transitions;
use crate::spi_plans::{first_value, required};
use pgrx::datum::{Interval, JsonB, TimestampWithTimeZone};
use pgrx::prelude::*;

fn check_lease(lease: Option<Interval>) {
    if let Some(l) = lease {
        if l.as_micros() <= 0 {
            invalid_argument("queue_pg: lease must be a positive interval");
        }
    }
}

/// Claims a popped job. One row: the caller now holds it (`running`). No row: drop the message
/// (cancelled, finished, held by another worker, or a stale duplicate).
#[pg_extern(volatile, parallel_unsafe)]
fn start(
    job_id: Option<i64>,
    lease: default!(Option<Interval>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(id, i64),
        name!(queue_name, String),
        name!(payload, JsonB),
        name!(attempt, i32),
        name!(max_attempts, i32),
        name!(lease_expires_at, TimestampWithTimeZone),
    ),
> {
    let id = job_id.unwrap_or_else(|| null_argument("job_id"));
    check_lease(lease);
    let row = Spi::connect_mut(|client| {
        let rows = transitions::start(client, vec![id], vec![lease])?;
        let row = match rows.first().get_heap_tuple().map_err(|e| e.to_string())? {
            Some(r) => Some((
                required(r.get::<i64>(1), "id")?,
                required(r.get::<String>(2), "queue_name")?,
                required(r.get::<JsonB>(3), "payload")?,
                required(r.get::<i32>(4), "attempt")?,
                required(r.get::<i32>(5), "max_attempts")?,
                required(r.get::<TimestampWithTimeZone>(6), "lease_expires_at")?,
            )),
            None if id_was_issued(client, id) => None,
            None => unknown_job(id),
        };
        Ok::<_, String>(row)
    })
    .unwrap_or_else(|e| spi_failed("start", e));
    if row.is_some() {
        wake_on_commit();
    }
    TableIterator::new(row)
}

/// Extends the lease of a running job; returns its new end.
#[pg_extern(volatile, parallel_unsafe)]
fn heartbeat(
    job_id: Option<i64>,
    lease: default!(Option<Interval>, "NULL"),
    attempt: default!(Option<i32>, "NULL"),
) -> TimestampWithTimeZone {
    let id = job_id.unwrap_or_else(|| null_argument("job_id"));
    check_lease(lease);
    Spi::connect_mut(|client| {
        let until = transitions::heartbeat(client, vec![id], vec![lease], vec![attempt])
            .and_then(|t| first_value::<TimestampWithTimeZone>(t, 2).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| spi_failed("heartbeat", e));
        until.unwrap_or_else(|| explain_not_running(client, id, attempt, "heartbeat"))
    })
}
