"""The Python example worker (examples/python/worker.py), unchanged, with its handle() wrapped for
the chaos soak: the payload's plan decides failures deterministically, and every run of the
handler is appended to CHAOS_RUN_LOG ("ok|fail <job> <attempt>"), so the soak can tell how often
each attempt ran.

Plans: "ok" completes; "fail_first" fails attempt 1, then completes; "dead" fails every attempt;
"long" sleeps past the queue's lease (heartbeats keep it alive), then completes.
"""

import importlib.util
import os
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "python" / "worker.py"

spec = importlib.util.spec_from_file_location("example_worker", EXAMPLE)
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)

run_log = open(os.environ["CHAOS_RUN_LOG"], "a", buffering=1)


def handle(job_id, attempt, payload):
    plan = payload.get("plan", "ok")
    try:
        if plan == "long":
            time.sleep(payload["sleep"])
        if plan == "dead" or (plan == "fail_first" and attempt == 1):
            raise RuntimeError(f"planned failure ({plan}) of attempt {attempt}")
    except Exception:
        run_log.write(f"fail {job_id} {attempt}\n")
        raise
    run_log.write(f"ok {job_id} {attempt}\n")
    return {"n": payload.get("n"), "attempt": attempt}


worker.handle = handle

if __name__ == "__main__":
    sys.exit(worker.main())
