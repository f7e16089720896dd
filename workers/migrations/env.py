"""Alembic environment: the URL comes from the caller (`workers.store.upgrade`) or DATABASE_URL."""

import fcntl
from contextlib import contextmanager

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url

from integration.settings import get_settings
from workers.store import engine_for, metadata

url = context.config.attributes.get("url") or get_settings().database_url
IN_MEMORY = (None, "", ":memory:")  # SQLite databases with no file to lock
MIGRATION_LOCK_KEY = 0x6C73636F7265  # "lscore": PostgreSQL's advisory lock id for leadscore's migrations


@contextmanager
def one_migration_at_a_time(connection: Connection):
    """Every `leadscore worker` upgrades the store as it starts; workers started together would each
    create the same tables. The first to hold the lock migrates; the others then find it done."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()  # the lock is the session's; Alembic begins its own transaction
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
    elif connection.dialect.name == "sqlite" and (path := make_url(url).database) not in IN_MEMORY:
        with open(path, "ab") as database:  # flock, which SQLite's own (fcntl) locks do not see
            fcntl.flock(database, fcntl.LOCK_EX)
            yield
    else:
        yield


if context.is_offline_mode():
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = engine_for(url)
    try:
        with engine.connect() as connection, one_migration_at_a_time(connection):
            context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()  # no pooled connection left for forked work horses to share
