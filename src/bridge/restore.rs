//! Duty: after Redis lost its data (`redis_loss`, or a push that found a queue's epoch key
//! gone), put back what Redis is a projection of, besides the ready lists (which dispatch
//! refills): the dead-letter entries and markers of dead jobs still within
//! `queue.dead_letter_ttl`, newest first, each marker with what is left of its TTL; then the
//! hashes of unfinished jobs, and of finished ones still within `queue.job_hash_ttl` (with what
//! is left of it). One batch per bridge cycle, after dispatch, so a large restore never holds
//! jobs back. What changed meanwhile is not overwritten: an entry goes back only while its
//! marker is missing, a hash only while its key is missing.

use super::context::{extension_ready, in_transaction, Context};
use super::projection::{job_columns, put_dead_letters, DeadLetter, End, JobRow};
use super::report::{Count, Level};
use super::shared;
use crate::lifecycle::Sql;
use crate::redis::{iso_utc, Client, Group, Keys};
use crate::settings;
use crate::spi_plans::types::{INT8, TIMESTAMPTZ};
use crate::spi_plans::{optional, required, with_plan};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::spi::SpiClient;
use std::time::{Duration, Instant, SystemTime};

/// Jobs per batch.
const BATCH: i64 = 500;
/// About how many bytes of Redis memory a restored entry or hash takes.
const RESTORED_BYTES: usize = 400;

// Dead jobs within the dead-letter TTL ($1 s), newest first, after ($2, $3) in that order (from
// the newest when $2 is NULL).
static DEAD_AFTER: Sql = Sql::new(concat!(
    "SELECT id, failed_at,
            GREATEST(1, floor($1 - EXTRACT(EPOCH FROM now() - failed_at)))::bigint AS ttl_s, ",
    job_columns!(),
    "
     FROM queue.jobs
     WHERE status = {failed} AND failed_at > now() - make_interval(secs => $1)
       AND ($2::timestamptz IS NULL OR (failed_at, id) < ($2, $3))
     ORDER BY failed_at DESC, id DESC
     LIMIT $4"
));

// The next $3 jobs above id $1, with what is left of a finished job's hash TTL ($2 s); NULL for
// an unfinished job, whose hash has none.
static HASHES_AFTER: Sql = Sql::new(concat!(
    "SELECT id, CASE WHEN status IN ({completed}, {failed}, {cancelled})
                THEN floor($2 - EXTRACT(EPOCH FROM now() - coalesce(completed_at, failed_at, updated_at)))
                END::float8 AS ttl_s, ",
    job_columns!(),
    "
     FROM queue.jobs WHERE id > $1 ORDER BY id LIMIT $3"
));

