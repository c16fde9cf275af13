//! Every `queue.*` setting (GUC), with their defaults and contexts (docs/reference.md, "Settings").
//!
//! Durations are stored as integers in the unit named by their flag (ms or s), so that
//! `SET queue.lease = '10min'` and `SHOW queue.lease` work as for Postgres's own settings.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;
use std::time::Duration;

pub static REDIS_URL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"redis://127.0.0.1:6379"));
pub static REDIS_MODE: GucSetting<RedisMode> = GucSetting::<RedisMode>::new(RedisMode::Standalone);
pub static REDIS_TLS_CA_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static REDIS_TLS_INSECURE_SKIP_VERIFY: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static REDIS_PASSWORD_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static REDIS_PREFIX: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"queue_pg"));
pub static DEFAULT_MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static BACKOFF_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(3_600_000);
pub static BACKOFF_JITTER: GucSetting<f64> = GucSetting::<f64>::new(0.0);
pub static LEASE_MS: GucSetting<i32> = GucSetting::<i32>::new(300_000);
pub static START_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(500);
pub static JOB_HASH_TTL_S: GucSetting<i32> = GucSetting::<i32>::new(86_400);
pub static DEAD_LETTER_TTL_S: GucSetting<i32> = GucSetting::<i32>::new(604_800);
pub static COMPLETED_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(86_400);
pub static DEAD_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(30 * 86_400);
pub static CANCELLED_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
pub static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1_048_576);
pub static REDIS_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(2000);
pub static MEMORY_CHECK_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(60);

const MAX_INT: i32 = i32::MAX;

/// `queue.redis_mode`: one Redis server (or a primary behind a failover address), or a Redis
/// Cluster reached through the seed URLs of `queue.redis_url`.
#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum RedisMode {
    #[name = c"standalone"]
    Standalone,
    #[name = c"cluster"]
    Cluster,
}

/// Registers every setting. Called from `_PG_init`.
pub fn register() {
    use GucContext::*;
    let none = GucFlags::default();
    let ms = GucFlags::UNIT_MS;
    let s = GucFlags::UNIT_S;

    // Superuser only and never shown to others: the URL may carry a password.
    GucRegistry::define_string_guc(
        c"queue.redis_url",
        c"Redis URL the bridge and queue_pg's SQL functions connect to.",
        c"redis[s]://[user[:password]@]host:port[/db] (rediss: TLS); in cluster mode, comma-separated seed URLs. Only superusers can read or set it.",
        &REDIS_URL,
        Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_enum_guc(
        c"queue.redis_mode",
        c"standalone: one Redis server; cluster: a Redis Cluster.",
        c"In cluster mode queue.redis_url holds one or more comma-separated seed URLs.",
        &REDIS_MODE,
        Sighup,
        none,
    );
    GucRegistry::define_string_guc(
        c"queue.redis_tls_ca_file",
        c"PEM file of the certificates that may sign the Redis server's (rediss:// URLs).",
        c"Empty: the system's certificate store.",
        &REDIS_TLS_CA_FILE,
        Sighup,
        none,
    );
    GucRegistry::define_bool_guc(
        c"queue.redis_tls_insecure_skip_verify",
        c"INSECURE: accept any certificate from the Redis server (self-signed test setups only).",
        c"Anyone between Postgres and Redis can then read and change the traffic.",
        &REDIS_TLS_INSECURE_SKIP_VERIFY,
        Sighup,
        none,
    );
    // Members of pg_read_all_settings (pg_monitor) can read superuser-only settings, so a
    // password in queue.redis_url is visible to them; a file's content is not.
    GucRegistry::define_string_guc(
        c"queue.redis_password_file",
        c"File holding the Redis password (its first line), instead of one in queue.redis_url.",
        c"Read by the server's OS user at each new connection. Only superusers can read or set it.",
        &REDIS_PASSWORD_FILE,
        Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"queue.database",
        c"Database the bridge connects to (where CREATE EXTENSION queue_pg was run).",
        c"",
        &DATABASE,
        Postmaster,
        none,
    );
    GucRegistry::define_string_guc(
        c"queue.redis_prefix",
        c"Prefix of every Redis key queue_pg writes.",
        c"",
        &REDIS_PREFIX,
        Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"queue.default_max_attempts",
        c"Attempts a job gets when neither enqueue nor its queue says otherwise.",
        c"",
        &DEFAULT_MAX_ATTEMPTS,
        1,
        1000,
        Userset,
        none,
    );
    GucRegistry::define_int_guc(
        c"queue.backoff_base",
        c"Base of the exponential retry delay: delay = base * 2^attempts.",
        c"",
        &BACKOFF_BASE_MS,
        0,
        MAX_INT,
        Userset,
        ms,
    );
    GucRegistry::define_int_guc(
        c"queue.backoff_max",
        c"Cap of the retry delay.",
        c"",
        &BACKOFF_MAX_MS,
        0,
        MAX_INT,
        Userset,
        ms,
    );
    GucRegistry::define_float_guc(
        c"queue.backoff_jitter",
        c"Random fraction added to or taken from each retry delay (0 = none).",
        c"",
        &BACKOFF_JITTER,
        0.0,
        1.0,
        Userset,
        none,
    );
    GucRegistry::define_int_guc(
        c"queue.lease",
        c"How long a started job is held before its lease expires.",
        c"",
        &LEASE_MS,
        1,
        MAX_INT,
        Userset,
        ms,
    );
    GucRegistry::define_int_guc(
        c"queue.start_timeout",
        c"How long after a job left Redis the bridge waits for its start before dispatching it again.",
        c"",
        &START_TIMEOUT_MS,
        1,
        MAX_INT,
        Sighup,
        ms,
    );
    GucRegistry::define_int_guc(
        c"queue.poll_interval",
        c"How often the bridge wakes without a commit to wake it.",
        c"",
        &POLL_INTERVAL_MS,
        10,
        MAX_INT,
        Sighup,
        ms,
    );
    GucRegistry::define_int_guc(
        c"queue.batch_size",
        c"Jobs the bridge pushes to Redis in one pipelined round trip; reports the applier reads per queue per batch.",
        c"",
        &BATCH_SIZE,
        1,
        100_000,
        Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"queue.job_hash_ttl",
        c"How long a finished job's Redis hash is kept.",
        c"",
        &JOB_HASH_TTL_S,
        1,
        MAX_INT,
        Sighup,
        s,
    );
    GucRegistry::define_int_guc(
        c"queue.dead_letter_ttl",
        c"How long a dead job's Redis marker is kept.",
        c"",
        &DEAD_LETTER_TTL_S,
        1,
        MAX_INT,
        Sighup,
        s,
    );
    GucRegistry::define_int_guc(
        c"queue.completed_retention",
        c"How long completed jobs stay in queue.jobs before the bridge prunes them.",
        c"",
        &COMPLETED_RETENTION_S,
        0,
        MAX_INT,
        Sighup,
        s,
    );
    GucRegistry::define_int_guc(
        c"queue.dead_retention",
        c"How long dead jobs (failed for good) stay in queue.jobs before the bridge prunes them.",
        c"",
        &DEAD_RETENTION_S,
        0,
        MAX_INT,
        Sighup,
        s,
    );
    GucRegistry::define_int_guc(
        c"queue.cancelled_retention",
        c"How long cancelled jobs stay in queue.jobs before the bridge prunes them.",
        c"",
        &CANCELLED_RETENTION_S,
        0,
        MAX_INT,
        Sighup,
        s,
    );
    GucRegistry::define_int_guc(
        c"queue.max_payload_bytes",
        c"Largest accepted payload, as the length of its JSON text.",
        c"",
        &MAX_PAYLOAD_BYTES,
        1,
        MAX_INT,
        Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"queue.redis_timeout",
        c"Longest any SQL call or bridge step waits on Redis.",
        c"",
        &REDIS_TIMEOUT_MS,
        1,
        600_000,
        Suset,
        ms,
    );
    GucRegistry::define_int_guc(
        c"queue.memory_check_interval",
        c"How often the bridge runs queue.optimize_memory().",
        c"",
        &MEMORY_CHECK_INTERVAL_S,
        1,
        MAX_INT,
        Sighup,
        s,
    );
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"queue".as_ptr()) };
}

