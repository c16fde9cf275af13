//! Ending an attempt: `queue.complete`, `queue.complete_many` and `queue.fail` (their statements are
//! `lifecycle::transitions`, shared with the report applier). Each changes the job in the caller's
//! transaction and notes the change for Redis, which the bridge applies after commit.

use super::errors::{null_argument, spi_failed};
use super::jobs::explain_not_running;
use crate::bridge::wake::wake_on_commit;
use crate::lifecycle::transitions::{self, fail_one, Done};
use pgrx::datum::JsonB;
use pgrx::prelude::*;

/// running → completed.
#[pg_extern(volatile, parallel_unsafe)]
fn complete(
    job_id: Option<i64>,
    result: default!(Option<JsonB>, "NULL"),
    attempt: default!(Option<i32>, "NULL"),
) {
    let id = job_id.unwrap_or_else(|| null_argument("job_id"));
    let done = vec![Done {
        id,
        result: result.map(|r| r.0.to_string()),
        attempt,
    }];
    Spi::connect_mut(|client| {
        let done = transitions::complete(client, done, false)
            .unwrap_or_else(|e| spi_failed("complete", e));
        if done == 0 {
            explain_not_running(client, id, attempt, "complete");
        }
    });
    wake_on_commit();
}

/// Completes the running jobs among `job_ids`; returns how many. Ids that are not running (a
/// cancelled job, a duplicate) are skipped, so a fast worker can acknowledge in bulk.
#[pg_extern(volatile, parallel_unsafe)]
fn complete_many(job_ids: Option<Vec<Option<i64>>>) -> i32 {
    let done: Vec<Done> = job_ids
        .unwrap_or_else(|| null_argument("job_ids"))
        .into_iter()
        .flatten()
        .map(|id| Done {
            id,
            result: None,
            attempt: None,
        })
        .collect();
    let done = Spi::connect_mut(|client| transitions::complete(client, done, false))
        .unwrap_or_else(|e| spi_failed("complete_many", e));
    if done > 0 {
        wake_on_commit();
    }
    done as i32
}

/// Records a failed attempt of a running job: a retry after the backoff, or the dead-letter queue.
#[pg_extern(volatile, parallel_unsafe)]
fn fail(job_id: Option<i64>, error: Option<&str>, attempt: default!(Option<i32>, "NULL")) -> JsonB {
    let id = job_id.unwrap_or_else(|| null_argument("job_id"));
    let error = error.unwrap_or_else(|| null_argument("error"));
    let result = Spi::connect_mut(|client| match fail_one(client, id, error, attempt) {
        Ok(Some(outcome)) => outcome,
        Ok(None) => explain_not_running(client, id, attempt, "fail"),
        Err(e) => spi_failed("queue.fail", e),
    });
    wake_on_commit();
    result
}
