"""The score, outcome and feedback store: what was shown to reps, and what happened next.

SQLAlchemy Core over SQLite by default (`DATABASE_URL`, PostgreSQL in production); the schema
is Alembic's (`workers/migrations`), applied by `leadscore db upgrade` or by a worker at start.
Recording is the worker's side job: the CRM write is the product, so a store that is down costs
a logged error, never a score.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    literal,
    make_url,
    select,
    update,
)

from integration.errors import UserError
from integration.lead import FEEDBACK_VALUES
from integration.salesforce import full_id, is_record_id

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
metadata = MetaData()


def _lead_columns() -> list[Column]:
    """Every table is keyed by the lead: CRM, account (portal / 15-character org id), lead id."""
    return [
        Column("id", Integer, primary_key=True),
        Column("crm", String(16), nullable=False),
        Column("account_id", String(64), nullable=False),
        Column("lead_id", String(64), nullable=False),
    ]


scores = Table(
    "scores",
    metadata,
    *_lead_columns(),
    Column("score", Integer, nullable=False),
    Column("tier", String(8), nullable=False),
    Column("reason", Text, nullable=False),
    Column("scorer", String(32), nullable=False),  # rules+llm | model
    Column("model_version", String(64)),  # the trained model's version, or the LLM's model name
    Column("fingerprint", String(64), nullable=False),
    Column("fallback", Boolean, nullable=False, default=False),
    Column("holdout", Boolean, nullable=False, default=False),
    Column("features", JSON, nullable=False),  # the inputs as read: what `train --from-store` learns
    Column("details", JSON, nullable=False),
    Column("scored_at", DateTime(timezone=True), nullable=False),
    Column("merged_from", String(64)),  # the lead it was kept of, before the CRM merged that into this one
    Index("ix_scores_lead", "crm", "account_id", "lead_id", "id"),
    Index("ix_scores_account_time", "crm", "account_id", "scored_at"),  # an account's first score
    sqlite_autoincrement=True,
)
outcomes = Table(
    "outcomes",
    metadata,
    *_lead_columns(),
    Column("kind", String(32), nullable=False),  # opportunity | customer | converted | won
    Column("source", String(16), nullable=False),  # webhook | sync
    Column("recorded_at", DateTime(timezone=True), nullable=False),  # when leadscore learned of it
    # When the lead got there: the CRM's own date where it keeps one, else when leadscore first read it.
    # (The server default keeps workers of the previous release writing during a rolling deploy.)
    Column("reached_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("crm", "account_id", "lead_id", "kind", name="uq_outcome_per_lead_kind"),
)
feedback = Table(
    "feedback",
    metadata,
    *_lead_columns(),
    Column("value", String(16), nullable=False),  # too_high | too_low | right
    Column("score", Integer),  # the score shown when the rep said so
    Column("tier", String(8)),
    Column("fingerprint", String(64)),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("merged_from", String(64)),
    Index("ix_feedback_lead", "crm", "account_id", "lead_id", "id"),
)

POSITIVE_OUTCOMES = ("opportunity", "customer", "converted", "won")
# Kept, as an outcome, of a lead some of whose scores a retention prune deleted: a score of it kept
# later is not its first, so what learns from first scores leaves it out.
HISTORY_CUT = "history_cut"
INSERT_ROWS = 1000  # rows a multi-row INSERT carries: 7,000 parameters, within both databases' limits
CLEARED = "cleared"  # kept when a rep empties the feedback property: saying the same again counts anew


@dataclass(frozen=True)
class ScoreRecord:
    crm: str
    account_id: str
    lead_id: str
    score: int
    tier: str
    reason: str
    scorer: str
    fingerprint: str
    features: dict
    details: dict
    model_version: str | None = None
    fallback: bool = False
    holdout: bool = False
    scored_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class LeadFact:
    """An outcome seen on a lead, keyed like its scores, and when the lead reached it (None: now)."""

    crm: str
    account_id: str
    lead_id: str
    value: str
    reached_at: datetime | None = None


@dataclass(frozen=True)
class Feedback:
    """A rep's feedback, with the score, tier and fingerprint the CRM showed them when they gave it
    (blank for a holdout lead: they saw none)."""

    crm: str
    account_id: str
    lead_id: str
    value: str | None  # None: the property is empty
    score: int | None = None
    tier: str | None = None
    fingerprint: str | None = None


CONNECT_TIMEOUT_S = 5  # a store that does not answer costs a batch this long, not the OS's minutes
# A worker's statements: each of a batch's writes takes milliseconds, so a PostgreSQL that hangs (a
# stopped backend, a lock a migration or a long read holds) costs a batch this long, not its 10 minutes.
WORKER_STATEMENT_TIMEOUT_S = 30
WORKER_LOCK_TIMEOUT_S = 10
SQLITE_BUSY_TIMEOUT_S = 10  # how long a SQLite connection waits for another's write


def engine_for(url: str, worker: bool = False) -> Engine:
    """`worker`: bound each statement and lock wait (commands that read a year of scores are not)."""
    parsed = make_url(url)
    postgres = parsed.get_backend_name() == "postgresql"
    connect_args = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "application_name": "leadscore-worker" if worker else "leadscore",
        # A connection a failover or a dead network dropped is found in a minute, not the OS's hours.
        "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
    }  # fmt: skip
    if parsed.get_driver_name() == "psycopg":
        # No statement prepared on the server: PgBouncer's transaction mode hands the next transaction
        # another server connection, where it is missing, or another client's is ("already exists").
        connect_args["prepare_threshold"] = None
    engine = create_engine(
        url,
        pool_pre_ping=True,
        hide_parameters=True,  # no lead data in error logs
        connect_args=connect_args if postgres else {},
    )
    if postgres and worker:

        @event.listens_for(engine, "begin")
        def _bounded(connection):  # per transaction, as PgBouncer's transaction mode keeps settings
            connection.exec_driver_sql(
                f"SET LOCAL statement_timeout = '{WORKER_STATEMENT_TIMEOUT_S}s'; "
                f"SET LOCAL lock_timeout = '{WORKER_LOCK_TIMEOUT_S}s'"
            )

    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # several workers share one file
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
            switch_to_wal(cursor)
            cursor.close()

    return engine


def switch_to_wal(cursor, timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> None:
    """Put a SQLite file in WAL mode, which lets workers read while one writes. Connections opening
    a new file together all try to switch it, and SQLite refuses some at once as locked, never
    waiting its busy timeout (six opening together, one was refused in about one round in six):
    they try again until the file is switched."""
    import sqlite3

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")  # a file already in WAL, or in memory, is left as is
            return
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def alembic_config(url: str):
    """Alembic's configuration for this store, without an alembic.ini."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = url
    return config


