"""Metrics shared through a real Redis and exposed for Prometheus; JSON logs, RQ job ids, redaction."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue, SimpleWorker

from integration import logs, metrics
from integration.emulators import free_port
from tests.conftest import FIXTURES

JOB_LOGGER = "tests.observability.job"


def fail_inside_job(crm: str, account: str, lead_ids: list[str]) -> None:
    raise RuntimeError(f"{crm}:{account} refused {len(lead_ids)} leads")


def log_inside_job(lead_id: str) -> str:
    """Enqueued into a real RQ queue; logs without passing job_id."""
    log = logging.getLogger(JOB_LOGGER)
    log.info("scored lead %s", lead_id, extra={"lead_id": lead_id, "crm": "hubspot"})
    return "done"


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def second_connection(redis: Redis) -> Redis:
    """Another client with its own pool, as a different process would have."""
    return Redis(connection_pool=type(redis.connection_pool)(**redis.connection_pool.connection_kwargs))


def dead_redis() -> Redis:
    return Redis(port=free_port(), retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5)


# ---------------------------------------------------------------- metrics


def test_counters_accumulate_across_connections_and_labels_separate_series(redis):
    other = second_connection(redis)
    metrics.incr(redis, "events_received_total", crm="hubspot")
    metrics.incr(other, "events_received_total", crm="hubspot")
    metrics.incr(other, "events_received_total", 1, crm="hubspot")
    metrics.incr(redis, "events_received_total", 2, crm="salesforce")
    metrics.incr(redis, "writes_total", outcome="written", crm="hubspot")
    metrics.incr(other, "writes_total", crm="hubspot", outcome="written")  # label order irrelevant
    metrics.incr(other, "writes_total", crm="hubspot", outcome="failed")
    metrics.incr(redis, "llm_cache_hits_total", 0.5)

    stored = redis.hgetall(metrics.COUNTERS_KEY)
    assert stored[b"events_received_total|crm=hubspot"] == b"3"
    assert stored[b"writes_total|crm=hubspot|outcome=written"] == b"2"

    found = samples(metrics.exposition(other)[0])
    assert found[("leadscore_events_received_total", (("crm", "hubspot"),))] == 3.0
    assert found[("leadscore_events_received_total", (("crm", "salesforce"),))] == 2.0
    assert found[("leadscore_writes_total", (("crm", "hubspot"), ("outcome", "written")))] == 2.0
    assert found[("leadscore_writes_total", (("crm", "hubspot"), ("outcome", "failed")))] == 1.0
    assert found[("leadscore_llm_cache_hits_total", ())] == 0.5
    assert found[("leadscore_metrics_store_up", ())] == 1.0


def test_exposition_text_has_total_suffix_once_and_content_type(redis):
    metrics.incr(redis, "events_received_total", 3, crm="hubspot")
    body, content_type = metrics.exposition(redis)
    text = body.decode()
    assert 'leadscore_events_received_total{crm="hubspot"} 3.0' in text
    assert "_total_total" not in text
    assert "# TYPE leadscore_events_received_total counter" in text
    assert content_type.startswith("text/plain")


def test_unknown_or_wrong_type_or_bad_values_record_nothing(redis, caplog):
    with caplog.at_level(logging.WARNING, logger="integration.metrics"):
        metrics.incr(redis, "made_up_total", crm="hubspot")
        metrics.incr(redis, "scoring_latency_seconds", crm="hubspot")  # a histogram, not a counter
        metrics.observe(redis, "events_received_total", 1.0, crm="hubspot")  # a counter
        metrics.incr(redis, "events_received_total", -1, crm="hubspot")  # counters only go up
        metrics.incr(redis, "events_received_total", crm="hubspot", **{"bad-label": "x"})
    assert redis.exists(metrics.COUNTERS_KEY, metrics.HISTOGRAMS_KEY) == 0
    assert "made_up_total" in caplog.text


def test_label_values_with_separators_round_trip(redis):
    metrics.incr(redis, "events_ignored_total", crm="hubspot", reason="a|b=c#d %e")
    found = samples(metrics.exposition(redis)[0])
    assert found[("leadscore_events_ignored_total", (("crm", "hubspot"), ("reason", "a|b=c#d %e")))] == 1.0


def test_histogram_buckets_sum_and_count_exact(redis):
    other = second_connection(redis)
    for seconds in (0.03, 0.05, 0.3, 7):
        metrics.observe(redis, "scoring_latency_seconds", seconds, crm="hubspot")
    metrics.observe(other, "scoring_latency_seconds", 120, crm="hubspot")
    metrics.observe(other, "batch_duration_seconds", 1.5, crm="salesforce")

    found = samples(metrics.exposition(redis)[0])
    hub = (("crm", "hubspot"),)
    expected = {"0.05": 2, "0.1": 2, "0.25": 2, "0.5": 3, "1.0": 3, "2.0": 3, "5.0": 3, "10.0": 4,
                "30.0": 4, "60.0": 4, "+Inf": 5}  # fmt: skip
    for le, count in expected.items():
        assert found[("leadscore_scoring_latency_seconds_bucket", (("crm", "hubspot"), ("le", le)))] == count
    assert found[("leadscore_scoring_latency_seconds_count", hub)] == 5
    assert found[("leadscore_scoring_latency_seconds_sum", hub)] == pytest.approx(127.38)
    assert found[("leadscore_batch_duration_seconds_count", (("crm", "salesforce"),))] == 1
    assert found[("leadscore_batch_duration_seconds_bucket", (("crm", "salesforce"), ("le", "1.0")))] == 0
    assert found[("leadscore_batch_duration_seconds_bucket", (("crm", "salesforce"), ("le", "2.0")))] == 1


def test_gauge_callables_appear_and_a_failing_one_does_not_break_the_scrape(redis):
    def broken():
        raise RuntimeError("queue unreachable")

    gauges = {
        "queue_depth": lambda: [({"queue": "leadscore"}, 4), ({"queue": "leadscore-batch"}, 0)],
        "oldest_pending_age_seconds": lambda: [({"crm": "hubspot"}, 12.5)],
        "undocumented_gauge": lambda: [({}, 1)],
    }
    found = samples(metrics.exposition(redis, gauges)[0])
    assert found[("leadscore_queue_depth", (("queue", "leadscore"),))] == 4
    assert found[("leadscore_queue_depth", (("queue", "leadscore-batch"),))] == 0
    assert found[("leadscore_oldest_pending_age_seconds", (("crm", "hubspot"),))] == 12.5
    assert not any(name == "leadscore_undocumented_gauge" for name, _ in found)

    found = samples(metrics.exposition(redis, {"queue_depth": broken})[0])
    assert found[("leadscore_metrics_store_up", ())] == 1.0


def test_metrics_documents_every_name():
    for name in ("events_received_total", "events_ignored_total", "events_deduplicated_total",
                 "events_enqueued_total", "llm_calls_total", "llm_fallbacks_total", "llm_cache_hits_total",
                 "crm_calls_total", "crm_throttled_total", "writes_total", "leads_scored_total",
                 "leads_skipped_unchanged_total", "scoring_latency_seconds", "batch_duration_seconds",
                 "queue_depth", "failed_jobs", "oldest_pending_age_seconds"):  # fmt: skip
        assert metrics.METRICS[name]


def test_recording_and_scraping_with_redis_down_do_not_raise():
    down = dead_redis()
    started = time.monotonic()
    metrics.incr(down, "events_received_total", crm="hubspot")
    metrics.observe(down, "scoring_latency_seconds", 0.2, crm="hubspot")
    assert time.monotonic() - started < 2

    body, _ = metrics.exposition(down, {"queue_depth": lambda: [({"queue": "leadscore"}, 1)]})
    found = samples(body)
    assert found[("leadscore_metrics_store_up", ())] == 0.0
    assert found[("leadscore_queue_depth", (("queue", "leadscore"),))] == 1
    assert not any(name.startswith("leadscore_events_received") for name, _ in found)


# ---------------------------------------------------------------- logs


@pytest.fixture
def log_stream():
    """configure() into a buffer; the root logger and quieted loggers are restored afterwards."""
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    saved_levels = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    stream = io.StringIO()
    logs.configure("INFO", stream=stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_an_llm_call_logs_no_line_of_its_http_client(env, log_stream):
    """openai 3 sends through httpx2, which logs every request at INFO: a line a lead, each naming the
    LLM endpoint."""
    from integration.settings import get_settings
    from workers.llm import PropensityReasoner

    assert PropensityReasoner(get_settings()).check() is None  # one real call, answered

    assert [line["logger"] for line in lines(log_stream) if line["logger"].startswith("http")] == []


def test_json_lines_with_extras_and_idempotent_configure(log_stream):
    logs.configure("INFO", stream=log_stream)  # a second call must not duplicate output
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_leadscore_json_handler", False)]
    assert len(ours) == 1

    log = logging.getLogger("integration.test")
    log.info("enqueued %d events", 3, extra={"event_id": "e-1", "crm": "hubspot", "account_id": "48213377"})
    log.debug("not at INFO")
    logging.getLogger("werkzeug").info("GET / 200")
    [line] = lines(log_stream)
    assert line["message"] == "enqueued 3 events"
    assert line["level"] == "INFO"
    assert line["logger"] == "integration.test"
    assert line["event_id"] == "e-1" and line["crm"] == "hubspot" and line["account_id"] == "48213377"
    assert line["timestamp"].endswith("+00:00")
    assert "job_id" not in line


def test_a_failed_jobs_arguments_are_not_logged(redis, log_stream):
    """RQ logs a failed job with its arguments: a batch's every lead and event, at each retry."""
    queue = Queue("observability-test", connection=redis)
    job = queue.enqueue(fail_inside_job, "hubspot", "48213377", [f"7430000{n:04}" for n in range(100)])
    SimpleWorker([queue], connection=redis).work(burst=True)

    [line] = [
        line for line in lines(log_stream) if line["logger"] == "rq.worker" and line["level"] == "ERROR"
    ]
    assert (
        line["arguments"] == "hubspot, 48213377, 100 items (the rest: see the job)"
        and line["job_id"] == job.id
    )
    assert "74300000099" not in json.dumps(line)


