//! Redis memory upkeep, used by `queue.optimize_memory()` and by the bridge's memory check:
//!
//! - Job hashes: SCAN (never KEYS) over `<prefix>:job:*`, master by master; a hash without a TTL whose job Postgres
//!   shows finished, or no longer has, gets `queue.job_hash_ttl`. Postgres decides, not the
//!   hash's own `status` field (which may be stale); the hash of an unfinished job is never
//!   touched, and nothing is deleted.
//! - The dead-letter list: while Redis uses more than 80 % of its `maxmemory`, the older half of
//!   the list is trimmed, again and again. Dead jobs stay in Postgres (`queue.dead_letters`),
//!   which is their durable record; the Redis list is a copy for workers and dashboards.

use super::{info_field, Client, Group, Keys};
use crate::settings;
use std::collections::HashSet;

/// Keys per SCAN call (a hint to Redis).
const SCAN_COUNT: usize = 1000;
/// Redis is under memory pressure above this share of its `maxmemory`.
const PRESSURE: f64 = 0.8;
/// At most this many halvings of the dead-letter list per check.
const MAX_TRIMS: usize = 16;

/// Gives the key a TTL if it has none (`EXPIRE … NX`, which needs Redis 7).
const EXPIRE_IF_NO_TTL: &str = "
    if redis.call('TTL', KEYS[1]) == -1 then
        return redis.call('EXPIRE', KEYS[1], ARGV[1])
    end
    return 0";

#[derive(Default, Debug)]
pub struct Report {
    pub scanned: u64,
    pub expired: u64,
    /// Hashes without a TTL left alone because their job is unfinished.
    pub kept: u64,
    pub trimmed: u64,
}

/// One pass over the job hashes of every master, resumable between calls.
pub struct Sweep {
    /// The masters to scan (read from the client at the first scan), and which one is next.
    nodes: Option<Vec<String>>,
    node: usize,
    cursor: u64,
    pattern: String,
    id_prefix: String,
    pub report: Report,
}

impl Sweep {
    pub fn new(keys: &Keys) -> Self {
        Sweep {
            nodes: None,
            node: 0,
            cursor: 0,
            pattern: format!("{}*", glob_escape(&keys.job_prefix())),
            id_prefix: keys.job_prefix(),
            report: Report::default(),
        }
    }

    pub fn done(&self) -> bool {
        self.nodes.as_ref().is_some_and(|n| self.node >= n.len())
    }

