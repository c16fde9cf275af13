//! Waking the bridge when a transaction that created work commits.
//!
//! SQL functions that make work for the bridge (enqueue, fail, replay, …) call
//! [`wake_on_commit`], and those that make jobs `queued` call [`wake_on_commit_queued`] with the
//! lowest such id. The transaction callback then, on COMMIT, publishes that id in shared memory
//! (the bridge reads queued jobs from there up, not from the start: see `context::ReadFrom`) and
//! sets the bridge's latch; on ABORT it does nothing, so a rolled-back enqueue never even wakes
//! the bridge.
//! The callback only touches atomics and calls SetLatch: it cannot raise an ERROR, allocate, or
//! panic.

use super::shared::{note_queued_from, wake_bridge, wake_bridge_for_states};
use pgrx::pg_sys;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// Backend-local: this transaction made work for the bridge.
static WAKE_PENDING: AtomicBool = AtomicBool::new(false);
/// Backend-local: the lowest id this transaction made `queued` (i64::MAX: none).
static QUEUED_FROM: AtomicI64 = AtomicI64::new(i64::MAX);
/// Backend-local: the callback is registered (once per backend, for its whole life).
static REGISTERED: AtomicBool = AtomicBool::new(false);

/// Wake the bridge when the current transaction commits.
pub fn wake_on_commit() {
    if !REGISTERED.swap(true, Ordering::Relaxed) {
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
    }
    WAKE_PENDING.store(true, Ordering::Relaxed);
}

/// Wake the bridge when the current transaction commits, and tell it that jobs from `id` up
/// became `queued`.
pub fn wake_on_commit_queued(id: i64) {
    wake_on_commit();
    QUEUED_FROM.fetch_min(id, Ordering::Relaxed);
}

unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    let wake = match event {
        // Called after the transaction became visible: the bridge, reading after it saw the
        // published id, sees the jobs.
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            WAKE_PENDING.swap(false, Ordering::Relaxed)
        }
        // A prepared transaction commits later, elsewhere: the bridge's periodic sweep
        // finds its jobs.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            WAKE_PENDING.store(false, Ordering::Relaxed);
            QUEUED_FROM.store(i64::MAX, Ordering::Relaxed);
            false
        }
        _ => false,
    };
    if wake {
        let from = QUEUED_FROM.swap(i64::MAX, Ordering::Relaxed);
        if from != i64::MAX {
            note_queued_from(from);
            wake_bridge();
        } else {
            wake_bridge_for_states();
        }
    }
}
