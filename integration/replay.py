"""Post fixture deliveries the way each CRM sends them (for `leadscore replay`, the demo and bench).

HubSpot deliveries (JSON arrays) are signed with HubSpot's v3 scheme, Salesforce
change events (JSON objects) with leadscore's HMAC scheme; Outbound Messages (XML)
are posted as they are, their token being part of the URL.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests
from hubspot.utils.signature import Signature

from integration import signing
from integration.errors import UserError
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


def prepare(path: Path, url: str, hubspot_secret: str, salesforce_secret: str) -> tuple[bytes, dict]:
    """The body and headers a fixture file is delivered with, by its kind."""
    path = Path(path)
    if path.suffix == ".xml":
        return path.read_bytes(), {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:  # not UTF-8, or not JSON
        raise UserError(f"{path} is not a JSON delivery: {exc}") from None
    body = json.dumps(data, separators=(",", ":")).encode()
    if isinstance(data, list):
        if not hubspot_secret:
            raise UserError(f"{path}: a HubSpot delivery needs HUBSPOT_APP_SECRET (or --secret) to sign it")
        return body, hubspot_headers(url, body, hubspot_secret)
    if not salesforce_secret:
        raise UserError(f"{path}: Salesforce change events need SALESFORCE_EVENTS_SECRET to sign them")
    return body, {"Content-Type": "application/json", **signing.sign_headers(salesforce_secret, body)}
