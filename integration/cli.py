"""`leadscore` command line: CRM set-up, rescore, workers, failed jobs, replaying fixtures, emulators, the
demo, the store (`db`, `outcomes`, `forget`), and models (`train`, `score-file`, `evaluate`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from integration.errors import CRMError, CRMUnavailable, RateLimited, UserError
from integration.settings import SettingsError, get_settings

# Commands reading files the user names: a file they cannot read is told in one line, not a traceback.
FILE_COMMANDS = frozenset({"train", "score-file", "evaluate", "replay", "hubspot-project"})
GO_LIVE_STEP = (
    "Once the webhooks reach leadscore and a worker runs: `leadscore rescore --crm {crm}`, so the {leads} "
    "that exist already get a score (new and changed ones are scored as they come)."
)


def cmd_setup(args) -> int:
    if args.crm == "hubspot":
        from integration.hubspot.api import HubSpotCRM

        report = HubSpotCRM(get_settings()).ensure_properties()
        todo = [
            "Add Lead score, Lead tier and Lead score reason as contact list-view columns, and Lead score "
            "holdout while HOLDOUT_SHARE is above 0: a held-out lead's score is blank on purpose.",
            "Show Lead score feedback on the contact record (Settings > Objects > Contacts > Record "
            "customization), so reps can say a score is too high, too low or right.",
        ]
    else:
        from integration.salesforce.api import ADMIN_STEPS, SalesforceCRM

        report = SalesforceCRM(get_settings()).ensure_fields()
        todo = list(ADMIN_STEPS)
    todo.append(GO_LIVE_STEP.format(crm=args.crm, leads="contacts" if args.crm == "hubspot" else "Leads"))
    for name in report.created:
        print(f"created  {name}")
    for name in report.existing:
        print(f"exists   {name}")
    for name in report.updated:
        print(f"updated  {name} (help text for reps added)")
    print("Still to do by hand:")
    for step in todo:
        print(f"  - {step}")
    return 0


def cmd_hubspot_project(args) -> int:
    from integration.hubspot.project import project_files, write_project

    files = project_files(args.target_url, args.with_engagement, tuple(args.property))
    for path in write_project(args.out, files):
        print(f"wrote    {path}")
    print(
        f"Next: `cd {args.out} && hs project upload` (the HubSpot CLI; `hs account auth` first), install "
        "the app in the portal from its Distribution tab, then set HUBSPOT_ACCESS_TOKEN to its access token, "
        "HUBSPOT_APP_SECRET to the client secret on its Auth tab and HUBSPOT_APP_ID to its app id, and run "
        "`leadscore setup hubspot`."
    )
    return 0


def cmd_worker(args) -> int:
    from integration import logs
    from integration.pending import worker_queues
    from integration.queue import durability_risks, settings_redis
    from workers import jobs
    from workers.worker import build

    settings = get_settings()
    logs.configure(settings.log_level)
    ctx = jobs.context()  # validate config and build clients once, before RQ forks work horses
    ready_orgs = []
    if settings.hubspot_configured:
        _learn_reached_portal(settings, ctx)
    if settings.salesforce_configured:
        settings.require_salesforce_api()  # missing credentials are a setting to fix, not an org's trouble
        ready_orgs = [org_id for org_id in settings.allowed_org_ids if _prepare_salesforce(jobs, org_id)]
    _check_output_fields(settings, jobs, ready_orgs)
    _prepare_store(ctx.store)
    _log_scoring(settings, ctx)
    _check_llm(settings, ctx)
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    log = logging.getLogger("leadscore.worker")
    try:
        for risk in durability_risks(settings_redis(settings)):
            log.warning("Redis: %s", risk)
    except RedisError:
        pass  # unreachable: the loop below waits for it
    backoff = 1.0
    while True:  # a Redis restart must not end the worker: wait for it, then work again
        try:
            redis = ctx.redis  # RQ's and the jobs' one client: a work horse opens one connection, not two
            worker = build(worker_queues(settings.queue_name, redis), redis, settings.worker_maintenance_s)
            worker.work(burst=args.burst, with_scheduler=True, logging_level=settings.log_level)
            return 0
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if refused := _redis_refused(exc):  # a setting to fix: waiting cannot mend it
                raise SettingsError(f"REDIS_URL: {refused}") from exc
            if args.burst:
                raise
            log.warning("Redis unreachable (%s); working again in %.0fs", exc, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)


def _redis_refused(exc: Exception) -> str | None:
    """What to fix when Redis answered but refused the worker (a password, an untrusted TLS
    certificate), rather than could not be reached; None for the latter."""
    import ssl

    from redis.exceptions import AuthenticationError

    if isinstance(exc, AuthenticationError):
        return f"Redis refused the credentials ({exc}): set the password (and user) Redis expects"
    if isinstance(exc.__context__ or exc.__cause__, ssl.SSLCertVerificationError):
        return (
            f"Redis's TLS certificate is not trusted ({exc}): add its CA to the system's, or, for a "
            "provider whose certificate is self-signed (Heroku Redis), set REDIS_SSL_CERT_REQS=none"
        )
    return None


def _check_llm(settings, ctx) -> None:
    """Say at start when the LLM will not help, rather than lead by lead: no key, or a request it refuses."""
    log = logging.getLogger("leadscore.worker")
    if ctx.model is not None and not ctx.model.uses_llm:
        return  # a trained model without the LLM's feature: the LLM is not asked
    if not settings.llm_enabled:
        log.warning("LLM_API_KEY is not set: every lead is scored on the rules alone, with the neutral prior")
    elif refused := ctx.reasoner.check():
        log.error(
            "the LLM (%s at %s) refuses leadscore's request: %s. Every lead is scored on the rules alone "
            "until LLM_MODEL, LLM_BASE_URL, LLM_API_KEY or LLM_EXTRA_PARAMS is fixed", settings.llm_model,
            settings.llm_base_url or "OpenAI", refused,
        )  # fmt: skip


def _log_scoring(settings, ctx) -> None:
    """Which rules are live, so an admin who edited them can tell whether this worker has them: the
    config's own version, and the digest every score's fingerprint carries (the file, the LLM model
    and the trained model together)."""
    logging.getLogger("leadscore.worker").info(
        "scoring config %s: version %s, digest %s (LLM %s, %s, HOLDOUT_SHARE %g)",
        settings.scoring_config_path or "shipped default", ctx.config.version, ctx.config.digest,
        settings.llm_model, f"model {ctx.model.version}" if ctx.model else "no trained model",
        settings.holdout_share,
    )  # fmt: skip


def _check_output_fields(settings, jobs, salesforce_orgs: list[str]) -> None:
    """A HubSpot portal without leadscore's properties refuses every write: logged as an error at
    start, naming the command that adds them, rather than found lead by lead in the failed jobs.
    With HOLDOUT_SHARE set, every write carries the holdout flag too, so a CRM without its field
    stops the worker. A CRM that cannot be asked now (HubSpot down; a Salesforce org not in
    `salesforce_orgs`, the ones that answered at start) is not a reason to stop scoring."""
    from hubspot.crm.properties import ApiException as PropertiesApiException
    from urllib3.exceptions import HTTPError

    from integration.hubspot import OUTPUT_PROPERTIES, SCORED_OPTIONS, outcome_stages
    from integration.hubspot.api import HubSpotCRM
    from integration.salesforce import OUTPUT_FIELDS

    log = logging.getLogger("leadscore.worker")
    holdout = settings.holdout_share > 0
    missing = []
    if settings.hubspot_configured:
        try:
            properties = HubSpotCRM(settings).contact_properties()
        except (PropertiesApiException, HTTPError, CRMUnavailable) as exc:
            log.warning("could not check HubSpot for leadscore's properties (%s)", exc)
        except CRMError as exc:  # a refused token: HubSpot's jobs fail saying so, Salesforce's go on
            log.error("HubSpot: %s", exc)
        else:
            present = set(properties)
            warn_unscored_options("HubSpot", properties, SCORED_OPTIONS, jobs.context().config)
            stages = outcome_stages(settings.hubspot_outcome_stages)
            offered = properties.get("lifecyclestage", stages)
            if unknown := [stage for stage in stages if stage not in offered]:
                log.warning("HubSpot has no lifecycle stage %s, which HUBSPOT_OUTCOME_STAGES or the defaults "
                            "count as an outcome: give its internal value (a number for a custom stage)",
                            ", ".join(unknown))  # fmt: skip
            always = [name for key, name in OUTPUT_PROPERTIES.items() if key != "holdout"]
            absent = [name for name in always if name not in present]
            if absent:
                log.error("HubSpot has no contact property %s, so every score written will be refused: run "
                          "`leadscore setup hubspot`", ", ".join(absent))  # fmt: skip
            if holdout and OUTPUT_PROPERTIES["holdout"] not in present:
                missing.append(f"HubSpot has no contact property {OUTPUT_PROPERTIES['holdout']}")
            model = jobs.context().model  # HubSpot reads a property it lacks as blank, without a word
            if unread := sorted(set(jobs.model_properties(model, "hubspot").values()) - present):
                log.warning("HubSpot has no contact property %s that model %s reads: every lead scores as "
                            "if it were missing", ", ".join(unread), model.version)  # fmt: skip
    for org_id in salesforce_orgs if holdout else []:
        if OUTPUT_FIELDS["holdout"] not in jobs.salesforce_for(org_id).read_fields:
            missing.append(f"Salesforce org {org_id} has no Lead field {OUTPUT_FIELDS['holdout']}")
    if missing:
        raise SettingsError(
            f"HOLDOUT_SHARE is {settings.holdout_share:g}, but {'; '.join(missing)}: run `leadscore setup "
            "hubspot` / `leadscore setup salesforce` to add it, or set HOLDOUT_SHARE=0"
        )


def warn_unscored_options(where: str, options: dict[str, list[str]], tables: dict[str, str], config) -> None:
    """Say at start which of the CRM's picklist options (`options`, by field) no rule of the scoring
    config names (`tables`: the config table each field is looked up in): a lead with one scores as
    unknown, and a closed or junk status goes uncapped, which the scores alone would never show."""
    from workers.config import unmatched_options

    fields = {table: field for field, table in tables.items() if field in options}
    unmatched = unmatched_options(config, {table: options[field] for table, field in fields.items()})
    for table, values in unmatched.items():
        shown = ", ".join(values[:UNSCORED_SHOWN]) + (f" and {len(values) - UNSCORED_SHOWN} more"
                                                      if len(values) > UNSCORED_SHOWN else "")  # fmt: skip
        logging.getLogger("leadscore.worker").warning(
            "%s %s has options no rule of scoring config %s names: %s. A lead with one scores as an unknown "
            "%s%s; add them under [source_stage.%s] (SCORING_CONFIG_PATH)",
            where, fields[table], config.version, shown, table,
            ", never capped" if table == "status" else "", TABLE_NAMES[table],
        )  # fmt: skip


UNSCORED_SHOWN = 20
TABLE_NAMES = {"source": "sources", "status": "statuses", "stage": "stages"}


def _learn_reached_portal(settings, ctx) -> None:
    """Which portal HUBSPOT_ACCESS_TOKEN reaches, so that batches of another portal's contacts (an app
    installed in two) are not read and written with it. Unknown now (HubSpot down), the jobs learn it
    (`WorkerContext.reached_account`); without the `oauth` scope, every portal's batches are read."""
    from integration.hubspot.api import HubSpotCRM

    try:
        ctx.reached["hubspot"] = HubSpotCRM(settings).token_portal()
    except (CRMError, RateLimited) as exc:
        logging.getLogger("leadscore.worker").warning(
            "could not learn which HubSpot portal the token reaches (%s): the jobs ask again; until one "
            "learns it, events of any portal the app is installed in are scored with it", exc,
        )  # fmt: skip


