"""Outcomes, rep feedback, the randomised holdout and a trained model, through the same
webhooks and workers as every score (real Redis, RQ, SDK clients and emulators)."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from redis import Redis
from sqlalchemy import select

from integration import cli, metrics, pending
from integration.cli import main
from integration.emulators import free_port
from integration.settings import get_settings
from tests.conftest import EACH_STORE, FIXTURES, PORTAL_ID, SF_ORG_ID, fixture_json, stored_outcomes
from workers import jobs, store, store_data
from workers.config import TIER_NAMES, load_config
from workers.holdout import HOLDOUT_REASON, in_holdout
from workers.llm import answers_keys, cached_answer_key
from workers.tabular import TableError

CONTACT = "74300000103"
SLICE = FIXTURES / "data" / "leads_slice.csv"
MAPPING = FIXTURES / "data" / "x_education_mapping.toml"


def written(hubspot, contact_id: str) -> dict:
    return {k: v for k, v in hubspot.contact_properties(contact_id).items() if k.startswith("leadscore_")}


def table(env, which) -> list[dict]:
    with store.Store(env["DATABASE_URL"]).engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(select(which).order_by(which.c.id))]


def reconfigure(monkeypatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    jobs.context.cache_clear()
    jobs._hubspot.cache_clear()
    jobs._salesforce.cache_clear()


@EACH_STORE
def test_contact_merge__two_contacts_moves_what_was_kept_of_both_to_the_contact_that_remains(
    env, post_delivery, crm, run_worker, hubspot
):
    """The same person under three ids: a duplicate that never converted must not teach `train` a
    negative beside its converted twin, and `forget` of the contact that remains must find it all."""
    hubspot.contacts["74300000113"]["properties"]["lifecyclestage"] = "opportunity"
    creation = fixture_json("hubspot/contact.creation__single.json")[0]
    post_delivery(json.dumps([{**creation, "objectId": 74300000105},
                              {**creation, "eventId": 2, "objectId": 74300000113}]).encode())  # fmt: skip
    run_worker()
    before = {row["lead_id"]: row["reached_at"] for row in table(env, store.outcomes)}

    hubspot.apply_changes(fixture_json("hubspot/contact.merge__two_contacts.json"))
    post_delivery("contact.merge__two_contacts")
    run_worker()

    survivor = "74300000131"
    assert sorted(row["lead_id"] for row in table(env, store.scores)) == [survivor] * 3
    [outcome] = table(env, store.outcomes)
    assert (outcome["lead_id"], outcome["kind"]) == (survivor, "opportunity")
    assert outcome["reached_at"] == before["74300000113"]  # when the duplicate got there, not the merge
    assert main(["forget", "--crm", "hubspot", "--account", PORTAL_ID, survivor]) == 0
    assert table(env, store.scores) == table(env, store.outcomes) == []


@EACH_STORE
def test_lead_change_event__merge_moves_what_was_kept_of_the_deleted_lead_to_the_one_that_remains(
    env, post_change_events, sf_crm, run_worker, salesforce, redis
):
    """Salesforce deletes the Leads merged away and names the winner only in each one's MasterRecordId,
    in the recycle bin: the DELETE's batch asks for it, so the store keeps one lead, as for HubSpot."""
    winner, loser = "00Q5g00000Ls001EAB", "00Q5g00000Ls009EAB"
    creation = fixture_json("salesforce/lead_change_event__create.json")
    creation["events"][0]["ChangeEventHeader"]["recordIds"] = [loser]
    post_change_events(creation)
    run_worker()
    [loser_answers] = answers_keys("salesforce", SF_ORG_ID, loser)[:1]
    [answer] = [cached_answer_key(a.decode()) for a in redis.zrange(loser_answers, 0, -1)]

    salesforce.merge_leads(winner, [loser])
    post_change_events("lead_change_event__merge")
    results = run_worker()

    assert [(r["lead"], r["outcome"]) for r in results] == [
        (f"salesforce:{SF_ORG_ID}:{winner}", "written"),
        (f"salesforce:{SF_ORG_ID}:{loser}", "merged"),
    ]
    assert results[1]["into"] == winner
    assert sorted(row["lead_id"] for row in table(env, store.scores)) == [winner] * 2
    assert not redis.exists(loser_answers, answer)  # no row names it now: forget of the winner would miss it
    assert main(["forget", "--crm", "salesforce", "--account", SF_ORG_ID, winner]) == 0
    assert table(env, store.scores) == []


def test_a_lead_merged_into_one_merged_away_since_moves_to_the_last(
    env, post_change_events, sf_crm, run_worker, salesforce
):
    """A into B, then B into C, and B's DELETE handled first (A's batch was put off): A's rows go to C."""
    a, b, c = "00Q5g00000Ls009EAB", "00Q5g00000Ls002EAB", "00Q5g00000Ls001EAB"
    creation = fixture_json("salesforce/lead_change_event__create.json")
    creation["events"][0]["ChangeEventHeader"]["recordIds"] = [a]
    post_change_events(creation)
    run_worker()
    salesforce.merge_leads(b, [a])
    salesforce.merge_leads(c, [b])
    deletion = fixture_json("salesforce/lead_change_event__delete.json")
    deletion["events"][0]["ChangeEventHeader"]["recordIds"] = [a]
    post_change_events(deletion)

    [result] = run_worker()

    assert (result["outcome"], result["into"]) == ("merged", c)
    assert [row["lead_id"] for row in table(env, store.scores)] == [c]


def test_lead_change_event__delete_of_a_lead_merged_into_none_is_gone(post_change_events, sf_crm, run_worker,
                                                                      salesforce):  # fmt: skip
    salesforce.delete_lead("00Q5g00000Ls008EAB")
    post_change_events("lead_change_event__delete")

    assert [r["outcome"] for r in run_worker()] == ["lead_gone"]


@EACH_STORE
def test_every_written_score_is_kept_with_the_inputs_it_was_made_from(env, post_delivery, crm, run_worker):
    post_delivery("contact.propertyChange__lead_status")
    [result] = run_worker()

    [kept] = table(env, store.scores)
    assert (kept["crm"], kept["account_id"], kept["lead_id"]) == ("hubspot", PORTAL_ID, CONTACT)
    assert (kept["score"], kept["tier"], kept["reason"]) == (
        result["score"],
        result["tier"],
        result["reason"],
    )
    assert kept["scorer"] == "rules+llm"
    assert kept["model_version"] == "gpt-4o-mini-2024-07-18"  # the LLM model, as it answered
    assert kept["holdout"] is False and kept["fallback"] is False
    assert kept["features"]["status"] == "IN_PROGRESS" and 0 <= kept["features"]["llm_propensity"] <= 1
    assert kept["fingerprint"] == kept["details"]["fingerprint"]


@EACH_STORE
def test_contact_privacyDeletion__single_erases_what_leadscore_kept_of_the_contact(
    env, post_delivery, crm, run_worker, hubspot, redis
):
    """HubSpot's GDPR delete: the contact's scores, outcomes, feedback and cached LLM answer go; other
    contacts' stay."""
    erased = "74300000101"
    post_delivery("contact.creation__single")
    post_delivery("contact.propertyChange__lead_status")
    run_worker()
    kept = store.Store(env["DATABASE_URL"])
    kept.record_outcomes([store.LeadFact("hubspot", PORTAL_ID, erased, "opportunity", None)], source="sync")
    kept.record_feedback([store.Feedback("hubspot", PORTAL_ID, erased, "too_high", 80, "A", "f")])
    cached = {
        lead: cached_answer_key(redis.zrange(answers_keys("hubspot", PORTAL_ID, lead)[0], 0, 0)[0].decode())
        for lead in (erased, CONTACT)
    }
    assert redis.exists(*cached.values()) == 2
    [fingerprint] = [row["fingerprint"] for row in table(env, store.scores) if row["lead_id"] == erased]
    redis.set(f"leadscore:llm:{fingerprint}", "{}")  # where an older release cached the same answer
    redis.set(jobs.put_back_key(f"hubspot:{PORTAL_ID}:{erased}"), "job")  # its edited score put back today
    redis.zadd(pending.backfill_key("hubspot", PORTAL_ID), {erased: 1.0, CONTACT: 1.0})  # a rescore's
    listed_before = answers_keys("hubspot", PORTAL_ID, erased)[1]  # a set of the release before
    redis.sadd(listed_before, "listed-before")
    marks, marked_at, marks_before = pending.handoff_keys("hubspot", PORTAL_ID)
    redis.hset(marks_before, mapping={erased: 1, CONTACT: 1})  # its hand-off as an older release marked it
    redis.set(cached_answer_key("listed-before"), "{}")
    del hubspot.contacts[erased]

    assert post_delivery("contact.privacyDeletion__single").get_json()["queued"] == 1
    [result] = run_worker()

    assert result == {"lead": f"hubspot:{PORTAL_ID}:{erased}", "outcome": "erased"}
    assert [row["lead_id"] for row in table(env, store.scores)] == [CONTACT]
    assert table(env, store.outcomes) == table(env, store.feedback) == []
    assert (redis.exists(cached[erased]), redis.exists(cached[CONTACT])) == (0, 1)
    assert not redis.exists(f"leadscore:llm:{fingerprint}")
    assert not redis.exists(jobs.put_back_key(f"hubspot:{PORTAL_ID}:{erased}"))
    assert not redis.exists(listed_before, cached_answer_key("listed-before"))
    handed_off = (redis.hkeys(marks), redis.zrange(marked_at, 0, -1), redis.hkeys(marks_before))
    backfilling = redis.zrange(pending.backfill_key("hubspot", PORTAL_ID), 0, -1)
    assert (handed_off, backfilling) == (([CONTACT.encode()],) * 3, [CONTACT.encode()])  # its id kept nowhere


