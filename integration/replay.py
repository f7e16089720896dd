"""Sign and post webhook deliveries the way HubSpot does (for `leadscore replay` and the demo)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests
from hubspot.utils.signature import Signature

from integration.hubspot.webhook import signed_uri


def hubspot_headers(url: str, body: bytes, secret: str, timestamp_ms: int | None = None) -> dict:
    timestamp = str(timestamp_ms if timestamp_ms is not None else int(time.time() * 1000))
    signature = Signature.get_signature(
        secret, body.decode("utf-8"), "v3", http_uri=signed_uri(url), http_method="POST",
        timestamp=timestamp,
    )  # fmt: skip
    return {
        "Content-Type": "application/json",
        "X-HubSpot-Signature-v3": signature,
        "X-HubSpot-Request-Timestamp": timestamp,
    }


def sign_and_post(url: str, body: bytes, secret: str, timeout: float = 10.0) -> requests.Response:
    return requests.post(url, data=body, headers=hubspot_headers(url, body, secret), timeout=timeout)


def load_delivery(path: Path) -> bytes:
    """A fixture delivery as HubSpot would send it: a compact JSON array."""
    events = json.loads(Path(path).read_text())
    if not isinstance(events, list):
        raise ValueError(f"{path} is not a HubSpot delivery (a JSON array of events)")
    return json.dumps(events, separators=(",", ":")).encode()
