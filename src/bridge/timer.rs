//! The one kind of timer the bridge's duties use: "every `period`", due at once when it has
//! never run.

use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Every {
    last: Option<Instant>,
}

impl Every {
    /// A timer whose first run is one period from now.
    pub fn starting_now() -> Every {
        Every {
            last: Some(Instant::now()),
        }
    }

    /// When it is next due (now or in the past when due).
    pub fn next(&self, period: Duration) -> Instant {
        match self.last {
            Some(at) => at + period,
            None => Instant::now(),
        }
    }

    pub fn due(&self, period: Duration, now: Instant) -> bool {
        self.last.is_none_or(|at| at + period <= now)
    }

    /// Marks a run at `now`.
    pub fn ran(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_at_once_then_every_period() {
        let p = Duration::from_secs(10);
        let mut t = Every::default();
        let now = Instant::now();
        assert!(t.due(p, now));
        t.ran(now);
        assert!(!t.due(p, now + Duration::from_secs(9)));
        assert!(t.due(p, now + p));
        assert_eq!(t.next(p), now + p);
        assert!(!Every::starting_now().due(p, Instant::now()));
    }
}
