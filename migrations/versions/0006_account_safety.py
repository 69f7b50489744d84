"""account safety: exactly one founder, and session tokens that signing out replaces

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 16:30:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():
    # A plain ADD COLUMN and a unique index: no table rebuild, which SQLite would refuse while
    # ratings and jobs point at user rows.
    op.add_column('user', sa.Column('founder', sa.Boolean(), nullable=True))
    op.create_index(op.f('ix_user_founder'), 'user', ['founder'], unique=True)
    op.add_column('user', sa.Column('session_token', sa.String(length=32), nullable=True))
    # An existing site's first account is its founder.
    op.execute('UPDATE "user" SET founder = true WHERE id = (SELECT min(id) FROM "user")')


def downgrade():
    op.drop_index(op.f('ix_user_founder'), table_name='user')
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_column('session_token')
        batch_op.drop_column('founder')
