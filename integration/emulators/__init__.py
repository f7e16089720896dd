"""Local stand-ins for HubSpot and an OpenAI-compatible LLM, for tests and `make demo`.

They speak the same HTTP as the real services, so the real `hubspot-api-client`
and `openai` clients talk to them unchanged.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from flask import Flask
from redis import Redis
from redis.exceptions import RedisError
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"  # the emulators' records, and deliveries


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:
        """Emulators serve thousands of calls in tests and benchmarks; no access log."""


@dataclass
class RunningServer:
    server: BaseWSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)


def serve_in_thread(app: Flask, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    server = make_server(host, port, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"serve-{app.name}", daemon=True
    )
    thread.start()
    return RunningServer(server, thread)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(ready, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} was not ready within {timeout_s:.0f}s")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spawn_logged(stack: ExitStack, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start a process writing to `log`; it is stopped when `stack` closes."""
    handle = log.open("w")
    stack.callback(handle.close)
    proc = subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT)
    stack.callback(stop_process, proc)
    return proc


def redis_reachable(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except (RedisError, ValueError):
        return False


def start_redis(stack: ExitStack, *options: str, port: int | None = None) -> str:
    """A private redis-server on a free loopback port (or `port`), stopped and removed when `stack`
    closes."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: `make test` and `make demo` install it")
    port, workdir = port or free_port(), tempfile.mkdtemp(prefix="leadscore-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, *options],
        stdout=subprocess.DEVNULL,
    )
    stack.callback(shutil.rmtree, workdir, True)
    stack.callback(stop_process, proc)
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: redis_reachable(url), 10, "redis-server")
    return url


def start_postgres(stack: ExitStack) -> str:
    """A private PostgreSQL server on a free loopback port (trust auth, no fsync), stopped and removed
    when `stack` closes; returns the URL of its `postgres` database. As root, it runs as the
    `postgres` user, since the server refuses to run as root."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `make test` installs it")
    bindir = found[-1].parent
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    workdir = Path(tempfile.mkdtemp(prefix="leadscore-postgres-"))
    stack.callback(shutil.rmtree, workdir, True)
    if as_user:
        shutil.chown(workdir, "postgres")
    data, port = workdir / "data", free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}
    subprocess.run([*as_user, bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres"], **quiet)
    subprocess.run(
        [*as_user, bindir / "pg_ctl", "-D", data, "-l", workdir / "server.log", "-w", "start", "-o",
         f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -F"], **quiet,
    )  # fmt: skip
    stack.callback(subprocess.run, [*as_user, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"


def start_pgbouncer(stack: ExitStack, postgres_url: str) -> str:
    """PgBouncer in transaction mode in front of a `start_postgres` server, on a free loopback port,
    stopped when `stack` closes; returns the URL of the same database through it. It refuses to run as
    root, so as root it runs as the `postgres` user."""
    from sqlalchemy import make_url

    server = make_url(postgres_url)
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    workdir = Path(tempfile.mkdtemp(prefix="leadscore-pgbouncer-"))
    stack.callback(shutil.rmtree, workdir, True)
    port = free_port()
    (workdir / "users.txt").write_text('"postgres" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={server.host} port={server.port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
        f"listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {workdir}/users.txt\n"
        f"pool_mode = transaction\nlogfile = {workdir}/pgbouncer.log\n"
    )
    if as_user:
        for path in (workdir, *workdir.iterdir()):
            shutil.chown(path, "postgres")
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise RuntimeError("pgbouncer is not installed: `make test` installs it")
    process = subprocess.Popen([*as_user, binary, str(workdir / "pgbouncer.ini")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    stack.callback(stop_process, process)
    wait_until(lambda: _listening(port), 10, "pgbouncer")
    return server.set(port=port).render_as_string(hide_password=False)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
