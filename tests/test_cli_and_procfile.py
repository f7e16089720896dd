"""The `leadscore` commands, and the Procfile's own lines run as real processes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
from redis import Redis

from integration import pending
from integration.app import create_app
from integration.cli import build_parser, main
from integration.emulators import free_port, serve_in_thread, start_redis, wait_until
from integration.replay import hubspot_headers, load_delivery
from integration.salesforce import api as salesforce_api
from integration.salesforce.api import FIELD_DEFINITIONS
from integration.settings import get_settings
from tests.conftest import APP_SECRET, FIXTURES, SF_WEBHOOK_TOKEN, WEBHOOK_URL

ROOT = Path(__file__).resolve().parent.parent
SINGLE = FIXTURES / "hubspot" / "contact.creation__single.json"
TIER_HELP = "A = call first, B = call this week, C = follow up, D = nurture (leadscore)"


def test_setup_hubspot_is_idempotent(env, hubspot, capsys):
    assert main(["setup", "hubspot"]) == 0
    first = capsys.readouterr().out
    assert main(["setup", "hubspot"]) == 0
    second = capsys.readouterr().out

    assert "created  group leadscore" in first and "created  leadscore_details" in first
    assert "created" not in second and "exists   leadscore_score" in second
    assert "Show Lead score feedback on the contact record" in second  # reps must be able to set it
    assert "and Lead score holdout while HOLDOUT_SHARE is above 0" in second  # a blank score on purpose
    assert second.splitlines()[-1] == (
        "  - Once the webhooks reach leadscore and a worker runs: `leadscore rescore --crm hubspot`, so the "
        "contacts that exist already get a score (new and changed ones are scored as they come)."
    )
    tier = hubspot.properties["leadscore_tier"]
    assert (tier["type"], [o["value"] for o in tier["options"]]) == ("enumeration", ["A", "B", "C", "D"])
    assert tier["description"] == TIER_HELP  # every tier said, not only A and D
    assert hubspot.properties["leadscore_score"]["type"] == "number"
    assert {p["groupName"] for n, p in hubspot.properties.items() if n.startswith("leadscore_")} == {
        "leadscore"
    }


def test_setup_hubspot_refused_a_property_says_which_and_what_hubspot_said(env, hubspot, capsys):
    hubspot.refused_properties["leadscore_score"] = (400, "VALIDATION_ERROR", "label Lead score is taken")

    assert main(["setup", "hubspot"]) == 2
    assert capsys.readouterr().err == (
        "leadscore: HubSpot refused to create the contact property leadscore_score (label 'Lead score'): "
        "label Lead score is taken; fix what it names (another property with that label, say), then run "
        "`leadscore setup hubspot` again\n"
    )


def test_setup_hubspot_counts_a_property_another_setup_just_created_as_existing(env, hubspot, capsys):
    message = "Object already exists. Property leadscore_tier already exists"
    hubspot.refused_properties["leadscore_tier"] = (409, "OBJECT_ALREADY_EXISTS", message)

    assert main(["setup", "hubspot"]) == 0
    assert "exists   leadscore_tier" in capsys.readouterr().out


def test_setup_without_token_says_what_to_set(env, monkeypatch, capsys):
    from integration.settings import get_settings

    monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", "")
    get_settings.cache_clear()

    assert main(["setup", "hubspot"]) == 2
    assert "HUBSPOT_ACCESS_TOKEN is not set" in capsys.readouterr().err


HUBSPOT_TARGET = "https://leadscore.example.com/webhooks/hubspot"


def test_hubspot_project_is_a_static_private_app_with_the_scopes_leadscore_uses(tmp_path, capsys):
    assert main(["hubspot-project", "--target-url", HUBSPOT_TARGET, "--out", str(tmp_path / "hs")]) == 0

    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [f"wrote    {tmp_path / 'hs' / name}" for name in (
        "hsproject.json", "src/app/app-hsmeta.json", "src/app/webhooks/webhooks-hsmeta.json")]  # fmt: skip
    assert out[3].startswith(f"Next: `cd {tmp_path / 'hs'} && hs project upload` (the HubSpot CLI; ")
    project = json.loads((tmp_path / "hs" / "hsproject.json").read_text())
    assert project == {"name": "leadscore", "srcDir": "src", "platformVersion": "2026.09"}
    app = json.loads((tmp_path / "hs" / "src" / "app" / "app-hsmeta.json").read_text())
    assert (app["uid"], app["type"], app["config"]["distribution"]) == ("leadscore", "app", "private")
    assert app["config"]["auth"] == {
        "type": "static",
        "requiredScopes": [
            "oauth", "crm.objects.contacts.read", "crm.objects.contacts.write", "crm.schemas.contacts.read",
            "crm.schemas.contacts.write", "crm.objects.deals.read",
        ],
        "optionalScopes": ["sales-email-read", "crm.objects.companies.read"],
        "conditionallyRequiredScopes": [],
    }  # fmt: skip


def _subscriptions(files: dict) -> tuple[str, set, set]:
    """The target URL, the subscription types, and the properties whose change is subscribed."""
    config = files["src/app/webhooks/webhooks-hsmeta.json"]["config"]
    subscriptions = config["subscriptions"]
    every = [*subscriptions["legacyCrmObjects"], *subscriptions["hubEvents"]]
    assert all(s["active"] for s in every)
    watched = {s["propertyName"] for s in every if s["subscriptionType"] == "contact.propertyChange"}
    return config["settings"]["targetUrl"], {s["subscriptionType"] for s in every}, watched


def test_hubspot_project_subscribes_to_every_event_leadscore_handles_and_what_the_score_reads():
    from integration.hubspot import FEEDBACK_PROPERTY, SHOWN_PROPERTIES
    from integration.hubspot.api import CONTACT_PROPERTIES
    from integration.hubspot.project import ENGAGEMENT_PROPERTIES, project_files
    from integration.hubspot.webhook import HANDLED_EVENTS

    url, types, watched = _subscriptions(project_files(HUBSPOT_TARGET))

    assert url == HUBSPOT_TARGET
    assert types == {t for t in HANDLED_EVENTS if not t.startswith("object.")}  # the classic form of each
    merge = "hs_merged_object_ids"  # comes with a contact.merge
    read = set(CONTACT_PROPERTIES) - {"firstname", "lastname", merge}
    assert watched == read - set(ENGAGEMENT_PROPERTIES) | {FEEDBACK_PROPERTY, *SHOWN_PROPERTIES}
    _, _, with_engagement = _subscriptions(project_files(HUBSPOT_TARGET, True, ("acme_fit_score",)))
    assert with_engagement == read | {FEEDBACK_PROPERTY, *SHOWN_PROPERTIES, "acme_fit_score"}


@pytest.mark.parametrize(
    ("target", "said"),
    [
        ("http://leadscore.example.com/webhooks/hubspot", "got 'http://leadscore.example.com/webhooks/hubspot'"),
        ("https://leadscore.example.com/webhooks/salesforce/x", "/webhooks/hubspot, got 'https://"),
        ("https:///webhooks/hubspot", "got 'https:///webhooks/hubspot'"),
    ],
)  # fmt: skip
def test_hubspot_project_refuses_a_target_hubspot_cannot_post_to(tmp_path, capsys, target, said):
    assert main(["hubspot-project", "--target-url", target, "--out", str(tmp_path / "hs")]) == 2

    err = capsys.readouterr().err
    assert err.startswith("leadscore hubspot-project: --target-url must be leadscore's public HTTPS webhook")
    assert said in err
    assert not (tmp_path / "hs").exists()


def test_hubspot_project_refuses_a_property_label_for_its_internal_name(tmp_path, capsys):
    args = ["hubspot-project", "--target-url", HUBSPOT_TARGET, "--out", str(tmp_path / "hs")]

    assert main([*args, "--property", "Fit Score"]) == 2
    assert capsys.readouterr().err == (
        "leadscore hubspot-project: --property 'Fit Score' is not a HubSpot property's internal name "
        "(lower-case letters, digits and underscores, as Settings > Properties shows it)\n"
    )
    assert not (tmp_path / "hs").exists()


def test_hubspot_project_leaves_a_project_already_there_alone(tmp_path, capsys):
    args = ["hubspot-project", "--target-url", HUBSPOT_TARGET, "--out", str(tmp_path)]
    (tmp_path / "hsproject.json").write_text("{}")

    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"leadscore hubspot-project: {tmp_path} already holds a HubSpot project: give a new --out, or delete "
        "it first\n"
    )
    assert (tmp_path / "hsproject.json").read_text() == "{}"


def test_replay_signs_and_posts_fixtures_to_a_running_service(app, queue, capsys):
    server = serve_in_thread(app)
    try:
        code = main(["replay", str(SINGLE), "--url", f"{server.url}/webhooks/hubspot"])
    finally:
        server.stop()

    assert code == 0
    assert f"{SINGLE}: 200" in capsys.readouterr().out
    assert pending.depth(queue.connection) == 1


def test_replay_posts_to_port_by_default_and_its_help_says_so(app, queue, monkeypatch, capsys):
    server = serve_in_thread(app)
    port = server.url.rsplit(":", 1)[1]
    monkeypatch.setenv("PORT", port)
    monkeypatch.setenv("COLUMNS", "200")  # one help line per option
    try:
        code = main(["replay", str(SINGLE)])
    finally:
        server.stop()
    with pytest.raises(SystemExit):
        main(["replay", "--help"])

    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{SINGLE}: 200 ")
    assert pending.depth(queue.connection) == 1
    assert (
        "  --url URL        the webhook to post to (default: http://127.0.0.1:$PORT/webhooks/hubspot, PORT "
        "from the environment or .env, else 5000)"
    ) in out.splitlines()


def test_replay_reports_refusals(app, queue, capsys):
    server = serve_in_thread(app)
    try:
        code = main(["replay", str(SINGLE), "--url", f"{server.url}/webhooks/hubspot", "--secret", "wrong"])
    finally:
        server.stop()

    assert code == 1
    assert ": 401 " in capsys.readouterr().out
    assert pending.depth(queue.connection) == 0


def test_replay_of_a_missing_file_or_to_nothing_listening_says_so_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["replay", str(missing), "--url", "http://127.0.0.1:1/webhooks/hubspot"]) == 2
    assert capsys.readouterr().err == f"leadscore replay: No such file or directory: {missing}\n"

    url = f"http://127.0.0.1:{free_port()}/webhooks/hubspot"  # nothing listens there
    assert main(["replay", str(SINGLE), "--url", url, "--secret", "s"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"leadscore replay: cannot post to {url}: ") and err.count("\n") == 1


@pytest.fixture
def fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_replay_reads_port_from_dot_env_too(tmp_path, monkeypatch, capsys, fresh_settings):
    port = free_port()  # nothing listens there: the refusal names the URL replay chose
    (tmp_path / ".env").write_text(f"PORT={port}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PORT", raising=False)

    assert main(["replay", str(SINGLE), "--secret", "s"]) == 2
    assert capsys.readouterr().err.startswith(
        f"leadscore replay: cannot post to http://127.0.0.1:{port}/webhooks/hubspot: "
    )


def test_replay_of_a_file_it_cannot_sign_or_read_says_so_in_one_line(
    tmp_path, monkeypatch, capsys, fresh_settings
):
    monkeypatch.setenv("HUBSPOT_APP_SECRET", "")
    url = "http://127.0.0.1:1/webhooks/hubspot"
    assert main(["replay", str(SINGLE), "--url", url]) == 2
    assert capsys.readouterr().err == (
        f"leadscore replay: {SINGLE}: a HubSpot delivery needs HUBSPOT_APP_SECRET (or --secret) to sign it\n"
    )
    garbled = tmp_path / "garbled.json"
    garbled.write_text("[{not json")
    assert main(["replay", str(garbled), "--url", url, "--secret", "s"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"leadscore replay: {garbled} is not a JSON delivery: ") and err.count("\n") == 1


@pytest.mark.parametrize("command", [["failed"], ["requeue", "--all"]])
def test_failed_and_requeue_without_redis_say_so_in_one_line(env, monkeypatch, capsys, command):
    from integration.settings import get_settings

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    get_settings.cache_clear()

    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("leadscore: cannot reach Redis (") and err.count("\n") == 1
    assert err.endswith("start it, or point REDIS_URL at the workers' Redis\n")
    get_settings.cache_clear()


def test_requeue_says_which_ids_are_not_failed_jobs_and_requeues_the_rest(env, queue, redis, capsys):
    from rq import SimpleWorker

    failed = queue.enqueue("json.loads", "{not json")
    SimpleWorker([queue], connection=redis).work(burst=True)
    waiting = queue.enqueue("json.loads", "1")  # queued, never failed

    assert main(["requeue", "mistyped-id", waiting.id, failed.id]) == 2
    assert capsys.readouterr() == (
        f"requeued {failed.id}\n",
        f"not a failed job: mistyped-id\nnot a failed job: {waiting.id}\n",
    )
    assert queue.get_job_ids() == [waiting.id, failed.id]
    assert queue.failed_job_registry.get_job_ids() == []


def test_outcomes_sync_of_a_crm_not_configured_says_what_to_set(env, monkeypatch, capsys):
    from integration.settings import get_settings

    monkeypatch.setenv("HUBSPOT_ACCESS_TOKEN", "")
    get_settings.cache_clear()

    assert main(["outcomes", "sync", "--crm", "hubspot", "--account", "12345"]) == 2
    assert capsys.readouterr().err == (
        "leadscore: no CRM to sync: set HubSpot's credentials (README, Configuration)\n"
    )
    get_settings.cache_clear()


def test_outcomes_sync_before_any_portal_is_known_says_to_name_it(env, capsys):
    assert main(["outcomes", "sync", "--crm", "hubspot"]) == 2  # no lead scored yet: no portal known
    assert capsys.readouterr().err == (
        "leadscore: no portal or org to sync yet (leadscore learns a HubSpot portal from the first lead it "
        "scores, a Salesforce org from SALESFORCE_ORG_IDS): name it with --crm CRM --account ID\n"
    )


@pytest.mark.parametrize("crm", ["hubspot", "salesforce"])
def test_outcomes_sync_refuses_an_account_the_credentials_do_not_reach(env, request, crm, capsys):
    """Outcomes read with one account's credentials must not be filed under another id."""
    from workers import store

    request.getfixturevalue(crm)  # its emulator
    store.upgrade(env["DATABASE_URL"])
    scored = store.ScoreRecord(crm, "99999", "1", 50, "C", "r", "rules", "f", {}, {})  # another account's
    store.Store(env["DATABASE_URL"]).record_scores([scored])
    what = {"hubspot": "portal HUBSPOT_ACCESS_TOKEN belongs to (48213377)",
            "salesforce": "org the Salesforce credentials reach (00D5g000004XyZaEAK)"}[crm]  # fmt: skip

    assert main(["outcomes", "sync", "--crm", crm, "--account", "99999"]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: --account 99999 is not the {what}: leave --account out, or set the credentials of "
        "99999\n"
    )


