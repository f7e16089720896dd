"""`leadscore rescore`: every lead that exists already, queued as its webhook events would be and
scored by the real pipeline; a second run with nothing changed writes nothing and asks no LLM."""

from __future__ import annotations

import json
import time

import pytest
from rq import SimpleWorker

from integration import metrics, pending
from integration.cli import main
from integration.emulators import free_port
from tests.conftest import LLM_KEY, PORTAL_ID, SF_ORG_ID, finished_jobs, pending_events
from tests.test_cli_and_procfile import REFUSED_TOKENS, ROOT, reconfigure
from tests.test_pipeline_hubspot import EXPECTED_BURST as HUBSPOT_SCORES
from tests.test_pipeline_salesforce import EXPECTED_BURST as SALESFORCE_SCORES
from workers import rescore

CONVERTED = "00Q5g00000Ls011EAB"
SF_OPEN = 11  # the fixtures' 12 Leads, less the converted one


def hubspot_shown(hubspot) -> dict[str, tuple]:
    return {
        contact_id: (
            int(props["leadscore_score"]) if props.get("leadscore_score") else None,
            props.get("leadscore_tier"),
            props.get("leadscore_reason"),
        )
        for contact_id, props in ((i, hubspot.contact_properties(i)) for i in hubspot.contacts)
    }


def salesforce_shown(salesforce) -> dict[str, tuple]:
    return {
        lead_id: tuple(lead.get(f"Leadscore_{name}__c") for name in ("Score", "Tier", "Reason"))
        for lead_id, lead in salesforce.leads.items()
    }


def test_rescore_hubspot_scores_every_contact_and_a_second_run_writes_nothing(
    crm, run_worker, redis, hubspot, llm, capsys
):
    assert {score for score, _, _ in hubspot_shown(hubspot).values()} == {None}  # go-live: nothing scored

    assert main(["rescore", "--crm", "hubspot"]) == 0
    assert capsys.readouterr().out == (
        f"hubspot:{PORTAL_ID}: 24 leads queued, 0 already waiting; the workers score them, writing only "
        "the scores that change\n"
    )
    results = run_worker()

    assert len(results) == 24 and {r["outcome"] for r in results} == {"written"}
    assert hubspot_shown(hubspot) == HUBSPOT_SCORES
    shown = metrics.exposition(redis)[0].decode()  # no webhook was accepted, so no latency to measure
    assert 'leadscore_batch_duration_seconds_count{crm="hubspot"}' in shown
    assert "leadscore_scoring_latency_seconds_count" not in shown
    writes, asked = len(hubspot.writes), len(llm.requests)
    assert main(["rescore", "--crm", "hubspot", "--account", PORTAL_ID]) == 0
    results = run_worker()
    assert len(results) == 24 and {r["outcome"] for r in results} == {"unchanged"}
    assert (len(hubspot.writes), len(llm.requests)) == (writes, asked)


def test_a_forced_rescore_rewrites_only_the_leads_whose_shown_score_a_bad_deploy_changed(
    crm, run_worker, hubspot, llm
):
    """A deploy that wrote wrong scores but kept each lead's details (its fingerprint) is undone by
    `rescore --force`: a plain rescore finds every lead's inputs scored and writes nothing."""
    assert main(["rescore", "--crm", "hubspot"]) == 0
    run_worker()
    wronged = sorted(hubspot.contacts)[:3]
    for contact_id in wronged:  # the bad deploy's details say so too: not a rep's edit
        shown = hubspot.contacts[contact_id]["properties"]
        details = {**json.loads(shown["leadscore_details"]), "score": 3, "tier": "D"}
        shown.update(leadscore_score="3", leadscore_tier="D", leadscore_details=json.dumps(details))
    asked = len(llm.requests)

    assert main(["rescore", "--crm", "hubspot"]) == 0
    assert {r["outcome"] for r in run_worker()} == {"unchanged"}
    assert main(["rescore", "--crm", "hubspot"]) == 0  # left waiting: the forced rescore joins it
    assert main(["rescore", "--crm", "hubspot", "--force"]) == 0
    results = run_worker()

    assert sorted(r["lead"].rsplit(":", 1)[1] for r in results if r["outcome"] == "written") == wronged
    assert hubspot_shown(hubspot) == HUBSPOT_SCORES
    assert len(llm.requests) == asked  # the LLM's answers come from its cache


