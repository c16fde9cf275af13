//! Enqueueing: `queue.enqueue` and `queue.enqueue_many`. Pure SQL inside the caller's
//! transaction; the bridge is woken when (and only if) that transaction commits.

use super::errors::{invalid_argument, spi_failed};
use super::raw_jsonb::RawJsonb;
use super::validate;
use crate::bridge::wake::wake_on_commit_queued;
use crate::lifecycle::Sql;
use crate::settings;
use crate::spi_plans::types::{INT4, JSONB, TEXT, TIMESTAMPTZ};
use crate::spi_plans::{first_value, required, with_plan};
use pgrx::datum::{DatumWithOid, TimestampWithTimeZone};
use pgrx::prelude::*;

static INSERT_JOB: Sql = Sql::new(
    "
    INSERT INTO queue.jobs (queue_name, payload, priority, status, max_attempts, run_at)
    VALUES ($1, $2, $3,
            CASE WHEN $5 > now() THEN {scheduled} ELSE {queued} END,
            COALESCE($4, (SELECT q.max_attempts FROM queue.queues q WHERE q.queue_name = $1), $6),
            COALESCE($5, now()))
    RETURNING id",
);

static INSERT_DEDUPED_JOB: Sql = Sql::new(
    "
    INSERT INTO queue.jobs (queue_name, payload, priority, status, max_attempts, run_at, dedupe_key)
    VALUES ($1, $2, $3,
            CASE WHEN $5 > now() THEN {scheduled} ELSE {queued} END,
            COALESCE($4, (SELECT q.max_attempts FROM queue.queues q WHERE q.queue_name = $1), $6),
            COALESCE($5, now()), $7)
    ON CONFLICT (queue_name, dedupe_key)
        WHERE dedupe_key IS NOT NULL
          AND status IN {unfinished}
        DO NOTHING
    RETURNING id",
);

static FIND_DEDUPED_JOB: Sql = Sql::new(
    "
    SELECT id FROM queue.jobs
    WHERE queue_name = $1 AND dedupe_key = $2
      AND status IN {unfinished}
    LIMIT 1",
);

static INSERT_MANY: Sql = Sql::new(
    "
    INSERT INTO queue.jobs (queue_name, payload, priority, status, max_attempts)
    SELECT $1, e.value, $3, {queued},
           COALESCE($4, (SELECT q.max_attempts FROM queue.queues q WHERE q.queue_name = $1), $5)
    FROM jsonb_array_elements($2) WITH ORDINALITY AS e(value, n)
    ORDER BY e.n
    RETURNING id",
);

const LARGEST_ELEMENT: &str = "
    SELECT e.n, octet_length(e.value::text)
    FROM jsonb_array_elements($1) WITH ORDINALITY AS e(value, n)
    WHERE octet_length(e.value::text) > $2
    ORDER BY e.n
    LIMIT 1";