def _prepare_salesforce(jobs, org_id: str) -> bool:
    """Log in and describe Lead once here, not in every work horse; whether the org answered and is
    the one the credentials reach. An org that fails now (down, over its API budget, refusing a
    credential) must not stop the worker: HubSpot scoring goes on, and each of the org's jobs tries
    again, failing with the org's own error until it answers. One the credentials do not reach (a
    second id in SALESFORCE_ORG_IDS) has its batches refused, as another account's."""
    import requests
    from simple_salesforce.exceptions import SalesforceError

    from integration.crm import same_account
    from integration.salesforce import SCORED_PICKLISTS

    log = logging.getLogger("leadscore.worker")
    try:
        client = jobs.salesforce_for(org_id)
        client.prepare()
        known = jobs.context().reached
        if "salesforce" not in known:  # one org the credentials reach, whichever ids are listed
            known["salesforce"] = client.reached_org()[:15]
        reached = known["salesforce"]
    except (CRMError, RateLimited, SettingsError, SalesforceError, requests.RequestException) as exc:
        log.error("Salesforce org %s is not ready at start (%s); the worker starts, and its jobs try again",
                  org_id, exc)  # fmt: skip
        return False
    warn_unscored_options(f"Salesforce org {org_id}: Lead", client.picklists, SCORED_PICKLISTS,
                          jobs.context().config)  # fmt: skip
    if not same_account(reached, org_id):
        log.error(
            "SALESFORCE_ORG_IDS names org %s, but the Salesforce credentials reach org %s: %s's events are "
            "not scored (leadscore serves one org; run another deployment, with its credentials, for it)",
            org_id, reached, org_id,
        )  # fmt: skip
        return False
    return True


