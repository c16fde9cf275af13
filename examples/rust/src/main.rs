//! A queue_pg worker in Rust (redis + postgres crates), on either documented worker loop:
//!
//!   fast path (default): BLMPOP up to BATCH jobs  ->  handle() each  ->  XADD complete / fail
//!                        reports (pipelined; `start` and heartbeats only for jobs that run long)
//!   SQL path:            BRPOP  ->  queue.start(id)  ->  handle()  ->  queue.complete / queue.fail
//!
//!   cargo build --release
//!   DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
//!   REDIS_URL=redis://127.0.0.1:6379 QUEUES=emails,reports target/release/queue-pg-worker
//!
//! Put your work in `handle()`. Delivery is at-least-once: a job may run again after a crash, so
//! make `handle()` safe to repeat (idempotent). When Redis or Postgres goes away, the worker waits
//! for it (retrying after 0.1 s, then up to every 5 s; one log line when it goes, one when it is
//! back), keeps the job in hand and reports its outcome once it can; only SIGTERM stops it.
//! Settings (environment): DATABASE_URL, REDIS_URL
//! (rediss:// for TLS, with an ACL user: rediss://user:password@host:port), REDIS_TLS_CA_FILE (a
//! PEM file of the CAs that may sign the server's certificate; default: the system's),
//! REDIS_CLUSTER (1: REDIS_URL holds comma-separated seed URLs of a Redis Cluster; the worker then
//! pops one queue's lists at a time, in turn), QUEUES (comma-separated, highest priority lists
//! first across them), QUEUE_PG_PREFIX
//! (queue_pg), SHUTDOWN_GRACE_S (10: on SIGTERM, how long the job in hand may still run before it
//! is failed, and so retried later, instead of completed), QUEUE_PG_PATH (fast, or sql), and for
//! the fast path BATCH (10: jobs per pop) and LEASE_S (30: a job still running after a third of
//! it is reported started with this lease, then kept alive by a heartbeat every third; keep that
//! third below queue.start_timeout). The SQL path takes its lease from the queue (queue.lease).

