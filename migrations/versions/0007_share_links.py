"""share links: public versions by unguessable token, scorer shared only on request

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 16:40:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('taste_version', schema=None) as batch_op:
        batch_op.add_column(sa.Column('public_token', sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column('share_scorer', sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.create_unique_constraint(
            batch_op.f('uq_taste_version_public_token'), ['public_token']
        )
    # Versions public before share links existed become private: their old, guessable
    # addresses stop working, and their owners publish them again to get a link.
    op.execute('UPDATE taste_version SET public = false')


def downgrade():
    with op.batch_alter_table('taste_version', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_taste_version_public_token'), type_='unique')
        batch_op.drop_column('share_scorer')
        batch_op.drop_column('public_token')
