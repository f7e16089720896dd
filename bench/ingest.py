"""Ingest: how many webhook events per second the web tier accepts, next to a bare endpoint.

Signed 100-event HubSpot deliveries (contact.propertyChange for distinct contacts, unique
eventIds) are posted by `--concurrency` client threads, each with its own http.client connection,
for `--seconds`, first to /webhooks/hubspot (verify, validate, normalise, queue on the account's
intake in Redis, kick), then with the same bodies and headers to /_bench/bare on the same gunicorn
(reads the body, answers 204). No workers run. Reported per endpoint: deliveries/s, events/s,
p50/p99 per delivery, and CPU seconds used by the client (this process), gunicorn and
redis-server; then webhook/bare.

Targets: webhook throughput >= 50% of bare; webhook p99 < 100 ms.

Run: .venv/bin/python bench/ingest.py [--seconds 10] [--concurrency 10]
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from harness import (
    APP_ID,
    PORTAL,
    SECRET,
    Pipeline,
    cpu_seconds,
    descendants,
    machine,
    percentile,
    save,
    table,
)

from integration.replay import hubspot_headers

EVENTS_PER_DELIVERY = 100


_EVENT = (
    '{"eventId":%d,"subscriptionId":2438902,"portalId":' + PORTAL + ',"appId":' + APP_ID + ","
    '"occurredAt":%d,"subscriptionType":"contact.propertyChange","attemptNumber":0,"objectId":%d,'
    '"changeSource":"CRM_UI","sourceId":"userId:71234567","propertyName":"hs_lead_status",'
    '"propertyValue":"CONNECTED"}'
)


def body(client: int, n: int, now_ms: int) -> bytes:
    """Delivery n of a client: 100 property changes of distinct contacts, unique eventIds.

    Rendered from a template (the same JSON `json.dumps` gives) to keep the client's CPU low."""
    first = 90_000_000_000 + client * 100_000_000 + n * EVENTS_PER_DELIVERY
    return (
        "[" + ",".join(_EVENT % (first + j, now_ms, first + j) for j in range(EVENTS_PER_DELIVERY)) + "]"
    ).encode()


def run_loop(pipe: Pipeline, path: str, expect: int, seconds: float, concurrency: int) -> dict:
    signed_url = pipe.webhook_url
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    server_pids = [pipe.web.pid, *descendants(pipe.web.pid)]
    cpu_before = (time.process_time(), cpu_seconds(server_pids), cpu_seconds([pipe.redis_pid]))
    deadline = time.monotonic() + seconds

    def client(worker: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", pipe.port, timeout=30)
        n = 0
        while time.monotonic() < deadline:
            data = body(worker, n, int(time.time() * 1000))
            headers = hubspot_headers(signed_url, data, SECRET)  # the same headers for both endpoints
            started = time.perf_counter()
            try:
                connection.request("POST", path, body=data, headers=headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                status = -1
            elapsed = time.perf_counter() - started
            with lock:
                (latencies if status == expect else errors).append(elapsed if status == expect else status)
            n += 1

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.monotonic() - started
    client_cpu = time.process_time() - cpu_before[0]
    web_cpu = cpu_seconds(server_pids) - cpu_before[1]
    redis_cpu = cpu_seconds([pipe.redis_pid]) - cpu_before[2]
    return {
        "endpoint": path,
        "deliveries": len(latencies),
        "errors": len(errors),
        "deliveries_per_s": round(len(latencies) / wall, 1),
        "events_per_s": round(EVENTS_PER_DELIVERY * len(latencies) / wall, 1),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "client_cpu_pct": round(100 * client_cpu / wall, 1),
        "web_cpu_pct": round(100 * web_cpu / wall, 1),
        "redis_cpu_pct": round(100 * redis_cpu / wall, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each loop")
    parser.add_argument("--concurrency", type=int, default=10, help="client threads")
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn --workers")
    parser.add_argument("--no-access-log", action="store_true", help="drop the Procfile's --access-logfile -")
    parser.add_argument("--out", type=lambda p: __import__("pathlib").Path(p), default=None)
    args = parser.parse_args()

    info = machine()
    with Pipeline(web_workers=args.web_workers, access_log=not args.no_access_log) as pipe:
        webhook = run_loop(pipe, "/webhooks/hubspot", 200, args.seconds, args.concurrency)
        bare = run_loop(pipe, "/_bench/bare", 204, args.seconds, args.concurrency)
        backlog = pipe.backlog()
    ratio = webhook["events_per_s"] / bare["events_per_s"] if bare["events_per_s"] else float("nan")
    results = {
        "webhook": webhook,
        "bare": bare,
        "webhook_over_bare": round(ratio, 3),
        "events_queued_after": backlog["pending"],
        "targets": {
            "throughput_ratio_ge_0.5": ratio >= 0.5,
            "webhook_p99_lt_100ms": webhook["p99_ms"] < 100,
        },
    }
    path = save("ingest", args, results, args.out, info)
    print(
        f"ingest: signed {EVENTS_PER_DELIVERY}-event deliveries, {args.concurrency} clients, "
        f"{args.seconds:.0f}s per endpoint, gunicorn --workers {args.web_workers}, no RQ workers"
    )
    columns = ["endpoint", "deliveries", "errors", "deliveries_per_s", "events_per_s", "p50_ms", "p99_ms",
               "client_cpu_pct", "web_cpu_pct", "redis_cpu_pct"]  # fmt: skip
    print(table([webhook, bare], columns))
    print(
        f"webhook/bare throughput {ratio:.2f} (target >= 0.50: {'met' if ratio >= 0.5 else 'NOT met'}); "
        f"webhook p99 {webhook['p99_ms']} ms (target < 100 ms: "
        f"{'met' if webhook['p99_ms'] < 100 else 'NOT met'}); events queued {backlog['pending']}"
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