/// Writes the hash unless the key exists (state sync wrote a newer one meanwhile); ARGV[1] is
/// the TTL in seconds (0: none), the rest HSET's field-value pairs.
const HASH_IF_MISSING: &str = "
    if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
    redis.call('HSET', KEYS[1], unpack(ARGV, 2))
    if tonumber(ARGV[1]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
    return 1";

/// Where a restore is.
enum Phase {
    /// Dead jobs older than (failed_at, id) are next (None: from the newest).
    DeadLetters(Option<TimestampWithTimeZone>, i64),
    /// Jobs above this id are next.
    Hashes(i64),
}

#[derive(Default)]
pub struct Restore {
    phase: Option<Phase>,
    /// The last batch failed on Redis: the next one waits for the bridge's next cycle.
    stalled: bool,
    /// What this restore put back so far (dead-letter entries, job hashes): logged once, when
    /// it is done.
    restored: (usize, usize),
}

impl Restore {
    /// While a restore is under way, the next batch follows shortly.
    pub fn next_run(&self) -> Option<Instant> {
        self.phase
            .as_ref()
            .filter(|_| !self.stalled)
            .map(|_| Instant::now() + Duration::from_millis(10))
    }

    /// A restore is asked for (Redis lost data) or under way.
    pub fn due(&self, cx: &Context) -> bool {
        cx.redis.connected() && (cx.restore_wanted || self.phase.is_some())
    }

    pub fn run(&mut self, cx: &mut Context) -> Vec<Count> {
        if std::mem::take(&mut cx.restore_wanted) {
            // From the start again, even mid-way: the new loss may have taken what was restored.
            self.phase = Some(Phase::DeadLetters(None, 0));
            shared::set_restoring(true);
        }
        let (mut entries, mut hashes) = (0, 0);
        self.stalled = false;
        // A nearly full Redis takes nothing more: what it holds now matters more than what is
        // put back (`memory_gate`). The batch waits for a later cycle.
        if self.phase.is_some() {
            let (allowed, say) = cx
                .memory_gate
                .allows(&mut cx.redis, &cx.keys, Instant::now());
            if !allowed {
                self.stalled = true;
                return say
                    .map(|s| Count::new(1, Level::Warning, s))
                    .into_iter()
                    .collect();
            }
        }
        let keys = &cx.keys;
        match self.phase.take() {
            None => {}
            Some(Phase::DeadLetters(at, id)) => {
                let batch = in_transaction(|client| {
                    extension_ready(client).then(|| dead_after(client, at, id))
                });
                // None: the extension is gone, and with it what there was to restore.
                let Some(batch) = batch else {
                    shared::set_restoring(false);
                    return Vec::new();
                };
                let last = batch.last().map(|(at, d)| (Some(*at), d.id));
                let dead: Vec<DeadLetter> = batch.into_iter().map(|(_, d)| d).collect();
                match cx
                    .redis
                    .run(|client| put_dead_letters(client, keys, &dead, End::Tail))
                {
                    // Failed: the same batch again on the bridge's next cycle.
                    None => {
                        self.phase = Some(Phase::DeadLetters(at, id));
                        self.stalled = true;
                    }
                    Some(n) => {
                        entries = n;
                        self.phase = Some(match last {
                            Some((at, id)) if dead.len() as i64 == BATCH => {
                                Phase::DeadLetters(at, id)
                            }
                            _ => Phase::Hashes(0),
                        });
                    }
                }
            }
            Some(Phase::Hashes(after)) => {
                let batch = in_transaction(|client| {
                    extension_ready(client).then(|| hashes_after(client, after))
                });
                let Some((rows, next)) = batch else {
                    shared::set_restoring(false);
                    return Vec::new();
                };
                match cx.redis.run(|client| put_hashes(client, keys, &rows)) {
                    None => {
                        self.phase = Some(Phase::Hashes(after));
                        self.stalled = true;
                    }
                    Some(n) => {
                        hashes = n;
                        self.phase = next.map(Phase::Hashes);
                    }
                }
            }
        }
        shared::add_restored(entries as u64, hashes as u64);
        cx.memory_gate
            .spent(((entries + hashes) * RESTORED_BYTES) as i64);
        self.restored.0 += entries;
        self.restored.1 += hashes;
        if self.phase.is_some() {
            return Vec::new();
        }
        shared::set_restoring(false);
        let (entries, hashes) = std::mem::take(&mut self.restored);
        vec![Count::new(
            1,
            Level::Log,
            format!(
                "Redis restored: put back {entries} dead-letter entries and {hashes} job hashes"
            ),
        )]
    }
}

/// The next batch of dead jobs within the dead-letter TTL, newest first, with their failed_at.
fn dead_after(
    client: &mut SpiClient<'_>,
    at: Option<TimestampWithTimeZone>,
    id: i64,
) -> Vec<(TimestampWithTimeZone, DeadLetter)> {
    let ttl = settings::dead_letter_ttl_s();
    let args = [ttl.into(), at.into(), id.into(), BATCH.into()];
    with_plan(
        client,
        &DEAD_AFTER,
        &[INT8, TIMESTAMPTZ, INT8, INT8],
        |c, plan| {
            let rows = c.select(plan, None, &args).map_err(|e| e.to_string())?;
            rows.map(|row| {
                let id: i64 = required(row.get(1), "jobs.id")?;
                let job = JobRow::read(&row, 4)?.ok_or("a dead job without a status")?;
                let entry = job
                    .dead_letter_entry(id)
                    .ok_or("a dead job without a payload")?;
                Ok((
                    required(row.get(2), "jobs.failed_at")?,
                    DeadLetter {
                        id,
                        entry,
                        ttl_s: required(row.get(3), "the marker's TTL")?,
                    },
                ))
            })
            .collect::<Result<Vec<_>, String>>()
        },
    )
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: reading dead jobs to restore failed: {e}"))
}

/// The next batch of jobs whose hash Redis should hold, with the TTL each has left (None: no
/// TTL), and where the next batch starts (None: this was the last).
#[allow(clippy::type_complexity)]
fn hashes_after(
    client: &mut SpiClient<'_>,
    after: i64,
) -> (Vec<(i64, Option<i64>, JobRow)>, Option<i64>) {
    let ttl = settings::job_hash_ttl_s();
    let args = [after.into(), ttl.into(), BATCH.into()];
    let rows = with_plan(client, &HASHES_AFTER, &[INT8, INT8, INT8], |c, plan| {
        let rows = c.select(plan, None, &args).map_err(|e| e.to_string())?;
        rows.map(|row| {
            let ttl: Option<f64> = optional(row.get(2), "the hash's TTL")?;
            Ok((
                required::<i64>(row.get(1), "jobs.id")?,
                ttl.map(|t| t as i64),
                JobRow::read(&row, 3)?.ok_or("a job without a status")?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()
    })
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: reading jobs to restore failed: {e}"));
    let next = (rows.len() as i64 == BATCH)
        .then(|| rows.last().map(|r| r.0))
        .flatten();
    // A finished job past its hash TTL has no hash to put back.
    let wanted = rows
        .into_iter()
        .filter(|(_, ttl, _)| ttl.is_none_or(|t| t >= 1))
        .collect();
    (wanted, next)
}

/// Writes each missing hash, one round trip per node. Returns how many were written.
fn put_hashes(
    client: &mut Client,
    keys: &Keys,
    rows: &[(i64, Option<i64>, JobRow)],
) -> Result<usize, String> {
    let now = iso_utc(SystemTime::now());
    let groups = rows
        .iter()
        .map(|(id, ttl, job)| {
            let key = keys.job(*id);
            let mut g = Group::on_key(key.clone());
            g.cmd("EVAL")
                .arg(HASH_IF_MISSING)
                .arg(1)
                .arg(&key)
                .arg(ttl.unwrap_or(0).max(0))
                .arg(job.hash(&now));
            g
        })
        .collect();
    let replies = client.run_all(groups)?;
    Ok(replies
        .iter()
        .filter(|r| matches!(r.first(), Some(redis::Value::Int(1))))
        .count())
}
