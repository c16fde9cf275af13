//! ERRORs with a fitting SQLSTATE. Each raise aborts the statement, so nothing it began is kept.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raises an ERROR with `code` and `message`; never returns.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>) -> ! {
    ErrorReport::new(code, message.into(), "queue_pg").report(PgLogLevel::ERROR);
    unreachable!("ERROR returned")
}

/// 22004: a required argument was SQL NULL.
pub fn null_argument(name: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        format!("queue_pg: {name} must not be NULL"),
    )
}

/// 22023: an argument's value is not allowed.
pub fn invalid_argument(message: impl Into<String>) -> ! {
    raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message)
}

/// P0002: no job has this id.
pub fn unknown_job(id: i64) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
        format!("queue_pg: job {id} does not exist"),
    )
}

/// XX000: a statement of queue_pg's own failed (its message says which and why). Never read as
/// "no row" or "not found".
pub fn spi_failed(what: &str, e: impl std::fmt::Display) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("queue_pg: {what} failed: {e}"),
    )
}

/// 55000: the call does not fit the job's state.
pub fn wrong_state(message: impl Into<String>) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        message,
    )
}