def test_a_forced_rescore_waiting_is_kept_when_a_webhook_event_of_its_lead_comes(
    crm, post_delivery, run_worker, hubspot
):
    assert main(["rescore", "--crm", "hubspot"]) == 0
    run_worker()
    hubspot.contacts["74300000101"]["properties"].update(leadscore_score="3", leadscore_tier="D")
    assert main(["rescore", "--crm", "hubspot", "--force"]) == 0
    post_delivery("contact.creation__single")  # of 74300000101, while its forced rescore waits
    results = run_worker()

    assert [r["outcome"] for r in results if r["lead"].endswith(":74300000101")] == ["written"]
    assert hubspot_shown(hubspot) == HUBSPOT_SCORES


def test_a_rescore_after_the_tiers_are_edited_writes_every_lead_again_and_asks_the_llm_nothing(
    env, monkeypatch, tmp_path, crm, run_worker, hubspot, llm
):
    """The LLM never sees the rules or tiers: its cached answers are reused, so an edit to them costs
    writes, not one LLM call a lead (100,000 for a portal of 100,000)."""
    assert main(["rescore", "--crm", "hubspot"]) == 0
    run_worker()
    edited = tmp_path / "scoring.toml"
    shipped = (ROOT / "workers" / "scoring_config.toml").read_text()
    edited.write_text(shipped.replace("A = 70\nB = 55\nC = 40", "A = 72\nB = 55\nC = 40"))
    reconfigure(monkeypatch, SCORING_CONFIG_PATH=str(edited))
    asked = len(llm.requests)

    assert main(["rescore", "--crm", "hubspot"]) == 0
    results = run_worker()

    assert {r["outcome"] for r in results} == {"written"}  # a new fingerprint: every lead written again
    assert len(llm.requests) == asked


def test_a_rescore_after_an_llm_setting_is_fixed_asks_the_llm_again_for_every_lead_scored_on_the_prior(
    crm, run_worker, hubspot, llm
):
    """A guard of the README's "After fixing the LLM": a score on the prior is never taken as
    unchanged. (That the scheduled rescores recover refused leads, too, is test_delivery's.)"""
    llm.api_key = "rotated"  # the key leadscore holds is refused: 401
    assert main(["rescore", "--crm", "hubspot"]) == 0
    on_the_prior = run_worker()
    llm.api_key = LLM_KEY  # fixed
    asked = len(llm.requests)

    assert main(["rescore", "--crm", "hubspot"]) == 0
    results = run_worker()

    assert {(r["outcome"], r["fallback"]) for r in on_the_prior} == {("written", True)}
    assert len(results) == 24 and {(r["outcome"], r["fallback"]) for r in results} == {("written", False)}
    assert hubspot_shown(hubspot) == HUBSPOT_SCORES
    assert len(llm.requests) == asked + 24


def test_a_lead_a_webhook_brings_is_scored_before_a_rescore_backlog(
    crm, run_worker, redis, hubspot, llm, monkeypatch, post_delivery, queue
):
    """The backfill's batches wait in their own queue, which workers take from only when theirs is
    empty: at go-live, a rep's edit is not scored behind every lead of the portal."""
    reconfigure(monkeypatch, BATCH_SIZE="5")
    assert main(["rescore", "--crm", "hubspot"]) == 0
    post_delivery("contact.propertyChange__lead_status")  # a rep's edit to 74300000103, already queued

    results = run_worker()

    batches = [job for job in finished_jobs(redis, queue) if job.func_name.endswith("score_batch")]
    assert [job.origin for job in batches] == [queue.name] + [f"{queue.name}-backfill"] * 4
    assert f"hubspot:{PORTAL_ID}:74300000103" in [r["lead"] for r in batches[0].return_value()]
    assert len(results) == 24 and {r["outcome"] for r in results} == {"written"}


