//! `queue.health()`: one JSON document saying whether jobs flow. It never raises: Redis being
//! down, slow or misconfigured is reported in the result (within `queue.redis_timeout`).

use super::figures::{self, QueueFigures};
use super::redis_probe::{probe, RedisProbe};
use crate::bridge::shared::{self, BridgeStatus};
use crate::extension::{self, Installed, LIBRARY_VERSION};
use crate::lifecycle::{JobState, Priority};
use crate::redis::iso_utc;
use crate::reports::shared::{self as reports_shared, ReportsStatus};
use crate::settings::{self, RedisMode};
use pgrx::datum::JsonB;
use pgrx::prelude::*;
use serde_json::{json, Map, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Overall health of queue_pg: Redis, the queues on both sides, recent outcomes, the dead-letter
/// queue and the bridge.
#[pg_extern(volatile)]
fn health() -> JsonB {
    let installed = Spi::connect_mut(extension::installed);
    if let Some(problem) = version_problem(&installed) {
        return JsonB(problem);
    }
    let (queues, lag_ms, rejected) = Spi::connect_mut(|client| {
        (
            figures::per_queue(client),
            figures::bridge_lag_ms(client),
            figures::rejected_reports(client),
        )
    });
    let names: Vec<String> = queues.iter().map(|q| q.queue.clone()).collect();
    let redis = probe(&names);
    let bridge = shared::status();
    let stranded = shared::stranded();
    let applier = reports_shared::status();
    let reports = Reports {
        applier: applier.as_ref(),
        rejected: &rejected,
    };
    JsonB(document(
        &queues,
        lag_ms,
        &redis,
        (bridge.as_ref(), stranded.as_ref()),
        &reports,
    ))
}

/// The whole document when the library cannot work with the SQL objects it finds (another
/// release's, before `ALTER EXTENSION queue_pg UPDATE`): nothing else can be read safely.
fn version_problem(installed: &Result<Installed, String>) -> Option<Value> {
    let (sql_version, error) = match installed {
        Ok(found) => {
            let other = found.other_version()?;
            (Some(other), extension::mismatch_message(other))
        }
        Err(e) => (
            None,
            format!("queue_pg: looking up the extension's version failed: {e}"),
        ),
    };
    let bridge = shared::status();
    Some(json!({
        "timestamp": iso_utc(SystemTime::now()),
        "status": "unhealthy",
        "error": error,
        "version": LIBRARY_VERSION,
        "sql_version": sql_version,
        "bridge": {"status": bridge_state(bridge.as_ref()).as_str()},
    }))
}

/// Whether this server is a standby (in recovery): the bridge and the applier start only when
/// it is promoted.
pub fn in_recovery() -> bool {
    unsafe { pg_sys::RecoveryInProgress() }
}

/// What health() says of the report applier.
pub fn applier_state(applier: Option<&ReportsStatus>) -> &'static str {
    match applier {
        None => "not_loaded",
        Some(a) if a.pid == 0 && in_recovery() => "standby",
        Some(a) if a.pid == 0 => "stopped",
        Some(_) => "running",
    }
}

/// A waiting report older than this makes health() `degraded`.
const REPORT_AGE_DEGRADED_MS: i64 = 10_000;

/// The worker fast path as health() sees it: the applier's status, and the rejected reports
/// (queue, reason, count).
struct Reports<'a> {
    applier: Option<&'a ReportsStatus>,
    rejected: &'a [(String, String, i64)],
}

/// The `reports` section: the applier's state, totals and last apply lag, the oldest waiting
/// report (`oldest_ms`, over all queues), rejected reports by reason.
fn reports_section(reports: &Reports<'_>, oldest_ms: Option<i64>) -> Value {
    let applier = reports.applier;
    let mut by_reason = std::collections::BTreeMap::<&str, i64>::new();
    for (_, reason, n) in reports.rejected {
        *by_reason.entry(reason).or_default() += n;
    }
    json!({
        "applier": applier_state(applier),
        "pid": applier.map(|a| a.pid).filter(|&p| p != 0),
        "oldest_waiting_ms": oldest_ms,
        "last_apply_lag_ms": applier.filter(|a| a.last_batch_us > 0).map(|a| a.last_lag_us as f64 / 1000.0),
        "last_batch_at": applier.filter(|a| a.last_batch_us > 0).map(|a| {
            iso_utc(UNIX_EPOCH + Duration::from_micros(a.last_batch_us as u64))
        }),
        "applied_total": applier.map(|a| a.applied_total),
        "rejected": by_reason,
    })
}