def _prepare_store(kept) -> None:
    """Bring the score store's schema up to date, and connect once so that every work horse forks
    with the engine's dialect set up and an empty pool; without a store, scores still reach the CRM."""
    from workers import store

    try:
        store.upgrade(kept.url)
        kept.engine.connect().close()
        kept.engine.dispose()  # no connection is shared across the fork
    except Exception as exc:
        logging.getLogger("leadscore.worker").error(
            "score store %s is unavailable (%s): scores are written to the CRM but not kept",
            store.redacted(kept.url), exc,
        )  # fmt: skip


def _queue():
    """The workers' queue, on a Redis that answers; else one line saying what to fix."""
    from redis.exceptions import RedisError
    from rq import Queue

    from integration.queue import settings_redis

    settings = get_settings()
    connection = settings_redis(settings)
    try:
        connection.ping()
    except RedisError as exc:
        raise UsageError(
            f"cannot reach Redis ({exc}): start it, or point REDIS_URL at the workers' Redis"
        ) from None
    return Queue(settings.queue_name, connection=connection)


def _failed_registries():
    """The failed jobs of both queues the workers take from: theirs, and the backfill's."""
    from integration.pending import worker_queues

    queue = _queue()
    return [q.failed_job_registry for q in worker_queues(queue.name, queue.connection)]