def schema_revisions(engine: Engine, url: str) -> tuple[str | None, str]:
    """(the store's Alembic revision, the newest this code ships)."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.connect() as connection:
        at = MigrationContext.configure(connection).get_current_revision()
    return at, ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to `revision` with Alembic (idempotent)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def redacted(url: str) -> str:
    """The database URL with its password hidden, for messages and artifacts."""
    return make_url(url).render_as_string(hide_password=True)


def as_utc(moment: datetime) -> datetime:
    """A stored moment in UTC: SQLite hands it back naive, PostgreSQL in its session's time zone (a
    server's own, as `initdb` found it), which times printed or kept "in UTC" must not carry."""
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


class StoreNotReady(UserError):
    """The store a command reads has no leadscore schema (wrong DATABASE_URL, or never migrated)."""


class Store:
    def __init__(self, url: str, worker: bool = False):
        self.url = url
        self.engine = engine_for(url, worker)

    def require_schema(self) -> Store:
        """For commands that read the store: fail in one line, and never leave an empty SQLite file
        behind, when it is not the store the workers write."""
        from sqlalchemy import inspect

        url = make_url(self.url)
        shown = redacted(self.url)
        fix = "point DATABASE_URL at the workers' store, or create it with `leadscore db upgrade`"
        if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
            raise StoreNotReady(f"no score store at {shown} (relative to {Path.cwd()}): {fix}")
        if not inspect(self.engine).has_table(scores.name):
            raise StoreNotReady(f"{shown} holds no leadscore tables: {fix}")
        at, head = schema_revisions(self.engine, self.url)
        if at != head:
            raise StoreNotReady(
                f"{shown} is at schema revision {at}, this leadscore needs {head}: run `leadscore db upgrade`"
            )
        return self

    def record_scores(self, records: Iterable[ScoreRecord]) -> int:
        rows = [dict(vars(r)) for r in records]  # not asdict, which deep-copies every score's details
        if rows:
            with self.engine.begin() as connection:
                connection.execute(scores.insert(), rows)
        return len(rows)

    def record_outcomes(self, facts: Iterable[LeadFact], source: str) -> int:
        """Keep each lead's outcome kinds once (insert-or-ignore, so workers and `outcomes sync`
        can race), and the earliest date anyone gave for it; returns how many were new. Rows go in
        key order, a transaction a chunk: two writers that share leads then lock them in the same
        order (on PostgreSQL, in any other order one of them was aborted as a deadlock) and briefly."""
        now = datetime.now(UTC)
        rows = sorted(
            (
                {**_keys(f), "kind": f.value, "source": source, "recorded_at": now,
                 "reached_at": min(f.reached_at, now) if f.reached_at else now}
                for f in dict.fromkeys(facts)
            ),
            key=itemgetter("crm", "account_id", "lead_id", "kind"),
        )  # fmt: skip
        if not rows:
            return 0
        added = 0
        for start in range(0, len(rows), INSERT_ROWS):  # one statement a chunk: a sync keeps 100,000s
            with self.engine.begin() as connection:
                added += self._keep_outcomes(connection, rows[start : start + INSERT_ROWS])
        return added

    def _keep_outcomes(self, connection, rows: list[dict]) -> int:
        """Insert-or-ignore these outcome rows, moving a kept one back to an earlier date it is given
        (the CRM's own, say); returns how many were new."""
        dialect = self.engine.dialect.name
        insert = _insert_ignoring_duplicates(dialect)
        if dialect == "postgresql":  # psycopg reports rowcount -1 for INSERT … ON CONFLICT DO NOTHING
            insert = insert.returning(outcomes.c.id)
        key = (outcomes.c.crm, outcomes.c.account_id, outcomes.c.lead_id, outcomes.c.kind)
        earlier = (
            update(outcomes)
            .where(*(column == bindparam(f"_{column.name}") for column in key))
            .where(outcomes.c.reached_at > bindparam("_reached_at"))
            .values(reached_at=bindparam("_reached_at"))
        )
        result = connection.execute(insert.values(rows))
        added = len(result.all()) if dialect == "postgresql" else result.rowcount
        connection.execute(earlier, [{f"_{k}": row[k] for k in (*(c.name for c in key), "reached_at")}
                                     for row in rows])  # fmt: skip
        return added

    def merge_leads(self, crm: str, account_id: str, merges: dict[str, tuple[str, ...]]) -> int:
        """Move what is kept of records the CRM merged into another (the same person) to the one that
        remains; returns how many rows were moved (an outcome the survivor had already is folded into
        its own, at the earlier date). Its history then reads as one lead's (a duplicate that never
        converted is no negative beside its converted twin), and erasing the lead erases them too. A
        moved score or feedback keeps the id it was kept of (`merged_from`), for `leadscore history`.

        A lead keeps its merged ids for life, so this runs at each of its scorings: one query finds
        the ids that still have rows, and only those are moved, a survivor a transaction. A chain (A
        merged into C, C later into B) moves everything to the last survivor."""
        stored = {
            _stored_lead(crm, survivor): tuple(_stored_lead(crm, gone) for gone in merged)
            for survivor, merged in merges.items()
        }  # one spelling of each id before chains are followed: a 15- and an 18-character id are one lead
        keyed = _final_survivors(stored)
        if not keyed:
            return 0
        with self.engine.connect() as connection:
            found = {
                lead_id
                for table in (scores, feedback, outcomes)
                for lead_id in connection.execute(
                    select(table.c.lead_id).where(*_leads(table, crm, account_id, sorted(keyed))).distinct()
                ).scalars()
            }
        account = account_id[:15] if crm == "salesforce" else account_id
        moved = 0
        by_survivor: dict[str, list[str]] = {}
        for lead_id in found:
            by_survivor.setdefault(keyed[_stored_lead(crm, lead_id)], []).append(lead_id)
        for survivor, gone in sorted(by_survivor.items()):
            with self.engine.begin() as connection:
                for table in (scores, feedback):
                    moved += connection.execute(
                        update(table)
                        .where(*_leads(table, crm, account_id, gone))
                        .values(
                            lead_id=survivor, merged_from=func.coalesce(table.c.merged_from, table.c.lead_id)
                        )
                    ).rowcount
                taken = connection.execute(
                    delete(outcomes)
                    .where(*_leads(outcomes, crm, account_id, gone))
                    .returning(
                        outcomes.c.kind, outcomes.c.source, outcomes.c.recorded_at, outcomes.c.reached_at
                    )
                ).all()
                if taken:
                    rows = [
                        {"crm": crm, "account_id": account, "lead_id": survivor, **row._mapping}
                        for row in taken
                    ]
                    self._keep_outcomes(connection, sorted(rows, key=itemgetter("kind")))
                moved += len(taken)
        return moved

    def record_feedback(self, facts: Iterable[Feedback]) -> int:
        """Keep a rep's feedback whenever it differs from what they said last about the lead. A fact
        without a value (the property is empty) is kept as `CLEARED`, and only after feedback that
        was not: a rep who clears a "too high" and later says it again, of a new score, is heard
        twice, while a lead that never had feedback keeps none."""
        valid = []
        for fact in facts:
            if fact.value is None:
                valid.append(replace(fact, value=CLEARED))
            elif fact.value in FEEDBACK_VALUES:
                valid.append(fact)
            else:
                log.warning("ignoring feedback %r on %s: expected one of %s", fact.value, fact.lead_id,
                            ", ".join(FEEDBACK_VALUES))  # fmt: skip
        if not valid:
            return 0
        now = datetime.now(UTC)
        accounts: dict[tuple[str, str], set[str]] = {}
        for fact in valid:
            accounts.setdefault((fact.crm, fact.account_id), set()).add(fact.lead_id)
        with self.engine.begin() as connection:
            said = [  # what was said last about each of these leads: one indexed query an account
                row
                for (crm, account), leads in accounts.items()
                for row in connection.execute(
                    select(feedback.c.crm, feedback.c.account_id, feedback.c.lead_id, feedback.c.value)
                    .where(
                        feedback.c.crm == crm,
                        feedback.c.account_id == account,
                        feedback.c.lead_id.in_(sorted(leads)),
                    )
                    .order_by(feedback.c.id)
                )  # fmt: skip
            ]
            last = {tuple(row[:3]): row.value for row in said}
            new = []
            for fact in valid:
                key = (fact.crm, fact.account_id, fact.lead_id)
                if last.get(key, CLEARED) != fact.value:
                    new.append({**asdict(fact), "recorded_at": now})
                    last[key] = fact.value
            if new:
                connection.execute(feedback.insert(), new)
        return len(new)

    def fingerprints_of(self, crm: str, account_id: str, lead_ids: list[str]) -> set[str]:
        """The fingerprints these leads' scores had: the keys of their cached LLM answers."""
        with self.engine.connect() as connection:
            return set(
                connection.execute(
                    select(scores.c.fingerprint).where(*_leads(scores, crm, account_id, lead_ids))
                ).scalars()
            )

    def never_kept(self, crm: str, account_id: str, shown: dict[str, str]) -> set[str]:
        """Of these leads (id: the fingerprint of the score the CRM shows, never a fallback's), those
        whose score was never kept: the store was down, or the worker died between writing it and
        keeping it. A fallback kept for the same inputs is not the score shown."""
        if not shown:
            return set()
        with self.engine.connect() as connection:
            kept = {
                (_stored_lead(crm, lead), fingerprint)
                for lead, fingerprint in connection.execute(
                    select(scores.c.lead_id, scores.c.fingerprint).where(
                        *_leads(scores, crm, account_id, list(shown)),
                        scores.c.fingerprint.in_(sorted(set(shown.values()))),
                        scores.c.fallback.is_(False),
                    )
                )
            }
        return {
            lead for lead, fingerprint in shown.items() if (_stored_lead(crm, lead), fingerprint) not in kept
        }

    def lead_history(self, crm: str, account_id: str, lead_id: str) -> dict[str, list[dict]]:
        """Every row kept of one lead, oldest first, by table; a Salesforce id matches in either form."""
        with self.engine.connect() as connection:
            return {
                table.name: [
                    dict(row._mapping)
                    for row in connection.execute(
                        select(table).where(*_leads(table, crm, account_id, [lead_id])).order_by(table.c.id)
                    )
                ]
                for table in (scores, outcomes, feedback)
            }

    def erase(self, crm: str, account_id: str, lead_ids: list[str]) -> dict[str, int]:
        """Delete every row kept of these leads; the rows deleted per table. A Salesforce id matches
        in either form."""
        with self.engine.begin() as connection:
            return {
                table.name: connection.execute(
                    delete(table).where(*_leads(table, crm, account_id, lead_ids))
                ).rowcount
                for table in (scores, outcomes, feedback)
            }

    def prune(self, before: datetime) -> dict[str, int]:
        """Delete scores and feedback kept before `before`, and the outcomes of leads left with no
        score (nothing learns from an outcome without one): a retention period's work. Every lead that
        loses a score is marked `HISTORY_CUT` (the new marks counted as `cut`), kept until the lead is
        erased: a later score of it, now or when it comes back, is not its first."""
        lead = (scores.c.crm, scores.c.account_id, scores.c.lead_id)
        dialect = self.engine.dialect.name
        stamp = DateTime(timezone=True)
        marking = _insert_ignoring_duplicates(dialect).from_select(
            ["crm", "account_id", "lead_id", "kind", "source", "recorded_at", "reached_at"],
            select(
                *lead, literal(HISTORY_CUT), literal("prune"), literal(datetime.now(UTC), stamp),
                literal(before, stamp),
            ).where(scores.c.scored_at < before).group_by(*lead),
        )  # fmt: skip
        if dialect == "postgresql":  # psycopg reports rowcount -1 for INSERT … ON CONFLICT DO NOTHING
            marking = marking.returning(outcomes.c.id)
        with self.engine.begin() as connection:
            marked = connection.execute(marking)
            cut = len(marked.all()) if dialect == "postgresql" else marked.rowcount
            deleted = {
                "scores": connection.execute(delete(scores).where(scores.c.scored_at < before)).rowcount,
                "feedback": connection.execute(
                    delete(feedback).where(feedback.c.recorded_at < before)
                ).rowcount,
            }
            scored = select(scores.c.id).where(
                scores.c.crm == outcomes.c.crm,
                scores.c.account_id == outcomes.c.account_id,
                scores.c.lead_id == outcomes.c.lead_id,
            )
            deleted["outcomes"] = connection.execute(
                delete(outcomes).where(~scored.exists(), outcomes.c.kind != HISTORY_CUT)
            ).rowcount
        return {**deleted, "cut": cut}

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as connection:
            return {
                table.name: connection.execute(select(func.count()).select_from(table)).scalar_one()
                for table in (scores, outcomes, feedback)
            }


