//! The report applier: a second background worker that moves what workers report through Redis
//! (`XADD queue_pg:{<queue>}:reports …`: start, heartbeat, complete, fail) into Postgres, in
//! set-based batches with the lifecycle's own transitions (`lifecycle::transitions`), so a report
//! has exactly the effect of the SQL call it stands for.
//!
//! It is a worker of its own, not a duty of the bridge: it blocks on the report streams
//! (`XREAD BLOCK`, bounded), so a report is applied as soon as it arrives without the bridge
//! polling Redis, and on two cores applying runs beside dispatching. Its commits are synchronous:
//! a report leaves Redis only once its effect is durable (`main_loop`).
//!
//! - `main_loop`: connect, read a batch, apply it, delete what was applied.
//! - `streams`: which queues' streams to read, and where each read left off.
//! - `apply`: one batch in one transaction; reports that do not fit are counted by reason.
//! - `shared`: what the applier publishes for `health()` and `metrics()`.

pub mod apply;
pub mod main_loop;
pub mod shared;
pub mod streams;

use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
use std::time::Duration;

/// Registers the applier with the postmaster. Called from `_PG_init` when preloaded.
pub fn register() {
    BackgroundWorkerBuilder::new("queue_pg reports")
        .set_type("queue_pg reports")
        .set_function("queue_pg_reports_main")
        .set_library("queue_pg")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}