def test_a_privacy_deletion_batched_with_other_leads_is_erased_on_its_own_and_holds_none_back(
    env, post_delivery, crm, run_worker, hubspot, queue, monkeypatch
):
    """A store that is down fails the erasure, which is owed and retried alone; the other leads' scores
    still reach the CRM."""
    erased = "74300000101"
    del hubspot.contacts[erased]
    deletion = fixture_json("hubspot/contact.privacyDeletion__single.json")
    change = fixture_json("hubspot/contact.propertyChange__lead_status.json")
    real_erase, tries = store.Store.erase, []

    def erase_finding_the_store_down_once(self, *args):
        tries.append(args)
        if len(tries) == 1:
            raise ConnectionError("store down")
        return real_erase(self, *args)

    monkeypatch.setattr(store.Store, "erase", erase_finding_the_store_down_once)
    post_delivery(json.dumps(deletion + change).encode())

    results = run_worker()
    [retry] = queue.scheduled_job_registry.get_job_ids()  # RQ's retry of the erasure alone
    job = queue.fetch_job(retry)
    queue.scheduled_job_registry.remove(job)
    queue.enqueue_job(job)  # as the scheduler does when its time comes
    [again] = run_worker()

    by_lead = {r["lead"].rsplit(":", 1)[1]: r["outcome"] for r in results}
    assert by_lead == {CONTACT: "written", erased: "erase_queued"}
    assert again == {"lead": f"hubspot:{PORTAL_ID}:{erased}", "outcome": "erased"}
    assert len(tries) == 2 and all(args[2] == [erased] for args in tries)


@pytest.mark.parametrize("moment", ["score", "keep"])
def test_a_lead_erased_while_a_batch_holds_it_leaves_no_row_and_no_cached_llm_answer(
    moment, env, post_delivery, crm, run_worker, hubspot, redis, monkeypatch
):
    """An erasure (here `leadscore forget`; a privacy deletion's job erases alike) lands after a batch
    read the lead: while the batch scores it (asking the LLM), or while it keeps its rows."""
    erased = "74300000101"
    hubspot.contacts[erased]["properties"]["leadscore_feedback"] = "too_high"
    real, marked = getattr(jobs.WorkerContext, moment), []

    def erased_meanwhile(self, *args):
        if not marked:
            assert main(["forget", "--crm", "hubspot", "--account", PORTAL_ID, erased]) == 0
            marked.append(redis.zscore(jobs.erased_key("hubspot", PORTAL_ID), erased))
        return real(self, *args)

    monkeypatch.setattr(jobs.WorkerContext, moment, erased_meanwhile)
    post_delivery("contact.creation__single")

    [result] = run_worker()

    assert result["outcome"] == {"score": "erased", "keep": "written"}[moment]  # "keep": the CRM has it
    assert table(env, store.scores) == table(env, store.feedback) == []
    assert redis.keys("leadscore:llm*") == []
    # erased again, not marked again: a batch that read the lead after the erasure keeps it
    assert redis.zscore(jobs.erased_key("hubspot", PORTAL_ID), erased) == marked[0]


def test_an_llm_answer_cached_for_a_score_never_kept_is_erased_with_its_lead(
    env, post_delivery, crm, run_worker, hubspot, redis, capsys
):
    erased = "74300000101"
    hubspot.reject[erased] = "Blocked by a validation rule"
    post_delivery("contact.creation__single")
    run_worker()  # refused: no score kept, but the LLM's answer is cached
    assert table(env, store.scores) == [] and redis.keys("leadscore:llm:*")

    assert main(["forget", "--crm", "hubspot", "--account", PORTAL_ID, erased]) == 0

    assert redis.keys("leadscore:llm*") == []


def test_outcomes_sync_keeps_no_outcome_of_a_lead_erased_while_it_read(env, crm, monkeypatch):
    kept_score(env, "hubspot", PORTAL_ID)
    erased = "74300000120"  # a customer
    real = store.Store.record_outcomes

    def erased_meanwhile(self, facts, source):
        assert main(["forget", "--crm", "hubspot", "--account", PORTAL_ID, erased]) == 0
        return real(self, facts, source)

    monkeypatch.setattr(store.Store, "record_outcomes", erased_meanwhile)

    assert main(["outcomes", "sync", "--crm", "hubspot", "--account", PORTAL_ID]) == 0

    assert [lead for _, _, lead, _, _ in stored_outcomes(env)] == ["74300000121"]


def test_a_lead_forgotten_before_a_batch_reads_it_is_scored_and_kept_again(
    env, post_delivery, crm, run_worker, hubspot, capsys
):
    """`forget` erases what is kept now; the lead, still in the CRM, is scored again at its next change."""
    lead = "74300000101"
    post_delivery("contact.creation__single")
    run_worker()
    assert main(["forget", "--crm", "hubspot", "--account", PORTAL_ID, lead]) == 0
    assert table(env, store.scores) == []
    later = [{**fixture_json("hubspot/contact.propertyChange__lead_status.json")[0], "objectId": int(lead),
              "eventId": 9_100_001, "propertyValue": "OPEN"}]  # fmt: skip
    hubspot.apply_changes(later)
    post_delivery(json.dumps(later).encode())

    [result] = run_worker()

    assert result["outcome"] == "written"
    assert [row["lead_id"] for row in table(env, store.scores)] == [lead]


def test_a_salesforce_lead_forgotten_by_its_15_character_ids_is_marked_erased_as_batches_read_it(
    env, redis, capsys
):
    lead = "00Q5g00000Ls001EAB"
    assert main(["forget", "--crm", "salesforce", "--account", SF_ORG_ID[:15], lead[:15]]) == 0

    assert jobs.erased_since(redis, "salesforce", SF_ORG_ID, [lead], 0) == {lead}


def test_forget_refuses_an_id_that_is_not_one_rather_than_erase_nothing(env, capsys):
    assert main(["forget", "--crm", "salesforce", "--account", SF_ORG_ID, "00q5g00000ls001eab"]) == 2
    assert capsys.readouterr().err == (
        "leadscore: not a salesforce id: 00q5g00000ls001eab (check its case and length); nothing erased\n"
    )
    assert main(["forget", "--crm", "hubspot", "--account", PORTAL_ID, "74300000101 "]) == 2


def test_forget_erases_a_salesforce_lead_named_by_either_id_form(
    env, post_outbound, sf_crm, run_worker, capsys, redis
):
    lead = "00Q5g00000Ls001EAB"
    post_outbound("outbound_message__single")
    run_worker()
    assert [row["lead_id"] for row in table(env, store.scores)] == [lead]

    legacy = f"leadscore:llm-of:salesforce:{SF_ORG_ID[:15]}:{lead}"  # where an older release listed them
    redis.sadd(legacy, "an-older-fingerprint")
    redis.set("leadscore:llm:an-older-fingerprint", "{}")  # an answer whose score was never kept
    assert main(["forget", "--crm", "salesforce", "--account", SF_ORG_ID, lead[:15]]) == 0
    assert not redis.exists(legacy, "leadscore:llm:an-older-fingerprint")

    assert table(env, store.scores) == []
    assert capsys.readouterr().out == (
        f"salesforce:{SF_ORG_ID}: erased 1 scores, 0 outcomes, 0 feedback and 2 cached LLM answers of 1 "
        "leads; delete them in the CRM too, or their next change scores them again\n"
    )


@EACH_STORE
def test_contact_propertyChange__rep_feedback(env, post_delivery, crm, run_worker, hubspot, llm):
    post_delivery("contact.propertyChange__lead_status")
    [scored] = run_worker()
    calls, writes = len(llm.requests), len(hubspot.writes)

    hubspot.contacts[CONTACT]["properties"]["leadscore_feedback"] = "too_high"
    assert post_delivery("contact.propertyChange__rep_feedback").get_json()["queued"] == 1
    [result] = run_worker()
    again = json.dumps(
        [{**fixture_json("hubspot/contact.propertyChange__rep_feedback.json")[0], "eventId": 7}]
    )
    post_delivery(again.encode())
    run_worker()

    assert result["outcome"] == "unchanged"  # feedback is not a scoring input: no LLM call, no write
    assert (len(llm.requests), len(hubspot.writes)) == (calls, writes)
    [said] = table(env, store.feedback)  # said twice, kept once
    assert (said["lead_id"], said["value"], said["score"], said["tier"]) == (
        CONTACT, "too_high", scored["score"], scored["tier"]
    )  # fmt: skip


def test_contact_propertyChange__rep_edited_score(env, post_delivery, crm, run_worker, hubspot, llm):
    """The score is leadscore's (a rep who disagrees sets the feedback): typed over, it is put back at
    once, the LLM answering from its cache, and the edit is counted. The rep's feedback, about the
    score leadscore wrote, stays. Changed again within the day, it is left as it is: a workflow or a
    sync that keeps setting it is not fought at each event."""
    edited = "74300000101"
    post_delivery("contact.creation__single")
    [scored] = run_worker()
    calls = len(llm.requests)
    properties = hubspot.contacts[edited]["properties"]
    properties.update(leadscore_score="95", leadscore_tier="A", leadscore_feedback="too_low")  # the fixture's
    assert scored["score"] != 95

    assert post_delivery("contact.propertyChange__rep_edited_score").get_json()["queued"] == 2
    [result] = run_worker()

    assert result["outcome"] == "written" and len(llm.requests) == calls
    shown = written(hubspot, edited)
    assert (shown["leadscore_score"], shown["leadscore_tier"], shown["leadscore_feedback"]) == (
        str(scored["score"]), scored["tier"], "too_low"
    )  # fmt: skip
    said = [(row["value"], row["score"], row["tier"]) for row in table(env, store.feedback)]
    assert said == [("too_low", scored["score"], scored["tier"])]
    assert [row["details"].get("put_back") for row in table(env, store.scores)] == [None, True]
    redis = Redis.from_url(env["REDIS_URL"])
    assert metrics.counter_value(redis, "scores_edited_in_crm_total", crm="hubspot", action="put_back") == 1
    creation = fixture_json("hubspot/contact.creation__single.json")
    post_delivery(json.dumps([{**e, "eventId": e["eventId"] + 1} for e in creation]).encode())
    assert [r["outcome"] for r in run_worker()] == ["unchanged"]  # put back: nothing more to write

    properties.update(leadscore_score="95", leadscore_tier="A")  # and again, the same day
    post_delivery(json.dumps([{**e, "eventId": e["eventId"] + 2} for e in creation]).encode())
    assert [r["outcome"] for r in run_worker()] == ["unchanged"]
    assert written(hubspot, edited)["leadscore_score"] == "95"
    assert metrics.counter_value(redis, "scores_edited_in_crm_total", crm="hubspot", action="left") == 1


