"""Metrics shared by every process through Redis, exposed in the Prometheus text format.

Web processes (gunicorn workers) and RQ work horses (forked, short-lived, on many machines) all
record into two Redis hashes, so `GET /metrics` on any web process shows the fleet's totals:

- `leadscore:metrics:counters`   field `name|label=value|...` (labels sorted, values %-quoted),
                                  value incremented with HINCRBYFLOAT;
- `leadscore:metrics:histograms` fields `<series>#bucket=<le>` (cumulative), `<series>#sum`,
                                  `<series>#count`, all written in one MULTI/EXEC round trip.

Recording is best-effort and never raises: a Redis error is logged (at most once a minute per
process) and the recording dropped. After an error, a connection pool is left alone for a few
seconds so a Redis outage does not add the client's connect/retry time to every request.

Only the names documented in `METRICS` are recorded; each is exposed with the `leadscore_` prefix.
Keep label values low-cardinality (CRM names, outcomes, reasons): never ids or personal data.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from urllib.parse import quote, unquote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

PREFIX = "leadscore_"
COUNTERS_KEY = "leadscore:metrics:counters"
HISTOGRAMS_KEY = "leadscore:metrics:histograms"
BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, math.inf)

COUNTER_HELP: dict[str, str] = {
    "events_received_total": "CRM events received by webhooks {crm}",
    "deliveries_refused_total": "Webhook deliveries refused, nothing queued; HubSpot does not send again "
    "one answered 400, 401, 403, 404 or 405 {crm,status}",
    "events_ignored_total": "CRM events received but not scored {crm,reason}",
    "events_deduplicated_total": "CRM events the collector dropped as repeats of one queued before {crm}",
    "events_enqueued_total": "CRM events the web queued for scoring, repeats included {crm}",
    "llm_calls_total": "Lead scoring attempts through the LLM {outcome=ok|fallback}",
    "llm_fallbacks_total": "Scores produced by the fallback instead of the LLM {reason}",
    "llm_cache_hits_total": "Scores served from the cache without calling the LLM",
    "crm_calls_total": "Calls made to a CRM API {crm,operation}",
    "crm_throttled_total": "CRM calls answered 429 or stopped by the shared rate limit {crm}",
    "writes_total": "Score write-backs to the CRM {crm,outcome=written|unchanged|failed}",
    "leads_scored_total": "Leads scored, by the tier they got and what scored them {crm,tier,scorer}",
    "model_values_missing_total": "Live leads a trained model scored lacking a feature {crm,feature}",
    "model_values_unseen_total": "Live leads with a feature's value the model never saw {crm,feature}",
    "leads_skipped_unchanged_total": "Leads not rescored because their inputs did not change {crm}",
    "scores_edited_in_crm_total": "Leads whose score or tier someone else changed in the CRM: put back, or "
    "left when changed again within a day of being put back {crm,action=put_back|left}",
    "store_errors_total": "Batches whose scores, outcomes or feedback the score store could not keep",
}
HISTOGRAM_HELP: dict[str, str] = {
    "scoring_latency_seconds": "Time from webhook accepted to CRM score field written {crm}",
    "batch_duration_seconds": "Duration of one scoring batch job {crm}",
}
GAUGE_HELP: dict[str, str] = {
    "queue_depth": "Jobs waiting in an RQ queue {queue}",
    "failed_jobs": "Jobs in an RQ queue's failed registry, which nothing retries until requeued {queue}",
    "oldest_pending_age_seconds": "Age of the oldest event not yet scored {crm}",
    "metrics_store_up": "1 if the shared metrics store (Redis) answered this scrape, else 0",
}
# The documented metric names (without the `leadscore_` prefix) and their help text.
METRICS: dict[str, str] = {**COUNTER_HELP, **HISTOGRAM_HELP, **GAUGE_HELP}

Increments = Sequence[tuple[str, float, dict[str, str]]]
GaugeCallable = Callable[[], list[tuple[dict[str, str], float]]]

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_BACKOFF_S = 5.0  # skip a connection pool this long after a Redis error
_WARN_EVERY_S = 60.0
_failed_at: weakref.WeakKeyDictionary[object, float] = weakref.WeakKeyDictionary()
_warned_at: dict[str, float] = {}
_lock = threading.Lock()


# ---------------------------------------------------------------- recording


def incr(redis: Redis, name: str, amount: float = 1, **labels: str) -> None:
    """Add `amount` (>= 0) to counter `name` {labels}. Never raises."""
    incr_many(redis, [(name, amount, labels)])


def observe(redis: Redis, name: str, seconds: float, **labels: str) -> None:
    """Record one observation of histogram `name` {labels}; negative values count as 0. Never raises."""
    observe_many(redis, name, [seconds], **labels)


def observe_many(redis: Redis, name: str, values: list[float], **labels: str) -> None:
    """Record many observations of histogram `name` {labels} in one round trip. Never raises."""
    try:
        name = _known(name, HISTOGRAM_HELP, "histogram")
        if name is None or not values:
            return
        values = [float(v) for v in values]
        if any(math.isnan(v) for v in values):
            _warn("bad-amount", "metrics: histogram %s refuses NaN", name)
            return
        values = [max(v, 0.0) for v in values]  # clock skew between machines must not make sums go down
        if _backing_off(redis):
            return
        series = _series(name, labels)
        pipe = redis.pipeline(transaction=True)  # one round trip; a scrape never sees half of it
        for le in BUCKETS:
            inside = sum(v <= le for v in values)
            if inside:
                pipe.hincrby(HISTOGRAMS_KEY, f"{series}#bucket={floatToGoString(le)}", inside)
        pipe.hincrbyfloat(HISTOGRAMS_KEY, f"{series}#sum", sum(values))
        pipe.hincrby(HISTOGRAMS_KEY, f"{series}#count", len(values))
        pipe.execute()
    except RedisError as exc:
        _failed(redis, exc)
    except Exception:
        log.exception("metrics: could not record histogram %s", name)


def _known(name: str, kind: dict[str, str], what: str) -> str | None:
    name = str(name)
    name = name.removeprefix(PREFIX)
    if name not in kind:
        documented = "documented as another type" if name in METRICS else "not documented in METRICS"
        _warn(f"unknown:{name}", "metrics: refusing %s %r: %s", what, name, documented)
        return None
    return name


def incr_many(redis: Redis, increments: Increments) -> None:
    """Several counters in one round trip: [(name, amount, labels), ...]. Never raises."""
    try:
        if _backing_off(redis):
            return
        with redis.pipeline(transaction=False) as pipe:
            add_counters(pipe, increments)
            pipe.execute()
    except RedisError as exc:
        _failed(redis, exc)
    except Exception:  # metrics must never break the caller
        log.exception("metrics: could not record counters")


def add_counters(pipe: Pipeline, increments: Increments) -> None:
    """Queue counter increments on a caller's pipeline, to ride its round trip. Never raises."""
    for name, amount, labels in increments:
        try:
            known = _known(name, COUNTER_HELP, "counter")
            if known is None:
                continue
            amount = float(amount)
            if not math.isfinite(amount) or amount < 0:
                _warn("bad-amount", "metrics: counter %s refuses amount %r", known, amount)
            elif amount:
                pipe.hincrbyfloat(COUNTERS_KEY, _series(known, labels), amount)
        except Exception:  # metrics must never break the caller
            log.exception("metrics: could not record counter %s", name)


