//! What operators look at: `queue.health()`, `queue.metrics()`, `queue.prometheus()`, and
//! `queue.optimize_memory()` for Redis's memory.

pub mod figures;
pub mod health;
pub mod metrics;
pub mod optimize_memory;
pub mod prometheus;
pub mod redis_probe;

// The figures are many small index scans: parallel workers would cost more to start than they
// save (measured: 25-29 ms with two workers, 17 ms without, at 1,000,000 jobs).
pgrx::extension_sql!(
    "ALTER FUNCTION queue.health() SET max_parallel_workers_per_gather = 0;
     ALTER FUNCTION queue.metrics() SET max_parallel_workers_per_gather = 0;
     ALTER FUNCTION queue.prometheus() SET max_parallel_workers_per_gather = 0;",
    name = "monitoring_without_parallel_workers",
    requires = [health::health, metrics::metrics, prometheus::prometheus],
);