fn string(setting: &GucSetting<Option<CString>>, default: &str) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| default.to_owned())
}

pub fn redis_url() -> String {
    string(&REDIS_URL, "redis://127.0.0.1:6379")
}
pub fn redis_mode() -> RedisMode {
    REDIS_MODE.get()
}
pub fn redis_tls_ca_file() -> String {
    string(&REDIS_TLS_CA_FILE, "")
}
pub fn redis_tls_insecure_skip_verify() -> bool {
    REDIS_TLS_INSECURE_SKIP_VERIFY.get()
}
pub fn redis_password_file() -> String {
    string(&REDIS_PASSWORD_FILE, "")
}
pub fn database() -> String {
    string(&DATABASE, "postgres")
}
pub fn redis_prefix() -> String {
    string(&REDIS_PREFIX, "queue_pg")
}
pub fn default_max_attempts() -> i32 {
    DEFAULT_MAX_ATTEMPTS.get()
}
pub fn max_payload_bytes() -> usize {
    MAX_PAYLOAD_BYTES.get() as usize
}
pub fn poll_interval() -> Duration {
    Duration::from_millis(POLL_INTERVAL_MS.get() as u64)
}
pub fn batch_size() -> usize {
    BATCH_SIZE.get() as usize
}
pub fn redis_timeout() -> Duration {
    Duration::from_millis(REDIS_TIMEOUT_MS.get() as u64)
}
pub fn backoff_base_ms() -> i64 {
    i64::from(BACKOFF_BASE_MS.get())
}
pub fn backoff_max_ms() -> i64 {
    i64::from(BACKOFF_MAX_MS.get())
}
pub fn backoff_jitter() -> f64 {
    BACKOFF_JITTER.get()
}
pub fn lease_ms() -> i64 {
    i64::from(LEASE_MS.get())
}
pub fn start_timeout_ms() -> i64 {
    i64::from(START_TIMEOUT_MS.get())
}
pub fn job_hash_ttl_s() -> i64 {
    i64::from(JOB_HASH_TTL_S.get())
}
pub fn dead_letter_ttl_s() -> i64 {
    i64::from(DEAD_LETTER_TTL_S.get())
}
pub fn completed_retention_s() -> i64 {
    i64::from(COMPLETED_RETENTION_S.get())
}
pub fn dead_retention_s() -> i64 {
    i64::from(DEAD_RETENTION_S.get())
}
pub fn cancelled_retention_s() -> i64 {
    i64::from(CANCELLED_RETENTION_S.get())
}
pub fn memory_check_interval() -> Duration {
    Duration::from_secs(MEMORY_CHECK_INTERVAL_S.get() as u64)
}
