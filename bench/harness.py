"""Shared harness for the benchmarks: the pipeline as deployed, on loopback, with real parts.

`Pipeline` starts, all configured through environment variables only:

- a private redis-server (`integration.emulators.start_redis`), which it can SIGKILL and restart
  on the same port and directory;
- the HubSpot emulator and the LLM stub, in threads of this process;
- the web app as the Procfile runs it (gunicorn `integration.app:create_app()`, 2 workers,
  bound to 127.0.0.1 on a free port);
- RQ workers, `python -m integration.cli worker`, each in its own session so a benchmark can
  SIGKILL a worker's whole process tree (RQ puts each work horse in a process group of its own).

Plus helpers: synthetic contacts cloned from the fixtures, signed HubSpot deliveries, waiting for
leads to be scored, the queue's backlog, percentiles, tables and the JSON result files.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from datetime import UTC, datetime
from pathlib import Path

import requests
from redis import Redis
from rq import Queue, Worker

from integration import pending
from integration.emulators import (
    free_port,
    serve_in_thread,
    spawn_logged,
    start_redis,
    stop_process,
    wait_until,
)
from integration.emulators.hubspot import HubSpotEmulator
from integration.emulators.llm import LLMStub
from integration.hubspot.api import HubSpotCRM
from integration.replay import hubspot_headers
from integration.settings import get_settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
RESULTS = ROOT / "bench" / "results"
SECRET, TOKEN, LLM_KEY, APP_ID, PORTAL = "bench-secret", "bench-token", "bench-llm", "3307201", "48213377"
QUEUE_NAME = "leadscore"
SCORED_AT = "leadscore_scored_at"
_event_ids = itertools.count(5_000_000_000)
_TEMPLATES: list[dict] = []


# ---- numbers and output


def add_pipeline_options(
    parser,
    *,
    llm_latency: float,
    hubspot_latency: float,
    llm_concurrency: int,
    calls_per_10s: int | None = None,
) -> None:
    """The knobs the pipeline benchmarks share; `pipeline_env` turns them into the workers' settings."""
    parser.add_argument("--llm-latency", type=float, default=llm_latency, help="seconds the LLM stub takes")
    parser.add_argument(
        "--hubspot-latency", type=float, default=hubspot_latency, help="added to every CRM call"
    )
    parser.add_argument(
        "--llm-concurrency", type=int, default=llm_concurrency, help="LLM_CONCURRENCY (product max 200)"
    )
    parser.add_argument("--linger", type=float, default=1.0, help="BATCH_LINGER_S")
    if calls_per_10s is not None:
        parser.add_argument("--calls-per-10s", type=int, default=calls_per_10s, help="HUBSPOT_CALLS_PER_10S")


