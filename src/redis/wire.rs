//! What queue_pg writes into Redis, as types: the list entry workers pop, the dead-letter entry,
//! and the fields of a job's hash. Workers in any language read these (docs/reference.md, "Redis
//! layout"), so their shape changes only with a release note. The payload is carried as raw JSON
//! text, exactly as Postgres printed it: never parsed into a tree, never re-encoded.

use crate::lifecycle::{JobState, Priority};
use redis::{RedisWrite, ToRedisArgs};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// A message in `queue_pg:{<queue>}:<priority>`: one delivery of a job, for attempt `attempt`.
#[derive(Serialize, Deserialize, Debug)]
pub struct ListEntry<'a> {
    pub id: i64,
    #[serde(borrow)]
    pub queue: Cow<'a, str>,
    pub priority: Priority,
    #[serde(borrow)]
    pub payload: &'a RawValue,
    pub attempt: i32,
    pub max_attempts: i32,
    #[serde(borrow)]
    pub enqueued_at: Cow<'a, str>,
}

/// An entry of `queue_pg:deadletter:queue`. It starts with `{"id":<id>,` ([`dead_letter_prefix`]),
/// which is how a replay finds it again.
#[derive(Serialize, Deserialize, Debug)]
pub struct DeadLetterEntry<'a> {
    pub id: i64,
    #[serde(borrow)]
    pub queue_name: Cow<'a, str>,
    #[serde(borrow)]
    pub payload: &'a RawValue,
    /// The last attempt's error ("" if none was given).
    #[serde(borrow)]
    pub error: Cow<'a, str>,
    #[serde(borrow)]
    pub failed_at: Cow<'a, str>,
    pub attempt_count: i32,
    pub original_priority: Priority,
}

/// How every dead-letter entry of job `id` begins.
pub fn dead_letter_prefix(id: i64) -> String {
    format!(r#"{{"id":{id},"#)
}

/// The fields queue_pg sets in `queue_pg:job:<id>` (HSET: fields not set here keep their value).
#[derive(Debug, PartialEq)]
pub struct JobHash<'a> {
    pub status: JobState,
    pub queue: &'a str,
    pub attempt_count: i32,
    pub updated_at: &'a str,
    /// When the bridge pushed the job (set by dispatch only).
    pub queued_at: Option<&'a str>,
    pub error: Option<&'a str>,
    /// While `retry_scheduled`: the backoff in milliseconds.
    pub retry_delay_ms: Option<i64>,
    pub failed_at: Option<&'a str>,
}

/// The field-value pairs of HSET, in a fixed order, written straight into the command: the bridge
/// writes one hash per job it pushes, so no field is copied into a string of its own first.
impl ToRedisArgs for JobHash<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        out.write_arg(b"status");
        out.write_arg(self.status.as_str().as_bytes());
        out.write_arg(b"queue");
        out.write_arg(self.queue.as_bytes());
        out.write_arg(b"attempt_count");
        self.attempt_count.write_redis_args(out);
        if let Some(at) = self.queued_at {
            out.write_arg(b"queued_at");
            out.write_arg(at.as_bytes());
        }
        out.write_arg(b"updated_at");
        out.write_arg(self.updated_at.as_bytes());
        if let Some(error) = self.error {
            out.write_arg(b"error");
            out.write_arg(error.as_bytes());
        }
        if let Some(delay) = self.retry_delay_ms {
            out.write_arg(b"retry_delay");
            delay.write_redis_args(out);
        }
        if let Some(at) = self.failed_at {
            out.write_arg(b"failed_at");
            out.write_arg(at.as_bytes());
        }
    }
}

impl JobHash<'_> {
    /// A finished job's hash expires after `queue.job_hash_ttl`; an unfinished one's never does.
    pub fn expires(&self) -> bool {
        self.status.is_finished()
    }
}

