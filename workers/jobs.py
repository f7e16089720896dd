"""The worker's shared context and the scoring core both job paths use.

`workers.batch` holds the jobs the pipeline runs (collect, score_batch);
`score_lead` here scores one lead with one read and one write. It is only the
benchmarks' naive baseline (bench/throughput.py): no command runs it, and it
lacks what the pipeline does (deal keys, supersession, fallback rescores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property, lru_cache

import pandas as pd
from redis import Redis
from redis.exceptions import RedisError
from rq import get_current_job
from sqlalchemy.exc import DBAPIError, OperationalError

from integration import metrics, pending
from integration.clock import redis_now
from integration.crm import CRMAdapter
from integration.errors import CRMError, CRMUnavailable, LeadGone, RateLimited
from integration.events import LeadEvent
from integration.hubspot.api import WORKER_MAX_WAIT_S, HubSpotCRM, shared_limiter
from integration.lead import Lead, lead_key, moment_of
from integration.queue import settings_redis
from integration.salesforce import full_id
from integration.salesforce.api import SalesforceCRM
from integration.settings import Settings, SettingsError, get_settings
from workers import model_scoring, tabular
from workers.blend import REASON_VERSION, ScoreResult, blend_score, input_fingerprint, with_provenance
from workers.config import ConfigError, ScoringConfig, load_config
from workers.holdout import in_holdout, shown_fields
from workers.llm import PropensityReasoner, answers_keys, cached_answer_key, listed_answers
from workers.model import ModelArtifactError, TrainedModel
from workers.propensity import FALLBACK_SOURCE, PropensityResult, ages
from workers.rules import evaluate_rules
from workers.store import Feedback, LeadFact, ScoreRecord, Store
from workers.writer import fields_to_write, shows

log = logging.getLogger(__name__)
RULES_SCORER = "rules+llm"  # what the store and metrics call a score without a trained model
SHOWN_FIELDS = ("score", "tier", "reason")  # what reps see of a score
PUT_BACK_EVERY_S = 86_400  # a score someone else keeps changing is put back once a day at most
REACHED_KEPT_S = 86_400  # the portal a token reaches, learned by a job when the worker's start could not
REACHED_ASKED_AGAIN_S = 60


@dataclass
class Scored:
    """One lead's scoring outcome before it is written."""

    lead: Lead
    # None: nothing was scored; the inputs are unchanged since the score the CRM shows (or, with that
    # score missing from the store, since the one that scores the same again)
    result: ScoreResult | None
    propensity: PropensityResult | None  # None also when a trained model that ignores the LLM scored it
    fields: dict[str, str] | None  # what to write; None when the CRM already shows it
    holdout: bool = False  # the CRM shows no score for this lead (the randomised holdout)
    never_kept: bool = False  # the CRM shows this score but the store lacks it: kept, not written
    put_back: bool = False  # written over a score or tier someone else changed in the CRM

    @property
    def clears_feedback(self) -> bool:
        return bool(self.fields) and "feedback" in self.fields

    def cleared_feedback(self) -> Feedback:
        """The rep's feedback, cleared by the write of a new score: kept against that score, so the
        feedback on the one the rep saw stands, and saying it again of this one counts."""
        score = self.fields.get("score")
        return Feedback(
            self.lead.crm, self.lead.account_id, self.lead.lead_id, None, score=int(score) if score else None,
            tier=self.fields.get("tier") or None, fingerprint=self.result.details["fingerprint"],
        )  # fmt: skip

    @property
    def shown_at(self) -> datetime:
        """When the CRM dates this score (its `scored_at`): the store dates it the same, so the two name
        the same score (to the second on Salesforce, whose DateTime drops the milliseconds)."""
        shown = self.lead.current_output if self.never_kept else self.fields or {}
        return moment_of(shown.get("scored_at")) or datetime.now(UTC)

    def record(self) -> ScoreRecord:
        """What the store keeps of a score that was written; one kept after its write (`never_kept`)
        says so."""
        details = self.result.details
        if self.never_kept:
            details = {**details, "kept_late": True}
        elif self.put_back:
            details = {**details, "put_back": True}
        return ScoreRecord(
            crm=self.lead.crm, account_id=self.lead.account_id, lead_id=self.lead.lead_id,
            score=self.result.score, tier=self.result.tier, reason=self.result.reason,
            scorer=details.get("scorer", RULES_SCORER), model_version=details.get("model"),
            fingerprint=details["fingerprint"], fallback=bool(details.get("fallback")), holdout=self.holdout,
            features=tabular.snapshot(self.lead, self.propensity), details=details,
            scored_at=self.shown_at,
        )  # fmt: skip