    /// One SCAN call on the current master; returns the ids of the job hashes it found that
    /// have no TTL.
    pub fn scan(&mut self, client: &mut Client) -> Result<Vec<i64>, String> {
        let nodes = self.nodes.get_or_insert_with(|| client.masters());
        let Some(addr) = nodes.get(self.node) else {
            return Ok(Vec::new());
        };
        let mut scan = redis::cmd("SCAN");
        scan.arg(self.cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .arg("TYPE")
            .arg("hash");
        let (cursor, found): (u64, Vec<String>) = client.query_node(addr, scan)?;
        self.cursor = cursor;
        if cursor == 0 {
            self.node += 1;
        }
        self.report.scanned += found.len() as u64;
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let groups = found
            .iter()
            .map(|key| {
                let mut g = Group::on_key(key.clone());
                g.cmd("TTL").arg(key);
                g
            })
            .collect();
        let ttls = client.run_all(groups)?;
        Ok(found
            .iter()
            .zip(ttls)
            .filter(|(_, ttl)| matches!(ttl.first(), Some(redis::Value::Int(-1))))
            .filter_map(|(key, _)| key.strip_prefix(&self.id_prefix)?.parse().ok())
            .collect())
    }

    /// Gives `queue.job_hash_ttl` to the hashes of `ids` that still have no TTL (the bridge may
    /// have set one meanwhile), except those of the `unfinished` jobs.
    pub fn expire(
        &mut self,
        client: &mut Client,
        keys: &Keys,
        ids: &[i64],
        unfinished: &HashSet<i64>,
    ) -> Result<(), String> {
        let finished: Vec<String> = ids
            .iter()
            .filter(|id| !unfinished.contains(id))
            .map(|&id| keys.job(id))
            .collect();
        self.report.kept += (ids.len() - finished.len()) as u64;
        let ttl = settings::job_hash_ttl_s();
        let groups = finished
            .iter()
            .map(|key| {
                let mut g = Group::on_key(key.clone());
                g.cmd("EVAL").arg(EXPIRE_IF_NO_TTL).arg(1).arg(key).arg(ttl);
                g
            })
            .collect();
        let replies = client.run_all(groups)?;
        self.report.expired += replies
            .iter()
            .filter(|r| matches!(r.first(), Some(redis::Value::Int(1))))
            .count() as u64;
        Ok(())
    }
}

/// SCAN's MATCH is a glob: the prefix's own `*?[]\` must match literally.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Redis's `used_memory` and `maxmemory` (0: no limit), summed over the masters.
pub fn memory(client: &mut Client) -> Result<(i64, i64), String> {
    Ok(memory_per_master(client)?
        .iter()
        .fold((0, 0), |(used, max), m| (used + m.used, max + m.max)))
}

/// A master's memory as `INFO memory` tells it.
#[derive(Clone, Debug, PartialEq)]
pub struct MasterMemory {
    pub addr: String,
    pub used: i64,
    /// 0: no limit.
    pub max: i64,
    pub policy: String,
}

impl MasterMemory {
    /// Its `maxmemory-policy` is not `noeviction`: it may evict keys when full.
    pub fn evicting(&self) -> bool {
        self.policy != "noeviction"
    }
}

/// Every master's memory: one `INFO memory` per master.
pub fn memory_per_master(client: &mut Client) -> Result<Vec<MasterMemory>, String> {
    client
        .masters()
        .into_iter()
        .map(|addr| {
            let mut info = redis::cmd("INFO");
            info.arg("memory");
            let info: String = client.query_node(&addr, info)?;
            let (used, max) = parse_memory(&info)?;
            let policy = info
                .lines()
                .find_map(|l| l.strip_prefix("maxmemory_policy:"))
                .map(|p| p.trim().to_owned())
                .ok_or("Redis's INFO memory has no maxmemory_policy")?;
            Ok(MasterMemory {
                addr,
                used,
                max,
                policy,
            })
        })
        .collect()
}

/// The masters whose `maxmemory-policy` is not `noeviction`, with their policy.
pub fn evicting_masters(client: &mut Client) -> Result<Vec<(String, String)>, String> {
    Ok(memory_per_master(client)?
        .into_iter()
        .filter(MasterMemory::evicting)
        .map(|m| (m.addr, m.policy))
        .collect())
}

/// `used_memory` and `maxmemory` of the node serving `key`.
fn memory_at(client: &mut Client, key: &str) -> Result<(i64, i64), String> {
    let mut info = redis::cmd("INFO");
    info.arg("memory");
    parse_memory(&client.query::<String>(key, info)?)
}

fn parse_memory(info: &str) -> Result<(i64, i64), String> {
    let field = |name| info_field(info, name).ok_or(format!("Redis's INFO memory has no {name}"));
    Ok((field("used_memory")?, field("maxmemory")?))
}

/// While the node holding the dead-letter list uses more than 80 % of its maxmemory, drops the
/// older half of the list (entries are LPUSHed: the newest are at the head). Returns how many
/// entries went.
pub fn trim_dead_letters(client: &mut Client, keys: &Keys) -> Result<u64, String> {
    let list = keys.dead_letter_list();
    let mut trimmed = 0;
    for _ in 0..MAX_TRIMS {
        let (used, max) = memory_at(client, &list)?;
        if max <= 0 || (used as f64) <= PRESSURE * max as f64 {
            break;
        }
        let mut llen = redis::cmd("LLEN");
        llen.arg(&list);
        let len: i64 = client.query(&list, llen)?;
        if len == 0 {
            break;
        }
        let keep = len / 2;
        let mut ltrim = redis::cmd("LTRIM");
        ltrim.arg(&list).arg(0).arg(keep - 1);
        client.query::<()>(&list, ltrim)?;
        trimmed += (len - keep) as u64;
    }
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::glob_escape;

    #[test]
    fn glob_characters_of_the_prefix_match_literally() {
        assert_eq!(glob_escape("queue_pg:job:"), "queue_pg:job:");
        assert_eq!(glob_escape(r"a*b?[c]\d"), r"a\*b\?\[c\]\\d");
    }
}
