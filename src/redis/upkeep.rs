//! Redis memory upkeep, used by `queue.optimize_memory()` and by the bridge's memory check:
//!
//! - Job hashes: SCAN (never KEYS) over `<prefix>:job:*`; a hash without a TTL whose job Postgres
//!   shows finished, or no longer has, gets `queue.job_hash_ttl`. Postgres decides, not the
//!   hash's own `status` field (which may be stale); the hash of an unfinished job is never
//!   touched, and nothing is deleted.
//! - The dead-letter list: while Redis uses more than 80 % of its `maxmemory`, the older half of
//!   the list is trimmed, again and again. Dead jobs stay in Postgres (`queue.dead_letters`),
//!   which is their durable record; the Redis list is a copy for workers and dashboards.

use super::{info_field, Conn, Keys};
use crate::settings;
use std::collections::HashSet;

/// Keys per SCAN call (a hint to Redis).
const SCAN_COUNT: usize = 1000;
/// Redis is under memory pressure above this share of its `maxmemory`.
const PRESSURE: f64 = 0.8;
/// At most this many halvings of the dead-letter list per check.
const MAX_TRIMS: usize = 16;

/// Gives a TTL to each key that has none (the bridge may have set one meanwhile).
const EXPIRE_IF_NO_TTL: &str = "
    local n = 0
    for _, key in ipairs(KEYS) do
        if redis.call('TTL', key) == -1 then
            redis.call('EXPIRE', key, ARGV[1])
            n = n + 1
        end
    end
    return n";

#[derive(Default, Debug)]
pub struct Report {
    pub scanned: u64,
    pub expired: u64,
    /// Hashes without a TTL left alone because their job is unfinished.
    pub kept: u64,
    pub trimmed: u64,
}

/// One pass over the job hashes, resumable between calls.
pub struct Sweep {
    cursor: u64,
    started: bool,
    pattern: String,
    id_prefix: String,
    pub report: Report,
}

impl Sweep {
    pub fn new(keys: &Keys) -> Self {
        Sweep {
            cursor: 0,
            started: false,
            pattern: format!("{}*", glob_escape(&keys.job_prefix())),
            id_prefix: keys.job_prefix(),
            report: Report::default(),
        }
    }

    pub fn done(&self) -> bool {
        self.started && self.cursor == 0
    }

    /// One SCAN call; returns the ids of the job hashes it found that have no TTL.
    pub fn scan(&mut self, con: &mut Conn) -> Result<Vec<i64>, String> {
        let (cursor, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(self.cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .arg("TYPE")
            .arg("hash")
            .query(con)
            .map_err(|e| e.to_string())?;
        self.cursor = cursor;
        self.started = true;
        self.report.scanned += found.len() as u64;
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in &found {
            pipe.cmd("TTL").arg(key);
        }
        let ttls: Vec<i64> = pipe.query(con).map_err(|e| e.to_string())?;
        Ok(found
            .iter()
            .zip(ttls)
            .filter(|(_, ttl)| *ttl == -1)
            .filter_map(|(key, _)| key.strip_prefix(&self.id_prefix)?.parse().ok())
            .collect())
    }

    /// Gives `queue.job_hash_ttl` to the hashes of `ids` that still have no TTL, except those
    /// of the `unfinished` jobs.
    pub fn expire(
        &mut self,
        con: &mut Conn,
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
        if finished.is_empty() {
            return Ok(());
        }
        let n: u64 = redis::cmd("EVAL")
            .arg(EXPIRE_IF_NO_TTL)
            .arg(finished.len())
            .arg(&finished)
            .arg(settings::job_hash_ttl_s())
            .query(con)
            .map_err(|e| e.to_string())?;
        self.report.expired += n;
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

/// Redis's `used_memory` and `maxmemory` (0: no limit).
pub fn memory(con: &mut Conn) -> Result<(i64, i64), String> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(con)
        .map_err(|e| e.to_string())?;
    let field = |name| info_field(&info, name).ok_or(format!("Redis's INFO memory has no {name}"));
    Ok((field("used_memory")?, field("maxmemory")?))
}

/// While Redis uses more than 80 % of its maxmemory, drops the older half of the dead-letter
/// list (entries are LPUSHed: the newest are at the head). Returns how many entries went.
pub fn trim_dead_letters(con: &mut Conn, keys: &Keys) -> Result<u64, String> {
    let list = keys.dead_letter_list();
    let mut trimmed = 0;
    for _ in 0..MAX_TRIMS {
        let (used, max) = memory(con)?;
        if max <= 0 || (used as f64) <= PRESSURE * max as f64 {
            break;
        }
        let len: i64 = redis::cmd("LLEN")
            .arg(&list)
            .query(con)
            .map_err(|e| e.to_string())?;
        if len == 0 {
            break;
        }
        let keep = len / 2;
        redis::cmd("LTRIM")
            .arg(&list)
            .arg(0)
            .arg(keep - 1)
            .query::<()>(con)
            .map_err(|e| e.to_string())?;
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
