//! One batch of reports, applied in one transaction (the caller's): the jobs they name are locked
//! once, each report is judged by the lifecycle's rule (`report_rule`) against the state
//! the reports before it left, and the accepted ones run as set-based transitions, one statement
//! per kind. A job's reports apply in stream order: its second report of a batch goes in the
//! second wave of statements, and so on. Reports that do not fit are counted by queue and reason
//! in `queue.rejected_reports`; they never hold back the rest of the batch.

use crate::lifecycle::report_rule::{Locked, Reject, Step};
use crate::lifecycle::transitions::{self, Done, Failure};
use crate::lifecycle::Sql;
use crate::redis::report::{Entry, Report};
use crate::spi_plans::{self, types::*};
use pgrx::datum::Interval;
use pgrx::spi::SpiClient;
use std::collections::{BTreeMap, HashMap};

/// What a batch did.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    pub applied: usize,
    /// Per (queue, reason): how many, and the last job id among them (if it had one).
    pub rejected: BTreeMap<(String, Reject), (i64, Option<i64>)>,
}

impl Applied {
    pub fn rejected_total(&self) -> usize {
        self.rejected.values().map(|(n, _)| *n as usize).sum()
    }

    fn reject(&mut self, queue: &str, reason: Reject, job_id: Option<i64>) {
        self.count_rejected(queue, reason, 1, job_id);
    }

    /// Adds `n` rejected reports of `queue` for `reason`, the last of them about `job_id`.
    pub fn count_rejected(&mut self, queue: &str, reason: Reject, n: i64, job_id: Option<i64>) {
        let slot = self
            .rejected
            .entry((queue.to_owned(), reason))
            .or_insert((0, None));
        slot.0 += n;
        slot.1 = job_id.or(slot.1);
    }
}

/// A parsed report and the queue whose stream it came from.
struct Item<'a> {
    queue: &'a str,
    report: &'a Report,
}

/// The accepted reports of one wave, by what they do.
#[derive(Default)]
struct Wave<'a> {
    starts: Vec<(i64, Option<Interval>)>,
    extends: Vec<(i64, Option<Interval>, i32)>,
    completes: Vec<Done>,
    failures: Vec<Failure<'a>>,
}