def test_a_webhooks_batch_still_waiting_is_not_superseded_by_a_rescore_that_reaches_its_lead(
    crm, redis, hubspot, post_delivery, queue
):
    """A live batch put off (a 429, say) while a rescore hands the same lead to the backfill still
    writes it: otherwise the rep's edit would wait behind the whole backfill."""
    post_delivery("contact.propertyChange__lead_status")  # a rep's edit to 74300000103
    pending.drain(redis, "hubspot", PORTAL_ID)
    live_batch = pending.take_batch(queue, "hubspot", PORTAL_ID, 100)  # waiting its turn
    assert main(["rescore", "--crm", "hubspot"]) == 0  # reaches the same contact

    SimpleWorker([queue], connection=redis).work(burst=True)  # the live queue only

    [done] = [job for job in finished_jobs(redis, queue) if job.id == live_batch.id]
    assert [r["outcome"] for r in done.return_value()] == ["written"]
    assert hubspot.contact_properties("74300000103")["leadscore_score"] == "76"
    assert pending.worker_queues(queue.name, redis)[1].count == 1  # the backfill, still to come


def test_a_rescore_run_again_while_the_first_ones_batches_wait_queues_none_of_their_leads(
    crm, redis, queue, capsys, run_worker, hubspot
):
    backfill = pending.worker_queues(queue.name, redis)[1]
    assert main(["rescore", "--crm", "hubspot"]) == 0
    SimpleWorker([queue], connection=redis).work(burst=True)  # collected: the backfill batch waits
    capsys.readouterr()

    assert main(["rescore", "--crm", "hubspot"]) == 0  # say, after a stop part way
    assert capsys.readouterr().out.startswith(f"hubspot:{PORTAL_ID}: 0 leads queued, 24 already waiting")
    SimpleWorker([queue], connection=redis).work(burst=True)
    assert backfill.count == 1
    assert len(run_worker()) == 24
    assert main(["rescore", "--crm", "hubspot"]) == 0  # scored: a rescore queues them again
    assert capsys.readouterr().out.startswith(f"hubspot:{PORTAL_ID}: 24 leads queued, 0 already waiting")


def test_a_lead_its_backfill_batch_failed_on_is_queued_by_the_next_rescore_once_a_webhook_scores_it(
    crm, run_worker, hubspot, queue, redis, capsys, post_delivery
):
    hubspot.reject["74300000101"] = "Blocked by a validation rule"
    assert main(["rescore", "--crm", "hubspot"]) == 0
    run_worker()  # refused alone, from the backfill: dead-lettered
    hubspot.reject.clear()  # the admin fixes the rule, and the contact's next webhook scores it
    post_delivery("contact.creation__demo_burst")
    run_worker()
    capsys.readouterr()

    assert main(["rescore", "--crm", "hubspot"]) == 0  # rules changed: every lead again

    assert capsys.readouterr().out.startswith(f"hubspot:{PORTAL_ID}: 24 leads queued, 0 already waiting")


def test_a_lead_whose_backfill_batch_failed_for_good_waits_for_requeue_three_days_at_most(
    crm, run_worker, hubspot, redis, capsys
):
    hubspot.reject["74300000101"] = "Blocked by a validation rule"
    assert main(["rescore", "--crm", "hubspot"]) == 0
    run_worker()
    capsys.readouterr()
    assert main(["rescore", "--crm", "hubspot"]) == 0
    assert capsys.readouterr().out.startswith(f"hubspot:{PORTAL_ID}: 23 leads queued, 1 already waiting")
    run_worker()  # the refused one is in `leadscore failed`, to be requeued: not queued again
    key = pending.backfill_key("hubspot", PORTAL_ID)
    redis.zadd(key, {"74300000101": time.time() - pending.HANDOFF_TTL_S - 1})  # three days on

    assert main(["rescore", "--crm", "hubspot"]) == 0
    assert capsys.readouterr().out.startswith(f"hubspot:{PORTAL_ID}: 24 leads queued, 0 already waiting")


