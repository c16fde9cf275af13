//! What Redis holds of a job, built from its row: its hash and, once it is dead, its dead-letter
//! entry and marker. State sync writes them after each change; restore writes them again after
//! Redis lost them. One reading of the row, one way to write each key.

use crate::lifecycle::{JobState, Priority};
use crate::redis::wire::{self, DeadLetterEntry, JobHash};
use crate::redis::{iso_utc_from_pg, Client, Group, Keys};
use crate::spi_plans::{optional, required};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::spi::SpiHeapTupleData;
use serde_json::value::RawValue;

/// The columns [`JobRow::read`] reads, in this order, from `queue.jobs` (no alias: usable in a
/// subquery). Only a dead job's payload is read (for its dead-letter entry).
macro_rules! job_columns {
    () => {
        "status, queue_name, attempt_count, last_error_message, failed_at,
         (EXTRACT(EPOCH FROM (run_at - updated_at)) * 1000)::bigint AS retry_delay_ms,
         CASE WHEN status = {failed} THEN payload::text END AS payload, priority"
    };
}
pub(crate) use job_columns;

/// A job as its row says now.
pub struct JobRow {
    pub status: JobState,
    pub queue: String,
    pub attempt_count: i32,
    pub error: Option<String>,
    pub failed_at: Option<String>,
    pub retry_delay_ms: Option<i64>,
    /// Only a dead job's.
    pub payload: Option<Box<RawValue>>,
    pub priority: Priority,
}

impl JobRow {
    /// The [`job_columns`] starting at column `first` (1-based); None when the status is NULL
    /// (a LEFT JOIN found no job). A value that does not decode is an error, never a default.
    pub fn read(row: &SpiHeapTupleData<'_>, first: usize) -> Result<Option<JobRow>, String> {
        let status: Option<String> = optional(row.get(first), "jobs.status")?;
        let Some(status) = status.as_deref().map(JobState::parse).transpose()? else {
            return Ok(None);
        };
        Ok(Some(JobRow {
            queue: required(row.get(first + 1), "jobs.queue_name")?,
            attempt_count: required(row.get(first + 2), "jobs.attempt_count")?,
            error: optional(row.get(first + 3), "jobs.last_error_message")?,
            failed_at: optional(
                row.get::<TimestampWithTimeZone>(first + 4),
                "jobs.failed_at",
            )?
            .map(|t| iso_utc_from_pg(t.into_inner())),
            retry_delay_ms: match status {
                JobState::RetryScheduled => Some(required(row.get(first + 5), "the retry delay")?),
                _ => None,
            },
            payload: match status {
                JobState::Failed => Some(
                    RawValue::from_string(required(row.get(first + 6), "jobs.payload")?)
                        .map_err(|e| format!("jobs.payload: {e}"))?,
                ),
                _ => None,
            },
            priority: Priority::parse(&required::<String>(row.get(first + 7), "jobs.priority")?)?,
            status,
        }))
    }

    /// The job's hash, as of `now`.
    pub fn hash<'a>(&'a self, now: &'a str) -> JobHash<'a> {
        JobHash {
            status: self.status,
            queue: &self.queue,
            attempt_count: self.attempt_count,
            updated_at: now,
            queued_at: None,
            error: self.error.as_deref(),
            retry_delay_ms: self.retry_delay_ms,
            failed_at: self.failed_at.as_deref(),
        }
    }

    /// A dead job's dead-letter entry (None unless the job is dead).
    pub fn dead_letter_entry(&self, id: i64) -> Option<String> {
        let payload = self.payload.as_ref()?;
        Some(wire::to_json(&DeadLetterEntry {
            id,
            queue_name: self.queue.as_str().into(),
            payload,
            error: self.error.as_deref().unwrap_or("").into(),
            failed_at: self.failed_at.as_deref().unwrap_or("").into(),
            attempt_count: self.attempt_count,
            original_priority: self.priority,
        }))
    }
}

/// A dead job's entry for the dead-letter list, and how long its marker lives.
pub struct DeadLetter {
    pub id: i64,
    pub entry: String,
    pub ttl_s: i64,
}

/// Where [`put_dead_letters`] adds entries: at the head (a job that just died) or at the tail
/// (older ones put back, newest first, behind whatever died since).
#[derive(Clone, Copy)]
pub enum End {
    Head,
    Tail,
}

/// Adds the entry of each dead job whose marker is missing, and sets its marker. The list and a
/// marker hash to different cluster slots, so this takes three steps, one round trip per node
/// each: which markers exist, the missing entries, their markers. A marker is set only once its
/// entry is in: a failure in between means an entry twice (a replay removes both), never a dead
/// job without one. Returns how many entries were added.
pub fn put_dead_letters(
    client: &mut Client,
    keys: &Keys,
    dead: &[DeadLetter],
    end: End,
) -> Result<usize, String> {
    if dead.is_empty() {
        return Ok(0);
    }
    let exists = dead
        .iter()
        .map(|d| {
            let mut g = Group::on_key(keys.dead_letter_marker(d.id));
            g.cmd("EXISTS").arg(keys.dead_letter_marker(d.id));
            g
        })
        .collect();
    let exists = client.run_all(exists)?;
    let missing: Vec<&DeadLetter> = dead
        .iter()
        .zip(exists)
        .filter(|(_, r)| matches!(r.first(), Some(redis::Value::Int(0))))
        .map(|(d, _)| d)
        .collect();
    let push = match end {
        End::Head => "LPUSH",
        End::Tail => "RPUSH",
    };
    let entries = missing
        .iter()
        .map(|d| {
            let mut g = Group::on_key(keys.dead_letter_list());
            g.cmd(push).arg(keys.dead_letter_list()).arg(&d.entry);
            g
        })
        .collect();
    client.run_all(entries)?;
    let markers = missing
        .iter()
        .map(|d| {
            let mut g = Group::on_key(keys.dead_letter_marker(d.id));
            g.cmd("SET")
                .arg(keys.dead_letter_marker(d.id))
                .arg("moved")
                .arg("EX")
                .arg(d.ttl_s.max(1));
            g
        })
        .collect();
    client.run_all(markers)?;
    Ok(missing.len())
}
