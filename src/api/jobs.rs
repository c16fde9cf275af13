//! Helpers shared by the lifecycle functions: explaining why a call did not fit a job.

use super::errors::{spi_failed, unknown_job, wrong_state};
use crate::lifecycle::JobState;
use crate::spi_plans::required;
use pgrx::spi::SpiClient;

const JOB_STATE: &str = "SELECT status, attempt_count FROM queue.jobs WHERE id = $1";
const LAST_ID: &str = "SELECT last_value FROM queue.jobs_id_seq";

/// Called when an UPDATE guarded by `status = 'running'` (and the attempt) changed nothing:
/// raises the ERROR that says why. Never returns.
pub fn explain_not_running(
    client: &SpiClient<'_>,
    id: i64,
    attempt: Option<i32>,
    action: &str,
) -> ! {
    let Some((status, attempt_count)) = job_state(client, id) else {
        unknown_job(id)
    };
    if status == JobState::Cancelled {
        wrong_state(format!(
            "queue_pg: cannot {action} job {id}: it was cancelled"
        ));
    }
    if status != JobState::Running {
        wrong_state(format!(
            "queue_pg: cannot {action} job {id}: it is {status}, not running"
        ));
    }
    match attempt {
        Some(a) if a != attempt_count + 1 => wrong_state(format!(
            "queue_pg: cannot {action} job {id}: attempt {a} is stale, the job is on attempt {}",
            attempt_count + 1
        )),
        _ => wrong_state(format!("queue_pg: cannot {action} job {id}")),
    }
}

/// The status and attempt count of a job; None if it does not exist.
fn job_state(client: &SpiClient<'_>, id: i64) -> Option<(JobState, i32)> {
    let table = client
        .select(JOB_STATE, Some(1), &[id.into()])
        .unwrap_or_else(|e| spi_failed("looking up the job", e));
    if table.is_empty() {
        return None;
    }
    let row = table.first();
    let status = required(row.get::<String>(1), "status").and_then(|s| JobState::parse(&s));
    let attempts = required(row.get::<i32>(2), "attempt_count");
    Some(
        status
            .and_then(|s| Ok((s, attempts?)))
            .unwrap_or_else(|e| spi_failed("looking up the job", e)),
    )
}

/// The status of a job, or an ERROR (P0002) if it does not exist.
pub fn status_of(client: &SpiClient<'_>, id: i64) -> JobState {
    job_state(client, id)
        .map(|(status, _)| status)
        .unwrap_or_else(|| unknown_job(id))
}

/// Whether `id` was ever handed out (a job with it may since have been pruned).
pub fn id_was_issued(client: &SpiClient<'_>, id: i64) -> bool {
    let last = client
        .select(LAST_ID, Some(1), &[])
        .and_then(|t| t.first().get_one::<i64>())
        .map_err(|e| e.to_string())
        .and_then(|v| v.ok_or_else(|| "the id sequence has no last_value".to_string()))
        .unwrap_or_else(|e| spi_failed("reading the job id sequence", e));
    id >= 1 && id <= last
}