@dataclass
class WorkerContext:
    settings: Settings
    config: ScoringConfig
    reasoner: PropensityReasoner
    model: TrainedModel | None = None  # SCORING_MODEL_PATH: a trained model scores, the LLM assists
    # By CRM, the account its credentials reach, as the worker learned at start (`leadscore worker`):
    # a batch of another account's leads would be read and written there, as the wrong people's.
    reached: dict[str, str] = field(default_factory=dict)

    tally: dict | None = None  # while set, counters are summed here and written once

    @cached_property
    def redis(self) -> Redis:
        return settings_redis(self.settings)

    @cached_property
    def store(self) -> Store:
        return Store(self.settings.database_url, worker=True)

    def keep(
        self, scored: list[Scored], leads: list[Lead], won: list[LeadFact] = (),
        merges: dict[tuple[str, str], dict[str, tuple[str, ...]]] | None = None,
    ) -> None:  # fmt: skip
        """Record written scores, outcomes (the leads' own, and `won`: those of closed-won deals)
        and rep feedback in the store, and move what is kept of leads merged into another (a lead's
        `merged_ids`, and `merges`: by account, the batch's own, by the lead that remains); never
        fails the batch.

        The CRM write is the product: a store that is down costs the records of this batch (logged
        and counted); outcomes come back with `leadscore outcomes sync`, scores at the next rescoring."""
        # An outcome seen now was reached before this batch's scores: those already show it (a
        # lifecycle stage of customer, say), and `train --from-store` must learn from an earlier one.
        # The scores are dated when they were written, after the leads were read.
        read_by = min([datetime.now(UTC), *(s.shown_at for s in scored if s.fields and not s.never_kept)])
        reached = [
            LeadFact(
                lead.crm,
                lead.account_id,
                lead.lead_id,
                lead.outcome,
                min(lead.outcome_at or read_by, read_by),
            )
            for lead in leads
            if lead.outcome
        ] + list(won)
        cleared = [s.cleared_feedback() for s in scored if s.clears_feedback]  # after the rep's, as it came
        merged = {account: dict(by_winner) for account, by_winner in (merges or {}).items()}
        for lead in leads:
            if lead.merged_ids:
                into = merged.setdefault((lead.crm, lead.account_id), {})
                into[lead.lead_id] = (*into.get(lead.lead_id, ()), *lead.merged_ids)
        steps = {
            "merged records": lambda: self._merge(merged),
            "scores": lambda: self.store.record_scores([s.record() for s in scored]),
            "outcomes": lambda: self.store.record_outcomes(reached, source="webhook"),
            "feedback": lambda: self.store.record_feedback([*map(_feedback, leads), *cleared]),
        }
        if self._store_marked_down():
            log.error("score store: marked down by a batch that could not reach it; what %d leads' batch "
                      "would keep is not kept", len(leads))  # fmt: skip
            self.telemetry("store_errors_total")
            return
        pauses, deadline = iter(STORE_RETRY_PAUSES_S), time.monotonic() + STORE_RETRY_S  # the batch's
        for what, step in steps.items():
            try:
                _again_on_a_lost_connection(what, step, pauses, deadline)
            except StoreDown as exc:
                log.error(
                    "score store: %s and the rest of %d leads' batch not kept: %s", what, len(leads), exc
                )
                self.telemetry("store_errors_total")
                self._mark_store_down()
                return
            except Exception as exc:
                log.error("score store: %s of %d leads not kept: %s", what, len(leads), exc)
                self.telemetry("store_errors_total")

    def _store_marked_down(self) -> bool:
        """Whether a batch lately could not reach the store at all: the batches after it do not try,
        so an outage, a store that hangs included, slows no scoring (a few batches each STORE_DOWN_S
        wait their STORE_RETRY_S)."""
        try:
            return bool(self.redis.exists(STORE_DOWN_KEY))
        except RedisError:
            return False

    def _mark_store_down(self) -> None:
        with suppress(RedisError):
            self.redis.set(STORE_DOWN_KEY, 1, ex=STORE_DOWN_S)

    def _merge(self, merged: dict[tuple[str, str], dict[str, tuple[str, ...]]]) -> None:
        """Move the merged leads' rows to the lead that remains, and forget their cached LLM answers,
        which no store row names now (an erasure of the lead that remains must find everything), and
        which nothing asks again (each names its own lead)."""
        for (crm, account), merges in merged.items():
            if moved := self.store.merge_leads(crm, account, merges):
                log.info("score store: %d rows of merged leads of %s:%s moved to the lead that remains",
                         moved, crm, account)  # fmt: skip
            gone = sorted({lead for losers in merges.values() for lead in losers} - merges.keys())
            forget_answers(self.redis, crm, *pipeline_ids(crm, account, gone))

    def erase(self, crm: str, account: str, lead_ids: list[str], mark_erased: bool = True) -> dict[str, int]:
        """Erase what leadscore keeps of these leads: their rows in the store and their cached LLM
        answers. Unlike `keep`, a failure fails the batch, so RQ retries it: an erasure is owed."""
        return erase(self.store, self.redis, crm, account, lead_ids, mark_erased)

    def telemetry(self, name: str, amount: float = 1, **labels: str) -> None:
        if self.tally is None:
            metrics.incr(self.redis, name, amount, **labels)
            return
        key = (name, tuple(sorted(labels.items())))
        self.tally[key] = self.tally.get(key, 0) + amount

    @contextmanager
    def tallied(self):
        """Count in memory for a batch, then write every counter in one round trip."""
        self.tally = {}
        try:
            yield
        finally:
            tally, self.tally = self.tally, None
            metrics.incr_many(self.redis, [(name, n, dict(labels)) for (name, labels), n in tally.items()])

    def crm(self, crm: str, account: str) -> CRMAdapter:
        return _hubspot(account) if crm == "hubspot" else salesforce_for(account)

    def reached_account(self, crm: str, account: str) -> str | None:
        """The account the CRM's credentials reach, as the worker learned at start. HubSpot's, if the start
        could not learn it (HubSpot down then), is learned by a job and kept in Redis for the others, so
        another portal's contacts are not read with the token for the worker's life; while HubSpot will
        not say, it is asked once a minute at most."""
        if (reached := self.reached.get(crm)) or crm != "hubspot":
            return reached
        token = hashlib.sha256(self.settings.hubspot_access_token.encode()).hexdigest()[:16]
        key = f"leadscore:reached:hubspot:{token}"
        try:
            if (known := self.redis.get(key)) is None:
                try:
                    known = self.crm(crm, account).token_portal().encode()
                except (CRMError, RateLimited) as exc:  # refused (no `oauth` scope): asked again tomorrow
                    waiting = isinstance(exc, (CRMUnavailable, RateLimited))
                    self.redis.set(key, "", ex=REACHED_ASKED_AGAIN_S if waiting else REACHED_KEPT_S)
                    log.warning("still not known which HubSpot portal the token reaches (%s)", exc)
                    return None
                self.redis.set(key, known, ex=REACHED_KEPT_S)
        except RedisError:
            return None
        if known:
            self.reached[crm] = known.decode()
        return self.reached.get(crm)

    def crm_for(self, event: LeadEvent) -> HubSpotCRM | SalesforceCRM:  # with the single-lead calls
        return self.crm(event.crm, event.account_id)

    def score(self, leads: list[Lead], forced: Collection[str] = ()) -> list[Scored]:
        """Score many leads — rules + LLM blend, or the trained model with the LLM as a feature —
        skipping leads whose inputs have not changed since a score that was not a fallback, unless
        their ids are `forced` (`rescore --force`)."""
        now = ages_told_from()
        fingerprints = [input_fingerprint(lead, self.config, now) for lead in leads]
        told_ages = [ages(lead, now) for lead in leads]
        share = self.settings.holdout_share
        held = [in_holdout(lead.lead_key, share) for lead in leads]
        edited = {lead.lead_id for lead in leads if self._edited_in_crm(lead)}
        shown = [
            i for i, lead in enumerate(leads)
            if lead.lead_id not in edited and lead.lead_id not in forced
            and _already_scored(lead, fingerprints[i], held[i])
        ]  # fmt: skip
        never_kept = self._never_kept(leads, fingerprints, [i for i in shown if _lately_scored(leads[i])])
        fresh = sorted({*range(len(leads))} - {*shown} | {*never_kept})
        if self.model is None or self.model.uses_llm:
            answers = self.reasoner.assess_many([leads[i] for i in fresh], now, self.redis)
            answers = [  # a score the store missed is kept only as it came out, never with a stand-in
                answer if i in never_kept else _previous_stands_in(leads[i], answer)
                for i, answer in zip(fresh, answers, strict=True)
            ]
        else:
            answers = [None] * len(fresh)
        by_index = dict(zip(fresh, answers, strict=True))
        results = self._results(
            [leads[i] for i in fresh],
            answers,
            [fingerprints[i] for i in fresh],
            [told_ages[i] for i in fresh],
        )
        result_of = dict(zip(fresh, results, strict=True))
        scored = []
        for i, lead in enumerate(leads):
            if i not in result_of:
                self.telemetry("leads_skipped_unchanged_total", crm=lead.crm)
                scored.append(Scored(lead, None, None, None))
                continue
            propensity, result = by_index[i], result_of[i]
            if propensity is not None:
                self._count_llm(propensity)
            holdout = held[i]
            flagged = (lead.current_output.get("holdout") or "").lower() == "true"
            to_show = shown_fields(result, holdout, write_flag=share > 0 or flagged)
            fields = fields_to_write(to_show, lead.current_output, lead.feedback, _wrote(lead))
            if i in never_kept:
                # Kept if the score shown comes out again (the LLM answered from its cache); its details
                # may differ, written by a release that kept less in them. Never written.
                fields = None
                if not shows(lead.current_output, {key: to_show[key] for key in SHOWN_FIELDS}):
                    scored.append(Scored(lead, None, None, None))
                    continue
            put_back = lead.lead_id in edited
            scored.append(Scored(lead, result, propensity, fields, holdout, i in never_kept, put_back))
            self.telemetry(
                "leads_scored_total",
                crm=lead.crm,
                tier=result.tier,
                scorer=result.details.get("scorer", RULES_SCORER),
            )
        return scored

    def _edited_in_crm(self, lead: Lead) -> bool:
        """The CRM shows another score or tier than leadscore wrote: a rep, a workflow or an import
        edited them. The score is leadscore's (a rep disagreeing sets the feedback field), so it is
        written again, once a day at most: a workflow or a sync that sets it again is left to it
        rather than fought at each event. Logged and counted, since a team whose reps edit scores
        wants to know."""
        wrote = _wrote(lead)
        if wrote is None or shows(lead.current_output, wrote):
            return False
        shown = lead.current_output
        said = (lead.crm, lead.lead_id, shown.get("score") or "", shown.get("tier") or "", wrote["score"],
                wrote["tier"])  # fmt: skip
        if not self._may_put_back(lead):
            log.warning("%s lead %s shows score %r tier %r, not the %r %r leadscore wrote, edited again "
                        "within a day of being put back: left as it is", *said)  # fmt: skip
            self.telemetry("scores_edited_in_crm_total", crm=lead.crm, action="left")
            return False
        log.warning("%s lead %s shows score %r tier %r, not the %r %r leadscore wrote: edited in the CRM, "
                    "written again", *said)  # fmt: skip
        self.telemetry("scores_edited_in_crm_total", crm=lead.crm, action="put_back")
        return True

    def _may_put_back(self, lead: Lead) -> bool:
        """Whether this lead's edited score may be put back now: not put back in the last day, or by
        this very job (a retry, or a `requeue`, of one whose write failed)."""
        job = get_current_job()
        this_job = job.id if job is not None else ""
        key = put_back_key(lead.lead_key)
        return bool(self.redis.set(key, this_job, nx=True, ex=PUT_BACK_EVERY_S)) or (
            bool(this_job) and self.redis.get(key) == this_job.encode()
        )

    def _never_kept(self, leads: list[Lead], fingerprints: list[str], shown: list[int]) -> set[int]:
        """Of the leads the CRM shows scored lately for their inputs, those whose score the store lacks
        and that no erasure (`forget`, a privacy deletion) deleted. They are scored again, the LLM
        answering from its cache, and kept if the score shown comes out again; never written."""
        if not shown or self._store_marked_down():
            return set()
        first = leads[shown[0]]  # a batch is one account's
        ids = [leads[i].lead_id for i in shown]
        try:
            erased = erased_since(self.redis, first.crm, first.account_id, ids, 0.0)
            missing = self.store.never_kept(
                first.crm, first.account_id, {leads[i].lead_id: fingerprints[i] for i in shown}
            )
        except Exception as exc:
            log.error("score store: could not look for scores never kept: %s", exc)
            self.telemetry("store_errors_total")
            return set()
        return {i for i in shown if leads[i].lead_id in missing - erased}

    def _results(
        self,
        leads: list[Lead],
        answers: list[PropensityResult | None],
        fingerprints: list[str],
        told_ages: list[dict[str, str]],
    ) -> list[ScoreResult]:
        """Each lead's score with its provenance, whichever scorer made it; the fingerprint stored is
        the one the skip check compared, so the two cannot diverge."""
        if not leads:
            return []
        results = self._scores(leads, answers)
        return [
            with_provenance(result, propensity, fingerprint, self.config, told)
            for result, propensity, fingerprint, told in zip(
                results, answers, fingerprints, told_ages, strict=True
            )
        ]

    def _scores(self, leads: list[Lead], answers: list[PropensityResult | None]) -> list[ScoreResult]:
        """Score, tier and reason: of the rules+LLM blend, or of the trained model."""
        if self.model is None:
            return [
                blend_score(lead, evaluate_rules(lead, self.config), propensity, self.config)
                for lead, propensity in zip(leads, answers, strict=True)
            ]

        shown = pd.DataFrame(  # as the CRM spells them, for the reasons; the model matches them lower-cased
            [
                tabular.lead_features(lead, self.model.kinds, propensity, keep_case=True)
                for lead, propensity in zip(leads, answers, strict=True)
            ],
            columns=list(self.model.kinds),
        )
        frame = tabular.model_values(shown, self.model.kinds)
        unseen = self.model.unseen(frame)
        self._log_unseen(frame, shown, unseen)
        # A model live on a CRM whose leads lack its features, or spell them otherwise, ranks them flat.
        crm = leads[0].crm  # a batch is one account's
        for name, blank in frame.isna().sum().items():
            if blank:
                self.telemetry("model_values_missing_total", int(blank), crm=crm, feature=name)
        for name, rows in unseen.items():
            self.telemetry("model_values_unseen_total", int(rows.sum()), crm=crm, feature=name)
        results = model_scoring.score_frame(self.model, frame, shown, unseen=unseen, config=self.config)
        statuses = [lead.status for lead in leads]
        return model_scoring.capped_by_status(self.model, results, statuses, self.config)

    def _log_unseen(self, frame: pd.DataFrame, shown: pd.DataFrame, unseen: dict[str, pd.Series]) -> None:
        """Say when live leads hold a value the model never saw (a status added after training): each
        value once a day across all workers, at most a few a feature. Redis remembers what was said,
        since every job runs in a fresh work horse; without Redis nothing is said."""
        if not unseen:
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for name in unseen:
                    pipe.scard(_unseen_key(self.model, name))
                said = dict(zip(unseen, pipe.execute(), strict=True))
            for name, rows in unseen.items():
                key = _unseen_key(self.model, name)
                spellings = dict(zip(frame.loc[rows, name], shown.loc[rows, name], strict=True))
                for value, spelled in spellings.items():
                    if said[name] > MAX_UNSEEN_LOGGED:
                        break
                    if not self.redis.sadd(key, str(value)):
                        continue
                    said[name] += 1
                    if said[name] == 1:
                        self.redis.expire(key, UNSEEN_MEMORY_S)
                    if said[name] > MAX_UNSEEN_LOGGED:
                        log.warning("model %s never saw more values of %s either; no more are logged today",
                                    self.model.version, name)  # fmt: skip
                    else:
                        log.warning(
                            "model %s never saw %s = %r in training: it scores such leads as unknown to "
                            "it; retrain once the value is common", self.model.version, name, spelled,
                        )  # fmt: skip
        except RedisError as exc:
            log.debug("unseen values not checked: %s", exc)

    def _count_llm(self, propensity: PropensityResult) -> None:
        """A call (ok or failed) or a cache hit; and every score the fallback made, a cached refusal's too."""
        cached = propensity.extra.get("cached")
        if cached:
            self.telemetry("llm_cache_hits_total")
        else:
            self.telemetry("llm_calls_total", outcome="fallback" if propensity.fallback else "ok")
        if propensity.fallback:
            reason = (propensity.error or "unknown").split(":")[0]
            self.telemetry("llm_fallbacks_total", reason=reason)


