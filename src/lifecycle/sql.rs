//! SQL statements name job states and priorities through placeholders, filled in from the
//! lifecycle's enums: `{queued}` becomes `'queued'`, `{unfinished}` becomes
//! `('queued', 'scheduled', …)`. So no statement types a state list out by hand, and the
//! schema's lists (`sql/schema.sql`) are checked against the same constants by the tests below.

use super::{JobState, Priority};
use std::ops::Deref;
use std::sync::OnceLock;

/// A recursive CTE `names(queue_name)` for a `WITH RECURSIVE` clause: the queues holding jobs
/// in `$state` (a placeholder such as `"{migrated}"`), found by a skip scan over an index led by
/// `queue_name` (one probe per queue, however many jobs each holds). Its last row is NULL.
macro_rules! queues_in_state {
    ($state:literal) => {
        concat!(
            "names(queue_name) AS (
                (SELECT queue_name FROM queue.jobs WHERE status = ",
            $state,
            "
                 ORDER BY queue_name LIMIT 1)
                UNION ALL
                SELECT (SELECT j.queue_name FROM queue.jobs j
                        WHERE j.status = ",
            $state,
            " AND j.queue_name > n.queue_name
                        ORDER BY j.queue_name LIMIT 1)
                FROM names n WHERE n.queue_name IS NOT NULL)"
        )
    };
}
pub(crate) use queues_in_state;

/// A statement whose text is rendered once, on first use, and then lives as long as the process
/// (so `spi_plans` can keep its prepared plan under the text's address).
pub struct Sql {
    template: &'static str,
    text: OnceLock<String>,
}

impl Sql {
    pub const fn new(template: &'static str) -> Sql {
        Sql {
            template,
            text: OnceLock::new(),
        }
    }
}

impl Deref for Sql {
    type Target = str;
    fn deref(&self) -> &str {
        self.text.get_or_init(|| render(self.template))
    }
}

fn quoted<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.into_iter().map(|n| format!("'{n}'")).collect();
    format!("({})", names.join(", "))
}

fn list(states: &[JobState]) -> String {
    quoted(states.iter().map(|s| s.as_str()))
}

/// What a placeholder stands for; None if it names nothing.
fn expand(name: &str) -> Option<String> {
    if let Ok(state) = JobState::parse(name) {
        return Some(format!("'{state}'"));
    }
    if let Ok(priority) = Priority::parse(name) {
        return Some(format!("'{priority}'"));
    }
    Some(match name {
        "unfinished" => list(&JobState::UNFINISHED),
        "waiting" => list(&JobState::WAITING),
        "outcomes" => list(&JobState::OUTCOMES),
        _ => return None,
    })
}

/// Fills in every `{name}` (lowercase letters and `_`); any other brace is left alone, so JSON
/// literals such as `'{}'` pass through. A placeholder that names nothing is a bug: panic.
fn render(template: &str) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(after.len());
        if name_len > 0 && after[name_len..].starts_with('}') {
            let name = &after[..name_len];
            let Some(text) = expand(name) else {
                panic!("queue_pg: SQL placeholder {{{name}}} names no job state, priority or set");
            };
            out.push_str(&text);
            rest = &after[name_len + 1..];
        } else {
            out.push('{');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_quoted_names_and_lists() {
        assert_eq!(
            render("WHERE status = {running} AND priority = {high}"),
            "WHERE status = 'running' AND priority = 'high'"
        );
        assert_eq!(
            render("status IN {waiting}"),
            "status IN ('scheduled', 'retry_scheduled')"
        );
        assert_eq!(
            render("x = '{}'::jsonb AND y = '{a,b}' AND z = '{A}'"),
            "x = '{}'::jsonb AND y = '{a,b}' AND z = '{A}'"
        );
        static S: Sql = Sql::new("SELECT {queued}");
        assert_eq!(&*S, "SELECT 'queued'");
        assert!(std::ptr::eq(&*S, &*S), "rendered once");
    }

    #[test]
    #[should_panic(expected = "{quued}")]
    fn a_misspelt_placeholder_is_a_bug() {
        render("WHERE status = {quued}");
    }

    /// The quoted names of the first `IN (…)` list after `marker` in the schema.
    fn schema_list(marker: &str) -> Vec<String> {
        let schema = include_str!("../../sql/schema.sql");
        let at = schema.find(marker).expect(marker);
        let open = at + schema[at..].find("IN (").expect("IN (") + 4;
        let close = open + schema[open..].find(')').expect(")");
        schema[open..close]
            .split(',')
            .map(|s| s.trim().trim_matches('\'').to_string())
            .collect()
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    fn names(states: &[JobState]) -> Vec<String> {
        states.iter().map(|s| s.as_str().to_string()).collect()
    }

    #[test]
    fn the_schema_lists_the_lifecycle_states() {
        assert_eq!(
            sorted(schema_list("status             text NOT NULL CHECK")),
            sorted(names(&JobState::ALL))
        );
        assert_eq!(
            schema_list("priority           text"),
            Priority::ALL.map(|p| p.as_str().to_string())
        );
        // The dedupe index's predicate is what enqueue's ON CONFLICT names as {unfinished}.
        assert_eq!(
            schema_list("CREATE UNIQUE INDEX jobs_dedupe_idx"),
            names(&JobState::UNFINISHED)
        );
        assert_eq!(
            schema_list("CREATE INDEX jobs_due_idx"),
            names(&JobState::WAITING)
        );
    }
}