def counter_value(redis: Redis, name: str, **labels: str) -> float:
    """A counter's current total for exactly these labels (0 when never counted)."""
    raw = redis.hget(COUNTERS_KEY, _series(name, labels))
    return float(raw) if raw is not None else 0.0


def _series(name: str, labels: dict[str, object]) -> str:
    """`name|a=x|b=y`: labels sorted, values %-quoted so `|`, `=` and `#` never appear inside."""
    parts = [name]
    for key in sorted(labels):
        if not _LABEL_NAME.match(key) or key.startswith("__") or key == "le":
            raise ValueError(f"invalid label name {key!r}")
        parts.append(f"{key}={quote(str(labels[key]), safe='')}")
    return "|".join(parts)


def _parse_series(field: str) -> tuple[str, dict[str, str]]:
    name, *pairs = field.split("|")
    labels = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        labels[key] = unquote(value)
    return name, labels


def _backing_off(redis: Redis) -> bool:
    pool = getattr(redis, "connection_pool", None)
    if pool is None:
        return False
    with _lock:
        failed = _failed_at.get(pool)
    return failed is not None and time.monotonic() - failed < _BACKOFF_S


def _failed(redis: Redis, exc: RedisError) -> None:
    pool = getattr(redis, "connection_pool", None)
    if pool is not None:
        try:
            with _lock:
                _failed_at[pool] = time.monotonic()
        except TypeError:  # not weak-referenceable
            pass
    _warn("redis", "metrics: Redis unavailable, recording dropped: %s", exc)


