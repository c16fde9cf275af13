//! The extension's SQL objects as this library finds them: installed or not, and at which
//! version. A library loaded before `ALTER EXTENSION queue_pg UPDATE` (or after a downgrade)
//! would otherwise run its statements against tables and functions of another release and fail
//! obscurely; instead every SQL function checks once per backend (before its first statement),
//! the background workers wait and say why, and `queue.health()` reports it.

use pgrx::spi::SpiClient;
use std::cell::Cell;

/// The version of this library, which is the version of the SQL it ships.
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What `pg_extension` says of queue_pg in the current database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Installed {
    Missing,
    /// Installed at this version (`extversion`).
    At(String),
}

impl Installed {
    /// Installed at the library's own version: its statements fit the schema.
    pub fn ready(&self) -> bool {
        matches!(self, Installed::At(v) if v == LIBRARY_VERSION)
    }

    /// The SQL objects' version when it is not the library's.
    pub fn other_version(&self) -> Option<&str> {
        match self {
            Installed::At(v) if v != LIBRARY_VERSION => Some(v),
            _ => None,
        }
    }
}

/// What to tell the operator when the SQL objects are at `sql_version`.
pub fn mismatch_message(sql_version: &str) -> String {
    format!(
        "queue_pg: the library is version {LIBRARY_VERSION} but the extension's SQL objects in \
         this database are version {sql_version}; run ALTER EXTENSION queue_pg UPDATE"
    )
}

const INSTALLED: &str = "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'queue_pg'";

/// Looks queue_pg up in `pg_extension`.
pub fn installed(client: &mut SpiClient<'_>) -> Result<Installed, String> {
    // Through a kept plan that skips the version check (this is the check).
    crate::spi_plans::with_plan_unchecked(client, INSTALLED, &[], |client, plan| {
        let rows = client
            .select(plan, Some(1), &[])
            .map_err(|e| e.to_string())?;
        if rows.is_empty() {
            return Ok(Installed::Missing);
        }
        let version = rows
            .first()
            .get_one::<String>()
            .map_err(|e| e.to_string())?;
        version
            .map(Installed::At)
            .ok_or_else(|| "pg_extension.extversion is NULL".to_owned())
    })
}

thread_local! {
    /// This backend found the SQL objects at the library's version (never unset: the version
    /// cannot change under a loaded library except by a DROP, after which nothing fits anyway).
    static VERIFIED: Cell<bool> = const { Cell::new(false) };
}

/// Called before a backend prepares its first statement: ERROR (55000) if the SQL objects are
/// at another version. A missing extension passes (the statement itself then fails, or the
/// background worker's own check waits for CREATE EXTENSION).
pub fn check_once(client: &mut SpiClient<'_>) {
    if VERIFIED.get() {
        return;
    }
    match installed(client) {
        Ok(found) if found.ready() => VERIFIED.set(true),
        Ok(Installed::At(other)) => crate::api::errors::wrong_state(mismatch_message(&other)),
        Ok(Installed::Missing) => {}
        Err(e) => pgrx::error!("queue_pg: looking up the extension's version failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_library_version_is_ready() {
        assert!(Installed::At(LIBRARY_VERSION.into()).ready());
        assert!(!Installed::At("0.0.1".into()).ready());
        assert!(!Installed::Missing.ready());
        assert_eq!(Installed::At("0.0.1".into()).other_version(), Some("0.0.1"));
        assert_eq!(Installed::At(LIBRARY_VERSION.into()).other_version(), None);
        assert_eq!(Installed::Missing.other_version(), None);
    }

    #[test]
    fn the_message_names_both_versions_and_the_fix() {
        let m = mismatch_message("0.0.1");
        assert!(m.contains(LIBRARY_VERSION) && m.contains("0.0.1"));
        assert!(m.contains("ALTER EXTENSION queue_pg UPDATE"));
    }
}
