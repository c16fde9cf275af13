//! Duty: Redis follows Postgres after commit. The bridge applies `queue.redis_outbox` (written
//! by the lifecycle functions in their transactions) to the job hashes and the dead-letter list,
//! then deletes the rows it applied by their ids (counting their outcomes: `outcomes`). Every
//! Redis command is idempotent, so a crash in between only means applying a change twice.
//!
//! Runs when a commit changed job states, while rows are left over, and once per poll interval.

use super::context::{extension_ready, in_transaction, Context};
use super::projection::{job_columns, put_dead_letters, DeadLetter, End, JobRow};
use super::report::{Count, Level};
use super::timer::Every;
use super::{outcomes, shared};
use crate::lifecycle::JobState;
use crate::lifecycle::Sql;
use crate::redis::wire;
use crate::redis::{iso_utc, Client, Group, Keys};
use crate::settings;
use crate::spi_plans::types::INT8;
use crate::spi_plans::{required, with_plan};
use pgrx::spi::SpiClient;
use std::time::Instant;
use std::time::SystemTime;

/// One outbox row with the job's current state (None when the job no longer exists).
pub struct Change {
    id: i64,
    job_id: i64,
    /// The job left the dead letters (replayed, or pruned): remove its entry and marker.
    replayed: bool,
    /// The state the job entered with this change.
    entered: JobState,
    /// The job as it is now (a later change may have moved it on since the row was written).
    job: Option<JobRow>,
}

