//! The bridge: a background worker that moves committed jobs from `queue.jobs` into Redis.
//!
//! - `worker`: the main loop (signals, waits, one cycle after another).
//! - `redis_link`: the Redis connection, its reconnect backoff, and its state log lines.
//! - `promote`: scheduled and retrying jobs become `queued` when due.
//! - `dispatch`: queued jobs are read, pushed in one pipelined round trip, then marked `migrated`.
//! - `sync`: Redis follows committed state changes (job hashes, the dead-letter list).
//! - `rescue`: expired leases, popped-but-never-started jobs, a Redis that lost its data, pruning.
//! - `memory`: the periodic `queue.optimize_memory()` (job hash TTLs, dead-letter trimming).
//! - `shared`, `wake`: the shared-memory block and the commit-time wake-up used by backends.

pub mod dispatch;
pub mod memory;
pub mod promote;
pub mod redis_link;
pub mod rescue;
pub mod shared;
pub mod sync;
pub mod wake;
pub mod worker;

use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
use std::time::Duration;

/// Registers the bridge with the postmaster. Called from `_PG_init` when preloaded.
pub fn register() {
    BackgroundWorkerBuilder::new("queue_pg bridge")
        .set_type("queue_pg bridge")
        .set_function("queue_pg_bridge_main")
        .set_library("queue_pg")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // After a crash (or a SIGKILL) the postmaster starts it again.
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}