def pipeline_env(args, **extra: str) -> dict[str, str]:
    env = {"LLM_CONCURRENCY": str(args.llm_concurrency), "BATCH_LINGER_S": str(args.linger), **extra}
    if getattr(args, "calls_per_10s", None) is not None:
        env["HUBSPOT_CALLS_PER_10S"] = str(args.calls_per_10s)
    return env


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    redis_version = subprocess.run(
        [shutil.which("redis-server") or "redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()
    return {
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "os": platform.platform(),
        "redis": next((w.split("=", 1)[1] for w in redis_version if w.startswith("v=")), "?"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) + 2 for c in columns]
    lines = ["".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    for row in rows:
        lines.append("".join(str(row.get(c, "")).rjust(w) for c, w in zip(columns, widths, strict=True)))
    return "\n".join(lines)


def save(name: str, args, results: dict, out: Path | None = None, started: dict | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "benchmark": name,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": started or machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


# ---- HubSpot deliveries


def event(contact_id: int | str, kind: str, prop: tuple[str, str] | None = None, now_ms: int = 0) -> dict:
    """One HubSpot webhook event with a fresh eventId, as a rep's change (not the integration's)."""
    body = {
        "eventId": next(_event_ids), "subscriptionId": 2438902, "portalId": int(PORTAL),
        "appId": int(APP_ID), "occurredAt": now_ms or int(time.time() * 1000), "subscriptionType": kind,
        "attemptNumber": 0, "objectId": int(contact_id), "changeSource": "CRM_UI",
        "sourceId": "userId:71234567",
    }  # fmt: skip
    if kind.endswith("propertyChange"):
        name, value = prop or ("hs_lead_status", "CONNECTED")
        body.update(propertyName=name, propertyValue=value)
    return body


def events_for(contact_ids, kind: str = "contact.propertyChange") -> list[dict]:
    now = int(time.time() * 1000)
    return [event(i, kind, now_ms=now) for i in contact_ids]


def encode(events: list[dict]) -> bytes:
    return json.dumps(events, separators=(",", ":")).encode()


def post(session: requests.Session, url: str, body: bytes, timeout: float = 30) -> tuple[int, float]:
    """Sign (v3, fresh timestamp) and post one delivery: (status, seconds)."""
    started = time.perf_counter()
    response = session.post(url, data=body, headers=hubspot_headers(url, body, SECRET), timeout=timeout)
    return response.status_code, time.perf_counter() - started


def post_until_accepted(
    session: requests.Session, url: str, body: bytes, give_up_s: float = 120
) -> tuple[float, int]:
    """Post like HubSpot does: on a 5xx, 429 or connection error, re-sign and retry with backoff.

    Returns (the wall-clock time the 200 came back, how many attempts failed)."""
    deadline, backoff, failures = time.monotonic() + give_up_s, 0.25, 0
    while True:
        try:
            status, _ = post(session, url, body, timeout=10)
            if 200 <= status < 300:
                return time.time(), failures
            if status < 500 and status != 429:
                raise RuntimeError(f"delivery refused with {status}")
        except requests.RequestException:
            pass
        failures += 1
        if time.monotonic() + backoff > deadline:
            raise RuntimeError(f"delivery still not accepted after {give_up_s:.0f}s")
        time.sleep(backoff)
        backoff = min(backoff * 2, 4.0)


# ---- processes


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (RQ's work horses sit in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_tree(proc: subprocess.Popen, sig: int) -> int:
    """Send `sig` to a process started in its own session, its group and all its descendants."""
    pids = descendants(proc.pid)
    hit = 0
    for target in (proc.pid, *pids):
        try:
            os.kill(target, sig)
            hit += 1
        except ProcessLookupError:
            pass
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    return hit


def stop_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is None:
        signal_tree(proc, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    signal_tree(proc, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=5)


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


class Pipeline:
    """Redis + emulators + gunicorn web (+ workers on demand), torn down on exit."""

    def __init__(
        self,
        *,
        hubspot_latency: float = 0.0,
        llm_latency: float = 0.0,
        redis_options: tuple[str, ...] = ("--save", ""),
        env: dict[str, str] | None = None,
        web_workers: int = 2,
        access_log: bool = True,
        echo: bool = False,
    ):
        self.hubspot_latency, self.llm_latency = hubspot_latency, llm_latency
        self.redis_options, self.extra_env = redis_options, env or {}
        self.web_workers, self.access_log, self.echo = web_workers, access_log, echo
        self.stack = ExitStack()
        self.workers: list[subprocess.Popen] = []
        self._worker_serial = itertools.count()
        self.logs = Path(tempfile.mkdtemp(prefix="leadscore-bench-"))

    # -- start and stop

    def __enter__(self) -> Pipeline:
        try:
            self._start()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def _start(self) -> None:
        stack = self.stack
        self.emulator = HubSpotEmulator(token=TOKEN, latency_s=self.hubspot_latency)
        self.emulator.load_fixtures(FIXTURES / "hubspot")
        self.llm = LLMStub(FIXTURES / "llm", api_key=LLM_KEY, latency_s=self.llm_latency)
        hubspot_server, llm_server = serve_in_thread(self.emulator.app()), serve_in_thread(self.llm.app())
        stack.callback(hubspot_server.stop)
        stack.callback(llm_server.stop)
        self.redis_url = start_redis(stack, *self.redis_options)
        self.redis = Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=10)
        info = self.redis.info("server")
        self.redis_pid, self.redis_port = int(info["process_id"]), int(info["tcp_port"])
        self.redis_dir = self.redis.config_get("dir")["dir"]
        store_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="leadscore-bench-store-"))
        self.env = {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": f"sqlite:///{store_dir}/store.sqlite3",  # the workers keep every score here
            "QUEUE_NAME": QUEUE_NAME,
            "HUBSPOT_ACCESS_TOKEN": TOKEN,
            "HUBSPOT_APP_SECRET": SECRET,
            "HUBSPOT_APP_ID": APP_ID,
            "HUBSPOT_API_BASE": hubspot_server.url,
            "LLM_BASE_URL": f"{llm_server.url}/v1",
            "LLM_API_KEY": LLM_KEY,
            "LOG_LEVEL": "WARNING",
            "FALLBACK_RESCORE_S": "0",
            "BENCH_BARE_ENDPOINT": "1",
            **self.extra_env,
        }
        os.environ.update(self.env)
        get_settings.cache_clear()
        HubSpotCRM(get_settings(), portal_id=PORTAL).ensure_properties()
        self.port = free_port()
        web = [
            sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}",
            "--workers", str(self.web_workers),
            *(["--access-logfile", "-"] if self.access_log else []),
            "integration.app:create_app()",
        ]  # fmt: skip
        self.web = spawn_logged(stack, web, self.env, self.logs / "web.log")
        wait_until(lambda: _healthy(self.port), 30, "web")
        self.webhook_url = self.url("/webhooks/hubspot")
        if self.echo:
            self.emulator.echo_writes_to(self.webhook_url, SECRET, APP_ID, PORTAL)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start_worker(self) -> subprocess.Popen:
        """`leadscore worker` (as the Procfile), in a session of its own."""
        n = next(self._worker_serial)
        log = (self.logs / f"worker{n}.log").open("w")
        self.stack.callback(log.close)
        proc = subprocess.Popen(
            [sys.executable, "-m", "integration.cli", "worker"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.stack.callback(stop_tree, proc)
        self.workers.append(proc)
        return proc

    def start_workers(self, n: int, timeout_s: float = 30) -> list[subprocess.Popen]:
        procs = [self.start_worker() for _ in range(n)]
        self.wait_workers_registered(timeout_s)
        return procs

    def wait_workers_registered(self, timeout_s: float = 30) -> None:
        alive = {p.pid for p in self.workers if p.poll() is None}
        wait_until(
            lambda: alive <= {w.pid for w in Worker.all(connection=self.redis)}, timeout_s, "RQ workers"
        )

    def stop_workers(self) -> None:
        for proc in self.workers:
            stop_tree(proc)
        self.workers = []

    def kill_worker(self, proc: subprocess.Popen) -> int:
        """SIGKILL a worker: its process group, its work horse and its scheduler."""
        hit = signal_tree(proc, signal.SIGKILL)
        proc.wait(timeout=10)
        self.workers.remove(proc)
        return hit

    def kill_redis(self) -> None:
        os.kill(self.redis_pid, signal.SIGKILL)
        wait_until(lambda: not _reachable(self.redis_url), 10, "redis-server to die")

    def restart_redis(self) -> None:
        """The same redis-server command line: same port, same --dir, so the AOF is replayed."""
        proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--dir", self.redis_dir, *self.redis_options],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.stack.callback(stop_process, proc)
        wait_until(lambda: _reachable(self.redis_url), 30, "redis-server restart")
        self.redis_pid = proc.pid

    # -- data

    def seed_contacts(self, count: int, first_id: int) -> list[str]:
        """`count` new contacts cloned from the fixtures, with new ids and no associations."""
        if not _TEMPLATES:
            paths = sorted((FIXTURES / "hubspot").glob("contact__*.json"))
            _TEMPLATES.extend(json.loads(p.read_text()) for p in paths)
        ids = []
        for n in range(count):
            record = copy.deepcopy(_TEMPLATES[n % len(_TEMPLATES)])
            record["id"] = record["properties"]["hs_object_id"] = str(first_id + n)
            record.pop("associations", None)
            self.emulator.add_contact(record)
            ids.append(record["id"])
        return ids

    def scored_at(self, contact_id: str) -> float | None:
        value = self.emulator.contacts[contact_id]["properties"].get(SCORED_AT)
        return datetime.fromisoformat(value).timestamp() if value else None

    def wait_scored(self, ids: list[str], timeout_s: float, poll_s: float = 0.1) -> set[str]:
        """Wait (bounded) until every id has leadscore_scored_at; returns those still unscored."""
        deadline = time.monotonic() + timeout_s
        todo = set(ids)
        while todo and time.monotonic() < deadline:
            props = self.emulator.contacts
            todo = {i for i in todo if not props[i]["properties"].get(SCORED_AT)}
            if todo:
                time.sleep(poll_s)
        return todo

    # -- queue state and metrics

    def backlog(self) -> dict[str, int]:
        """What is still to do: queued, running, scheduled (retries) jobs, and pending leads plus
        events not yet drained from the intakes."""
        queue = Queue(QUEUE_NAME, connection=self.redis)
        return {
            "queued": queue.count,
            "started": queue.started_job_registry.get_job_count(cleanup=False),
            "scheduled": queue.scheduled_job_registry.get_job_count(cleanup=False),
            "pending": pending.depth(self.redis),
        }

    def failed_jobs(self) -> int:
        queue = Queue(QUEUE_NAME, connection=self.redis)
        return queue.failed_job_registry.get_job_count(cleanup=False)

    def wait_idle(self, timeout_s: float, settle_s: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not any(self.backlog().values()):
                time.sleep(settle_s)
                if not any(self.backlog().values()):
                    return True
            time.sleep(0.1)
        return False

    def metrics(self) -> dict[str, float]:
        """`GET /metrics` as {'name{labels}': value}."""
        text = requests.get(self.url("/metrics"), timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


def _reachable(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1).ping())
    except Exception:
        return False


def metric_sum(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a metric's series whose labels include `labels`."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != f"leadscore_{name}":
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (from /proc; gone ones count 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks
