//! Queue controls: `queue.pause` and `queue.resume`. A paused queue keeps accepting jobs; the
//! bridge dispatches none of them until it is resumed.

use super::validate;
use crate::bridge::wake::wake_on_commit;
use pgrx::prelude::*;

const SET_PAUSED: &str = "
    INSERT INTO queue.queues (queue_name, paused) VALUES ($1, $2)
    ON CONFLICT (queue_name) DO UPDATE SET paused = EXCLUDED.paused, updated_at = now()";

fn set_paused(queue_name: Option<&str>, paused: bool) {
    let queue_name = validate::queue_name(queue_name);
    Spi::connect_mut(|client| {
        client
            .update(SET_PAUSED, None, &[queue_name.into(), paused.into()])
            .map(|_| ())
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
    // The queue's waiting jobs can go now: wake the bridge when this commits.
    wake_on_commit();
}