/// Serializes a wire value; these types always serialize.
pub fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("wire types always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn the_list_entry_is_byte_for_byte_the_documented_json() {
        // Postgres prints jsonb with a space after ':' and ','; the entry carries it unchanged.
        let payload = raw(r#"{"to": "a@b.c", "n": [1, 2]}"#);
        let entry = ListEntry {
            id: 42,
            queue: "emails".into(),
            priority: Priority::Normal,
            payload: &payload,
            attempt: 1,
            max_attempts: 5,
            enqueued_at: "2026-11-30T12:00:00.000Z".into(),
        };
        let text = to_json(&entry);
        assert_eq!(
            text,
            r#"{"id":42,"queue":"emails","priority":"normal","payload":{"to": "a@b.c", "n": [1, 2]},"attempt":1,"max_attempts":5,"enqueued_at":"2026-11-30T12:00:00.000Z"}"#
        );
        let back: ListEntry = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (
                back.id,
                back.queue.as_ref(),
                back.priority,
                back.payload.get()
            ),
            (42, "emails", Priority::Normal, payload.get())
        );
        assert_eq!((back.attempt, back.max_attempts), (1, 5));
        assert_eq!(back.enqueued_at, "2026-11-30T12:00:00.000Z");
    }

    #[test]
    fn escaped_strings_round_trip() {
        let payload = raw("null");
        let entry = ListEntry {
            id: 7,
            queue: "a\"b\\c".into(),
            priority: Priority::High,
            payload: &payload,
            attempt: 3,
            max_attempts: 3,
            enqueued_at: "x".into(),
        };
        let text = to_json(&entry);
        let back: ListEntry = serde_json::from_str(&text).unwrap();
        assert_eq!(back.queue, "a\"b\\c");
        assert_eq!(back.payload.get(), "null");
        assert_eq!(back.priority, Priority::High);
    }

    #[test]
    fn the_dead_letter_entry_round_trips_and_starts_with_its_prefix() {
        let payload = raw(r#"{"k": 1}"#);
        let entry = DeadLetterEntry {
            id: 9,
            queue_name: "q".into(),
            payload: &payload,
            error: "boom \"quoted\"".into(),
            failed_at: "2026-11-30T12:00:00.000Z".into(),
            attempt_count: 5,
            original_priority: Priority::Low,
        };
        let text = to_json(&entry);
        assert_eq!(
            text,
            r#"{"id":9,"queue_name":"q","payload":{"k": 1},"error":"boom \"quoted\"","failed_at":"2026-11-30T12:00:00.000Z","attempt_count":5,"original_priority":"low"}"#
        );
        assert!(text.starts_with(&dead_letter_prefix(9)));
        assert!(
            !text.starts_with(&dead_letter_prefix(90))
                && !dead_letter_prefix(9).starts_with(&dead_letter_prefix(90))
        );
        let back: DeadLetterEntry = serde_json::from_str(&text).unwrap();
        assert_eq!(back.error, "boom \"quoted\"");
        assert_eq!(back.original_priority, Priority::Low);
        assert_eq!(back.payload.get(), r#"{"k": 1}"#);
    }

    #[test]
    fn job_hash_fields_parse_back() {
        let hash = JobHash {
            status: JobState::RetryScheduled,
            queue: "q",
            attempt_count: 2,
            updated_at: "t1",
            queued_at: None,
            error: Some("boom"),
            retry_delay_ms: Some(4000),
            failed_at: None,
        };
        let args: Vec<String> = hash
            .to_redis_args()
            .into_iter()
            .map(|a| String::from_utf8(a).unwrap())
            .collect();
        let fields: HashMap<_, _> = args
            .chunks(2)
            .map(|f| (f[0].clone(), f[1].clone()))
            .collect();
        assert_eq!(
            args.len(),
            2 * fields.len(),
            "field-value pairs, each field once"
        );
        let back = JobHash {
            status: JobState::parse(&fields["status"]).unwrap(),
            queue: &fields["queue"],
            attempt_count: fields["attempt_count"].parse().unwrap(),
            updated_at: &fields["updated_at"],
            queued_at: fields.get("queued_at").map(String::as_str),
            error: fields.get("error").map(String::as_str),
            retry_delay_ms: fields.get("retry_delay").map(|d| d.parse().unwrap()),
            failed_at: fields.get("failed_at").map(String::as_str),
        };
        assert_eq!(back, hash);
        assert!(!hash.expires());
        assert!(JobHash {
            status: JobState::Cancelled,
            ..hash
        }
        .expires());
    }
}
