//! A fault that repeats is logged once per episode, not once per occurrence: the first occurrence
//! at its level, the rest counted, and the end of the episode (none for [`QUIET`]) once, with
//! what it came to. Under a Redis that keeps evicting keys the bridge would otherwise log the
//! same line several times a second.

use std::time::{Duration, Instant};

/// How long without an occurrence ends an episode.
pub const QUIET: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Episode {
    open: Option<Totals>,
}

/// What an episode came to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Totals {
    pub since: Instant,
    pub last: Instant,
    pub occurrences: u64,
    pub jobs: u64,
}

impl Episode {
    /// An occurrence involving `jobs` jobs at `now`: true if it starts an episode (log it).
    pub fn occurred(&mut self, now: Instant, jobs: u64) -> bool {
        match &mut self.open {
            Some(t) => {
                t.last = now;
                t.occurrences += 1;
                t.jobs += jobs;
                false
            }
            None => {
                self.open = Some(Totals {
                    since: now,
                    last: now,
                    occurrences: 1,
                    jobs,
                });
                true
            }
        }
    }

    /// The totals of an episode that has been quiet for [`QUIET`], once; it is then over.
    pub fn end_if_quiet(&mut self, now: Instant) -> Option<Totals> {
        let quiet = self
            .open
            .is_some_and(|t| now.duration_since(t.last) >= QUIET);
        quiet.then(|| self.open.take()).flatten()
    }
}

impl Totals {
    /// How the end of an episode reads in the log, after `what` (e.g. "Redis data loss").
    pub fn summary(&self, what: &str) -> String {
        format!(
            "{what} episode over: {} occurrences in {} s, {} jobs dispatched again",
            self.occurrences,
            self.last.duration_since(self.since).as_secs(),
            self.jobs
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_start_per_episode_and_one_end_after_a_quiet_period() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut e = Episode::default();
        assert!(e.occurred(t0, 10));
        assert!(!e.occurred(t0 + s, 5));
        assert!(!e.occurred(t0 + 2 * s, 1));
        assert_eq!(
            e.end_if_quiet(t0 + 2 * s + QUIET - s),
            None,
            "not quiet yet"
        );
        let totals = e.end_if_quiet(t0 + 2 * s + QUIET).expect("quiet");
        assert_eq!((totals.occurrences, totals.jobs), (3, 16));
        assert_eq!(
            totals.summary("Redis data loss"),
            "Redis data loss episode over: 3 occurrences in 2 s, 16 jobs dispatched again"
        );
        assert_eq!(e.end_if_quiet(t0 + 10 * QUIET), None, "ended once");
        assert!(e.occurred(t0 + 10 * QUIET, 1), "a new episode");
    }
}
