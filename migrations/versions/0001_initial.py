"""Initial schema: configuration, images, tiles, vectors, calibrations.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "index_config",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("config_json", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(32), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("next_vector_id", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("simsearch_version", sa.String(32), nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("added_at", sa.Float, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("n_vectors", sa.Integer, nullable=False),
    )
    op.create_index("ix_images_role", "images", ["role"])
    op.create_table(
        "tiles",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("x", sa.Integer, nullable=False),
        sa.Column("y", sa.Integer, nullable=False),
        sa.Column("w", sa.Integer, nullable=False),
        sa.Column("h", sa.Integer, nullable=False),
    )
    op.create_index("ix_tiles_image_id", "tiles", ["image_id"])
    op.create_table(
        "vectors",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("tile_id", sa.Integer, sa.ForeignKey("tiles.id", ondelete="CASCADE"), nullable=False),
        sa.Column("row", sa.Integer, nullable=False),
        sa.Column("col", sa.Integer, nullable=False),
        sa.Column("x", sa.Integer, nullable=False),
        sa.Column("y", sa.Integer, nullable=False),
    )
    op.create_index("ix_vectors_image_id", "vectors", ["image_id"])
    op.create_table(
        "calibrations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("target_fpr", sa.Float, nullable=False),
        sa.Column("image_threshold", sa.Float, nullable=False),
        sa.Column("pixel_threshold", sa.Float, nullable=False),
        sa.Column("min_region_area", sa.Integer, nullable=False),
        sa.Column("f1_threshold", sa.Float, nullable=True),
        sa.Column("n_good", sa.Integer, nullable=False),
        sa.Column("n_defect", sa.Integer, nullable=False),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("details_json", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("calibrations", "vectors", "tiles", "images", "index_config"):
        op.drop_table(table)