def _warn(key: str, msg: str, *args: object) -> None:
    now = time.monotonic()
    with _lock:
        last = _warned_at.get(key)
        if last is not None and now - last < _WARN_EVERY_S:
            return
        _warned_at[key] = now
    log.warning(msg, *args)


# ---------------------------------------------------------------- exposition


class RedisMetricsCollector(Collector):
    """Reads the shared hashes at scrape time; adds gauges from the app's callables."""

    def __init__(self, redis: Redis, gauges: dict[str, GaugeCallable] | None = None):
        self.redis = redis
        self.gauges = dict(gauges or {})

    def describe(self):
        """Names only, so registering into an auto-describing registry does not touch Redis."""
        for name, doc in COUNTER_HELP.items():
            yield CounterMetricFamily(PREFIX + name, doc)
        for name, doc in HISTOGRAM_HELP.items():
            yield HistogramMetricFamily(PREFIX + name, doc)
        for name, doc in GAUGE_HELP.items():
            yield GaugeMetricFamily(PREFIX + name, doc)

    def collect(self):
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(COUNTERS_KEY)
            pipe.hgetall(HISTOGRAMS_KEY)
            counters, histograms = pipe.execute()
            store_up = 1.0
        except RedisError as exc:
            # Leave the stored series out (they go stale) rather than exposing zeros that
            # Prometheus would read as a counter reset followed by a huge increase.
            log.warning("metrics: Redis unavailable at scrape: %s", exc)
            counters, histograms, store_up = None, None, 0.0
        if counters is not None:
            yield from self._counters(counters)
            yield from self._histograms(histograms)
        up = GaugeMetricFamily(PREFIX + "metrics_store_up", GAUGE_HELP["metrics_store_up"])
        up.add_metric([], store_up)
        yield up
        yield from self._gauges()

    def _counters(self, raw: dict[bytes, bytes]):
        families = {name: CounterMetricFamily(PREFIX + name, doc) for name, doc in COUNTER_HELP.items()}
        for field, value in sorted(raw.items()):
            try:
                name, labels = _parse_series(field.decode())
                family = families.get(name)
                if family is not None:
                    family.add_sample(family.name + "_total", labels, float(value))
            except (ValueError, UnicodeDecodeError):
                log.warning("metrics: skipping unreadable counter field %r", field)
        yield from families.values()

    def _histograms(self, raw: dict[bytes, bytes]):
        series: dict[str, dict[str, float]] = {}
        for field, value in raw.items():
            try:
                key, _, part = field.decode().rpartition("#")
                series.setdefault(key, {})[part] = float(value)
            except (ValueError, UnicodeDecodeError):
                log.warning("metrics: skipping unreadable histogram field %r", field)
        families = {name: HistogramMetricFamily(PREFIX + name, doc) for name, doc in HISTOGRAM_HELP.items()}
        for key in sorted(series):
            name, labels = _parse_series(key)
            family = families.get(name)
            values = series[key]
            if family is None or "count" not in values:
                continue
            base = family.name
            for le in BUCKETS:
                le_text = floatToGoString(le)
                count = values["count"] if le == math.inf else values.get(f"bucket={le_text}", 0.0)
                family.add_sample(base + "_bucket", {**labels, "le": le_text}, count)
            family.add_sample(base + "_count", labels, values["count"])
            family.add_sample(base + "_sum", labels, values.get("sum", 0.0))
        yield from families.values()

    def _gauges(self):
        for name, produce in self.gauges.items():
            short = name.removeprefix(PREFIX)
            if short not in GAUGE_HELP or short == "metrics_store_up":
                _warn(f"unknown-gauge:{short}", "metrics: refusing gauge %r: not documented in METRICS", name)
                continue
            family = GaugeMetricFamily(PREFIX + short, GAUGE_HELP[short])
            try:
                for labels, value in produce():
                    family.add_sample(family.name, {str(k): str(v) for k, v in labels.items()}, float(value))
            except Exception:  # one failing gauge must not fail the scrape
                log.exception("metrics: gauge %s failed", short)
                continue
            yield family


def collector(redis: Redis, gauges: dict[str, GaugeCallable] | None = None) -> RedisMetricsCollector:
    """The Collector for the shared metrics plus scrape-time `gauges` (name -> [(labels, value)])."""
    return RedisMetricsCollector(redis, gauges)


def exposition(redis: Redis, gauges: dict[str, GaugeCallable] | None = None) -> tuple[bytes, str]:
    """(body, content type) for `GET /metrics`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector(redis, gauges))
    return generate_latest(registry), CONTENT_TYPE_LATEST
