"""The score store: the Alembic schema is the models' schema, and facts are kept once."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, event, inspect, make_url, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from integration.cli import main
from integration.emulators import start_pgbouncer, start_postgres
from integration.settings import get_settings
from tests.conftest import _empty_database
from workers import jobs, outcomes, store
from workers.config import load_config
from workers.history import history_lines
from workers.store import Feedback, LeadFact, ScoreRecord, Store, StoreNotReady
from workers.store_data import (
    LAST,
    histories,
    labelled_scores,
    live_scorers,
    store_summary,
    training_rows,
)
from workers.tabular import TableError


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_platforms_postgres_url_reaches_the_store_through_psycopg_3(store_url, monkeypatch, capsys):
    assert store_url.startswith("postgresql+psycopg://")
    platform_form = "postgres://" + store_url.removeprefix("postgresql+psycopg://")  # as Heroku hands it out
    monkeypatch.setenv("DATABASE_URL", platform_form)
    get_settings.cache_clear()
    try:
        assert main(["db", "upgrade"]) == 0
        assert get_settings().database_url == store_url
    finally:
        get_settings.cache_clear()
    assert "is at head: {'scores': 0" in capsys.readouterr().out


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite hands back naive UTC


def test_migrations_build_exactly_the_tables_the_code_uses(store_url):
    url = store_url
    store.upgrade(url)
    store.upgrade(url)  # idempotent
    engine = Store(url).engine
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), store.metadata) == []
    command.downgrade(store.alembic_config(url), "base")  # and down again
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}


def test_taking_a_sqlite_store_back_a_revision_keeps_its_scores_ids_increasing(tmp_path):
    """SQLite rebuilds a table to drop a column; rebuilt from reflection, `scores` lost AUTOINCREMENT,
    so a deleted newest row's id could come back, and first and last scores are read by id."""
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    store.upgrade(url)
    command.downgrade(store.alembic_config(url), "0003_scores_account_time")

    with Store(url).engine.connect() as connection:
        created = connection.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'scores'").scalar()
    assert "AUTOINCREMENT" in created and "merged_from" not in created


def test_workers_starting_together_on_an_empty_store_all_find_it_migrated(store_url):
    """Each `leadscore worker` upgrades the store at start; started together (honcho, systemd, two
    dynos) the first migrates and the others wait for it, instead of failing on its tables."""
    upgrade = f"from workers import store; store.upgrade({store_url!r})"
    workers = [subprocess.Popen([sys.executable, "-c", upgrade], stderr=subprocess.PIPE) for _ in range(6)]
    errors = [worker.communicate(timeout=120)[1].decode() for worker in workers]

    assert [worker.returncode for worker in workers] == [0] * 6, "\n".join(errors)
    assert Store(store_url).require_schema() is not None


def _open_together(url: str, barrier, modes) -> None:
    barrier.wait()
    try:
        with store.engine_for(url).connect() as connection:
            modes.put(connection.exec_driver_sql("PRAGMA journal_mode").scalar())
    except OperationalError as error:
        modes.put(str(error.orig))


def test_connections_opening_a_new_sqlite_file_together_all_switch_it_to_wal(tmp_path):
    """Six connections switching a new file to WAL at once: SQLite refuses some as locked without
    waiting its busy timeout (about one round in six here; a CI run failed on it), so each tries again."""
    fork = multiprocessing.get_context("fork")
    for attempt in range(40):
        url = f"sqlite:///{tmp_path / f'store{attempt}.sqlite3'}"
        barrier, modes = fork.Barrier(6), fork.Queue()
        opening = [fork.Process(target=_open_together, args=(url, barrier, modes)) for _ in range(6)]
        for process in opening:
            process.start()
        for process in opening:
            process.join(timeout=60)

        assert [modes.get(timeout=5) for _ in opening] == ["wal"] * 6, f"attempt {attempt}"


def test_outcomes_are_kept_once_per_lead_and_kind(store_url):
    url = store_url
    store.upgrade(url)
    kept = Store(url)
    facts = [
        LeadFact("hubspot", "48213377", "1", "customer"),
        LeadFact("hubspot", "48213377", "2", "opportunity"),
    ]

    assert kept.record_outcomes(facts, "webhook") == 2
    assert kept.record_outcomes([*facts, LeadFact("hubspot", "48213377", "1", "opportunity")], "sync") == 1
    assert kept.record_outcomes(facts, "sync") == 0  # a racing sync or worker: inserted once, no error
    assert kept.counts()["outcomes"] == 3


def test_an_outcome_is_dated_when_the_crm_says_the_lead_reached_it(store_url):
    url = store_url
    store.upgrade(url)
    kept = Store(url)
    converted = datetime(2026, 10, 30, 10, 5, 17, tzinfo=UTC)
    kept.record_outcomes([LeadFact("hubspot", "48213377", "1", "customer", converted)], "sync")
    kept.record_outcomes([LeadFact("hubspot", "48213377", "2", "customer", datetime(2099, 1, 1, tzinfo=UTC))],
                         "sync")  # fmt: skip

    with kept.engine.connect() as connection:
        rows = connection.execute(select(store.outcomes.c.reached_at, store.outcomes.c.recorded_at)).all()
    (first, first_recorded), (clock_ahead, recorded) = [[_utc(m) for m in r] for r in rows]
    assert first == converted and first_recorded > converted
    assert clock_ahead == recorded  # a CRM date in the future is not believed: it is when we saw it


def test_merging_leads_keeps_one_outcome_a_kind_at_its_earliest_date_and_moves_the_rest(store_url):
    store.upgrade(store_url)
    kept = Store(store_url)
    early, middle, late = (datetime(2026, month, 1, tzinfo=UTC) for month in (3, 6, 9))
    kept.record_outcomes([LeadFact("hubspot", "48213377", "9", "customer", late),
                          LeadFact("hubspot", "48213377", "1", "customer", middle),
                          LeadFact("hubspot", "48213377", "2", "customer", early),
                          LeadFact("hubspot", "48213377", "2", "opportunity", late),
                          LeadFact("hubspot", "48213377", "3", "won", early),
                          LeadFact("hubspot", "99999999", "1", "won", early)], "webhook")  # fmt: skip
    kept.record_scores([_score("1", early, "lead"), _score("9", late, "customer")])
    kept.record_feedback([Feedback("hubspot", "48213377", "2", "too_low", 40, "C")])

    assert kept.merge_leads("hubspot", "48213377", {"9": ("1", "2", "9")}) == 5
    assert kept.merge_leads("hubspot", "48213377", {"9": ("1", "2")}) == 0  # read again: nothing left

    with kept.engine.connect() as connection:
        o = store.outcomes.c
        rows = connection.execute(
            select(o.account_id, o.lead_id, o.kind, o.reached_at).order_by(o.account_id, o.lead_id, o.kind)
        ).all()
        moved = [
            connection.execute(select(t.c.lead_id, t.c.merged_from).order_by(t.c.id)).all()
            for t in (store.scores, store.feedback)
        ]
    assert [(account, lead, kind, _utc(at)) for account, lead, kind, at in rows] == [
        ("48213377", "3", "won", early),  # not merged: untouched
        ("48213377", "9", "customer", early),  # the earliest of three
        ("48213377", "9", "opportunity", late),
        ("99999999", "1", "won", early),  # another portal's lead 1: untouched
    ]
    assert moved == [[("9", "1"), ("9", None)], [("9", "2")]]  # each says the lead it was kept of
    history = history_lines(kept.lead_history("hubspot", "48213377", "9"))
    assert [line for line in history if "merged" in line] == [
        "2026-03-01 00:00:00 UTC  score 50 B  rules+llm , rules None (file not kept); "
        "kept of lead 1, merged into this one",
        f"{history[-1][:23]}  feedback too_low on 40 C; on lead 2, merged into this one",
    ]


def test_merging_follows_a_chain_to_the_last_survivor_and_keys_salesforce_ids_as_the_store_does(store_url):
    store.upgrade(store_url)
    kept = Store(store_url)
    at = datetime(2026, 3, 1, tzinfo=UTC)
    salesforce = replace(
        _score("00Q5g00000Ls002EAB", at, "lead", crm="salesforce"), account_id="00D5g000004XyZa"
    )
    kept.record_scores([_score("A", at, "lead"), salesforce])

    assert kept.merge_leads("hubspot", "48213377", {"C": ("A",), "B": ("C",)}) == 1
    # ids as a CRM may spell them: the org by 18 characters, the survivor by 15, the merged lead by 18
    merged = {"00Q5g00000Ls001": ("00Q5g00000Ls002EAB", "00Q5g00000Ls001EAB")}  # itself, as the CRM spells it
    assert kept.merge_leads("salesforce", "00D5g000004XyZaEAK", merged) == 1
    assert kept.merge_leads("salesforce", "00D5g000004XyZaEAK", merged) == 0  # nothing moves onto itself

    with kept.engine.connect() as connection:
        leads = connection.execute(
            select(store.scores.c.crm, store.scores.c.lead_id, store.scores.c.merged_from)
        ).all()
    assert sorted(leads) == [
        ("hubspot", "B", "A"),
        ("salesforce", "00Q5g00000Ls001EAB", "00Q5g00000Ls002EAB"),
    ]


def test_feedback_is_kept_when_it_changes_with_the_score_the_rep_saw(store_url):
    url = store_url
    store.upgrade(url)
    kept = Store(url)
    lead = ("hubspot", "48213377", "7")

    assert kept.record_feedback([Feedback(*lead, "too_high", 91, "A")]) == 1
    assert kept.record_feedback([Feedback(*lead, "too_high", 91, "A")]) == 0  # said again: nothing new
    assert kept.record_feedback([Feedback(*lead, "very_wrong", 91, "A")]) == 0  # not a feedback value
    assert kept.record_feedback([Feedback(*lead, "right", 60, "B")]) == 1

    with kept.engine.connect() as connection:
        rows = connection.execute(
            select(store.feedback.c.value, store.feedback.c.score, store.feedback.c.tier).order_by(
                store.feedback.c.id
            )
        ).all()
    assert [tuple(r) for r in rows] == [("too_high", 91, "A"), ("right", 60, "B")]


