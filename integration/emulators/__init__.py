"""Local stand-ins for HubSpot and an OpenAI-compatible LLM, for tests and `make demo`.

They speak the same HTTP as the real services, so the real `hubspot-api-client`
and `openai` clients talk to them unchanged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from flask import Flask
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server


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
