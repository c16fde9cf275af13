//! The retry rule (SPEC.md, "Backoff rule"), in one place: used by `queue.fail` and by the
//! bridge when a lease expires.

/// What a failed attempt leads to.
#[derive(Debug, PartialEq)]
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
