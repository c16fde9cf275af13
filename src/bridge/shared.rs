//! The bridge's shared-memory block: how backends wake it, and what it publishes about itself.
//! Atomics, plus the text of its last error behind an LWLock that is held only to copy it
//! (never while anyone waits on Redis).

use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, AtomicUsize, Ordering};

#[derive(Default)]
pub struct BridgeShared {
    /// Address of the bridge's process latch (0 while no bridge runs).
    latch: AtomicUsize,
    pid: AtomicI32,
    /// Unix time in microseconds when the bridge last finished a cycle.
    last_cycle_us: AtomicI64,
    dispatched_total: AtomicU64,
    /// Batches dispatch pushed, and the writes to Redis nodes they took (one per node per
    /// batch, more after cluster redirects).
    push_batches_total: AtomicU64,
    push_round_trips_total: AtomicU64,
    /// A restore of Redis after data loss is under way; what restores put back so far.
    restoring: AtomicBool,
    restored_dead_letters_total: AtomicU64,
    restored_job_hashes_total: AtomicU64,
    /// Failed attempts scheduled for a retry, and jobs that died (moved to the dead letters),
    /// as the bridge applied them to Redis.
    retried_total: AtomicU64,
    dead_lettered_total: AtomicU64,
    errors_total: AtomicU64,
    redis_connected: AtomicBool,
    /// The lowest id that committed transactions made `queued` since the bridge last looked
    /// (i64::MAX: none; 0, the start value, means from the beginning).
    queued_from: AtomicI64,
    /// A commit that only changed job states has set the latch since the bridge's last cycle
    /// began: later ones need not wake it again.
    states_wake_sent: AtomicBool,
    /// Bumped when the bridge pushes to a queue for the first time since it started: the report
    /// applier then reads that queue's report stream too.
    queues_generation: AtomicU64,
}

unsafe impl PGRXSharedMemory for BridgeShared {}

pub static SHARED: PgAtomic<BridgeShared> = unsafe { PgAtomic::new(c"queue_pg_bridge") };

/// The bridge's last error message (already free of passwords), truncated to fit.
#[derive(Clone, Copy)]
pub struct ErrorText {
    len: usize,
    bytes: [u8; 240],
}

impl Default for ErrorText {
    fn default() -> Self {
        ErrorText {
            len: 0,
            bytes: [0; 240],
        }
    }
}

unsafe impl PGRXSharedMemory for ErrorText {}

pub static LAST_ERROR: PgLwLock<ErrorText> =
    unsafe { PgLwLock::new(c"queue_pg_bridge_last_error") };

/// How many queues [`Stranded`] names; the jobs of any further ones are summed in `more`.
const STRANDED_QUEUES: usize = 32;

/// Per queue, the migrated jobs the bridge found in no Redis list for longer than
/// `queue.start_timeout` and could not dispatch again at its last rescue pass (another
/// transaction held them). Normally empty: such jobs are dispatched again at once.
#[derive(Clone, Copy)]
pub struct Stranded {
    n: usize,
    queues: [([u8; 64], u8, i64); STRANDED_QUEUES],
    more: i64,
}

impl Default for Stranded {
    fn default() -> Self {
        Stranded {
            n: 0,
            queues: [([0; 64], 0, 0); STRANDED_QUEUES],
            more: 0,
        }
    }
}

unsafe impl PGRXSharedMemory for Stranded {}

pub static STRANDED: PgLwLock<Stranded> = unsafe { PgLwLock::new(c"queue_pg_bridge_stranded") };

/// Set in the postmaster when the block is requested; every backend inherits it by fork.
static IN_SHARED_MEMORY: AtomicBool = AtomicBool::new(false);

/// Requests the shared memory; called from `_PG_init` while loading from shared_preload_libraries.
pub fn init() {
    pgrx::pg_shmem_init!(SHARED);
    pgrx::pg_shmem_init!(LAST_ERROR);
    pgrx::pg_shmem_init!(STRANDED);
    IN_SHARED_MEMORY.store(true, Ordering::Relaxed);
}

/// The block, or None when queue_pg was not preloaded (then there is no bridge either).
fn shared() -> Option<&'static BridgeShared> {
    IN_SHARED_MEMORY
        .load(Ordering::Relaxed)
        .then(|| SHARED.get())
}

