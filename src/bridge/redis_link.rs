//! The bridge's Redis connection: connects lazily, retries with a capped exponential backoff
//! while Redis is unreachable, and logs once per change of state (never once per attempt).

use super::shared;
use crate::redis::{redact, Conn};
use crate::settings;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

pub struct RedisLink {
    url: String,
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
        RedisLink {
            url: settings::redis_url(),
            con: None,
            retry_at: None,
            backoff: FIRST_RETRY,
            reachable: None,
            fresh: false,
        }
    }

    /// After a reload: a new URL means a new connection.
    pub fn reload(&mut self) {
        let url = settings::redis_url();
        if url != self.url {
            log!(
                "queue_pg bridge: queue.redis_url changed to {}",
                redact(&url)
            );
            self.url = url;
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
            match Conn::open(&self.url, deadline, shared::shutdown_requested) {
                Ok(con) => {
                    if self.reachable != Some(true) {
                        let again = if self.reachable.is_some() {
                            " again"
                        } else {
                            ""
                        };
                        log!(
                            "queue_pg bridge: Redis at {} reachable{again}",
                            redact(&self.url)
                        );
                    }
                    self.reachable = Some(true);
                    shared::set_redis_connected(true);
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
        let deadline = Instant::now() + settings::redis_timeout();
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
        let error = crate::redis::conn::scrub(&error, &self.url);
        if self.reachable != Some(false) {
            warning!(
                "queue_pg bridge: Redis at {} unreachable: {error}; jobs stay in Postgres and are pushed when it is back",
                redact(&self.url)
            );
        }
        shared::record_error(&error);
        shared::set_redis_connected(false);
        self.reachable = Some(false);
        self.con = None;
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
