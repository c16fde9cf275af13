//! The one place where Redis key names are built. Workers depend on these names (docs/reference.md,
//! "Redis layout"); the `{queue}` hash tag keeps one queue's keys in one Redis Cluster slot.

use crate::lifecycle::Priority;

pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Keys {
            prefix: prefix.into(),
        }
    }

    /// `queue_pg:{emails}:high`: the list workers BRPOP from.
    pub fn list(&self, queue: &str, priority: Priority) -> String {
        format!("{}:{{{}}}:{}", self.prefix, queue, priority)
    }

    /// `queue_pg:{emails}:reports`: the stream workers report to (start, heartbeat, complete,
    /// fail); the report applier moves what they say into Postgres.
    pub fn reports(&self, queue: &str) -> String {
        format!("{}:{{{}}}:reports", self.prefix, queue)
    }

    /// `queue_pg:{emails}:epoch`: in a Redis Cluster, set by the bridge in the queue's slot; if it
    /// disappears, the master serving the queue lost its data.
    pub fn queue_epoch(&self, queue: &str) -> String {
        format!("{}:{{{}}}:epoch", self.prefix, queue)
    }

    /// `queue_pg:job:42`: the job's status hash.
    pub fn job(&self, id: i64) -> String {
        format!("{}{}", self.job_prefix(), id)
    }

    /// `queue_pg:job:`: what every job hash's key starts with (followed by the job id).
    pub fn job_prefix(&self) -> String {
        format!("{}:job:", self.prefix)
    }

    /// `queue_pg:deadletter:queue`: one JSON entry per dead job.
    pub fn dead_letter_list(&self) -> String {
        format!("{}:deadletter:queue", self.prefix)
    }

    /// `queue_pg:deadletter:42`: `moved`, with the dead-letter TTL.
    pub fn dead_letter_marker(&self, id: i64) -> String {
        format!("{}:deadletter:{}", self.prefix, id)
    }

    /// `queue_pg:bridge:epoch`: set by the bridge; if it disappears, Redis lost its data.
    pub fn epoch(&self) -> String {
        format!("{}:bridge:epoch", self.prefix)
    }
}