use postgres::error::SqlState;
use postgres::{Client, NoTls};
use redis::ConnectionLike;
use serde_json::{json, Value};
use std::env;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Your work goes here: return a JSON result, or an error to fail the attempt (its text becomes
/// the job's error). This example's handler understands `{"sleep": seconds}` and
/// `{"fail": "message"}`, so the test suite can drive it.
fn handle(_job_id: i64, attempt: i32, payload: &Value) -> Result<Value, Error> {
    if let Some(seconds) = payload.get("sleep").and_then(Value::as_f64) {
        thread::sleep(Duration::from_secs_f64(seconds));
    }
    if let Some(message) = payload.get("fail").and_then(Value::as_str) {
        return Err(message.into());
    }
    Ok(json!({"worker": "rust", "attempt": attempt}))
}

fn setting(name: &str, default: &str) -> String {
    env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn log(message: &str) {
    eprintln!("[rust worker {}] {message}", std::process::id());
}

struct Job {
    id: i64,
    attempt: i32,
    payload: Value,
    lease: Duration,
}

const SHUTDOWN_ERROR: &str = "worker shut down (SIGTERM) before the job finished";

/// Runs the handler on its own thread; meanwhile calls `tick` every `tick_every`, and after
/// SIGTERM gives it `grace` more before failing the attempt.
fn run_handler(
    id: i64,
    attempt: i32,
    payload: Value,
    stopping: &AtomicBool,
    grace: Duration,
    tick_every: Duration,
    mut tick: impl FnMut(),
) -> Result<Value, String> {
    let (done, outcome) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(handle(id, attempt, &payload).map_err(|e| e.to_string()));
    });
    let mut next_tick = Instant::now() + tick_every;
    let mut deadline = None;
    loop {
        match outcome.recv_timeout(Duration::from_millis(50)) {
            Ok(outcome) => return outcome,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("the handler panicked".into()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= next_tick {
            next_tick += tick_every;
            tick();
        }
        if stopping.load(Ordering::Relaxed) {
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + grace);
            if Instant::now() >= deadline {
                // The handler thread is abandoned; the process exits soon.
                return Err(SHUTDOWN_ERROR.into());
            }
        }
    }
}

/// The SQL path: the job was started with queue.start; heartbeats (every third of the lease) and
/// the end go through SQL. The outcome is reported even if Postgres is away meanwhile: once it is
/// back (the attempt token makes a report that already went through harmless).
fn run(
    pg: &mut Link<Client>,
    job: Job,
    stopping: &AtomicBool,
    grace: Duration,
) -> Result<(), Error> {
    let (id, attempt) = (job.id, job.attempt);
    let beat_every = (job.lease / 3).max(Duration::from_millis(500));
    let outcome = run_handler(
        id,
        attempt,
        job.payload,
        stopping,
        grace,
        beat_every,
        || {
            // Skipped while Postgres is away (the report at the end waits for it).
            let Some(db) = pg.conn.as_mut() else { return };
            if let Err(e) = db.execute(
                "SELECT queue.heartbeat($1, attempt => $2)",
                &[&id, &attempt],
            ) {
                if postgres_down(&e) {
                    pg.conn = None;
                } else {
                    log(&format!("heartbeat for job {id} failed: {e}"));
                }
            }
        },
    );
    pg.call(stopping, |db| {
        let reported = match &outcome {
            Ok(result) => db.execute(
                "SELECT queue.complete($1, $2, $3)",
                &[&id, result, &attempt],
            ),
            Err(error) => db.execute("SELECT queue.fail($1, $2, $3)", &[&id, error, &attempt]),
        };
        match reported {
            Ok(_) => Ok(()),
            // Cancelled meanwhile, or the lease expired and the job moved on (or this report
            // already went through before a reconnect): nothing to report.
            Err(e) if e.code() == Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) => {
                log(&format!("job {id}: {e}"));
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    })
}

/// SIGTERM arrived while the worker waited on a server.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped while a server was unreachable")
    }
}

impl std::error::Error for Stopped {}

/// A connection to Redis or Postgres that rides out an outage: a call that fails for want of
/// the server is tried again on a new connection, after 0.1 s, then twice as long each time up
/// to 5 s, until it works (or SIGTERM). The log says once that the server is unreachable and
/// once that it is back, not once per retry.
struct Link<C> {
    name: &'static str,
    connect: Box<dyn Fn() -> Result<C, Error>>,
    /// Whether an error means the server is away (not that it refused the request).
    outage: fn(&Error) -> bool,
    conn: Option<C>,
    down: bool,
}

impl<C> Link<C> {
    fn new(
        name: &'static str,
        connect: impl Fn() -> Result<C, Error> + 'static,
        outage: fn(&Error) -> bool,
    ) -> Self {
        Link {
            name,
            connect: Box::new(connect),
            outage,
            conn: None,
            down: false,
        }
    }