// One primary-key lookup per outbox row: the LIMIT keeps Postgres from flattening the LATERAL
// subquery into a join, which it planned as a hash join over all of queue.jobs (a full scan in
// every bridge cycle). Only a dead job's payload is needed (for its dead-letter entry).
static READ_OUTBOX: Sql = Sql::new(concat!(
    "
    SELECT o.id, o.job_id, o.event, o.status AS entered, j.*
    FROM (SELECT id, job_id, event, status FROM queue.redis_outbox ORDER BY id LIMIT $1) o
    LEFT JOIN LATERAL (SELECT ",
    job_columns!(),
    " FROM queue.jobs WHERE id = o.job_id LIMIT 1) j ON true"
));

/// Removes the job's entries (they start with ARGV[1]) from the dead-letter list.
const REMOVE_DEAD_LETTERS_OF: &str = "
    local removed = 0
    for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
        if string.sub(item, 1, #ARGV[1]) == ARGV[1] then
            removed = removed + redis.call('LREM', KEYS[1], 0, item)
        end
    end
    return removed";

/// At most this many outbox rows per Redis round trip.
const BATCH: usize = 1000;

#[derive(Default)]
pub struct StateSync {
    every: Every,
    /// Rows may be waiting: a full batch was applied, or Redis failed or was down.
    left_over: bool,
}

impl StateSync {
    pub fn due(&self, now: Instant) -> bool {
        self.left_over || shared::states_pending() || self.every.due(settings::poll_interval(), now)
    }

    pub fn next_run(&self) -> Instant {
        self.every.next(settings::poll_interval())
    }

    /// Applies waiting changes batch by batch until none is left or Redis fails.
    pub fn run(&mut self, cx: &mut Context, now: Instant) -> Vec<Count> {
        self.every.ran(now);
        self.left_over = true;
        let mut applied = 0;
        // State changes committed from here on wake the bridge again.
        shared::states_wake_taken();
        if cx.redis.connected() {
            let read = in_transaction(|client| {
                extension_ready(client).then(|| read_changes(client, BATCH))
            });
            // None: the extension is not installed, so there is no outbox to read.
            let mut changes = read.into_iter().flatten().collect::<Vec<_>>();
            loop {
                if changes.is_empty() {
                    self.left_over = false;
                    break;
                }
                let keys = &cx.keys;
                if cx
                    .redis
                    .run(|client| apply(client, keys, &changes))
                    .is_none()
                {
                    break;
                }
                applied += changes.len();
                let more = changes.len() == BATCH;
                let ids = changes.iter().map(|c| c.id).collect();
                let next = in_transaction(|client| {
                    outcomes::delete_applied(client, ids);
                    if more {
                        read_changes(client, BATCH)
                    } else {
                        Vec::new()
                    }
                });
                publish_totals(&changes);
                changes = next;
            }
        }
        vec![Count::new(
            applied,
            Level::Debug,
            "{n} state changes applied to Redis",
        )]
    }
}

/// Reads up to `limit` pending changes, oldest first. Runs inside the caller's transaction.
/// A row that does not decode is an ERROR (logged, and in `health()`), never a default.
fn read_changes(client: &mut SpiClient<'_>, limit: usize) -> Vec<Change> {
    with_plan(client, &READ_OUTBOX, &[INT8], |client, plan| {
        let rows = client
            .select(plan, None, &[(limit as i64).into()])
            .map_err(|e| e.to_string())?;
        rows.map(|row| {
            let job = JobRow::read(&row, 5)?;
            Ok(Change {
                id: required(row.get(1), "redis_outbox.id")?,
                job_id: required(row.get(2), "redis_outbox.job_id")?,
                // A replayed or pruned dead job: its dead-letter entry goes.
                replayed: required::<String>(row.get(3), "redis_outbox.event")? != "state",
                entered: JobState::parse(&required::<String>(row.get(4), "redis_outbox.status")?)?,
                job,
            })
        })
        .collect::<Result<Vec<_>, String>>()
    })
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: reading the Redis outbox failed: {e}"))
}

/// The bridge's own totals, published once the transaction that counted them has committed.
fn publish_totals(changes: &[Change]) {
    let count = |state| {
        let entered = changes.iter().filter(|c| !c.replayed && c.entered == state);
        entered.count() as u64
    };
    shared::add_outcomes(count(JobState::RetryScheduled), count(JobState::Failed));
}

/// Applies the changes to Redis: removals of replayed jobs' dead-letter entries and markers,
/// and each job's hash (once per job), in one round trip per node; then the entries and markers
/// of dead jobs that have none (`projection::put_dead_letters`).
fn apply(client: &mut Client, keys: &Keys, changes: &[Change]) -> Result<(), String> {
    let now = iso_utc(SystemTime::now());
    let hash_ttl = settings::job_hash_ttl_s();
    let mut groups = Vec::new();
    for c in changes.iter().filter(|c| c.replayed) {
        let mut list = Group::on_key(keys.dead_letter_list());
        list.cmd("EVAL")
            .arg(REMOVE_DEAD_LETTERS_OF)
            .arg(1)
            .arg(keys.dead_letter_list())
            .arg(wire::dead_letter_prefix(c.job_id));
        let mut marker = Group::on_key(keys.dead_letter_marker(c.job_id));
        marker.cmd("DEL").arg(keys.dead_letter_marker(c.job_id));
        groups.extend([list, marker]);
    }
    let mut seen = std::collections::HashSet::new();
    let mut dead = Vec::new();
    for c in changes {
        let Some(job) = c.job.as_ref().filter(|_| seen.insert(c.job_id)) else {
            continue;
        };
        let key = keys.job(c.job_id);
        let hash = job.hash(&now);
        let mut group = Group::on_key(key.clone());
        group.cmd("HSET").arg(&key).arg(&hash);
        if hash.expires() {
            group.cmd("EXPIRE").arg(&key).arg(hash_ttl);
        } else {
            group.cmd("PERSIST").arg(&key);
        }
        groups.push(group);
        if let Some(entry) = job.dead_letter_entry(c.job_id) {
            dead.push(DeadLetter {
                id: c.job_id,
                entry,
                ttl_s: settings::dead_letter_ttl_s(),
            });
        }
    }
    client.run_all(groups)?;
    put_dead_letters(client, keys, &dead, End::Head).map(|_| ())
}