def test_feedback_cleared_and_said_again_of_a_new_score_counts_again(store_url):
    store.upgrade(store_url)
    kept = Store(store_url)
    lead, never, withdrawn = (("hubspot", "48213377", n) for n in ("7", "8", "10"))
    kept.record_scores([_score(n, datetime.now(UTC), "lead") for n in ("7", "10")])

    assert kept.record_feedback([Feedback(*lead, "too_high", 85, "A", "f1"), Feedback(*never, None)]) == 1
    assert kept.record_feedback([Feedback(*lead, None, 60, "B", "f2")]) == 1  # emptied once rescored
    assert kept.record_feedback([Feedback(*lead, None, 60, "B", "f2")]) == 0  # still empty
    assert kept.record_feedback([Feedback(*lead, "too_high", 60, "B", "f2")]) == 1  # of the new score
    assert kept.record_feedback([Feedback("hubspot", "48213377", "9", "right")]) == 1  # before any score
    kept.record_feedback([Feedback(*withdrawn, "too_low", 40, "C", "f3")])
    kept.record_feedback([Feedback(*withdrawn, None, 40, "C", "f3")])  # taken back, the same score shown

    assert store_summary(kept)["feedback"] == {
        "(not scored yet)": {"right": 1}, "A": {"too_high": 1}, "B": {"too_high": 1}
    }  # fmt: skip


