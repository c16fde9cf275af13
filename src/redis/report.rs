//! A worker's report, as it arrives in `queue_pg:{<queue>}:reports` (docs/reference.md, "Worker
//! fast path"): `XADD … * id <id> attempt <n> op <op> [lease_ms <ms>] [result <json>]
//! [error <text>]`. Parsing is strict, so that nothing the applier hands to Postgres can make its
//! batch fail: a report that does not parse is a [`Reject`], never a guess.

use crate::lifecycle::report_rule::{Op, Reject};
use redis::Value;
use std::time::Duration;

/// A report that parsed.
#[derive(Debug, PartialEq)]
pub struct Report {
    pub id: i64,
    pub attempt: i32,
    pub op: Op,
    pub lease: Option<Duration>,
    /// JSON text (checked to be JSON Postgres accepts).
    pub result: Option<String>,
    pub error: Option<String>,
}

/// One entry read from a report stream.
#[derive(Debug)]
pub struct Entry {
    /// The stream entry id (`<ms>-<seq>`).
    pub entry_id: String,
    /// The report's job id, when the entry has a well-formed one (for logs).
    pub job_id: Option<i64>,
    pub report: Result<Report, Reject>,
}

/// The longest lease a report may ask for: a week.
const MAX_LEASE_MS: u64 = 7 * 24 * 3600 * 1000;

/// Parses the field-value pairs of one entry. `max_bytes` bounds the error and result texts
/// (`queue.max_payload_bytes`). Unknown fields are ignored (later releases may add some); of a
/// field given twice, the first counts.
pub fn parse(fields: &[(&[u8], &[u8])], max_bytes: usize) -> Result<Report, Reject> {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| *v)
    };
    let id = get("id").and_then(number).filter(|&id| id > 0);
    let attempt = get("attempt")
        .and_then(number)
        .and_then(|a| i32::try_from(a).ok())
        .filter(|&a| a > 0);
    let op = match get("op") {
        None => return Err(Reject::Malformed),
        Some(b"start") => Op::Start,
        Some(b"heartbeat") => Op::Heartbeat,
        Some(b"complete") => Op::Complete,
        Some(b"fail") => Op::Fail,
        Some(_) => return Err(Reject::UnknownOp),
    };
    let (Some(id), Some(attempt)) = (id, attempt) else {
        return Err(Reject::Malformed);
    };
    let lease = match get("lease_ms") {
        None => None,
        Some(v) => Some(
            number(v)
                .and_then(|ms| u64::try_from(ms).ok())
                .filter(|ms| (1..=MAX_LEASE_MS).contains(ms))
                .map(Duration::from_millis)
                .ok_or(Reject::Malformed)?,
        ),
    };
    let result = get("result").map(|v| json_text(v, max_bytes)).transpose()?;
    let error = get("error").map(|v| text(v, max_bytes)).transpose()?;
    Ok(Report {
        id,
        attempt,
        op,
        lease,
        result,
        error,
    })
}

/// A decimal integer: digits only (no sign, spaces or exponent).
fn number(v: &[u8]) -> Option<i64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Text Postgres can store: UTF-8 without NUL, at most `max_bytes`.
fn text(v: &[u8], max_bytes: usize) -> Result<String, Reject> {
    if v.len() > max_bytes {
        return Err(Reject::Oversized);
    }
    let s = std::str::from_utf8(v).map_err(|_| Reject::Malformed)?;
    if s.contains('\0') {
        return Err(Reject::Malformed);
    }
    Ok(s.to_owned())
}

/// JSON that `jsonb` accepts: valid JSON (serde's nesting limit, 128, is far below Postgres's),
/// without the `\u0000` escape, which `jsonb` refuses.
fn json_text(v: &[u8], max_bytes: usize) -> Result<String, Reject> {
    let s = text(v, max_bytes)?;
    serde_json::from_str::<serde::de::IgnoredAny>(&s).map_err(|_| Reject::Malformed)?;
    if has_nul_escape(&s) {
        return Err(Reject::Malformed);
    }
    Ok(s)
}