/// Inserts one job and returns its id. With `dedupe_key`, an unfinished job with the same queue
/// and key is returned instead of a new one.
#[pg_extern(volatile, parallel_unsafe)]
fn enqueue(
    queue_name: Option<&str>,
    payload: Option<RawJsonb>,
    priority: default!(Option<&str>, "'normal'"),
    max_attempts: default!(Option<i32>, "NULL"),
    run_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    dedupe_key: default!(Option<&str>, "NULL"),
) -> i64 {
    let queue_name = validate::queue_name(queue_name);
    let payload = validate::payload(payload, "payload");
    let priority = validate::priority(priority);
    let max_attempts = validate::max_attempts(max_attempts);

    let args = [
        DatumWithOid::from(queue_name),
        DatumWithOid::from(payload),
        DatumWithOid::from(priority.as_str()),
        DatumWithOid::from(max_attempts),
        DatumWithOid::from(run_at),
        DatumWithOid::from(settings::default_max_attempts()),
    ];
    let types = [TEXT, JSONB, TEXT, INT4, TIMESTAMPTZ, INT4];

    let Some(key) = dedupe_key else {
        let id = Spi::connect_mut(|client| {
            with_plan(client, &INSERT_JOB, &types, |client, plan| {
                client
                    .update(plan, Some(1), &args)?
                    .first()
                    .get_one::<i64>()
            })
        });
        let id = required(id, "the new job's id").unwrap_or_else(|e| spi_failed("enqueue", e));
        wake_on_commit_queued(id);
        return id;
    };

    let mut args = Vec::from(args);
    args.push(DatumWithOid::from(key));
    let mut types = Vec::from(types);
    types.push(TEXT);
    // ON CONFLICT DO NOTHING waits for a concurrent insert of the same key to commit or roll
    // back. If the job it conflicted with finished just before our lookup, insert again.
    for _ in 0..10 {
        let inserted = Spi::connect_mut(|client| {
            with_plan(client, &INSERT_DEDUPED_JOB, &types, |client, plan| {
                first_value::<i64>(client.update(plan, Some(1), &args)?, 1)
            })
        });
        if let Some(id) = inserted.unwrap_or_else(|e| spi_failed("enqueue", e)) {
            wake_on_commit_queued(id);
            return id;
        }
        let existing = Spi::connect_mut(|client| {
            with_plan(client, &FIND_DEDUPED_JOB, &[TEXT, TEXT], |client, plan| {
                let args = [queue_name.into(), key.into()];
                first_value::<i64>(client.select(plan, Some(1), &args)?, 1)
            })
        });
        if let Some(id) =
            existing.unwrap_or_else(|e| spi_failed("looking up the deduplicated job", e))
        {
            return id;
        }
    }
    pgrx::error!(
        "queue_pg: could not enqueue with dedupe_key {key:?}: it kept changing concurrently"
    )
}

/// One job per element of the JSON array `payloads`, in one INSERT … SELECT; returns the ids in
/// the order of the array.
#[pg_extern(volatile, parallel_unsafe)]
fn enqueue_many(
    queue_name: Option<&str>,
    payloads: Option<RawJsonb>,
    priority: default!(Option<&str>, "'normal'"),
    max_attempts: default!(Option<i32>, "NULL"),
) -> SetOfIterator<'static, i64> {
    let queue_name = validate::queue_name(queue_name);
    let payloads = payloads.unwrap_or_else(|| super::errors::null_argument("payloads"));
    let kind = payloads.type_name();
    if kind != "array" {
        invalid_argument(format!(
            "queue_pg: payloads must be a JSON array, not {kind}"
        ));
    }
    let priority = validate::priority(priority);
    let max_attempts = validate::max_attempts(max_attempts);
    check_element_sizes(payloads);

    let args = [
        DatumWithOid::from(queue_name),
        DatumWithOid::from(payloads),
        DatumWithOid::from(priority.as_str()),
        DatumWithOid::from(max_attempts),
        DatumWithOid::from(settings::default_max_attempts()),
    ];
    let ids: Vec<i64> = Spi::connect_mut(|client| {
        with_plan(
            client,
            &INSERT_MANY,
            &[TEXT, JSONB, TEXT, INT4, INT4],
            |client, plan| {
                client
                    .update(plan, None, &args)
                    .map_err(|e| e.to_string())
                    .and_then(|rows| rows.map(|row| required(row.get::<i64>(1), "id")).collect())
            },
        )
    })
    .unwrap_or_else(|e| spi_failed("enqueue_many", e));
    if let Some(&first) = ids.iter().min() {
        wake_on_commit_queued(first);
    }
    SetOfIterator::new(ids)
}

/// Each element's JSON text must fit `queue.max_payload_bytes`. An element's text is part of the
/// array's text, so the per-element scan only runs when the whole array is over the limit.
fn check_element_sizes(payloads: RawJsonb) {
    let limit = settings::max_payload_bytes();
    if payloads.text_len() <= limit {
        return;
    }
    let too_large = Spi::connect(|client| {
        let table = client.select(
            LARGEST_ELEMENT,
            Some(1),
            &[payloads.into(), (limit as i64).into()],
        )?;
        if table.is_empty() {
            return Ok(None); // the array's text is over the limit, but no element's is
        }
        table.first().get_two::<i64, i32>().map(Some)
    });
    if let Some((Some(n), Some(len))) =
        too_large.unwrap_or_else(|e| spi_failed("measuring payloads", e))
    {
        validate::payload_too_large(&format!("payloads element {n}"), len as usize, limit)
    }
}
