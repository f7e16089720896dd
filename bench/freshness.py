"""Freshness: time from webhook accepted to score written, under a sustained stream of new leads.

`--rate` deliveries per second (20), each `--per-delivery` contact.creation events (10) for
distinct new contacts, for `--seconds` (20) = 200 events/s, to `--workers` (2) `leadscore worker`
processes; LLM stub latency 0.3 s, HubSpot emulator latency 0.05 s per call. Per lead: the time
from the moment the delivery's 200 came back to the lead's leadscore_scored_at in the emulator.
Reported: p50/p95/max, leads scored per second, and lost leads (not scored `--drain-timeout`
seconds after the last delivery). The backlog (pending leads, queued RQ jobs) is sampled each
second.

Target: p95 <= 2 s + one LLM latency; no lost leads.

Run: /tmp/venv/bin/python bench/freshness.py [--rate 20] [--per-delivery 10] [--seconds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from harness import (
    Pipeline,
    add_pipeline_options,
    encode,
    events_for,
    machine,
    percentile,
    pipeline_env,
    post,
    save,
    table,
)

from integration import metrics
from workers.store import Store


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=20.0, help="deliveries per second")
    parser.add_argument("--per-delivery", type=int, default=10, help="new leads per delivery")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    add_pipeline_options(
        parser, llm_latency=0.3, hubspot_latency=0.05, llm_concurrency=100, calls_per_10s=100
    )
    parser.add_argument("--drain-timeout", type=float, default=120, help="wait after the last delivery")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    info = machine()
    deliveries = int(args.rate * args.seconds)
    env = pipeline_env(args)
    with Pipeline(hubspot_latency=args.hubspot_latency, llm_latency=args.llm_latency, env=env) as pipe:
        ids = pipe.seed_contacts(deliveries * args.per_delivery, 84_000_000_000)
        pipe.start_workers(args.workers)
        accepted: dict[str, float] = {}
        refused, late = [], [0]
        local = threading.local()
        backlog_samples: list[dict] = []
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(1.0):
                with contextlib.suppress(Exception):  # a missed sample is fine
                    backlog_samples.append({"t": round(time.time() - started, 1), **pipe.backlog()})

        def send(k: int) -> None:
            session = getattr(local, "session", None) or requests.Session()
            local.session = session
            batch = ids[k * args.per_delivery : (k + 1) * args.per_delivery]
            status, _ = post(session, pipe.webhook_url, encode(events_for(batch, "contact.creation")))
            now = time.time()
            if status == 200:
                accepted.update(dict.fromkeys(batch, now))
            else:
                refused.append(status)

        started = time.time()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(8) as pool:
            for k in range(deliveries):
                due = started + k / args.rate
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -0.05:
                    late[0] += 1
                pool.submit(send, k)
        delivered = time.time() - started
        unscored = pipe.wait_scored(list(accepted), args.drain_timeout, poll_s=0.2)
        stop_sampling.set()
        sampler.join()
        written = {i: pipe.scored_at(i) for i in accepted if i not in unscored}
        failed = pipe.failed_jobs()
        kept = Store(pipe.env["DATABASE_URL"]).counts()["scores"]  # two workers share one SQLite store
        store_errors = int(metrics.counter_value(pipe.redis, "store_errors_total"))

    delays = [written[i] - accepted[i] for i in written]
    last = max(written.values()) if written else time.time()
    row = {
        "leads": len(ids),
        "accepted": len(accepted),
        "refused_deliveries": len(refused),
        "offered_per_s": round(len(accepted) / delivered, 1),
        "scored": len(written),
        "lost": len(accepted) - len(written),
        "scored_per_s": round(len(written) / (last - started), 1),
        "p50_s": round(percentile(delays, 50), 2),
        "p95_s": round(percentile(delays, 95), 2),
        "max_s": round(max(delays), 2) if delays else None,
        "peak_pending_leads": max((s["pending"] for s in backlog_samples), default=0),
        "peak_queued_jobs": max((s["queued"] for s in backlog_samples), default=0),
    }
    target_s = 2 + args.llm_latency
    met = row["p95_s"] <= target_s and row["lost"] == 0
    results = {
        "freshness": row,
        "late_submissions": late[0],
        "failed_jobs": failed,
        "scores_kept_in_store": kept,
        "store_errors": store_errors,
        "backlog_samples": backlog_samples,
        "target_p95_s": target_s,
        "target_met": met,
    }
    path = save("freshness", args, results, args.out, info)
    print(
        f"freshness: {args.rate:g} deliveries/s x {args.per_delivery} new leads for {args.seconds:g}s, "
        f"{args.workers} workers, LLM {args.llm_latency}s (LLM_CONCURRENCY {args.llm_concurrency}), "
        f"HubSpot {args.hubspot_latency}s/call"
    )
    columns = ["accepted", "offered_per_s", "scored", "lost", "scored_per_s", "p50_s", "p95_s", "max_s",
               "peak_pending_leads", "peak_queued_jobs"]  # fmt: skip
    print(table([row], columns))
    print(f"target p95 <= {target_s:g}s and 0 lost: {'met' if met else 'NOT met'}; failed jobs {failed}; "
          f"scores kept in the store {kept}, store errors {store_errors}")  # fmt: skip
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
