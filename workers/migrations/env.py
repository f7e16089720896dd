"""Alembic environment: the URL comes from the caller (`workers.store.upgrade`) or DATABASE_URL."""

from alembic import context

from integration.settings import get_settings
from workers.store import engine_for, metadata

url = context.config.attributes.get("url") or get_settings().database_url

if context.is_offline_mode():
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = engine_for(url)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()  # no pooled connection left for forked work horses to share