MAX_UNSEEN_LOGGED = 3  # values a day per model and feature; a free-text field would log every lead
UNSEEN_MEMORY_S = 86_400


def _unseen_key(model: TrainedModel, feature: str) -> str:
    return f"leadscore:unseen:{model.version}:{feature}"


def _shown_details(lead: Lead) -> dict:
    try:
        details = json.loads(lead.current_output.get("details") or "{}")
    except json.JSONDecodeError:
        return {}
    return details if isinstance(details, dict) else {}


def _lately_scored(lead: Lead) -> bool:
    """The CRM shows a score written within the erasure marks' memory: one the store lacks was missed,
    not erased (an erasure that old is no longer marked) nor pruned."""
    at = moment_of(lead.current_output.get("scored_at"))
    return at is not None and (datetime.now(UTC) - at).total_seconds() < ERASED_MARK_S


def _already_scored(lead: Lead, fingerprint: str, in_holdout_now: bool) -> bool:
    """The CRM already shows a score (or, in the holdout, its absence) for exactly these inputs,
    it was not a fallback, and the lead is still on the same side of the holdout."""
    details = _shown_details(lead)
    held = bool(details.get("holdout"))
    if held != in_holdout_now:
        return False  # HOLDOUT_SHARE changed: show or hide the score now
    shown = held or all(lead.current_output.get(key) for key in ("score", "tier", "reason"))
    return (
        shown
        and details.get("fingerprint") == fingerprint
        and details.get("fallback") is False
        and details.get("reason_version") == REASON_VERSION  # reasons reworded since: write them again
    )