def test_a_put_back_the_crm_refused_is_put_back_when_its_job_is_requeued(
    env, post_delivery, crm, run_worker, hubspot, queue
):
    edited = "74300000101"
    post_delivery("contact.creation__single")
    [scored] = run_worker()
    post_delivery("contact.propertyChange__lead_status")  # another lead, scored too
    run_worker()
    hubspot.contacts[edited]["properties"].update(leadscore_score="95", leadscore_tier="A")
    hubspot.reject[edited] = "Blocked by a validation rule"
    edits = fixture_json("hubspot/contact.propertyChange__rep_edited_score.json")
    status = {**fixture_json("hubspot/contact.propertyChange__lead_status.json")[0], "eventId": 16}
    hubspot.contacts[CONTACT]["properties"]["hs_lead_status"] = "CONNECTED"
    post_delivery(json.dumps([*edits, status]).encode())  # one batch: the refused lead goes on alone
    run_worker()  # and is refused again: dead-lettered
    hubspot.reject.clear()

    [job_id] = queue.failed_job_registry.get_job_ids()
    assert main(["requeue", job_id]) == 0
    [result] = run_worker()

    assert result["outcome"] == "written"
    assert written(hubspot, edited)["leadscore_score"] == str(scored["score"])


def test_a_score_written_before_details_kept_it_is_taken_as_shown(
    env, post_delivery, crm, run_worker, hubspot
):
    edited = "74300000101"
    post_delivery("contact.creation__single")
    run_worker()
    properties = hubspot.contacts[edited]["properties"]
    details = json.loads(properties["leadscore_details"])
    del details["score"], details["tier"]  # as the release before wrote them
    properties.update(leadscore_details=json.dumps(details), leadscore_score="95")

    creation = fixture_json("hubspot/contact.creation__single.json")
    post_delivery(json.dumps([{**e, "eventId": e["eventId"] + 1} for e in creation]).encode())

    assert [r["outcome"] for r in run_worker()] == ["unchanged"]
    assert written(hubspot, edited)["leadscore_score"] == "95"


def test_a_score_typed_into_a_held_out_lead_is_blanked_again(env, monkeypatch, post_delivery, crm, run_worker,
                                                             hubspot):  # fmt: skip
    reconfigure(monkeypatch, HOLDOUT_SHARE="0.25")
    post_delivery("contact.creation__demo_burst")
    run_worker()
    held = sorted(c for c in hubspot.contacts if in_holdout(f"hubspot:{PORTAL_ID}:{c}", 0.25))[0]
    hubspot.contacts[held]["properties"].update(leadscore_score="80", leadscore_tier="A")

    burst = fixture_json("hubspot/contact.creation__demo_burst.json")
    post_delivery(json.dumps([{**e, "eventId": e["eventId"] + 1} for e in burst]).encode())
    outcomes = {r["lead"].rsplit(":", 1)[1]: r["outcome"] for r in run_worker()}

    assert {c for c, outcome in outcomes.items() if outcome != "unchanged"} == {held}
    fields = written(hubspot, held)
    assert (fields["leadscore_score"], fields["leadscore_tier"], fields["leadscore_reason"]) == (
        "", "", HOLDOUT_REASON
    )  # fmt: skip


def _scored_said_too_high_then_disqualified(post_delivery, run_worker, hubspot) -> tuple[dict, dict]:
    """A lead scored, a rep's "too high", then the rep disqualifying it: the two scores' results."""
    post_delivery("contact.propertyChange__lead_status")
    [first] = run_worker()
    properties = hubspot.contacts[CONTACT]["properties"]
    properties["leadscore_feedback"] = "too_high"
    post_delivery("contact.propertyChange__rep_feedback")
    run_worker()
    properties["hs_lead_status"] = "UNQUALIFIED"  # a new score and tier
    post_delivery(json.dumps([{**fixture_json("hubspot/contact.propertyChange__lead_status.json")[0],
                               "eventId": 8, "propertyValue": "UNQUALIFIED"}]).encode())  # fmt: skip
    [second] = run_worker()
    return first, second


def test_a_new_score_clears_the_feedback_on_the_old_one_and_saying_it_again_counts(
    env, post_delivery, crm, run_worker, hubspot
):
    """Feedback is about the score the rep saw: beside a new score it would mislead, and a rep who
    still thinks "too high" could not say so again without clearing it first."""
    first, second = _scored_said_too_high_then_disqualified(post_delivery, run_worker, hubspot)
    properties = hubspot.contacts[CONTACT]["properties"]

    assert second["outcome"] == "written" and (second["score"], second["tier"]) != (
        first["score"],
        first["tier"],
    )
    assert hubspot.contact_properties(CONTACT)["leadscore_feedback"] == ""
    properties["leadscore_feedback"] = "too_high"  # of the new score
    post_delivery(json.dumps([{**fixture_json("hubspot/contact.propertyChange__rep_feedback.json")[0],
                               "eventId": 9}]).encode())  # fmt: skip
    run_worker()
    said = [(row["value"], row["score"], row["tier"]) for row in table(env, store.feedback)]
    assert said == [
        ("too_high", first["score"], first["tier"]),
        ("cleared", second["score"], second["tier"]),
        ("too_high", second["score"], second["tier"]),
    ]
    by_tier = store_data.store_summary(store.Store(env["DATABASE_URL"]))["feedback"]
    assert by_tier == {first["tier"]: {"too_high": 1}, second["tier"]: {"too_high": 1}}


def test_history_shows_each_score_what_made_it_and_what_changed(
    env, post_delivery, crm, run_worker, hubspot, capsys
):
    first, second = _scored_said_too_high_then_disqualified(post_delivery, run_worker, hubspot)
    capsys.readouterr()

    assert main(["history", "--crm", "hubspot", "--account", PORTAL_ID, CONTACT]) == 0
    lines = capsys.readouterr().out.splitlines()
    digest = load_config().file_digest
    made = f"rules+llm gpt-4o-mini-2024-07-18, rules b2b-saas-default-2 ({digest})"
    scores = [line for line in lines if " score " in line]
    assert lines[0] == f"hubspot:{PORTAL_ID} lead {CONTACT}: 2 scores, 0 outcomes, 2 feedback, oldest first"
    assert [line.split("UTC  ", 1)[1] for line in scores] == [
        f"score {first['score']} {first['tier']}  {made}",
        f"score {second['score']} {second['tier']}  {made}",
    ]
    assert [line for line in lines if "feedback" in line and "UTC" in line][0].endswith(
        f"feedback too_high on {first['score']} {first['tier']}"
    )
    [changed] = [line for line in lines if "changed:" in line]
    assert changed == "    changed: status 'IN_PROGRESS' → 'UNQUALIFIED'"  # the LLM answered the same
    assert main(["history", "--crm", "hubspot", "--account", PORTAL_ID, "1"]) == 1
    assert "1: nothing kept (never scored" in capsys.readouterr().out


def test_feedback_cleared_when_its_lead_moves_into_the_holdout_still_counts_for_the_score_the_rep_saw(
    env, monkeypatch, post_delivery, crm, run_worker, hubspot
):
    """The inputs are unchanged, so the blank score has the fingerprint of the one the rep judged: the
    clear must not take back what they said of it."""
    share = next(s for s in (0.5, 0.75, 0.9, 0.99) if in_holdout(f"hubspot:{PORTAL_ID}:{CONTACT}", s))
    post_delivery("contact.propertyChange__lead_status")
    [first] = run_worker()
    hubspot.contacts[CONTACT]["properties"]["leadscore_feedback"] = "too_high"
    post_delivery("contact.propertyChange__rep_feedback")
    run_worker()
    reconfigure(monkeypatch, HOLDOUT_SHARE=str(share))
    post_delivery(json.dumps([{**fixture_json("hubspot/contact.propertyChange__rep_feedback.json")[0],
                               "eventId": 9}]).encode())  # fmt: skip
    run_worker()

    said = [(row["value"], row["score"], row["tier"]) for row in table(env, store.feedback)]
    assert said == [("too_high", first["score"], first["tier"]), ("cleared", None, None)]
    by_tier = store_data.store_summary(store.Store(env["DATABASE_URL"]))["feedback"]
    assert by_tier == {first["tier"]: {"too_high": 1}}


def test_a_new_salesforce_score_clears_the_feedback_field_too(env, post_change_events, sf_crm, run_worker,
                                                              salesforce):  # fmt: skip
    post_change_events("lead_change_event__create")
    run_worker()
    lead = salesforce.leads["00Q5g00000Ls001EAB"]
    lead["Leadscore_Feedback__c"] = "too_low"
    lead["Status"] = "Closed - Not Converted"  # and disqualifies it, in the same save: a new score
    post_change_events("lead_change_event__rep_feedback")
    [result] = run_worker()

    assert result["outcome"] == "written"
    assert salesforce.lead("00Q5g00000Ls001EAB").get("Leadscore_Feedback__c") is None
    assert [row["value"] for row in table(env, store.feedback)] == ["too_low", "cleared"]


@pytest.mark.parametrize("stage", ["customer", "opportunity"])
def test_contact_propertyChange__lifecyclestage(env, post_delivery, crm, run_worker, hubspot, stage):
    hubspot.contacts[CONTACT]["properties"]["lifecyclestage"] = stage
    post_delivery(f"contact.propertyChange__lifecyclestage_{stage}")
    [result] = run_worker()

    assert result["outcome"] == "written"
    assert stored_outcomes(env) == [("hubspot", PORTAL_ID, CONTACT, stage, "webhook")]


@pytest.mark.parametrize(
    ("stage", "kept"),
    [("1034564913", [("hubspot", PORTAL_ID, CONTACT, "customer", "webhook")]), ("evangelist", [])],
)
def test_contact_propertyChange__lifecyclestage_custom(
    env, monkeypatch, post_delivery, crm, run_worker, hubspot, stage, kept
):
    """A portal's own lifecycle stages count as HUBSPOT_OUTCOME_STAGES says: a custom one (its internal
    value a number), dated by its "Date entered" property; a default one renamed ("evangelist" made
    "Churned") taken out."""
    reconfigure(monkeypatch, HUBSPOT_OUTCOME_STAGES='{"1034564913": "customer", "evangelist": null}')
    properties = hubspot.contacts[CONTACT]["properties"]
    properties.update(lifecyclestage=stage, hs_v2_date_entered_1034564913="2026-11-20T09:15:00.000Z",
                      hs_lifecyclestage_evangelist_date="2026-11-20T09:15:00.000Z")  # fmt: skip
    post_delivery("contact.propertyChange__lifecyclestage_custom")
    [result] = run_worker()

    assert result["outcome"] == "written"
    assert stored_outcomes(env) == kept
    reached = [row["reached_at"].replace(tzinfo=UTC) for row in table(env, store.outcomes)]
    assert reached == [datetime(2026, 11, 20, 9, 15, tzinfo=UTC)] * len(kept)


