"""A throw-away certificate authority, so emulators can serve https:// on loopback.

Some clients (simple-salesforce) only ever build https:// URLs. `LocalTLS` issues a
certificate for 127.0.0.1 and localhost from a fresh `trustme` CA; callers point
`REQUESTS_CA_BUNDLE` at `ca_bundle()` (the system roots plus this CA), which requests
honours over a Session's own `verify`.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import trustme
from flask import Flask
from werkzeug.serving import make_server

from integration.emulators import RunningServer, _QuietHandler

SERVER_NAMES = ("127.0.0.1", "localhost")


def system_ca_bundle() -> Path | None:
    """The CA bundle requests would otherwise use: $SSL_CERT_FILE, $REQUESTS_CA_BUNDLE, certifi's, or none."""
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(var)
        if value and os.path.isfile(value) and os.access(value, os.R_OK):
            return Path(value)
    try:
        import certifi
    except ImportError:
        return None
    path = Path(certifi.where())
    return path if path.is_file() else None


class LocalTLS:
    """A trustme CA and a server certificate for `names`; files live in a private temp dir."""

    def __init__(self, names: tuple[str, ...] = SERVER_NAMES):
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert(*names)
        self._dir = Path(tempfile.mkdtemp(prefix="leadscore-tls-"))
        self._bundle: Path | None = None

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(context)
        return context

    def ca_bundle(self) -> str:
        """Path of a PEM file: the system bundle (if any) followed by this CA; written once."""
        if self._bundle is None:
            system = system_ca_bundle()
            pem = system.read_bytes() if system else b""
            if pem and not pem.endswith(b"\n"):
                pem += b"\n"
            path = self._dir / "ca-bundle.pem"
            path.write_bytes(pem + self.ca_pem)
            self._bundle = path
        return str(self._bundle)

    def cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
        self._bundle = None

    def __enter__(self) -> LocalTLS:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


@dataclass
class TLSRunningServer(RunningServer):
    scheme: str = "https"

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"


def serve_tls_in_thread(
    app: Flask, tls: LocalTLS, host: str = "127.0.0.1", port: int = 0
) -> TLSRunningServer:
    server = make_server(
        host, port, app, threaded=True, request_handler=_QuietHandler, ssl_context=tls.server_context()
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"serve-tls-{app.name}", daemon=True
    )
    thread.start()
    return TLSRunningServer(server, thread)