def put_back_key(lead: str) -> str:
    """When the lead's edited score was last put back, and by which job."""
    return f"leadscore:put-back:{lead}"


def ages_told_from() -> datetime:
    """What "how long ago" each dated moment of a lead is told from, for the fingerprint and the LLM
    alike: now (tests fix it, since their fixtures' dates do not move)."""
    return datetime.now(UTC)


def _previous_stands_in(lead: Lead, answer: PropensityResult | None) -> PropensityResult | None:
    """A fallback, or, while the LLM fails for a while (a timeout, a 5xx, a 429: a failure asked again
    later), one carrying the LLM's answer behind the score the lead shows (value, confidence and model,
    as its details keep them): the lead's score then moves only as its rules do, not to the neutral
    prior and back. Still a fallback, asked again. An LLM switched off or refusing the lead gives the
    prior, as before."""
    if answer is None or not answer.fallback or not answer.retryable:
        return answer
    told = _shown_details(lead).get("propensity")
    if not isinstance(told, dict) or (told.get("source") == FALLBACK_SOURCE and not told.get("previous")):
        return answer
    try:
        value, confidence = float(told["value"]), float(told["confidence"])
    except (KeyError, TypeError, ValueError):
        return answer
    if not (0.0 <= value <= 1.0 and 0.0 <= confidence <= 1.0):  # details someone edited; NaN fails too
        return answer
    return replace(answer, propensity=value, confidence=confidence, model=str(told.get("model") or ""),
                   previous=True)  # fmt: skip