@EACH_STORE
@pytest.mark.parametrize("dated_by_hubspot", [True, False])
def test_a_lead_that_converts_is_learned_from_its_score_before_it_converted(
    env, post_delivery, crm, run_worker, hubspot, dated_by_hubspot
):
    post_delivery("contact.creation__single")  # another lead, which has not converted
    post_delivery("contact.propertyChange__lead_status")
    run_worker()  # scored while a marketing-qualified lead
    properties = hubspot.contacts[CONTACT]["properties"]
    properties["lifecyclestage"] = "customer"
    if dated_by_hubspot:
        properties["hs_lifecyclestage_customer_date"] = datetime.now(UTC).isoformat(timespec="milliseconds")
    post_delivery("contact.propertyChange__lifecyclestage_customer")
    [rescored] = run_worker()  # the stage is a scoring input: scored again, now as a customer

    kept = store.Store(env["DATABASE_URL"])
    frame, labels, *_ = store_data.training_rows(kept, min_age_days=0)
    assert rescored["outcome"] == "written" and len(table(env, store.scores)) == 3
    assert sorted(labels.tolist()) == [0, 1]
    converted = frame[labels == 1]
    assert converted["stage"].tolist() == ["marketingqualifiedlead"]  # not the score that shows the outcome
    summary = store_data.store_summary(kept)
    assert (summary["leads"], summary["converted"]) == (2, 1)  # the conversion after the first score


def test_a_lead_first_seen_as_a_customer_teaches_nothing(env, post_delivery, crm, run_worker, hubspot):
    hubspot.contacts[CONTACT]["properties"]["lifecyclestage"] = "customer"
    post_delivery("contact.propertyChange__lifecyclestage_customer")
    run_worker()

    kept = store.Store(env["DATABASE_URL"])
    with pytest.raises(TableError, match="no labelled leads yet"):
        store_data.training_rows(kept, min_age_days=30)
    summary = store_data.store_summary(kept)
    assert (summary["leads"], summary["converted"]) == (1, 0)  # no score could have changed it


@EACH_STORE
def test_lead_change_event__rep_feedback(env, post_change_events, sf_crm, run_worker, salesforce):
    post_change_events("lead_change_event__create")
    run_worker()
    salesforce.leads["00Q5g00000Ls001EAB"]["Leadscore_Feedback__c"] = "too_low"

    assert post_change_events("lead_change_event__rep_feedback").get_json()["queued"] == 1
    [result] = run_worker()

    assert result["outcome"] == "unchanged"
    [said] = table(env, store.feedback)
    assert (said["crm"], said["lead_id"], said["value"]) == ("salesforce", "00Q5g00000Ls001EAB", "too_low")
    assert said["score"] == 82  # the score the rep was looking at


def kept_score(env, crm: str, account: str, at: datetime = datetime(2026, 11, 1, tzinfo=UTC)) -> None:
    """A score kept for one lead of this account at `at`: `outcomes sync` reads what changed since."""
    store.Store(env["DATABASE_URL"]).record_scores([store.ScoreRecord(
        crm=crm, account_id=account, lead_id="first", score=50, tier="B", reason="r", scorer="rules",
        fingerprint="f", features={}, details={}, scored_at=at,
    )])  # fmt: skip


@EACH_STORE
def test_outcomes_sync_backfills_from_both_crms_once(env, crm, sf_crm, capsys):
    kept_score(env, "hubspot", PORTAL_ID)
    kept_score(env, "salesforce", SF_ORG_ID[:15])
    assert main(["outcomes", "sync", "--crm", "hubspot", "--account", PORTAL_ID]) == 0
    assert main(["outcomes", "sync", "--crm", "salesforce"]) == 0
    assert main(["outcomes", "sync", "--crm", "hubspot", "--account", PORTAL_ID]) == 0

    kept = stored_outcomes(env)
    assert (
        sorted(kept)
        == [
            ("hubspot", PORTAL_ID, "74300000120", "won", "sync"),  # a customer with a closed-won deal
            ("hubspot", PORTAL_ID, "74300000121", "opportunity", "sync"),  # its deal is still open
            ("salesforce", SF_ORG_ID[:15], "00Q5g00000Ls011EAB", "won", "sync"),  # its opportunity is won
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (
        f"hubspot:{PORTAL_ID}: 2 leads at an outcome changed since 2026-10-31 00:00 UTC, 0 new in the store"
    )
    reached = {row["lead_id"]: row["reached_at"].replace(tzinfo=UTC) for row in table(env, store.outcomes)}
    assert reached["74300000120"] == datetime(2026, 10, 9, 15, 20, 44, 512000, UTC)  # its opportunity date
    assert reached["74300000121"] == datetime(2026, 11, 2, 13, 44, 9, 118000, UTC)


def test_outcomes_sync_without_the_oauth_scope_files_under_the_stores_portal_and_says_so(
    env, crm, hubspot, caplog
):
    """Only `rescore` and `--account` need the scope; a token without it syncs as it always did."""
    kept_score(env, "hubspot", PORTAL_ID)
    hubspot.forbidden_objects.add("account-info")

    assert main(["outcomes", "sync", "--crm", "hubspot"]) == 0
    assert {row[2] for row in stored_outcomes(env)} == {"74300000120", "74300000121"}
    assert "hubspot: could not check which account the credentials reach" in caplog.text


def test_outcomes_sync_takes_its_hubspot_calls_from_the_budget_the_workers_share(env, crm, hubspot, redis):
    kept_score(env, "hubspot", PORTAL_ID)
    before = hubspot.api_calls()
    assert main(["outcomes", "sync", "--crm", "hubspot", "--account", PORTAL_ID]) == 0

    counted = redis.zcard(f"leadscore:rate:hubspot:{PORTAL_ID}")
    assert counted == hubspot.api_calls() - before - 1 > 0  # all but the account check, made before


def test_outcomes_sync_reads_every_page_of_a_search_in_id_order(env, crm, hubspot):
    """The search pages by `hs_object_id` (HubSpot stops its `after` cursor at 10,000 results): each
    page must be sorted by it, or the next page's `GT last id` skips contacts."""
    kept_score(env, "hubspot", PORTAL_ID)
    ids = [str(75000000000 + n) for n in random.Random(7).sample(range(450), 450)]  # kept out of id order
    changed = "2026-11-20T09:00:00.000Z"
    for contact_id in ids:
        properties = {"hs_object_id": contact_id, "lastmodifieddate": changed, "lifecyclestage": "customer"}
        hubspot.add_contact({"id": contact_id, "createdAt": changed, "updatedAt": changed, "archived": False,
                             "properties": properties})  # fmt: skip

    assert main(["outcomes", "sync", "--crm", "hubspot", "--account", PORTAL_ID]) == 0

    assert hubspot.calls.count(("POST", "/crm/v3/objects/contacts/search")) == 3  # 452 leads, 200 a page
    kept = {lead for _, _, lead, _, _ in stored_outcomes(env)}
    assert kept == {*ids, "74300000120", "74300000121"}


def test_outcomes_sync_reads_only_leads_changed_since_the_day_before_the_first_kept_score(
    env, crm, sf_crm, salesforce, capsys
):
    first = datetime(2026, 11, 19, 12, tzinfo=UTC)  # the customer last changed 2026-11-18 09:22, a day before
    kept_score(env, "hubspot", PORTAL_ID, at=first)
    kept_score(env, "salesforce", SF_ORG_ID[:15], at=first)  # the converted Lead last changed 2026-11-12
    assert main(["outcomes", "sync", "--crm", "hubspot", "--account", PORTAL_ID]) == 0
    assert main(["outcomes", "sync", "--crm", "salesforce"]) == 0

    assert stored_outcomes(env) == [("hubspot", PORTAL_ID, "74300000121", "opportunity", "sync")]
    assert capsys.readouterr().out.splitlines() == [
        f"hubspot:{PORTAL_ID}: 1 leads at an outcome changed since 2026-11-18 12:00 UTC, 1 new in the store",
        f"salesforce:{SF_ORG_ID[:15]}: 0 leads at an outcome changed since 2026-11-18 12:00 UTC, "
        "0 new in the store",
    ]


def test_outcomes_sync_of_an_account_with_no_kept_score_reads_nothing(
    env, monkeypatch, crm, sf_crm, salesforce, capsys
):
    reconfigure(monkeypatch, HUBSPOT_API_BASE=f"http://127.0.0.1:{free_port()}")  # a read would fail
    calls = salesforce.api_calls
    assert main(["outcomes", "sync", "--crm", "hubspot", "--account", PORTAL_ID]) == 0
    assert main(["outcomes", "sync", "--crm", "salesforce"]) == 0

    assert salesforce.api_calls == calls and stored_outcomes(env) == []
    assert capsys.readouterr().out.splitlines() == [
        f"{account}: no score kept yet, so no outcome to learn from: nothing read"
        for account in (f"hubspot:{PORTAL_ID}", f"salesforce:{SF_ORG_ID[:15]}")
    ]


def test_holdout_leads_show_no_score_and_are_not_rescored(env, monkeypatch, post_delivery, crm, run_worker,
                                                         hubspot, llm):  # fmt: skip
    reconfigure(monkeypatch, HOLDOUT_SHARE="0.25")
    post_delivery("contact.creation__demo_burst")
    run_worker()
    held = {c for c in hubspot.contacts if in_holdout(f"hubspot:{PORTAL_ID}:{c}", 0.25)}
    scored = {c for c in hubspot.contacts if written(hubspot, c).get("leadscore_scored_at")}

    assert len(held & scored) == 6  # a stable hash of the lead id, about a quarter of 24
    for contact in held & scored:
        fields = written(hubspot, contact)
        assert fields["leadscore_holdout"] == "true"
        assert (fields.get("leadscore_score", ""), fields.get("leadscore_tier", ""),
                fields["leadscore_reason"]) == ("", "", HOLDOUT_REASON)  # fmt: skip  # blank, and says why
    kept = {row["lead_id"]: row for row in table(env, store.scores)}
    for contact in held & scored:
        details = json.loads(written(hubspot, contact)["leadscore_details"])
        assert details.pop("ages") == kept[contact]["details"]["ages"]  # as the store keeps them
        assert details == {
            "config_version": "b2b-saas-default-2", "config_digest": load_config().file_digest,
            "fallback": False, "fingerprint": kept[contact]["fingerprint"], "holdout": True,
            "model": "gpt-4o-mini-2024-07-18", "prompt_version": "propensity-v3",
            "reason_version": "reasons-4",
        }  # fmt: skip
    assert {c for c, row in kept.items() if row["holdout"]} == held & scored
    assert all(row["tier"] in TIER_NAMES for row in kept.values())  # the store keeps the real score
    for contact in scored - held:
        assert written(hubspot, contact)["leadscore_holdout"] == "false"
        assert written(hubspot, contact)["leadscore_tier"] == kept[contact]["tier"]

    calls, writes = len(llm.requests), len(hubspot.writes)
    burst = fixture_json("hubspot/contact.creation__demo_burst.json")
    redis = Redis.from_url(env["REDIS_URL"])
    redis.delete(*redis.keys("leadscore:llm:*"))  # an unchanged lead is not scored, cached answer or not
    post_delivery(json.dumps([{**e, "eventId": e["eventId"] + 1} for e in burst]).encode())
    results = run_worker()
    assert {r["outcome"] for r in results} == {"unchanged"}
    assert (len(llm.requests), len(hubspot.writes)) == (calls, writes)
    assert metrics.counter_value(redis, "leads_skipped_unchanged_total", crm="hubspot") == 24

    reconfigure(monkeypatch, HOLDOUT_SHARE="0")  # the holdout ends: its leads get their scores shown
    post_delivery(json.dumps([{**e, "eventId": e["eventId"] + 2} for e in burst]).encode())
    outcomes_now = {r["lead"].rsplit(":", 1)[1]: r["outcome"] for r in run_worker()}
    assert {c for c, outcome in outcomes_now.items() if outcome == "written"} == held & scored
    for contact in held & scored:
        fields = written(hubspot, contact)
        assert (fields["leadscore_holdout"], fields["leadscore_tier"]) == ("false", kept[contact]["tier"])
        assert fields["leadscore_reason"] == kept[contact]["reason"] != HOLDOUT_REASON


def test_lead_change_event__create__in_the_holdout(env, monkeypatch, post_change_events, sf_crm, run_worker,
                                                   salesforce):  # fmt: skip
    lead_id = "00Q5g00000Ls001EAB"
    reconfigure(monkeypatch, HOLDOUT_SHARE="0.25")
    assert in_holdout(f"salesforce:{SF_ORG_ID[:15]}:{lead_id}", 0.25)  # its stable hash falls in a quarter

    post_change_events("lead_change_event__create")
    [result] = run_worker()

    lead = salesforce.leads[lead_id]
    assert result["outcome"] == "written" and lead["Leadscore_Holdout__c"] is True
    assert [lead.get(f) for f in ("Leadscore_Score__c", "Leadscore_Tier__c", "Leadscore_Reason__c")] == [
        None, None, "Held out: no score on purpose; work it as you normally would"
    ]  # fmt: skip
    [kept] = table(env, store.scores)
    assert kept["holdout"] is True and (kept["score"], kept["tier"]) == (82, "A")  # the real score, kept


def test_a_worker_with_a_bad_model_path_says_so_in_one_line(env, monkeypatch, tmp_path, capsys):
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(tmp_path / "no-model"))

    assert main(["worker", "--burst"]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: SCORING_MODEL_PATH: {tmp_path / 'no-model'} is not a leadscore model: "
        f"{tmp_path / 'no-model' / 'model.json'} is missing (make one with `leadscore train`)\n"
    )


def test_a_worker_given_a_model_file_instead_of_its_directory_says_so(env, monkeypatch, crm_model, capsys):
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(crm_model / "model.json"))

    assert main(["worker", "--burst"]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: SCORING_MODEL_PATH: {crm_model / 'model.json'} is a file: point at the directory "
        "`leadscore train` wrote (model.json and model.joblib)\n"
    )


