//! The backoff rule (docs/reference.md, "Backoff rule") as a pure function: how long a failed
//! attempt waits, or whether the job is dead. `failure` applies it for `queue.fail` and for
//! expired leases.

/// What a failed attempt leads to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    /// Another attempt after `delay_ms`.
    Retry { attempts: i32, delay_ms: i64 },
    /// Attempts exhausted: the job is dead.
    Dead { attempts: i32 },
}

/// `attempts = attempt_count + 1`; retry while `attempts < max_attempts`, after
/// `base * 2^attempts` capped at `max`, then moved by up to `jitter` of itself either way
/// (`unit_random` in 0..1), never beyond 0 or the cap.
pub fn outcome(
    attempt_count: i32,
    max_attempts: i32,
    base_ms: i64,
    max_ms: i64,
    jitter: f64,
    unit_random: f64,
) -> Outcome {
    let attempts = attempt_count + 1;
    if attempts >= max_attempts {
        return Outcome::Dead { attempts };
    }
    let cap = max_ms.max(0) as f64;
    let delay = (base_ms.max(0) as f64 * 2f64.powi(attempts)).min(cap);
    let jittered = delay * (1.0 + jitter * (2.0 * unit_random - 1.0));
    Outcome::Retry {
        attempts,
        delay_ms: jittered.clamp(0.0, cap).round() as i64,
    }
}

/// A uniform random number in 0..1 from Postgres's generator.
pub fn unit_random() -> f64 {
    unsafe { pgrx::pg_sys::pg_prng_double(&raw mut pgrx::pg_sys::pg_global_prng_state) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_the_base_until_attempts_run_out() {
        let delays: Vec<_> = (0..4)
            .map(|count| outcome(count, 5, 1000, 3_600_000, 0.0, 0.5))
            .collect();
        assert_eq!(
            delays,
            vec![
                Outcome::Retry {
                    attempts: 1,
                    delay_ms: 2000
                },
                Outcome::Retry {
                    attempts: 2,
                    delay_ms: 4000
                },
                Outcome::Retry {
                    attempts: 3,
                    delay_ms: 8000
                },
                Outcome::Retry {
                    attempts: 4,
                    delay_ms: 16000
                },
            ]
        );
        assert_eq!(
            outcome(4, 5, 1000, 3_600_000, 0.0, 0.5),
            Outcome::Dead { attempts: 5 }
        );
        assert_eq!(
            outcome(0, 1, 1000, 3_600_000, 0.0, 0.5),
            Outcome::Dead { attempts: 1 }
        );
    }

    #[test]
    fn the_cap_holds_even_for_huge_exponents() {
        assert_eq!(
            outcome(998, 1000, 1000, 60_000, 0.0, 0.5),
            Outcome::Retry {
                attempts: 999,
                delay_ms: 60_000
            }
        );
        assert_eq!(
            outcome(0, 5, 0, 60_000, 0.0, 0.5),
            Outcome::Retry {
                attempts: 1,
                delay_ms: 0
            }
        );
    }

    #[test]
    fn jitter_stays_within_its_fraction_and_the_cap() {
        let delay = |r| match outcome(1, 5, 1000, 3_600_000, 0.25, r) {
            Outcome::Retry { delay_ms, .. } => delay_ms,
            dead => panic!("{dead:?}"),
        };
        assert_eq!(delay(0.0), 3000); // 4000 - 25 %
        assert_eq!(delay(0.5), 4000);
        assert_eq!(delay(1.0), 5000); // 4000 + 25 %
        for i in 0..=100 {
            let d = delay(f64::from(i) / 100.0);
            assert!((3000..=5000).contains(&d), "{d}");
        }
        // Near the cap, jitter never pushes past it.
        match outcome(10, 20, 1000, 10_000, 1.0, 1.0) {
            Outcome::Retry { delay_ms, .. } => assert_eq!(delay_ms, 10_000),
            dead => panic!("{dead:?}"),
        }
    }
}