def _leads_of(job) -> str:
    import json

    if job.func_name.endswith("score_batch"):
        keys = [json.loads(raw)["lead_id"] for raw in job.args[2]]
        return f"{job.args[0]}:{job.args[1]} " + (
            ", ".join(keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")
        )
    return " ".join(str(a) for a in job.args)[:60]


def cmd_failed(args) -> int:
    failed = 0
    for registry in _failed_registries():
        ids = registry.get_job_ids()
        failed += len(ids)
        for job in registry.job_class.fetch_many(ids, connection=registry.connection):
            if job is None:
                continue
            result = job.latest_result()
            said = result.exc_string if result else None
            reason = said.strip().splitlines()[-1] if said else "?"
            ended = job.ended_at.isoformat(timespec="seconds") if job.ended_at else "?"
            print(f"{job.id}  {ended}  {_leads_of(job)}\n    {reason}")
    if not failed:
        print("no failed jobs")
        return 0
    print(f"{failed} failed; `leadscore requeue JOB_ID...` or `leadscore requeue --all` runs them again")
    return 0


def cmd_requeue(args) -> int:
    registries = _failed_registries()
    ids = [i for registry in registries for i in registry.get_job_ids()] if args.all else args.job_ids
    if not ids:
        print("nothing to requeue: name job ids or pass --all", file=sys.stderr)
        return 2
    refused = 0
    for job_id in ids:
        holding = next((registry for registry in registries if job_id in registry), None)
        if holding is None:  # mistyped, or not in a failed registry
            print(f"not a failed job: {job_id}", file=sys.stderr)
            refused += 1
            continue
        holding.requeue(job_id)
        print(f"requeued {job_id}")
    return 2 if refused else 0


def cmd_rescore(args) -> int:
    from redis.exceptions import RedisError

    from integration.errors import RateLimited
    from workers import rescore

    queue = _queue()  # before any CRM call: without Redis there is nowhere to queue them
    try:
        account, lead_ids = rescore.open_leads(get_settings(), queue.connection, args.crm, args.account)
    except rescore.AccountError as exc:
        raise UsageError(str(exc)) from None
    fed = rescore.Fed(args.crm, account, force=args.force)
    try:
        rescore.feed(queue, fed, lead_ids)
    except (CRMError, RateLimited, RedisError, *unreachable()) as exc:
        why = f"Redis stopped answering ({exc})" if isinstance(exc, RedisError) else _said(exc)
        raise UsageError(
            f"rescore of {args.crm}:{account} stopped after queueing {fed.queued} leads: {why}; run it "
            "again once that is fixed (leads still waiting are not queued twice)"
        ) from None
    print(f"{args.crm}:{account}: {fed.queued} leads queued, {fed.waiting} already waiting; the workers "
          "score them, writing only the scores that change")  # fmt: skip
    return 0


def cmd_forget(args) -> int:
    """Erase leads on request (GDPR, CCPA): HubSpot's privacy deletions are erased as they come."""
    from integration.salesforce import is_org_id, is_record_id
    from workers.jobs import erase
    from workers.store import Store

    account_ok, lead_ok = (
        (is_org_id, is_record_id) if args.crm == "salesforce" else (str.isdigit, str.isdigit)
    )
    refused = [i for i in args.lead_ids if not lead_ok(i)] + (
        [] if account_ok(args.account) else [args.account]
    )
    if refused:  # erasing nothing under a mistyped id would read as "never scored"
        raise UsageError(
            f"not a {args.crm} id: {', '.join(refused)} (check its case and length); nothing erased"
        )
    settings = get_settings()
    deleted = erase(
        Store(settings.database_url).require_schema(),
        _queue().connection,
        args.crm,
        args.account,
        args.lead_ids,
    )
    print(f"{args.crm}:{args.account}: erased {deleted['scores']} scores, {deleted['outcomes']} outcomes, "
          f"{deleted['feedback']} feedback and {deleted['llm_answers']} cached LLM answers of "
          f"{len(args.lead_ids)} leads; delete them in the CRM too, or their next change scores them "
          "again")  # fmt: skip
    return 0


def cmd_history(args) -> int:
    """Every score leadscore kept of one lead, with what made it and what changed between them."""
    from workers.history import history_lines
    from workers.store import Store

    kept = (
        Store(get_settings().database_url).require_schema().lead_history(args.crm, args.account, args.lead_id)
    )
    lead = f"{args.crm}:{args.account} lead {args.lead_id}"
    if not any(kept.values()):
        print(f"{lead}: nothing kept (never scored, erased with `forget`, pruned with `db prune`, or merged "
              "into another lead, whose history holds its scores)")  # fmt: skip
        return 1
    print(f"{lead}: {len(kept['scores'])} scores, {len(kept['outcomes'])} outcomes, "
          f"{len(kept['feedback'])} feedback, oldest first")  # fmt: skip
    print("\n".join(history_lines(kept)))
    return 0


def cmd_replay(args) -> int:
    import requests

    from integration.replay import prepare

    settings = get_settings()
    url = args.url or f"http://127.0.0.1:{settings.port}/webhooks/hubspot"
    failures = 0
    for path in args.files:
        body, headers = prepare(  # a file it cannot read or sign ends in one line (`main`)
            path,
            url,
            args.secret or settings.hubspot_app_secret,
            args.secret or settings.salesforce_events_secret,
        )
        try:
            response = requests.post(url, data=body, headers=headers, timeout=30)
        except requests.RequestException as exc:
            print(f"leadscore replay: cannot post to {url}: {exc}", file=sys.stderr)
            return 2
        print(f"{path}: {response.status_code} {response.text.strip()[:200]}")
        failures += not response.ok
    return 1 if failures else 0


# Per service: its name, default port and token, and the settings that point leadscore at it.
EMULATED = {
    "hubspot": (
        "HubSpot emulator",
        8081,
        "emulator-token",
        "HUBSPOT_API_BASE={url} HUBSPOT_ACCESS_TOKEN={token}",
    ),
    "llm": ("LLM stub", 8082, "stub-key", "LLM_BASE_URL={url}/v1 LLM_API_KEY={token}"),
}


def cmd_emulate(args) -> int:
    from integration.emulators import FIXTURES
    from integration.emulators.hubspot import HubSpotEmulator
    from integration.emulators.llm import LLMStub

    name, default_port, default_token, settings = EMULATED[args.service]
    port, token = args.port or default_port, args.token or default_token
    if args.service == "hubspot":
        emulator = HubSpotEmulator(token=token, latency_s=args.latency)
        app = emulator.load_fixtures(args.fixtures or FIXTURES / "hubspot").app()
    else:
        stub = LLMStub(args.fixtures or FIXTURES / "llm", api_key=token)
        stub.latency_s = args.latency
        app = stub.app()
    url = f"http://127.0.0.1:{port}"
    print(
        f"{name} on {url}; point leadscore at it with:\n  {settings.format(url=url, token=token)}", flush=True
    )
    app.run(host="127.0.0.1", port=port, threaded=True)
    return 0


def cmd_demo(args) -> int:
    from integration.demo import run_demo

    try:
        return run_demo(timeout_s=args.timeout)
    except RuntimeError as exc:
        print(f"leadscore demo: {exc}", file=sys.stderr)
        return 1


def cmd_db(args) -> int:
    from workers import store

    settings = get_settings()
    if args.action == "prune":
        if args.older_than is None:
            raise UsageError("db prune needs --older-than DAYS: what your retention policy keeps")
        if args.older_than < 1:  # a batch keeps again a score of the last day it finds missing
            raise UsageError(f"db prune --older-than {args.older_than:g}: keep at least 1 day")
        before = datetime.now(UTC) - timedelta(days=args.older_than)
        deleted = store.Store(settings.database_url).require_schema().prune(before)
        print(f"{store.redacted(settings.database_url)}: deleted what was kept before "
              f"{before:%Y-%m-%d %H:%M} UTC: {deleted}")  # fmt: skip
        return 0
    store.upgrade(settings.database_url)
    counts = store.Store(settings.database_url).counts()
    print(f"schema of {store.redacted(settings.database_url)} is at head: {counts}")
    return 0


def _scoring_config():
    from workers.jobs import scoring_config

    return scoring_config(get_settings())


def cmd_train(args) -> int:
    from workers import offline
    from workers.evaluation import said_of_tier_a

    if (args.out / "model.json").exists():
        raise UsageError(
            f"--out {args.out} already holds a model: give a new directory (workers loading that one "
            "must not see it change under them), or remove it first"
        )
    if args.from_store:
        from workers.store import Store

        store = Store(get_settings().database_url).require_schema()
        trained = offline.train_from_store(
            store, args.out, args.min_age_days, args.mapping, args.tiers, args.snapshot
        )
    else:
        if not (args.data and args.mapping):
            raise UsageError("train needs --data FILE and --mapping MAP, or --from-store")
        trained = offline.train_from_file(args.data, args.mapping, args.label, args.out, args.tiers)
    meta = trained.meta
    print(f"model {meta['version']} saved to {args.out} ({meta['training']['seconds']} s)")
    if args.from_store:
        from workers.store_data import said_of_time_to_convert

        training = meta["training"]
        timing = said_of_time_to_convert(training["time_to_convert"], training["min_age_days"])
        print(f"  learnt from each lead's {training['snapshot']} score; {timing}")
    for name, m in meta["candidates"].items():
        kept = "  <- kept" if name == meta["model"] else ""
        print(f"  {name:20s} CV ROC AUC {m['cv_auc_mean']:.4f} ± {m['cv_auc_sd']:.4f}{kept}")
    method = meta["calibration"]
    cv = meta["calibration_cv"][method]
    print(f"  calibration: {method} (cross-validated log loss {cv['log_loss']}, ECE {cv['ece']})")
    expected = meta["expected"]
    print(f"  expected on unseen leads (out-of-fold): ROC AUC {expected['roc_auc']:.4f}, "
          f"ECE {expected['ece']:.4f}, {said_of_tier_a(expected['tiers'], meta['base_rate'])}")  # fmt: skip
    in_d, cuts = expected["tiers"][-1]["share"], meta["tiers"]
    suggested = _suggested_tiers(meta["base_rate"])
    if in_d > MOST_IN_ONE_TIER and suggested is not None and cuts["A"] > suggested.A:
        print(f"  warning: {in_d:.0%} of leads land in tier D. The cut-offs (A {cuts['A']}, B {cuts['B']}, "
              f"C {cuts['C']}) are calibrated conversion probabilities; with a {meta['base_rate']:.0%} "
              f"base rate set lower ones, e.g. --tiers {suggested.A},{suggested.B},"
              f"{suggested.C}")  # fmt: skip
    return 0


MOST_IN_ONE_TIER = 0.8  # beyond this share in one tier, say the tiers barely separate leads


def _suggested_tiers(base_rate: float):
    """Cut-offs at 4x, 2x and 1x the base rate, so A leads convert several times as often as most;
    None when the base rate is too high for that (a quarter or more)."""
    from workers.config import Tiers

    c = max(1, round(base_rate * 100))
    b = max(c + 1, round(base_rate * 200))
    a = max(b + 1, round(base_rate * 400))
    return Tiers(A=a, B=b, C=c) if a < 100 else None


def tiers_argument(text: str):
    """`--tiers A,B,C`: the model's cut-offs on its calibrated probability x 100."""
    from pydantic import ValidationError

    from workers.config import Tiers

    try:
        a, b, c = (int(part) for part in text.split(","))
        return Tiers(A=a, B=b, C=c)
    except (ValueError, ValidationError) as exc:
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "expected three integers"
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected A,B,C, three whole numbers 0-100 with A > B > C, e.g. 80,50,20 ({detail})"
        ) from None