def _copy_of(model: Path, to: Path, **meta) -> Path:
    """The artifact with model.json's entries replaced (None drops one)."""
    shutil.copytree(model, to)
    changed = {**json.loads((model / "model.json").read_text()), **meta}
    (to / "model.json").write_text(json.dumps({k: v for k, v in changed.items() if v is not None}))
    return to


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ({"features": None}, "holds a damaged model (KeyError: 'features')"),
        ({"features": "age"}, "holds a damaged model (TypeError: string indices must be integers"),
        ({"version": None}, "holds a damaged model (KeyError: 'version')"),
        ({"version": "20261101T000000Z-lightgbm-0badcafe"}, "mixes two models: model.json is "
         "20261101T000000Z-lightgbm-0badcafe, model.joblib is {version}"),
    ],
    ids=["no-features", "features-not-a-list", "no-version", "json-of-another-run"],
)  # fmt: skip
def test_a_worker_with_an_inconsistent_model_says_so_in_one_line(
    env, monkeypatch, tmp_path, capsys, crm_model, meta, problem
):
    broken = _copy_of(crm_model, tmp_path / "broken", **meta)
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(broken))
    version = json.loads((crm_model / "model.json").read_text())["version"]

    assert main(["worker", "--burst"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"leadscore: SCORING_MODEL_PATH: {broken} {problem.format(version=version)}")
    assert err.count("\n") == 1


def test_a_worker_with_a_model_whose_feature_list_does_not_fit_its_estimator_says_so_at_start(
    env, monkeypatch, tmp_path, capsys, crm_model
):
    """Not at the first batch, where every batch would fail and nothing be scored."""
    features = json.loads((crm_model / "model.json").read_text())["features"]
    broken = _copy_of(crm_model, tmp_path / "broken", features=features[:-1])
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(broken))

    assert main(["worker", "--burst"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"leadscore: SCORING_MODEL_PATH: {broken} cannot score a lead (LightGBMError: ")
    assert f"the {len(features) - 1} features its model.json lists are not those its model.joblib was " \
        "fitted on, or this release's libraries cannot run it (trained with lightgbm " in err  # fmt: skip
    assert err.count("\n") == 1


NO_HUBSPOT_FLAG = "HubSpot has no contact property leadscore_holdout"
NO_SALESFORCE_FLAG = f"Salesforce org {SF_ORG_ID[:15]} has no Lead field Leadscore_Holdout__c"


@pytest.mark.parametrize(
    ("set_up", "lacking"),
    [
        ((), [NO_HUBSPOT_FLAG, NO_SALESFORCE_FLAG]),
        (("crm",), [NO_SALESFORCE_FLAG]),
        (("sf_crm",), [NO_HUBSPOT_FLAG]),
    ],
    ids=["neither_set_up", "salesforce_not_set_up", "hubspot_not_set_up"],
)
def test_a_worker_with_a_holdout_share_needs_the_holdout_field(
    env, monkeypatch, request, capsys, set_up, lacking
):
    """Every write then carries the flag, which a CRM without the field would refuse, lead after lead."""
    for fixture in set_up:
        request.getfixturevalue(fixture)
    reconfigure(monkeypatch, HOLDOUT_SHARE="0.05")

    assert main(["worker", "--burst"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"leadscore: HOLDOUT_SHARE is 0.05, but {'; '.join(lacking)}: run `leadscore setup hubspot` / "
        "`leadscore setup salesforce` to add it, or set HOLDOUT_SHARE=0"
    )  # after the log lines saying which fields the worker will not read


def test_a_worker_with_a_holdout_share_starts_once_both_crms_have_the_field(env, monkeypatch, crm, sf_crm):
    reconfigure(monkeypatch, HOLDOUT_SHARE="0.05")
    cli._check_output_fields(get_settings(), jobs, [SF_ORG_ID])  # raises SettingsError when one is missing


def test_a_worker_says_at_start_that_hubspot_lacks_leadscores_properties_and_still_starts(env, caplog):
    assert main(["worker", "--burst"]) == 0  # `leadscore setup hubspot` never ran: Salesforce scores on

    said = [r.getMessage() for r in caplog.records if r.name == "leadscore.worker" and r.levelname == "ERROR"]
    assert said == [
        "HubSpot has no contact property leadscore_score, leadscore_tier, leadscore_reason, "
        "leadscore_scored_at, leadscore_details, so every score written will be refused: run "
        "`leadscore setup hubspot`"
    ]


def test_a_worker_says_at_start_that_salesforce_hides_leadscores_fields_and_still_starts(
    env, crm, sf_crm, salesforce, caplog
):
    salesforce.hide_lead_field("Leadscore_Tier__c")  # no field-level security for the integration user

    assert main(["worker", "--burst"]) == 0

    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said == [
        f"Salesforce org {SF_ORG_ID[:15]}: this user cannot see the Lead field Leadscore_Tier__c, so reading "
        "and writing leads will be refused: run `leadscore setup salesforce`, and give the integration user "
        "field-level security on leadscore's fields"
    ]


def test_a_worker_names_at_start_the_crms_options_no_rule_scores(
    env, monkeypatch, crm, sf_crm, hubspot, salesforce, caplog
):
    """A portal's or org's own statuses and sources score as unknown, a closed one uncapped: said at start
    (the CRMs' default options all have rules), not found in the scores. Hidden or inactive ones are not."""
    reconfigure(monkeypatch, HUBSPOT_OUTCOME_STAGES='{"1034564913": "customer"}')  # a stage deleted since
    hubspot.add_option("hs_lead_status", "Disqualified")
    hubspot.add_option("hs_lead_status", "Old status", hidden=True)
    salesforce.add_picklist_value("Status", "Closed - Junk")
    salesforce.add_picklist_value("LeadSource", "LinkedIn")
    salesforce.add_picklist_value("LeadSource", "Fax", active=False)

    assert main(["worker", "--burst"]) == 0

    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and " has " in r.message]
    version = jobs.context().config.version
    unknown = "A lead with one scores as an unknown"
    # Salesforce's at its describe, HubSpot's with the check of leadscore's properties
    assert said == [
        f"Salesforce org {SF_ORG_ID[:15]}: Lead LeadSource has options no rule of scoring config {version} "
        f"names: LinkedIn. {unknown} source; add them under [source_stage.sources] (SCORING_CONFIG_PATH)",
        f"Salesforce org {SF_ORG_ID[:15]}: Lead Status has options no rule of scoring config {version} "
        f"names: Closed - Junk. {unknown} status, never capped; add them under [source_stage.statuses] "
        "(SCORING_CONFIG_PATH)",
        f"HubSpot hs_lead_status has options no rule of scoring config {version} names: Disqualified. "
        f"{unknown} status, never capped; add them under [source_stage.statuses] (SCORING_CONFIG_PATH)",
        "HubSpot has no lifecycle stage 1034564913, which HUBSPOT_OUTCOME_STAGES or the defaults count as an "
        "outcome: give its internal value (a number for a custom stage)",
    ]


def test_a_worker_with_a_holdout_share_starts_while_hubspot_cannot_be_asked(env, monkeypatch, sf_crm, caplog):
    reconfigure(monkeypatch, HOLDOUT_SHARE="0.05", HUBSPOT_API_BASE=f"http://127.0.0.1:{free_port()}")

    cli._check_output_fields(get_settings(), jobs, [])  # HubSpot down is no reason to stop scoring

    [warned] = [r.getMessage() for r in caplog.records if r.name == "leadscore.worker"]
    assert warned.startswith("could not check HubSpot for leadscore's properties (")


@pytest.fixture(scope="module")
def crm_model(tmp_path_factory):
    """A model trained on the lead slice; its custom features map to HubSpot properties."""
    out = tmp_path_factory.mktemp("model") / "m"
    assert main(["train", "--data", str(SLICE), "--mapping", str(MAPPING), "--out", str(out)]) == 0
    return out


def test_a_worker_names_the_model_features_no_crm_property_holds(env, monkeypatch, crm_model, caplog):
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(crm_model))
    jobs.load_model(get_settings())

    never = "last_notable_activity, lead_profile, motivation, heard_from, free_copy, activity_index, " \
        "profile_index, activity_score, profile_score"  # fmt: skip
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records if r.levelname == "WARNING"] == [
        f"no {holder} is named for {unread} in the mapping's [custom], so live leads always lack them and "
        "score as if they were missing; name one and train again to use them"
        for holder, unread in [
            ("HubSpot property", never),
            ("Salesforce Lead field", f"pages_per_visit, {never}"),
        ]
    ]


