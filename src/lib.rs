//! queue_pg: Postgres as the durable system of record for background jobs, Redis as their fast
//! dispatch layer.
//!
//! The data's path: SQL API (`api`) → tables (`sql/schema.sql`) → bridge (`bridge`) → Redis
//! (`redis`). The rules every path shares (job states, priorities, the backoff and dead-letter
//! rule) live in `lifecycle`; what operators look at in `monitor`; settings in `settings`.
//! Dependencies point one way: `api` and `monitor` use `bridge`'s wake-up and shared memory,
//! `bridge` uses `lifecycle` and `redis`, and those two use neither.
//!
//! Errors, one idiom per layer:
//! - SQL functions (`api`, `monitor`): bad input, or a call that does not fit the job's state,
//!   is an ERROR with a fitting SQLSTATE (`api::errors`); a failed statement of queue_pg's own
//!   is an ERROR (XX000) that says which. Never a default value in place of a failure.
//!   `queue.health()` is the exception that never raises: a failure is `unhealthy`, with why.
//! - Helpers (`lifecycle`, `redis`, `spi_plans`): return `Result<_, String>`; the caller decides.
//! - The bridge: a failed statement is an ERROR that `bridge::context::in_transaction` records
//!   for `health()` before the bridge exits and the postmaster restarts it; a failed Redis call
//!   is `None` from `RedisLink::run`, which logs once per outage and backs off, while the jobs
//!   wait in Postgres.

use pgrx::prelude::*;

pub mod api;
pub mod bridge;
pub mod extension;
pub mod lifecycle;
pub mod monitor;
pub mod redis;
pub mod reports;
pub mod settings;
pub mod spi_plans;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
// PL/pgSQL: a thin trigger over queue.enqueue(), whose checks and wake-up it reuses.
extension_sql_file!("../sql/enqueue_row.sql", name = "enqueue_row");
// Roles, grants, SECURITY DEFINER and the fixed search_path: after every function exists.
extension_sql_file!("../sql/privileges.sql", name = "privileges", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::register();
    // Shared memory and the bridge only exist when preloaded (shared_preload_libraries).
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        bridge::shared::init();
        bridge::register();
        reports::shared::init();
        reports::register();
    }
}