def _wrote(lead: Lead) -> dict[str, str] | None:
    """The score and tier leadscore last wrote to this lead, as its details say (blank for a holdout
    lead); None where details written before they kept them say nothing."""
    details = _shown_details(lead)
    if details.get("holdout"):
        return {"score": "", "tier": ""}
    if "score" not in details:
        return None
    return {"score": str(details["score"]), "tier": str(details.get("tier") or "")}


def _feedback(lead: Lead) -> Feedback:
    """The rep's feedback with the score it is about: the one leadscore wrote (a value someone typed
    over it is put back), else what the CRM shows; blank for a holdout lead."""
    shown = _wrote(lead) or lead.current_output
    score = shown.get("score")
    return Feedback(
        lead.crm, lead.account_id, lead.lead_id, lead.feedback,
        score=round(float(score)) if score else None, tier=shown.get("tier") or None,
        fingerprint=_shown_details(lead).get("fingerprint"),
    )  # fmt: skip


@lru_cache(maxsize=1)
def context() -> WorkerContext:
    """Built once per process; `leadscore worker` builds it before forking work horses."""
    settings = get_settings()
    settings.require_a_crm()
    model = load_model(settings)
    return WorkerContext(
        settings=settings,
        config=scoring_config(settings, model),
        reasoner=PropensityReasoner(settings),
        model=model,
    )


