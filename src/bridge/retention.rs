//! Retention: finished jobs leave `queue.jobs` once they are older than their queue's retention
//! (`queue.queues.completed_retention`, …), else the setting's (`queue.completed_retention`,
//! `queue.dead_retention`, `queue.cancelled_retention`), counted from when they finished. Each
//! state is pruned in bounded batches, queue by queue along its partial index; a pruned dead job
//! leaves an outbox row (`pruned`) so that state sync removes its dead-letter entry and marker
//! from Redis. Part of the maintenance duty, every poll interval.

use crate::lifecycle::{queues_in_state, Sql};
use crate::settings;
use crate::spi_plans::{self, types::INT8};
use pgrx::spi::SpiClient;

/// At most this many jobs per state and pass.
const BATCH: i64 = 5000;

/// The statement that prunes `$state` (its finish time in `$at`, its queue override in
/// `$column`): the queues that hold such jobs by a skip scan over the state's index, then per
/// queue the oldest ones past their retention (`$1` seconds without an override), at most `$2`
/// in all; rows a transaction holds are skipped, never waited for. `$then` consumes `pruned`.
macro_rules! prune_sql {
    ($state:literal, $at:literal, $column:literal, $then:literal) => {
        concat!(
            "WITH RECURSIVE ",
            queues_in_state!($state),
            ",
            victims AS (
                SELECT v.id FROM names n
                LEFT JOIN queue.queues q ON q.queue_name = n.queue_name
                CROSS JOIN LATERAL (
                    SELECT j.id FROM queue.jobs j
                    WHERE j.queue_name = n.queue_name AND j.status = ",
            $state,
            "
                      AND j.",
            $at,
            " < now() - COALESCE(q.",
            $column,
            ", $1 * interval '1 second')
                    ORDER BY j.",
            $at,
            " LIMIT $2
                    FOR UPDATE OF j SKIP LOCKED) v
                WHERE n.queue_name IS NOT NULL
                LIMIT $2),
            pruned AS (
                DELETE FROM queue.jobs j USING victims v
                WHERE j.id = v.id AND j.status = ",
            $state,
            "
                RETURNING j.id, j.queue_name)
            ",
            $then
        )
    };
}

static PRUNE_COMPLETED: Sql = Sql::new(prune_sql!(
    "{completed}",
    "completed_at",
    "completed_retention",
    "SELECT id FROM pruned"
));
static PRUNE_CANCELLED: Sql = Sql::new(prune_sql!(
    "{cancelled}",
    "updated_at",
    "cancelled_retention",
    "SELECT id FROM pruned"
));
// Already counted as outcomes when they died: `counted` keeps the row out of queue.stats.
static PRUNE_DEAD: Sql = Sql::new(prune_sql!(
    "{failed}",
    "failed_at",
    "dead_retention",
    "INSERT INTO queue.redis_outbox (job_id, event, status, queue_name, counted)
     SELECT id, 'pruned', {failed}, queue_name, true FROM pruned
     RETURNING job_id"
));

/// How many jobs one pass pruned, per state.
#[derive(Debug, Default, PartialEq)]
pub struct Pruned {
    pub completed: usize,
    pub dead: usize,
    pub cancelled: usize,
}

/// One bounded pass over the three finished states, in the caller's transaction.
pub fn prune(client: &mut SpiClient<'_>) -> Pruned {
    let mut run = |sql: &'static Sql, retention_s: i64, what: &str| {
        spi_plans::update(
            client,
            sql,
            &[INT8, INT8],
            None,
            &[retention_s.into(), BATCH.into()],
        )
        .map(|t| t.len())
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: pruning {what} jobs failed: {e}"))
    };
    Pruned {
        completed: run(
            &PRUNE_COMPLETED,
            settings::completed_retention_s(),
            "completed",
        ),
        dead: run(&PRUNE_DEAD, settings::dead_retention_s(), "dead"),
        cancelled: run(
            &PRUNE_CANCELLED,
            settings::cancelled_retention_s(),
            "cancelled",
        ),
    }
}
