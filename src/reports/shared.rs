//! What the report applier publishes in shared memory: atomics only, for `health()`,
//! `metrics()` and `prometheus()`. Rejections are counted durably in `queue.rejected_reports`.

use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};

#[derive(Default)]
pub struct ReportsShared {
    pid: AtomicI32,
    redis_connected: AtomicBool,
    applied_total: AtomicU64,
    rejected_total: AtomicU64,
    batches_total: AtomicU64,
    /// Of the last batch: from the oldest report's XADD to the commit that applied it, in µs.
    last_lag_us: AtomicI64,
    /// Unix time in µs when the last batch was committed (0: none yet).
    last_batch_us: AtomicI64,
}

unsafe impl PGRXSharedMemory for ReportsShared {}

static SHARED: PgAtomic<ReportsShared> = unsafe { PgAtomic::new(c"queue_pg_reports") };

static IN_SHARED_MEMORY: AtomicBool = AtomicBool::new(false);

/// Requests the shared memory; called from `_PG_init` while preloading.
pub fn init() {
    pgrx::pg_shmem_init!(SHARED);
    IN_SHARED_MEMORY.store(true, Ordering::Relaxed);
}

fn shared() -> Option<&'static ReportsShared> {
    IN_SHARED_MEMORY
        .load(Ordering::Relaxed)
        .then(|| SHARED.get())
}

pub fn publish_process(running: bool) {
    if let Some(s) = shared() {
        let pid = if running {
            unsafe { pg_sys::MyProcPid }
        } else {
            0
        };
        s.pid.store(pid, Ordering::Release);
        if !running {
            s.redis_connected.store(false, Ordering::Relaxed);
        }
    }
}

pub fn set_redis_connected(connected: bool) {
    if let Some(s) = shared() {
        s.redis_connected.store(connected, Ordering::Relaxed);
    }
}

/// After a batch committed.
pub fn record_batch(applied: u64, rejected: u64, lag_us: i64, at_us: i64) {
    if let Some(s) = shared() {
        s.applied_total.fetch_add(applied, Ordering::Relaxed);
        s.rejected_total.fetch_add(rejected, Ordering::Relaxed);
        s.batches_total.fetch_add(1, Ordering::Relaxed);
        s.last_lag_us.store(lag_us, Ordering::Relaxed);
        s.last_batch_us.store(at_us, Ordering::Relaxed);
    }
}

/// What the applier published.
pub struct ReportsStatus {
    pub pid: i32,
    pub redis_connected: bool,
    pub applied_total: u64,
    pub rejected_total: u64,
    pub batches_total: u64,
    pub last_lag_us: i64,
    pub last_batch_us: i64,
}

/// None when queue_pg was not preloaded.
pub fn status() -> Option<ReportsStatus> {
    shared().map(|s| ReportsStatus {
        pid: s.pid.load(Ordering::Acquire),
        redis_connected: s.redis_connected.load(Ordering::Relaxed),
        applied_total: s.applied_total.load(Ordering::Relaxed),
        rejected_total: s.rejected_total.load(Ordering::Relaxed),
        batches_total: s.batches_total.load(Ordering::Relaxed),
        last_lag_us: s.last_lag_us.load(Ordering::Relaxed),
        last_batch_us: s.last_batch_us.load(Ordering::Relaxed),
    })
}