def load_model(settings: Settings) -> TrainedModel | None:
    if settings.scoring_model_path is None:
        return None
    try:
        model = TrainedModel.load(settings.scoring_model_path)
    except (FileNotFoundError, ModelArtifactError) as exc:
        raise SettingsError(f"SCORING_MODEL_PATH: {exc}") from None
    log.info("scoring with model %s (%s features)", model.version, len(model.kinds))
    for crm, holder in (("hubspot", "HubSpot property"), ("salesforce", "Salesforce Lead field")):
        read = {*tabular.ALWAYS_READ, *model_properties(model, crm)}
        if getattr(settings, f"{crm}_configured") and (unread := [n for n in model.kinds if n not in read]):
            log.warning(
                "model %s: no %s is named for %s in the mapping's [custom], so live leads always lack "
                "them and score as if they were missing; name one and train again to use them",
                model.version, holder, ", ".join(unread),
            )  # fmt: skip
    return model


def scoring_config(settings: Settings, model: TrainedModel | None = None) -> ScoringConfig:
    """The config scores are made with; its digest (part of every fingerprint) covers the LLM
    model and the trained model too, so changing either neither reuses cached answers nor skips
    leads."""
    try:
        config = load_config(settings.scoring_config_path)
    except ConfigError as exc:
        raise SettingsError(f"SCORING_CONFIG_PATH: {exc}") from None
    trained = model.version if model is not None else "-"
    digest = hashlib.sha256(f"{config.digest}:{settings.llm_model}:{trained}".encode()).hexdigest()[:16]
    return config.model_copy(update={"digest": digest})