def _leads(table: Table, crm: str, account_id: str, lead_ids: list[str]) -> tuple:
    """The WHERE clauses picking these leads' rows of `table`."""
    accounts, leads = _id_forms(crm, [account_id]), _id_forms(crm, lead_ids)
    return table.c.crm == crm, table.c.account_id.in_(accounts), table.c.lead_id.in_(leads)


def _final_survivors(merges: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Each merged id → the lead that finally holds it, following chains; a lead merged into itself
    (or a cycle, which a CRM would not make) moves nowhere."""
    parent = {gone: survivor for survivor, merged in merges.items() for gone in merged if gone != survivor}
    final = {}
    for gone in parent:
        survivor, seen = parent[gone], {gone}
        while survivor in parent and survivor not in seen:
            seen.add(survivor)
            survivor = parent[survivor]
        if survivor not in seen:
            final[gone] = survivor
    return final


def _stored_lead(crm: str, lead_id: str) -> str:
    """A lead id as the store keeps it: a Salesforce record by its 18-character id."""
    return full_id(lead_id) if crm == "salesforce" and is_record_id(lead_id) else lead_id


def _id_forms(crm: str, ids: list[str]) -> list[str]:
    """The ids as the store may hold them: a Salesforce org is kept by its 15-character id, a lead by
    its 18-character one."""
    if crm != "salesforce":
        return sorted(set(ids))
    return sorted({form for i in ids if is_record_id(i) for form in (i[:15], full_id(i))})


def _keys(fact: LeadFact) -> dict[str, str]:
    return {"crm": fact.crm, "account_id": fact.account_id, "lead_id": fact.lead_id}


def _insert_ignoring_duplicates(dialect: str):
    """INSERT … ON CONFLICT DO NOTHING on the (lead, kind) key, in the dialect's own words."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise ValueError(f"the score store supports SQLite and PostgreSQL, not {dialect}")
    return insert(outcomes).on_conflict_do_nothing(index_elements=["crm", "account_id", "lead_id", "kind"])
