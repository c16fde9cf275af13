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

/// Registers the applier with the postmaster. Called from `_PG_init` when preloaded.
pub fn register() {
    crate::bridge::register_worker("queue_pg reports", "queue_pg_reports_main");
}
