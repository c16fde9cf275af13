//! What operators look at: `queue.health()`.

pub mod health;
pub mod redis_probe;