/// What health() says of the bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BridgeState {
    Running,
    /// No cycle for three poll intervals (at least 3 s).
    Stalled,
    Stopped,
    /// The server is a standby: the bridge starts when it is promoted.
    Standby,
    /// queue_pg is not in `shared_preload_libraries`.
    NotLoaded,
}

impl BridgeState {
    pub const fn as_str(self) -> &'static str {
        match self {
            BridgeState::Running => "running",
            BridgeState::Stalled => "stalled",
            BridgeState::Stopped => "stopped",
            BridgeState::Standby => "standby",
            BridgeState::NotLoaded => "not_loaded",
        }
    }
}

pub fn bridge_state(bridge: Option<&BridgeStatus>) -> BridgeState {
    let stall_after = (settings::poll_interval() * 3).max(Duration::from_secs(3));
    let now_us = shared::unix_micros();
    match bridge {
        None => BridgeState::NotLoaded,
        Some(b) if b.pid == 0 && in_recovery() => BridgeState::Standby,
        Some(b) if b.pid == 0 => BridgeState::Stopped,
        Some(b) if now_us - b.last_cycle_us > stall_after.as_micros() as i64 => {
            BridgeState::Stalled
        }
        Some(_) => BridgeState::Running,
    }
}

/// What the bridge published of stranded jobs: per queue, and those of queues beyond its table.
type StrandedJobs = (Vec<(String, i64)>, i64);