CAPS = {"UNQUALIFIED": 19, "BAD_TIMING": 49}  # the default config's 25 and 54: its tiers D and C, the model's


def test_a_trained_model_scores_live_leads_and_names_their_drivers(
    env, monkeypatch, crm_model, post_delivery, crm, run_worker, hubspot, llm, redis
):
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(crm_model))
    post_delivery("contact.creation__demo_burst")
    results = run_worker()

    assert len(results) == 24 and {r["outcome"] for r in results} == {"written"}
    assert llm.requests == []  # this model has no LLM feature: no LLM call at all
    version = json.loads((crm_model / "model.json").read_text())["version"]
    statuses = set()
    for result in results:
        contact = result["lead"].rsplit(":", 1)[1]
        fields = written(hubspot, contact)
        details = json.loads(fields["leadscore_details"])
        assert details["scorer"] == "model" and details["model"] == version
        assert int(fields["leadscore_score"]) == round(details["probability"] * 100)
        assert len(fields["leadscore_reason"]) <= 90
        top = max(details["contributions"], key=lambda n: abs(details["contributions"][n]))
        assert details["contributions"][top] != 0 and details["fallback"] is False
        status = hubspot.contacts[contact]["properties"].get("hs_lead_status")
        statuses.add(status)
        assert details.get("cap") == CAPS.get(status)  # the config's caps bind the model as the rules
        assert int(fields["leadscore_score"]) <= CAPS.get(status, 100)
    assert set(CAPS) <= statuses  # both capped statuses are among the demo contacts
    tiers = Counter(r["tier"] for r in results)  # a dashboard sees the tier share, and what scored them
    assert {t: metrics.counter_value(redis, "leads_scored_total", crm="hubspot", tier=t, scorer="model")
            for t in tiers} == tiers  # fmt: skip
    # X Education's statuses are not HubSpot's, and nothing on a contact gives the lead's profile: a
    # dashboard can see this model scoring leads it cannot tell apart.
    status = [
        metrics.counter_value(redis, f"model_values_{n}_total", crm="hubspot", feature="status")
        for n in ("unseen", "missing")
    ]
    assert status == [19, 5]  # 19 statuses the model never saw, 5 leads with none: none it knows
    assert (
        metrics.counter_value(redis, "model_values_missing_total", crm="hubspot", feature="lead_profile")
        == 24
    )
    kept = table(env, store.scores)
    assert {row["scorer"] for row in kept} == {"model"} and {row["model_version"] for row in kept} == {
        version
    }


def test_a_value_the_model_never_saw_is_logged_once(
    env, monkeypatch, crm_model, post_delivery, crm, run_worker, hubspot, llm, caplog, redis
):
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(crm_model))
    post_delivery("contact.propertyChange__lead_status")
    run_worker()
    jobs.context.cache_clear()  # as in a fresh work horse: RQ forks one for every job
    hubspot.contacts[CONTACT]["properties"]["leadscore_time_on_site"] = "900"  # a change to re-score on
    post_delivery(json.dumps([{**fixture_json("hubspot/contact.propertyChange__lead_status.json")[0],
                               "eventId": 9, "propertyName": "leadscore_time_on_site",
                               "propertyValue": "900"}]).encode())  # fmt: skip
    run_worker()

    version = json.loads((crm_model / "model.json").read_text())["version"]
    unseen = sorted(r.getMessage() for r in caplog.records if "never saw" in r.getMessage())
    # The model learnt X Education's tags and sources, not HubSpot's: said once for each, not per score.
    assert unseen == [
        f"model {version} never saw {name} = {value!r} in training: it scores such leads as unknown to it; "
        "retrain once the value is common"
        for name, value in [
            ("industry", "SaaS"), ("source", "PAID_SEARCH"),
            ("source_detail", "google / revops platform pricing"), ("status", "IN_PROGRESS"),
            ("title", "Director of Marketing Operations"),
        ]
    ]  # fmt: skip  # as HubSpot spells them; the model matches them lower-cased
    key = f"leadscore:unseen:{version}:status"
    assert redis.smembers(key) == {b"in_progress"} and 0 < redis.ttl(key) <= jobs.UNSEEN_MEMORY_S
    # HubSpot's status drives this score only as a value the model does not know, and the reason says so.
    assert written(hubspot, CONTACT)["leadscore_reason"] == (
        "In progress (new to model); Last activity & Rating: not set"
    )


def test_a_free_text_field_new_to_the_model_logs_a_few_values_not_every_lead(
    env, monkeypatch, crm_model, post_delivery, crm, run_worker, hubspot, llm, caplog
):
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(crm_model))
    post_delivery("contact.creation__demo_burst")
    assert len(run_worker()) == 24

    about_titles = [
        r.getMessage() for r in caplog.records if "never saw" in r.getMessage() and " title" in r.getMessage()
    ]
    # 24 job titles, none an occupation the model learnt: three named, then one line saying so
    assert len(about_titles) == jobs.MAX_UNSEEN_LOGGED + 1
    assert about_titles[-1].endswith("never saw more values of title either; no more are logged today")


ENGAGED = {"time_on_site_s": "1500", "last_activity": "SMS Sent", "city": "Mumbai"}  # kept as the CRM said


def test_a_worker_says_at_start_that_hubspot_lacks_properties_its_model_reads(
    env, monkeypatch, crm_model, crm, hubspot, caplog
):
    """HubSpot reads a property it does not have as blank, so without this the model would score every
    lead as if the feature were missing, and nobody would be told."""
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(crm_model))
    version = json.loads((crm_model / "model.json").read_text())["version"]

    cli._check_output_fields(get_settings(), jobs, [])

    said = [r.getMessage() for r in caplog.records if r.name == "leadscore.worker"]
    assert said == [
        "HubSpot has no contact property leadscore_last_activity, leadscore_time_on_site that model "
        f"{version} reads: every lead scores as if it were missing"
    ]


def test_a_models_custom_features_are_read_from_hubspot_properties(
    env, monkeypatch, crm_model, post_delivery, crm, run_worker, hubspot, llm
):
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(crm_model))
    post_delivery("contact.propertyChange__lead_status")
    run_worker()
    before = json.loads(written(hubspot, CONTACT)["leadscore_details"])
    hubspot.contacts[CONTACT]["properties"].update(
        leadscore_time_on_site="1500", leadscore_last_activity="SMS Sent", city="Mumbai"
    )  # the properties the mapping names for [custom] features
    post_delivery(json.dumps([{**fixture_json("hubspot/contact.propertyChange__lead_status.json")[0],
                               "eventId": 9, "propertyName": "leadscore_time_on_site",
                               "propertyValue": "1500"}]).encode())  # fmt: skip
    run_worker()
    after = json.loads(written(hubspot, CONTACT)["leadscore_details"])

    first, second = table(env, store.scores)
    assert not set(ENGAGED) & set(first["features"])  # unset: missing, as the model was told
    assert {name: second["features"][name] for name in ENGAGED} == ENGAGED
    assert after["probability"] > before["probability"]  # 25 minutes on site and an SMS: a likelier lead
    assert after["contributions"]["time_on_site_s"] > before["contributions"]["time_on_site_s"]


def test_a_models_custom_features_are_read_from_salesforce_fields(
    env, monkeypatch, crm_model, post_outbound, sf_crm, run_worker, salesforce
):
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(crm_model))
    lead = salesforce.leads["00Q5g00000Ls001EAB"]
    salesforce.add_lead({**lead, "City": "Mumbai", "Time_On_Site__c": None, "Last_Activity__c": None})
    post_outbound("outbound_message__single")
    run_worker()
    before = json.loads(salesforce.lead(lead["Id"])["Leadscore_Details__c"])
    salesforce.leads[lead["Id"]].update(Time_On_Site__c=1500, Last_Activity__c="SMS Sent")
    post_outbound(
        FIXTURES.joinpath("salesforce/outbound_message__single.xml")
        .read_bytes()
        .replace(b"10:02:11", b"10:09:11")
        .replace(b"Ls001AAB", b"Ls009AAB")
    )  # a later notification
    run_worker()
    after = json.loads(salesforce.lead(lead["Id"])["Leadscore_Details__c"])

    first, second = table(env, store.scores)
    assert first["features"]["city"] == "Mumbai" and "time_on_site_s" not in first["features"]
    assert [first["features"][n] for n in ("visits", "page_views", "conversions")] == [None] * 3  # unknown
    assert {name: second["features"][name] for name in ENGAGED} == ENGAGED
    assert after["probability"] > before["probability"]
    assert after["contributions"]["time_on_site_s"] > before["contributions"]["time_on_site_s"]