/// Sets the bridge's latch. Never raises: safe in a commit callback.
pub fn wake_bridge() {
    if let Some(s) = shared() {
        let latch = s.latch.load(Ordering::Acquire);
        if latch != 0 {
            unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
        }
    }
}

/// Wakes the bridge for state changes to apply to Redis, once per bridge cycle: a stream of
/// workers' acknowledgements does not wake it for each. Never raises.
pub fn wake_bridge_for_states() {
    if let Some(s) = shared() {
        if !s.states_wake_sent.swap(true, Ordering::AcqRel) {
            wake_bridge();
        }
    }
}

/// Whether commits changed job states since the bridge last took them.
pub fn states_pending() -> bool {
    shared().is_some_and(|s| s.states_wake_sent.load(Ordering::Acquire))
}

/// SIGTERM reached the bridge (a fast shutdown, or pg_terminate_backend).
pub fn shutdown_requested() -> bool {
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

/// Called by the bridge before it reads the state changes.
pub fn states_wake_taken() {
    if let Some(s) = shared() {
        s.states_wake_sent.store(false, Ordering::Release);
    }
}

/// Called by the bridge when it starts: from now on commits wake it.
pub fn publish_bridge_process() {
    if let Some(s) = shared() {
        let latch = unsafe { &raw mut (*pg_sys::MyProc).procLatch } as usize;
        s.pid.store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
        s.latch.store(latch, Ordering::Release);
    }
}

/// Called by the bridge when it exits.
pub fn clear_bridge_process() {
    if let Some(s) = shared() {
        s.latch.store(0, Ordering::Release);
        s.pid.store(0, Ordering::Release);
        s.redis_connected.store(false, Ordering::Relaxed);
        *STRANDED.exclusive() = Stranded::default();
    }
}

/// Called at commit by a transaction that made jobs from `id` up `queued`. Never raises.
pub fn note_queued_from(id: i64) {
    if let Some(s) = shared() {
        s.queued_from.fetch_min(id, Ordering::AcqRel);
    }
}

/// Whether transactions that committed since the last [`take_queued_from`] queued jobs.
pub fn queued_pending() -> bool {
    shared().is_some_and(|s| s.queued_from.load(Ordering::Acquire) != i64::MAX)
}

/// The lowest id made `queued` by transactions that committed since the last call.
pub fn take_queued_from() -> i64 {
    shared().map_or(0, |s| s.queued_from.swap(i64::MAX, Ordering::AcqRel))
}

/// Unix time in microseconds: the clock of `last_cycle_us`.
pub fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

thread_local! {
    /// The queues this bridge process has pushed to, and whether one was new since the last
    /// [`publish_new_queues`].
    static PUSHED_TO: std::cell::RefCell<(std::collections::HashSet<String>, bool)> = Default::default();
}

/// Called by the bridge for each queue it pushes to.
pub fn note_queue_pushed(queue: &str) {
    PUSHED_TO.with(|seen| {
        let (seen, new) = &mut *seen.borrow_mut();
        if !seen.contains(queue) {
            seen.insert(queue.to_owned());
            *new = true;
        }
    });
}

/// Called by the bridge once the jobs it pushed are marked (committed): if any went to a queue
/// new to it, the report applier looks for new queues again.
pub fn publish_new_queues() {
    let new = PUSHED_TO.with(|seen| std::mem::take(&mut seen.borrow_mut().1));
    if let (true, Some(s)) = (new, shared()) {
        s.queues_generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Changes whenever the bridge pushed to a queue it had not pushed to before.
pub fn queues_generation() -> u64 {
    shared().map_or(0, |s| s.queues_generation.load(Ordering::Acquire))
}

/// Called by the bridge at the end of each cycle.
pub fn record_cycle() {
    if let Some(s) = shared() {
        s.last_cycle_us.store(unix_micros(), Ordering::Relaxed);
    }
}

pub fn add_dispatched(n: u64) {
    if let Some(s) = shared() {
        s.dispatched_total.fetch_add(n, Ordering::Relaxed);
    }
}

/// A batch was pushed in `round_trips` writes to Redis nodes.
pub fn add_push_batch(round_trips: u64) {
    if let Some(s) = shared() {
        s.push_batches_total.fetch_add(1, Ordering::Relaxed);
        s.push_round_trips_total
            .fetch_add(round_trips, Ordering::Relaxed);
    }
}

pub fn set_restoring(running: bool) {
    if let Some(s) = shared() {
        s.restoring.store(running, Ordering::Relaxed);
    }
}

pub fn add_restored(dead_letters: u64, job_hashes: u64) {
    if let Some(s) = shared() {
        s.restored_dead_letters_total
            .fetch_add(dead_letters, Ordering::Relaxed);
        s.restored_job_hashes_total
            .fetch_add(job_hashes, Ordering::Relaxed);
    }
}

pub fn add_outcomes(retried: u64, dead_lettered: u64) {
    if let Some(s) = shared() {
        s.retried_total.fetch_add(retried, Ordering::Relaxed);
        s.dead_lettered_total
            .fetch_add(dead_lettered, Ordering::Relaxed);
    }
}

pub fn set_redis_connected(connected: bool) {
    if let Some(s) = shared() {
        s.redis_connected.store(connected, Ordering::Relaxed);
    }
}

/// Counts an error and keeps its text for monitoring.
pub fn record_error(message: &str) {
    if let Some(s) = shared() {
        s.errors_total.fetch_add(1, Ordering::Relaxed);
        let mut text = LAST_ERROR.exclusive();
        let mut end = message.len().min(text.bytes.len());
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        text.bytes[..end].copy_from_slice(&message.as_bytes()[..end]);
        text.len = end;
    }
}

/// Called by the bridge after each rescue pass: (queue, jobs) for every queue with stranded jobs.
pub fn publish_stranded(queues: &[(String, i64)]) {
    if shared().is_none() {
        return;
    }
    let mut table = Stranded::default();
    for (queue, jobs) in queues {
        let name = queue.as_bytes();
        if table.n < STRANDED_QUEUES && name.len() <= 64 {
            let entry = &mut table.queues[table.n];
            entry.0[..name.len()].copy_from_slice(name);
            entry.1 = name.len() as u8;
            entry.2 = *jobs;
            table.n += 1;
        } else {
            table.more += jobs;
        }
    }
    *STRANDED.exclusive() = table;
}

/// What the bridge last published of stranded jobs: per queue, and those of queues it did not
/// name. None when queue_pg was not preloaded.
pub fn stranded() -> Option<(Vec<(String, i64)>, i64)> {
    shared()?;
    let table = *STRANDED.share();
    let queues = table.queues[..table.n]
        .iter()
        .map(|(name, len, jobs)| {
            (
                String::from_utf8_lossy(&name[..*len as usize]).into_owned(),
                *jobs,
            )
        })
        .collect();
    Some((queues, table.more))
}

/// What the bridge published, for monitoring.
pub struct BridgeStatus {
    pub pid: i32,
    pub last_cycle_us: i64,
    pub dispatched_total: u64,
    pub push_batches_total: u64,
    pub push_round_trips_total: u64,
    pub restoring: bool,
    pub restored_dead_letters_total: u64,
    pub restored_job_hashes_total: u64,
    pub retried_total: u64,
    pub dead_lettered_total: u64,
    pub errors_total: u64,
    pub last_error: Option<String>,
    pub redis_connected: bool,
}

/// What the bridge published; None when queue_pg was not preloaded.
pub fn status() -> Option<BridgeStatus> {
    shared().map(|s| {
        let text = *LAST_ERROR.share();
        BridgeStatus {
            pid: s.pid.load(Ordering::Acquire),
            last_cycle_us: s.last_cycle_us.load(Ordering::Relaxed),
            dispatched_total: s.dispatched_total.load(Ordering::Relaxed),
            push_batches_total: s.push_batches_total.load(Ordering::Relaxed),
            push_round_trips_total: s.push_round_trips_total.load(Ordering::Relaxed),
            restoring: s.restoring.load(Ordering::Relaxed),
            restored_dead_letters_total: s.restored_dead_letters_total.load(Ordering::Relaxed),
            restored_job_hashes_total: s.restored_job_hashes_total.load(Ordering::Relaxed),
            retried_total: s.retried_total.load(Ordering::Relaxed),
            dead_lettered_total: s.dead_lettered_total.load(Ordering::Relaxed),
            errors_total: s.errors_total.load(Ordering::Relaxed),
            redis_connected: s.redis_connected.load(Ordering::Relaxed),
            last_error: (text.len > 0)
                .then(|| String::from_utf8_lossy(&text.bytes[..text.len]).into_owned()),
        }
    })
}
