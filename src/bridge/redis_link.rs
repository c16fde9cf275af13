//! The bridge's Redis connection: connects lazily, retries with a capped exponential backoff
//! while Redis is unreachable, and logs once per change of state (never once per attempt).

use super::shared;
use crate::redis::{Conn, Target};
use crate::settings;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

pub struct RedisLink {
    /// Who logs: "queue_pg bridge" or "queue_pg reports".
    label: &'static str,
    /// Whether this link's state is the one `health()` shows (the bridge's).
    publish: bool,
    target: Target,
    con: Option<Conn>,
    /// While Redis is down: when to try again, and the delay after that.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// What was last logged: None before the first attempt.
    reachable: Option<bool>,
    /// A connection was opened and nothing has checked yet whether Redis kept its data.
    fresh: bool,
}

impl RedisLink {
    pub fn from_settings() -> Self {
        Self::for_worker("queue_pg bridge", true)
    }

    /// A link for another background worker of the extension, logging as `label`.
    pub fn for_worker(label: &'static str, publish: bool) -> Self {
        RedisLink {
            label,
            publish,
            target: Target::from_settings(),
            con: None,
            retry_at: None,
            backoff: FIRST_RETRY,
            reachable: None,
            fresh: false,
        }
    }

    /// After a reload: a new URL (or TLS or password file setting) means a new connection.
    pub fn reload(&mut self) {
        let target = Target::from_settings();
        if target != self.target {
            log!(
                "{}: Redis connection settings changed; now {}",
                self.label,
                target.redacted()
            );
            self.target = target;
            self.con = None;
            self.retry_at = None;
            self.backoff = FIRST_RETRY;
        }
    }

    /// Opens a connection if none is open and the backoff allows; true if one is open. Only
    /// the start of a bridge cycle connects, so that every new connection is checked for lost
    /// data (`redis_loss`) before any other duty uses it.
    pub fn connect(&mut self) -> bool {
        if self.con.is_none() {
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                return false;
            }
            let deadline = Instant::now() + settings::redis_timeout();
            // A wait on Redis ends early when the bridge is asked to stop (SIGTERM), so that a
            // fast shutdown stays fast with a frozen Redis.
            let opened = Conn::open(&self.target, deadline, shared::shutdown_requested)
                .and_then(|mut con| name_connection(&mut con, self.label).map(|_| con));
            match opened {
                Ok(con) => {
                    if self.reachable != Some(true) {
                        let again = if self.reachable.is_some() {
                            " again"
                        } else {
                            ""
                        };
                        log!(
                            "{}: Redis at {} reachable{again}",
                            self.label,
                            self.target.redacted()
                        );
                    }
                    self.reachable = Some(true);
                    if self.publish {
                        shared::set_redis_connected(true);
                    }
                    self.retry_at = None;
                    self.backoff = FIRST_RETRY;
                    self.con = Some(con);
                    self.fresh = true;
                }
                Err(e) => {
                    self.failed(e);
                    return false;
                }
            }
        }
        true
    }

    /// Whether a connection is open.
    pub fn connected(&self) -> bool {
        self.con.is_some()
    }

    /// Runs `f` on the open connection: one step, which waits on Redis at most
    /// `queue.redis_timeout` in all. On an error, drops the connection (it may be mid-reply)
    /// and backs off. None if no connection is open or `f` failed.
    pub fn run<R>(&mut self, f: impl FnOnce(&mut Conn) -> Result<R, String>) -> Option<R> {
        self.run_for(Duration::ZERO, f)
    }

    /// Like [`RedisLink::run`], for a step that also blocks on Redis for up to `block` (a
    /// blocking read): its deadline is `block` later.
    pub fn run_for<R>(
        &mut self,
        block: Duration,
        f: impl FnOnce(&mut Conn) -> Result<R, String>,
    ) -> Option<R> {
        let deadline = Instant::now() + block + settings::redis_timeout();
        let con = self.con.as_mut()?;
        con.set_deadline(deadline);
        match f(con) {
            Ok(r) => Some(r),
            Err(e) => {
                self.failed(e);
                None
            }
        }
    }

    /// Whether the open connection is new and nothing has checked yet whether Redis kept its
    /// data.
    pub fn fresh(&self) -> bool {
        self.fresh && self.con.is_some()
    }

    /// True once after each new connection: the caller checks, before pushing anything on it,
    /// whether Redis still has its data (it may have restarted while unreachable).
    pub fn take_fresh(&mut self) -> bool {
        std::mem::take(&mut self.fresh)
    }

    /// A command failed: drop the connection and back off. Jobs stay in Postgres meanwhile.
    pub fn failed(&mut self, error: String) {
        let error = self.target.scrub(&error);
        self.con = None;
        if shared::shutdown_requested() {
            return; // the wait was cut short to stop, Redis is not at fault
        }
        if self.reachable != Some(false) {
            let meanwhile = if self.publish {
                "jobs stay in Postgres and are pushed when it is back"
            } else {
                "reports wait in Redis and are applied when it is back"
            };
            warning!(
                "{}: Redis at {} unreachable: {error}; {meanwhile}",
                self.label,
                self.target.redacted()
            );
        }
        if self.publish {
            shared::record_error(&error);
            shared::set_redis_connected(false);
        }
        self.reachable = Some(false);
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_RETRY);
    }

    /// How long until the next connection attempt is due (None when connected).
    pub fn retry_in(&self) -> Option<Duration> {
        self.retry_at
            .filter(|_| self.con.is_none())
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}

/// Names the connection after its worker ("queue_pg-bridge"), so that `CLIENT LIST` shows whose it
/// is. A refusal (an ACL user without `CLIENT`) leaves it unnamed; only a broken connection is an
/// error.
fn name_connection(con: &mut Conn, label: &str) -> Result<(), String> {
    match redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(label.replace(' ', "-"))
        .query::<()>(con)
    {
        Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
            Err(e.to_string())
        }
        _ => Ok(()),
    }
}
