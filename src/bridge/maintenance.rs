//! Duty: the Postgres side's upkeep, once per poll interval, in one transaction, whether or not
//! Redis is reachable: outcomes waiting in the outbox are counted (`outcomes`), minutes that
//! left the last hour fold into the totals (once a minute), running jobs whose lease expired
//! fail their attempt by the backoff rule ("lease expired"), and finished jobs older than their
//! retention are pruned in bounded batches (`retention`).

use super::context::{extension_ready, in_transaction};
use super::outcomes;
use super::report::{Count, Level};
use super::retention;
use super::timer::Every;
use crate::lifecycle::transitions::{self, Failure};
use crate::lifecycle::JobState;
use crate::lifecycle::Sql;
use crate::settings;
use crate::spi_plans::required;
use pgrx::spi::SpiClient;
use std::time::{Duration, Instant};

/// How often `queue.stats` minutes that left the last hour are folded into the totals.
const FOLD_INTERVAL: Duration = Duration::from_secs(60);

static EXPIRED_LEASES: Sql = Sql::new(
    "
    SELECT id FROM queue.jobs
    WHERE status = {running} AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT 500
    FOR UPDATE SKIP LOCKED",
);

#[derive(Default)]
pub struct Maintenance {
    every: Every,
    fold: Every,
}

impl Maintenance {
    pub fn due(&self, now: Instant) -> bool {
        self.every.due(settings::poll_interval(), now)
    }

    pub fn next_run(&self) -> Instant {
        self.every.next(settings::poll_interval())
    }

    pub fn run(&mut self, now: Instant) -> Vec<Count> {
        self.every.ran(now);
        let fold = self.fold.due(FOLD_INTERVAL, now);
        let done = in_transaction(|client| {
            extension_ready(client).then(|| {
                outcomes::count_waiting(client);
                if fold {
                    outcomes::fold(client);
                }
                (expire_leases(client), retention::prune(client))
            })
        });
        let Some((expired, pruned)) = done else {
            return Vec::new();
        };
        if fold {
            self.fold.ran(now);
        }
        vec![
            Count::new(
                expired,
                Level::Log,
                "{n} running jobs' leases expired; counted as failed attempts",
            ),
            Count::new(pruned.completed, Level::Debug, "pruned {n} completed jobs"),
            Count::new(pruned.dead, Level::Debug, "pruned {n} dead jobs"),
            Count::new(pruned.cancelled, Level::Debug, "pruned {n} cancelled jobs"),
        ]
    }
}

/// Fails running jobs whose lease expired, by the backoff rule. Returns how many.
fn expire_leases(client: &mut SpiClient<'_>) -> usize {
    let ids: Vec<i64> = client
        .update(&*EXPIRED_LEASES, None, &[])
        .map_err(|e| e.to_string())
        .and_then(|rows| rows.map(|r| required(r.get::<i64>(1), "id")).collect())
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: finding expired leases failed: {e}"));
    // Locked above and running.
    let failures: Vec<Failure> = transitions::lock(client, &ids)
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: failing expired leases: {e}"))
        .iter()
        .filter(|job| job.status == JobState::Running)
        .map(|job| Failure {
            id: job.id,
            outcome: transitions::failure_outcome(job),
            error: "lease expired",
        })
        .collect();
    transitions::fail(client, &failures)
        .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: failing expired leases: {e}"));
    ids.len()
}