    fn call<R>(
        &mut self,
        stopping: &AtomicBool,
        mut f: impl FnMut(&mut C) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut delay = Duration::from_millis(100);
        loop {
            let result = match self.conn.as_mut() {
                Some(conn) => f(conn),
                None => (self.connect)().and_then(|conn| f(self.conn.insert(conn))),
            };
            let error = match result {
                Ok(r) => {
                    if std::mem::take(&mut self.down) {
                        log(&format!("{} reachable again", self.name));
                    }
                    return Ok(r);
                }
                Err(e) if self.conn.is_none() || (self.outage)(&e) => e,
                Err(e) => return Err(e),
            };
            self.conn = None;
            // SIGTERM cuts a blocking read short (EINTR): that is no outage.
            if stopping.load(Ordering::Relaxed) {
                return Err(Box::new(Stopped));
            }
            if !self.down {
                log(&format!(
                    "{} unreachable ({error}); retrying until it is back",
                    self.name
                ));
                self.down = true;
            }
            let until = Instant::now() + delay;
            while Instant::now() < until && !stopping.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(20));
            }
            if stopping.load(Ordering::Relaxed) {
                return Err(Box::new(Stopped));
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// Redis is away: no answer, a server still loading its data or read-only (a failover under
/// way), or a cluster without a node for the slot.
fn redis_down(e: &Error) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.downcast_ref::<redis::RedisError>().is_some_and(|e| {
        e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_cluster_error()
            || matches!(
                e.kind(),
                ErrorKind::ClusterConnectionNotFound
                    | ErrorKind::Server(ServerErrorKind::BusyLoading)
                    | ErrorKind::Server(ServerErrorKind::ReadOnly)
                    | ErrorKind::Server(ServerErrorKind::MasterDown)
            )
    })
}

/// A Postgres error without an SQLSTATE (the connection), or of class 08 or 57P (shut down).
fn postgres_down(e: &postgres::Error) -> bool {
    e.is_closed()
        || e.as_db_error().is_none_or(|db| {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57P")
        })
}

fn postgres_down_boxed(e: &Error) -> bool {
    e.downcast_ref::<postgres::Error>()
        .is_some_and(postgres_down)
}

/// The fast path's reports: XADD to the job's queue's report stream, sent in one pipeline per
/// batch of jobs (or at once, for a job that runs long).
struct Reports {
    prefix: String,
    /// Per report stream: one pipeline (in a Redis Cluster a pipeline stays within one slot).
    pending: Vec<(String, redis::Pipeline)>,
}

impl Reports {
    fn add(&mut self, queue: &str, id: i64, attempt: i32, op: &str, fields: &[(&str, String)]) {
        let stream = format!("{}:{{{queue}}}:reports", self.prefix);
        let at = match self.pending.iter().position(|(s, _)| *s == stream) {
            Some(at) => at,
            None => {
                self.pending.push((stream.clone(), redis::pipe()));
                self.pending.len() - 1
            }
        };
        let cmd = self.pending[at]
            .1
            .cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("id")
            .arg(id)
            .arg("attempt")
            .arg(attempt)
            .arg("op")
            .arg(op);
        for (name, value) in fields {
            cmd.arg(*name).arg(value);
        }
        cmd.ignore();
    }

