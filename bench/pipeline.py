"""Benchmark of the HubSpot pipeline as deployed: gunicorn web + RQ workers + real Redis.

Two measurements, printed as a table and written to bench/results/pipeline.json:

- ingest: signed 100-event deliveries posted at a fixed concurrency for a fixed time
  (no workers running): deliveries/s, events/s, p50/p99 latency per delivery;
- freshness: N new contacts delivered in batches of 10 at a steady rate to W workers,
  LLM stub answering after a fixed latency: time from webhook accepted to the
  leadscore fields written in the HubSpot emulator (p50/p95), and leads scored per second.

Run: .venv/bin/python bench/pipeline.py [--seconds 10] [--leads 200] [--rate 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import requests

from integration.emulators import free_port, serve_in_thread, spawn_logged, start_redis, wait_until
from integration.emulators.hubspot import HubSpotEmulator
from integration.emulators.llm import LLMStub
from integration.hubspot.api import HubSpotCRM
from integration.replay import hubspot_headers
from integration.settings import get_settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
SECRET, TOKEN, LLM_KEY, APP_ID, PORTAL = "bench-secret", "bench-token", "bench-llm", "3307201", "48213377"
_event_ids = itertools.count(5_000_000_000)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def delivery(contact_ids: list[int], kind: str = "contact.propertyChange") -> bytes:
    now = int(time.time() * 1000)
    events = []
    for contact_id in contact_ids:
        event = {
            "eventId": next(_event_ids), "subscriptionId": 2438902, "portalId": int(PORTAL),
            "appId": int(APP_ID), "occurredAt": now, "subscriptionType": kind, "attemptNumber": 0,
            "objectId": contact_id, "changeSource": "CRM_UI", "sourceId": "userId:71234567",
        }  # fmt: skip
        if kind.endswith("propertyChange"):
            event.update(propertyName="hs_lead_status", propertyValue="CONNECTED")
        events.append(event)
    return json.dumps(events, separators=(",", ":")).encode()


def post(session: requests.Session, url: str, body: bytes) -> float:
    started = time.perf_counter()
    response = session.post(url, data=body, headers=hubspot_headers(url, body, SECRET), timeout=30)
    response.raise_for_status()
    return time.perf_counter() - started


def bench_ingest(url: str, seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    def client(worker: int) -> None:
        session = requests.Session()
        ids = [90_000_000_000 + worker * 1_000_000 + i for i in range(1_000_000)]
        offset = 0
        while time.monotonic() < deadline:
            latencies.append(post(session, url, delivery(ids[offset : offset + 100])))
            offset += 100

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "deliveries": len(latencies),
        "deliveries_per_s": round(len(latencies) / elapsed, 1),
        "events_per_s": round(100 * len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
    }


def seed_contacts(emulator: HubSpotEmulator, count: int) -> list[int]:
    templates = [json.loads(p.read_text()) for p in sorted((FIXTURES / "hubspot").glob("contact__*.json"))]
    ids = []
    for n in range(count):
        record = copy.deepcopy(templates[n % len(templates)])
        record["id"] = record["properties"]["hs_object_id"] = str(80_000_000_000 + n)
        record.pop("associations", None)
        emulator.add_contact(record)
        ids.append(int(record["id"]))
    return ids


def bench_freshness(url: str, emulator: HubSpotEmulator, leads: int, rate: float) -> dict:
    ids = seed_contacts(emulator, leads)
    accepted: dict[str, float] = {}
    session = requests.Session()
    started = time.time()
    for offset in range(0, leads, 10):
        batch = ids[offset : offset + 10]
        post(session, url, delivery(batch, "contact.creation"))
        now = time.time()
        accepted.update({str(i): now for i in batch})
        time.sleep(max(0.0, started + (offset + 10) / rate - time.time()))
    deadline = time.time() + 300
    pending = set(accepted)
    while pending and time.time() < deadline:
        pending = {i for i in pending if not emulator.contacts[i]["properties"].get("leadscore_scored_at")}
        time.sleep(0.05)
    written = {
        i: datetime.fromisoformat(emulator.contacts[i]["properties"]["leadscore_scored_at"]).timestamp()
        for i in accepted
        if i not in pending
    }
    delays = [written[i] - accepted[i] for i in written]
    return {
        "leads": leads,
        "offered_leads_per_s": rate,
        "scored": len(written),
        "lost": len(pending),
        "leads_per_s": round(len(written) / (max(written.values()) - started), 1),
        "p50_s": round(percentile(delays, 50), 2),
        "p95_s": round(percentile(delays, 95), 2),
        "max_s": round(max(delays), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="ingest duration")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--leads", type=int, default=200)
    parser.add_argument("--rate", type=float, default=4.0, help="new leads offered per second")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--llm-latency", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = parser.parse_args()

    with ExitStack() as stack:
        emulator = HubSpotEmulator(token=TOKEN).load_fixtures(FIXTURES / "hubspot")
        stub = LLMStub(FIXTURES / "llm", api_key=LLM_KEY, latency_s=args.llm_latency)
        hubspot_server, llm_server = serve_in_thread(emulator.app()), serve_in_thread(stub.app())
        stack.callback(hubspot_server.stop)
        stack.callback(llm_server.stop)
        env = {
            **os.environ,
            "REDIS_URL": start_redis(stack),
            "HUBSPOT_ACCESS_TOKEN": TOKEN, "HUBSPOT_APP_SECRET": SECRET, "HUBSPOT_APP_ID": APP_ID,
            "HUBSPOT_API_BASE": hubspot_server.url, "LLM_BASE_URL": f"{llm_server.url}/v1",
            "LLM_API_KEY": LLM_KEY, "LOG_LEVEL": "WARNING",
        }  # fmt: skip
        os.environ.update(env)
        get_settings.cache_clear()
        HubSpotCRM(get_settings(), portal_id=PORTAL).ensure_properties()
        logs = Path(tempfile.mkdtemp(prefix="leadscore-bench-"))
        port = free_port()
        web = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2",
               "integration.app:create_app()"]  # fmt: skip
        spawn_logged(stack, web, env, logs / "web.log")
        url = f"http://127.0.0.1:{port}/webhooks/hubspot"
        wait_until(lambda: _healthy(port), 30, "web")

        ingest = bench_ingest(url, args.seconds, args.concurrency)
        from redis import Redis

        Redis.from_url(env["REDIS_URL"]).flushdb()
        for n in range(args.workers):
            cmd = [sys.executable, "-m", "integration.cli", "worker"]
            spawn_logged(stack, cmd, env, logs / f"worker{n}.log")
        time.sleep(1.0)
        freshness = bench_freshness(url, emulator, args.leads, args.rate)

    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "args": {k: str(v) for k, v in vars(args).items()},
        "ingest": ingest,
        "freshness": freshness,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    clients = f"{args.concurrency} concurrent clients"
    print(f"ingest ({clients}, 100-event deliveries, {args.seconds:.0f}s, no workers)")
    print(table(ingest, ["deliveries_per_s", "events_per_s", "p50_ms", "p99_ms"]))
    load = f"{args.leads} new leads offered at {args.rate}/s"
    print(f"freshness ({load}, {args.workers} workers, LLM stub {args.llm_latency}s)")
    print(table(freshness, ["scored", "lost", "leads_per_s", "p50_s", "p95_s", "max_s"]))
    print(f"results: {args.out}")
    return 0


def table(row: dict, columns: list[str]) -> str:
    widths = [max(len(c), len(str(row[c]))) + 2 for c in columns]
    head = "".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))
    return head + "\n" + "".join(str(row[c]).rjust(w) for c, w in zip(columns, widths, strict=True))


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
