"""Privacy budget ledger: each round's differentially private release and each user's charge for it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "privacy_rounds",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(32), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("clipping_norm", sa.Float(), nullable=False),
        sa.Column("sampled", sa.Integer(), nullable=False),
        sa.Column("available", sa.Integer(), nullable=False),
        sa.Column("sampling_rate", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("round_epsilon", sa.Float(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_rounds")),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_privacy_rounds_round_id_rounds"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("round_id", name=op.f("uq_privacy_rounds_round_id")),
    )
    op.create_table(
        "privacy_charges",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_charges")),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_privacy_charges_round_id_rounds"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("round_id", "user_id", name=op.f("uq_privacy_charges_round_id_user_id")),
    )
    op.create_index(op.f("ix_privacy_charges_round_id"), "privacy_charges", ["round_id"])
    op.create_index(op.f("ix_privacy_charges_user_id"), "privacy_charges", ["user_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_privacy_charges_user_id"), table_name="privacy_charges")
    op.drop_index(op.f("ix_privacy_charges_round_id"), table_name="privacy_charges")
    op.drop_table("privacy_charges")
    op.drop_table("privacy_rounds")