def test_a_refused_backfill_batch_is_listed_and_requeued_like_any_other(
    crm, run_worker, hubspot, queue, capsys
):
    hubspot.reject["74300000101"] = "Blocked by a validation rule"
    assert main(["rescore", "--crm", "hubspot"]) == 0
    run_worker()  # refused alone, from the backfill: dead-lettered there
    backfill = pending.worker_queues(queue.name, queue.connection)[1]
    [job_id] = backfill.failed_job_registry.get_job_ids()
    capsys.readouterr()

    assert main(["failed"]) == 0
    assert f"{job_id}  " in capsys.readouterr().out
    hubspot.reject.clear()
    assert main(["requeue", "--all"]) == 0
    [result] = run_worker()

    assert result == {**result, "lead": f"hubspot:{PORTAL_ID}:74300000101", "outcome": "written"}
    assert backfill.failed_job_registry.count == 0


def test_rescore_salesforce_pages_the_open_leads_and_leaves_converted_ones_out(
    sf_crm, run_worker, redis, salesforce, llm, capsys
):
    salesforce.query_page = 5  # three pages of Lead ids, as Salesforce pages 2,000 at a time
    assert main(["rescore", "--crm", "salesforce", "--account", SF_ORG_ID[:15]]) == 0
    assert capsys.readouterr().out.startswith(f"salesforce:{SF_ORG_ID}: {SF_OPEN} leads queued, 0 already")
    queued = {event["lead_id"] for event in pending_events(redis, "salesforce", SF_ORG_ID)}
    assert queued == set(salesforce.leads) - {CONVERTED}

    results = run_worker()

    assert len(results) == SF_OPEN and {r["outcome"] for r in results} == {"written"}
    assert salesforce_shown(salesforce) == {**SALESFORCE_SCORES, CONVERTED: (None, None, None)}
    writes, asked = len(salesforce.writes), len(llm.requests)
    assert main(["rescore", "--crm", "salesforce"]) == 0
    assert {r["outcome"] for r in run_worker()} == {"unchanged"}
    assert (len(salesforce.writes), len(llm.requests)) == (writes, asked)


def test_rescore_twice_queues_nothing_twice_and_a_webhook_event_still_wins(
    crm, post_delivery, redis, hubspot, capsys
):
    assert post_delivery("contact.creation__single").get_json()["queued"] == 1  # in the intake, not drained

    assert main(["rescore", "--crm", "hubspot"]) == 0
    assert main(["rescore", "--crm", "hubspot"]) == 0

    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith(f"hubspot:{PORTAL_ID}: 24 leads queued, 0 already waiting;")
    assert second.startswith(f"hubspot:{PORTAL_ID}: 0 leads queued, 24 already waiting;")
    waiting = pending_events(redis, "hubspot", PORTAL_ID)  # the collector drains the intake
    assert len(waiting) == len(hubspot.contacts) == 24
    assert sorted(event["kinds"][0] for event in waiting) == ["creation"] + ["rescore"] * 23


def test_rescore_leaves_a_lead_waiting_with_its_webhook_event(crm, post_delivery, redis, capsys):
    post_delivery("contact.creation__single")
    [before] = pending_events(redis, "hubspot", PORTAL_ID)

    assert main(["rescore", "--crm", "hubspot"]) == 0

    assert capsys.readouterr().out.startswith(f"hubspot:{PORTAL_ID}: 23 leads queued, 1 already waiting;")
    waiting = {event["lead_id"]: event for event in pending_events(redis, "hubspot", PORTAL_ID)}
    assert len(waiting) == 24 and waiting[before["lead_id"]] == before


@pytest.mark.parametrize(
    ("crm_name", "account", "message"),
    [
        ("hubspot", "99999", "--account 99999 is not the portal HUBSPOT_ACCESS_TOKEN belongs to "
                             f"({PORTAL_ID})"),
        ("salesforce", "00D5g000009ZzZzEAK", "--account 00D5g000009ZzZzEAK is not the org the Salesforce "
                                             f"credentials reach ({SF_ORG_ID})"),
    ],
)  # fmt: skip
def test_rescore_of_an_account_the_credentials_do_not_reach_queues_nothing(
    env, redis, capsys, crm_name, account, message
):
    assert main(["rescore", "--crm", crm_name, "--account", account]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: {message}: leave --account out, or set the credentials of {account}\n"
    )
    assert redis.keys("leadscore:pending:*") == []


