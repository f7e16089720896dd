"""Chaos: no lead lost or left stale when workers are SIGKILLed and Redis is killed and restarted.

`--events` (5,000) contact.propertyChange events over `--leads` (2,000) distinct contacts (every
lead at least once, several for many), each changing a scoring input (num_conversion_events,
hs_analytics_num_visits or hs_lead_status). Each delivery's changes are applied to the HubSpot
emulator just before it is posted, so the final state is known. Deliveries of `--per-delivery`
(100) events are paced over `--seconds` (30) and retried like HubSpot does (re-signed, backoff)
until they get a 200; the web answers 503 while Redis is down.

Redis runs with `--appendonly yes --appendfsync always`; `--workers` (2) `leadscore worker`
processes, each in a session of its own. During the deliveries:
- at 25% and 50% of them, a worker (a busy one when there is one) is SIGKILLed with its
  whole process tree (its group, its work horse and its scheduler) and a replacement started;
- at 70%, redis-server is SIGKILLed, and restarted `--redis-down` seconds later with the same
  command line (port, --dir, options), so it replays its AOF.
A supervisor also restarts any worker that exits on its own, and counts it.

Then, bounded by `--recovery-timeout` (240 s), it waits until the queue, the running/scheduled job
registries and the pending store are empty and every lead is fresh: leadscore_scored_at set and
the leadscore_details fingerprint equal to `workers.blend.input_fingerprint` of the lead as read
now from the emulator (checked last with `HubSpotCRM.read_leads` and `workers.jobs.scoring_config`).

RQ retries a job abandoned by a killed worker only after its heartbeat expires (job monitoring
interval 5 s + 60 s) and a worker runs maintenance: WORKER_MAINTENANCE_S is set to
`--maintenance` (5).

Target: 0 lost and 0 stale leads.

Run: /tmp/venv/bin/python bench/chaos.py [--events 5000] [--leads 2000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import requests
from harness import (
    PORTAL,
    SCORED_AT,
    Pipeline,
    add_pipeline_options,
    encode,
    event,
    machine,
    pipeline_env,
    post_until_accepted,
    save,
    table,
)
from rq import Worker

from integration.hubspot.api import HubSpotCRM, lead_from_properties
from integration.settings import get_settings
from workers.blend import input_fingerprint
from workers.jobs import scoring_config

STATUSES = ("NEW", "OPEN", "IN_PROGRESS", "ATTEMPTED_TO_CONTACT", "CONNECTED", "BAD_TIMING")


def plan(ids: list[str], total: int, rng: random.Random) -> list[str]:
    """Which lead each event is about: every lead once, the rest at random, shuffled."""
    order = list(ids) + [rng.choice(ids) for _ in range(max(0, total - len(ids)))]
    rng.shuffle(order)
    return order[:total]


class Changes:
    """Each event changes one scoring input of its lead, from the lead's current value."""

    def __init__(self, pipe: Pipeline, rng: random.Random):
        self.pipe, self.rng = pipe, rng

    def event_for(self, lead: str, now_ms: int) -> dict:
        props = self.pipe.emulator.contacts[lead]["properties"]
        name = self.rng.choice(("num_conversion_events", "hs_analytics_num_visits", "hs_lead_status"))
        if name == "hs_lead_status":
            value = self.rng.choice([s for s in STATUSES if s != props.get(name)])
        else:
            value = str(int(float(props.get(name) or 0)) + 1)
        return event(lead, "contact.propertyChange", (name, value), now_ms)


