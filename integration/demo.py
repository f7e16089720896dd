"""`make demo`: the whole pipeline as it runs in production, on its embedded defaults.

With no HubSpot credentials it starts a local Redis, the HubSpot emulator seeded
from fixtures and the LLM stub, then the real web app (gunicorn) and a real RQ
worker, replays a burst of signed fixture deliveries and prints the rep's list
view once the scores are written. With HUBSPOT_ACCESS_TOKEN set, the same web
and worker processes serve that real portal until interrupted.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from datetime import datetime
from pathlib import Path

import requests
from redis import Redis
from rq import Queue

from integration import metrics, pending
from integration.emulators import (
    FIXTURES,
    free_port,
    redis_reachable,
    spawn_logged,
    start_redis,
    wait_until,
)
from integration.replay import load_delivery, sign_and_post
from integration.settings import get_settings

DEMO_SECRET = "demo-client-secret"
DEMO_TOKEN = "demo-private-app-token"
DEMO_LLM_KEY = "demo-llm-key"
DEMO_APP_ID = "3307201"
DEMO_PORTAL = "48213377"
DEMO_SF_TOKEN = "demo-salesforce-access-token"
DEMO_SF_WEBHOOK_TOKEN = "demo-outbound-message-token"
SALESFORCE_BURST = "outbound_message__demo_burst"
BURST = "contact.creation__demo_burst"
FOLLOW_UPS = ("contact.propertyChange__demo_changes", "contact.propertyChange__demo_rep_edits")


def _start_services(stack: ExitStack, env: dict, port: int, logs: Path, bind: str = "127.0.0.1") -> str:
    web = [sys.executable, "-m", "gunicorn", "--bind", f"{bind}:{port}", "--workers", "2",
           "--access-logfile", "-", "--logger-class", "integration.access_log.RedactingAccessLog",
           "integration.app:create_app()"]  # fmt: skip
    spawn_logged(stack, web, env, logs / "web.log")
    spawn_logged(stack, [sys.executable, "-m", "integration.cli", "worker"], env, logs / "worker.log")
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        with suppress(requests.RequestException):
            return requests.get(f"{base}/healthz", timeout=1).ok
        return False

    wait_until(healthy, 30, f"the web app (see {logs / 'web.log'})")
    return base


def _queue_idle(redis_url: str) -> bool:
    redis = Redis.from_url(redis_url)
    queue = Queue(get_settings().queue_name, connection=redis)
    return pending.depth(redis) == 0 and queue.count == 0 and queue.started_job_registry.count == 0


def _print_list_view(title: str, rows: list[dict]) -> None:
    print(f"{title}, as a rep's list view shows them:")
    rows = sorted(rows, key=lambda r: -int(float(r.get("leadscore_score") or -1)))
    header = f"{'Name':<20} {'Company':<26} {'Title':<34} {'Score':>5} {'Tier':<4}  Reason"
    print(header)
    print("-" * (len(header) + 70))
    for r in rows:
        name = f"{r.get('firstname') or ''} {r.get('lastname') or ''}".strip() or "(no name)"
        print(
            f"{name[:20]:<20} {(r.get('company') or '')[:26]:<26} {(r.get('jobtitle') or '')[:34]:<34} "
            f"{r.get('leadscore_score') or '–':>5} {r.get('leadscore_tier') or '–':<4}  "
            f"{r.get('leadscore_reason') or 'not scored yet'}"
        )


def _serve_real_portal(stack: ExitStack, env: dict) -> int:
    port = get_settings().port
    logs = Path(tempfile.mkdtemp(prefix="leadscore-demo-logs-"))
    base = _start_services(stack, env, port, logs, bind="0.0.0.0")
    print(f"Serving your HubSpot portal. Webhook target URL: {base}/webhooks/hubspot")
    print(f"(behind a proxy or tunnel, set PUBLIC_BASE_URL). Logs: {logs}. Ctrl-C to stop.")
    with suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)
    return 0


def run_demo(timeout_s: float = 90.0) -> int:
    settings = get_settings()  # the environment and `.env`, as the web and worker processes read them
    with ExitStack() as stack:
        env = dict(os.environ)
        if settings.hubspot_configured:
            if not redis_reachable(settings.redis_url):
                env["REDIS_URL"] = start_redis(stack, "--appendonly", "yes")
            return _serve_real_portal(stack, env)
        # A private Redis, so that seen marks from earlier runs cannot swallow the replayed burst.
        env["REDIS_URL"] = start_redis(stack, "--appendonly", "yes")
        return _run_on_emulators(stack, env, timeout_s)


def _run_on_emulators(stack: ExitStack, env: dict, timeout_s: float) -> int:
    from integration.emulators import serve_in_thread
    from integration.emulators.hubspot import HubSpotEmulator
    from integration.emulators.llm import LLMStub
    from integration.emulators.salesforce import SalesforceEmulator
    from integration.emulators.tls import LocalTLS, serve_tls_in_thread
    from integration.hubspot.api import HubSpotCRM
    from integration.salesforce import OUTPUT_FIELDS
    from integration.salesforce.api import SalesforceCRM

    hubspot = HubSpotEmulator(token=DEMO_TOKEN).load_fixtures(FIXTURES / "hubspot")
    hubspot_server = serve_in_thread(hubspot.app())
    stack.callback(hubspot_server.stop)
    salesforce = SalesforceEmulator(token=DEMO_SF_TOKEN).load_fixtures(FIXTURES / "salesforce")
    for name in OUTPUT_FIELDS.values():  # an org where `leadscore setup salesforce` has not run yet
        salesforce.remove_lead_field(name)
    tls = stack.enter_context(LocalTLS())
    salesforce_server = serve_tls_in_thread(salesforce.app(), tls)
    stack.callback(salesforce_server.stop)
    stub = LLMStub(FIXTURES / "llm", api_key=DEMO_LLM_KEY, latency_s=0.2)
    llm_server = serve_in_thread(stub.app())
    stack.callback(llm_server.stop)

    env.update(
        HUBSPOT_ACCESS_TOKEN=DEMO_TOKEN,
        HUBSPOT_APP_SECRET=DEMO_SECRET,
        HUBSPOT_APP_ID=DEMO_APP_ID,
        HUBSPOT_API_BASE=hubspot_server.url,
        SALESFORCE_INSTANCE_URL=salesforce_server.url,
        SALESFORCE_ACCESS_TOKEN=DEMO_SF_TOKEN,
        SALESFORCE_ORG_IDS=salesforce.org_id,
        SALESFORCE_WEBHOOK_TOKEN=DEMO_SF_WEBHOOK_TOKEN,
        SALESFORCE_INTEGRATION_USER_ID=salesforce.integration_user_id,
        REQUESTS_CA_BUNDLE=tls.ca_bundle(),  # trust the emulator's throw-away CA, and only that extra
        LLM_BASE_URL=f"{llm_server.url}/v1",
        LLM_API_KEY=DEMO_LLM_KEY,
        LOG_LEVEL="WARNING",
    )
    # Always its own store: the demo's scores must never land in a team's store, whatever DATABASE_URL says.
    env["DATABASE_URL"] = f"sqlite:///{stack.enter_context(tempfile.TemporaryDirectory())}/demo.sqlite3"
    os.environ.update(env)
    get_settings.cache_clear()
    settings = get_settings()
    print(f"leadscore demo: HubSpot emulator {hubspot_server.url}, Salesforce emulator "
          f"{salesforce_server.url}, LLM stub {llm_server.url}, Redis {env['REDIS_URL']}")  # fmt: skip
    yours = [
        f"{name}={value}"
        for name, value in (
            ("SCORING_CONFIG_PATH", settings.scoring_config_path),
            ("SCORING_MODEL_PATH", settings.scoring_model_path),
            ("HOLDOUT_SHARE", settings.holdout_share),
        )
        if value
    ]
    if yours:  # from the environment or `.env`, as the web and worker processes read them
        print(f"Scoring with your {', '.join(yours)}, not the defaults README shows")
    hubspot_crm = HubSpotCRM(settings, portal_id=DEMO_PORTAL)
    print(f"setup hubspot: created {', '.join(hubspot_crm.ensure_properties().created)}")
    salesforce_crm = SalesforceCRM(settings, org_id=salesforce.org_id)
    print(f"setup salesforce: created {', '.join(salesforce_crm.ensure_fields().created)}")

    logs = Path(tempfile.mkdtemp(prefix="leadscore-demo-logs-"))
    base = _start_services(stack, env, free_port(), logs)
    print(f"web {base} and an RQ worker are running (logs in {logs})")
    _hubspot_scene(hubspot, hubspot_crm, f"{base}/webhooks/hubspot", env["REDIS_URL"], stub, logs, timeout_s)
    outbound_url = f"{base}/webhooks/salesforce/{DEMO_SF_WEBHOOK_TOKEN}"
    _salesforce_scene(salesforce, salesforce_crm, outbound_url, env["REDIS_URL"], logs, timeout_s)
    _store_scene(settings.database_url)
    return 0


def _store_scene(database_url: str) -> None:
    """What the score store kept: the raw material for `leadscore evaluate` and `leadscore train`."""
    from workers.store import Store

    time.sleep(0.5)  # the worker keeps a batch's scores just after writing them to the CRM
    counts = Store(database_url).counts()
    print(f"\n== Score store: {counts['scores']} scores kept with their inputs, {counts['outcomes']} "
          f"outcomes (customers, opportunities, converted Leads), {counts['feedback']} rep feedback; "
          "`leadscore evaluate --with-store` reports on them")  # fmt: skip


def _hubspot_scene(emulator, crm, webhook: str, redis_url: str, stub, logs: Path, timeout_s: float) -> None:
    print("\n== HubSpot: 24 new contacts arrive\n")
    emulator.echo_writes_to(webhook, DEMO_SECRET, DEMO_APP_ID, DEMO_PORTAL)
    burst = json.loads(load_delivery(FIXTURES / "hubspot" / f"{BURST}.json"))
    contact_ids = [str(event["objectId"]) for event in burst]
    started = time.time()
    for chunk in range(0, len(burst), 6):  # HubSpot batches events; send the burst as 4 deliveries
        body = json.dumps(burst[chunk : chunk + 6]).encode()
        response = sign_and_post(webhook, body, DEMO_SECRET)
        print(f"delivery of {len(burst[chunk:chunk + 6])} contact.creation events → "
              f"{response.status_code} {response.json()['queued']} queued")  # fmt: skip

    def all_scored() -> bool:
        return all(emulator.contacts[i]["properties"].get("leadscore_scored_at") for i in contact_ids)

    wait_until(all_scored, timeout_s, f"scoring of {len(contact_ids)} contacts (see {logs / 'worker.log'})")
    latencies = [
        datetime.fromisoformat(emulator.contacts[i]["properties"]["leadscore_scored_at"]).timestamp()
        - started
        for i in contact_ids
    ]
    print(f"\nall {len(contact_ids)} contacts scored: median {statistics.median(latencies):.1f}s, "
          f"slowest {max(latencies):.1f}s after the first delivery "
          f"(one worker; the LLM stub answers in {stub.latency_s:.1f}s)\n")  # fmt: skip
    _print_list_view("HubSpot contacts", crm.list_scored(contact_ids))

    before = {i: dict(emulator.contacts[i]["properties"]) for i in contact_ids}
    writes_before = len(emulator.writes)
    print("\nReps edit some leads; HubSpot sends property changes (and echoes of leadscore's own writes):")
    for name in FOLLOW_UPS:
        body = load_delivery(FIXTURES / "hubspot" / f"{name}.json")
        emulator.apply_changes(json.loads(body))
        response = sign_and_post(webhook, body, DEMO_SECRET)
        summary = response.json()
        print(f"  {name}: {response.status_code} received {summary['received']}, "
              f"queued {summary['queued']}, ignored {summary['ignored']}")  # fmt: skip
    time.sleep(1.0)  # let the last echo deliveries arrive
    wait_until(lambda: _queue_idle(redis_url), timeout_s, "the follow-up scoring")
    time.sleep(0.5)
    for contact_id in contact_ids:
        old, new = before[contact_id], emulator.contacts[contact_id]["properties"]
        if old.get("leadscore_score") != new.get("leadscore_score"):
            print(f"  {new.get('firstname')} {new.get('lastname')}: {old['leadscore_score']} "
                  f"{old['leadscore_tier']} → {new['leadscore_score']} {new['leadscore_tier']} "
                  f"({new['leadscore_reason']})")  # fmt: skip
    rewrites = len(emulator.writes) - writes_before
    echoes = emulator.echo_responses
    ignored = sum(r.get("ignored", 0) for r in echoes)
    queued = sum(r.get("queued", 0) for r in echoes)
    print(f"\n{rewrites} contacts rewritten, the rest unchanged (no write). "
          f"{len(echoes)} echo deliveries of leadscore's own writes: {ignored} events ignored, "
          f"{queued} events queued.")  # fmt: skip


def _salesforce_scene(emulator, crm, outbound_url: str, redis_url: str, logs: Path, timeout_s: float) -> None:
    print("\n== Salesforce: an Outbound Message with 12 new Leads\n")
    emulator.echo_writes_to(outbound_url)  # the org's workflow fires again on leadscore's own writes
    body = (FIXTURES / "salesforce" / f"{SALESFORCE_BURST}.xml").read_bytes()
    lead_ids = [lead_id for lead_id, record in emulator.leads.items() if not record.get("IsConverted")]
    redis = Redis.from_url(redis_url)
    enqueued_before = metrics.counter_value(redis, "events_enqueued_total", crm="salesforce")
    response = requests.post(outbound_url, data=body, headers={"Content-Type": "text/xml"}, timeout=30)
    acked = b"<Ack>true</Ack>" in response.content
    print(f"Outbound Message of 12 notifications → {response.status_code}, Ack {str(acked).lower()}")

    def all_scored() -> bool:
        return all(emulator.leads[i].get("Leadscore_Scored_At__c") for i in lead_ids)

    wait_until(all_scored, timeout_s, f"scoring of {len(lead_ids)} Leads (see {logs / 'worker.log'})")
    time.sleep(1.0)  # let the echo messages of the last writes arrive
    wait_until(lambda: _queue_idle(redis_url), timeout_s, "the echoes")
    print(f"all {len(lead_ids)} open Leads scored; the converted one was skipped\n")
    _print_list_view("Salesforce Leads", crm.list_scored(lead_ids))
    echoes = len(emulator.echo_statuses)
    extra = metrics.counter_value(redis, "events_enqueued_total", crm="salesforce") - enqueued_before - 12
    unchanged = metrics.counter_value(redis, "leads_skipped_unchanged_total", crm="salesforce")
    print(f"\n{echoes} echo Outbound Message(s) of leadscore's own writes acknowledged "
          f"({sorted(set(emulator.echo_statuses))}); {extra:.0f} events queued for them, and "
          f"{unchanged:.0f} leads read and found unchanged, so not written again. A Flow with the entry "
          "condition `LastModifiedById ≠ integration user` sends no echoes.")  # fmt: skip
