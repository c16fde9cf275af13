//! `queue.prometheus()`: the figures of `queue.metrics()`, the bridge and Redis in the Prometheus
//! text exposition format (version 0.0.4), for a scrape endpoint or a textfile collector.

use super::figures::{self, Outcomes, QueueFigures};
use super::health::{applier_state, bridge_state, BridgeState};
use super::metrics;
use crate::bridge::shared;
use crate::lifecycle::{JobState, Priority};
use crate::reports::shared as reports_shared;
use pgrx::prelude::*;
use std::fmt::Write;

/// Builds the exposition: every family once, with its HELP and TYPE lines.
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", number(value));
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A figure read from a struct.
type Figure<T> = fn(&T) -> i64;

const LIVE_STATES: [(JobState, Figure<QueueFigures>); 6] = [
    (JobState::Queued, |q| q.queued),
    (JobState::Scheduled, |q| q.scheduled),
    (JobState::Migrated, |q| q.migrated),
    (JobState::Running, |q| q.running),
    (JobState::RetryScheduled, |q| q.retry_scheduled),
    (JobState::Failed, |q| q.dead),
];

const OUTCOMES: [(JobState, Figure<Outcomes>); 4] = [
    (JobState::Completed, |o| o.completed),
    (JobState::RetryScheduled, |o| o.retried),
    (JobState::Failed, |o| o.failed),
    (JobState::Cancelled, |o| o.cancelled),
];