/// Applies `streams` (per queue, its entries in stream order) in the caller's transaction.
pub fn apply(client: &mut SpiClient<'_>, streams: &[(&str, &[Entry])]) -> Applied {
    let mut out = Applied::default();
    let mut items = Vec::new();
    for (queue, entries) in streams {
        for e in entries.iter() {
            match &e.report {
                Ok(report) => items.push(Item { queue, report }),
                Err(reason) => out.reject(queue, *reason, e.job_id),
            }
        }
    }
    let mut ids: Vec<i64> = items.iter().map(|i| i.report.id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut jobs: HashMap<i64, Locked> = transitions::lock(client, &ids)
        .unwrap_or_else(|e| pgrx::error!("queue_pg reports: {e}"))
        .into_iter()
        .map(|j| (j.id, j))
        .collect();

    // A job's n-th report of the batch goes in wave n.
    let mut seen: HashMap<i64, usize> = HashMap::new();
    let mut waves: Vec<Vec<&Item>> = Vec::new();
    for item in &items {
        let n = seen.entry(item.report.id).or_insert(0);
        if waves.len() <= *n {
            waves.push(Vec::new());
        }
        waves[*n].push(item);
        *n += 1;
    }
    for wave_items in waves {
        let mut wave = Wave::default();
        for item in wave_items {
            let r = item.report;
            let Some(job) = jobs.get_mut(&r.id) else {
                out.reject(item.queue, Reject::UnknownJob, Some(r.id));
                continue;
            };
            let step = match job.accepts(item.queue, r.op, r.attempt) {
                Ok(step) => step,
                Err(reason) => {
                    out.reject(item.queue, reason, Some(r.id));
                    continue;
                }
            };
            let lease = r.lease.map(|d| {
                Interval::try_from(d).unwrap_or_else(|e| pgrx::error!("lease {d:?}: {e:?}"))
            });
            let mut outcome = None;
            match step {
                Step::Start => wave.starts.push((r.id, lease)),
                Step::Extend => wave.extends.push((r.id, lease, r.attempt)),
                Step::Complete => wave.completes.push(Done {
                    id: r.id,
                    result: r.result.clone(),
                    attempt: Some(r.attempt),
                }),
                Step::Fail => {
                    let o = transitions::failure_outcome(job);
                    outcome = Some(o);
                    wave.failures.push(Failure {
                        id: r.id,
                        outcome: o,
                        error: r.error.as_deref().unwrap_or(""),
                    });
                }
            }
            job.after(step, outcome.as_ref());
            out.applied += 1;
        }
        run_wave(client, wave);
    }
    record_rejections(client, &out);
    out
}

/// The wave's statements. The jobs are locked and were judged to fit, so each statement changes
/// every row it is given; anything else is a bug, and an ERROR (the batch is applied again).
fn run_wave(client: &mut SpiClient<'_>, wave: Wave<'_>) {
    let fail = |what: &str, e: String| -> ! { pgrx::error!("queue_pg reports: {what}: {e}") };
    let check = |what: &str, asked: usize, changed: usize| {
        if asked != changed {
            pgrx::error!("queue_pg reports: {what} changed {changed} of {asked} jobs");
        }
    };
    if !wave.starts.is_empty() {
        let (ids, leases): (Vec<_>, Vec<_>) = wave.starts.into_iter().unzip();
        let n = ids.len();
        let changed = transitions::start(client, ids, leases)
            .map(|t| t.len())
            .unwrap_or_else(|e| fail("start", e));
        check("start", n, changed);
    }
    if !wave.extends.is_empty() {
        let n = wave.extends.len();
        let mut ids = Vec::with_capacity(n);
        let mut leases = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        for (id, lease, attempt) in wave.extends {
            ids.push(id);
            leases.push(lease);
            attempts.push(Some(attempt));
        }
        let changed = transitions::heartbeat(client, ids, leases, attempts)
            .map(|t| t.len())
            .unwrap_or_else(|e| fail("heartbeat", e));
        check("heartbeat", n, changed);
    }
    if !wave.completes.is_empty() {
        let n = wave.completes.len();
        let changed = transitions::complete(client, wave.completes, true)
            .unwrap_or_else(|e| fail("complete", e));
        check("complete", n, changed);
    }
    if !wave.failures.is_empty() {
        let changed = transitions::fail(client, &wave.failures)
            .unwrap_or_else(|e| fail("fail", e))
            .len();
        check("fail", wave.failures.len(), changed);
    }
}

static RECORD_REJECTIONS: Sql = Sql::new(
    "
    INSERT INTO queue.rejected_reports AS r (queue_name, reason, count, last_at, last_job_id)
    SELECT q, reason, n, now(), job FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
        AS t(q, reason, n, job)
    ON CONFLICT (queue_name, reason) DO UPDATE
    SET count = r.count + EXCLUDED.count, last_at = EXCLUDED.last_at,
        last_job_id = COALESCE(EXCLUDED.last_job_id, r.last_job_id)",
);

fn record_rejections(client: &mut SpiClient<'_>, out: &Applied) {
    if out.rejected.is_empty() {
        return;
    }
    let mut queues = Vec::new();
    let mut reasons = Vec::new();
    let mut counts = Vec::new();
    let mut jobs = Vec::new();
    for ((queue, reason), (n, job)) in &out.rejected {
        queues.push(queue.as_str());
        reasons.push(reason.as_str());
        counts.push(*n);
        jobs.push(*job);
    }
    let args = [queues.into(), reasons.into(), counts.into(), jobs.into()];
    let types = [TEXT_ARRAY, TEXT_ARRAY, INT8_ARRAY, INT8_ARRAY];
    spi_plans::update(client, &RECORD_REJECTIONS, &types, None, &args).unwrap_or_else(|e| {
        pgrx::error!("queue_pg reports: counting rejected reports failed: {e}")
    });
}
