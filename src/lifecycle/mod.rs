//! The job lifecycle, in one place: the states a job moves through, its priorities, which states
//! count as unfinished, and the rule for a failed attempt (backoff or dead letter). The SQL
//! functions (`api`) and the bridge both use it; every SQL statement writes its states as
//! placeholders that [`Sql`] fills in from here (see `sql`).
//!
//! ```text
//! enqueue ─► queued ──(bridge)──► migrated ──start──► running ──complete──► completed
//!   │          ▲                      │                  │ fail ─► retry_scheduled ─(due)─► queued
//!   └─► scheduled ─(due)─┘            │                  │ fail, attempts used up ─► failed
//!                                     └─(not started within start_timeout, or Redis lost it)─► queued
//! cancel: any unfinished state ─► cancelled        replay_dead: failed ─► queued
//! ```

pub mod backoff;
pub mod report_rule;
mod sql;
pub mod transitions;

pub(crate) use sql::queues_in_state;
pub use sql::Sql;

use crate::spi_plans::types::INT8_ARRAY;
use crate::spi_plans::{required, with_plan};
use pgrx::spi::SpiClient;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Where a job is in its life (the `status` column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Committed, waiting for the bridge.
    Queued,
    /// Waiting for its `run_at`.
    Scheduled,
    /// In Redis, waiting for a worker.
    Migrated,
    /// Started by a worker, under a lease.
    Running,
    /// Failed an attempt, waiting out its backoff.
    RetryScheduled,
    Completed,
    /// Dead: attempts used up (the dead-letter queue).
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Scheduled,
        JobState::Migrated,
        JobState::Running,
        JobState::RetryScheduled,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
    ];
    /// A job in one of these will still run: it can be cancelled, and it holds its dedupe key.
    pub const UNFINISHED: [JobState; 5] = [
        JobState::Queued,
        JobState::Scheduled,
        JobState::Migrated,
        JobState::Running,
        JobState::RetryScheduled,
    ];
    /// Waiting for a `run_at`: made `queued` by the bridge once due.
    pub const WAITING: [JobState; 2] = [JobState::Scheduled, JobState::RetryScheduled];
    /// How an attempt (or a job) can end; counted in `queue.stats`.
    pub const OUTCOMES: [JobState; 4] = [
        JobState::Completed,
        JobState::RetryScheduled,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Scheduled => "scheduled",
            JobState::Migrated => "migrated",
            JobState::Running => "running",
            JobState::RetryScheduled => "retry_scheduled",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Result<JobState, String> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown job state \"{}\"", s.escape_default()))
    }

    /// Completed, failed or cancelled: nothing will happen to the job any more (a failed job
    /// only by `queue.replay_dead`).
    pub fn is_finished(self) -> bool {
        !JobState::UNFINISHED.contains(&self)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which of a queue's three Redis lists a job goes to. Workers pop high before normal before low.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    /// In the order workers pop them.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// Only the lowercase names.
    pub fn parse(s: &str) -> Result<Priority, String> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown priority \"{}\"", s.escape_default()))
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

static UNFINISHED: Sql = Sql::new(
    "
    SELECT id FROM queue.jobs
    WHERE id = ANY($1) AND status IN {unfinished}",
);

/// Which of `ids` are unfinished jobs. Runs inside the caller's transaction (no Redis here).
pub fn unfinished_among(client: &mut SpiClient<'_>, ids: &[i64]) -> HashSet<i64> {
    with_plan(client, &UNFINISHED, &[INT8_ARRAY], |client, plan| {
        let rows = client
            .select(plan, None, &[ids.to_vec().into()])
            .map_err(|e| e.to_string())?;
        rows.map(|r| required(r.get::<i64>(1), "id"))
            .collect::<Result<HashSet<i64>, String>>()
    })
    .unwrap_or_else(|e| pgrx::error!("queue_pg: looking up which jobs are unfinished failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for state in JobState::ALL {
            assert_eq!(JobState::parse(state.as_str()), Ok(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{state}\""), "serde agrees with as_str");
        }
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.as_str()), Ok(p));
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
        assert!(JobState::parse("Queued").is_err());
        assert!(Priority::parse("HIGH").is_err());
    }

    #[test]
    fn finished_and_unfinished_split_every_state() {
        let finished: Vec<_> = JobState::ALL
            .into_iter()
            .filter(|s| s.is_finished())
            .collect();
        assert_eq!(
            finished,
            [JobState::Completed, JobState::Failed, JobState::Cancelled]
        );
        assert_eq!(
            finished.len() + JobState::UNFINISHED.len(),
            JobState::ALL.len()
        );
    }
}
