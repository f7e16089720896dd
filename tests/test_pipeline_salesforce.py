"""End to end: Outbound Message or change event → Flask → Redis → RQ worker → the real
simple-salesforce client over HTTPS → Salesforce emulator, with the LLM stub."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import pytest
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from integration.emulators import free_port
from integration.emulators.salesforce import sf_id
from integration.errors import CRMError
from integration.salesforce.api import SalesforceCRM
from integration.settings import load_settings
from tests.conftest import FIXTURES, SF_ORG_ID, _clear_caches, fixture_json, stored_outcomes
from workers import jobs

HOT = "00Q5g00000Ls001EAB"
CRO = "00Q5g00000Ls002EAB"


def written(salesforce, lead_id: str) -> dict:
    return {k: v for k, v in salesforce.lead(lead_id).items() if k.startswith("Leadscore_")}


def test_outbound_message__single(post_outbound, sf_crm, run_worker, salesforce):
    post_outbound("outbound_message__single")
    [result] = run_worker()

    assert result == {
        "lead": f"salesforce:{SF_ORG_ID}:{HOT}",
        "outcome": "written",
        "score": 82,
        "tier": "A",
        "reason": "VP of Sales at 250-person tech company; Working, Rated hot",
        "fallback": False,
    }
    fields = written(salesforce, HOT)
    stamp = datetime.fromisoformat(fields.pop("Leadscore_Scored_At__c"))
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)
    details = json.loads(fields.pop("Leadscore_Details__c"))
    assert fields == {
        "Leadscore_Score__c": 82,
        "Leadscore_Tier__c": "A",
        "Leadscore_Reason__c": "VP of Sales at 250-person tech company; Working, Rated hot",
    }
    assert details["sub_scores"] == {
        "seniority": 0.9,
        "role_fit": 0.98,
        "reachability": 0.75,
        "source_stage": 0.68,
        "propensity": 0.8145,
    }
    assert (details["propensity"]["source"], details["fallback"]) == ("llm", False)
    [(lead_id, values)] = salesforce.writes
    assert lead_id == HOT and set(values) == {
        "Leadscore_Score__c", "Leadscore_Tier__c", "Leadscore_Reason__c", "Leadscore_Scored_At__c",
        "Leadscore_Details__c",
    }  # fmt: skip
    writes = [c for c in salesforce.calls if c[0] == "PATCH"]
    assert writes == [("PATCH", "/services/data/v60.0/composite/sobjects", "client=leadscore")]


def test_outbound_message__id_only(post_outbound, sf_crm, run_worker, salesforce):
    """The message the setup asks admins for, carrying the Lead's Id alone: the rest is read from the org."""
    post_outbound("outbound_message__id_only")
    [result] = run_worker()

    assert (result["lead"], result["outcome"], result["score"], result["tier"]) == (
        f"salesforce:{SF_ORG_ID}:{HOT}", "written", 82, "A",
    )  # fmt: skip
    assert written(salesforce, HOT)["Leadscore_Reason__c"] == (
        "VP of Sales at 250-person tech company; Working, Rated hot"
    )


def test_outbound_message__single_in_an_org_with_assignment_and_alerting_duplicate_rules(
    post_outbound, sf_crm, run_worker, salesforce
):
    """A score write leaves the Lead with its rep, though the org has an active assignment rule (REST
    runs it unless told not to), and saves through a duplicate rule that only alerts on edit."""
    salesforce.assignment_owner = "00G5g000001LeadQAAA"
    salesforce.duplicate_alerts.add(HOT)
    post_outbound("outbound_message__single")
    [result] = run_worker()

    assert (result["outcome"], result["score"]) == ("written", 82)
    assert salesforce.lead(HOT)["OwnerId"] == "0055g00000Rep01AAB"
    assert written(salesforce, HOT)["Leadscore_Score__c"] == 82


