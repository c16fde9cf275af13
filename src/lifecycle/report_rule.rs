//! The rule for workers' reports (the fast path): which report may move a job from which state,
//! and why a report that does not fit is dropped. `transitions` runs what it accepts; the SQL
//! functions' own checks are the same states, written into their statements.

use super::backoff::Outcome;
use super::JobState;

/// A job locked for a transition, with what the rules need to know about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Locked {
    pub id: i64,
    pub queue: String,
    pub status: JobState,
    pub attempt_count: i32,
    pub max_attempts: i32,
    /// The queue's backoff settings (None: the `queue.backoff_*` settings).
    pub backoff_base_ms: Option<i64>,
    pub backoff_max_ms: Option<i64>,
}

/// What a worker reports about an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Start,
    Heartbeat,
    Complete,
    Fail,
}

/// What an accepted report does to its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// queued/migrated → running, with a lease.
    Start,
    /// running: the lease is extended.
    Extend,
    /// → completed (from running, or from queued/migrated: an implicit start).
    Complete,
    /// → retry_scheduled or failed by the backoff rule (from running, queued or migrated).
    Fail,
}

/// Why a report was dropped. The names are the labels of the rejection counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// A required field missing, or a field that does not parse.
    Malformed,
    UnknownOp,
    /// Error or result text over `queue.max_payload_bytes`.
    Oversized,
    UnknownJob,
    /// The job belongs to another queue than the stream.
    OtherQueue,
    /// Completed or dead.
    Finished,
    Cancelled,
    /// Not the job's current attempt (an old delivery's late report).
    StaleAttempt,
    /// The current attempt, but a state the op does not apply to (a second `start`, a job
    /// waiting for its `run_at`).
    WrongState,
}

impl Reject {
    pub const ALL: [Reject; 9] = [
        Reject::Malformed,
        Reject::UnknownOp,
        Reject::Oversized,
        Reject::UnknownJob,
        Reject::OtherQueue,
        Reject::Finished,
        Reject::Cancelled,
        Reject::StaleAttempt,
        Reject::WrongState,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::UnknownOp => "unknown_op",
            Reject::Oversized => "oversized",
            Reject::UnknownJob => "unknown_job",
            Reject::OtherQueue => "other_queue",
            Reject::Finished => "finished",
            Reject::Cancelled => "cancelled",
            Reject::StaleAttempt => "stale_attempt",
            Reject::WrongState => "wrong_state",
        }
    }
}

impl Locked {
    /// The attempt a delivery of the job now carries (the list entry's `attempt`).
    pub fn attempt(&self) -> i32 {
        self.attempt_count + 1
    }

    /// The rule for a report of `op` on attempt `attempt` from `queue`'s stream: what it does to
    /// the job, or why it is dropped. A job Postgres still shows `queued` was pushed and not yet
    /// marked, so it counts as `migrated`; `complete`, `fail` and `heartbeat` on a job nobody
    /// started are an implicit start.
    pub fn accepts(&self, queue: &str, op: Op, attempt: i32) -> Result<Step, Reject> {
        use JobState::*;
        if self.queue != queue {
            return Err(Reject::OtherQueue);
        }
        match self.status {
            Completed | Failed => return Err(Reject::Finished),
            Cancelled => return Err(Reject::Cancelled),
            _ => {}
        }
        if attempt != self.attempt() {
            return Err(Reject::StaleAttempt);
        }
        let waiting = matches!(self.status, Queued | Migrated);
        match (op, self.status) {
            (Op::Start, _) if waiting => Ok(Step::Start),
            (Op::Heartbeat, _) if waiting => Ok(Step::Start),
            (Op::Heartbeat, Running) => Ok(Step::Extend),
            (Op::Complete, _) if waiting || self.status == Running => Ok(Step::Complete),
            (Op::Fail, _) if waiting || self.status == Running => Ok(Step::Fail),
            _ => Err(Reject::WrongState),
        }
    }

