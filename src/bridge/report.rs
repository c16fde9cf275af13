//! What a duty did, as counts; the main loop logs them in one place.

use pgrx::prelude::*;
use std::borrow::Cow;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Level {
    Debug,
    Log,
    Warning,
}

/// `n` things happened; `message` says what, with `{n}` where the number goes.
#[derive(Debug, PartialEq)]
pub struct Count {
    pub n: usize,
    pub level: Level,
    pub message: Cow<'static, str>,
}

impl Count {
    pub fn new(n: usize, level: Level, message: impl Into<Cow<'static, str>>) -> Count {
        Count {
            n,
            level,
            message: message.into(),
        }
    }

    fn text(&self) -> String {
        self.message.replace("{n}", &self.n.to_string())
    }
}

/// Logs every count that is not zero.
pub fn log(counts: &[Count]) {
    for c in counts.iter().filter(|c| c.n > 0) {
        let text = c.text();
        match c.level {
            Level::Debug => debug1!("queue_pg bridge: {text}"),
            Level::Log => log!("queue_pg bridge: {text}"),
            Level::Warning => warning!("queue_pg bridge: {text}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_number_goes_where_the_message_says() {
        let c = Count::new(
            1000,
            Level::Warning,
            "Redis lost its data; dispatching {n} jobs again",
        );
        assert_eq!(c.text(), "Redis lost its data; dispatching 1000 jobs again");
    }
}
