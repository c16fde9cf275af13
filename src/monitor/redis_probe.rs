//! One bounded look at Redis for monitoring: PING, memory, clients and list lengths, in one
//! round trip, all within `queue.redis_timeout` in total. Failures are reported in `error`,
//! never as ERRORs and never as made-up numbers.

use crate::lifecycle::Priority;
use crate::redis::{connect_for_call, info_field, Keys, Target};
use crate::settings;

#[derive(Default)]
pub struct RedisProbe {
    pub ping: Option<String>,
    pub memory_used: Option<i64>,
    pub max_memory: Option<i64>,
    pub connected_clients: Option<i64>,
    /// Per queue: LLEN of its high, normal and low lists.
    pub lists: Vec<[i64; 3]>,
    /// Per queue: its report stream.
    pub reports: Vec<ReportStream>,
    pub error: Option<String>,
}

/// What waits in a queue's report stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReportStream {
    pub waiting: i64,
    /// How long the oldest waiting report has been there, by Redis's clock (None: none waits).
    pub oldest_age_ms: Option<i64>,
}

/// PING, INFO memory and clients, and per queue the lengths of its three lists and its report
/// stream (length and oldest entry), in one round
/// trip bounded by `queue.redis_timeout` in total (connecting included). A reply of an unexpected
/// kind is an error, never a number.
pub fn probe(queues: &[String]) -> RedisProbe {
    let target = Target::from_settings();
    match ask(&target, queues) {
        Ok(probe) => probe,
        Err(e) => RedisProbe {
            error: Some(target.scrub(&e)),
            ..Default::default()
        },
    }
}

fn ask(target: &Target, queues: &[String]) -> Result<RedisProbe, String> {
    let mut con = connect_for_call(target)?;
    let keys = Keys::new(settings::redis_prefix());
    let mut pipe = redis::pipe();
    pipe.cmd("PING")
        .cmd("INFO")
        .arg("memory")
        .cmd("INFO")
        .arg("clients")
        .cmd("TIME");
    for q in queues {
        for p in Priority::ALL {
            pipe.cmd("LLEN").arg(keys.list(q, p));
        }
    }
    for q in queues {
        pipe.cmd("XLEN").arg(keys.reports(q));
        pipe.cmd("XRANGE")
            .arg(keys.reports(q))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
    }
    let replies: Vec<redis::Value> = pipe.query(&mut con).map_err(|e| e.to_string())?;
    let [ping, memory, clients, time, rest @ ..] = replies.as_slice() else {
        return Err(format!("Redis gave {} replies to the probe", replies.len()));
    };
    if rest.len() != queues.len() * 5 {
        return Err(format!("Redis gave {} replies to the probe", replies.len()));
    }
    let (lists, streams) = rest.split_at(queues.len() * 3);
    let now_ms = redis_time_ms(time)?;
    let reports = streams
        .chunks(2)
        .map(|pair| report_stream(&pair[0], &pair[1], now_ms))
        .collect::<Result<Vec<_>, String>>()?;
    let memory = text(memory)?;
    let clients = text(clients)?;
    let field = |info: &str, name: &str| {
        info_field(info, name).ok_or_else(|| format!("Redis's INFO has no {name}"))
    };
    let lengths = lists
        .chunks(3)
        .map(|l| {
            let mut out = [0; 3];
            for (slot, v) in out.iter_mut().zip(l) {
                *slot = match v {
                    redis::Value::Int(n) => *n,
                    other => return Err(format!("LLEN of a queue list answered {other:?}")),
                };
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>, String>>()?;
    if lengths.len() != queues.len() {
        return Err("Redis answered fewer LLENs than asked".into());
    }
    Ok(RedisProbe {
        ping: Some(text(ping)?),
        memory_used: Some(field(&memory, "used_memory")?),
        max_memory: Some(field(&memory, "maxmemory")?),
        connected_clients: Some(field(&clients, "connected_clients")?),
        lists: lengths,
        reports,
        error: None,
    })
}

/// TIME's reply in milliseconds.
fn redis_time_ms(v: &redis::Value) -> Result<i64, String> {
    let parts: Vec<i64> = match v {
        redis::Value::Array(items) => items
            .iter()
            .map(|i| text(i).and_then(|t| t.parse().map_err(|e| format!("TIME: {e}"))))
            .collect::<Result<_, _>>()?,
        other => return Err(format!("TIME answered {other:?}")),
    };
    match parts.as_slice() {
        [s, us] => Ok(s * 1000 + us / 1000),
        _ => Err("TIME answered other than seconds and microseconds".into()),
    }
}

/// XLEN and the first entry (XRANGE - + COUNT 1) of a report stream.
fn report_stream(
    len: &redis::Value,
    first: &redis::Value,
    now_ms: i64,
) -> Result<ReportStream, String> {
    let waiting = match len {
        redis::Value::Int(n) => *n,
        other => return Err(format!("XLEN of a report stream answered {other:?}")),
    };
    let oldest_ms = match first {
        redis::Value::Array(entries) => match entries.first() {
            None => None,
            Some(redis::Value::Array(entry)) => {
                let id = entry.first().ok_or("XRANGE answered an empty entry")?;
                let id = text(id)?;
                Some(crate::redis::report::entry_ms(&id).ok_or("a report id without a time")?)
            }
            Some(other) => return Err(format!("XRANGE answered {other:?}")),
        },
        other => return Err(format!("XRANGE answered {other:?}")),
    };
    Ok(ReportStream {
        waiting,
        oldest_age_ms: oldest_ms.map(|ms| (now_ms - ms as i64).max(0)),
    })
}

fn text(v: &redis::Value) -> Result<String, String> {
    match v {
        redis::Value::SimpleString(s) => Ok(s.clone()),
        redis::Value::Okay => Ok("OK".into()),
        redis::Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        redis::Value::VerbatimString { text, .. } => Ok(text.clone()),
        other => Err(format!("unexpected reply from Redis: {other:?}")),
    }
}
