//! One bounded look at Redis for monitoring: PING, memory, clients and list lengths, in one
//! round trip, all within `queue.redis_timeout` in total. Failures are reported in `error`,
//! never as ERRORs and never as made-up numbers.

use crate::lifecycle::Priority;
use crate::redis::conn::scrub;
use crate::redis::{connect_for_call, info_field, Keys};
use crate::settings;

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

/// PING, INFO memory and clients, and per queue the lengths of its three lists, in one round
/// trip bounded by `queue.redis_timeout` in total (connecting included). A reply of an unexpected
/// kind is an error, never a number.
pub fn probe(queues: &[String]) -> RedisProbe {
    let url = settings::redis_url();
    match ask(&url, queues) {
        Ok(probe) => probe,
        Err(e) => RedisProbe {
            error: Some(scrub(&e, &url)),
            ..Default::default()
        },
    }
}

fn ask(url: &str, queues: &[String]) -> Result<RedisProbe, String> {
    let mut con = connect_for_call(url)?;
    let keys = Keys::new(settings::redis_prefix());
    let mut pipe = redis::pipe();
    pipe.cmd("PING")
        .cmd("INFO")
        .arg("memory")
        .cmd("INFO")
        .arg("clients");
    for q in queues {
        for p in Priority::ALL {
            pipe.cmd("LLEN").arg(keys.list(q, p));
        }
    }
    let replies: Vec<redis::Value> = pipe.query(&mut con).map_err(|e| e.to_string())?;
    let [ping, memory, clients, lists @ ..] = replies.as_slice() else {
        return Err(format!("Redis gave {} replies to the probe", replies.len()));
    };
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
        error: None,
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
