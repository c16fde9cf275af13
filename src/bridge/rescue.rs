//! Duty: migrated jobs that have been in no Redis list for `queue.start_timeout` and that no
//! worker started are dispatched again, once: a worker popped them and died (or dropped them), or
//! Redis lost them (the list was evicted, deleted, or its master lost its data). Each list tells
//! where it starts in the push order (`list_tails`), and the bridge remembers, per list, where it
//! started at each pass ([`LeftHistory`]): a job numbered below where the list started
//! `start_timeout` ago had left it by then. A job still waiting in a list is never dispatched
//! again, however often Redis loses data. No per-job bookkeeping is written. Once per poll
//! interval, while Redis is reachable.

use super::context::{extension_ready, in_transaction, Context};
use super::episode::Episode;
use super::list_tails::{self, List};
use super::report::{Count, Level};
use super::shared;
use super::timer::Every;
use crate::settings;
use pgrx::spi::SpiClient;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Rescue {
    every: Every,
    left: LeftHistory,
    episode: Episode,
}

impl Rescue {
    pub fn due(&self, cx: &Context, now: Instant) -> bool {
        cx.redis.connected() && self.every.due(settings::poll_interval(), now)
    }

    pub fn next_run(&self) -> Instant {
        self.every.next(settings::poll_interval())
    }

    pub fn run(&mut self, cx: &mut Context, now: Instant) -> Vec<Count> {
        self.every.ran(now);
        let again = self.pass(cx);
        let mut counts = Vec::new();
        if again > 0 {
            cx.read_from.rewind();
            let first = self.episode.occurred(now, again as u64);
            counts.push(Count::new(
                again,
                if first { Level::Log } else { Level::Debug },
                "{n} jobs were in no Redis list and not started within queue.start_timeout; dispatching them again",
            ));
        }
        if let Some(totals) = self.episode.end_if_quiet(now) {
            counts.push(Count::new(
                1,
                Level::Log,
                totals.summary("start_timeout rescue"),
            ));
        }
        counts
    }

    /// One pass: returns how many jobs it dispatched again, and publishes per queue how many
    /// are overdue still (held by another transaction).
    fn pass(&mut self, cx: &mut Context) -> usize {
        let lists = in_transaction(|client| {
            extension_ready(client).then(|| list_tails::migrated_lists(client, None))
        });
        let Some(lists) = lists.filter(|l| !l.is_empty()) else {
            shared::publish_stranded(&[]);
            return 0;
        };
        let keys = &cx.keys;
        let Some(tails) = cx
            .redis
            .run(|client| list_tails::read(client, keys, &lists))
        else {
            return 0;
        };
        let timeout = Duration::from_millis(settings::start_timeout_ms() as u64);
        let left = &mut self.left;
        let (again, stranded) = in_transaction(|client| {
            let starts = list_tails::starts(client, &lists, &tails);
            let due = left.observe(&lists, &starts, timeout, Instant::now());
            redispatch(client, &lists, &due)
        });
        shared::publish_stranded(&stranded);
        again
    }
}

/// Dispatches again each list's migrated jobs below its due bound. Returns how many, and per
/// queue how many such jobs are left (a worker's transaction held them).
fn redispatch(
    client: &mut SpiClient<'_>,
    lists: &[List],
    due: &[Option<i64>],
) -> (usize, Vec<(String, i64)>) {
    let mut again = 0;
    let mut stranded: Vec<(String, i64)> = Vec::new();
    for (list, bound) in lists.iter().zip(due) {
        let Some(below) = *bound else { continue };
        again += list_tails::requeue_below(client, list, below);
        let left = list_tails::count_below(client, list, below);
        if left > 0 {
            match stranded.iter_mut().find(|(q, _)| *q == list.0) {
                Some((_, n)) => *n += left,
                None => stranded.push((list.0.clone(), left)),
            }
        }
    }
    (again, stranded)
}

/// Per list, where it started in the push order at each pass, for `start_timeout`.
#[derive(Default)]
pub struct LeftHistory {
    lists: HashMap<List, VecDeque<(Instant, i64)>>,
}

impl LeftHistory {
    /// Records this pass's starts (None: not known this time) and returns, per list, where it
    /// started at least `timeout` ago (None: no observation that old yet). The jobs below had
    /// left it by then.
    pub fn observe(
        &mut self,
        lists: &[List],
        starts: &[Option<i64>],
        timeout: Duration,
        now: Instant,
    ) -> Vec<Option<i64>> {
        lists
            .iter()
            .zip(starts)
            .map(|(list, start)| {
                let seen = self.lists.entry(list.clone()).or_default();
                if let Some(start) = *start {
                    // A list's start only moves up; one that went down (a stale entry read as
                    // current) voids what was seen before.
                    if seen.back().is_some_and(|&(_, last)| start < last) {
                        seen.clear();
                    }
                    seen.push_back((now, start));
                }
                // Keep the newest observation at least `timeout` old, and everything newer.
                while seen.len() > 1 && now.duration_since(seen[1].0) >= timeout {
                    seen.pop_front();
                }
                match seen.front() {
                    Some(&(at, start)) if now.duration_since(at) >= timeout => Some(start),
                    _ => None,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Priority;

    fn list() -> Vec<List> {
        vec![("emails".into(), Priority::Normal)]
    }

    const T: Duration = Duration::from_secs(5);
    const S: Duration = Duration::from_secs(1);

    #[test]
    fn nothing_is_due_before_the_timeout() {
        let mut h = LeftHistory::default();
        let t0 = Instant::now();
        assert_eq!(h.observe(&list(), &[Some(5)], T, t0), vec![None]);
        assert_eq!(h.observe(&list(), &[Some(9)], T, t0 + 4 * S), vec![None]);
    }

    #[test]
    fn where_the_list_started_a_timeout_ago_is_due() {
        let mut h = LeftHistory::default();
        let t0 = Instant::now();
        h.observe(&list(), &[Some(5)], T, t0);
        // Started at 5 five seconds ago: jobs below 5 left it at least that long ago.
        assert_eq!(h.observe(&list(), &[Some(9)], T, t0 + T), vec![Some(5)]);
        assert_eq!(
            h.observe(&list(), &[Some(9)], T, t0 + T + 4 * S),
            vec![Some(5)]
        );
        assert_eq!(
            h.observe(&list(), &[Some(12)], T, t0 + 2 * T),
            vec![Some(9)]
        );
    }

    #[test]
    fn an_unknown_start_adds_nothing_but_keeps_what_was_seen() {
        let mut h = LeftHistory::default();
        let t0 = Instant::now();
        h.observe(&list(), &[Some(5)], T, t0);
        assert_eq!(h.observe(&list(), &[None], T, t0 + S), vec![None]);
        assert_eq!(h.observe(&list(), &[None], T, t0 + T), vec![Some(5)]);
    }

    #[test]
    fn a_start_that_went_down_starts_a_new_history() {
        let mut h = LeftHistory::default();
        let t0 = Instant::now();
        h.observe(&list(), &[Some(50)], T, t0);
        assert_eq!(h.observe(&list(), &[Some(20)], T, t0 + T), vec![None]);
        assert_eq!(
            h.observe(&list(), &[Some(20)], T, t0 + 2 * T),
            vec![Some(20)]
        );
    }
}