    /// The job after `step` (a failure's `outcome` given), as later reports of the same batch
    /// are judged.
    pub fn after(&mut self, step: Step, outcome: Option<&Outcome>) {
        self.status = match (step, outcome) {
            (Step::Start | Step::Extend, _) => JobState::Running,
            (Step::Complete, _) => JobState::Completed,
            (Step::Fail, Some(Outcome::Retry { attempts, .. })) => {
                self.attempt_count = *attempts;
                JobState::RetryScheduled
            }
            (Step::Fail, Some(Outcome::Dead { attempts })) => {
                self.attempt_count = *attempts;
                JobState::Failed
            }
            (Step::Fail, None) => JobState::Failed,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: JobState, attempt_count: i32) -> Locked {
        Locked {
            id: 7,
            queue: "mail".into(),
            status,
            attempt_count,
            max_attempts: 5,
            backoff_base_ms: None,
            backoff_max_ms: None,
        }
    }

    #[test]
    fn waiting_jobs_take_every_op_as_a_start() {
        for status in [JobState::Queued, JobState::Migrated] {
            let j = job(status, 2);
            assert_eq!(j.accepts("mail", Op::Start, 3), Ok(Step::Start));
            assert_eq!(j.accepts("mail", Op::Heartbeat, 3), Ok(Step::Start));
            assert_eq!(j.accepts("mail", Op::Complete, 3), Ok(Step::Complete));
            assert_eq!(j.accepts("mail", Op::Fail, 3), Ok(Step::Fail));
        }
    }

    #[test]
    fn running_jobs_take_heartbeats_and_ends_but_not_a_second_start() {
        let j = job(JobState::Running, 0);
        assert_eq!(j.accepts("mail", Op::Heartbeat, 1), Ok(Step::Extend));
        assert_eq!(j.accepts("mail", Op::Complete, 1), Ok(Step::Complete));
        assert_eq!(j.accepts("mail", Op::Fail, 1), Ok(Step::Fail));
        assert_eq!(j.accepts("mail", Op::Start, 1), Err(Reject::WrongState));
    }

    #[test]
    fn rejections_name_their_reason() {
        let j = job(JobState::Running, 1);
        assert_eq!(j.accepts("other", Op::Complete, 2), Err(Reject::OtherQueue));
        assert_eq!(
            j.accepts("mail", Op::Complete, 1),
            Err(Reject::StaleAttempt)
        );
        assert_eq!(
            j.accepts("mail", Op::Complete, 3),
            Err(Reject::StaleAttempt)
        );
        for status in [JobState::Completed, JobState::Failed] {
            assert_eq!(
                job(status, 1).accepts("mail", Op::Fail, 2),
                Err(Reject::Finished)
            );
        }
        let cancelled = job(JobState::Cancelled, 1);
        assert_eq!(
            cancelled.accepts("mail", Op::Complete, 2),
            Err(Reject::Cancelled)
        );
        for status in JobState::WAITING {
            assert_eq!(
                job(status, 1).accepts("mail", Op::Complete, 2),
                Err(Reject::WrongState)
            );
        }
    }

    #[test]
    fn a_batch_judges_later_reports_against_the_state_earlier_ones_left() {
        let mut j = job(JobState::Migrated, 0);
        j.after(Step::Start, None);
        assert_eq!(j.accepts("mail", Op::Complete, 1), Ok(Step::Complete));
        j.after(Step::Complete, None);
        assert_eq!(j.accepts("mail", Op::Complete, 1), Err(Reject::Finished));

        let mut j = job(JobState::Running, 0);
        let retry = Outcome::Retry {
            attempts: 1,
            delay_ms: 2000,
        };
        j.after(Step::Fail, Some(&retry));
        assert_eq!(
            j.accepts("mail", Op::Heartbeat, 1),
            Err(Reject::StaleAttempt)
        );
        assert_eq!(j.accepts("mail", Op::Complete, 2), Err(Reject::WrongState));
    }
}
