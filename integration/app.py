"""Flask app factory: `gunicorn 'integration.app:create_app()'`.

The web side only verifies, normalises and enqueues; scoring happens in RQ workers.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

from flask import Flask, Request, Response, jsonify, request
from redis import Redis
from redis.exceptions import RedisError, ResponseError
from rq import Queue
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from integration import logs, metrics, pending
from integration.clock import shared_now
from integration.errors import BodyTooLarge, WebhookError
from integration.events import IntakeRow
from integration.hubspot.webhook import bp as hubspot_bp
from integration.queue import Skipped, durability_risks, hand_off, settings_redis
from integration.salesforce.webhook import bp as salesforce_bp
from integration.settings import Settings, SettingsError, get_settings

log = logging.getLogger(__name__)

HEALTH_KEY, HEALTH_KEY_MS = "leadscore:healthz", 60_000  # written by each health check


@dataclass
class Services:
    """What the handlers need, stored once on `app.extensions["leadscore"]`."""

    settings: Settings
    redis: Redis
    queue: Queue

    def hand_off(self, crm: str, triaged: list[IntakeRow | Skipped]) -> dict:
        return hand_off(self.queue, crm, triaged)

    def body(self, request: Request) -> bytes:
        """The raw body, refused when over MAX_BODY_BYTES. A chunked body has no Content-Length for Flask
        to check first, and Werkzeug then stops reading at the limit without a word; the limit is set
        one byte higher so that byte tells a body cut short from one that fits."""
        body = request.get_data(cache=False)
        if len(body) > self.settings.max_body_bytes:
            raise BodyTooLarge(self.settings.max_body_bytes)
        return body

    def public_url(self, request: Request) -> str:
        """The URL the sender used, byte for byte, which is what webhook signatures cover."""
        raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or ""
        if not raw.startswith("/"):
            raw = request.full_path.rstrip("?")
        if request.root_path and not raw.startswith(request.root_path + "/"):
            raw = request.root_path + raw  # a proxy stripped the prefix it was mounted under
        base = self.settings.public_base_url or request.host_url
        return str(base).rstrip("/") + raw


def queue_gauges(redis: Redis, queue_name: str) -> dict:
    """Scrape-time gauges: what waits in RQ and in the pending store, and for how long; what failed."""

    queues = pending.worker_queues(queue_name, redis)

    def depth():
        return [({"queue": q.name}, float(q.count)) for q in queues] + [
            ({"queue": "pending"}, float(pending.depth(redis)))
        ]

    def failed():  # read as it is: a scrape leaves expiring the registry's entries to RQ
        counts = {q.name: q.failed_job_registry.get_job_count(cleanup=False) for q in queues}
        return [({"queue": name}, float(count)) for name, count in counts.items()]

    def oldest_age():
        oldest: dict[str, float] = {}
        for member, since in redis.zrange(pending.ACCOUNTS, 0, -1, withscores=True):
            crm = member.decode().split(":", 1)[0]
            oldest[crm] = min(oldest.get(crm, since), since)
        now = shared_now(redis)
        return [({"crm": crm}, now - since) for crm, since in oldest.items()]

    return {"queue_depth": depth, "failed_jobs": failed, "oldest_pending_age_seconds": oldest_age}


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    logs.configure(settings.log_level)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes + 1  # see Services.body
    if settings.proxy_fix_hops:
        hops = settings.proxy_fix_hops
        app.wsgi_app = ProxyFix(
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops, x_prefix=hops
        )
    if not settings.hubspot_app_secret:
        log.warning("HUBSPOT_APP_SECRET is not set: /webhooks/hubspot will answer 503")

    redis = settings_redis(settings)
    app.extensions["leadscore"] = Services(
        settings=settings, redis=redis, queue=Queue(settings.queue_name, connection=redis)
    )
    app.register_blueprint(hubspot_bp)
    app.register_blueprint(salesforce_bp)

    @app.get("/metrics")
    def prometheus_metrics():
        if not _bearer_matches(settings.metrics_token):
            return Response("METRICS_TOKEN is set: scrape with `Authorization: Bearer <it>`\n", status=401,
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        body, content_type = metrics.exposition(redis, gauges=queue_gauges(redis, settings.queue_name))
        return Response(body, content_type=content_type)

    if settings.bench_bare_endpoint:

        @app.post("/_bench/bare")
        def bare():
            """What the ingest benchmark compares the webhook with: read the body, answer 204."""
            request.get_data()
            return "", 204

    @app.get("/healthz")
    def healthz():
        """Healthy when Redis takes a write, as each webhook needs: a Redis out of memory (with
        noeviction) or a read-only replica after a failover answers PING but refuses every event."""
        try:
            redis.set(HEALTH_KEY, 1, px=HEALTH_KEY_MS)
        except ResponseError as exc:
            log.error("healthz: Redis refuses writes: %s", exc)
            return jsonify(status="unavailable", redis="refusing writes (see the web log)"), 503
        except RedisError as exc:
            log.error("healthz: Redis unreachable: %s", exc)  # its address stays off the public port
            return jsonify(status="unavailable", redis="unreachable (see the web log)"), 503
        return jsonify(status="ok", redis="ok", redis_risks=durability_risks(redis))

    def refused(message: str, status: int):
        """Counted, so a wrong secret or URL after a deploy shows on a dashboard: HubSpot does not send
        again a delivery answered 400, 401, 403, 404 or 405."""
        metrics.incr(redis, "deliveries_refused_total", crm=request.blueprint or "", status=str(status))
        return jsonify(error=message), status

    @app.errorhandler(WebhookError)
    def refuse(exc: WebhookError):
        log.warning("refused delivery: %s", exc.message)
        return refused(exc.message, exc.status)

    @app.errorhandler(SettingsError)
    def not_configured(exc: SettingsError):
        log.error("%s", exc)
        return refused(str(exc), 503)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_exc):
        return refuse(BodyTooLarge(settings.max_body_bytes))

    return app


def _bearer_matches(token: str) -> bool:
    """True when no token is required, or the request carries it (compared in constant time)."""
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
