"""The chaos soak's short mode: jobs flow through worker processes while Redis is frozen,
restarted empty and flushed, the bridge and a worker are SIGKILLed, Postgres crashes and the
tables are rewritten by VACUUM FULL; every job must still end as planned. The long mode
(100,000 jobs, 30 faults of each kind) runs by hand: bench/chaos/chaos.py."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench" / "chaos"))
import chaos  # noqa: E402

# Its own stack: the soak crashes Postgres and changes settings.
ENV = dict(QPG_HOME="/tmp/queue_pg_test_chaos", QPG_PGPORT="15482", QPG_REDIS_PORT="16429")


@pytest.mark.parametrize("worker_path", ["fast", "sql"])
def test_every_job_ends_as_planned_through_every_kind_of_fault(worker_path):
    stack = chaos.Stack(ENV)
    stack.run("up")
    try:
        report = chaos.soak(ENV, jobs=3000, workers=4, min_each=1, drain_timeout=180,
                            worker_path=worker_path)
    finally:
        stack.run("down")
    print(chaos.table(report))
    assert chaos.failures(report) == [], report
    assert all(report["faults"].get(kind, 0) >= 1 for kind in chaos.FAULTS), report["faults"]
    assert report["dead"] == report["dead_planned"] + report["died_of_faults"]
    assert report["dead_planned"] > 0
