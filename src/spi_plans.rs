//! Prepared SPI plans, kept for the life of the backend so that hot statements (enqueue, the
//! bridge's dispatch queries) are parsed and planned once, not on every call.

use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use std::cell::RefCell;
use std::collections::HashMap;

/// Argument types for [`with_plan`].
pub mod types {
    use pgrx::pg_sys::{BuiltinOid, PgOid};
    pub const TEXT: PgOid = PgOid::BuiltIn(BuiltinOid::TEXTOID);
    pub const TEXT_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::TEXTARRAYOID);
    pub const JSONB: PgOid = PgOid::BuiltIn(BuiltinOid::JSONBOID);
    pub const INT4: PgOid = PgOid::BuiltIn(BuiltinOid::INT4OID);
    pub const INT4_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::INT4ARRAYOID);
    pub const BOOL: PgOid = PgOid::BuiltIn(BuiltinOid::BOOLOID);
    pub const INT8: PgOid = PgOid::BuiltIn(BuiltinOid::INT8OID);
    pub const INT8_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::INT8ARRAYOID);
    pub const TIMESTAMPTZ: PgOid = PgOid::BuiltIn(BuiltinOid::TIMESTAMPTZOID);
    pub const INTERVAL: PgOid = PgOid::BuiltIn(BuiltinOid::INTERVALOID);
    pub const INTERVAL_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::INTERVALARRAYOID);
}

thread_local! {
    // Keyed by where the statement text lives (each is a `const`): no hashing of long strings.
    static PLANS: RefCell<HashMap<(usize, usize), Kept>> = RefCell::new(HashMap::new());
}

/// A prepared statement, and whether it writes.
struct Kept {
    plan: OwnedPreparedStatement,
    writes: bool,
}

/// Whether a statement of queue_pg's writes (or locks rows, or draws from a sequence): its SQL
/// is written in capitals.
fn writes(sql: &str) -> bool {
    ["INSERT", "UPDATE", "DELETE", "nextval("]
        .iter()
        .any(|verb| sql.contains(verb))
}

/// Runs `f` with the kept plan of `sql`, preparing it on first use in this backend.
/// Plans are prepared as read-write; Postgres re-plans them itself when the schema changes.
/// Before the backend's first plan, the extension's SQL objects must be at the library's version
/// (an ERROR that says so, not a statement failing on another release's schema).
pub fn with_plan<'conn, R>(
    client: &mut SpiClient<'conn>,
    sql: &'static str,
    arg_types: &[PgOid],
    f: impl FnOnce(&mut SpiClient<'conn>, &OwnedPreparedStatement) -> R,
) -> R {
    run_kept(client, sql, arg_types, true, f)
}

/// [`with_plan`] without the version check: for the check itself.
pub(crate) fn with_plan_unchecked<'conn, R>(
    client: &mut SpiClient<'conn>,
    sql: &'static str,
    arg_types: &[PgOid],
    f: impl FnOnce(&mut SpiClient<'conn>, &OwnedPreparedStatement) -> R,
) -> R {
    run_kept(client, sql, arg_types, false, f)
}

fn run_kept<'conn, R>(
    client: &mut SpiClient<'conn>,
    sql: &'static str,
    arg_types: &[PgOid],
    check_version: bool,
    f: impl FnOnce(&mut SpiClient<'conn>, &OwnedPreparedStatement) -> R,
) -> R {
    let key = (sql.as_ptr() as usize, sql.len());
    let kept = PLANS.with(|plans| plans.borrow_mut().remove(&key));
    let kept = match kept {
        Some(kept) => kept,
        None => {
            if check_version {
                crate::extension::check_once(client);
            }
            let plan = client
                .prepare_mut(sql, arg_types)
                .unwrap_or_else(|e| pgrx::error!("queue_pg: preparing a statement failed: {e}"))
                .keep();
            Kept {
                plan,
                writes: writes(sql),
            }
        }
    };
    if kept.writes {
        refuse_writes_on_standby();
    }
    // Taken out while in use, so a nested call cannot alias it; put back afterwards.
    let result = f(client, &kept.plan);
    PLANS.with(|plans| plans.borrow_mut().insert(key, kept));
    result
}

/// On a standby a write would fail deep inside (pgrx asks for a transaction id, which a server
/// in recovery cannot give): this fails first, with the SQLSTATE of a write on a standby (25006).
pub fn refuse_writes_on_standby() {
    if unsafe { pg_sys::RecoveryInProgress() } {
        crate::api::errors::raise(
            pgrx::PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "queue_pg: cannot change jobs on a standby (the server is in recovery); call this on the primary",
        );
    }
}

/// `client.update(sql, …)` through the kept plan of `sql`.
pub fn update<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &'static str,
    arg_types: &[PgOid],
    limit: Option<i64>,
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'conn>> {
    with_plan(client, sql, arg_types, |client, plan| {
        client.update(plan, limit, args)
    })
}

/// Column `column` (1-based) of the first row: None when there is no row or the value is NULL.
/// (pgrx reports reading an empty result as an error; here no row is a value, a failure is not.)
pub fn first_value<T: FromDatum + IntoDatum>(
    table: SpiTupleTable<'_>,
    column: usize,
) -> SpiResult<Option<T>> {
    if table.is_empty() {
        Ok(None)
    } else {
        table.first().get(column)
    }
}

/// A column value that must be there: NULL or a decoding failure is an `Err` naming the column,
/// never a default that would pass for data.
pub fn required<T>(value: SpiResult<Option<T>>, column: &str) -> Result<T, String> {
    match value {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(format!("{column} is NULL")),
        Err(e) => Err(format!("reading {column}: {e}")),
    }
}

/// A column value that may be NULL; a decoding failure is an `Err` naming the column.
pub fn optional<T>(value: SpiResult<Option<T>>, column: &str) -> Result<Option<T>, String> {
    value.map_err(|e| format!("reading {column}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::writes;

    #[test]
    fn statements_that_write_or_lock_rows_are_told_by_their_capitals() {
        assert!(writes("INSERT INTO queue.jobs (payload) VALUES ($1)"));
        assert!(writes(
            "WITH x AS (UPDATE queue.jobs SET status = 'queued') SELECT 1"
        ));
        assert!(writes("SELECT id FROM queue.jobs FOR UPDATE SKIP LOCKED"));
        assert!(writes("DELETE FROM queue.redis_outbox WHERE id = ANY($1)"));
        assert!(!writes(
            "SELECT updated_at, deleted FROM queue.jobs WHERE status = 'queued'"
        ));
    }
}
