//! Redis Cluster's routing rules, as pure functions: which slot a key hashes to, which master
//! serves a slot (the map read from `CLUSTER SLOTS`), and what a redirect reply says.

use redis::Value;

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The slot of `key`: CRC16 (XMODEM) of its hash tag (the text between the first `{` and the
/// next `}`, if not empty) or else of the whole key, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Which master serves each slot.
#[derive(Debug)]
pub struct SlotMap {
    /// Per slot, an index into `masters` (None: no master serves it).
    owner: Vec<Option<u16>>,
    masters: Vec<String>,
}

impl SlotMap {
    /// Reads a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, …], replicas…], …]`. An
    /// empty host means the node that answered, `asked_host`.
    pub fn parse(reply: &Value, asked_host: &str) -> Result<SlotMap, String> {
        let bad = || format!("CLUSTER SLOTS answered {reply:?}");
        let Value::Array(ranges) = reply else {
            return Err(bad());
        };
        let mut map = SlotMap {
            owner: vec![None; SLOTS as usize],
            masters: Vec::new(),
        };
        for range in ranges {
            let Value::Array(parts) = range else {
                return Err(bad());
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                return Err(bad());
            };
            let host = match master.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => return Err(bad()),
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return Err(bad());
            };
            let host = if host.is_empty() || host == "?" {
                asked_host.to_owned()
            } else {
                host
            };
            let addr = format!("{host}:{port}");
            let index = match map.masters.iter().position(|m| *m == addr) {
                Some(i) => i,
                None => {
                    map.masters.push(addr);
                    map.masters.len() - 1
                }
            } as u16;
            let (start, end) = (*start as usize, *end as usize);
            if start > end || end >= SLOTS as usize {
                return Err(bad());
            }
            map.owner[start..=end]
                .iter_mut()
                .for_each(|o| *o = Some(index));
        }
        if map.masters.is_empty() {
            return Err("the Redis Cluster serves no slot yet (CLUSTER SLOTS is empty)".into());
        }
        Ok(map)
    }

    /// `host:port` of the master serving `slot`.
    pub fn master_of(&self, slot: u16) -> Option<&str> {
        let index = self.owner.get(slot as usize).copied().flatten()?;
        Some(self.masters[index as usize].as_str())
    }

    /// Every master's `host:port`, in the order `CLUSTER SLOTS` named them.
    pub fn masters(&self) -> &[String] {
        &self.masters
    }
}

/// What a cluster node says instead of running a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Redirect {
    /// The slot is served by `addr` now: the map is out of date.
    Moved(String),
    /// The slot is being migrated and this key is at `addr` already: ask there, once.
    Ask(String),
    /// Try again shortly: a multi-key command during a migration, or the cluster is down.
    TryAgain,
}

/// The redirect in a server error's code and details (`MOVED 3999 127.0.0.1:6381`).
pub fn redirect(code: &str, details: Option<&str>) -> Option<Redirect> {
    let addr = || details?.split_whitespace().nth(1).map(str::to_owned);
    match code {
        "MOVED" => addr().map(Redirect::Moved),
        "ASK" => addr().map(Redirect::Ask),
        "TRYAGAIN" | "CLUSTERDOWN" => Some(Redirect::TryAgain),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster_hashing() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"queue_pg:{emails}:high"), slot(b"emails"));
        // An empty tag hashes the whole key; only the first `{` counts.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
    }

    #[test]
    fn slots_agree_with_the_redis_crate() {
        use redis::cluster_routing::Slot;
        for key in ["", "a", "queue_pg:job:42", "x{y}z", "{}", "{a}{b}", "é{ü}"] {
            assert_eq!(
                Slot::new(slot(key.as_bytes())),
                Some(Slot::for_key(key)),
                "{key}"
            );
        }
    }

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.into()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn the_slot_map_names_each_slots_master() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("", 7001)]),
        ]);
        let map = SlotMap::parse(&reply, "10.0.0.9").unwrap();
        assert_eq!(map.master_of(0), Some("127.0.0.1:7000"));
        assert_eq!(map.master_of(5460), Some("127.0.0.1:7000"));
        assert_eq!(map.master_of(5461), Some("10.0.0.9:7001"));
        assert_eq!(map.masters().len(), 2);
        let partial = Value::Array(vec![Value::Array(vec![
            Value::Int(10),
            Value::Int(20),
            node("h", 1),
        ])]);
        assert_eq!(SlotMap::parse(&partial, "h").unwrap().master_of(9), None);
        assert!(SlotMap::parse(&Value::Array(vec![]), "h").is_err());
        assert!(SlotMap::parse(&Value::Int(1), "h").is_err());
    }

    #[test]
    fn redirects_are_read_from_error_replies() {
        assert_eq!(
            redirect("MOVED", Some("3999 127.0.0.1:6381")),
            Some(Redirect::Moved("127.0.0.1:6381".into()))
        );
        assert_eq!(
            redirect("ASK", Some("3999 127.0.0.1:6382")),
            Some(Redirect::Ask("127.0.0.1:6382".into()))
        );
        assert_eq!(
            redirect(
                "TRYAGAIN",
                Some("Multiple keys request during rehashing of slot")
            ),
            Some(Redirect::TryAgain)
        );
        assert_eq!(redirect("CLUSTERDOWN", None), Some(Redirect::TryAgain));
        assert_eq!(redirect("WRONGTYPE", Some("Operation against a key")), None);
        assert_eq!(redirect("MOVED", None), None);
    }
}
