"""Real parts for every test: a redis-server, the HubSpot emulator and the LLM stub over HTTP,
the Flask app, and RQ workers that run the real job functions."""

from __future__ import annotations

import io
import json
import logging
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job
from sqlalchemy import create_engine, select, text

from integration import logs, pending, signing
from integration.app import create_app
from integration.emulators import serve_in_thread, start_postgres, start_redis
from integration.emulators.hubspot import HubSpotEmulator
from integration.emulators.llm import LLMStub
from integration.emulators.salesforce import SalesforceEmulator
from integration.emulators.tls import LocalTLS, serve_tls_in_thread
from integration.hubspot.api import HubSpotCRM
from integration.replay import hubspot_headers, load_delivery
from integration.salesforce.api import SalesforceCRM
from integration.settings import get_settings, load_settings
from workers import jobs, store
from workers.worker import LeadscoreQueue, LeadscoreWorker

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
APP_SECRET = "test-client-secret"
APP_ID = "3307201"
PORTAL_ID = "48213377"
HUBSPOT_TOKEN = "pat-test-token"
LLM_KEY = "sk-test"
WEBHOOK_URL = "http://localhost/webhooks/hubspot"
SF_ORG_ID = "00D5g000004XyZaEAK"
SF_TOKEN = "sf-test-access-token"
SF_WEBHOOK_TOKEN = "outbound-message-url-token"
SF_EVENTS_SECRET = "sf-events-test-secret"
SF_INTEGRATION_USER = "0055g00000LsIntAAF"
SF_OUTPUT_FIELDS = (
    "Leadscore_Score__c", "Leadscore_Tier__c", "Leadscore_Reason__c", "Leadscore_Scored_At__c",
    "Leadscore_Details__c", "Leadscore_Holdout__c", "Leadscore_Feedback__c",
)  # fmt: skip


@pytest.fixture(scope="session")
def redis_server():
    with ExitStack() as stack:
        yield start_redis(stack, "--save", "", "--appendonly", "yes", "--appendfsync", "no")


@pytest.fixture(scope="session")
def postgres_server():
    with ExitStack() as stack:
        yield start_postgres(stack)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """An empty database for the score store: a SQLite file, and a fresh database on a real
    PostgreSQL server (the production store)."""
    return _empty_database(request.param, request, tmp_path)