_ONE_JOB_WORKER = """
import sys
from redis import Redis
from rq import Queue
from integration import logs
from workers import worker
logs.configure("INFO")
redis = Redis.from_url(sys.argv[1])
queue = Queue("observability-test", connection=redis)
print(queue.enqueue("tests.test_observability.log_inside_job", "74300000101").id)
worker.build([queue], redis, 60).work(burst=True)
"""


def test_a_finished_job_logs_its_start_and_completion_once_each(redis):
    """RQ logs four lines for every job, two of them saying it succeeded and one its result's TTL: half
    of all jobs are collectors, which log nothing else. As `leadscore worker` runs it, in a work horse."""
    at = redis.connection_pool.connection_kwargs
    url = f"redis://{at['host']}:{at['port']}/{at['db']}"
    ran = subprocess.run([sys.executable, "-c", _ONE_JOB_WORKER, url], capture_output=True, text=True,
                         timeout=60, cwd=FIXTURES.parent)  # fmt: skip
    job_id = ran.stdout.strip()

    said = [
        json.loads(line) for line in ran.stderr.splitlines() if job_id in line or "log_inside_job" in line
    ]
    assert [(line["logger"], line["message"].split(" ")[0]) for line in said] == [
        ("rq.worker", "Worker"),  # … observability-test: tests.test_observability.log_inside_job(…) (id)
        (JOB_LOGGER, "scored"),
        ("rq.worker", "Successfully"),
    ], ran.stderr


