//! Which report streams the applier reads, and where each read left off.
//!
//! A worker reports only on jobs it popped, so the queues to watch are those with jobs in Redis
//! or running, plus every queue Postgres knows by name (`queue.queues`, and `queue.stats`, which
//! holds every queue that ever had an outcome), so that late reports on a quiet queue are still
//! read, judged and removed. The set is read again every poll interval and only grows while the
//! applier runs.

use crate::bridge::context::extension_ready;
use crate::lifecycle::{queues_in_state, Sql};
use crate::redis::slots;
use crate::redis::{Group, Keys};
use crate::spi_plans::{required, with_plan};
use pgrx::spi::SpiClient;
use std::collections::{BTreeMap, BTreeSet};

// The queues of waiting and running jobs by a skip scan over the partial index of migrated jobs
// (one probe per queue), plus the named ones; `$1`: also look at queued and running jobs the
// slow way (once, at start).
static QUEUES: Sql = Sql::new(concat!(
    "WITH RECURSIVE ",
    queues_in_state!("{migrated}"),
    "
    SELECT queue_name FROM names WHERE queue_name IS NOT NULL
    UNION SELECT queue_name FROM queue.queues
    UNION SELECT queue_name FROM queue.stats
    UNION SELECT DISTINCT queue_name FROM queue.jobs
          WHERE $1 AND status IN ({queued}, {running})"
));

/// The watched streams, in a fixed order, with the id each read continues after.
#[derive(Default)]
pub struct Streams {
    queues: Vec<String>,
    keys: Vec<String>,
    after: Vec<String>,
    /// Whether the slow look at queued and running jobs has been done.
    looked_everywhere: bool,
}

impl Streams {
    /// Adds the queues Postgres knows now. False if the extension is not installed.
    pub fn refresh(&mut self, client: &mut SpiClient<'_>, keys: &Keys) -> bool {
        if !extension_ready(client) {
            return false;
        }
        let everywhere = !self.looked_everywhere;
        let found = with_plan(
            client,
            &QUEUES,
            &[crate::spi_plans::types::BOOL],
            |c, plan| {
                let rows = c
                    .select(plan, None, &[everywhere.into()])
                    .map_err(|e| e.to_string())?;
                rows.map(|r| required::<String>(r.get(1), "queue_name"))
                    .collect::<Result<BTreeSet<String>, String>>()
            },
        )
        .unwrap_or_else(|e| pgrx::error!("queue_pg reports: listing the queues failed: {e}"));
        self.looked_everywhere = true;
        for queue in found {
            self.add(queue, keys);
        }
        true
    }

    fn add(&mut self, queue: String, keys: &Keys) {
        if !self.queues.contains(&queue) {
            self.keys.push(keys.reports(&queue));
            self.queues.push(queue);
            self.after.push("0-0".into());
        }
    }

    /// After the key prefix changed (a reload): the same queues under the new names, read from
    /// the start.
    pub fn rename(&mut self, keys: &Keys) {
        self.keys = self.queues.iter().map(|q| keys.reports(q)).collect();
        self.rewind();
    }

    /// Read every stream from its start again (after a new connection: Redis may have been
    /// replaced, and entry ids only grow within one stream's life).
    pub fn rewind(&mut self) {
        self.after.iter_mut().for_each(|a| *a = "0-0".into());
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    pub fn queues(&self) -> &[String] {
        &self.queues
    }

    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// `XREAD COUNT <count> BLOCK <ms> STREAMS <keys…> <ids…>`, one command for every stream.
    pub fn xread(&self, count: usize, block_ms: u64) -> Group {
        let mut group = Group::on_key(self.keys[0].clone());
        group
            .cmd("XREAD")
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.keys)
            .arg(&self.after);
        group
    }

    /// For a cluster, where one command reads the streams of one slot only: per slot, a
    /// non-blocking `XREAD COUNT <count> STREAMS <keys…> <ids…>` and the indices of its streams.
    pub fn xread_per_slot(&self, count: usize) -> Vec<(Group, Vec<usize>)> {
        let mut by_slot: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (i, key) in self.keys.iter().enumerate() {
            by_slot
                .entry(slots::slot(key.as_bytes()))
                .or_default()
                .push(i);
        }
        by_slot
            .into_values()
            .map(|members| {
                let mut group = Group::on_key(self.keys[members[0]].clone());
                let cmd = group.cmd("XREAD").arg("COUNT").arg(count).arg("STREAMS");
                for &i in &members {
                    cmd.arg(&self.keys[i]);
                }
                for &i in &members {
                    cmd.arg(&self.after[i]);
                }
                (group, members)
            })
            .collect()
    }

    /// The read of stream `i` went up to `entry_id`.
    pub fn advance(&mut self, i: usize, entry_id: &str) {
        self.after[i] = entry_id.to_owned();
    }
}