/// The metrics in Prometheus text format.
#[pg_extern(volatile)]
fn prometheus() -> String {
    let (queues, redis, rejected) = metrics::collect();
    let lag_ms = Spi::connect_mut(figures::bridge_lag_ms);
    let bridge = shared::status();
    let mut out = Exposition {
        text: String::with_capacity(256 + queues.len() * 1500),
    };

    out.family(
        "queue_pg_jobs",
        "gauge",
        "Jobs in Postgres by queue and state (live states, and failed: the dead letters).",
    );
    for q in &queues {
        for (state, count) in LIVE_STATES {
            out.sample(
                "queue_pg_jobs",
                &[("queue", &q.queue), ("state", state.as_str())],
                count(q) as f64,
            );
        }
    }
    out.family(
        "queue_pg_redis_list_jobs",
        "gauge",
        "Messages waiting in the queue's Redis list, by priority (absent while Redis is unreachable).",
    );
    for (q, lists) in queues.iter().zip(&redis.lists) {
        for (p, priority) in Priority::ALL.iter().enumerate() {
            let labels = [("queue", q.queue.as_str()), ("priority", priority.as_str())];
            out.sample("queue_pg_redis_list_jobs", &labels, lists[p] as f64);
        }
    }
    out.family(
        "queue_pg_oldest_waiting_job_age_seconds",
        "gauge",
        "Age of the queue's oldest job waiting for a worker (queued or migrated); 0 when none waits.",
    );
    for q in &queues {
        let labels = [("queue", q.queue.as_str())];
        out.sample(
            "queue_pg_oldest_waiting_job_age_seconds",
            &labels,
            q.oldest_age_s,
        );
    }
    out.family(
        "queue_pg_queue_paused",
        "gauge",
        "1 while the queue is paused.",
    );
    for q in &queues {
        let labels = [("queue", q.queue.as_str())];
        out.sample(
            "queue_pg_queue_paused",
            &labels,
            f64::from(u8::from(q.paused)),
        );
    }
    out.family(
        "queue_pg_job_outcomes_total",
        "counter",
        "Jobs that entered the state: completed, retry_scheduled (a failed attempt to retry), failed (dead-lettered), cancelled.",
    );
    for q in &queues {
        for (state, count) in OUTCOMES {
            let labels = [("queue", q.queue.as_str()), ("state", state.as_str())];
            out.sample(
                "queue_pg_job_outcomes_total",
                &labels,
                count(&q.total) as f64,
            );
        }
    }
    out.family(
        "queue_pg_job_outcomes_last_hour",
        "gauge",
        "The same outcomes over the last hour (by minute).",
    );
    for q in &queues {
        for (state, count) in OUTCOMES {
            let labels = [("queue", q.queue.as_str()), ("state", state.as_str())];
            out.sample(
                "queue_pg_job_outcomes_last_hour",
                &labels,
                count(&q.last_hour) as f64,
            );
        }
    }

    out.family(
        "queue_pg_reports_waiting",
        "gauge",
        "Workers' reports waiting in the queue's Redis stream for the report applier (absent while Redis is unreachable).",
    );
    for (q, stream) in queues.iter().zip(&redis.reports) {
        let labels = [("queue", q.queue.as_str())];
        out.sample("queue_pg_reports_waiting", &labels, stream.waiting as f64);
    }
    out.family(
        "queue_pg_oldest_report_age_seconds",
        "gauge",
        "Age of the queue's oldest report waiting to be applied; 0 when none waits.",
    );
    for (q, stream) in queues.iter().zip(&redis.reports) {
        let labels = [("queue", q.queue.as_str())];
        let age = stream.oldest_age_ms.unwrap_or(0) as f64 / 1000.0;
        out.sample("queue_pg_oldest_report_age_seconds", &labels, age);
    }
    out.family(
        "queue_pg_reports_rejected_total",
        "counter",
        "Workers' reports the applier dropped because they did not fit, by queue and reason.",
    );
    for (queue, reason, n) in &rejected {
        let labels = [("queue", queue.as_str()), ("reason", reason.as_str())];
        out.sample("queue_pg_reports_rejected_total", &labels, *n as f64);
    }
    let applier = reports_shared::status();
    out.family(
        "queue_pg_report_applier_up",
        "gauge",
        "1 while the report applier runs.",
    );
    let up = applier_state(applier.as_ref()) == "running";
    out.sample("queue_pg_report_applier_up", &[], f64::from(u8::from(up)));
    if let Some(a) = &applier {
        out.family(
            "queue_pg_reports_applied_total",
            "counter",
            "Reports the applier applied to Postgres since the server started.",
        );
        out.sample(
            "queue_pg_reports_applied_total",
            &[],
            a.applied_total as f64,
        );
        out.family(
            "queue_pg_report_apply_lag_seconds",
            "gauge",
            "Of the applier's last batch: from its oldest report's XADD to the commit that applied it.",
        );
        out.sample(
            "queue_pg_report_apply_lag_seconds",
            &[],
            a.last_lag_us as f64 / 1e6,
        );
    }

    let running = bridge_state(bridge.as_ref()) == BridgeState::Running;
    out.family(
        "queue_pg_bridge_up",
        "gauge",
        "1 while the bridge runs and completes cycles.",
    );
    out.sample("queue_pg_bridge_up", &[], f64::from(u8::from(running)));
    out.family(
        "queue_pg_bridge_lag_seconds",
        "gauge",
        "How long the oldest committed job not yet pushed to Redis has been waiting (paused queues excluded).",
    );
    out.sample("queue_pg_bridge_lag_seconds", &[], lag_ms as f64 / 1000.0);
    if let Some(b) = &bridge {
        if b.last_cycle_us > 0 {
            out.family(
                "queue_pg_bridge_last_cycle_timestamp_seconds",
                "gauge",
                "Unix time of the bridge's last finished cycle.",
            );
            let at = b.last_cycle_us as f64 / 1e6;
            out.sample("queue_pg_bridge_last_cycle_timestamp_seconds", &[], at);
        }
        let totals = [
            ("dispatched", "Jobs the bridge pushed to Redis since the server started.", b.dispatched_total),
            ("retried", "Failed attempts scheduled for a retry, as the bridge applied them, since the server started.", b.retried_total),
            ("dead_lettered", "Jobs moved to the dead-letter queue by the bridge since the server started.", b.dead_lettered_total),
            ("errors", "Errors the bridge met (mostly Redis) since the server started.", b.errors_total),
        ];
        for (what, help, n) in totals {
            let name = format!("queue_pg_bridge_{what}_total");
            out.family(&name, "counter", help);
            out.sample(&name, &[], n as f64);
        }
        out.family(
            "queue_pg_bridge_redis_connected",
            "gauge",
            "1 while the bridge holds a working Redis connection.",
        );
        out.sample(
            "queue_pg_bridge_redis_connected",
            &[],
            f64::from(u8::from(b.redis_connected)),
        );
    }

    out.family(
        "queue_pg_redis_up",
        "gauge",
        "1 if Redis answered this scrape's probe.",
    );
    out.sample(
        "queue_pg_redis_up",
        &[],
        f64::from(u8::from(redis.error.is_none())),
    );
    let redis_gauges = [
        (
            "queue_pg_redis_memory_used_bytes",
            "Memory Redis uses (INFO memory used_memory).",
            redis.memory_used,
        ),
        (
            "queue_pg_redis_maxmemory_bytes",
            "Redis's maxmemory (0: no limit).",
            redis.max_memory,
        ),
        (
            "queue_pg_redis_connected_clients",
            "Clients connected to Redis.",
            redis.connected_clients,
        ),
    ];
    for (name, help, value) in redis_gauges {
        if let Some(v) = value {
            out.family(name, "gauge", help);
            out.sample(name, &[], v as f64);
        }
    }
    out.text
}