def test_job_id_from_a_real_rq_job(redis, log_stream):
    queue = Queue("observability-test", connection=redis)
    job = queue.enqueue(log_inside_job, "74300000101")
    SimpleWorker([queue], connection=redis).work(burst=True)
    assert job.get_status(refresh=True) == "finished"
    [line] = [line for line in lines(log_stream) if line["logger"] == JOB_LOGGER]
    assert line["job_id"] == job.id
    assert line["lead_id"] == "74300000101"
    assert line["message"] == "scored lead 74300000101"


def test_redaction_of_personal_data_and_secrets(log_stream):
    log = logging.getLogger("integration.test")
    log.info(
        "lead jane.doe@example.com called from +1 415 555 0143, (415) 555-0143, 415-555-0143 "
        "and +44 20 7946 0958 with Authorization: Bearer abc.def-123",
        extra={
            "email": "ops@example.org",
            "note": "ring 020 7946 0958",
            "access_token": "pat-na1-0000",
            "client_secret": "s3cr3t",
            "Password": 1234,
            "HTTP_AUTHORIZATION": "Basic dXNlcjpwYXNz",
            "api_key": "sk-test",
            "payload": {"properties": {"email": "x@y.io", "hubspot_token": "t"}},
            "total_tokens": 512,
            "db_passwd": "hunter2",
            "cached_tokens": True,  # a flag, not a count: it could be anything
            "deep": {"a": {"b": {"c": {"d": {"e": {"f": "x@y.io", "g": {"h": "x@y.io"}}}}}}},
        },
    )
    [line] = lines(log_stream)
    message = line["message"]
    assert "@" not in message and "555" not in message and "7946" not in message
    assert message.count("[email]") == 1 and message.count("[phone]") == 4
    assert "abc.def-123" not in message and "[redacted]" in message
    assert line["email"] == "[email]"
    assert line["note"] == "ring [phone]"
    for key in ("access_token", "client_secret", "Password", "HTTP_AUTHORIZATION", "api_key", "db_passwd",
                "cached_tokens"):  # fmt: skip
        assert line[key] == "[redacted]", key
    assert line["payload"] == {"properties": {"email": "[email]", "hubspot_token": "[redacted]"}}
    assert line["total_tokens"] == 512
    assert line["deep"] == {"a": {"b": {"c": {"d": {"e": {"f": "[email]", "g": "[redacted]"}}}}}}


