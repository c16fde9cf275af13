//! The bridge: a background worker that moves committed jobs from `queue.jobs` into Redis and
//! keeps Redis following Postgres. One loop (`main_loop`) calls one duty per file:
//!
//! - `maintenance`: Postgres upkeep (outcome counts, expired leases, pruning).
//! - `redis_loss`: a Redis that lost data gets its jobs again, at once.
//! - `memory_check`: the periodic `queue.optimize_memory()`, a slice at a time.
//! - `rescue`: jobs in no Redis list and not started within `start_timeout` are dispatched again.
//! - `state_sync`: committed state changes reach the job hashes and the dead-letter list.
//! - `dispatch`: queued jobs are pushed in pipelined batches, then marked `migrated`.
//! - `restore`: after Redis lost data, dead-letter entries, markers and job hashes go back.
//!
//! Their helpers: `context` (what duties share: the Redis link, key names, the read position,
//! transactions), `redis_link` (the connection and its backoff), `projection` (a job's hash and
//! dead-letter entry from its row), `push` (the batch statements
//! and Redis commands of dispatch), `list_tails` (which jobs are still in their list, told by the
//! list), `promote` (due jobs become `queued`), `outcomes` (counts in `queue.stats`), `timer`,
//! `report`, `episode` (a repeating fault logged once), `memory_gate` (dispatch and restore hold
//! back while Redis is nearly full). `shared` and `wake` are the shared-memory block and the
//! commit-time wake-up that backends use.

pub mod context;
pub mod dispatch;
pub mod episode;
pub mod list_tails;
pub mod main_loop;
pub mod maintenance;
pub mod memory_check;
pub mod memory_gate;
pub mod outcomes;
pub mod projection;
pub mod promote;
pub mod push;
pub mod redis_link;
pub mod redis_loss;
pub mod report;
pub mod rescue;
pub mod restore;
pub mod retention;
pub mod shared;
pub mod state_sync;
pub mod timer;
pub mod wake;

use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
use std::time::Duration;

/// Registers the bridge with the postmaster. Called from `_PG_init` when preloaded.
pub fn register() {
    register_worker("queue_pg bridge", "queue_pg_bridge_main");
}

/// Registers one of the extension's background workers (`name` is also its `backend_type`),
/// started once recovery finished and again 1 s after any exit.
pub fn register_worker(name: &str, function: &str) {
    BackgroundWorkerBuilder::new(name)
        .set_type(name)
        .set_function(function)
        .set_library("queue_pg")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // After a crash (or a SIGKILL) the postmaster starts it again.
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}