def cmd_score_file(args) -> int:
    from workers import offline

    for option, given in (("--data", args.data), ("--mapping", args.mapping)):
        if args.out.resolve() == given.resolve():
            raise UsageError(
                f"--out {args.out} is the {option} file: scores would replace it; give another file"
            )
    landed = offline.score_file(args.data, args.mapping, args.out, _scoring_config(), args.model)
    said = sys.stderr if offline.streams_into(args.out) else sys.stdout  # not into the scores' stream
    rows = sum(landed.values())  # a file without rows is refused before scoring
    scorer = f"model {args.model}" if args.model else "the rules"
    shares = ", ".join(f"{tier} {count / rows:.0%}" for tier, count in landed.items())
    print(f"scored {rows} rows with {scorer} -> {args.out} (tiers: {shares})", file=said)
    crowded, count = max(landed.items(), key=lambda item: item[1])
    # A model's crowded tier is train's to warn about: there it can say which --tiers would fit.
    if not args.model and rows >= MIN_ROWS_TO_JUDGE_TIERS and count / rows > MOST_IN_ONE_TIER:
        print(f"  warning: {count / rows:.0%} of rows land in tier {crowded}, so the rules barely separate "
              "these leads: tune the rules in SCORING_CONFIG_PATH (weights, statuses) to them, or train "
              "a model", file=said)  # fmt: skip
    return 0


MIN_ROWS_TO_JUDGE_TIERS = 50