@pytest.mark.parametrize(
    ("logged", "shown"),
    [
        ("POST /webhooks/salesforce/events-7f3a9c HTTP/1.1", "POST /webhooks/salesforce/[redacted] HTTP/1.1"),
        ("POST /webhooks/salesforce/events HTTP/1.1", "POST /webhooks/salesforce/events HTTP/1.1"),
        ("POST /webhooks/salesforce/events?x=1", "POST /webhooks/salesforce/events?x=1"),
    ],
)
def test_an_outbound_message_token_is_redacted_even_when_it_starts_like_the_events_endpoint(logged, shown):
    assert logs.redact(logged) == shown


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("ph. 0151 23456789", "ph. [phone]"),
        ("Tel. 030/12345678", "Tel. [phone]"),
        ("mail jöhn.müller@exämple.de now", "mail [email] now"),
        ("dated 11/22/2026 and 2026/11/22", "dated 11/22/2026 and 2026/11/22"),
        ("batch 12 of 74300000101", "batch 12 of 74300000101"),
        ("12000/150000 leads", "12000/150000 leads"),
        ("lead 5 12345678", "lead 5 12345678"),
        ("job d72af4e9-9021-4594-8371-bd7b8e45dc5e", "job d72af4e9-9021-4594-8371-bd7b8e45dc5e"),
        ("job 90214594-8371-4594-8371-bd7b8e45dc5e", "job 90214594-8371-4594-8371-bd7b8e45dc5e"),
        ("tel 040 123 456", "tel [phone]"),  # 9 digits, the fewest a phone has
        ("tel 040 123 45", "tel 040 123 45"),
        ("+44 20 7946 0958 123 4", "+44 20 7946 0958 123 4"),  # 16 digits, more than any phone
        ("from 192.168.100.200", "from 192.168.100.200"),  # an IP address
        ("ref-415 555 0143 x", "ref-415 555 0143 x"),  # glued to a word by a hyphen: a UUID's rule
        ("usage total_tokens=512", "usage total_tokens=512"),  # an LLM usage count
        ("key sk-proj-abc_DEF-1234567890xyz", "key [redacted]"),
        (
            "Incorrect API key provided: sk-proj-abcd********************wxyz. You can find",  # OpenAI's 401
            "Incorrect API key provided: [redacted]. You can find",
        ),
        ("Invalid API Key: gsk_AbCd********WxYz.", "Invalid API Key: [redacted]."),  # Groq's, quoted back
        ("rated ****** by reps", "rated ****** by reps"),  # stars alone are no key
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization: [redacted]"),
        ("db_passwd=hunter2 ok", "db_passwd=[redacted] ok"),
        # Scripts without spaces, no-break and narrow spaces, dashes and full-width forms:
        ("携帯は090-1234-5678です", "携帯は[phone]です"),
        ("电话138-1234-5678", "电话[phone]"),
        ("call +1\u00a0415\u00a0555\u00a00143", "call [phone]"),
        ("tél. 01\u202f23\u202f45\u202f67\u202f89", "tél. [phone]"),
        ("電話：０３－１２３４－５６７８", "電話:[phone]"),
        ("mobil 0151–234–5678", "mobil [phone]"),
        ("メール taro＠example.co.jp まで", "メール [email] まで"),
        ("注文74300000101番", "注文74300000101番"),  # 11 digits, no separator: an id, as in English
        ("Budget 10⁶ €, ½ signed, step ①", "Budget 10⁶ €, ½ signed, step ①"),  # widths only are made plain
        ("mail taro﹫example.com", "mail [email]"),  # a small form of "@"
    ],
)
def test_what_masking_masks_and_what_it_leaves_alone(text, masked):
    assert logs.redact(text) == masked


