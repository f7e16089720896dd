"""The score store: the Alembic schema is the models' schema, and facts are kept once."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from workers import store
from workers.store import Feedback, LeadFact, Store


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
