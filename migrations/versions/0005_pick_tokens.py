"""pick tokens: one comparison per shown pair, however often the pick is sent

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 16:25:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('comparison', schema=None) as batch_op:
        batch_op.add_column(sa.Column('token', sa.String(length=32), nullable=True))
        batch_op.create_unique_constraint('uq_comparison_user_token', ['user_id', 'token'])


def downgrade():
    with op.batch_alter_table('comparison', schema=None) as batch_op:
        batch_op.drop_constraint('uq_comparison_user_token', type_='unique')
        batch_op.drop_column('token')