EXPECTED_BURST = {
    "00Q5g00000Ls001EAB": (82, "A", "VP of Sales at 250-person tech company; Working, Rated hot"),
    "00Q5g00000Ls002EAB": (
        84,
        "A",
        "Chief Revenue Officer at 900-person fintech; Partner referral, Working",
    ),
    "00Q5g00000Ls003EAB": (
        72,
        "A",
        "Director of Sales Operations at 1200-person tech company; Phone inquiry, Working",
    ),
    "00Q5g00000Ls004EAB": (
        36,
        "D",
        "Purchased list, Rated cold; No job title at Halvorsen Industrial Supply",
    ),
    "00Q5g00000Ls005EAB": (24, "D", "Student at school; Rated cold"),
    "00Q5g00000Ls006EAB": (25, "D", "Closed, not converted; Independent Consultant at 1-person agency"),
    "00Q5g00000Ls007EAB": (47, "C", "Opted out of email, no phone; Partner seminar"),
    "00Q5g00000Ls008EAB": (49, "C", "Staff-level title; Phone only, no usable email"),
    "00Q5g00000Ls009EAB": (
        63,
        "B",
        "Chief Financial Officer; Email and phone on file",
    ),
    "00Q5g00000Ls010EAB": (
        54,
        "C",
        "Director of IT at 3400-person healthcare firm; Email and phone on file",
    ),
    "00Q5g00000Ls012EAB": (75, "A", "Head of Sales at 60-person tech company; Employee referral"),
}


def test_outbound_message__demo_burst(post_outbound, sf_crm, run_worker, salesforce):
    post_outbound("outbound_message__demo_burst")
    results = run_worker()

    got = {
        lead_id: (
            written(salesforce, lead_id)["Leadscore_Score__c"],
            written(salesforce, lead_id)["Leadscore_Tier__c"],
            written(salesforce, lead_id)["Leadscore_Reason__c"],
        )
        for lead_id in EXPECTED_BURST
    }
    assert got == EXPECTED_BURST
    assert [r["outcome"] for r in results].count("won") == 1  # 00Q5g00000Ls011EAB, converted, opportunity won
    assert written(salesforce, "00Q5g00000Ls011EAB")["Leadscore_Score__c"] is None


def test_outbound_message__demo_burst_with_a_leadscore_field_read_only_fails_once_as_a_batch(
    post_outbound, sf_crm, run_worker, salesforce, queue, caplog
):
    salesforce.lead_fields["Leadscore_Score__c"]["updateable"] = False  # its field-level security changed
    post_outbound("outbound_message__demo_burst")

    assert run_worker() == []  # the batch failed, and is retried as one: not eleven jobs of one lead
    assert salesforce.writes == []
    assert queue.count == 0 and queue.failed_job_registry.count == 0
    [retry] = queue.scheduled_job_registry.get_job_ids()
    assert len(queue.fetch_job(retry).args[2]) == 12
    [failure] = [r.getMessage() for r in caplog.records if r.name == "rq.worker" and r.levelname == "ERROR"]
    assert (
        "salesforce refused all 11 writes of the batch alike, so the CRM's set-up is at fault, not a lead: "
        "INVALID_FIELD_FOR_INSERT_UPDATE: Unable to create/update fields: Leadscore_Score__c." in failure
    )


def test_two_leads_refused_by_validation_rules_of_their_own_are_each_dead_lettered(
    post_change_events, sf_crm, run_worker, salesforce, queue
):
    """One code for every validation rule: the rules' own words tell a lead's fault from a set-up's."""
    salesforce.reject.update({
        "00Q5g00000Ls001EAB": ("FIELD_CUSTOM_VALIDATION_EXCEPTION", "Country is required for US leads"),
        "00Q5g00000Ls002EAB": ("FIELD_CUSTOM_VALIDATION_EXCEPTION", "Partner referrals need a partner"),
    })  # fmt: skip
    creation = fixture_json("salesforce/lead_change_event__create.json")
    creation["events"][0]["ChangeEventHeader"]["recordIds"] = ["00Q5g00000Ls001EAB", "00Q5g00000Ls002EAB"]
    post_change_events(creation)  # one batch of these two leads alone
    results = run_worker()

    assert [(r["lead"][-18:], r["outcome"]) for r in results] == [
        ("00Q5g00000Ls001EAB", "failed"), ("00Q5g00000Ls002EAB", "failed"),
    ]  # fmt: skip
    dead = [queue.fetch_job(i).latest_result().exc_string for i in queue.failed_job_registry.get_job_ids()]
    assert sorted(reason.strip().rsplit(": ", 1)[-1] for reason in dead) == [
        "Country is required for US leads", "Partner referrals need a partner",
    ]  # fmt: skip


