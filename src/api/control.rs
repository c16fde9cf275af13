//! Controls: `queue.pause` and `queue.resume` (a paused queue keeps accepting jobs; the bridge
//! dispatches none of them until it is resumed) and `queue.cancel`.

use super::errors::{null_argument, spi_failed, unknown_job};
use super::jobs::id_was_issued;
use super::validate;
use crate::bridge::wake::{wake_on_commit, wake_on_commit_queued};
use crate::lifecycle::Sql;
use crate::spi_plans::{
    self,
    types::{BOOL, INT8, TEXT},
};
use pgrx::prelude::*;

const SET_PAUSED: &str = "
    INSERT INTO queue.queues (queue_name, paused) VALUES ($1, $2)
    ON CONFLICT (queue_name) DO UPDATE SET paused = EXCLUDED.paused, updated_at = now()";

fn set_paused(queue_name: Option<&str>, paused: bool) {
    let queue_name = validate::queue_name(queue_name);
    Spi::connect_mut(|client| {
        let args = [queue_name.into(), paused.into()];
        spi_plans::update(client, SET_PAUSED, &[TEXT, BOOL], None, &args).map(|_| ())
    })
    .unwrap_or_else(|e| pgrx::error!("queue_pg: could not update queue {queue_name}: {e}"));
}

#[pg_extern(volatile)]
fn pause(queue_name: Option<&str>) {
    set_paused(queue_name, true);
}

#[pg_extern(volatile)]
fn resume(queue_name: Option<&str>) {
    set_paused(queue_name, false);
    // The queue's waiting jobs can go now, whatever their ids: wake the bridge when this commits.
    wake_on_commit_queued(0);
}

static CANCEL: Sql = Sql::new(
    "
    WITH c AS (
        UPDATE queue.jobs SET status = {cancelled}, updated_at = now(), lease_expires_at = NULL
        WHERE id = $1 AND status IN {unfinished}
        RETURNING id, queue_name)
    INSERT INTO queue.redis_outbox (job_id, event, status, queue_name)
    SELECT id, 'state', {cancelled}, queue_name FROM c
    RETURNING job_id",
);

const EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM queue.jobs WHERE id = $1)";

/// Any unfinished job → cancelled (true); a finished one: false. A worker holding it gets an
/// ERROR at its next complete, fail or heartbeat; a message still in Redis is dropped by start.
#[pg_extern(volatile)]
fn cancel(job_id: Option<i64>) -> bool {
    let id = job_id.unwrap_or_else(|| null_argument("job_id"));
    let cancelled = Spi::connect_mut(|client| {
        let n = spi_plans::update(client, &CANCEL, &[INT8], Some(1), &[id.into()])
            .map(|t| t.len())
            .unwrap_or_else(|e| spi_failed("cancel", e));
        if n == 0 {
            let exists = client
                .select(EXISTS, Some(1), &[id.into()])
                .and_then(|t| t.first().get_one::<bool>())
                .unwrap_or_else(|e| spi_failed("looking up the job", e))
                == Some(true);
            if !exists && !id_was_issued(client, id) {
                unknown_job(id);
            }
        }
        n > 0
    });
    if cancelled {
        wake_on_commit();
    }
    cancelled
}
