//! Everything that talks to Redis: connections with timeouts, key names, the wire format of what
//! queue_pg writes there (`wire`), and its time format.

pub mod client;
pub mod conn;
pub mod keys;
pub mod report;
pub mod slots;
pub mod target;
pub mod tls;
pub mod upkeep;
pub mod wire;

pub use client::{Client, Group, Replies};
pub use conn::Conn;
pub use keys::Keys;
pub use target::Target;

use std::time::Instant;

/// Connections for one SQL call: the call's deadline is `queue.redis_timeout` from now, and a
/// cancelled query or a terminated backend stops the wait (its next CHECK_FOR_INTERRUPTS acts).
pub fn connect_for_call(target: &Target) -> Result<Client, String> {
    let deadline = Instant::now() + crate::settings::redis_timeout();
    Client::open(target, deadline, backend_interrupted, None)
}

fn backend_interrupted() -> bool {
    use pgrx::pg_sys;
    unsafe {
        std::ptr::read_volatile(&raw const pg_sys::QueryCancelPending) != 0
            || std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) != 0
    }
}

/// A numeric field of an INFO reply (`name:value` lines).
pub fn info_field(info: &str, name: &str) -> Option<i64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// `2026-11-30T12:00:00.000Z`: the UTC timestamp format of every time queue_pg writes to Redis.
pub fn iso_utc(t: std::time::SystemTime) -> String {
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    iso_utc_from_unix_ms(ms)
}

/// The same format for a Postgres timestamptz (microseconds since 2000-01-01 UTC).
pub fn iso_utc_from_pg(pg_micros: i64) -> String {
    const PG_EPOCH_UNIX_MS: i64 = 946_684_800_000;
    iso_utc_from_unix_ms(pg_micros.div_euclid(1000) + PG_EPOCH_UNIX_MS)
}

fn iso_utc_from_unix_ms(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Priority;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn unix_times_format_as_utc_with_milliseconds() {
        assert_eq!(iso_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_764_504_000_123);
        assert_eq!(iso_utc(t), "2025-11-30T12:00:00.123Z");
        // A leap day, and the last millisecond of a year.
        assert_eq!(
            iso_utc(UNIX_EPOCH + Duration::from_millis(951_782_400_000)),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            iso_utc(UNIX_EPOCH + Duration::from_millis(1_798_761_599_999)),
            "2026-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn postgres_times_count_from_2000() {
        assert_eq!(iso_utc_from_pg(0), "2000-01-01T00:00:00.000Z");
        assert_eq!(iso_utc_from_pg(-1), "1999-12-31T23:59:59.999Z");
        assert_eq!(iso_utc_from_pg(1_500), "2000-01-01T00:00:00.001Z");
    }

    #[test]
    fn keys_follow_the_documented_layout() {
        let k = Keys::new("queue_pg");
        assert_eq!(k.list("emails", Priority::High), "queue_pg:{emails}:high");
        assert_eq!(k.job(42), "queue_pg:job:42");
        assert_eq!(k.dead_letter_list(), "queue_pg:deadletter:queue");
        assert_eq!(k.dead_letter_marker(42), "queue_pg:deadletter:42");
    }

    #[test]
    fn info_fields_are_read_by_exact_name() {
        let info = "# Memory\r\nused_memory:1024\r\nused_memory_human:1.00K\r\nmaxmemory:0\r\n";
        assert_eq!(info_field(info, "used_memory"), Some(1024));
        assert_eq!(info_field(info, "maxmemory"), Some(0));
        assert_eq!(info_field(info, "used_memory_peak"), None);
    }
}