def _empty_database(kind: str, request, tmp_path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/store.sqlite3"
    server = request.getfixturevalue("postgres_server")
    name = f"store_{uuid.uuid4().hex}"  # within PostgreSQL's 63-character limit, unlike test names
    engine = create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{server.rsplit('/', 1)[0]}/{name}"


EACH_STORE = pytest.mark.parametrize("env", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def redis(redis_server):
    client = Redis.from_url(redis_server)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def hubspot():
    emulator = HubSpotEmulator(token=HUBSPOT_TOKEN, portal_id=PORTAL_ID).load_fixtures(FIXTURES / "hubspot")
    server = serve_in_thread(emulator.app())
    emulator.url = server.url
    yield emulator
    server.stop()


@pytest.fixture
def llm():
    stub = LLMStub(FIXTURES / "llm", api_key=LLM_KEY)
    server = serve_in_thread(stub.app())
    stub.url = server.url
    yield stub
    server.stop()


@pytest.fixture(scope="session")
def local_tls():
    with LocalTLS() as tls:
        yield tls


@pytest.fixture
def salesforce(local_tls):
    """The Salesforce emulator over TLS, as an org before `leadscore setup salesforce` ran."""
    emulator = SalesforceEmulator(token=SF_TOKEN).load_fixtures(FIXTURES / "salesforce")
    for name in SF_OUTPUT_FIELDS:
        emulator.remove_lead_field(name)
    server = serve_tls_in_thread(emulator.app(), local_tls)
    emulator.url = server.url
    yield emulator
    server.stop()


@pytest.fixture
def env(request, monkeypatch, tmp_path, redis, redis_server, hubspot, llm, salesforce, local_tls):
    """Environment for every process role, pointing at the local real parts. The score store is a
    SQLite file unless a test parametrizes `env` indirectly with "postgresql"."""
    database_url = _empty_database(getattr(request, "param", "sqlite"), request, tmp_path)
    store.upgrade(database_url)
    values = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_server,
        "HUBSPOT_ACCESS_TOKEN": HUBSPOT_TOKEN,
        "HUBSPOT_APP_SECRET": APP_SECRET,
        "HUBSPOT_APP_ID": APP_ID,
        "HUBSPOT_API_BASE": hubspot.url,
        "LLM_BASE_URL": f"{llm.url}/v1",
        "LLM_API_KEY": LLM_KEY,
        "LLM_MODEL": "gpt-4o-mini",
        "LLM_TIMEOUT_S": "5",
        "BATCH_LINGER_S": "0",
        "FALLBACK_RESCORE_S": "0",
        "SALESFORCE_INSTANCE_URL": salesforce.url,
        "SALESFORCE_ACCESS_TOKEN": SF_TOKEN,
        "SALESFORCE_ORG_IDS": SF_ORG_ID,
        "SALESFORCE_WEBHOOK_TOKEN": SF_WEBHOOK_TOKEN,
        "SALESFORCE_EVENTS_SECRET": SF_EVENTS_SECRET,
        "SALESFORCE_INTEGRATION_USER_ID": SF_INTEGRATION_USER,
        "REQUESTS_CA_BUNDLE": local_tls.ca_bundle(),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    _clear_caches()
    yield values
    _clear_caches()


def _clear_caches():
    get_settings.cache_clear()
    jobs.context.cache_clear()
    jobs._hubspot.cache_clear()
    jobs._salesforce.cache_clear()


@pytest.fixture
def settings(env):
    return load_settings()


@pytest.fixture
def app(settings):
    app = create_app(settings)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def crm(settings, hubspot):
    """The real adapter, with leadscore's properties set up as `leadscore setup hubspot` does."""
    adapter = HubSpotCRM(settings, portal_id=PORTAL_ID)
    adapter.ensure_properties()
    return adapter


@pytest.fixture
def sf_crm(settings, salesforce):
    """The real adapter, with leadscore's fields created as `leadscore setup salesforce` does."""
    adapter = SalesforceCRM(settings, org_id=SF_ORG_ID)
    adapter.ensure_fields()
    return adapter


@pytest.fixture
def queue(redis, settings):
    return Queue(settings.queue_name, connection=redis)


def finished_jobs(redis, queue) -> list[Job]:
    """The jobs finished on the workers' queue and on the backfill, in the order they ended."""
    ids = [i for q in pending.worker_queues(queue.name, redis) for i in q.finished_job_registry.get_job_ids()]
    return sorted(Job.fetch_many(ids, connection=redis), key=lambda job: job.ended_at)


class InProcessWorker(SimpleWorker, LeadscoreWorker):
    """`leadscore worker` (its queues, how it takes and files jobs, its maintenance), running each job
    in this process, where the tests' emulators and settings are."""


@pytest.fixture(autouse=True)
def _no_log_handler_outlives_its_test():
    """A command run under `capsys` (`main([...])`) points leadscore's log handler at the test's
    captured stderr, which pytest closes: the next test to log would get a "Logging error" in its own."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, logs._HANDLER_MARK, False):
            root.removeHandler(handler)


FIXTURE_DAY = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)  # when the fixtures' dates were recent


@pytest.fixture
def fixture_day(monkeypatch):
    """Ages told from FIXTURE_DAY, not today: a fixture's conversion "within the last 7 days" stays so
    however long after it the suite runs."""
    monkeypatch.setattr(jobs, "ages_told_from", lambda: FIXTURE_DAY)
    return FIXTURE_DAY


@pytest.fixture
def run_worker(queue, redis):
    """Drain the queue (and the backfill behind it) with a real RQ worker running the real job functions."""

    def run() -> list[dict]:
        """Each scored lead's outcome, from the score_batch jobs that finished in this run."""
        finished_before = {job.id for job in finished_jobs(redis, queue)}
        queues = [LeadscoreQueue(q.name, connection=redis) for q in pending.worker_queues(queue.name, redis)]
        InProcessWorker(queues, connection=redis).work(burst=True)
        jobs = [job for job in finished_jobs(redis, queue) if job.id not in finished_before]
        return [r for job in jobs if job.func_name.endswith("score_batch") for r in job.return_value()]

    return run


@pytest.fixture
def post_delivery(client):
    """Sign and post a fixture delivery (or raw bytes) exactly as HubSpot would."""

    def post(fixture_or_body, *, headers: dict | None = None, url: str = WEBHOOK_URL):
        body = (
            fixture_or_body
            if isinstance(fixture_or_body, bytes)
            else load_delivery(FIXTURES / "hubspot" / f"{fixture_or_body}.json")
        )
        signed = hubspot_headers(url, body, APP_SECRET)
        return client.post(url, data=body, headers={**signed, **(headers or {})})

    return post


def framed(body: bytes, framing: str) -> dict:
    """Test-client arguments that send `body` with a Content-Length, or chunked as gunicorn hands such a
    body on: no length, and the stream marked as ended by the server."""
    if framing == "content-length":
        return {"data": body}
    return {
        "input_stream": io.BytesIO(body),
        "environ_overrides": {"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"},
    }


def fixture_json(name: str):
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def post_outbound(client):
    """Post an Outbound Message fixture (or raw bytes) as Salesforce does, token in the URL."""

    def post(fixture_or_body, *, token: str | None = SF_WEBHOOK_TOKEN, path: str | None = None):
        body = (
            fixture_or_body
            if isinstance(fixture_or_body, bytes)
            else (FIXTURES / "salesforce" / f"{fixture_or_body}.xml").read_bytes()
        )
        url = path or (f"/webhooks/salesforce/{token}" if token else "/webhooks/salesforce")
        return client.post(
            url, data=body, headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}
        )

    return post


@pytest.fixture
def post_change_events(client):
    """Sign and post a change-event fixture (or a JSON-able value) as a Flow or CDC relay would."""

    def post(fixture_or_value, *, secret: str = SF_EVENTS_SECRET, headers: dict | None = None):
        value = (
            fixture_json(f"salesforce/{fixture_or_value}.json")
            if isinstance(fixture_or_value, str)
            else fixture_or_value
        )
        body = value if isinstance(value, bytes) else json.dumps(value).encode()
        signed = {"Content-Type": "application/json", **signing.sign_headers(secret, body)}
        return client.post("/webhooks/salesforce/events", data=body, headers={**signed, **(headers or {})})

    return post


def pending_events(redis, crm: str, account: str) -> list[dict]:
    """The leads waiting to be scored for an account, oldest first, as their LeadEvents, once
    the account's collector has drained its intake (deduplicated and coalesced)."""
    from integration import pending

    while pending.drain(redis, crm, account):
        pass
    ids = redis.zrange(pending.since_key(crm, account), 0, -1)
    raw = redis.hmget(pending.pending_key(crm, account), ids) if ids else []
    return [json.loads(r) for r in raw]


def stored_outcomes(env) -> list[tuple]:
    """The outcomes the score store holds: (crm, account, lead, kind, source)."""
    with store.Store(env["DATABASE_URL"]).engine.connect() as connection:
        rows = connection.execute(
            select(store.outcomes.c.crm, store.outcomes.c.account_id, store.outcomes.c.lead_id,
                   store.outcomes.c.kind, store.outcomes.c.source).order_by(store.outcomes.c.id)
        )  # fmt: skip
        return [tuple(row) for row in rows]