    /// Sends what is pending; while Redis is away it waits for it (see [`Link`]).
    fn flush<C: ConnectionLike>(
        &mut self,
        redis: &mut Link<C>,
        stopping: &AtomicBool,
    ) -> Result<(), Error> {
        let pending = &self.pending;
        redis.call(stopping, |conn| {
            for (_, pipe) in pending {
                if conn.supports_pipelining() {
                    pipe.query::<()>(conn)?;
                } else {
                    // The crate's synchronous cluster connection sends one command at a time.
                    for cmd in pipe.cmd_iter() {
                        cmd.query::<()>(conn)?;
                    }
                }
            }
            Ok(())
        })?;
        self.pending.clear();
        Ok(())
    }
}

/// The fast path: no claim in Postgres. A job still running after a third of `lease` is
/// reported started (with that lease), then kept alive by a heartbeat every third of it.
fn run_fast<C: ConnectionLike>(
    redis: &mut Link<C>,
    reports: &mut Reports,
    message: &Value,
    stopping: &AtomicBool,
    grace: Duration,
    lease: Duration,
) -> Result<(), Error> {
    let (Some(id), Some(attempt), Some(queue)) = (
        message["id"].as_i64(),
        message["attempt"]
            .as_i64()
            .and_then(|a| i32::try_from(a).ok()),
        message["queue"].as_str(),
    ) else {
        log(&format!(
            "skipping a message without id, attempt or queue: {message}"
        ));
        return Ok(());
    };
    let lease_ms = [("lease_ms", lease.as_millis().to_string())];
    let mut started = false;
    let mut report_error = None;
    let outcome = run_handler(
        id,
        attempt,
        message["payload"].clone(),
        stopping,
        grace,
        lease / 3,
        || {
            let op = if started { "heartbeat" } else { "start" };
            started = true;
            reports.add(queue, id, attempt, op, &lease_ms);
            if let Err(e) = reports.flush(redis, stopping) {
                report_error = Some(e);
            }
        },
    );
    if let Some(e) = report_error {
        return Err(e);
    }
    match outcome {
        Ok(result) => reports.add(
            queue,
            id,
            attempt,
            "complete",
            &[("result", result.to_string())],
        ),
        Err(error) => reports.add(queue, id, attempt, "fail", &[("error", error)]),
    }
    Ok(())
}

/// What `main` reads from the environment.
struct Config {
    database_url: String,
    prefix: String,
    grace: Duration,
    fast: bool,
    batch: usize,
    lease: Duration,
    /// The lists each pop covers: all of them on one server; in a Redis Cluster one queue's
    /// three at a time (they share a slot), taken in turn.
    pops: Vec<Vec<String>>,
    /// Seconds each pop waits: about one second per round over all of `pops`, so that SIGTERM
    /// is noticed within a second.
    pop_wait: f64,
}

fn main() -> Result<(), Error> {
    let redis_url = setting("REDIS_URL", "redis://127.0.0.1:6379");
    let cluster = setting("REDIS_CLUSTER", "0") == "1";
    let prefix = setting("QUEUE_PG_PREFIX", "queue_pg");
    let queues: Vec<String> = setting("QUEUES", "default")
        .split(',')
        .filter(|q| !q.is_empty())
        .map(str::to_owned)
        .collect();
    let lists =
        |queue: &String| ["high", "normal", "low"].map(|p| format!("{prefix}:{{{queue}}}:{p}"));
    let pops: Vec<Vec<String>> = if cluster {
        queues.iter().map(|q| lists(q).to_vec()).collect()
    } else {
        // Highest priority first across the queues.
        let all: Vec<[String; 3]> = queues.iter().map(lists).collect();
        vec![(0..3)
            .flat_map(|p| all.iter().map(move |l| l[p].clone()))
            .collect()]
    };
    let config = Config {
        database_url: setting(
            "DATABASE_URL",
            "postgresql://postgres@127.0.0.1:5432/postgres",
        ),
        grace: Duration::from_secs_f64(setting("SHUTDOWN_GRACE_S", "10").parse()?),
        fast: setting("QUEUE_PG_PATH", "fast") == "fast",
        batch: setting("BATCH", "10").parse()?,
        lease: Duration::from_secs_f64(setting("LEASE_S", "30").parse()?),
        pop_wait: (1.0 / pops.len() as f64).max(0.05),
        pops,
        prefix,
    };

    let stopping = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stopping))?;
    }
    // Every Redis call is bounded: pops wait 1 s, so a reply later than 5 s means Redis hangs.
    let limit = Duration::from_secs(5);
    let root_cert = match env::var("REDIS_TLS_CA_FILE") {
        Ok(ca_file) => Some(std::fs::read(ca_file)?),
        Err(_) => None,
    };
    let certs = move || {
        root_cert.clone().map(|root_cert| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        })
    };
    let database_url = config.database_url.clone();
    let pg = Link::new(
        "Postgres",
        move || Ok(Client::connect(&database_url, NoTls)?),
        postgres_down_boxed,
    );
    let done = if cluster {
        // REDIS_URL: one or more comma-separated seed URLs.
        let connect = move || -> Result<_, Error> {
            let mut builder = redis::cluster::ClusterClient::builder(redis_url.split(','))
                .connection_timeout(limit)
                .response_timeout(limit);
            if let Some(certs) = certs() {
                builder = builder.certs(certs);
            }
            Ok(builder.build()?.get_connection()?)
        };
        work(
            Link::new("Redis", connect, redis_down),
            pg,
            &config,
            &stopping,
        )
    } else {
        let connect = move || -> Result<_, Error> {
            let client = match certs() {
                Some(certs) => redis::Client::build_with_tls(redis_url.as_str(), certs)?,
                None => redis::Client::open(redis_url.as_str())?,
            };
            let redis = client.get_connection_with_timeout(limit)?;
            redis.set_read_timeout(Some(limit))?;
            redis.set_write_timeout(Some(limit))?;
            Ok(redis)
        };
        work(
            Link::new("Redis", connect, redis_down),
            pg,
            &config,
            &stopping,
        )
    };
    match done {
        // SIGTERM during an outage: what was in hand goes back by its lease or the rescue.
        Err(e) if e.is::<Stopped>() => {}
        other => other?,
    }
    log("stopped");
    // A handler abandoned after the grace period may still be running: end the process now.
    std::process::exit(0);
}

