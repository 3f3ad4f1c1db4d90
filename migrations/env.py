"""Alembic environment: simsearch runs migrations itself, on a connection it passes in."""
from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("simsearch applies its migrations when an index is opened; "
                       "run them through simsearch.store.catalog.migrate, not the alembic command")

# render_as_batch lets later migrations alter SQLite tables (copy-and-move under the hood).
context.configure(connection=connection, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