def test_rescore_without_redis_says_so_before_reading_the_crm(env, monkeypatch, hubspot, capsys):
    port = free_port()  # nothing listens there
    reconfigure(monkeypatch, REDIS_URL=f"redis://127.0.0.1:{port}/0")

    assert main(["rescore", "--crm", "hubspot"]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: cannot reach Redis (Error 111 connecting to 127.0.0.1:{port}. Connection refused.): "
        "start it, or point REDIS_URL at the workers' Redis\n"
    )
    assert hubspot.api_calls() == 0


@pytest.mark.parametrize(
    ("crm_name", "setting", "scheme"),
    [("hubspot", "HUBSPOT_API_BASE", "http"), ("salesforce", "SALESFORCE_INSTANCE_URL", "https")],
)
def test_rescore_of_a_crm_that_cannot_be_reached_names_its_url(
    env, monkeypatch, redis, capsys, crm_name, setting, scheme
):
    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    reconfigure(monkeypatch, **{setting: url})

    assert main(["rescore", "--crm", crm_name]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: cannot reach {url} (Failed to establish a new connection: [Errno 111] Connection "
        f"refused): check {setting} and that it is up\n"
    )
    assert redis.keys("leadscore:pending:*") == []


@pytest.mark.parametrize(("crm_name", "message"), REFUSED_TOKENS)
def test_rescore_with_a_token_the_crm_refuses_names_the_setting(env, request, capsys, crm_name, message):
    request.getfixturevalue(crm_name).token = "rotated-since"

    assert main(["rescore", "--crm", crm_name]) == 2
    assert capsys.readouterr().err == f"leadscore: {message}\n"


def test_rescore_with_a_token_without_the_oauth_scope_names_the_scope(env, hubspot, capsys):
    hubspot.forbidden_objects.add("account-info")

    assert main(["rescore", "--crm", "hubspot"]) == 2
    assert capsys.readouterr().err == (
        "leadscore: HubSpot refused its account details, which name the portal the token belongs to (403 "
        "MISSING_SCOPES): give the app the oauth scope\n"
    )


def test_rescore_of_a_crm_not_configured_says_what_to_set(env, monkeypatch, capsys):
    reconfigure(monkeypatch, HUBSPOT_ACCESS_TOKEN="")

    assert main(["rescore", "--crm", "hubspot"]) == 2
    assert capsys.readouterr().err.startswith("leadscore: HUBSPOT_ACCESS_TOKEN is not set: ")


def test_rescore_stopped_midway_says_how_many_leads_it_queued(env, monkeypatch, redis, salesforce, capsys):
    monkeypatch.setattr(rescore, "CHUNK", 5)
    salesforce.query_page = 5
    salesforce.api_calls = 13497  # the org's answers cross SALESFORCE_API_STOP_FRACTION (90%) on page two

    assert main(["rescore", "--crm", "salesforce"]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: rescore of salesforce:{SF_ORG_ID} stopped after queueing 10 leads: Salesforce org "
        f"{SF_ORG_ID} has used 13500 of 15000 daily API calls; leadscore stops at 90% "
        "(SALESFORCE_API_STOP_FRACTION); run it again once that is fixed (leads still waiting are not "
        "queued twice)\n"
    )
    assert len(pending_events(redis, "salesforce", SF_ORG_ID)) == 10


def test_a_worker_says_at_start_which_scoring_config_is_live(env, caplog):
    from workers import jobs

    assert main(["worker", "--burst"]) == 0

    config = jobs.context().config
    said = [r.getMessage() for r in caplog.records if r.name == "leadscore.worker" and r.levelname == "INFO"]
    assert (
        f"scoring config shipped default: version {config.version}, digest {config.digest} "
        "(LLM gpt-4o-mini, no trained model, HOLDOUT_SHARE 0)"
    ) in said