/// Whether a JSON text holds the escape `\u0000` (a backslash that is itself escaped does not
/// start one).
fn has_nul_escape(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b[i + 1..].starts_with(b"u0000") {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// The milliseconds part of a stream entry id: when Redis added it.
pub fn entry_ms(entry_id: &str) -> Option<u64> {
    entry_id.split('-').next()?.parse().ok()
}

/// Parses an XREAD reply: per stream (in the order of `streams`), its entries. A reply of
/// another shape is an error, never an empty read.
pub fn parse_xread(
    reply: Value,
    streams: &[String],
    max_bytes: usize,
) -> Result<Vec<Vec<Entry>>, String> {
    let mut out: Vec<Vec<Entry>> = streams.iter().map(|_| Vec::new()).collect();
    let per_stream = match reply {
        Value::Nil => return Ok(out),
        Value::Array(items) => items,
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        other => return Err(format!("XREAD answered {other:?}")),
    };
    for item in per_stream {
        let Value::Array(pair) = item else {
            return Err("XREAD answered a stream that is not a pair".into());
        };
        let [name, entries] = <[Value; 2]>::try_from(pair)
            .map_err(|_| "XREAD answered a stream that is not a pair".to_string())?;
        let name = bulk(&name).ok_or("XREAD answered a stream without a name")?;
        let slot = streams
            .iter()
            .position(|s| s.as_bytes() == name)
            .ok_or("XREAD answered a stream it was not asked for")?;
        let Value::Array(entries) = entries else {
            return Err("XREAD answered entries that are not a list".into());
        };
        for entry in entries {
            out[slot].push(parse_entry(entry, max_bytes)?);
        }
    }
    Ok(out)
}

fn parse_entry(entry: Value, max_bytes: usize) -> Result<Entry, String> {
    let Value::Array(parts) = entry else {
        return Err("a stream entry is not a list".into());
    };
    let [id, fields] = <[Value; 2]>::try_from(parts)
        .map_err(|_| "a stream entry is not an id and its fields".to_string())?;
    let entry_id = bulk(&id)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or("a stream entry id is not text")?
        .to_owned();
    let flat: Vec<&[u8]> = match &fields {
        Value::Array(values) => values
            .iter()
            .map(|v| bulk(v).ok_or("a stream field is not a string"))
            .collect::<Result<_, _>>()?,
        Value::Nil => Vec::new(),
        other => return Err(format!("stream entry fields: {other:?}")),
    };
    let pairs: Vec<(&[u8], &[u8])> = flat.chunks_exact(2).map(|c| (c[0], c[1])).collect();
    let job_id = pairs
        .iter()
        .find(|(k, _)| *k == b"id")
        .and_then(|(_, v)| number(v));
    Ok(Entry {
        entry_id,
        job_id,
        report: parse(&pairs, max_bytes),
    })
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(fields: &[(&str, &str)]) -> Result<Report, Reject> {
        let pairs: Vec<(&[u8], &[u8])> = fields
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect();
        parse(&pairs, 100)
    }

    #[test]
    fn a_complete_report_parses() {
        let r = report(&[
            ("id", "42"),
            ("attempt", "2"),
            ("op", "complete"),
            ("result", r#"{"ok":true}"#),
            ("x-future", "ignored"),
        ])
        .unwrap();
        assert_eq!((r.id, r.attempt, r.op), (42, 2, Op::Complete));
        assert_eq!(r.result.as_deref(), Some(r#"{"ok":true}"#));
        let r = report(&[
            ("id", "1"),
            ("attempt", "1"),
            ("op", "start"),
            ("lease_ms", "2000"),
        ]);
        assert_eq!(r.unwrap().lease, Some(Duration::from_secs(2)));
    }

    #[test]
    fn required_fields_and_numbers_are_strict() {
        let base = [("id", "42"), ("attempt", "1"), ("op", "fail")];
        assert!(report(&base).is_ok());
        for (i, reject) in [
            (0, Reject::Malformed),
            (1, Reject::Malformed),
            (2, Reject::Malformed),
        ] {
            let mut fields = base.to_vec();
            fields.remove(i);
            assert_eq!(report(&fields), Err(reject), "without {}", base[i].0);
        }
        for bad in ["", "x", "-1", "0", "1.0", " 1", "99999999999"] {
            let r = report(&[("id", "42"), ("attempt", bad), ("op", "fail")]);
            assert_eq!(r, Err(Reject::Malformed), "attempt {bad:?}");
        }
        assert_eq!(
            report(&[("id", "42"), ("attempt", "1"), ("op", "done")]),
            Err(Reject::UnknownOp)
        );
        let lease = |v| {
            report(&[
                ("id", "4"),
                ("attempt", "1"),
                ("op", "start"),
                ("lease_ms", v),
            ])
        };
        assert_eq!(lease("0"), Err(Reject::Malformed));
        assert_eq!(lease("1s"), Err(Reject::Malformed));
    }

    #[test]
    fn results_must_be_json_postgres_accepts_and_texts_must_fit() {
        fn with(k: &str, v: &str) -> Result<Report, Reject> {
            report(&[("id", "4"), ("attempt", "1"), ("op", "complete"), (k, v)])
        }
        assert_eq!(with("result", "{not json"), Err(Reject::Malformed));
        assert_eq!(with("result", r#"{"a":"\u0000"}"#), Err(Reject::Malformed));
        assert!(
            with("result", r#"{"a":"\\u0000"}"#).is_ok(),
            "an escaped backslash"
        );
        assert!(with("result", r#"{"a":"\u0001"}"#).is_ok());
        assert_eq!(with("error", &"x".repeat(101)), Err(Reject::Oversized));
        assert!(with("error", &"x".repeat(100)).is_ok());
        assert_eq!(with("error", "a\0b"), Err(Reject::Malformed));
    }

    #[test]
    fn xread_replies_parse_per_stream_and_odd_shapes_are_errors() {
        let s = |x: &str| Value::BulkString(x.as_bytes().to_vec());
        let entry = |id: &str, fields: &[&str]| {
            Value::Array(vec![
                s(id),
                Value::Array(fields.iter().map(|f| s(f)).collect()),
            ])
        };
        let streams = vec!["a".to_string(), "b".to_string()];
        let reply = Value::Array(vec![Value::Array(vec![
            s("b"),
            Value::Array(vec![
                entry("5-0", &["id", "7", "attempt", "1", "op", "complete"]),
                entry("5-1", &["id", "8", "op", "nope"]),
            ]),
        ])]);
        let got = parse_xread(reply, &streams, 100).unwrap();
        assert!(got[0].is_empty());
        assert_eq!(got[1].len(), 2);
        assert_eq!(got[1][0].entry_id, "5-0");
        assert!(got[1][0].report.is_ok());
        assert_eq!(got[1][1].job_id, Some(8));
        assert_eq!(got[1][1].report, Err(Reject::UnknownOp));
        assert_eq!(parse_xread(Value::Nil, &streams, 100).unwrap().len(), 2);
        assert!(parse_xread(Value::Int(3), &streams, 100).is_err());
        let unasked = Value::Array(vec![Value::Array(vec![s("c"), Value::Array(vec![])])]);
        assert!(parse_xread(unasked, &streams, 100).is_err());
        assert_eq!(entry_ms("1700000000123-4"), Some(1_700_000_000_123));
    }
}