def model_properties(model: TrainedModel | None, crm: str) -> dict[str, str]:
    """The CRM properties a trained model reads beyond the standard ones, by feature name."""
    if model is None:
        return {}
    props = model.meta.get("crm_properties", {})
    return {name: where[crm] for name, where in props.items() if crm in where and name in model.kinds}


@lru_cache(maxsize=64)
def _hubspot(portal_id: str) -> HubSpotCRM:
    ctx = context()
    return HubSpotCRM(
        ctx.settings, portal_id=portal_id,
        limiter=shared_limiter(ctx.redis, ctx.settings, portal_id, max_wait_s=WORKER_MAX_WAIT_S),
        telemetry=ctx.telemetry, custom_properties=model_properties(ctx.model, "hubspot"),
    )  # fmt: skip


def salesforce_for(org_id: str) -> SalesforceCRM:
    """One client per org, keyed on the 15-character id that 15- and 18-character forms share, on
    the org's latest session."""
    client = _salesforce(org_id[:15])
    client.adopt_shared_session()
    return client


@lru_cache(maxsize=64)
def _salesforce(org_id: str) -> SalesforceCRM:
    ctx = context()
    custom_fields = model_properties(ctx.model, "salesforce")
    return SalesforceCRM(
        ctx.settings, org_id=org_id, telemetry=ctx.telemetry, custom_fields=custom_fields, redis=ctx.redis
    )


# A batch waits this long at most for its store (a reset, a managed PostgreSQL's failover), trying
# again after each pause; a store it could not reach is marked down, and not tried meanwhile.
STORE_RETRY_S = 20.0
STORE_RETRY_PAUSES_S = (1.0, 4.0, 15.0)
STORE_DOWN_KEY = "leadscore:store-down"
STORE_DOWN_S = 300


class StoreDown(Exception):
    """No connection to the store could be made within the batch's STORE_RETRY_S."""


def _again_on_a_lost_connection(
    what: str, step: Callable[[], object], pauses: Iterator[float], deadline: float
) -> None:
    """Run a store step, again after the next of the batch's `pauses`, before its `deadline`, if its
    connection was lost (a reset, a failover) before it committed, or could not be made (the server
    still coming back): the step is one transaction, rolled back whole. Lost at the commit itself, it
    may have been kept: not run again, so nothing is kept twice. Still not made at the deadline,
    connect timeouts counted, the store is down: StoreDown."""
    while True:
        try:
            step()
            return
        except DBAPIError as exc:
            lost_midway = exc.connection_invalidated and exc.statement is not None
            not_made = (
                isinstance(exc, OperationalError) and not exc.connection_invalidated and exc.statement is None
            )
            if not (lost_midway or not_made):
                raise
            pause_s = next(pauses, None)
            if pause_s is None or time.monotonic() + pause_s > deadline:
                if not_made:
                    raise StoreDown(
                        f"no connection to the store within {STORE_RETRY_S:.0f}s: {exc.orig}"
                    ) from exc
                raise
            log.warning(
                "score store: connection lost (%s); keeping %s again in %.0fs", exc.orig, what, pause_s
            )
            time.sleep(pause_s)


ERASED_MARK_S = 24 * 3600  # far past any batch's run (pending.BATCH_TIMEOUT_S), which reads as it starts


def erased_key(crm: str, account: str) -> str:
    """lead id → when it was last erased: a batch that read the lead before then keeps nothing of it."""
    return f"leadscore:erased:{crm}:{account}"


def pipeline_ids(crm: str, account: str, lead_ids: list[str]) -> tuple[str, list[str]]:
    """The account and leads as batches key them: Salesforce's by their 18-character ids."""
    if crm != "salesforce":
        return account, list(lead_ids)
    return full_id(account), [full_id(i) for i in lead_ids]


