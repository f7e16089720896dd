"""Throughput: leads scored per second by ONE worker, batched pipeline vs the naive per-lead job.

Both phases use the same emulators: the LLM stub answers after `--llm-latency` (0.3 s), every
HubSpot emulator call takes `--hubspot-latency` (0.05 s), one `leadscore worker` process.

(a) batched: `--leads` new contacts (2,000) delivered as signed contact.creation deliveries of 100
    events to /webhooks/hubspot (collect -> score_batch: one batch read, concurrent LLM calls, one
    batch update per 100 leads). Time from the first delivery to the last lead's
    leadscore_scored_at -> leads/s.
(b) naive: the worker is stopped, Redis flushed (HubSpot properties kept), `--leads` fresh
    contacts enqueued directly as RQ jobs of `workers.jobs.score_lead` (one read -> LLM -> one
    write each) into the same queue, a fresh worker started; after `--naive-seconds` (or when all
    are done) leads/s = scored / elapsed.

Target: batched >= 10x naive.

Run: /tmp/venv/bin/python bench/throughput.py [--leads 2000] [--naive-seconds 45]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import requests
from harness import (
    PORTAL,
    QUEUE_NAME,
    Pipeline,
    add_pipeline_options,
    encode,
    events_for,
    machine,
    pipeline_env,
    post,
    save,
    table,
)
from rq import Queue

from integration.events import LeadEvent


def batched(pipe: Pipeline, ids: list[str], per_delivery: int, timeout_s: float) -> dict:
    bodies = [
        encode(events_for(ids[i : i + per_delivery], "contact.creation"))
        for i in range(0, len(ids), per_delivery)
    ]
    session = requests.Session()
    started = time.time()
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda b: post(session, pipe.webhook_url, b)[0], bodies))
    delivered = time.time() - started
    unscored = pipe.wait_scored(ids, timeout_s)
    done = [pipe.scored_at(i) for i in ids if i not in unscored]
    elapsed = (max(done) if done else time.time()) - started
    return {
        "phase": "batched",
        "leads": len(ids),
        "deliveries": len(bodies),
        "refused_deliveries": sum(s != 200 for s in statuses),
        "delivered_in_s": round(delivered, 2),
        "scored": len(done),
        "elapsed_s": round(elapsed, 1),
        "leads_per_s": round(len(done) / elapsed, 2),
        "crm_calls": None,
        "llm_calls": None,
    }


def naive(pipe: Pipeline, ids: list[str], seconds: float) -> dict:
    queue = Queue(QUEUE_NAME, connection=pipe.redis)
    now = datetime.now(UTC)
    jobs = [
        Queue.prepare_data(
            "workers.jobs.score_lead",
            kwargs={
                "event": LeadEvent(
                    crm="hubspot",
                    account_id=PORTAL,
                    lead_id=i,
                    event_ids=(f"{8_000_000_000 + n}@0",),
                    kinds=("creation",),
                    occurred_at=now,
                    accepted_at=now,
                ).model_dump(mode="json")
            },
            description=f"naive score {i}",
        )  # fmt: skip
        for n, i in enumerate(ids)
    ]
    started = time.time()
    queue.enqueue_many(jobs)
    unscored = pipe.wait_scored(ids, seconds, poll_s=0.5)
    stopped = time.time()
    done = [t for i in ids if i not in unscored and (t := pipe.scored_at(i)) is not None]
    elapsed = (max(done) if len(done) == len(ids) else stopped) - started
    return {
        "phase": "naive",
        "leads": len(ids),
        "deliveries": 0,
        "scored": len(done),
        "elapsed_s": round(elapsed, 1),
        "leads_per_s": round(len(done) / elapsed, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--leads", type=int, default=2000)
    parser.add_argument("--per-delivery", type=int, default=100, help="events per delivery (batched)")
    add_pipeline_options(parser, llm_latency=0.3, hubspot_latency=0.05, llm_concurrency=8, calls_per_10s=100)
    parser.add_argument("--batched-timeout", type=float, default=240, help="bound on phase (a)")
    parser.add_argument("--naive-seconds", type=float, default=45, help="how long phase (b) runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    info = machine()
    env = pipeline_env(args)
    with Pipeline(hubspot_latency=args.hubspot_latency, llm_latency=args.llm_latency, env=env) as pipe:
        ids = pipe.seed_contacts(args.leads, 81_000_000_000)
        pipe.start_workers(1)
        crm0, llm0 = pipe.emulator.api_calls(), len(pipe.llm.requests)
        a = batched(pipe, ids, args.per_delivery, args.batched_timeout)
        a.update(crm_calls=pipe.emulator.api_calls() - crm0, llm_calls=len(pipe.llm.requests) - llm0)

        pipe.stop_workers()
        pipe.redis.flushdb()
        ids = pipe.seed_contacts(args.leads, 82_000_000_000)
        pipe.start_workers(1)
        crm0, llm0 = pipe.emulator.api_calls(), len(pipe.llm.requests)
        b = naive(pipe, ids, args.naive_seconds)
        b.update(crm_calls=pipe.emulator.api_calls() - crm0, llm_calls=len(pipe.llm.requests) - llm0)

    speedup = a["leads_per_s"] / b["leads_per_s"] if b["leads_per_s"] else float("inf")
    results = {"batched": a, "naive": b, "speedup": round(speedup, 1), "target_speedup_ge_10": speedup >= 10}
    path = save("throughput", args, results, args.out, info)
    print(
        f"throughput: {args.leads} leads, 1 worker, LLM stub {args.llm_latency}s, HubSpot emulator "
        f"{args.hubspot_latency}s/call, LLM_CONCURRENCY {args.llm_concurrency}"
    )
    print(table([a, b], ["phase", "leads", "scored", "elapsed_s", "leads_per_s", "crm_calls", "llm_calls"]))
    print(f"speed-up batched/naive {speedup:.1f}x (target >= 10x: {'met' if speedup >= 10 else 'NOT met'})")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
