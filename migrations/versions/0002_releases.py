"""Releases: a task's candidate version served beside its active one.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 08:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("candidate_version_id", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("percent", sa.Float(), nullable=False),
        sa.Column("key_field", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["candidate_version_id"],
            ["task_versions.id"],
            name=op.f("fk_releases_candidate_version_id_task_versions"),
        ),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_releases_task_id_tasks")),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_releases")),
    )


def downgrade() -> None:
    op.drop_table("releases")
