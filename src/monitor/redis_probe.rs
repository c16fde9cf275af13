//! One bounded look at Redis for monitoring: PING, memory, clients and list lengths, in one
//! round trip, all within `queue.redis_timeout` in total. Failures are values, never ERRORs.

use crate::redis::conn::redact_error;
use crate::redis::{connect, without_signals, Keys};
use crate::settings;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct RedisProbe {
    pub ping: Option<String>,
    pub memory_used: Option<i64>,
    pub max_memory: Option<i64>,
    pub connected_clients: Option<i64>,
    /// Per queue: LLEN of its high, normal and low lists.
    pub lists: Vec<[i64; 3]>,
    pub error: Option<String>,
}

/// A numeric field of an INFO reply (`name:value` lines).
pub fn info_field(info: &str, name: &str) -> Option<i64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

pub fn probe(queues: &[String]) -> RedisProbe {
    let url = settings::redis_url();
    let timeout = settings::redis_timeout();
    without_signals(|| {
        let started = Instant::now();
        let mut con = match connect(&url, timeout) {
            Ok(con) => con,
            Err(e) => {
                return RedisProbe {
                    error: Some(e),
                    ..Default::default()
                }
            }
        };
        // What is left of the budget bounds the one round trip.
        let left = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        let _ = con.set_read_timeout(Some(left));
        let _ = con.set_write_timeout(Some(left));
        let keys = Keys::new(settings::redis_prefix());
        let mut pipe = redis::pipe();
        pipe.cmd("PING")
            .cmd("INFO")
            .arg("memory")
            .cmd("INFO")
            .arg("clients");
        for q in queues {
            for p in ["high", "normal", "low"] {
                pipe.cmd("LLEN").arg(keys.list(q, p));
            }
        }
        let replies: Vec<redis::Value> = match pipe.query(&mut con) {
            Ok(r) => r,
            Err(e) => {
                return RedisProbe {
                    error: Some(redact_error(&e, &url)),
                    ..Default::default()
                }
            }
        };
        let text = |v: &redis::Value| -> String {
            match v {
                redis::Value::SimpleString(s) => s.clone(),
                redis::Value::Okay => "OK".into(),
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                redis::Value::VerbatimString { text, .. } => text.clone(),
                _ => String::new(),
            }
        };
        let int = |v: Option<&redis::Value>| match v {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        };
        let memory = replies.get(1).map(text).unwrap_or_default();
        let clients = replies.get(2).map(text).unwrap_or_default();
        RedisProbe {
            ping: replies.first().map(text),
            memory_used: info_field(&memory, "used_memory"),
            max_memory: info_field(&memory, "maxmemory"),
            connected_clients: info_field(&clients, "connected_clients"),
            lists: (0..queues.len())
                .map(|i| [0, 1, 2].map(|p| int(replies.get(3 + 3 * i + p))))
                .collect(),
            error: None,
        }
    })
}
