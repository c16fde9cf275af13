//! Which migrated jobs are still in their Redis list, told by the list itself. Lists are FIFO
//! and every message takes the next number of the push order (`push::number`), so a list holds
//! exactly the jobs pushed to it from its oldest entry (its tail) on: a migrated job numbered
//! below the tail's has left the list, popped by a worker or lost with it; when the list is
//! empty, every job pushed to it so far has left. Nothing kept in Redis besides the list is
//! trusted: a deleted or evicted list reads as empty, one created again as starting later.
//!
//! Used by `rescue` (jobs out of their list for `start_timeout` are dispatched again) and by
//! `redis_loss` (after a loss, at once). Reads Redis first, then Postgres in the caller's
//! transaction: no transaction is open while the bridge waits for Redis.

use crate::lifecycle::{Priority, Sql};
use crate::redis::{Client, Group, Keys};
use crate::spi_plans::types::{INT4_ARRAY, INT8, INT8_ARRAY, TEXT, TEXT_ARRAY};
use crate::spi_plans::{self, first_value, required, with_plan};
use pgrx::spi::SpiClient;
use serde::Deserialize;

/// A Redis list: a queue and a priority.
pub type List = (String, Priority);

/// How many entries from a list's tail are read to find one still current. An entry is stale
/// when its job was started, finished or cancelled meanwhile (a duplicate delivery): the worker
/// who pops it drops it, and until then the next entry tells where the list starts.
const TAIL_ENTRIES: isize = 4;

// The (queue, priority) lists that hold migrated jobs (of the queues in $1; NULL: all): a loose
// index scan, one probe per list, however many jobs wait in them.
static MIGRATED_LISTS: Sql = Sql::new(
    "
    WITH RECURSIVE lists AS (
        (SELECT queue_name, priority FROM queue.jobs WHERE status = {migrated}
         ORDER BY queue_name, priority LIMIT 1)
        UNION ALL
        SELECT n.queue_name, n.priority
        FROM lists l, LATERAL (
            SELECT queue_name, priority FROM queue.jobs
            WHERE status = {migrated} AND (queue_name, priority) > (l.queue_name, l.priority)
            ORDER BY queue_name, priority LIMIT 1) n)
    SELECT queue_name, priority FROM lists
    WHERE $1 IS NULL OR queue_name = ANY($1)",
);

// Of a list's oldest entries (oldest first), the first whose job is still migrated for that
// delivery: its place in the push order.
static FIRST_CURRENT: Sql = Sql::new(
    "
    SELECT j.dispatch_seq
    FROM unnest($3::int8[], $4::int4[]) WITH ORDINALITY AS t(id, attempt, ord)
    JOIN queue.jobs j ON j.id = t.id
    WHERE j.status = {migrated} AND j.queue_name = $1 AND j.priority = $2
      AND j.attempt_count + 1 = t.attempt
    ORDER BY t.ord LIMIT 1",
);

// The next number of the push order: every job pushed so far is numbered below it.
static NEXT_NUMBER: &str = "
    SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END
    FROM queue.dispatch_order";

// A list's migrated jobs numbered below $3 go back to `queued` (dispatch pushes them again).
// Skips rows a worker holds: the bridge never waits for a worker's transaction (and so is never
// part of a deadlock); a skipped job waits for a later pass.
static REQUEUE_BELOW: Sql = Sql::new(
    "
    UPDATE queue.jobs SET status = {queued}, dispatch_seq = NULL, updated_at = now()
    WHERE id IN (SELECT id FROM queue.jobs
                 WHERE status = {migrated} AND queue_name = $1 AND priority = $2
                   AND dispatch_seq < $3
                 FOR UPDATE SKIP LOCKED)",
);

static COUNT_BELOW: Sql = Sql::new(
    "
    SELECT count(*) FROM queue.jobs
    WHERE status = {migrated} AND queue_name = $1 AND priority = $2 AND dispatch_seq < $3",
);