def erased_since(redis: Redis, crm: str, account: str, lead_ids: list[str], since: float) -> set[str]:
    """Those of these leads erased at or after `since` (`redis_now`), as named here."""
    if not lead_ids:
        return set()
    account_id, keyed = pipeline_ids(crm, account, lead_ids)
    at = redis.zmscore(erased_key(crm, account_id), keyed)
    return {lead_id for lead_id, when in zip(lead_ids, at, strict=True) if when is not None and when >= since}


def erase(
    store: Store, redis: Redis, crm: str, account: str, lead_ids: list[str], mark_erased: bool = True
) -> dict[str, int]:
    """A privacy deletion's or `leadscore forget`'s work: the rows deleted per table, and the cached
    LLM answers (`llm_answers`). Marked erased first (`mark_erased`), so a batch that read a lead before
    sees the mark once it has kept its own rows, and erases those again, unmarked: a batch that read
    the lead after the erasure must not read as before it."""
    account_id, keyed = pipeline_ids(crm, account, lead_ids)
    if mark_erased:
        now = redis_now(redis)
        with redis.pipeline(transaction=True) as pipe:
            pipe.zadd(erased_key(crm, account_id), dict.fromkeys(keyed, now))
            pipe.zremrangebyscore(erased_key(crm, account_id), 0, now - ERASED_MARK_S)
            pipe.expire(erased_key(crm, account_id), ERASED_MARK_S)
            pipe.execute()
    # Answers cached by an older release are keyed by the input fingerprint, which the store keeps:
    # read before the rows that name them go.
    answers = forget_answers(redis, crm, account_id, keyed, store.fingerprints_of(crm, account, lead_ids))
    with redis.pipeline(transaction=False) as pipe:  # what else Redis keeps under the lead's id
        pipe.delete(*(put_back_key(lead_key(crm, account_id, lead_id)) for lead_id in keyed))
        if (
            mark_erased
        ):  # not on a batch's second pass (mark_erased=False): a newer batch may hold the lead's marks by now
            marks, marked_at, marks_before = pending.handoff_keys(crm, account_id)
            pipe.hdel(marks, *keyed)
            pipe.zrem(marked_at, *keyed)
            pipe.hdel(marks_before, *keyed)
            pipe.zrem(pending.backfill_key(crm, account_id), *keyed)
        pipe.execute()
    deleted = {**store.erase(crm, account, lead_ids), "llm_answers": answers}
    log.info("erased %s:%s leads %s: %s", crm, account, ", ".join(lead_ids), deleted)
    return deleted


def forget_answers(
    redis: Redis, crm: str, account_id: str, lead_ids: list[str], more: set[str] = frozenset()
) -> int:
    """Delete the LLM answers cached for these leads (as batches key them), and `more` answer ids;
    how many were there."""
    answer_sets = [key for lead_id in lead_ids for key in answers_keys(crm, account_id, lead_id)]
    with redis.pipeline(transaction=False) as pipe:
        for key in answer_sets:
            listed_answers(pipe, key)
        cached = {member.decode() for members in pipe.execute() for member in members}
    keys = {cached_answer_key(answer) for answer in cached | set(more)}
    answers = redis.delete(*keys) if keys else 0
    redis.delete(*answer_sets)
    return answers


def outcome(lead_key: str, name: str, scored: Scored | None = None) -> dict:
    if scored is None or scored.result is None:
        return {"lead": lead_key, "outcome": name}
    return {
        "lead": lead_key,
        "outcome": name,
        "score": scored.result.score,
        "tier": scored.result.tier,
        "reason": scored.result.reason,
        "fallback": bool(scored.result.details.get("fallback")),
    }


def score_lead(event: dict) -> dict:
    """One lead, unbatched: read it, score it, write the score back unless it is unchanged."""
    lead_event = LeadEvent.model_validate(event)
    ctx = context()
    crm = ctx.crm_for(lead_event)
    try:
        lead = crm.read_lead(lead_event.lead_id)
    except LeadGone as exc:
        log.info("not scored: %s", exc)
        return outcome(lead_event.lead_key, "lead_gone")
    if lead.read_only:
        ctx.keep([], [lead])
        return outcome(lead_event.lead_key, lead.outcome or "read_only")
    [scored] = ctx.score([lead])
    if scored.fields is None:
        ctx.keep([], [lead])
        return outcome(lead_event.lead_key, "unchanged", scored)
    try:
        crm.write_scores(lead.lead_id, scored.fields)
    except LeadGone as exc:
        log.info("not written: %s", exc)
        return outcome(lead_event.lead_key, "lead_gone")
    ctx.keep([scored], [lead])
    return outcome(lead_event.lead_key, "written", scored)
