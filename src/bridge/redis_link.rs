//! The bridge's Redis connection: connects lazily, retries with a capped exponential backoff
//! while Redis is unreachable, and logs once per change of state (never once per attempt).
//!
//! The state is judged per cycle of the worker that owns the link ([`RedisLink::end_cycle`]): a
//! cycle in which any step failed leaves Redis unreachable, one whose steps all succeeded makes
//! it reachable. A cluster with one master down answers some steps and fails others; judged per
//! step, it would log a change twice per cycle.

use super::shared;
use crate::redis::{Client, Target};
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
    con: Option<Client>,
    /// While Redis is down: when to try again, and the delay after that.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// What was last logged: None before the first attempt.
    reachable: Option<bool>,
    /// A connection was opened and nothing has checked yet whether Redis kept its data.
    fresh: bool,
    /// This cycle so far: its first failure, and whether a step succeeded.
    cycle_error: Option<String>,
    cycle_ok: bool,
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
            cycle_error: None,
            cycle_ok: false,
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
            let opened = Client::open(
                &self.target,
                deadline,
                shared::shutdown_requested,
                Some(self.label),
            );
            match opened {
                Ok(con) => {
                    // Reachable once a step on it succeeds: a cluster may accept the
                    // connection and still fail every step (a master down).
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

    /// Whether the open connection is to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.con.as_ref().is_some_and(Client::is_cluster)
    }

    /// Runs `f` on the open connection: one step, which waits on Redis at most
    /// `queue.redis_timeout` in all. On an error, drops the connection (it may be mid-reply)
    /// and backs off. None if no connection is open or `f` failed.
    pub fn run<R>(&mut self, f: impl FnOnce(&mut Client) -> Result<R, String>) -> Option<R> {
        self.run_for(Duration::ZERO, f)
    }

    /// Like [`RedisLink::run`], for a step that also blocks on Redis for up to `block` (a
    /// blocking read): its deadline is `block` later.
    pub fn run_for<R>(
        &mut self,
        block: Duration,
        f: impl FnOnce(&mut Client) -> Result<R, String>,
    ) -> Option<R> {
        let deadline = Instant::now() + block + settings::redis_timeout();
        let con = self.con.as_mut()?;
        con.set_deadline(deadline);
        match f(con) {
            Ok(r) => {
                self.succeeded();
                Some(r)
            }
            Err(e) => {
                self.failed(e);
                None
            }
        }
    }

    /// Like [`RedisLink::run`], for a step whose result is worth keeping even when part of it
    /// failed (a batch some of whose queues were pushed): `f` returns both.
    pub fn run_partial<R>(
        &mut self,
        f: impl FnOnce(&mut Client) -> (R, Option<String>),
    ) -> Option<R> {
        let deadline = Instant::now() + settings::redis_timeout();
        let con = self.con.as_mut()?;
        con.set_deadline(deadline);
        let (r, error) = f(con);
        match error {
            None => self.succeeded(),
            Some(e) => self.failed(e),
        }
        Some(r)
    }

    fn succeeded(&mut self) {
        self.cycle_ok = true;
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
        if self.publish {
            shared::record_error(&error);
        }
        self.cycle_error.get_or_insert(error);
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_RETRY);
    }

    /// At the end of each cycle: logs a change of state, and after a cycle without failures
    /// the backoff starts over.
    pub fn end_cycle(&mut self) {
        let ok = std::mem::take(&mut self.cycle_ok);
        let reachable = match self.cycle_error.take() {
            Some(error) => {
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
                false
            }
            None if ok => {
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
                self.backoff = FIRST_RETRY;
                true
            }
            None => return,
        };
        self.reachable = Some(reachable);
        if self.publish {
            shared::set_redis_connected(reachable);
        }
    }

    /// How long until the next connection attempt is due (None when connected).
    pub fn retry_in(&self) -> Option<Duration> {
        self.retry_at
            .filter(|_| self.con.is_none())
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}
