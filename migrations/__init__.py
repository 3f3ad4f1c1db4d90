"""Alembic scripts for the index catalog (meta.sqlite); applied by simsearch when an index is opened."""