def test_outbound_message__deleted_lead(post_outbound, sf_crm, run_worker, queue):
    post_outbound("outbound_message__deleted_lead")
    [result] = run_worker()

    assert result["outcome"] == "lead_gone"
    assert queue.failed_job_registry.count == 0


@pytest.mark.parametrize(("opportunity_won", "kind"), [(True, "won"), (False, "converted")])
def test_outbound_message__converted_lead(post_outbound, sf_crm, run_worker, queue, salesforce, env,
                                          opportunity_won, kind):  # fmt: skip
    """A converted Lead takes no more writes; its conversion (and its opportunity's win) is the
    outcome the store keeps."""
    salesforce.opportunities["0065g00000Ls011AAB"]["IsWon"] = opportunity_won
    post_outbound("outbound_message__converted_lead")
    [result] = run_worker()

    assert result == {"lead": f"salesforce:{SF_ORG_ID}:00Q5g00000Ls011EAB", "outcome": kind}
    assert written(salesforce, "00Q5g00000Ls011EAB")["Leadscore_Score__c"] is None
    assert queue.failed_job_registry.count == 0
    org = SF_ORG_ID[:15]  # the form 15- and 18-character org ids share
    assert stored_outcomes(env) == [("salesforce", org, "00Q5g00000Ls011EAB", kind, "webhook")]


CONVERTED, OPPORTUNITY = "00Q5g00000Ls011EAB", "0065g00000Ls011AAB"


@pytest.mark.parametrize(("opportunity_won", "expected"), [(True, "deal_won"), (False, "no_won_deal")])
def test_opportunity_change_event__closed_won(post_change_events, sf_crm, run_worker, salesforce, env,
                                              opportunity_won, expected):  # fmt: skip
    """An opportunity won after its Lead converted changes no Lead: its own change event brings the
    win, read from Salesforce rather than taken from the event."""
    salesforce.opportunities[OPPORTUNITY]["IsWon"] = opportunity_won
    post_change_events("opportunity_change_event__closed_won")
    [result] = run_worker()

    key = f"salesforce:{SF_ORG_ID}:deal:{OPPORTUNITY}"
    org = SF_ORG_ID[:15]
    if opportunity_won:
        assert result == {"lead": key, "outcome": "deal_won", "leads": [CONVERTED]}
        assert stored_outcomes(env) == [("salesforce", org, CONVERTED, "won", "webhook")]
    else:
        assert result == {"lead": key, "outcome": "no_won_deal"}
        assert stored_outcomes(env) == []
    assert salesforce.writes == []  # an opportunity's outcome is kept, not written


def test_outbound_message__opportunity_won(post_outbound, sf_crm, run_worker, salesforce, env):
    post_outbound("outbound_message__opportunity_won")
    [result] = run_worker()

    assert result == {"lead": f"salesforce:{SF_ORG_ID}:deal:{OPPORTUNITY}", "outcome": "deal_won",
                      "leads": [CONVERTED]}  # fmt: skip
    assert stored_outcomes(env) == [("salesforce", SF_ORG_ID[:15], CONVERTED, "won", "webhook")]


def test_a_won_opportunity_without_opportunity_read_is_no_outcome_and_no_failure(
    post_change_events, sf_crm, run_worker, salesforce, env, queue, caplog
):
    salesforce.revoke_read("Opportunity")
    post_change_events("opportunity_change_event__closed_won")
    [result] = run_worker()

    assert result["outcome"] == "no_won_deal" and stored_outcomes(env) == []
    assert queue.failed_job_registry.count == 0
    assert "cannot read Opportunity" in caplog.text


def test_a_lead_and_an_opportunity_in_one_delivery_are_both_handled(post_change_events, sf_crm, run_worker,
                                                                    salesforce, env):  # fmt: skip
    both = fixture_json("salesforce/lead_change_event__status_update.json")
    both["events"] += fixture_json("salesforce/opportunity_change_event__closed_won.json")["events"]
    post_change_events(both)
    results = run_worker()

    assert [(r["lead"], r["outcome"]) for r in results] == [
        (f"salesforce:{SF_ORG_ID}:00Q5g00000Ls004EAB", "written"),
        (f"salesforce:{SF_ORG_ID}:deal:{OPPORTUNITY}", "deal_won"),
    ]
    assert [lead for lead, _ in salesforce.writes] == ["00Q5g00000Ls004EAB"]
    assert stored_outcomes(env) == [("salesforce", SF_ORG_ID[:15], CONVERTED, "won", "webhook")]


