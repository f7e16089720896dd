"""An OpenAI-compatible Chat Completions stub that replays fixture replies.

Each reply is a recorded `chat.completion` body, `fixtures/llm/chat_completion__<variant>.json`.
The stub answers a lead with `lead_<id>` when that fixture exists, else `neutral`;
tests can force a variant, an HTTP error or a delay, or have it refuse parameters as a reasoning
model does.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

from flask import Flask, Response, jsonify, request

_LEAD_ID = re.compile(r'"lead_id":\s*"([^"]+)"')
JSON_MODE_UNASKED = {
    "message": "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
    "'json_object'.",
    "type": "invalid_request_error",
    "param": "messages",
    "code": None,
}


# What OpenAI answers a reasoning model (o-series, gpt-5) asked with parameters it does not take.
REASONING_MODEL_REFUSES = {
    "max_tokens": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
        "'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    },
    "temperature": {
        "message": "Unsupported value: 'temperature' does not support 0 with this model. Only the default "
        "(1) value is supported.",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "unsupported_value",
    },
}


def _error_for(status: int) -> dict:
    """OpenAI's error body for a status: a refused request, a rate limit, or the server's fault."""
    if status == 429:
        return {"message": "Rate limit reached for requests.", "type": "requests", "param": None,
                "code": "rate_limit_exceeded"}  # fmt: skip
    if status < 500:
        return {"message": "Invalid request.", "type": "invalid_request_error", "param": None, "code": None}
    return {"message": "The server had an error while processing your request.", "type": "server_error",
            "param": None, "code": None}  # fmt: skip


def _json_mode_unasked(body: dict) -> bool:
    """JSON mode without the word "json" in any message: OpenAI refuses it, so a prompt edit that
    drops the word fails here as it would in production."""
    if (body.get("response_format") or {}).get("type") != "json_object":
        return False
    return not any("json" in str(m.get("content", "")).lower() for m in body.get("messages") or [])


def _refused_by_a_reasoning_model(body: dict) -> dict | None:
    if "max_tokens" in body:
        return REASONING_MODEL_REFUSES["max_tokens"]
    if body.get("temperature", 1) != 1:
        return REASONING_MODEL_REFUSES["temperature"]
    return None


class LLMStub:
    def __init__(self, fixtures: Path, api_key: str = "stub-key", latency_s: float = 0.0):
        self.api_key = api_key
        self.latency_s = latency_s
        self.replies = {
            path.stem.split("__", 1)[1]: json.loads(path.read_text())
            for path in sorted(Path(fixtures).glob("chat_completion__*.json"))
        }
        self.forced_variant: str | None = None
        self.forced_status: int | None = None
        self.forced_raw: tuple[str, bytes] | None = None
        self.retry_after: str | None = None  # the Retry-After header a forced 429 carries
        self.retry_after_ms: str | None = None  # and Azure OpenAI's retry-after-ms
        self.reasoning_model = False  # refuse `max_tokens` and a temperature but 1, as o-series models do
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []  # each request's, lower-cased names
        self._lock = threading.Lock()

    def force(
        self, variant: str | None = None, status: int | None = None, raw: tuple[str, bytes] | None = None
    ) -> None:
        """Answer every request with a fixture variant, an HTTP error, or a raw body (content type, body):
        a 200, or the error's when both are given."""
        if variant is not None and variant not in self.replies:
            raise KeyError(f"no fixture chat_completion__{variant}.json")
        self.forced_variant, self.forced_status, self.forced_raw = variant, status, raw

    def app(self) -> Flask:
        app = Flask("llm-stub")

        @app.post("/v1/chat/completions")
        @app.post("/chat/completions")
        def chat_completions():
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                error = {
                    "message": "Incorrect API key provided.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
                return jsonify(error=error), 401
            body = request.get_json(force=True)
            with self._lock:
                self.requests.append(body)
                self.headers.append({name.lower(): value for name, value in request.headers.items()})
            if self.latency_s:
                time.sleep(self.latency_s)
            if self.forced_status is not None and self.forced_raw is not None:
                content_type, raw = self.forced_raw
                return Response(raw, status=self.forced_status, content_type=content_type)
            if self.forced_status is not None:
                said = {"Retry-After": self.retry_after, "retry-after-ms": self.retry_after_ms}
                headers = {name: value for name, value in said.items() if value and self.forced_status == 429}
                return jsonify(error=_error_for(self.forced_status)), self.forced_status, headers
            if _json_mode_unasked(body):
                return jsonify(error=JSON_MODE_UNASKED), 400
            if self.reasoning_model and (refused := _refused_by_a_reasoning_model(body)):
                return jsonify(error=refused), 400
            if self.forced_raw is not None:
                content_type, raw = self.forced_raw
                return Response(raw, status=200, content_type=content_type)
            return jsonify(self.replies[self._variant_for(body)])

        @app.get("/v1/models")
        def models():
            return jsonify(object="list", data=[{"id": "stub", "object": "model", "owned_by": "leadscore"}])

        return app

    def _variant_for(self, body: dict) -> str:
        if self.forced_variant:
            return self.forced_variant
        text = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        match = _LEAD_ID.search(text)
        variant = f"lead_{match.group(1)}" if match else ""
        return variant if variant in self.replies else "neutral"
