//! Waking the bridge when a transaction that created work commits.
//!
//! SQL functions that make jobs ready (enqueue, fail, replay, …) call [`wake_on_commit`]. The
//! transaction callback then sets the bridge's latch on COMMIT, and does nothing on ABORT, so a
//! rolled-back enqueue never even wakes the bridge. The callback only flips a flag and calls
//! SetLatch: it cannot raise an ERROR, allocate, or panic.

use super::shared::wake_bridge;
use pgrx::pg_sys;
use std::sync::atomic::{AtomicBool, Ordering};

/// Backend-local: this transaction made work for the bridge.
static WAKE_PENDING: AtomicBool = AtomicBool::new(false);
/// Backend-local: the callback is registered (once per backend, for its whole life).
static REGISTERED: AtomicBool = AtomicBool::new(false);

/// Wake the bridge when the current transaction commits.
pub fn wake_on_commit() {
    if !REGISTERED.swap(true, Ordering::Relaxed) {
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
    }
    WAKE_PENDING.store(true, Ordering::Relaxed);
}

unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    let wake = match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            WAKE_PENDING.swap(false, Ordering::Relaxed)
        }
        // A prepared transaction commits later, elsewhere: the bridge's poll picks it up.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            WAKE_PENDING.store(false, Ordering::Relaxed);
            false
        }
        _ => false,
    };
    if wake {
        wake_bridge();
    }
}