fn document(
    queues: &[QueueFigures],
    lag_ms: i64,
    redis: &RedisProbe,
    (bridge, stranded): (Option<&BridgeStatus>, Option<&StrandedJobs>),
    reports: &Reports<'_>,
) -> Value {
    let now = SystemTime::now();
    let sum = |f: fn(&QueueFigures) -> i64| queues.iter().map(f).sum::<i64>();
    let completed = sum(|q| q.last_hour.completed);
    let failed = sum(|q| q.last_hour.failed);
    let retried = sum(|q| q.last_hour.retried);
    let dead_depth = sum(|q| q.dead);
    let oldest_failed_at = queues
        .iter()
        .filter_map(|q| q.oldest_failed_at)
        .min()
        .map(crate::redis::iso_utc_from_pg);

    let redis_ok = redis.error.is_none();
    let memory_pct = match (redis.memory_used, redis.max_memory) {
        (Some(used), Some(max)) if max > 0 => Some(100.0 * used as f64 / max as f64),
        _ => None,
    };
    let bridge_status = bridge_state(bridge);

    let mut per_queue = Map::new();
    let mut oldest_report_ms = None::<i64>;
    // Queues with jobs stranded outside Redis, for the reasons below.
    let mut stranded_queues: Vec<(&str, i64)> = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        // Unknown while Redis cannot be asked: null, not 0.
        let lists = redis.lists.get(i).copied();
        let mut figures = Map::new();
        for (p, priority) in Priority::ALL.iter().enumerate() {
            figures.insert(priority.as_str().into(), json!(lists.map(|l| l[p])));
        }
        for (state, n) in [
            (JobState::Queued, q.queued),
            (JobState::Scheduled, q.scheduled),
            (JobState::RetryScheduled, q.retry_scheduled),
            (JobState::Running, q.running),
        ] {
            figures.insert(state.as_str().into(), json!(n));
        }
        figures.insert("oldest_age_s".into(), json!(q.oldest_age_s));
        // In Redis per Postgres, and how many of those no list holds: in a worker's hands
        // (popped, not yet started or reported) or lost from Redis.
        figures.insert("migrated".into(), json!(q.migrated));
        let listed = lists.map(|l| l.iter().sum::<i64>());
        figures.insert(
            "missing".into(),
            json!(listed.map(|n| (q.migrated - n).max(0))),
        );
        // Missing for longer than start_timeout and not dispatched again (null: no bridge).
        let stuck = stranded.map(|(named, _)| {
            named
                .iter()
                .find(|(name, _)| *name == q.queue)
                .map_or(0, |(_, n)| *n)
        });
        figures.insert("stranded".into(), json!(stuck));
        if let Some(n) = stuck.filter(|n| *n > 0) {
            stranded_queues.push((&q.queue, n));
        }
        figures.insert(
            "status".into(),
            json!(if stuck.unwrap_or(0) > 0 {
                "degraded"
            } else {
                "healthy"
            }),
        );
        let stream = redis.reports.get(i);
        figures.insert("reports_waiting".into(), json!(stream.map(|s| s.waiting)));
        let oldest_report = stream.and_then(|s| s.oldest_age_ms);
        figures.insert("oldest_report_age_ms".into(), json!(oldest_report));
        oldest_report_ms = oldest_report_ms.max(oldest_report);
        per_queue.insert(q.queue.clone(), Value::Object(figures));
    }

    // A stopped applier leaves reports piling up in Redis; an old waiting report means it lags.
    // On a standby neither runs, by design, until promotion.
    let standby = bridge_status == BridgeState::Standby;
    let applier_running = applier_state(reports.applier) == "running";
    let workers_ok = standby || (bridge_status == BridgeState::Running && applier_running);
    // Why the answer is not `healthy`, in words.
    let mut reasons: Vec<String> = Vec::new();
    if let Some(e) = &redis.error {
        reasons.push(format!("Redis cannot be asked: {e}"));
    }
    if !workers_ok {
        reasons.push(format!(
            "the bridge is {} and the report applier {}",
            bridge_status.as_str(),
            applier_state(reports.applier)
        ));
    }
    let unhealthy = !reasons.is_empty();
    if lag_ms > 10_000 {
        reasons.push(format!("jobs have waited {lag_ms} ms for dispatch"));
    }
    if let Some(p) = memory_pct.filter(|p| *p > 80.0) {
        reasons.push(format!("Redis uses {p:.0} % of its maxmemory"));
    }
    for (addr, policy) in &redis.evicting {
        reasons.push(format!(
            "Redis at {addr} has maxmemory-policy {policy}: it may evict queue_pg's keys; use noeviction"
        ));
    }
    for (queue, n) in &stranded_queues {
        reasons.push(format!(
            "queue {queue}: {n} jobs have been in no Redis list for longer than queue.start_timeout and are not dispatched again yet (another transaction holds them)"
        ));
    }
    if let Some(more) = stranded.map(|s| s.1).filter(|n| *n > 0) {
        reasons.push(format!(
            "{more} more jobs of other queues have been in no Redis list for longer than queue.start_timeout"
        ));
    }
    if failed > 0 {
        reasons.push(format!("jobs died in the last hour: {failed}"));
    }
    if let Some(ms) = oldest_report_ms.filter(|ms| *ms > REPORT_AGE_DEGRADED_MS) {
        reasons.push(format!("a report has waited {ms} ms"));
    }
    let status = if unhealthy {
        "unhealthy"
    } else if !reasons.is_empty() {
        "degraded"
    } else {
        "healthy"
    };

    json!({
        "timestamp": iso_utc(now),
        "status": status,
        "reasons": reasons,
        "version": LIBRARY_VERSION,
        "role": if in_recovery() { "standby" } else { "primary" },
        "redis": {
            "status": if redis_ok { "healthy" } else { "unhealthy" },
            "ping": redis.ping,
            "memory_used": redis.memory_used,
            "memory_used_percentage": memory_pct,
            "maxmemory_policy": redis.nodes.iter().find_map(|n| n.maxmemory_policy.clone()),
            "connected_clients": redis.connected_clients,
            "mode": match settings::redis_mode() {
                RedisMode::Standalone => "standalone",
                RedisMode::Cluster => "cluster",
            },
            "nodes": redis.nodes.iter().map(|n| json!({
                "addr": n.addr,
                "role": n.role,
                "reachable": n.error.is_none(),
                "memory_used": n.memory_used,
                "maxmemory": n.max_memory,
                "maxmemory_policy": n.maxmemory_policy,
                "connected_clients": n.connected_clients,
                "error": n.error,
            })).collect::<Vec<_>>(),
            "error": redis.error,
        },
        "queues": per_queue,
        "recent_jobs": {
            JobState::Completed.as_str(): completed,
            JobState::Failed.as_str(): failed,
            "retried": retried,
            "window": "1 hour",
        },
        "dead_letter_queue": {"depth": dead_depth, "oldest_failed_at": oldest_failed_at},
        "bridge": {
            "status": bridge_status.as_str(),
            "pid": bridge.map(|b| b.pid).filter(|&p| p != 0),
            "last_cycle_at": bridge.filter(|b| b.last_cycle_us > 0).map(|b| {
                iso_utc(UNIX_EPOCH + Duration::from_micros(b.last_cycle_us as u64))
            }),
            "lag_ms": lag_ms,
            "dispatched_total": bridge.map(|b| b.dispatched_total),
            "push_batches_total": bridge.map(|b| b.push_batches_total),
            "push_round_trips_total": bridge.map(|b| b.push_round_trips_total),
            "restore": bridge.map(|b| json!({
                "running": b.restoring,
                "dead_letters_total": b.restored_dead_letters_total,
                "job_hashes_total": b.restored_job_hashes_total,
            })),
            "errors_total": bridge.map(|b| b.errors_total),
            "last_error": bridge.and_then(|b| b.last_error.clone()),
        },
        "reports": reports_section(reports, oldest_report_ms),
    })
}