def test_a_model_with_the_llm_as_a_feature_calls_it_and_reads_its_last_answer_while_it_fails(
    env, monkeypatch, tmp_path, post_delivery, crm, run_worker, hubspot, llm
):
    """Scored without the LLM's answer during an outage, the lead's tier could move and move back once
    the LLM answers again (every workflow on the tier firing twice); its last answer stands in."""
    frame = pd.read_csv(SLICE, dtype=str, keep_default_na=False)
    frame["AI propensity"] = [
        f"{0.2 + 0.6 * int(c) + (i % 7) / 70:.3f}" for i, c in enumerate(frame["Converted"])
    ]
    data = tmp_path / "with_llm.csv"
    frame.to_csv(data, index=False)
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        MAPPING.read_text().replace(
            "[custom]\n", '[custom]\nllm_propensity = { column = "AI propensity", kind = "numeric" }\n'
        )
    )
    assert main(["train", "--data", str(data), "--mapping", str(mapping), "--out", str(tmp_path / "m")]) == 0
    reconfigure(monkeypatch, SCORING_MODEL_PATH=str(tmp_path / "m"))

    post_delivery("contact.propertyChange__lead_status")
    [first] = run_worker()
    details = json.loads(written(hubspot, CONTACT)["leadscore_details"])
    assert len(llm.requests) == 1 and details["propensity"]["source"] == "llm"
    assert "llm_propensity" in details["contributions"] and details["fallback"] is False

    hubspot.contacts[CONTACT]["properties"]["hs_lead_status"] = "CONNECTED"
    llm.force(status=500)
    post_delivery(json.dumps([{**fixture_json("hubspot/contact.propertyChange__lead_status.json")[0],
                               "eventId": 9, "propertyValue": "CONNECTED"}]).encode())  # fmt: skip
    [second] = run_worker()
    details = json.loads(written(hubspot, CONTACT)["leadscore_details"])
    assert second["outcome"] == "written" and second["fallback"] is True
    assert details["fallback"] is True and details["propensity"]["previous"] is True
    assert "llm_propensity" in details["contributions"]

    llm.force()
    post_delivery(json.dumps([{**fixture_json("hubspot/contact.propertyChange__lead_status.json")[0],
                               "eventId": 10, "propertyValue": "CONNECTED"}]).encode())  # fmt: skip
    [third] = run_worker()
    assert third["fallback"] is False and (third["score"], third["tier"]) == (second["score"], second["tier"])


def test_scores_reach_the_crm_when_the_store_is_unavailable(env, monkeypatch, tmp_path, post_delivery, crm,
                                                           run_worker, hubspot, redis):  # fmt: skip
    reconfigure(monkeypatch, DATABASE_URL=f"sqlite:///{tmp_path}/never-migrated.sqlite3")  # no tables
    post_delivery("contact.propertyChange__lead_status")
    [result] = run_worker()

    assert result["outcome"] == "written" and written(hubspot, CONTACT)["leadscore_tier"] == "A"
    assert metrics.counter_value(redis, "store_errors_total") == 2  # the score, and whether feedback changed


