//! The SQL API, by lifecycle step. Everything here runs inside the caller's transaction and
//! never talks to Redis on the enqueue path.

pub mod control;
pub mod enqueue;
pub mod errors;
pub mod raw_jsonb;
pub mod validate;
