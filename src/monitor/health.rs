//! `queue.health()`: one JSON document saying whether jobs flow. It never raises: Redis being
//! down, slow or misconfigured is reported in the result (within `queue.redis_timeout`).

use super::redis_probe::{probe, RedisProbe};
use crate::bridge::shared::{self, BridgeStatus};
use crate::redis::iso_utc;
use crate::settings;
use pgrx::datum::JsonB;
use pgrx::prelude::*;
use serde_json::{json, Map, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// Unfinished jobs per queue and state; the partial indexes hold only live jobs.
const QUEUE_COUNTS: &str = "
    SELECT q.queue_name,
           count(*) FILTER (WHERE j.status = 'queued'),
           count(*) FILTER (WHERE j.status = 'scheduled'),
           count(*) FILTER (WHERE j.status = 'retry_scheduled'),
           count(*) FILTER (WHERE j.status = 'running'),
           COALESCE(EXTRACT(EPOCH FROM now() - min(GREATEST(j.created_at, j.run_at))
                    FILTER (WHERE j.status IN ('queued', 'migrated'))), 0)::float8
    FROM (SELECT queue_name FROM queue.queues
          UNION SELECT DISTINCT queue_name FROM queue.jobs
                WHERE status IN ('queued', 'scheduled', 'migrated', 'running', 'retry_scheduled')) q
    LEFT JOIN queue.jobs j ON j.queue_name = q.queue_name
         AND j.status IN ('queued', 'scheduled', 'migrated', 'running', 'retry_scheduled')
    GROUP BY q.queue_name
    ORDER BY q.queue_name";

const RECENT: &str = "
    SELECT (SELECT count(*) FROM queue.jobs
            WHERE status = 'completed' AND completed_at > now() - interval '1 hour'),
           (SELECT count(*) FROM queue.jobs
            WHERE status = 'failed' AND failed_at > now() - interval '1 hour'),
           (SELECT count(*) FROM queue.jobs
            WHERE attempt_count > 0 AND updated_at > now() - interval '1 hour'
              AND status IN ('retry_scheduled', 'queued', 'migrated', 'running', 'completed')),
           (SELECT count(*) FROM queue.jobs WHERE status = 'failed'),
           (SELECT min(failed_at) FROM queue.jobs WHERE status = 'failed'),
           (SELECT COALESCE(EXTRACT(EPOCH FROM now() - GREATEST(j.created_at, j.run_at)) * 1000, 0)::bigint
            FROM queue.jobs j
            WHERE j.status = 'queued'
              AND NOT EXISTS (SELECT 1 FROM queue.queues q WHERE q.queue_name = j.queue_name AND q.paused)
            ORDER BY j.id LIMIT 1)";

/// Overall health of queue_pg: Redis, the queues on both sides, recent outcomes, the dead-letter
/// queue and the bridge.
#[pg_extern(volatile)]
fn health() -> JsonB {
    let (queues, recent) = Spi::connect(|client| {
        let queues: Vec<(String, [i64; 4], f64)> = client
            .select(QUEUE_COUNTS, None, &[])
            .map(|rows| {
                rows.map(|r| {
                    let n = |i| r.get::<i64>(i).ok().flatten().unwrap_or(0);
                    (
                        r.get::<String>(1).ok().flatten().unwrap_or_default(),
                        [n(2), n(3), n(4), n(5)],
                        r.get::<f64>(6).ok().flatten().unwrap_or(0.0),
                    )
                })
                .collect()
            })
            .unwrap_or_default();
        let recent = client.select(RECENT, Some(1), &[]).ok().and_then(|t| {
            let row = t.first().get_heap_tuple().ok().flatten()?;
            let n = |i| row.get::<i64>(i).ok().flatten().unwrap_or(0);
            let failed_at = row
                .get::<pgrx::datum::TimestampWithTimeZone>(5)
                .ok()
                .flatten()
                .map(|t| crate::redis::iso_utc_from_pg(t.into_inner()));
            Some(([n(1), n(2), n(3), n(4), n(6)], failed_at))
        });
        (queues, recent.unwrap_or(([0; 5], None)))
    });
    let names: Vec<String> = queues.iter().map(|q| q.0.clone()).collect();
    let redis = probe(&names);
    let bridge = shared::status();
    JsonB(document(&queues, recent, &redis, bridge.as_ref()))
}

fn bridge_state(bridge: Option<&BridgeStatus>, now_us: i64) -> &'static str {
    let stall_after = (settings::poll_interval() * 3).max(Duration::from_secs(3));
    match bridge {
        None => "not_loaded",
        Some(b) if b.pid == 0 => "stopped",
        Some(b) if now_us - b.last_cycle_us > stall_after.as_micros() as i64 => "stalled",
        Some(_) => "running",
    }
}

fn document(
    queues: &[(String, [i64; 4], f64)],
    recent: ([i64; 5], Option<String>),
    redis: &RedisProbe,
    bridge: Option<&BridgeStatus>,
) -> Value {
    let now = SystemTime::now();
    let now_us = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let [completed, failed, retried, dead_depth, lag_ms] = recent.0;

    let redis_ok = redis.error.is_none();
    let memory_pct = match (redis.memory_used, redis.max_memory) {
        (Some(used), Some(max)) if max > 0 => Some(100.0 * used as f64 / max as f64),
        _ => None,
    };
    let bridge_status = bridge_state(bridge, now_us);

    let mut per_queue = Map::new();
    for (i, (name, [queued, scheduled, retry, running], oldest)) in queues.iter().enumerate() {
        let lists = redis.lists.get(i).copied().unwrap_or([0; 3]);
        per_queue.insert(
            name.clone(),
            json!({
                "high": lists[0], "normal": lists[1], "low": lists[2],
                "queued": queued, "scheduled": scheduled, "retry_scheduled": retry,
                "running": running, "oldest_age_s": oldest,
            }),
        );
    }

    let status = if !redis_ok || bridge_status != "running" {
        "unhealthy"
    } else if lag_ms > 10_000 || memory_pct.is_some_and(|p| p > 80.0) || failed > 0 {
        "degraded"
    } else {
        "healthy"
    };

    json!({
        "timestamp": iso_utc(now),
        "status": status,
        "redis": {
            "status": if redis_ok { "healthy" } else { "unhealthy" },
            "ping": redis.ping,
            "memory_used": redis.memory_used,
            "memory_used_percentage": memory_pct,
            "connected_clients": redis.connected_clients,
            "error": redis.error,
        },
        "queues": per_queue,
        "recent_jobs": {"completed": completed, "failed": failed, "retried": retried, "window": "1 hour"},
        "dead_letter_queue": {"depth": dead_depth, "oldest_failed_at": recent.1},
        "bridge": {
            "status": bridge_status,
            "pid": bridge.map(|b| b.pid).filter(|&p| p != 0),
            "last_cycle_at": bridge.filter(|b| b.last_cycle_us > 0).map(|b| {
                iso_utc(UNIX_EPOCH + Duration::from_micros(b.last_cycle_us as u64))
            }),
            "lag_ms": lag_ms,
            "dispatched_total": bridge.map(|b| b.dispatched_total),
            "errors_total": bridge.map(|b| b.errors_total),
            "last_error": bridge.and_then(|b| b.last_error.clone()),
        },
    })
}