def cmd_evaluate(args) -> int:
    from workers import offline, report
    from workers.evaluation import said_of_tier_a

    store = None
    if args.with_store:
        from workers.store import Store

        store = Store(get_settings().database_url).require_schema()
    if bool(args.data) != bool(args.mapping) or not (args.data or args.with_store):
        raise UsageError("evaluate needs --data FILE and --mapping MAP, or --with-store, or both")
    if args.model and not args.data:
        raise UsageError("--model scores a file: give --data FILE and --mapping MAP as well")
    summary = offline.evaluate(
        args.data, args.mapping, args.label, args.out, _scoring_config(), args.model, store,
        args.min_age_days, args.snapshot,
    )  # fmt: skip
    if "file" in summary["data"]:
        print(f"{summary['rows']} leads, overall conversion {summary['base_rate']:.1%}")
    if "live" in summary:
        from workers.store_data import said_of_time_to_convert

        live = summary["live"]
        timing = said_of_time_to_convert(live["time_to_convert"], live["min_age_days"])
        print(f"store: each lead's {live['snapshot']} score graded; {timing}")
    for name, s in summary["scorers"].items():
        print(f"  {name:40s} ROC AUC {s['roc_auc']:.4f}  ECE {s['ece']:.4f}  "
              f"{said_of_tier_a(s['tiers'], s['base_rate'])}")  # fmt: skip
        if said := report.llm_adds(s):
            print(f"    {said}")
    if not summary["scorers"]:
        print("  no scorer can be ranked yet (no scored leads of both outcomes); the report shows the "
              "holdout and rep feedback")  # fmt: skip
    print(f"report: {args.out / 'report.md'}")
    return 0


def cmd_outcomes(args) -> int:
    from integration.errors import RateLimited
    from workers.outcomes import SyncError, sync
    from workers.rescore import AccountError
    from workers.store import StoreNotReady

    try:
        report = sync(get_settings(), crm=args.crm, account=args.account)
    except (CRMError, RateLimited, *unreachable()) as exc:
        raise UsageError(f"outcomes sync stopped: {exc}; run it again (it only adds what is new)") from None
    except (SyncError, StoreNotReady, AccountError) as exc:
        raise UsageError(str(exc)) from None
    if not report:
        settings = get_settings()
        configured = {"hubspot": settings.hubspot_configured, "salesforce": settings.salesforce_configured}
        asked = [args.crm] if args.crm else list(configured)
        if not any(configured[crm] for crm in asked):
            names = " or ".join({"hubspot": "HubSpot's", "salesforce": "Salesforce's"}[crm] for crm in asked)
            raise UsageError(f"no CRM to sync: set {names} credentials (README, Configuration)")
        raise UsageError(
            "no portal or org to sync yet (leadscore learns a HubSpot portal from the first lead it scores, "
            "a Salesforce org from SALESFORCE_ORG_IDS): name it with --crm CRM --account ID"
        )
    for account, counts in report.items():
        if counts["since"] is None:
            print(f"{account}: no score kept yet, so no outcome to learn from: nothing read")
            continue
        since = f"{counts['since']:%Y-%m-%d %H:%M} UTC"
        print(f"{account}: {counts['leads']} leads at an outcome changed since {since}, "
              f"{counts['new_outcomes']} new in the store")  # fmt: skip
    return 0


class UsageError(RuntimeError):
    """A command given the wrong arguments; the message says which to give."""


def unreachable() -> tuple[type[Exception], ...]:
    """What the CRM clients raise when a service cannot be reached: simple-salesforce's requests
    errors, HubSpot's urllib3 ones."""
    import requests
    import urllib3

    return (requests.RequestException, urllib3.exceptions.HTTPError)


def _said(exc: Exception) -> str:
    """An error in one line; a CRM that did not answer names its URL and the setting to check."""
    cause = exc.__cause__ if isinstance(exc, CRMUnavailable) else exc
    return _cannot_reach(cause) if isinstance(cause, unreachable()) else str(exc)


def _cannot_reach(exc: Exception) -> str:
    """'cannot reach URL (why)', and the setting that names it when it is one of leadscore's."""
    from urllib3.exceptions import MaxRetryError

    retried = exc.args[0] if exc.args and isinstance(exc.args[0], MaxRetryError) else exc  # requests wraps it
    if isinstance(retried, MaxRetryError) and retried.pool is not None:
        pool = retried.pool
        url, why = f"{pool.scheme}://{pool.host}:{pool.port}", str(retried.reason).split("): ", 1)[-1]
    else:
        url, why = getattr(getattr(exc, "request", None), "url", None) or "the CRM", str(exc)
    settings = get_settings()
    named = {
        "HUBSPOT_API_BASE": settings.hubspot_api_base,
        "SALESFORCE_INSTANCE_URL": settings.salesforce_instance_url,
        "LLM_BASE_URL": settings.llm_base_url,
    }
    setting = next((name for name, at in named.items() if at and url.startswith(_origin(at))), None)
    fix = f"check {setting} and that it is up" if setting else "check the address and the network"
    return f"cannot reach {url} ({why}): {fix}"


def _origin(url) -> str:
    return f"{url.scheme}://{url.host}:{url.port}"


def _store_unavailable() -> type[Exception]:
    from sqlalchemy.exc import OperationalError

    return OperationalError