def test_outbound_message__demo_burst_without_opportunity_read(post_outbound, sf_crm, run_worker, queue,
                                                               salesforce, env, caplog):  # fmt: skip
    """An integration user that may not read Opportunity still scores the whole batch; its converted
    Lead is kept as converted, since whether the opportunity was won cannot be read."""
    salesforce.revoke_read("Opportunity")
    post_outbound("outbound_message__demo_burst")
    results = run_worker()

    assert sorted(r["outcome"] for r in results) == ["converted"] + ["written"] * 11
    assert {i: written(salesforce, i)["Leadscore_Score__c"] for i in EXPECTED_BURST} == {
        i: score for i, (score, _, _) in EXPECTED_BURST.items()
    }
    assert queue.failed_job_registry.count == 0 and len(queue.scheduled_job_registry) == 0
    org = SF_ORG_ID[:15]
    assert stored_outcomes(env) == [("salesforce", org, "00Q5g00000Ls011EAB", "converted", "webhook")]
    assert "cannot read Opportunity, so converted Leads are kept as converted" in caplog.text


def test_lead_deleted_between_read_and_write_ends_cleanly(sf_crm, salesforce):
    salesforce.delete_lead(HOT)

    with pytest.raises(Exception) as caught:
        sf_crm.write_scores(HOT, {"score": "50", "tier": "C", "reason": "r", "details": "{}"})

    assert type(caught.value).__name__ == "LeadGone"


def test_unchanged_lead_is_not_rewritten(post_outbound, post_change_events, sf_crm, run_worker, salesforce):
    post_outbound("outbound_message__single")
    run_worker()

    post_change_events("lead_change_event__create")
    [second] = run_worker()

    assert second["outcome"] == "unchanged"
    assert len(salesforce.writes) == 1


def test_a_rep_edit_sent_after_leadscore_wrote_the_lead_is_scored(
    post_outbound, sf_crm, run_worker, salesforce, monkeypatch
):
    """Salesforce sends an Outbound Message with the record as it is then: a rep's edit made while a
    batch scored the lead arrives naming leadscore's integration user as its last modifier."""
    read_leads = SalesforceCRM.read_leads

    def read_then_a_rep_edits(crm, lead_ids):
        leads = read_leads(crm, lead_ids)
        salesforce.leads[HOT].update(Status="Closed - Not Converted", LastModifiedById="0055g00000RepAAAA")
        return leads

    monkeypatch.setattr(SalesforceCRM, "read_leads", read_then_a_rep_edits)
    post_outbound("outbound_message__single")
    [first] = run_worker()
    monkeypatch.setattr(SalesforceCRM, "read_leads", read_leads)
    post_outbound(salesforce.outbound_message([(HOT, {})]))  # the rep's edit, as Salesforce sends it now
    [second] = run_worker()

    assert salesforce.lead(HOT)["LastModifiedById"] == salesforce.integration_user_id
    assert (first["score"], second["outcome"], second["score"], second["tier"]) == (82, "written", 25, "D")


def test_a_score_an_admin_changed_is_put_back_at_the_leads_next_message(
    post_outbound, sf_crm, run_worker, salesforce
):
    """Reps only read leadscore's fields, and a change of them alone sends no message: an admin's (or a
    Flow's) is put back when the Lead next changes."""
    post_outbound("outbound_message__single")
    [first] = run_worker()
    salesforce.leads[HOT].update(Leadscore_Score__c=99, Leadscore_Tier__c="A")

    post_outbound(salesforce.outbound_message([(HOT, {})]))
    [second] = run_worker()

    assert (first["outcome"], second["outcome"]) == ("written", "written")
    shown = written(salesforce, HOT)
    assert (shown["Leadscore_Score__c"], shown["Leadscore_Tier__c"]) == (82, "A")


