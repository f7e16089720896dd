"""HMAC-SHA256 signatures over `timestamp.body`, for senders we define the scheme for.

The scheme follows stripe-python's: the timestamp is signed with the raw body, a
tolerance window refuses replays, several `v1=` signatures may be sent at once
(secret rotation), and every comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

from integration.errors import SignatureError

SCHEME = "v1"
TOLERANCE_S = 300
TIMESTAMP_HEADER = "X-Leadscore-Timestamp"
SIGNATURE_HEADER = "X-Leadscore-Signature"
_SECONDS = re.compile(r"[0-9]{1,11}")


def compute(secret: str, timestamp: str, body: bytes) -> str:
    signed = timestamp.encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign_headers(secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: f"{SCHEME}={compute(secret, stamp, body)}"}


def verify(secret: str, body: bytes, timestamp: str | None, signature: str | None) -> None:
    """Raise `SignatureError` unless one `v1=` signature matches and the timestamp is fresh."""
    if not timestamp:
        raise SignatureError(f"missing {TIMESTAMP_HEADER} header (Unix seconds)")
    if not signature:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header (v1=<hex HMAC-SHA256>)")
    if not _SECONDS.fullmatch(timestamp):
        raise SignatureError(f"{TIMESTAMP_HEADER} {timestamp[:32]!r} is not Unix seconds")
    if abs(time.time() - int(timestamp)) > TOLERANCE_S:
        raise SignatureError(
            f"{TIMESTAMP_HEADER} {timestamp} is not within 5 minutes of now: a replay or a wrong clock"
        )
    candidates = [
        value.strip()
        for scheme, _, value in (p.partition("=") for p in signature.split(","))
        if scheme.strip() == SCHEME
    ]
    if not candidates:
        raise SignatureError(f"{SIGNATURE_HEADER} has no {SCHEME}= signature")
    expected = compute(secret, timestamp, body)
    if not any(hmac.compare_digest(expected.encode(), c.encode()) for c in candidates):
        raise SignatureError(
            f"{SIGNATURE_HEADER} does not match: sign '<timestamp>.<raw body>' with HMAC-SHA256 and "
            "the shared SALESFORCE_EVENTS_SECRET, hex-encoded"
        )
