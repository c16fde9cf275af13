//! `queue.optimize_memory()`: gives finished jobs' Redis hashes their TTL and trims the
//! dead-letter list under memory pressure, in one call (`redis::upkeep`). The bridge does the
//! same work by itself every `queue.memory_check_interval`, a slice at a time.

use crate::api::errors::raise;
use crate::lifecycle::unfinished_among;
use crate::redis::upkeep::{memory, trim_dead_letters, Sweep};
use crate::redis::{connect_for_call, Client, Keys, Target};
use crate::settings;
use pgrx::datum::JsonB;
use pgrx::prelude::*;
use serde_json::json;

fn redis_failed(code: PgSqlErrorCode, error: &str, target: &Target) -> ! {
    raise(
        code,
        format!(
            "queue_pg: Redis failed during optimize_memory: {}",
            target.scrub(error)
        ),
    )
}

/// One Redis step of `optimize_memory`; an ERROR if it fails. Every step shares the call's one
/// deadline (`queue.redis_timeout` from the start of the call).
fn call<R>(
    con: &mut Client,
    target: &Target,
    f: impl FnOnce(&mut Client) -> Result<R, String>,
) -> R {
    f(con).unwrap_or_else(|e| {
        check_for_interrupts!(); // a cancelled query says so, not "Redis failed"
        redis_failed(PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE, &e, target)
    })
}

/// Gives finished jobs' Redis hashes their TTL, trims the dead-letter list under memory
/// pressure, and reports what it did. All its Redis calls together wait at most
/// `queue.redis_timeout`: on a keyspace too large for that, raise the setting for the call
/// (`SET queue.redis_timeout`) or leave the work to the bridge, which does it in slices.
#[pg_extern(volatile)]
fn optimize_memory() -> JsonB {
    // A standby's view lags the primary's: a job it sees finished may be live again there.
    crate::spi_plans::refuse_writes_on_standby();
    // The job hashes in Redis belong to the jobs of the bridge's database: judged from any other
    // database, every one of them would look like a pruned job's.
    let here = Spi::get_one::<String>("SELECT current_database()::text")
        .ok()
        .flatten()
        .unwrap_or_else(|| error!("queue_pg: could not read the current database's name"));
    if here != settings::database() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "queue_pg: optimize_memory() must run in database \"{}\" (queue.database), not in \"{here}\"",
                settings::database()
            ),
        );
    }
    let target = Target::from_settings();
    let keys = Keys::new(settings::redis_prefix());
    let mut con = connect_for_call(&target).unwrap_or_else(|e| {
        redis_failed(
            PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            &e,
            &target,
        )
    });
    let (memory_before, maxmemory) = call(&mut con, &target, memory);
    let mut sweep = Sweep::new(&keys);
    while !sweep.done() {
        check_for_interrupts!();
        let ids = call(&mut con, &target, |con| sweep.scan(con));
        if ids.is_empty() {
            continue;
        }
        let live = Spi::connect_mut(|client| unfinished_among(client, &ids));
        call(&mut con, &target, |con| {
            sweep.expire(con, &keys, &ids, &live)
        });
    }
    sweep.report.trimmed = call(&mut con, &target, |con| trim_dead_letters(con, &keys));
    let (memory_after, _) = call(&mut con, &target, memory);
    let r = &sweep.report;
    JsonB(json!({
        "scanned": r.scanned,
        "expired": r.expired,
        "kept": r.kept,
        "trimmed": r.trimmed,
        "memory_before": memory_before,
        "memory_after": memory_after,
        "maxmemory": maxmemory,
    }))
}