fn work<C: ConnectionLike>(
    mut redis: Link<C>,
    mut pg: Link<Client>,
    config: &Config,
    stopping: &AtomicBool,
) -> Result<(), Error> {
    let (grace, lease) = (config.grace, config.lease);
    if config.fast {
        println!("ready");
        let mut reports = Reports {
            prefix: config.prefix.clone(),
            pending: Vec::new(),
        };
        while !stopping.load(Ordering::Relaxed) {
            for keys in &config.pops {
                // Up to BATCH jobs from the first list that has any: high before normal before low.
                let popped: Option<(String, Vec<String>)> = redis.call(stopping, |conn| {
                    Ok(redis::cmd("BLMPOP")
                        .arg(config.pop_wait)
                        .arg(keys.len())
                        .arg(keys)
                        .arg("RIGHT")
                        .arg("COUNT")
                        .arg(config.batch)
                        .query(conn)?)
                })?;
                let Some((_, messages)) = popped else {
                    continue; // nothing within the wait
                };
                for message in messages {
                    if stopping.load(Ordering::Relaxed) {
                        // Popped and never run: the start-timeout rescue dispatches these again.
                        break;
                    }
                    let message: Value = serde_json::from_str(&message)?;
                    run_fast(&mut redis, &mut reports, &message, stopping, grace, lease)?;
                }
                reports.flush(&mut redis, stopping)?;
            }
        }
        return Ok(());
    }
    pg.call(stopping, |_| Ok(()))?; // connected before saying ready
    println!("ready");

    while !stopping.load(Ordering::Relaxed) {
        for keys in &config.pops {
            // A socket with a timeout is not restarted after a signal: SIGTERM during BRPOP ends
            // the read with EINTR, and the loop stops. A job popped in that instant is rescued
            // after queue.start_timeout, like one held by a crashed worker.
            let popped: Option<(String, String)> = redis.call(stopping, |conn| {
                Ok(redis::cmd("BRPOP")
                    .arg(keys)
                    .arg(config.pop_wait)
                    .query(conn)?)
            })?;
            let Some((_, message)) = popped else { continue };
            let message: Value = serde_json::from_str(&message)?;
            let Some(id) = message["id"].as_i64() else {
                log(&format!("skipping a message without an id: {message}"));
                continue;
            };
            let row = pg.call(stopping, |db| {
                Ok(db.query_opt(
                    "SELECT attempt, payload, EXTRACT(EPOCH FROM lease_expires_at - now())::float8 \
                     FROM queue.start($1)",
                    &[&id],
                )?)
            })?;
            // No row: cancelled, finished, held by another worker, or a stale duplicate.
            let Some(row) = row else { continue };
            let job = Job {
                id,
                attempt: row.get(0),
                payload: row.get(1),
                lease: Duration::from_secs_f64(row.get::<_, f64>(2).max(0.0)),
            };
            run(&mut pg, job, stopping, grace)?;
        }
    }
    Ok(())
}