/// The lists that hold migrated jobs, of `queues` only if given.
pub fn migrated_lists(client: &mut SpiClient<'_>, queues: Option<&[String]>) -> Vec<List> {
    let args = [queues.map(|q| q.to_vec()).into()];
    with_plan(client, &MIGRATED_LISTS, &[TEXT_ARRAY], |client, plan| {
        let rows = client
            .select(plan, None, &args)
            .map_err(|e| e.to_string())?;
        rows.map(|r| {
            Ok((
                required(r.get::<String>(1), "queue_name")?,
                Priority::parse(&required::<String>(r.get(2), "priority")?)?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()
    })
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: listing migrated jobs failed: {e}"))
}

/// The fields of a list entry that say which delivery it is.
#[derive(Deserialize)]
struct Delivery {
    id: i64,
    attempt: i32,
}

/// Per list, its oldest entries as (id, attempt), oldest first: empty when the list is; None when
/// none of them is a delivery.
pub struct Tails(Vec<Option<Vec<(i64, i32)>>>);

/// Reads the oldest entries of each list: one round trip per node.
pub fn read(client: &mut Client, keys: &Keys, lists: &[List]) -> Result<Tails, String> {
    let groups = lists
        .iter()
        .map(|(queue, priority)| {
            let key = keys.list(queue, *priority);
            let mut g = Group::on_key(key.clone());
            g.cmd("LRANGE").arg(key).arg(-TAIL_ENTRIES).arg(-1);
            g
        })
        .collect();
    let tails = client
        .run_all(groups)?
        .into_iter()
        .map(|replies| {
            let reply = replies.into_iter().next().ok_or("LRANGE: no reply")?;
            let entries: Vec<Vec<u8>> =
                redis::from_redis_value(reply).map_err(|e| e.to_string())?;
            Ok(deliveries(&entries))
        })
        .collect::<Result<_, String>>()?;
    Ok(Tails(tails))
}

/// The deliveries of entries read from a list's tail end (LRANGE order: the oldest last), oldest
/// first. An entry that is not a delivery (written by someone else) tells nothing and is
/// skipped; None when entries were read and none is one.
fn deliveries(entries: &[Vec<u8>]) -> Option<Vec<(i64, i32)>> {
    let found: Vec<(i64, i32)> = entries
        .iter()
        .rev()
        .filter_map(|e| serde_json::from_slice::<Delivery>(e).ok())
        .map(|d| (d.id, d.attempt))
        .collect();
    (entries.is_empty() || !found.is_empty()).then_some(found)
}

/// Per list, where it starts in the push order: every migrated job of the list numbered below
/// it is in no list. None: its oldest entries were all stale, so it is not known this time.
/// Runs inside the caller's transaction, after [`read`] (no push in between: the bridge pushes
/// only in `dispatch`).
pub fn starts(client: &mut SpiClient<'_>, lists: &[List], tails: &Tails) -> Vec<Option<i64>> {
    let next = tails
        .0
        .iter()
        .any(|t| t.as_ref().is_some_and(|t| t.is_empty()))
        .then(|| next_number(client));
    lists
        .iter()
        .zip(&tails.0)
        .map(|((queue, priority), oldest)| {
            let oldest = oldest.as_ref()?;
            if oldest.is_empty() {
                return next;
            }
            let ids: Vec<i64> = oldest.iter().map(|d| d.0).collect();
            let attempts: Vec<i32> = oldest.iter().map(|d| d.1).collect();
            let args = [
                queue.as_str().into(),
                priority.as_str().into(),
                ids.into(),
                attempts.into(),
            ];
            with_plan(
                client,
                &FIRST_CURRENT,
                &[TEXT, TEXT, INT8_ARRAY, INT4_ARRAY],
                |client, plan| {
                    client
                        .select(plan, Some(1), &args)
                        .and_then(|t| first_value::<i64>(t, 1))
                },
            )
            .unwrap_or_else(|e| {
                pgrx::error!("queue_pg bridge: looking up the tail of a Redis list failed: {e}")
            })
        })
        .collect()
}

fn next_number(client: &mut SpiClient<'_>) -> i64 {
    with_plan(client, NEXT_NUMBER, &[], |client, plan| {
        client
            .select(plan, Some(1), &[])
            .and_then(|t| first_value::<i64>(t, 1))
    })
    .map_err(|e| e.to_string())
    .and_then(|v| v.ok_or_else(|| "no row".to_string()))
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: reading the push order failed: {e}"))
}

/// Dispatches again a list's migrated jobs numbered below `below`. Returns how many; the ones a
/// worker's transaction holds are left for a later pass.
pub fn requeue_below(client: &mut SpiClient<'_>, list: &List, below: i64) -> usize {
    let args = [list.0.as_str().into(), list.1.as_str().into(), below.into()];
    spi_plans::update(client, &REQUEUE_BELOW, &[TEXT, TEXT, INT8], None, &args)
        .map(|t| t.len())
        .unwrap_or_else(|e| {
            pgrx::error!("queue_pg bridge: dispatching jobs in no Redis list again failed: {e}")
        })
}

/// How many of a list's migrated jobs are numbered below `below`.
pub fn count_below(client: &mut SpiClient<'_>, list: &List, below: i64) -> i64 {
    let args = [list.0.as_str().into(), list.1.as_str().into(), below.into()];
    with_plan(client, &COUNT_BELOW, &[TEXT, TEXT, INT8], |client, plan| {
        client
            .select(plan, Some(1), &args)
            .and_then(|t| first_value::<i64>(t, 1))
    })
    .map_err(|e| e.to_string())
    .and_then(|v| v.ok_or_else(|| "no row".to_string()))
    .unwrap_or_else(|e| pgrx::error!("queue_pg bridge: counting jobs in no Redis list failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_come_oldest_first_and_foreign_entries_are_skipped() {
        let entries: Vec<Vec<u8>> = vec![
            br#"{"id":9,"queue":"q","attempt":2,"payload":{}}"#.to_vec(),
            b"not json".to_vec(),
            br#"{"id":7,"attempt":1}"#.to_vec(),
        ];
        assert_eq!(deliveries(&entries), Some(vec![(7, 1), (9, 2)]));
        assert_eq!(deliveries(&[]), Some(vec![]), "an empty list");
        assert_eq!(deliveries(&[b"x".to_vec()]), None, "nothing known");
    }
}
