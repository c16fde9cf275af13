//! Helpers shared by the lifecycle functions: explaining why a call did not fit a job.

use super::errors::{unknown_job, wrong_state};
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
    let row = client
        .select(JOB_STATE, Some(1), &[id.into()])
        .and_then(|t| t.first().get_two::<String, i32>())
        .unwrap_or((None, None));
    let (Some(status), Some(attempt_count)) = row else {
        unknown_job(id)
    };
    if status == "cancelled" {
        wrong_state(format!(
            "queue_pg: cannot {action} job {id}: it was cancelled"
        ));
    }
    if status != "running" {
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

/// The status of a job, or an ERROR (P0002) if it does not exist.
pub fn status_of(client: &SpiClient<'_>, id: i64) -> String {
    client
        .select(JOB_STATE, Some(1), &[id.into()])
        .and_then(|t| t.first().get_one::<String>())
        .ok()
        .flatten()
        .unwrap_or_else(|| unknown_job(id))
}

/// Whether `id` was ever handed out (a job with it may since have been pruned).
pub fn id_was_issued(client: &SpiClient<'_>, id: i64) -> bool {
    let last = client
        .select(LAST_ID, Some(1), &[])
        .and_then(|t| t.first().get_one::<i64>())
        .ok()
        .flatten()
        .unwrap_or(0);
    id >= 1 && id <= last
}
