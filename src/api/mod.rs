//! The SQL API, by lifecycle step. Everything here runs inside the caller's transaction and
//! never talks to Redis on the enqueue path.

pub mod control;
pub mod dead_letters;
pub mod enqueue;
pub mod errors;
pub mod finish;
pub mod jobs;
pub mod raw_jsonb;
pub mod start;
pub mod validate;