def fresh_state(pipe: Pipeline, ids: list[str], config) -> tuple[set[str], set[str]]:
    """(unscored, stale) from the emulator's own records (no API calls)."""
    unscored, stale = set(), set()
    for lead_id in ids:
        props = dict(pipe.emulator.contacts[lead_id]["properties"])
        if not props.get(SCORED_AT):
            unscored.add(lead_id)
            continue
        try:
            details = json.loads(props.get("leadscore_details") or "{}")
        except json.JSONDecodeError:
            details = {}
        if details.get("fingerprint") != input_fingerprint(
            lead_from_properties(lead_id, PORTAL, props), config, datetime.now(UTC)
        ):
            stale.add(lead_id)
    return unscored, stale


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--leads", type=int, default=2000)
    parser.add_argument("--per-delivery", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30.0, help="the deliveries are paced over this")
    parser.add_argument("--workers", type=int, default=2)
    add_pipeline_options(parser, llm_latency=0.3, hubspot_latency=0.05, llm_concurrency=32)
    parser.add_argument("--maintenance", type=int, default=5, help="WORKER_MAINTENANCE_S")
    parser.add_argument("--redis-down", type=float, default=3.0, help="seconds between kill and restart")
    parser.add_argument("--recovery-timeout", type=float, default=240)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    info = machine()
    rng = random.Random(args.seed)
    env = pipeline_env(args, WORKER_MAINTENANCE_S=str(args.maintenance))
    redis_options = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")
    with Pipeline(
        hubspot_latency=args.hubspot_latency,
        llm_latency=args.llm_latency,
        env=env,
        redis_options=redis_options,
    ) as pipe:
        config = scoring_config(get_settings())
        ids = pipe.seed_contacts(args.leads, 85_000_000_000)
        order = plan(ids, args.events, rng)
        chunks = [order[i : i + args.per_delivery] for i in range(0, len(order), args.per_delivery)]
        changes = Changes(pipe, rng)
        pipe.start_workers(args.workers)
        crm0, llm0 = pipe.emulator.api_calls(), len(pipe.llm.requests)

        faults: list[dict] = []
        unplanned_exits: list[dict] = []
        lock = threading.Lock()
        done = threading.Event()
        progress = {"sent": 0, "retries": 0, "last_accepted": 0.0}
        started = time.time()

        def deliver() -> None:
            session = requests.Session()
            for k, chunk in enumerate(chunks):
                due = started + k * args.seconds / len(chunks)
                time.sleep(max(0.0, due - time.time()))
                now_ms = int(time.time() * 1000)
                with lock:  # changes are made in HubSpot before HubSpot tells us about them
                    events = [changes.event_for(lead, now_ms) for lead in chunk]
                    pipe.emulator.apply_changes(events)
                accepted, failures = post_until_accepted(session, pipe.webhook_url, encode(events))
                progress["sent"] += 1
                progress["retries"] += failures
                progress["last_accepted"] = accepted
            done.set()

        def supervise() -> None:
            while not done.is_set() or time.time() < supervise_until[0]:
                with lock:
                    for proc in list(pipe.workers):
                        if proc.poll() is not None:
                            pipe.workers.remove(proc)
                            unplanned_exits.append(
                                {
                                    "t": round(time.time() - started, 1),
                                    "pid": proc.pid,
                                    "code": proc.returncode,
                                }
                            )
                            pipe.start_worker()
                time.sleep(0.5)

        def kill_a_worker() -> None:
            with lock:
                ours = {p.pid: p for p in pipe.workers if p.poll() is None}
                busy = {}
                with contextlib.suppress(Exception):  # else pick any worker
                    busy = {
                        w.pid: w.get_current_job_id()
                        for w in Worker.all(connection=pipe.redis)
                        if w.state == "busy"
                    }
                candidates = [pid for pid in ours if pid in busy] or list(ours)
                pid = candidates[0]
                job = busy.get(pid)
                job_name = ""
                if job:
                    try:
                        from rq.job import Job

                        job_name = Job.fetch(job, connection=pipe.redis).func_name.rsplit(".", 1)[-1]
                    except Exception:
                        job_name = "?"
                processes = pipe.kill_worker(ours[pid])
                replacement = pipe.start_worker()
            faults.append(
                {"t": round(time.time() - started, 1), "fault": "SIGKILL worker", "pid": pid,
                 "busy": pid in busy, "job": job_name, "processes_killed": processes,
                 "replacement_pid": replacement.pid}
            )  # fmt: skip

        supervise_until = [0.0]
        sender = threading.Thread(target=deliver, name="deliver", daemon=True)
        supervisor = threading.Thread(target=supervise, name="supervise", daemon=True)
        sender.start()
        supervisor.start()

        def wait_progress(fraction: float) -> None:
            target = int(fraction * len(chunks))
            deadline = time.monotonic() + 5 * args.seconds
            while progress["sent"] < target and time.monotonic() < deadline and not done.is_set():
                time.sleep(0.05)

        wait_progress(0.25)
        kill_a_worker()
        wait_progress(0.50)
        kill_a_worker()
        wait_progress(0.70)
        down_at = time.time()
        pipe.kill_redis()
        time.sleep(args.redis_down)
        pipe.restart_redis()
        faults.append(
            {"t": round(down_at - started, 1), "fault": "SIGKILL redis-server, restart", "down_s":
             round(time.time() - down_at, 1), "aof": "appendfsync always"}
        )  # fmt: skip
        last_fault = time.time()
        sender.join(timeout=10 * args.seconds + 300)
        last_delivery = progress["last_accepted"]

        consistent_at, polls = None, 0
        supervise_until[0] = time.time() + args.recovery_timeout
        deadline = time.monotonic() + args.recovery_timeout
        backlog: dict = {}
        unscored, stale = set(ids), set()
        while time.monotonic() < deadline:
            polls += 1
            try:
                backlog = pipe.backlog()
            except Exception:  # Redis reconnecting
                time.sleep(1)
                continue
            unscored, stale = fresh_state(pipe, ids, config)
            if not any(backlog.values()) and not unscored and not stale:
                consistent_at = time.time()
                break
            time.sleep(2)
        supervise_until[0] = 0.0

        # the verdict, as the product itself reads HubSpot
        leads = HubSpotCRM(get_settings(), portal_id=PORTAL).read_leads(ids)
        lost = [i for i in ids if i not in leads or not leads[i].current_output.get("scored_at")]
        stale_final = [
            i
            for i in ids
            if i in leads
            and i not in lost
            and json.loads(leads[i].current_output.get("details") or "{}").get("fingerprint")
            != input_fingerprint(leads[i], config, datetime.now(UTC))
        ]
        fallbacks = sum(
            1 for i in leads if json.loads(leads[i].current_output.get("details") or "{}").get("fallback")
        )
        backlog_end = pipe.backlog()
        failed = pipe.failed_jobs()
        crm_calls, llm_calls = pipe.emulator.api_calls() - crm0, len(pipe.llm.requests) - llm0
        worker_logs = str(pipe.logs)

    row = {
        "events": len(order),
        "leads": len(ids),
        "deliveries": len(chunks),
        "delivery_retries": progress["retries"],
        "kills": sum(f["fault"] == "SIGKILL worker" for f in faults),
        "redis_restarts": sum(f["fault"].startswith("SIGKILL redis") for f in faults),
        "unplanned_worker_exits": len(unplanned_exits),
        "lost": len(lost),
        "stale": len(stale_final),
        "fallback_scores": fallbacks,
        "failed_jobs": failed,
        "recovery_s": round(consistent_at - last_delivery, 1) if consistent_at else None,
        "since_last_fault_s": round(consistent_at - last_fault, 1) if consistent_at else None,
    }
    met = row["lost"] == 0 and row["stale"] == 0
    results = {
        "chaos": row,
        "faults": faults,
        "unplanned_worker_exits": unplanned_exits,
        "deliveries_done_at_s": round(last_delivery - started, 1),
        "backlog_at_end": backlog_end,
        "unscored_at_deadline": sorted(unscored)[:20],
        "stale_at_deadline": sorted(stale)[:20],
        "crm_calls": crm_calls,
        "llm_calls": llm_calls,
        "logs": worker_logs,
        "target_met": met,
    }
    path = save("chaos", args, results, args.out, info)
    print(
        f"chaos: {len(order)} events over {len(ids)} leads in {len(chunks)} deliveries paced over "
        f"{args.seconds:g}s, {args.workers} workers, redis AOF appendfsync always, WORKER_MAINTENANCE_S "
        f"{args.maintenance}, LLM {args.llm_latency}s (LLM_CONCURRENCY {args.llm_concurrency})"
    )
    for fault in faults:
        print("  " + ", ".join(f"{k}={v}" for k, v in fault.items()))
    for exit_ in unplanned_exits:
        print(f"  unplanned worker exit: {exit_}")
    columns = ["events", "leads", "delivery_retries", "kills", "redis_restarts", "unplanned_worker_exits",
               "lost", "stale", "failed_jobs", "recovery_s", "since_last_fault_s"]  # fmt: skip
    print(table([row], columns))
    print(
        f"recovery_s: last delivery accepted -> queue and pending empty and every lead fresh "
        f"(bound {args.recovery_timeout:g}s); target 0 lost, 0 stale: {'met' if met else 'NOT met'}"
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