def a_file(text: str) -> Path:
    """A file to read or write: refused up front when it names a directory, or lies inside a file."""
    path = _not_under_a_file(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory: give a file")
    return path


def a_directory(text: str) -> Path:
    """A directory (a model to read, or one to write into): refused up front when it names a file,
    before any long run."""
    path = _not_under_a_file(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file: give a directory")
    return path


def _not_under_a_file(text: str) -> Path:
    """A path whose parent is a file can be neither read nor written: said before any long run."""
    path = Path(text)
    if file := next((str(parent) for parent in path.parents if parent.is_file()), None):
        raise argparse.ArgumentTypeError(f"{text!r} is inside {file!r}, which is a file: give another path")
    return path


def _store_rows_arguments(command, flag: str, verb: str) -> None:
    """Which leads of the store count, and which of each lead's scores stands for it (`store_data`)."""
    command.add_argument(
        "--min-age-days", type=float, default=30.0,
        help=f"{flag}: a lead counts once first scored this many days ago, as converted if it converted "
        "within them of its first score (0: at any time so far)",
    )  # fmt: skip
    command.add_argument(
        "--snapshot", choices=("first", "last"), default="first",
        help=f"{flag}: {verb} each lead's first score (default: as reps saw it when choosing whom to call), "
        "or its last before it converted or its window ended (it shows reps' disposition of the lead)",
    )  # fmt: skip


# What the offline commands read of the settings (`leadscore train --help` and the others end with it).
CONFIG_SETTING = (
    "SCORING_CONFIG_PATH (the rules, and the status caps that bind a model too; unset: the defaults)"
)
STORE_SETTING = "DATABASE_URL (the score store)"


def _command(sub, name: str, summary: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose `--help` says what it does too, not only `leadscore --help`'s list."""
    return sub.add_parser(name, help=summary, description=summary, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leadscore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    setup = _command(sub, "setup", "create leadscore's CRM fields (idempotent)")
    setup.add_argument("crm", choices=["hubspot", "salesforce"], help="the CRM to create the fields in")
    setup.set_defaults(func=cmd_setup)

    project = _command(
        sub,
        "hubspot-project",
        "write the HubSpot project (app, scopes, webhook subscriptions) to upload with the HubSpot CLI",
    )
    project.add_argument(
        "--target-url", required=True, help="leadscore's public webhook: https://<host>/webhooks/hubspot"
    )
    project.add_argument(
        "--out", type=_not_under_a_file, required=True, help="a new directory for the project"
    )
    project.add_argument(
        "--with-engagement",
        action="store_true",
        help="also subscribe to the visit and page-view counters (an event at nearly every visit)",
    )
    project.add_argument(
        "--property",
        action="append",
        default=[],
        metavar="NAME",
        help="also rescore on a change of this contact property, e.g. a [custom] one a trained model reads",
    )
    project.set_defaults(func=cmd_hubspot_project)

    worker = _command(sub, "worker", "run an RQ worker for the scoring queue")
    worker.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    worker.set_defaults(func=cmd_worker)

    failed = _command(sub, "failed", "list jobs that failed for good, with the reason")
    failed.set_defaults(func=cmd_failed)

    requeue = _command(sub, "requeue", "run failed jobs again")
    requeue.add_argument(
        "job_ids", nargs="*", metavar="JOB_ID", help="a failed job's id, as `leadscore failed` lists it"
    )
    requeue.add_argument("--all", action="store_true", help="every job in the failed registry")
    requeue.set_defaults(func=cmd_requeue)

    rescore = _command(
        sub,
        "rescore",
        "queue every lead of an account to be scored as it is now: at go-live, and after the rules, "
        "the model or the holdout share change (workers write only the scores that change)",
    )
    rescore.add_argument("--crm", choices=["hubspot", "salesforce"], required=True, help="the CRM to read")
    rescore.add_argument(
        "--account",
        help="the HubSpot portal id / Salesforce org id (default: the one the credentials reach; another "
        "is refused)",
    )
    rescore.add_argument(
        "--force", action="store_true",
        help="score each lead even where the CRM shows a score for its inputs, writing those whose fields "
        "differ: after a deploy that wrote wrong ones (LLM answers come from the cache)",
    )  # fmt: skip
    rescore.set_defaults(func=cmd_rescore)

    forget = _command(
        sub, "forget", "erase what leadscore keeps of leads (scores, outcomes, feedback, LLM answers)"
    )
    forget.add_argument("--crm", choices=["hubspot", "salesforce"], required=True, help="the leads' CRM")
    forget.add_argument("--account", required=True, help="the HubSpot portal id / Salesforce org id")
    forget.add_argument("lead_ids", nargs="+", metavar="LEAD_ID", help="a contact / Lead id")
    forget.set_defaults(func=cmd_forget)

    history = _command(
        sub, "history", "every score kept of one lead: what made each, and what changed between them"
    )
    history.add_argument("--crm", choices=["hubspot", "salesforce"], required=True, help="the lead's CRM")
    history.add_argument("--account", required=True, help="the HubSpot portal id / Salesforce org id")
    history.add_argument("lead_id", metavar="LEAD_ID", help="a contact / Lead id")
    history.set_defaults(func=cmd_history)
    replay = _command(
        sub,
        "replay",
        "post fixture deliveries to a running service, signed as the CRM would "
        "(HubSpot .json arrays, Salesforce .xml Outbound Messages and .json change events)",
    )
    replay.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="a delivery to post (see fixtures/)"
    )
    replay.add_argument(
        "--url",
        help="the webhook to post to (default: http://127.0.0.1:$PORT/webhooks/hubspot, PORT from the "
        "environment or .env, else 5000)",
    )
    replay.add_argument(
        "--secret", help="signing secret (default: HUBSPOT_APP_SECRET or SALESFORCE_EVENTS_SECRET)"
    )
    replay.set_defaults(func=cmd_replay)

    emulate = _command(sub, "emulate", "run the local HubSpot emulator or LLM stub")
    emulate.add_argument(
        "service",
        choices=list(EMULATED),
        help="hubspot: the CRM v3 emulator; llm: the OpenAI-compatible stub",
    )
    ports = ", ".join(f"{port} for {service}" for service, (_, port, _, _) in EMULATED.items())
    tokens = ", ".join(f"{token} for {service}" for service, (_, _, token, _) in EMULATED.items())
    emulate.add_argument("--port", type=int, help=f"the port to listen on (default: {ports})")
    emulate.add_argument(
        "--fixtures", type=Path, help="the replies to serve (default: fixtures/hubspot or fixtures/llm)"
    )
    emulate.add_argument("--token", help=f"bearer token / API key it expects (default: {tokens})")
    emulate.add_argument(
        "--latency", type=float, default=0.0, help="seconds added to each reply (default: %(default)s)"
    )
    emulate.set_defaults(func=cmd_emulate)

    demo = _command(sub, "demo", "the whole pipeline on local emulators, or a real portal")
    demo.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="give up when scores take longer than this to arrive, in seconds (default: %(default)s)",
    )
    demo.set_defaults(func=cmd_demo)

    db = _command(sub, "db", "the score store: its schema (Alembic), and what it keeps")
    db.add_argument(
        "action",
        choices=["upgrade", "prune"],
        help="upgrade: apply the schema's migrations up to the latest; prune: delete what is older than "
        "--older-than",
    )
    db.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="prune: delete the scores and feedback kept more than this many days ago (1 or more)",
    )
    db.set_defaults(func=cmd_db)

    train = _command(
        sub, "train", "compare models by cross-validation, calibrate the best, save it",
        epilog=f"Reads from the environment or .env: {STORE_SETTING}, with --from-store.",
    )  # fmt: skip
    train.add_argument("--data", type=a_file, help="CSV of leads with an outcome column")
    train.add_argument("--label", help="the outcome column (default: the mapping's `label`)")
    train.add_argument(
        "--mapping",
        type=a_file,
        help="TOML mapping columns to lead fields (with --from-store: its [custom] part)",
    )
    train.add_argument("--from-store", action="store_true", help="train on the score store instead")
    _store_rows_arguments(train, "--from-store", "learn from")
    train.add_argument(
        "--tiers", type=tiers_argument, metavar="A,B,C",
        help="tier cut-offs, calibrated probability x 100 (default 80,50,20; lower for a low base rate)",
    )  # fmt: skip
    train.add_argument("--out", type=a_directory, required=True, help="directory for the model artifact")
    train.set_defaults(func=cmd_train)

    score_file = _command(
        sub, "score-file", "score every row of a CSV: id, score, tier, reason",
        epilog=f"Reads from the environment or .env: {CONFIG_SETTING}.",
    )  # fmt: skip
    score_file.add_argument("--data", type=a_file, required=True, help="CSV of leads to score")
    score_file.add_argument(
        "--mapping", type=a_file, required=True, help="TOML mapping the file's columns to lead fields"
    )
    score_file.add_argument(
        "--model", type=a_directory, help="a `train` artifact; without it, the rules alone"
    )
    score_file.add_argument("--out", type=a_file, required=True, help="the CSV to write")
    score_file.set_defaults(func=cmd_score_file)

    evaluate = _command(
        sub, "evaluate", "report how well each scorer ranks and calibrates",
        epilog=f"Reads from the environment or .env: {CONFIG_SETTING}; {STORE_SETTING}, with --with-store.",
    )  # fmt: skip
    evaluate.add_argument("--data", type=a_file, help="CSV of leads with an outcome column")
    evaluate.add_argument("--mapping", type=a_file, help="TOML mapping the file's columns to lead fields")
    evaluate.add_argument("--label", help="the outcome column (default: the mapping's `label`)")
    evaluate.add_argument(
        "--model", type=a_directory, action="append", default=[],
        help="a trained model directory; repeat to compare several (the report names each by its directory)",
    )  # fmt: skip
    evaluate.add_argument(
        "--with-store",
        action="store_true",
        help="add the live scores against captured outcomes, the holdout and rep feedback",
    )
    _store_rows_arguments(evaluate, "--with-store", "grade")
    evaluate.add_argument("--out", type=a_directory, required=True, help="directory: report.md, plots, JSON")
    evaluate.set_defaults(func=cmd_evaluate)

    outcomes = _command(sub, "outcomes", "outcomes kept in the score store")
    outcomes.add_argument("action", choices=["sync"], help="read outcomes from the CRM into the store")
    outcomes.add_argument("--crm", choices=["hubspot", "salesforce"], help="default: every configured CRM")
    outcomes.add_argument(
        "--account",
        help="with --crm: the HubSpot portal id / Salesforce org id the credentials reach (default: the one "
        "scored; another is refused)",
    )
    outcomes.set_defaults(func=cmd_outcomes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SettingsError, UsageError, CRMError, RateLimited) as exc:  # RateLimited: an org's API limit
        print(f"leadscore: {_said(exc)}", file=sys.stderr)
        return 2
    except unreachable() as exc:  # evaluated only when an error reaches it, so imported only then
        print(f"leadscore: {_said(exc)}", file=sys.stderr)
        return 2
    except _store_unavailable() as exc:
        if exc.statement is not None:  # connected, and a statement failed: not the operator's to fix
            raise
        from workers.store import redacted

        why = str(exc.orig).splitlines()[0]
        url = redacted(get_settings().database_url)
        print(f"leadscore: cannot open the score store at {url} ({why}): start it, or fix DATABASE_URL",
              file=sys.stderr)  # fmt: skip
        return 2
    except (UserError, OSError) as exc:
        if isinstance(exc, OSError) and args.command not in FILE_COMMANDS:
            raise
        said = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else exc
        print(f"leadscore {args.command}: {said}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
