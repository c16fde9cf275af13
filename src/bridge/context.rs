//! What the bridge's duties share: the Redis connection, the key names, where dispatch reads
//! queued jobs from, and the one way they open a transaction.

use super::memory_gate::MemoryGate;
use super::redis_link::RedisLink;
use super::shared;
use crate::extension::{self, Installed};
use crate::redis::Keys;
use crate::settings;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;

pub struct Context {
    pub redis: RedisLink,
    pub keys: Keys,
    pub read_from: ReadFrom,
    /// Redis lost data: what it projects of Postgres is to be put back (`restore`).
    pub restore_wanted: bool,
    /// Queues whose epoch key a push found gone (cluster), with that push's first number:
    /// `redis_loss` looks for their jobs pushed before it.
    pub suspect_queues: Vec<(String, i64)>,
    /// Whether Redis has room for more (dispatch and restore hold back when it has not).
    pub memory_gate: MemoryGate,
}

impl Context {
    pub fn from_settings() -> Context {
        Context {
            redis: RedisLink::from_settings(),
            keys: Keys::new(settings::redis_prefix()),
            read_from: ReadFrom::default(),
            restore_wanted: false,
            suspect_queues: Vec::new(),
            memory_gate: MemoryGate::default(),
        }
    }

    /// After SIGHUP.
    pub fn reload(&mut self) {
        self.keys = Keys::new(settings::redis_prefix());
        self.redis.reload();
    }
}

/// Where dispatch reads queued jobs from. Not from the lowest id, which would mean walking past
/// every job of a paused queue on every cycle, but from the lowest id that became `queued` since
/// the last drain: backends publish that id at commit (`wake`), and duties that make jobs
/// `queued` again (promotion, rescue) rewind it themselves.
pub struct ReadFrom {
    /// Every queued job of an unpaused queue below this id is in Redis, except those published
    /// in shared memory since (i64::MAX: all are; 0: read from the start).
    drained_below: i64,
}

impl Default for ReadFrom {
    /// A new bridge reads from the start.
    fn default() -> Self {
        ReadFrom { drained_below: 0 }
    }
}

impl ReadFrom {
    /// Jobs were made `queued` again somewhere below what was drained: read from the start.
    pub fn rewind(&mut self) {
        self.drained_below = 0;
    }

    /// The id the next drain starts at, taking what commits published meanwhile.
    pub fn take(&mut self) -> i64 {
        shared::take_queued_from().min(self.drained_below)
    }

    /// After a drain that started at `from`: if it emptied the backlog, the next starts at
    /// whatever commits publish meanwhile; if not (Redis failed), at `from` again.
    pub fn drained(&mut self, complete: bool, from: i64) {
        self.drained_below = if complete { i64::MAX } else { from };
    }
}

/// The start of each of the extension's background workers: signal handlers (SIGHUP, SIGTERM),
/// a connection to `queue.database`, and the session settings it runs with (`SET` statements).
/// `name` starts its log lines. Returns the database's name.
pub fn start_worker(name: &'static str, session: &[&str]) -> String {
    WORKER.with(|w| w.name.set(name));
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = settings::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    for statement in session {
        BackgroundWorker::transaction(|| Spi::run(statement))
            .unwrap_or_else(|e| panic!("{statement} failed: {e}"));
    }
    database
}

/// Whether SIGHUP arrived since the last call; if so, the configuration file has been reread.
pub fn config_reloaded() -> bool {
    if !BackgroundWorker::sighup_received() {
        return false;
    }
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    true
}

/// Runs `f` in a transaction of its own with an SPI connection. An ERROR or panic inside is
/// published as the bridge's last error (for `queue.health()`) before it ends the bridge, which
/// the postmaster then restarts; Postgres logs it.
pub fn in_transaction<R>(f: impl FnOnce(&mut SpiClient<'_>) -> R) -> R {
    let f = AssertUnwindSafe(f);
    let run = AssertUnwindSafe(move || {
        BackgroundWorker::transaction(move || {
            let f = f; // the whole wrapper, not just its field
            Spi::connect_mut(|client| (f.0)(client))
        })
    });
    match std::panic::catch_unwind(run) {
        Ok(r) => r,
        Err(payload) => {
            shared::record_error(&panic_message(payload.as_ref()));
            std::panic::resume_unwind(payload)
        }
    }
}

/// The message of an ERROR or panic caught in the bridge.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    use pgrx::pg_sys::panic::CaughtError;
    if let Some(e) = payload.downcast_ref::<CaughtError>() {
        let report = match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
            CaughtError::RustPanic { ereport, .. } => ereport,
        };
        return report.message().to_owned();
    }
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "the bridge panicked".into())
}

thread_local! {
    static WORKER: Worker = const {
        Worker {
            name: Cell::new("queue_pg"),
            found: RefCell::new(None),
        }
    };
}

/// This background worker process: its name, and what it last found of the extension.
struct Worker {
    name: Cell<&'static str>,
    found: RefCell<Option<Installed>>,
}

/// Whether the extension's SQL objects are there, at the library's version, in the worker's
/// database. Every duty checks in its first transaction: a missing extension, or one still at
/// another release's version (the library was replaced, `ALTER EXTENSION queue_pg UPDATE` not
/// yet run), means waiting, not an ERROR. Logs each change of what it finds.
pub fn extension_ready(client: &mut SpiClient<'_>) -> bool {
    let found = extension::installed(client)
        .unwrap_or_else(|e| pgrx::error!("queue_pg: checking for the extension failed: {e}"));
    let ready = found.ready();
    WORKER.with(|w| {
        let mut last = w.found.borrow_mut();
        if last.as_ref() == Some(&found) {
            return;
        }
        let name = w.name.get();
        let database = settings::database();
        match &found {
            Installed::Missing => log!(
                "{name}: extension queue_pg is not installed in database \"{database}\"; waiting for CREATE EXTENSION queue_pg"
            ),
            Installed::At(v) if !ready => warning!(
                "{name}: waiting in database \"{database}\": {}",
                extension::mismatch_message(v)
            ),
            Installed::At(v) if last.is_some() => {
                log!("{name}: extension queue_pg {v} found in database \"{database}\"; working")
            }
            Installed::At(_) => {}
        }
        *last = Some(found);
    });
    ready
}
