"""Bank files: the size, sha256 and vector count of each FAISS file of the committed generation, recorded
at commit so that a reader can tell a damaged or swapped file from the one the catalog was written with.

An index written before this revision has no rows: it opens as before, and its next write records them.

Revision ID: 0002
Revises: 0001
Create Date: 2027-01-12
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bank_files",
        sa.Column("generation", sa.Integer, primary_key=True),
        sa.Column("bank", sa.String(16), primary_key=True),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("vectors", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("bank_files")