def test_a_store_found_down_costs_one_batch_its_pauses_and_the_batches_after_it_none(
    env, monkeypatch, post_delivery, crm, run_worker, hubspot, redis, caplog
):
    """The CRM write is the product: a PostgreSQL that does not answer must not hold every batch."""
    reconfigure(monkeypatch, DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone")
    monkeypatch.setattr(jobs, "STORE_RETRY_PAUSES_S", (0.1, 0.2))
    post_delivery("contact.propertyChange__lead_status")
    [result] = run_worker()

    assert result["outcome"] == "written" and written(hubspot, CONTACT)["leadscore_tier"] == "A"
    [not_kept] = [r.getMessage() for r in caplog.records if "not kept" in r.getMessage()]
    assert not_kept.startswith("score store: scores and the rest of 1 leads' batch not kept: no connection")
    assert sum("keeping scores again" in r.getMessage() for r in caplog.records) == 2  # the two pauses, once
    assert metrics.counter_value(redis, "store_errors_total") == 1
    caplog.clear()
    hubspot.contacts[CONTACT]["properties"]["hs_lead_status"] = "CONNECTED"
    post_delivery(json.dumps([{**fixture_json("hubspot/contact.propertyChange__lead_status.json")[0],
                               "eventId": 9, "propertyValue": "CONNECTED"}]).encode())  # fmt: skip
    [later] = run_worker()
    assert later["outcome"] == "written"
    assert not any("keeping" in r.getMessage() for r in caplog.records)  # marked down: not tried, no pause
    assert any("marked down by a batch that could not reach it" in r.getMessage() for r in caplog.records)
    assert metrics.counter_value(redis, "store_errors_total") == 2


@EACH_STORE
def test_a_score_the_store_missed_is_kept_when_its_lead_comes_again_unchanged(
    env, monkeypatch, tmp_path, post_delivery, crm, run_worker, hubspot, llm
):
    """The CRM shows a score the store lacks (it was down, or the worker died between the write and
    the keep): the lead's next event keeps it, with no LLM call and no write, and only once."""
    reconfigure(monkeypatch, DATABASE_URL=f"sqlite:///{tmp_path}/never-migrated.sqlite3")  # the store is down
    post_delivery("contact.propertyChange__lead_status")
    [first] = run_worker()
    reconfigure(monkeypatch, DATABASE_URL=env["DATABASE_URL"])  # and up again
    calls, writes = len(llm.requests), len(hubspot.writes)
    change = fixture_json("hubspot/contact.propertyChange__lead_status.json")[0]

    outcomes = []
    for event_id in (9, 10):
        post_delivery(json.dumps([{**change, "eventId": event_id}]).encode())
        [again] = run_worker()
        outcomes.append(again["outcome"])

    assert first["outcome"] == "written" and outcomes == ["unchanged", "unchanged"]
    assert (len(llm.requests), len(hubspot.writes)) == (calls, writes)  # the LLM's cache; nothing written
    [kept] = table(env, store.scores)
    shown = written(hubspot, CONTACT)
    assert (str(kept["score"]), kept["tier"], kept["reason"]) == (
        shown["leadscore_score"],
        shown["leadscore_tier"],
        shown["leadscore_reason"],
    )
    assert kept["fingerprint"] == json.loads(shown["leadscore_details"])["fingerprint"]
    assert kept["details"]["kept_late"] is True  # dated as the CRM dates it, not when it was kept
    assert store.as_utc(kept["scored_at"]) == datetime.fromisoformat(shown["leadscore_scored_at"])


def test_a_written_score_is_kept_dated_as_the_crm_dates_it(env, post_delivery, crm, run_worker, hubspot):
    post_delivery("contact.propertyChange__lead_status")
    run_worker()

    [kept] = table(env, store.scores)
    assert store.as_utc(kept["scored_at"]) == datetime.fromisoformat(
        written(hubspot, CONTACT)["leadscore_scored_at"]
    )
    assert "kept_late" not in kept["details"]


def test_a_score_the_store_missed_after_a_fallback_for_the_same_inputs_is_kept(
    env, monkeypatch, tmp_path, post_delivery, crm, run_worker, hubspot, llm
):
    """A fallback kept for a lead's inputs is not the LLM's score written later for the same inputs:
    that one, missed by a store that was down, is kept at the lead's next event."""
    change = fixture_json("hubspot/contact.propertyChange__lead_status.json")[0]
    llm.force(status=500)
    post_delivery("contact.propertyChange__lead_status")
    run_worker()  # the neutral prior: written and kept
    llm.force()
    reconfigure(monkeypatch, DATABASE_URL=f"sqlite:///{tmp_path}/never-migrated.sqlite3")
    post_delivery(json.dumps([{**change, "eventId": 13}]).encode())
    [answered] = run_worker()  # the LLM's: written, not kept
    reconfigure(monkeypatch, DATABASE_URL=env["DATABASE_URL"])
    post_delivery(json.dumps([{**change, "eventId": 14}]).encode())
    [again] = run_worker()

    fallback, kept = table(env, store.scores)
    assert (fallback["fallback"], kept["fallback"], again["outcome"]) == (True, False, "unchanged")
    assert (kept["score"], kept["fingerprint"]) == (answered["score"], fallback["fingerprint"])


def test_a_score_the_store_missed_is_kept_though_an_older_release_wrote_its_details(
    env, monkeypatch, tmp_path, post_delivery, crm, run_worker, hubspot
):
    """Details written by the release before keep less than this one's: the score shown still comes out
    again, so it is kept (and not written)."""
    reconfigure(monkeypatch, DATABASE_URL=f"sqlite:///{tmp_path}/never-migrated.sqlite3")
    post_delivery("contact.propertyChange__lead_status")
    run_worker()
    reconfigure(monkeypatch, DATABASE_URL=env["DATABASE_URL"])
    properties = hubspot.contacts[CONTACT]["properties"]
    details = json.loads(properties["leadscore_details"])
    for key in ("score", "tier", "ages", "config_digest"):
        del details[key]
    properties["leadscore_details"] = json.dumps(details)
    writes = len(hubspot.writes)

    post_delivery(json.dumps([{**fixture_json("hubspot/contact.propertyChange__lead_status.json")[0],
                               "eventId": 15}]).encode())  # fmt: skip
    [again] = run_worker()

    assert again["outcome"] == "unchanged" and len(hubspot.writes) == writes
    [kept] = table(env, store.scores)
    assert str(kept["score"]) == properties["leadscore_score"] and kept["details"]["kept_late"] is True


def test_a_forgotten_leads_score_is_not_kept_again_when_it_comes_again_unchanged(
    env, post_delivery, crm, run_worker, hubspot, llm, redis
):
    """`forget` deleted the rows on purpose: the lead's next unchanged event keeps nothing of it again,
    asks no LLM and writes nothing, though the CRM still shows its score."""
    change = fixture_json("hubspot/contact.propertyChange__lead_status.json")[0]
    post_delivery("contact.propertyChange__lead_status")
    run_worker()
    assert main(["forget", "--crm", "hubspot", "--account", PORTAL_ID, CONTACT]) == 0
    calls, writes = len(llm.requests), len(hubspot.writes)

    post_delivery(json.dumps([{**change, "eventId": 11}]).encode())
    [again] = run_worker()

    assert again["outcome"] == "unchanged" and table(env, store.scores) == []
    assert (len(llm.requests), len(hubspot.writes)) == (calls, writes)


def test_a_missed_score_that_no_longer_comes_out_the_same_is_neither_kept_nor_written(
    env, monkeypatch, tmp_path, post_delivery, crm, run_worker, hubspot, llm, redis
):
    """The LLM's cached answer is gone (its TTL) and it answers otherwise: the missed score is not
    the one the new answer gives, so nothing is kept, and nothing is written for an unchanged lead."""
    reconfigure(monkeypatch, DATABASE_URL=f"sqlite:///{tmp_path}/never-migrated.sqlite3")
    post_delivery("contact.propertyChange__lead_status")
    run_worker()
    reconfigure(monkeypatch, DATABASE_URL=env["DATABASE_URL"])
    for key in redis.scan_iter("leadscore:llm:*"):
        redis.delete(key)
    llm.force("lead_74300000111")  # another answer: an unqualified consultant
    writes = len(hubspot.writes)

    post_delivery(json.dumps([{**fixture_json("hubspot/contact.propertyChange__lead_status.json")[0],
                               "eventId": 12}]).encode())  # fmt: skip
    [again] = run_worker()

    assert again["outcome"] == "unchanged" and len(hubspot.writes) == writes
    assert table(env, store.scores) == []


def test_salesforce_org_without_the_newer_fields_still_scores(
    env, post_outbound, sf_crm, run_worker, salesforce
):
    for name in ("Leadscore_Feedback__c", "Leadscore_Holdout__c"):  # setup ran before these existed
        salesforce.remove_lead_field(name)
    post_outbound("outbound_message__single")
    [result] = run_worker()

    assert result["outcome"] == "written" and result["score"] == 82


@EACH_STORE
def test_deal_propertyChange__closed_won(env, post_delivery, crm, run_worker, hubspot):
    post_delivery("deal.propertyChange__closed_won")
    [result] = run_worker()

    assert result == {
        "lead": f"hubspot:{PORTAL_ID}:deal:93000000001", "outcome": "deal_won", "leads": ["74300000120"],
    }  # fmt: skip
    assert stored_outcomes(env) == [("hubspot", PORTAL_ID, "74300000120", "won", "webhook")]
    [row] = table(env, store.outcomes)
    assert row["reached_at"].replace(tzinfo=UTC) == datetime(2026, 10, 30, 17, 0, tzinfo=UTC)  # its closedate
    assert hubspot.writes == []  # a deal's outcome is kept, not written


@pytest.mark.parametrize(
    ("pipelines", "outcome", "kept"),
    [("default", "deal_won", ["won"]), ("sales, 1467823", "no_won_deal", [])],
)
def test_deal_propertyChange__closed_won_in_a_pipeline_of_sales_or_not(
    env, monkeypatch, post_delivery, crm, run_worker, hubspot, pipelines, outcome, kept
):
    """With HUBSPOT_WON_PIPELINES set, a deal won in another pipeline (a renewal, an upsell to an existing
    customer) is no lead converting."""
    reconfigure(monkeypatch, HUBSPOT_WON_PIPELINES=pipelines)
    post_delivery("deal.propertyChange__closed_won")  # a deal of the "default" pipeline
    [result] = run_worker()

    assert result["outcome"] == outcome
    assert [row[3] for row in stored_outcomes(env)] == kept


def test_deal_propertyChange__open_stage(env, post_delivery, crm, run_worker, hubspot):
    post_delivery("deal.propertyChange__open_stage")
    [result] = run_worker()

    assert result == {"lead": f"hubspot:{PORTAL_ID}:deal:93000000002", "outcome": "no_won_deal"}
    assert stored_outcomes(env) == []
    deal = hubspot.objects["deals"]["93000000002"]["properties"]
    deal.update(hs_is_closed_won="true", dealstage="closedwon")
    post_delivery(json.dumps([{**fixture_json("hubspot/deal.propertyChange__open_stage.json")[0],
                               "eventId": 9, "propertyValue": "closedwon"}]).encode())  # fmt: skip
    [result] = run_worker()  # the same deal, now won: read from HubSpot, not taken from the event
    assert result["outcome"] == "deal_won" and result["leads"] == ["74300000121"]


@pytest.mark.parametrize("failure", ["deals_unavailable", "token_revoked", "deals_read_refused"])
def test_a_failing_deals_read_is_retried_not_taken_as_no_outcome(env, post_delivery, crm, run_worker, hubspot,
                                                                  queue, failure):  # fmt: skip
    if failure == "token_revoked":
        hubspot.token = "revoked"  # 401: not the 403 of a token without the deals scope
    elif failure == "deals_read_refused":
        hubspot.invalid_objects.add("deals")  # 400: nor that 403
    else:
        hubspot.unavailable_objects.add("deals")
    post_delivery("deal.propertyChange__closed_won")
    results = run_worker()  # HubSpot down: the batch waits for it; a revoked token: it failed, RQ retries it
    assert [r["outcome"] for r in results] == (["deferred"] if failure == "deals_unavailable" else [])

    [waiting] = queue.scheduled_job_registry.get_job_ids()
    assert queue.fetch_job(waiting).func_name == "workers.batch.score_batch" and stored_outcomes(env) == []


def test_a_won_deal_without_the_deals_scope_is_no_outcome_and_no_failure(env, post_delivery, crm, run_worker,
                                                                         hubspot):  # fmt: skip
    hubspot.forbidden_objects.add("deals")
    post_delivery("deal.propertyChange__closed_won")
    [result] = run_worker()

    assert result["outcome"] == "no_won_deal" and stored_outcomes(env) == []


def test_a_deal_and_a_contact_in_one_delivery_are_both_handled(env, post_delivery, crm, run_worker, hubspot):
    both = [*fixture_json("hubspot/contact.propertyChange__lead_status.json"),
            *fixture_json("hubspot/deal.propertyChange__closed_won.json")]  # fmt: skip
    post_delivery(json.dumps(both).encode())
    results = run_worker()

    assert [(r["lead"], r["outcome"]) for r in results] == [
        (f"hubspot:{PORTAL_ID}:{CONTACT}", "written"),
        (f"hubspot:{PORTAL_ID}:deal:93000000001", "deal_won"),
    ]
    assert stored_outcomes(env) == [("hubspot", PORTAL_ID, "74300000120", "won", "webhook")]
    assert [lead for lead, _ in hubspot.writes] == [CONTACT]


def test_a_refused_contact_beside_a_deal_is_tried_alone_and_the_deal_kept(env, post_delivery, crm, run_worker,
                                                                          hubspot, queue):  # fmt: skip
    hubspot.reject[CONTACT] = "Blocked by a validation rule"
    both = [*fixture_json("hubspot/contact.propertyChange__lead_status.json"),
            *fixture_json("hubspot/deal.propertyChange__closed_won.json")]  # fmt: skip
    post_delivery(json.dumps(both).encode())
    results = run_worker()

    assert [r["outcome"] for r in results] == ["failed", "deal_won"]  # the batch finished, deal and all
    [dead] = queue.failed_job_registry.get_job_ids()  # the contact, tried alone, refused again
    assert queue.fetch_job(dead).description.startswith(f"score hubspot:{PORTAL_ID}:{CONTACT} alone")
    assert stored_outcomes(env) == [("hubspot", PORTAL_ID, "74300000120", "won", "webhook")]


def test_outcomes_sync_stops_in_one_line_when_hubspot_fails(env, crm, hubspot, capsys):
    kept_score(env, "hubspot", PORTAL_ID)
    hubspot.unavailable_objects.add("deals")

    assert main(["outcomes", "sync", "--crm", "hubspot", "--account", PORTAL_ID]) == 2
    assert capsys.readouterr().err == (
        "leadscore: outcomes sync stopped: HubSpot deals read failed: 503 SERVICE UNAVAILABLE; "
        "run it again (it only adds what is new)\n"
    )


@pytest.mark.parametrize(
    ("crm_name", "setting", "said"),
    [
        ("hubspot", "HUBSPOT_API_BASE", "Connection refused"),
        ("salesforce", "SALESFORCE_INSTANCE_URL", "Salesforce query failed: HTTPSConnectionPool"),
        ("salesforce", None, "of 15000 daily API calls; leadscore stops at 90%"),
    ],
    ids=["hubspot_unreachable", "salesforce_unreachable", "salesforce_api_budget_spent"],
)
def test_outcomes_sync_stops_in_one_line_when_the_crm_cannot_be_reached(
    env, monkeypatch, crm, sf_crm, salesforce, capsys, crm_name, setting, said
):
    kept_score(env, crm_name, PORTAL_ID if crm_name == "hubspot" else SF_ORG_ID[:15])
    if setting:
        reconfigure(monkeypatch, **{setting: f"http://127.0.0.1:{free_port()}"})  # nothing listens there
    else:
        salesforce.api_calls = 14990

    account = ["--account", PORTAL_ID] if crm_name == "hubspot" else []  # Salesforce: SALESFORCE_ORG_IDS
    assert main(["outcomes", "sync", "--crm", crm_name, *account]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leadscore: outcomes sync stopped: ") and said in err
    assert err.endswith("; run it again (it only adds what is new)\n") and err.count("\n") == 1


def test_outcomes_sync_without_opportunity_read_keeps_conversions(env, sf_crm, salesforce):
    kept_score(env, "salesforce", SF_ORG_ID[:15])
    salesforce.revoke_read("Opportunity")
    assert main(["outcomes", "sync", "--crm", "salesforce"]) == 0

    assert stored_outcomes(env) == [("salesforce", SF_ORG_ID[:15], "00Q5g00000Ls011EAB", "converted", "sync")]


def test_outcomes_sync_without_the_deals_scope_keeps_the_lifecycle_stages(env, crm, hubspot):
    kept_score(env, "hubspot", PORTAL_ID)
    hubspot.forbidden_objects.add("deals")
    assert main(["outcomes", "sync", "--crm", "hubspot", "--account", PORTAL_ID]) == 0

    assert [row[3] for row in stored_outcomes(env)] == ["customer", "opportunity"]