def test_outcomes_sync_without_an_account_refuses_the_stores_when_the_credentials_reach_another(
    env, hubspot, capsys
):
    """The store's scores name one portal; a token changed since reaches another: reading with it and
    filing under the store's would give one portal's outcomes to the other's leads."""
    from workers import store

    store.upgrade(env["DATABASE_URL"])
    scored = store.ScoreRecord("hubspot", "99999", "1", 50, "C", "r", "rules", "f", {}, {})
    store.Store(env["DATABASE_URL"]).record_scores([scored])

    assert main(["outcomes", "sync", "--crm", "hubspot"]) == 2
    assert capsys.readouterr().err == (
        "leadscore: hubspot: the store's scores are of account 99999, but the credentials reach 48213377: "
        "what they read would be filed under the wrong account; set the credentials of 99999\n"
    )


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


@pytest.fixture
def procfile_processes(env, crm, tmp_path):
    """The Procfile's `release` step, then `web` and `worker` as it starts them, configured only by
    the environment (a fresh score store, so `release` has a schema to create)."""
    port = free_port()
    process_env = {
        **os.environ,
        **env,
        "DATABASE_URL": f"sqlite:///{tmp_path}/release.sqlite3",
        "PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    commands = procfile()
    release = subprocess.run(["bash", "-c", commands.pop("release")], env=process_env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert release.returncode == 0, release.stderr
    assert "is at head: {'scores': 0, 'outcomes': 0, 'feedback': 0}" in release.stdout
    procs = [  # each one's output in tmp_path / "<name>.log"
        subprocess.Popen(["bash", "-c", command], env=process_env, cwd=ROOT, start_new_session=True,
                         stdout=(tmp_path / f"{name}.log").open("w"), stderr=subprocess.STDOUT)
        for name, command in commands.items()
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.2)
    worker_log = tmp_path / "worker.log"
    while time.monotonic() < deadline and "Listening on" not in worker_log.read_text():
        time.sleep(0.2)  # its imports and start checks take seconds more than the web's on a busy machine
    yield url
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=15)


def test_procfile_web_and_worker_score_a_replayed_delivery(procfile_processes, hubspot, capsys, tmp_path):
    assert set(procfile()) == {"release", "web", "worker"}
    assert main(["replay", str(SINGLE), "--url", f"{procfile_processes}/webhooks/hubspot"]) == 0

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not hubspot.writes:
        time.sleep(0.1)

    assert hubspot.writes, "\n".join(
        f"{log}:\n{(tmp_path / log).read_text()[-4000:]}" for log in ("web.log", "worker.log")
    )
    props = hubspot.contact_properties("74300000101")
    assert (props["leadscore_score"], props["leadscore_tier"]) == ("89", "A")
    assert props["leadscore_reason"] == "Inbound demo request, Connected; VP of Sales at 100-500-person SaaS"


def test_procfile_web_access_log_hides_the_salesforce_webhook_token(procfile_processes, tmp_path):
    for url in (f"/webhooks/salesforce/{SF_WEBHOOK_TOKEN}", f"/webhooks/salesforce?token={SF_WEBHOOK_TOKEN}"):
        requests.post(f"{procfile_processes}{url}", data=b"<not-soap/>", timeout=5)
    time.sleep(0.5)

    logged = (tmp_path / "web.log").read_text()
    assert SF_WEBHOOK_TOKEN not in logged
    assert '"POST /webhooks/salesforce/[redacted] HTTP/1.1" 400' in logged
    assert '"POST /webhooks/salesforce?token=[redacted] HTTP/1.1" 400' in logged


def test_setup_salesforce_is_idempotent_and_says_what_is_left(env, salesforce, capsys):
    assert main(["setup", "salesforce"]) == 0
    first = capsys.readouterr().out
    assert main(["setup", "salesforce"]) == 0
    second = capsys.readouterr().out

    assert "created  Leadscore_Score__c" in first and "created  Leadscore_Details__c" in first
    assert "created" not in second and "exists   Leadscore_Tier__c" in second
    assert "field-level security on the 7 Leadscore fields" in second and "list view" in second.lower()
    assert "except Lead Score Feedback, which reps edit" in second  # they could not set it read-only
    assert "Put Lead Score Feedback on the reps' Lead page layout" in second
    assert "and Lead Score Holdout while HOLDOUT_SHARE is above 0" in second  # a blank score on purpose
    assert second.splitlines()[-1] == (
        "  - Once the webhooks reach leadscore and a worker runs: `leadscore rescore --crm salesforce`, so "
        "the Leads that exist already get a score (new and changed ones are scored as they come)."
    )
    tier = salesforce.lead_fields["Leadscore_Tier__c"]
    assert (tier["type"], [v["value"] for v in tier["picklistValues"]]) == ("picklist", ["A", "B", "C", "D"])
    assert tier["inlineHelpText"] == TIER_HELP  # what reps see; the description is for admins
    assert all(salesforce.lead_fields[name]["inlineHelpText"] for name in FIELD_DEFINITIONS)
    assert salesforce.lead_fields["Leadscore_Score__c"]["type"] == "double"
    feedback = salesforce.lead_fields["Leadscore_Feedback__c"]["picklistValues"]
    assert [(v["value"], v["label"]) for v in feedback] == [
        ("too_high", "Too high"), ("too_low", "Too low"), ("right", "Right")
    ]  # reps read the labels; leadscore reads and writes the values  # fmt: skip


def test_setup_salesforce_adds_help_text_to_fields_made_without_it_and_keeps_an_admins(
    env, salesforce, capsys, monkeypatch
):
    without_help = {
        name: {key: value for key, value in spec.items() if key != "inlineHelpText"}
        for name, spec in FIELD_DEFINITIONS.items()
    }
    monkeypatch.setattr(salesforce_api, "FIELD_DEFINITIONS", without_help)  # as setup made them before
    assert main(["setup", "salesforce"]) == 0
    assert salesforce.lead_fields["Leadscore_Tier__c"]["inlineHelpText"] is None
    salesforce.lead_fields["Leadscore_Reason__c"]["inlineHelpText"] = "Our own words"  # an admin's
    monkeypatch.setattr(salesforce_api, "FIELD_DEFINITIONS", FIELD_DEFINITIONS)
    capsys.readouterr()

    assert main(["setup", "salesforce"]) == 0
    said = capsys.readouterr().out
    assert "updated  Leadscore_Tier__c (help text for reps added)" in said and "created" not in said
    assert "exists   Leadscore_Reason__c" in said
    tier = salesforce.lead_fields["Leadscore_Tier__c"]
    assert tier["inlineHelpText"] == TIER_HELP
    assert [v["value"] for v in tier["picklistValues"]] == ["A", "B", "C", "D"]  # the rest of it as it was
    assert salesforce.lead_fields["Leadscore_Reason__c"]["inlineHelpText"] == "Our own words"
    assert main(["setup", "salesforce"]) == 0
    assert "updated  " not in capsys.readouterr().out  # up to date now


def test_setup_salesforce_for_a_field_the_user_cannot_see_says_to_grant_field_level_security(
    env, salesforce, capsys
):
    assert main(["setup", "salesforce"]) == 0
    salesforce.hide_lead_field("Leadscore_Score__c")  # the admin has not granted field-level security yet
    capsys.readouterr()

    assert main(["setup", "salesforce"]) == 2
    assert capsys.readouterr().err == (
        "leadscore: Lead.Leadscore_Score__c exists, but this Salesforce user cannot see it: give the "
        "integration user field-level security on Lead Score (Setup > Object Manager > Lead > Fields & "
        "Relationships > Lead Score > Set Field-Level Security), then run `leadscore setup salesforce` "
        "again\n"
    )


def test_setup_salesforce_by_a_user_who_may_not_create_fields_names_the_permission(env, salesforce, capsys):
    salesforce.metadata_forbidden = True

    assert main(["setup", "salesforce"]) == 2
    assert capsys.readouterr().err == (
        "leadscore: this Salesforce user may not create fields: give it the Customize Application and "
        "Modify Metadata permissions (or have an admin run `leadscore setup salesforce`)\n"
    )


def test_replay_posts_salesforce_outbound_messages_and_signed_events(app, queue, capsys):
    from tests.conftest import SF_WEBHOOK_TOKEN

    server = serve_in_thread(app)
    try:
        outbound = main(
            [
                "replay",
                str(FIXTURES / "salesforce" / "outbound_message__single.xml"),
                "--url",
                f"{server.url}/webhooks/salesforce/{SF_WEBHOOK_TOKEN}",
            ]
        )
        events = main(
            [
                "replay",
                str(FIXTURES / "salesforce" / "lead_change_event__status_update.json"),
                "--url",
                f"{server.url}/webhooks/salesforce/events",
            ]
        )
    finally:
        server.stop()

    assert (outbound, events) == (0, 0)
    assert capsys.readouterr().out.count(": 200 ") == 2
    assert pending.depth(queue.connection) == 2


def reconfigure(monkeypatch, **values: str) -> None:
    from integration.settings import get_settings
    from workers import jobs

    for name, value in values.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    jobs.context.cache_clear()


REFUSED_TOKENS = [  # each CRM's one line for a token it no longer accepts
    ("hubspot", "HubSpot refused HUBSPOT_ACCESS_TOKEN (401: revoked, expired or mistyped): set the "
                "app's current access token"),
    ("salesforce", "Salesforce no longer accepts SALESFORCE_ACCESS_TOKEN (INVALID_SESSION_ID: expired or "
                   "revoked): set a new one, or unset it and let leadscore log in itself with "
                   "SALESFORCE_CONSUMER_KEY and SALESFORCE_CONSUMER_SECRET, or a username and password"),
]  # fmt: skip


@pytest.mark.parametrize(("crm", "message"), REFUSED_TOKENS)
def test_setup_with_a_token_the_crm_refuses_names_the_setting(env, request, capsys, crm, message):
    request.getfixturevalue(crm).token = "rotated-since"

    assert main(["setup", crm]) == 2
    assert capsys.readouterr().err == f"leadscore: {message}\n"


def test_setup_hubspot_without_the_schema_scope_names_the_scope(env, hubspot, capsys):
    hubspot.schemas_read_only = True

    assert main(["setup", "hubspot"]) == 2
    assert capsys.readouterr().err == (
        "leadscore: HubSpot refused to create leadscore's properties (403 MISSING_SCOPES): give the app the "
        "crm.schemas.contacts.read and crm.schemas.contacts.write scopes, then run `leadscore setup hubspot` "
        "again\n"
    )


@pytest.mark.parametrize(
    ("crm", "setting", "scheme"),
    [("hubspot", "HUBSPOT_API_BASE", "http"), ("salesforce", "SALESFORCE_INSTANCE_URL", "https")],
)
def test_setup_of_a_crm_that_cannot_be_reached_names_its_url(env, monkeypatch, capsys, crm, setting, scheme):
    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    reconfigure(monkeypatch, **{setting: url})

    assert main(["setup", crm]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: cannot reach {url} (Failed to establish a new connection: [Errno 111] Connection "
        f"refused): check {setting} and that it is up\n"
    )


def test_db_upgrade_with_the_database_down_names_it_without_its_password(env, monkeypatch, capsys):
    port = free_port()  # nothing listens there
    reconfigure(monkeypatch, DATABASE_URL=f"postgresql+psycopg://leadscore:s3cret@127.0.0.1:{port}/scores")

    assert main(["db", "upgrade"]) == 2
    shown = f"postgresql+psycopg://leadscore:***@127.0.0.1:{port}/scores"
    assert capsys.readouterr().err == (
        f"leadscore: cannot open the score store at {shown} "
        f'(connection failed: connection to server at "127.0.0.1", port {port} failed: Connection refused): '
        "start it, or fix DATABASE_URL\n"
    )


def test_worker_with_a_scoring_config_it_cannot_use_names_the_setting(env, monkeypatch, tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    reconfigure(monkeypatch, SCORING_CONFIG_PATH=str(missing))
    assert main(["worker", "--burst"]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: SCORING_CONFIG_PATH: cannot read scoring config {missing}: No such file or directory\n"
    )

    unordered = tmp_path / "scoring.toml"
    unordered.write_text(
        (ROOT / "workers" / "scoring_config.toml")
        .read_text()
        .replace("A = 70\nB = 55\nC = 40", "A = 50\nB = 60\nC = 40")
    )
    reconfigure(monkeypatch, SCORING_CONFIG_PATH=str(unordered))
    assert main(["worker", "--burst"]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: SCORING_CONFIG_PATH: {unordered} is invalid: tiers: Value error, tiers must satisfy "
        "A > B > C, got A=50 B=60 C=40\n"
    )


@pytest.mark.parametrize("command", [["setup", "salesforce"], ["rescore", "--crm", "salesforce"]])
def test_a_command_reaching_an_org_whose_api_limit_is_spent_says_so_in_one_line(
    env, salesforce, capsys, command
):
    salesforce.limit_exceeded = "TotalRequests Limit exceeded."  # spent by the org's other apps

    assert main(command) == 2
    said = capsys.readouterr().err.splitlines()[-1]
    assert said.startswith("leadscore: ") and "REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded." in said


def _tls_redis(stack: ExitStack, tls, directory: Path) -> str:
    """A redis-server also serving TLS, with a certificate of a CA no system trusts (as Heroku's)."""
    key, cert, ca = directory / "redis.key", directory / "redis.crt", directory / "ca.crt"
    tls.server_cert.private_key_pem.write_to_path(str(key))
    tls.server_cert.cert_chain_pems[0].write_to_path(str(cert))
    tls.ca.cert_pem.write_to_path(str(ca))
    port = free_port()
    start_redis(stack, "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no")  # fmt: skip
    return f"rediss://127.0.0.1:{port}/0"


@pytest.mark.parametrize("refusal", ["password", "certificate"])
def test_a_worker_whose_redis_refuses_it_exits_naming_redis_url_rather_than_waiting(
    env, monkeypatch, local_tls, tmp_path, capsys, refusal
):
    with ExitStack() as stack:
        if refusal == "password":
            url = start_redis(stack)
            Redis.from_url(url).config_set("requirepass", "right")
            url = url.replace("redis://", "redis://:wrong@")
        else:
            url = _tls_redis(stack, local_tls, tmp_path)
        reconfigure(monkeypatch, REDIS_URL=url)

        pause = time.sleep

        def waiting(seconds):
            if seconds >= 1:  # the worker's wait for an unreachable Redis starts at a second
                raise AssertionError(f"the worker waits {seconds}s for a Redis that answered")
            pause(seconds)

        monkeypatch.setattr(time, "sleep", waiting)
        assert main(["worker"]) == 2  # not burst: it would wait for Redis forever
    said = capsys.readouterr().err.splitlines()[-1]  # after the logs, the one line to act on
    if refusal == "password":
        assert said.startswith("leadscore: REDIS_URL: Redis refused the credentials (")
        assert said.endswith("): set the password (and user) Redis expects")
    else:
        assert said.startswith("leadscore: REDIS_URL: Redis's TLS certificate is not trusted (")
        assert said.endswith("whose certificate is self-signed (Heroku Redis), set REDIS_SSL_CERT_REQS=none")


def test_a_redis_whose_certificate_is_self_signed_serves_with_redis_ssl_cert_reqs_none(
    env, monkeypatch, local_tls, tmp_path, post_delivery
):
    with ExitStack() as stack:
        reconfigure(monkeypatch, REDIS_URL=_tls_redis(stack, local_tls, tmp_path), REDIS_SSL_CERT_REQS="none")
        client = create_app().test_client()
        assert client.get("/healthz").status_code == 200
        assert main(["worker", "--burst"]) == 0


def test_on_a_heroku_dyno_a_store_that_would_be_lost_at_the_next_restart_is_refused(env, monkeypatch, capsys):
    monkeypatch.delenv("DATABASE_URL")
    reconfigure(monkeypatch, DYNO="worker.1")

    assert main(["worker", "--burst"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "leadscore: invalid leadscore settings: Value error, DATABASE_URL is unset or SQLite, but this runs "
        "on a Heroku dyno, whose files are lost at each restart and seen by no other dyno: attach Heroku "
        "Postgres, which sets DATABASE_URL"
    )


def test_an_emptied_path_setting_means_unset_and_an_llm_without_a_key_is_said_at_start(
    env, monkeypatch, caplog
):
    reconfigure(monkeypatch, SCORING_CONFIG_PATH="", SCORING_MODEL_PATH=" ", LLM_API_KEY="")

    assert (get_settings().scoring_config_path, get_settings().scoring_model_path) == (None, None)
    assert main(["worker", "--burst"]) == 0  # was: "cannot read scoring config .: Is a directory"
    warned = [
        r.getMessage() for r in caplog.records if r.name == "leadscore.worker" and r.levelname == "WARNING"
    ]
    assert warned == [
        "LLM_API_KEY is not set: every lead is scored on the rules alone, with the neutral prior"
    ]


def test_log_level_is_one_of_pythons_in_any_case_and_an_unknown_one_is_named(env, monkeypatch, capsys):
    from integration.settings import get_settings

    reconfigure(monkeypatch, LOG_LEVEL="warning")
    assert get_settings().log_level == "WARNING"
    reconfigure(monkeypatch, LOG_LEVEL="warn")  # Python's own alias, which worked before it was checked
    assert get_settings().log_level == "WARNING"

    reconfigure(monkeypatch, LOG_LEVEL="verbose")
    assert main(["worker", "--burst"]) == 2
    assert capsys.readouterr().err == (
        "leadscore: invalid leadscore settings: LOG_LEVEL: Value error, LOG_LEVEL must be one of DEBUG, "
        "INFO, WARNING, ERROR, CRITICAL, got 'verbose'\n"
    )


def test_an_llm_base_url_with_a_query_string_is_refused_pointing_to_azures_v1_endpoint(
    env, monkeypatch, capsys
):
    classic_azure = "https://acme.openai.azure.com/openai/deployments/gpt-4o-mini?api-version=2024-10-21"
    reconfigure(monkeypatch, LLM_BASE_URL=classic_azure)

    assert main(["db", "upgrade"]) == 2
    assert capsys.readouterr().err == (
        "leadscore: invalid leadscore settings: LLM_BASE_URL: Value error, LLM_BASE_URL must have no query "
        "string (such as classic Azure OpenAI's ?api-version=…), which the client cannot keep: for Azure "
        "OpenAI use its v1 endpoint, https://RESOURCE.openai.azure.com/openai/v1/, with the deployment name "
        "as LLM_MODEL; got https://acme.openai.azure.com/openai/deployments/gpt-4o-mini?…\n"
    )
    reconfigure(monkeypatch, LLM_BASE_URL="https://acme.openai.azure.com/openai/v1/")
    assert str(get_settings().llm_base_url) == "https://acme.openai.azure.com/openai/v1/"


EXAMPLE_PARAMS = '{"max_tokens": null, "max_completion_tokens": 2000}'
EXAMPLE_HEADERS = '{"x-portkey-provider": "openai"}'


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("LLM_EXTRA_PARAMS", "max_tokens=null",
         f"LLM_EXTRA_PARAMS must be a JSON object such as {EXAMPLE_PARAMS}, but it is not JSON (Expecting "
         "value: line 1 column 1 (char 0)): 'max_tokens=null'"),
        ("LLM_EXTRA_PARAMS", '["max_tokens"]',
         f"LLM_EXTRA_PARAMS must be a JSON object such as {EXAMPLE_PARAMS}, got a list"),
        ("LLM_EXTRA_PARAMS", '{"model": "o3", "stream": true}',
         "LLM_EXTRA_PARAMS may not set model, stream: leadscore sends the model (LLM_MODEL) and the "
         "messages, and reads one whole reply, not a stream"),
        ("LLM_EXTRA_HEADERS", '{"x-gateway-key": s3cret}',
         f"LLM_EXTRA_HEADERS must be a JSON object such as {EXAMPLE_HEADERS}, but it is not JSON (Expecting "
         "value: line 1 column 19 (char 18))"),
        ("LLM_EXTRA_HEADERS", '{"x-gateway-key": 1234}',
         "LLM_EXTRA_HEADERS: the value of x-gateway-key must be a string on one line, in ASCII"),
        ("LLM_EXTRA_HEADERS", '{"x-gateway-key": "s3cret\\r\\nX-Admin: 1"}',
         "LLM_EXTRA_HEADERS: the value of x-gateway-key must be a string on one line, in ASCII"),
        ("LLM_EXTRA_HEADERS", '{"x-gateway-key": "s3cret-clé"}',  # every call would fail to encode it
         "LLM_EXTRA_HEADERS: the value of x-gateway-key must be a string on one line, in ASCII"),
        ("LLM_EXTRA_HEADERS", '{"x gateway key": "s3cret"}',
         "LLM_EXTRA_HEADERS: 'x gateway key' is not a header name (letters, digits and -)"),
        ("HUBSPOT_APP_SECRET", '"s3cret"', "HUBSPOT_APP_SECRET is in quotes, which an env file or a shell "
         "kept: remove them"),
        ("LLM_API_KEY", "'sk-s3cret'", "LLM_API_KEY is in quotes, which an env file or a shell kept: "
         "remove them"),
        ("HUBSPOT_WON_PIPELINES", '"default"', "HUBSPOT_WON_PIPELINES is in quotes, which an env file or a "
         "shell kept: remove them"),
        ("SALESFORCE_ORG_IDS", "00d5g000004xyzaeak", "SALESFORCE_ORG_IDS has '00d5g000004xyzaeak', not an "
         "organization id as Setup > Company Information shows it (15 or 18 characters, from 00D, its case "
         "kept)"),
        ("PUBLIC_BASE_URL", "https://leadscore.example.com/webhooks/hubspot", "PUBLIC_BASE_URL is the "
         "scheme://host[:port] (and any prefix a proxy adds) that the webhook paths follow, not a webhook's "
         "whole URL: got https://leadscore.example.com/webhooks/hubspot"),
        ("SALESFORCE_INSTANCE_URL", "https://acme.lightning.force.com/lightning/page/home",
         "SALESFORCE_INSTANCE_URL is the org's My Domain URL with no path, such as "
         "https://acme.my.salesforce.com (Setup > My Domain), got "
         "https://acme.lightning.force.com/lightning/page/home"),
    ],
    ids=["params_not_json", "params_a_list", "params_leadscore_sets", "headers_not_json",
         "header_a_number", "header_two_lines", "header_not_ascii", "header_name_with_spaces",
         "secret_quoted", "key_quoted", "pipelines_quoted", "org_id_lower_case", "public_url_whole",
         "instance_url_lightning"],
)  # fmt: skip
def test_settings_operators_get_wrong_are_refused_saying_what_to_fix_and_echo_no_secret(
    env, monkeypatch, capsys, setting, value, problem
):
    reconfigure(monkeypatch, **{setting: value})

    assert main(["db", "upgrade"]) == 2
    said = capsys.readouterr().err
    assert said == f"leadscore: invalid leadscore settings: {setting}: Value error, {problem}\n"
    assert "s3cret" not in said


def test_invalid_redis_and_database_urls_are_echoed_without_their_password(env, monkeypatch, capsys):
    reconfigure(
        monkeypatch,
        REDIS_URL="redis//default:s3cr@t@redis.example:6379",
        DATABASE_URL="postgresql//leadscore:s3cr@t@db.example/scores",
    )

    assert main(["db", "upgrade"]) == 2
    assert capsys.readouterr().err == (
        "leadscore: invalid leadscore settings: REDIS_URL: Value error, REDIS_URL must start with redis://, "
        "rediss:// or unix://, got 'redis//default:***@redis.example:6379'; DATABASE_URL: Value error, "
        "DATABASE_URL must be an SQLAlchemy URL such as sqlite:///leadscore.sqlite3 or "
        "postgresql+psycopg://user:password@host/db, got 'postgresql//leadscore:***@db.example/scores'\n"
    )


def test_procfile_web_binds_port_5000_when_port_is_not_set():
    environment = {name: value for name, value in os.environ.items() if name != "PORT"}
    argv = subprocess.run(["sh", "-c", f'set -- {procfile()["web"]}; printf "%s\\n" "$@"'], env=environment,
                          capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip

    assert argv == [
        "gunicorn",
        "--bind",
        "0.0.0.0:5000",
        "--access-logfile",
        "-",
        "--logger-class",
        "integration.access_log.RedactingAccessLog",
        "integration.app:create_app()",
    ]


@pytest.fixture
def emulate():
    """`leadscore emulate SERVICE --port P` as a process of its own, and the lines it printed at start."""
    started = []

    def start(service: str, port: int) -> list[str]:
        command = [sys.executable, "-m", "integration.cli", "emulate", service, "--port", str(port)]
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        started.append(proc)
        return [proc.stdout.readline(), proc.stdout.readline()]

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)


def test_emulate_prints_the_settings_that_point_leadscore_at_it_and_they_work(emulate):
    from hubspot import HubSpot
    from openai import OpenAI

    hubspot_port, llm_port = free_port(), free_port()
    assert emulate("hubspot", hubspot_port) == [
        f"HubSpot emulator on http://127.0.0.1:{hubspot_port}; point leadscore at it with:\n",
        f"  HUBSPOT_API_BASE=http://127.0.0.1:{hubspot_port} HUBSPOT_ACCESS_TOKEN=emulator-token\n",
    ]
    assert emulate("llm", llm_port) == [
        f"LLM stub on http://127.0.0.1:{llm_port}; point leadscore at it with:\n",
        f"  LLM_BASE_URL=http://127.0.0.1:{llm_port}/v1 LLM_API_KEY=stub-key\n",
    ]

    def answering(url: str) -> bool:
        try:
            return requests.get(url, timeout=1).status_code < 500
        except requests.RequestException:
            return False

    wait_until(lambda: answering(f"http://127.0.0.1:{hubspot_port}/"), 10, "the HubSpot emulator")
    wait_until(lambda: answering(f"http://127.0.0.1:{llm_port}/v1/models"), 10, "the LLM stub")
    client = HubSpot(access_token="emulator-token", host=f"http://127.0.0.1:{hubspot_port}")
    assert client.crm.properties.core_api.get_all("contacts").results  # the token is the one it expects
    llm = OpenAI(base_url=f"http://127.0.0.1:{llm_port}/v1", api_key="stub-key", max_retries=0)
    reply = llm.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content


def test_emulate_help_shows_each_services_default_port_and_token(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")  # one help line per option
    with pytest.raises(SystemExit):
        main(["emulate", "--help"])

    lines = capsys.readouterr().out.splitlines()
    assert "  --port PORT          the port to listen on (default: 8081 for hubspot, 8082 for llm)" in lines
    token = "  --token TOKEN        bearer token / API key it expects"
    assert f"{token} (default: emulator-token for hubspot, stub-key for llm)" in lines


def test_demo_serves_the_portal_whose_token_is_in_dot_env(redis_server, hubspot, tmp_path):
    from tests.conftest import HUBSPOT_TOKEN

    (tmp_path / ".env").write_text(f"HUBSPOT_ACCESS_TOKEN={HUBSPOT_TOKEN}\nHUBSPOT_API_BASE={hubspot.url}\n")
    port = free_port()
    process_env = {
        **{
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("HUBSPOT_", "SALESFORCE_"))
        },
        "REDIS_URL": redis_server,
        "DATABASE_URL": f"sqlite:///{tmp_path}/demo.sqlite3",
        "PORT": str(port),
    }
    demo = subprocess.Popen([sys.executable, "-m", "integration.cli", "demo"], cwd=tmp_path, env=process_env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        first = demo.stdout.readline()
    finally:
        demo.send_signal(signal.SIGINT)  # as Ctrl-C: the demo stops its web and worker processes
        demo.wait(timeout=30)

    assert (
        first
        == f"Serving your HubSpot portal. Webhook target URL: http://127.0.0.1:{port}/webhooks/hubspot\n"
    )


def test_demo_prints_the_readmes_list_views_and_keeps_its_scores_out_of_an_exported_store(tmp_path):
    """`make demo` end to end on its emulators, with a team's DATABASE_URL and rules in the environment."""
    team_store = tmp_path / "team.sqlite3"
    rules = ROOT / "workers" / "scoring_config.toml"
    process_env = {
        **{
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("HUBSPOT_", "SALESFORCE_", "SCORING_", "HOLDOUT_", "REDIS_"))
        },
        "DATABASE_URL": f"sqlite:///{team_store}",
        "SCORING_CONFIG_PATH": str(rules),
    }
    demo = subprocess.run([sys.executable, "-m", "integration.cli", "demo"], cwd=tmp_path, env=process_env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip

    assert demo.returncode == 0, demo.stderr[-2000:]
    printed = demo.stdout.splitlines()
    assert f"Scoring with your SCORING_CONFIG_PATH={rules}, not the defaults README shows" in printed
    readme = (ROOT / "README.md").read_text().splitlines()
    quoted = [line for line in readme if line.startswith(("Maya Okafor ", "Dana Whitfield "))]
    assert len(quoted) == 2 and set(quoted) <= set(printed)
    assert not team_store.exists()


@pytest.mark.parametrize(
    ("command", "line"),
    [
        ([], "`leadscore` command line: CRM set-up, rescore, workers, failed jobs, replaying fixtures, "
             "emulators, the demo, the store (`db`, `outcomes`, `forget`), and models (`train`, "
             "`score-file`, `evaluate`)."),
        (["setup"], "  {hubspot,salesforce}  the CRM to create the fields in"),
        (["requeue"], "  JOB_ID      a failed job's id, as `leadscore failed` lists it"),
        (["rescore"], "  --account ACCOUNT     the HubSpot portal id / Salesforce org id (default: the one "
                      "the credentials reach; another is refused)"),
        (["replay"], "  FILE             a delivery to post (see fixtures/)"),
        (["demo"], "  --timeout TIMEOUT  give up when scores take longer than this to arrive, in seconds "
                   "(default: 90.0)"),
        (["rescore"], "queue every lead of an account to be scored as it is now: at go-live, and after the "
                      "rules, the model or the holdout share change (workers write only the scores that "
                      "change)"),
        (["score-file"], "  --data DATA        CSV of leads to score"),
        (["score-file"], "  --mapping MAPPING  TOML mapping the file's columns to lead fields"),
        (["evaluate"], "  --label LABEL         the outcome column (default: the mapping's `label`)"),
        (["evaluate"], "  --model MODEL         a trained model directory; repeat to compare several (the "
                       "report names each by its directory)"),
        (["evaluate"], "Reads from the environment or .env: SCORING_CONFIG_PATH (the rules, and the status "
                       "caps that bind a model too; unset: the defaults); DATABASE_URL (the score store), "
                       "with --with-store."),
        (["train"], "Reads from the environment or .env: DATABASE_URL (the score store), with --from-store."),
        (["db"], "  --older-than DAYS  prune: delete the scores and feedback kept more than this many days "
                 "ago (1 or more)"),
    ],
    ids=["leadscore", "setup", "requeue", "rescore", "replay", "demo", "rescore-description",
         "score-file-data", "score-file-mapping", "evaluate-label", "evaluate-model", "evaluate-epilog",
         "train-epilog", "db-older-than"],
)  # fmt: skip
def test_help_describes_every_command_and_argument(monkeypatch, capsys, command, line):
    monkeypatch.setenv("COLUMNS", "200")  # one help line per argument
    with pytest.raises(SystemExit):
        main([*command, "--help"])

    assert line in capsys.readouterr().out.splitlines()


def test_every_commands_help_opens_with_what_it_does(capsys):
    """`leadscore X --help` says what X does, as `leadscore --help` lists it, not only its usage."""
    [commands] = [
        action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
    ]
    listed = {action.dest: action.help for action in commands._choices_actions}

    assert len(listed) == len(commands.choices) == 16
    for name, summary in listed.items():
        assert commands.choices[name].description == summary, name


# ---- settings as operators paste them


@pytest.mark.parametrize("pasted", ["{}\n", "  {} ", "{}\r\n"], ids=["mounted_file", "spaces", "crlf"])
def test_a_secret_pasted_with_a_newline_or_spaces_still_verifies_deliveries(env, monkeypatch, pasted):
    """Compared byte for byte, a secret with a file's newline refused every delivery, which HubSpot does not
    send again."""
    reconfigure(monkeypatch, HUBSPOT_APP_SECRET=pasted.format(APP_SECRET), METRICS_TOKEN=pasted.format("m"))
    client = create_app(get_settings()).test_client()
    body = load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json")

    posted = client.post(WEBHOOK_URL, data=body, headers=hubspot_headers(WEBHOOK_URL, body, APP_SECRET))
    assert posted.status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Bearer m"}).status_code == 200


@pytest.mark.parametrize(("setting", "value"), [("HUBSPOT_TIMEOUT_S", "inf"), ("LLM_TIMEOUT_S", "8000"),
                                                ("FALLBACK_RESCORE_S", "300000")])  # fmt: skip
def test_a_number_out_of_all_reason_is_refused_at_start(env, monkeypatch, capsys, setting, value):
    """`inf` crashed the worker with a traceback, and milliseconds for seconds held every call."""
    reconfigure(monkeypatch, **{setting: value})

    assert main(["db", "upgrade"]) == 2
    assert capsys.readouterr().err.startswith(
        f"leadscore: invalid leadscore settings: {setting}: Input should be"
    )


def test_a_store_url_from_a_mounted_file_names_the_same_store(env, monkeypatch):
    url = get_settings().database_url
    reconfigure(
        monkeypatch, DATABASE_URL=f"{url}\n", LLM_API_KEY="sk-test\n", HUBSPOT_ACCESS_TOKEN=" pat-na1-x\n"
    )

    settings = get_settings()
    assert (settings.database_url, settings.llm_api_key, settings.hubspot_access_token) == (
        url,
        "sk-test",
        "pat-na1-x",
    )
