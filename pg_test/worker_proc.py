"""A real worker process for the end-to-end tests, following the documented worker loop:
BRPOP high/normal/low -> queue.start -> handler -> queue.complete or queue.fail.

    python worker_proc.py MODE QUEUE [OUT_FILE]

MODE:
  work       loop until SIGTERM; a job fails when its payload says {"fail": true}, or at random
             with the probability in the env var FAIL_RATE; ids completed are appended to OUT_FILE
  hold       pop one job, start it, print its id, then sleep forever (to be SIGKILLed)
  pop-only   pop one job, print its id, and exit without starting it
"""

import json
import os
import random
import signal
import sys
import time

import psycopg
import redis

HOME = os.environ["QPG_HOME"]
DSN = f"host={HOME} port={os.environ['QPG_PGPORT']} user=postgres dbname=postgres"
PREFIX = "queue_pg"


def keys(queue):
    return [f"{PREFIX}:{{{queue}}}:{p}" for p in ("high", "normal", "low")]


def main():
    mode, queue = sys.argv[1], sys.argv[2]
    out = open(sys.argv[3], "a") if len(sys.argv) > 3 else None
    r = redis.Redis(port=int(os.environ["QPG_REDIS_PORT"]))
    db = psycopg.connect(DSN, autocommit=True)

    if mode in ("hold", "pop-only"):
        _, raw = r.brpop(keys(queue), timeout=30)
        job = json.loads(raw)
        if mode == "hold":
            db.execute("SELECT * FROM queue.start(%s, interval '1 second')", (job["id"],)).fetchone()
        print(job["id"], flush=True)
        if mode == "hold":
            while True:
                time.sleep(60)
        return

    stopping = False

    def on_term(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    fail_rate = float(os.environ.get("FAIL_RATE", "0"))
    while not stopping:
        got = r.brpop(keys(queue), timeout=1)
        if not got:
            continue
        msg = json.loads(got[1])
        row = db.execute("SELECT attempt FROM queue.start(%s)", (msg["id"],)).fetchone()
        if row is None:
            continue  # cancelled, finished, held elsewhere, or a duplicate
        attempt = row[0]
        payload = msg["payload"]
        if (isinstance(payload, dict) and payload.get("fail")) or random.random() < fail_rate:
            db.execute("SELECT queue.fail(%s, %s, %s)", (msg["id"], "handler failed", attempt))
        else:
            db.execute("SELECT queue.complete(%s, NULL, %s)", (msg["id"], attempt))
            if out:
                out.write(f"{msg['id']}\n")
                out.flush()


if __name__ == "__main__":
    main()