REDOS = """
import sys
from integration.logs import redact
from integration.hubspot.api import html_to_text
for unit in ("token-", "a-", "1-", "sk-", "+1 ", "a@a.", "<"):
    text = unit * (60_000 // len(unit))
    assert redact(text) is not None and html_to_text(text) is not None
print("done")
"""


def test_masking_a_prospects_60_000_characters_cannot_stall_a_worker_or_the_web():
    """Lead texts (an email body, a Description) and unauthenticated request lines and headers are
    masked before anything else; a regex that backtracks made 4,000 characters of "token-" take 17 s."""
    done = subprocess.run([sys.executable, "-c", REDOS], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "done", done.stderr


def test_ids_scores_and_timestamps_are_not_redacted(log_stream):
    log = logging.getLogger("integration.test")
    text = (
        "contact 74300000101 lead 00Q5g00000Ls001EAB score 87 tier A at 1795251603 "
        "(1795251603.125) on 2026-11-20 08:00:03 took 0.123456789s"
    )
    log.info(text, extra={"lead_id": "74300000101", "occurred_at": 1795251603, "sf_id": "00Q5g00000Ls001EAB"})
    [line] = lines(log_stream)
    assert line["message"] == text
    assert line["lead_id"] == "74300000101" and line["occurred_at"] == 1795251603


def test_exception_text_is_redacted(log_stream):
    try:
        raise ValueError("bad contact jane@example.com")
    except ValueError:
        logging.getLogger("integration.test").exception("failed for %s", "bob@example.com")
    [line] = lines(log_stream)
    assert line["message"] == "failed for [email]"
    assert "ValueError: bad contact [email]" in line["exc_info"]