def test_lead_change_event__status_update_rescores(post_change_events, sf_crm, run_worker, salesforce):
    post_change_events("lead_change_event__status_update")
    [first] = run_worker()
    salesforce.leads["00Q5g00000Ls004EAB"]["Status"] = "Closed - Not Converted"
    value = fixture_json("salesforce/lead_change_event__status_update.json")
    value["events"][0]["ChangeEventHeader"]["transactionKey"] = "a-later-transaction"
    post_change_events(value)
    [second] = run_worker()

    assert (first["outcome"], second["outcome"]) == ("written", "written")
    assert second["score"] == 25 and second["reason"].startswith("Closed, not converted")


def test_collections_write_reports_each_failed_record_with_salesforce_code(sf_crm, salesforce):
    salesforce.reject[CRO] = (
        "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        "Score cannot be written while Status is Closed",
    )
    fields = {"score": "70", "tier": "A", "reason": "r", "details": "{}"}

    results = sf_crm.write_many([(HOT, fields), (CRO, fields), ("00Q5g00000Ls003EAB", fields)])

    assert [(r.lead_id, r.ok, r.code) for r in results] == [
        (HOT, True, ""),
        (CRO, False, "FIELD_CUSTOM_VALIDATION_EXCEPTION"),
        ("00Q5g00000Ls003EAB", True, ""),
    ]
    assert results[1].message == "Score cannot be written while Status is Closed"
    assert [lead_id for lead_id, _ in salesforce.writes] == [HOT, "00Q5g00000Ls003EAB"]


def test_rejected_record_is_dead_lettered_with_its_code_and_others_are_written(
    post_outbound, sf_crm, run_worker, salesforce, queue
):
    salesforce.reject[CRO] = (
        "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        "Score cannot be written while Status is Closed",
    )
    post_outbound("outbound_message__demo_burst")
    results = run_worker()

    assert len([r for r in results if r["outcome"] == "written"]) == 10
    [failed_id] = queue.failed_job_registry.get_job_ids()
    failed = queue.fetch_job(failed_id)
    crm, account, [event] = failed.args
    assert json.loads(event)["lead_id"] == CRO
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in failed.latest_result().exc_string
    assert queue.scheduled_job_registry.count == 0  # not retried: the same write would fail again


def _client_credentials(settings):
    return load_settings(
        **{
            **settings.model_dump(),
            "salesforce_access_token": "",
            "salesforce_consumer_key": "leadscore-client-id",
            "salesforce_consumer_secret": "leadscore-client-secret",
        }
    )


def test_client_credentials_login(settings, salesforce, sf_crm):
    lead = SalesforceCRM(_client_credentials(settings), org_id=SF_ORG_ID).read_lead(HOT)

    assert (lead.title, lead.source, lead.company_size) == ("VP of Sales", "Web", "250")
    assert ("POST", "/services/oauth2/token", "client=leadscore") in salesforce.calls


def test_a_client_credentials_token_that_expired_is_replaced_and_the_call_made_again(
    settings, salesforce, sf_crm
):
    crm = SalesforceCRM(_client_credentials(settings), org_id=SF_ORG_ID)
    crm.read_lead(HOT)
    salesforce.token = "a-later-token"  # the org expired the first one

    lead = crm.read_lead(HOT)
    [result] = crm.write_many([(HOT, {"score": "88"})])

    assert lead.title == "VP of Sales" and result.ok and written(salesforce, HOT)["Leadscore_Score__c"] == 88
    assert [c for c in salesforce.calls if c[1] == "/services/oauth2/token"] == [
        ("POST", "/services/oauth2/token", "client=leadscore")
    ] * 2  # one new token, not one a call


def test_a_session_one_work_horse_renewed_serves_the_next_without_a_login(
    env, monkeypatch, salesforce, sf_crm
):
    monkeypatch.setenv("SALESFORCE_ACCESS_TOKEN", "")
    monkeypatch.setenv("SALESFORCE_CONSUMER_KEY", "leadscore-client-id")
    monkeypatch.setenv("SALESFORCE_CONSUMER_SECRET", "leadscore-client-secret")
    _clear_caches()
    parent = jobs.salesforce_for(SF_ORG_ID)
    parent.prepare()  # `leadscore worker` logs in and describes Lead before forking work horses
    before = len(salesforce.calls)
    parent.read_lead(HOT)
    one_read = salesforce.calls[before:]
    salesforce.token = "a-later-token"  # the org ended the session

    copy.copy(parent).read_lead(HOT)  # a work horse, forked holding the ended session: refused, logs in
    before = len(salesforce.calls)
    lead = jobs.salesforce_for(SF_ORG_ID).read_lead(HOT)  # the next work horse

    assert lead.title == "VP of Sales" and salesforce.calls[before:] == one_read  # not refused, no login
    assert [c for c in salesforce.calls if c[1] == "/services/oauth2/token"] == [
        ("POST", "/services/oauth2/token", "client=leadscore")
    ] * 2