def _plan_of_each_select(kept: Store, action) -> list[str]:
    """The query plan SQLite chose for each SELECT `action` ran."""
    selects = []
    event.listen(kept.engine, "before_cursor_execute",
                 lambda conn, cursor, sql, params, context, many: selects.append((sql, params))
                 if sql.lstrip().upper().startswith("SELECT") else None)  # fmt: skip
    action()
    with kept.engine.connect() as connection:
        return [
            " / ".join(row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
            for sql, params in selects
        ]


def test_the_report_counts_feedback_by_the_score_the_rep_saw_whatever_its_inputs(tmp_path):
    """A rep who takes back "too high" on the same 80 A after its inputs changed takes it back; a
    clear where the same inputs show another score (here a held-out blank) takes nothing back."""
    url = f"sqlite:///{tmp_path}/store.sqlite3"
    store.upgrade(url)
    kept = Store(url)
    said = [Feedback("hubspot", "1", "7", "too_high", score=80, tier="A", fingerprint="F1"),
            Feedback("hubspot", "1", "7", None, score=80, tier="A", fingerprint="F2"),  # same score seen
            Feedback("hubspot", "1", "8", "too_low", score=30, tier="D", fingerprint="F3"),
            Feedback("hubspot", "1", "8", None, score=None, tier=None, fingerprint="F3")]  # fmt: skip
    for fact in said:
        kept.record_feedback([fact])

    assert store_summary(kept)["feedback"] == {"D": {"too_low": 1}}


def test_a_batchs_feedback_lookup_is_an_index_search_not_a_table_scan(tmp_path):
    """Every worker batch asks what reps said last about its leads: over a year's feedback, a scan
    per batch would grow with the table."""
    url = f"sqlite:///{tmp_path}/store.sqlite3"
    store.upgrade(url)
    kept = Store(url)
    feedback = [Feedback("hubspot", "48213377", lead, "right") for lead in ("7", "8")]

    [plan] = _plan_of_each_select(kept, lambda: kept.record_feedback(feedback))

    assert "SEARCH feedback USING INDEX ix_feedback_lead" in plan, plan


def test_outcomes_sync_finds_an_accounts_first_score_by_index_not_by_reading_its_scores(tmp_path):
    """`outcomes sync` reads the CRM from the day before an account's first score: over a year's
    scores, reading them all for it took seconds an account."""
    url = f"sqlite:///{tmp_path}/store.sqlite3"
    store.upgrade(url)
    kept = Store(url)
    kept.record_scores([ScoreRecord("hubspot", "48213377", "7", 50, "C", "r", "rules", "f", {}, {})])

    [plan] = _plan_of_each_select(kept, lambda: outcomes._changed_since(kept, "hubspot", "48213377"))

    assert plan == "SEARCH scores USING COVERING INDEX ix_scores_account_time (crm=? AND account_id=?)"


def test_the_holdout_comparison_leaves_out_leads_scored_before_the_holdout_began(store_url):
    """HOLDOUT_SHARE switched on after leadscore had run: the older leads, which had longer to
    convert, have no held-out peers, and counting them would make the score look like it helped."""
    store.upgrade(store_url)
    kept = Store(store_url)
    now = datetime.now(UTC)
    before, since = now - timedelta(days=200), now - timedelta(days=60)
    early = [_score(str(n), before, "lead") for n in range(6)]  # half of them converted
    held = [replace(_score(f"h{n}", since + timedelta(days=n), "lead"), holdout=True) for n in range(2)]
    shown = [_score(f"s{n}", since, "lead") for n in range(2)]
    kept.record_scores([*early, *held, *shown])
    kept.record_outcomes(
        [LeadFact("hubspot", "48213377", lead, "customer", now - timedelta(days=30)) for lead in
         ("0", "1", "2", "h0", "s0")], "sync",
    )  # fmt: skip

    summary = store_summary(kept, min_age_days=30)

    assert summary["holdout"]["scored"] == {
        "leads": 2, "converted": 1, "waiting": 0, "converted_before": 0, "outside_holdout": 6, "rate": 0.5
    }  # fmt: skip
    assert summary["holdout"]["holdout"]["rate"] == 0.5 and summary["shown_minus_holdout"]["points"] == 0.0


def test_a_large_sync_keeps_outcomes_a_thousand_rows_a_statement_and_counts_only_the_new(store_url):
    store.upgrade(store_url)
    kept = Store(store_url)
    facts = [LeadFact("hubspot", "48213377", str(n), "customer") for n in range(2500)]
    assert kept.record_outcomes(facts[:500], "webhook") == 500
    inserts = []
    event.listen(kept.engine, "before_cursor_execute",
                 lambda conn, cursor, sql, params, context, many: inserts.append(sql)
                 if sql.lstrip().upper().startswith("INSERT") else None)  # fmt: skip

    assert kept.record_outcomes(facts, "sync") == 2000  # the 500 already kept are not new

    assert len(inserts) == 3 and kept.counts()["outcomes"] == 2500


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_worker_keeping_outcomes_during_a_sync_of_the_same_leads_is_not_deadlocked(store_url):
    """A nightly `outcomes sync` keeps 1,500 outcomes while a batch keeps two of the same leads. Each
    once locked its rows in its own order; PostgreSQL aborted one of them as a deadlock."""
    store.upgrade(store_url)
    sync, worker = Store(store_url), Store(store_url)
    synced = [LeadFact("hubspot", "48213377", f"L{n}", "customer") for n in range(1500)]
    batch = [LeadFact("hubspot", "48213377", lead, "customer") for lead in ("L1200", "L5")]
    worker_waits, results = threading.Event(), {}

    def keep(name: str, kept: Store, facts: list[LeadFact]) -> None:
        try:
            results[name] = kept.record_outcomes(facts, name)
        except Exception as exc:  # noqa: BLE001 (what the assertion shows)
            results[name] = type(exc).__name__

    def before_the_second_chunk(conn, cursor, sql, params, context, many):
        if sql.startswith("INSERT INTO outcomes") and not worker_waits.is_set():
            worker_waits.set()
            return
        if sql.startswith("INSERT INTO outcomes"):
            time.sleep(0.5)  # the batch keeps its two leads meanwhile

    def batch_after_the_first_chunk():
        worker_waits.wait(10)
        time.sleep(0.1)
        keep("webhook", worker, batch)

    event.listen(sync.engine, "before_cursor_execute", before_the_second_chunk)
    threads = [threading.Thread(target=keep, args=("sync", sync, synced)),
               threading.Thread(target=batch_after_the_first_chunk)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert all(isinstance(new, int) for new in results.values()) and len(results) == 2, results
    assert sum(results.values()) == sync.counts()["outcomes"] == 1500  # each kept once, by one or the other


def test_a_postgresql_store_that_never_answers_costs_a_batch_seconds_not_minutes():
    """A host that takes the connection and says nothing (a hung server, a half-open proxy): the
    store is the worker's side job, so its connection gives up after CONNECT_TIMEOUT_S."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the handshake completes in the backlog; nothing ever answers
        url = f"postgresql+psycopg://leadscore@127.0.0.1:{silent.getsockname()[1]}/leadscore"
        failed = []

        def connect() -> None:
            try:
                store.engine_for(url).connect()
            except OperationalError as exc:
                failed.append(str(exc))

        attempt = threading.Thread(target=connect, daemon=True)
        attempt.start()
        attempt.join(store.CONNECT_TIMEOUT_S + 10)  # without the timeout it waits as long as the socket
    assert failed and "timeout" in failed[0]


def test_an_outcome_reported_again_with_an_earlier_date_moves_back_to_it(store_url):
    store.upgrade(store_url)
    kept = Store(store_url)
    lead = ("hubspot", "48213377", "1")
    converted = datetime(2026, 10, 30, 10, 5, 17, tzinfo=UTC)

    assert kept.record_outcomes([LeadFact(*lead, "customer")], "webhook") == 1  # undated: now
    assert kept.record_outcomes([LeadFact(*lead, "customer", converted)], "sync") == 0  # the CRM's date
    assert kept.record_outcomes([LeadFact(*lead, "customer", converted + timedelta(days=1))], "sync") == 0

    with kept.engine.connect() as connection:
        [reached] = connection.execute(select(store.outcomes.c.reached_at)).scalars()
    assert _utc(reached) == converted


def _score(lead: str, at: datetime, stage: str, scorer: str = "rules+llm", version: str | None = None,
           crm: str = "hubspot", status: str | None = None, score: int = 50):  # fmt: skip
    features = {"stage": stage, **({"status": status} if status else {})}
    return ScoreRecord(crm=crm, account_id="48213377", lead_id=lead, score=score, tier="B", reason="r",
                       scorer=scorer, model_version=version, fingerprint=f"{lead}{at}",
                       features=features, details={}, scored_at=at)  # fmt: skip


def test_moments_read_from_a_postgresql_in_another_time_zone_are_given_in_utc(store_url):
    """initdb gives a self-hosted server the host's zone; `outcomes sync` prints "since … UTC" and a
    model's training window is written from these."""
    if store_url.startswith("postgresql"):
        engine = create_engine(store_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            database = connection.execute(text("SELECT current_database()")).scalar()
            connection.execute(text(f"ALTER DATABASE \"{database}\" SET timezone TO 'America/New_York'"))
        engine.dispose()
    store.upgrade(store_url)
    kept = Store(store_url)
    noon = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    kept.record_scores([_score("1", noon, "lead")])

    [history] = histories(kept, features=False)
    assert history.first["scored_at"] == noon and history.first["scored_at"].utcoffset() == timedelta(0)
    assert history.first["scored_at"].isoformat() == "2026-11-20T12:00:00+00:00"


def test_upgrading_a_store_dates_its_webhook_outcomes_before_the_score_that_saw_them(store_url):
    store.upgrade(store_url, "0001_store")
    kept = Store(store_url)
    now = datetime.now(UTC)
    saw_it = now - timedelta(days=40)
    kept.record_scores([_score("1", now - timedelta(days=45), "lead"), _score("1", saw_it, "customer"),
                        _score("2", now - timedelta(days=45), "lead"),
                        _score("3", now - timedelta(days=45), "opportunity"),  # its deal is won later
                        _score("00Q4", now - timedelta(days=45), "Working", crm="salesforce")])  # fmt: skip
    with kept.engine.begin() as connection:  # as the previous release kept them: after the batch's score
        for crm, lead, kind in [("hubspot", "1", "customer"), ("hubspot", "3", "won"),
                                ("salesforce", "00Q4", "converted")]:  # fmt: skip
            connection.execute(
                text("INSERT INTO outcomes (crm, account_id, lead_id, kind, source, recorded_at) "
                     "VALUES (:crm, '48213377', :lead, :kind, 'webhook', :at)"),
                {"crm": crm, "lead": lead, "kind": kind, "at": saw_it + timedelta(milliseconds=3)},
            )  # fmt: skip
    with pytest.raises(StoreNotReady, match="is at schema revision 0001_store, this leadscore needs 0004"):
        kept.require_schema()

    store.upgrade(store_url)

    rows = training_rows(kept.require_schema(), min_age_days=30, snapshot=LAST)
    # The converted lead is learned from its score before it was a customer, not the one that saw it;
    # the won deal's contact and the converted Salesforce Lead, which no score saw, from their last.
    assert sorted(zip(rows.labels.tolist(), rows.frame["stage"], strict=True)) == [
        (0, "lead"), (1, "lead"), (1, "opportunity"), (1, "working")
    ]  # fmt: skip
    assert sorted(rows.leads) == ["00Q4", "1", "2", "3"]  # as a CRM export names them: evaluate matches


def test_with_the_last_snapshot_each_lead_is_judged_by_its_score_at_conversion_or_at_its_windows_end(
    store_url,
):
    store.upgrade(store_url)
    kept = Store(store_url)
    now = datetime.now(UTC)
    kept.record_scores([
        _score("1", now - timedelta(days=60), "lead"),  # shown while it could have converted
        _score("1", now - timedelta(days=1), "lead", "model", "m2"),  # rescored long after
        _score("2", now - timedelta(days=50), "lead", version="gpt-4o-mini"),
        _score("3", now, "lead"),  # converts at once, but its non-converting peers are not judged yet
        _score("4", now - timedelta(days=40), "lead"),
        _score("4", now - timedelta(days=5), "opportunity", "model", "m2"),  # converts after its 30 days
        _score("5", now - timedelta(days=40), "lead"),
        _score("5", now - timedelta(days=37), "opportunity", "model", "m2"),  # converts within it
    ])  # fmt: skip
    kept.record_outcomes(
        [LeadFact("hubspot", "48213377", "3", "customer", now + timedelta(seconds=1)),
         LeadFact("hubspot", "48213377", "4", "customer", now - timedelta(days=2)),
         LeadFact("hubspot", "48213377", "5", "customer", now - timedelta(days=36))], "sync",
    )  # fmt: skip

    judged = {row["lead_id"]: (row["scorer"], label) for row, label, _ in labelled_scores(kept, 30, LAST)}
    assert judged == {"1": ("rules+llm", 0), "2": ("rules+llm", 0), "4": ("rules+llm", 0), "5": ("model", 1)}
    assert list(live_scorers(kept, 30, load_config().tiers, LAST)[0]) == [
        "live m2",
        "live rules+llm",
        "live rules+llm gpt-4o-mini",
    ]


def _first_scored_new_then_worked_by_reps(kept: Store) -> None:
    """Two leads first scored as NEW: one that reps later closed out as UNQUALIFIED, one that they
    moved on to a deal and that converted; a lead too young to judge; a customer before its score."""
    now = datetime.now(UTC)
    kept.record_scores([
        _score("1", now - timedelta(days=60), "lead", status="NEW", score=70),
        _score("1", now - timedelta(days=50), "lead", status="UNQUALIFIED", score=10),
        _score("2", now - timedelta(days=60), "lead", status="NEW", score=40),
        _score("2", now - timedelta(days=45), "salesqualifiedlead", status="OPEN_DEAL", score=90),
        _score("3", now - timedelta(days=10), "lead", status="NEW"),
        _score("4", now - timedelta(days=60), "customer", status="NEW"),
    ])  # fmt: skip
    kept.record_outcomes(
        [LeadFact("hubspot", "48213377", "2", "customer", now - timedelta(days=40)),
         LeadFact("hubspot", "48213377", "4", "customer", now - timedelta(days=61))], "sync",
    )  # fmt: skip


def test_a_lead_is_learned_from_and_graded_on_its_first_score_not_on_what_reps_made_of_it(store_url):
    store.upgrade(store_url)
    kept = Store(store_url)
    _first_scored_new_then_worked_by_reps(kept)

    rows = training_rows(kept, min_age_days=30)
    assert (rows.leads, rows.labels.tolist()) == (["1", "2"], [0, 1])
    assert rows.frame[["status", "stage"]].values.tolist() == [["new", "lead"], ["new", "lead"]]
    assert rows.window["snapshot"] == "first"
    [(labels, scores, tiers, scale)] = live_scorers(kept, 30, load_config().tiers)[0].values()
    assert (labels.tolist(), scores.tolist()) == ([0, 1], [0.7, 0.4])  # the rules ranked them wrong


def test_the_last_snapshot_keeps_the_former_rows_that_show_what_reps_made_of_each_lead(store_url):
    store.upgrade(store_url)
    kept = Store(store_url)
    _first_scored_new_then_worked_by_reps(kept)

    rows = training_rows(kept, min_age_days=30, snapshot=LAST)
    assert (rows.leads, rows.labels.tolist()) == (["1", "2"], [0, 1])
    assert rows.frame[["status", "stage"]].values.tolist() == [
        ["unqualified", "lead"], ["open_deal", "salesqualifiedlead"]
    ]  # fmt: skip
    assert rows.window["snapshot"] == "last"
    [(labels, scores, tiers, scale)] = live_scorers(kept, 30, load_config().tiers, LAST)[0].values()
    assert (labels.tolist(), scores.tolist()) == ([0, 1], [0.1, 0.9])  # a perfect ranking, in hindsight


def test_a_lead_is_converted_only_if_it_converted_within_min_age_days_of_its_first_score(store_url):
    """One horizon for every lead: a lead scored a year ago has had no longer to convert than one
    scored last month."""
    store.upgrade(store_url)
    kept = Store(store_url)
    now = datetime.now(UTC)
    first_scored_and_converted = {"1": (60, 50), "2": (60, 20), "3": (45, 15), "4": (40, None), "5": (10, 5)}
    kept.record_scores(_score(lead, now - timedelta(days=first), "lead")
                       for lead, (first, _) in first_scored_and_converted.items())  # fmt: skip
    kept.record_outcomes(
        [LeadFact("hubspot", "48213377", lead, "customer", now - timedelta(days=converted))
         for lead, (_, converted) in first_scored_and_converted.items() if converted is not None], "sync",
    )  # fmt: skip

    rows = training_rows(kept, min_age_days=30)
    # 10 days after its first score, 40 (too late), 30 (just in time), none; lead 5 is too young
    assert (rows.leads, rows.labels.tolist()) == (["1", "2", "3", "4"], [1, 0, 1, 0])
    timing = {"conversions": 3, "after_horizon": 1, "median_days": 30.0, "p80_days": 36.0}
    assert rows.window["time_to_convert"] == timing
    assert live_scorers(kept, 30, load_config().tiers)[2] == timing
    assert training_rows(kept, 30, snapshot=LAST).labels.tolist() == [1, 0, 1, 0]

    no_horizon = training_rows(kept, min_age_days=0)  # every lead, and any conversion so far
    assert (no_horizon.leads, no_horizon.labels.tolist()) == (["1", "2", "3", "4", "5"], [1, 1, 1, 0, 1])
    assert no_horizon.window["time_to_convert"] == {
        "conversions": 4, "after_horizon": 0, "median_days": 20.0, "p80_days": 34.0
    }  # fmt: skip

    with pytest.raises(TableError) as refused:
        training_rows(kept, min_age_days=4)
    assert str(refused.value) == (
        "every labelled lead in the store has outcome 0 (4 conversions, 4 of them over 4 days after their "
        "first score, counted as not converted; first score to conversion: median 20 days, 80th percentile "
        "34 days): a model needs both"
    )


def test_workers_of_the_previous_release_still_keep_outcomes_after_the_upgrade(store_url):
    store.upgrade(store_url)  # the release step runs while the old workers still write
    kept = Store(store_url)
    with kept.engine.begin() as connection:
        connection.execute(
            text("INSERT INTO outcomes (crm, account_id, lead_id, kind, source, recorded_at) "
                 "VALUES ('hubspot', '48213377', '1', 'customer', 'webhook', :at)"),
            {"at": datetime.now(UTC)},
        )  # fmt: skip
        [reached] = connection.execute(select(store.outcomes.c.reached_at)).scalars()
    assert reached is not None


@pytest.fixture
def postgres_url(request, tmp_path):
    return _empty_database("postgresql", request, tmp_path)


def test_a_workers_postgresql_statements_and_lock_waits_are_bounded_and_named(postgres_url):
    """A stopped backend or a lock held by a migration would hold a batch its 10 minutes."""
    for worker, timeouts, name in (
        (True, ("30s", "10s"), "leadscore-worker"),
        (False, ("0", "0"), "leadscore"),
    ):
        with Store(postgres_url, worker=worker).engine.connect() as connection:
            shown = [connection.execute(text(f"SHOW {setting}")).scalar()
                     for setting in ("statement_timeout", "lock_timeout", "application_name")]  # fmt: skip
        assert shown == [*timeouts, name]


def test_a_worker_keeps_its_scores_through_pgbouncer_in_transaction_mode_with_its_bounds(postgres_url):
    """The README suggests PgBouncer in front of a managed PostgreSQL: it refuses startup options and
    hands each transaction any server connection, so the bounds are set per transaction."""
    store.upgrade(postgres_url)
    with ExitStack() as stack:
        through = start_pgbouncer(stack, postgres_url)
        workers = [Store(through, worker=True) for _ in range(3)]  # sharing PgBouncer's server connections
        for batch in range(8):  # past psycopg's prepare threshold (5), were statements prepared
            for n, kept in enumerate(workers):
                kept.record_scores([_score(f"{n}-{batch}-{i}", datetime.now(UTC), "lead") for i in range(10)])
        with workers[0].engine.begin() as connection:
            bounds = [
                connection.execute(text(f"SHOW {name}")).scalar()
                for name in ("statement_timeout", "lock_timeout")
            ]
        assert workers[0].counts()["scores"] == 240 and bounds == ["30s", "10s"]
        for kept in workers:
            kept.engine.dispose()


def test_a_store_step_whose_connection_is_lost_midway_is_kept_once_on_a_new_one(postgres_url):
    """A reset mid-transaction rolls the step back whole; it is tried again, not lost."""
    store.upgrade(postgres_url)
    kept = Store(postgres_url, worker=True)
    resets = []

    @event.listens_for(kept.engine, "before_cursor_execute")
    def _reset_the_first_insert(connection, cursor, statement, *_):
        if statement.startswith("INSERT INTO scores") and not resets:
            resets.append(cursor.connection.info.backend_pid)
            with create_engine(postgres_url).connect() as other:  # as a failover ends the session
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": resets[0]})

    jobs._again_on_a_lost_connection(
        "scores", lambda: kept.record_scores([_score("1", datetime.now(UTC), "lead")]), iter([0.1]), FAR
    )

    assert len(resets) == 1 and kept.counts()["scores"] == 1
    with pytest.raises(IntegrityError):  # a refusal is not a lost connection: not tried again
        jobs._again_on_a_lost_connection("feedback", lambda: _insert_twice(kept), iter([0.1]), FAR)


def test_a_store_step_is_kept_once_the_server_is_back_from_a_failover_and_a_store_down_costs_20_s(
    tmp_path, caplog
):
    """The server goes away mid-transaction and comes back 2.5 s later, as a managed PostgreSQL's
    failover does: the connection can be made again within the batch's pauses. One that stays down
    gives up after them, and the batch's later steps are not tried."""
    with ExitStack() as stack:
        url = start_postgres(stack)
        store.upgrade(url)
        kept = Store(url, worker=True)
        with kept.engine.connect() as connection:
            data = connection.execute(text("SHOW data_directory")).scalar()
        pg_ctl = [*(["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []),
                  str(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]), "-D", data]  # fmt: skip
        options = f"-p {make_url(url).port} -c listen_addresses=127.0.0.1 -k {Path(data).parent} -F"
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        failovers = []

        @event.listens_for(kept.engine, "before_cursor_execute")
        def _failover(connection, cursor, statement, *_):
            if statement.startswith("INSERT INTO scores") and not failovers:
                failovers.append(1)
                subprocess.run([*pg_ctl, "-m", "immediate", "stop"], **quiet, check=True)
                threading.Timer(2.5, subprocess.run, [[*pg_ctl, "-w", "start", "-o", options]], quiet).start()

        jobs._again_on_a_lost_connection(
            "scores",
            lambda: kept.record_scores([_score("1", datetime.now(UTC), "lead")]),
            iter([1.0, 4.0]),
            FAR,
        )
        assert failovers and kept.counts()["scores"] == 1

        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], **quiet, check=True)
        started = time.monotonic()
        with pytest.raises(jobs.StoreDown):
            jobs._again_on_a_lost_connection("scores", lambda: kept.counts(), iter([0.2, 0.2]), FAR)
        assert time.monotonic() - started < 5


def test_a_store_that_hangs_is_given_up_on_at_the_batchs_deadline_connect_timeouts_counted(monkeypatch):
    """A host that accepts and never answers (a failover's old primary, black-holed) costs each try its
    connect timeout: the deadline, not the count of pauses, bounds the batch's wait."""
    monkeypatch.setattr(store, "CONNECT_TIMEOUT_S", 2)  # libpq's least
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        kept = Store(f"postgresql+psycopg://postgres@127.0.0.1:{hung.getsockname()[1]}/x", worker=True)
        started = time.monotonic()
        with pytest.raises(jobs.StoreDown):
            jobs._again_on_a_lost_connection("scores", kept.counts, iter([0.5] * 10), started + 5)
        assert 4 <= time.monotonic() - started < 6  # two tries of 2 s and a pause, not ten


def test_a_store_step_whose_connection_is_lost_at_its_commit_is_not_run_again(postgres_url):
    """The commit may have reached the server before the connection went: run again, its scores could
    be kept twice."""
    store.upgrade(postgres_url)
    kept = Store(postgres_url, worker=True)
    runs = []

    @event.listens_for(kept.engine, "commit")
    def _lost_at_commit(connection):
        pid = connection.connection.dbapi_connection.info.backend_pid
        with create_engine(postgres_url).connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    def step():
        runs.append(1)
        kept.record_scores([_score("1", datetime.now(UTC), "lead")])

    with pytest.raises(OperationalError):
        jobs._again_on_a_lost_connection("scores", step, iter([0.1]), FAR)
    assert len(runs) == 1


FAR = float("inf")  # a deadline that never comes


def _insert_twice(kept: Store) -> None:
    with kept.engine.begin() as connection:
        connection.execute(text("CREATE TABLE IF NOT EXISTS once (n int PRIMARY KEY)"))
        connection.execute(text("INSERT INTO once VALUES (1), (1)"))


def test_a_store_error_names_the_statement_but_not_the_leads_values(tmp_path):
    """Store errors are logged; the parameters SQLAlchemy would print hold reasons and evidence."""
    engine = store.engine_for(f"sqlite:///{tmp_path}/errors.sqlite3")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (reason TEXT NOT NULL UNIQUE)"))
        connection.execute(text("INSERT INTO t VALUES (:reason)"), {"reason": "Maya Okafor, VP of Sales"})

    with pytest.raises(Exception, match="UNIQUE constraint failed") as refused, engine.begin() as connection:
        connection.execute(text("INSERT INTO t VALUES (:reason)"), {"reason": "Maya Okafor, VP of Sales"})

    assert "INSERT INTO t" in str(refused.value) and "Maya Okafor" not in str(refused.value)


def test_db_prune_deletes_what_was_kept_before_the_retention_period(store_url, monkeypatch, capsys):
    """Scores and feedback older than the period go, and outcomes of leads left with no score; a lead
    scored since keeps its outcome, and is marked as having lost its first score: training and
    evaluation from the store leave it out, since its first kept score shows what reps made of it."""
    store.upgrade(store_url)
    kept = Store(store_url)
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=400), now - timedelta(days=10)
    kept.record_scores([_score("1", old, "lead"), _score("2", old, "lead"), _score("2", recent, "customer")])
    kept.record_outcomes([LeadFact("hubspot", "48213377", lead, "customer") for lead in ("1", "2")], "sync")
    kept.record_feedback([Feedback("hubspot", "48213377", "2", "too_low", 50, "B")])
    with kept.engine.begin() as connection:  # said a year ago
        connection.execute(store.feedback.update().values(recorded_at=old))
    monkeypatch.setenv("DATABASE_URL", store_url)
    get_settings.cache_clear()
    try:
        assert main(["db", "prune", "--older-than", "365"]) == 0
    finally:
        get_settings.cache_clear()

    assert "{'scores': 2, 'feedback': 1, 'outcomes': 1, 'cut': 2}" in capsys.readouterr().out
    with kept.engine.connect() as connection:
        remaining = connection.execute(select(store.scores.c.lead_id, store.scores.c.features)).all()
        outcome_leads = connection.execute(select(store.outcomes.c.lead_id, store.outcomes.c.kind)).all()
    assert [(lead, features["stage"]) for lead, features in remaining] == [("2", "customer")]
    assert sorted(outcome_leads) == [("1", store.HISTORY_CUT), ("2", "customer"), ("2", store.HISTORY_CUT)]
    assert list(histories(kept)) == []  # its first kept score was a customer's
    kept.record_scores([_score("1", now, "customer")])  # lead 1 comes back
    assert list(histories(kept)) == []  # and its first score now is not its first
    summary = store_summary(kept)
    assert (summary["leads"], summary["history_cut"], summary["holdout"]["scored"]["leads"]) == (2, 2, 0)
    assert kept.prune(now - timedelta(days=365))["cut"] == 0  # marked once
    assert main(["db", "prune"]) == 2  # a period is not guessed
    assert "db prune needs --older-than DAYS" in capsys.readouterr().err
    assert main(["db", "prune", "--older-than", "0.5"]) == 2
    assert "db prune --older-than 0.5: keep at least 1 day" in capsys.readouterr().err


def _kept(features: dict, fingerprint: str = "f1", fallback: bool = False, **details) -> dict:
    from datetime import UTC, datetime

    return {
        "score": 50, "tier": "C", "reason": "r", "scorer": "rules+llm", "model_version": "gpt-4o-mini",
        "fingerprint": fingerprint, "fallback": fallback, "holdout": False, "features": features,
        "details": {"config_version": "v1", "config_digest": "aaaa", "prompt_version": "p",
                    "reason_version": "reasons-4", **details},
        "scored_at": datetime(2026, 11, 20, 9, tzinfo=UTC),
    }  # fmt: skip


def test_history_says_what_changed_between_two_scores_among_what_was_kept():
    from workers.history import changes, history_lines

    answered = {"value": 0.7, "confidence": 0.8}
    unanswered = {"value": 0.5, "confidence": 0.0, "error": "LLM answered HTTP 503"}
    before = _kept({"title": "VP", "status": "NEW"}, fallback=True, propensity=unanswered)
    inputs = {"title": "VP", "status": "WORKING", "llm_propensity": 0.7}  # the LLM's: said once, below
    after = _kept(inputs, config_digest="bbbb", propensity=answered,
                  ages={"last_reply_when": "within the last 7 days"})  # fmt: skip
    newer = {**after, "fingerprint": "f2", "details": {**after["details"], "ages": {}}}

    assert changes(before, after) == [
        "status 'NEW' → 'WORKING'",  # the ages are compared only where both scores kept them
        "rules file aaaa → bbbb",
        "LLM unanswered (LLM answered HTTP 503): neutral prior → LLM 0.70 at confidence 0.80",
    ]
    assert changes(after, newer) == ["last_reply_when 'within the last 7 days' → None"]
    stood_in = _kept(inputs, fallback=True, propensity={**unanswered, "value": 0.7, "confidence": 0.8,
                                                        "previous": True})  # fmt: skip
    assert changes(after, stood_in)[-1] == (
        "LLM 0.70 at confidence 0.80 → LLM unanswered (LLM answered HTTP 503): its last answer stood in, "
        "0.70 at confidence 0.80"
    )
    same = history_lines({"scores": [after, {**after, "fingerprint": "f3"}, {**after, "fingerprint": "f3"}],
                          "outcomes": [], "feedback": []})  # fmt: skip
    assert [line for line in same if "changed:" in line] == [
        "    changed: notes or emails the LLM read (not kept)",
        "    changed: nothing: scored again for the same inputs (put back, forced, or reasons reworded)",
    ]
