//! Everything that talks to Redis: connections with timeouts, key names, and the time format of
//! the values queue_pg writes there.

pub mod conn;
pub mod keys;

pub use conn::{connect, redact, without_signals};
pub use keys::Keys;

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
