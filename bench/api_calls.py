"""API calls: CRM calls per scored lead in a burst, and what a redelivery of unchanged leads costs.

1. burst: `--leads` (1,000) new contacts delivered as signed contact.creation deliveries of 100
   events; wait until every one has leadscore_scored_at and the queue is idle.
   CRM calls per scored lead = HubSpot emulator `api_calls()` delta / leads (setup excluded).
2. redelivery: the same leads delivered again as contact.propertyChange events with NEW eventIds
   but no change to the contacts; wait until the workers have looked at all of them
   (`leadscore_leads_skipped_unchanged_total` on /metrics) and the queue is idle.
   LLM calls per redelivered lead = LLM stub request delta / leads; contacts written (the
   emulator's write log, one entry per contact updated).

The emulator echoes leadscore's writes back as signed INTEGRATION property changes, as HubSpot
does (`--no-echo` turns that off); those must enqueue nothing.

Targets: <= 0.05 CRM calls per scored lead; 0 LLM calls and 0 CRM writes for unchanged leads.

Run: /tmp/venv/bin/python bench/api_calls.py [--leads 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import requests
from harness import (
    Pipeline,
    add_pipeline_options,
    encode,
    events_for,
    machine,
    metric_sum,
    pipeline_env,
    post,
    save,
    table,
)

PER_DELIVERY = 100


def deliver(pipe: Pipeline, ids: list[str], kind: str) -> int:
    session, refused = requests.Session(), 0
    for start in range(0, len(ids), PER_DELIVERY):
        status, _ = post(
            session, pipe.webhook_url, encode(events_for(ids[start : start + PER_DELIVERY], kind))
        )
        refused += status != 200
    return refused


def counters(pipe: Pipeline) -> dict:
    return {
        "crm_calls": pipe.emulator.api_calls(),
        "contacts_written": len(pipe.emulator.writes),
        "llm_calls": len(pipe.llm.requests),
        "echo_deliveries": len(pipe.emulator.echo_responses),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--leads", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    add_pipeline_options(parser, llm_latency=0.05, hubspot_latency=0.0, llm_concurrency=8)
    parser.add_argument("--no-echo", action="store_true", help="do not echo writes back as webhooks")
    parser.add_argument("--timeout", type=float, default=120, help="bound on each phase")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    info = machine()
    env = pipeline_env(args)
    with Pipeline(
        hubspot_latency=args.hubspot_latency, llm_latency=args.llm_latency, env=env, echo=not args.no_echo
    ) as pipe:
        ids = pipe.seed_contacts(args.leads, 83_000_000_000)
        pipe.start_workers(args.workers)

        before = counters(pipe)
        started = time.monotonic()
        refused = deliver(pipe, ids, "contact.creation")
        unscored = pipe.wait_scored(ids, args.timeout)
        pipe.wait_idle(args.timeout)
        # the echoes of those writes come back to the webhook in threads: let them land
        deadline = time.monotonic() + 30
        while not args.no_echo and time.monotonic() < deadline:
            if len(pipe.emulator.echo_responses) >= len(pipe.emulator.writes):
                break
            time.sleep(0.2)
        pipe.wait_idle(args.timeout)
        after = counters(pipe)
        scored = args.leads - len(unscored)
        echo_queued = sum(r.get("queued", 0) for r in pipe.emulator.echo_responses)
        burst = {
            "phase": "burst (creation)",
            "leads": args.leads,
            "refused_deliveries": refused,
            "scored": scored,
            "seconds": round(time.monotonic() - started, 1),
            "crm_calls": after["crm_calls"] - before["crm_calls"],
            "crm_calls_per_lead": round((after["crm_calls"] - before["crm_calls"]) / max(scored, 1), 4),
            "contacts_written": after["contacts_written"] - before["contacts_written"],
            "llm_calls": after["llm_calls"] - before["llm_calls"],
            "llm_calls_per_lead": round((after["llm_calls"] - before["llm_calls"]) / max(scored, 1), 3),
            "echo_deliveries": after["echo_deliveries"] - before["echo_deliveries"],
            "echo_events_queued": echo_queued,
        }

        skipped0 = metric_sum(pipe.metrics(), "leads_skipped_unchanged_total")
        before = counters(pipe)
        started = time.monotonic()
        refused = deliver(pipe, ids, "contact.propertyChange")
        deadline = time.monotonic() + args.timeout
        skipped = 0.0
        while time.monotonic() < deadline:
            skipped = metric_sum(pipe.metrics(), "leads_skipped_unchanged_total") - skipped0
            if skipped >= args.leads:
                break
            time.sleep(0.2)
        pipe.wait_idle(args.timeout)
        after = counters(pipe)
        redelivery = {
            "phase": "redelivery (unchanged)",
            "leads": args.leads,
            "refused_deliveries": refused,
            "skipped_unchanged": int(skipped),
            "seconds": round(time.monotonic() - started, 1),
            "crm_calls": after["crm_calls"] - before["crm_calls"],
            "crm_calls_per_lead": round((after["crm_calls"] - before["crm_calls"]) / args.leads, 4),
            "contacts_written": after["contacts_written"] - before["contacts_written"],
            "llm_calls": after["llm_calls"] - before["llm_calls"],
            "llm_calls_per_lead": round((after["llm_calls"] - before["llm_calls"]) / args.leads, 3),
            "echo_deliveries": after["echo_deliveries"] - before["echo_deliveries"],
        }
        failed = pipe.failed_jobs()

    targets = {
        "burst_crm_calls_per_lead_le_0.05": burst["crm_calls_per_lead"] <= 0.05
        and burst["scored"] == args.leads,
        "redelivery_llm_calls_eq_0": redelivery["llm_calls"] == 0,
        "redelivery_contacts_written_eq_0": redelivery["contacts_written"] == 0,
    }
    results = {"burst": burst, "redelivery": redelivery, "failed_jobs": failed, "targets": targets}
    path = save("api_calls", args, results, args.out, info)
    print(
        f"api_calls: {args.leads} leads in deliveries of {PER_DELIVERY}, {args.workers} workers, "
        f"echo of writes {'off' if args.no_echo else 'on'}"
    )
    columns = ["phase", "leads", "scored", "skipped_unchanged", "crm_calls", "crm_calls_per_lead",
               "contacts_written", "llm_calls", "llm_calls_per_lead", "echo_deliveries"]  # fmt: skip
    print(table([burst, redelivery], columns))
    print(f"echoes of the burst's writes queued {burst['echo_events_queued']} events; failed jobs {failed}")
    for name, ok in targets.items():
        print(f"  {name}: {'met' if ok else 'NOT met'}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
