//! The bad-input rules (docs/reference.md, "Bad input and errors"), checked before anything is
//! written.

use super::errors::{invalid_argument, null_argument, raise};
use super::raw_jsonb::RawJsonb;
use crate::lifecycle::Priority;
use crate::settings;
use pgrx::PgSqlErrorCode;

/// `^[A-Za-z0-9_.-]{1,64}$`
pub fn queue_name(name: Option<&str>) -> &str {
    let name = name.unwrap_or_else(|| null_argument("queue_name"));
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        invalid_argument(format!(
            "queue_pg: invalid queue name \"{}\": use 1 to 64 characters from A-Z a-z 0-9 _ . -",
            name.escape_default()
        ));
    }
    name
}

/// Only the lowercase names of [`Priority`].
pub fn priority(priority: Option<&str>) -> Priority {
    let p = priority.unwrap_or_else(|| null_argument("priority"));
    Priority::parse(p).unwrap_or_else(|_| {
        let names: Vec<String> = Priority::ALL.iter().map(|p| format!("'{p}'")).collect();
        invalid_argument(format!(
            "queue_pg: invalid priority \"{}\": use {} or {}",
            p.escape_default(),
            names[..names.len() - 1].join(", "),
            names[names.len() - 1]
        ))
    })
}

/// NULL means "the queue's default"; otherwise 1..1000.
pub fn max_attempts(max_attempts: Option<i32>) -> Option<i32> {
    if let Some(n) = max_attempts {
        if !(1..=1000).contains(&n) {
            invalid_argument(format!(
                "queue_pg: max_attempts must be between 1 and 1000, not {n}"
            ));
        }
    }
    max_attempts
}

/// A SQL NULL payload is an error (a JSON `null` is a valid payload); so is one whose JSON text
/// is longer than `queue.max_payload_bytes`.
pub fn payload(payload: Option<RawJsonb>, what: &str) -> RawJsonb {
    let payload = payload.unwrap_or_else(|| null_argument(what));
    let limit = settings::max_payload_bytes();
    let len = payload.text_len();
    if len > limit {
        payload_too_large(what, len, limit);
    }
    payload
}

pub fn payload_too_large(what: &str, len: usize, limit: usize) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        format!(
            "queue_pg: {what} is {len} bytes of JSON, more than queue.max_payload_bytes ({limit})"
        ),
    )
}