def test_without_redis_to_share_a_session_each_process_logs_in_itself(settings, salesforce, sf_crm):
    unreachable = Redis(port=free_port(), retry=Retry(NoBackoff(), 0))  # a worker starting before Redis

    crm = SalesforceCRM(_client_credentials(settings), org_id=SF_ORG_ID, redis=unreachable)

    assert crm.read_lead(HOT).title == "VP of Sales"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("an admin deleted a leadscore field",
         "Salesforce query failed: INVALID_FIELD: No such column 'Leadscore_Reason__c' on entity 'Lead'. If "
         "you are attempting to use a custom field, be sure to append the '__c' after the custom field name. "
         "Please reference your WSDL or the describe call for the appropriate names. (`leadscore setup "
         "salesforce` creates leadscore's fields)"),
        ("SALESFORCE_ACCESS_TOKEN expired",
         "Salesforce no longer accepts SALESFORCE_ACCESS_TOKEN (INVALID_SESSION_ID: expired or revoked): set "
         "a new one, or unset it and let leadscore log in itself with SALESFORCE_CONSUMER_KEY and "
         "SALESFORCE_CONSUMER_SECRET, or a username and password"),
    ],
    ids=["field_deleted", "token_expired"],
)  # fmt: skip
def test_a_read_the_org_refuses_after_the_worker_started_says_what_to_fix(salesforce, sf_crm, change,
                                                                          message):  # fmt: skip
    sf_crm.prepare()  # the worker learned the org's fields at start
    if change == "SALESFORCE_ACCESS_TOKEN expired":
        salesforce.token = "a-later-token"
    else:
        salesforce.remove_lead_field("Leadscore_Reason__c")

    with pytest.raises(CRMError) as refused:
        sf_crm.read_lead(HOT)
    assert str(refused.value) == message


def test_task_text_is_read_and_fenced(post_outbound, sf_crm, run_worker, llm):
    single = (FIXTURES / "salesforce" / "outbound_message__single.xml").read_bytes()
    body = single.replace(HOT.encode(), b"00Q5g00000Ls006EAB")
    post_outbound(body)
    run_worker()

    [request] = llm.requests
    user = request["messages"][1]["content"]
    assert user.count("<lead_data>") == 1 and user.count("</lead_data>") == 1
    assert "ignore your instructions" in user


def test_fifteen_character_lead_id_is_scored(post_outbound, sf_crm, run_worker, salesforce):
    single = (FIXTURES / "salesforce" / "outbound_message__single.xml").read_bytes()
    post_outbound(single.replace(HOT.encode(), HOT[:15].encode()))
    [result] = run_worker()

    assert result["outcome"] == "written"
    assert written(salesforce, HOT)["Leadscore_Tier__c"] == "A"


def test_a_batch_reads_each_leads_own_latest_tasks_however_busy_another_lead_is(sf_crm, salesforce):
    """One Lead with a dozen newer Tasks must not crowd the Task a CRO's score rests on out of the batch."""
    cro_call = fixture_json("salesforce/task__cro_referral_intro_call.json")
    for day in range(12):
        task_id = sf_id("00T5g")
        salesforce.tasks[task_id] = {
            "Id": task_id,
            "WhoId": HOT,
            "Subject": f"Email {day}",
            "CreatedDate": f"2026-11-{day + 19:02d}T09:00:00.000+0000",
        }

    leads = sf_crm.read_leads([HOT, CRO])

    assert leads[CRO].texts[1] == f"{cro_call['Subject']} — {cro_call['Description']}"
    assert leads[HOT].texts[1:] == tuple(f"Email {day}" for day in (11, 10, 9, 8, 7))
