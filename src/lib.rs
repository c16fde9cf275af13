//! queue_pg: Postgres as the durable system of record for background jobs, Redis as their fast
//! dispatch layer.
//!
//! The data's path: SQL API (`api`) → tables (`sql/schema.sql`) → bridge (`bridge`) → Redis
//! (`redis`). Settings live in `settings`.

use pgrx::prelude::*;

pub mod api;
pub mod bridge;
pub mod monitor;
pub mod redis;
pub mod settings;
pub mod spi_plans;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
// PL/pgSQL: a thin trigger over queue.enqueue(), whose checks and wake-up it reuses.
extension_sql_file!("../sql/enqueue_row.sql", name = "enqueue_row");

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::register();
    // Shared memory and the bridge only exist when preloaded (shared_preload_libraries).
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        bridge::shared::init();
        bridge::register();
    }
}
