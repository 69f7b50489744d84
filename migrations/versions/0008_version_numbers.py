"""version numbers: unique per person and never reused, so URLs can name them

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 17:00:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

version = sa.table(
    'taste_version',
    sa.column('id', sa.Integer),
    sa.column('owner_id', sa.Integer),
    sa.column('number', sa.Integer),
)
job = sa.table(
    'job',
    sa.column('owner_id', sa.Integer),
    sa.column('kind', sa.String),
    sa.column('params', sa.JSON),
)


def renumber_duplicates(connection) -> None:
    """Give any version that shares its owner's number with an older one the next free number.

    Two train_taste jobs of one person never ran at once (their lock key), so this should find
    nothing; if it does, the oldest keeps the number and its links.
    """
    rows = connection.execute(
        sa.select(version.c.id, version.c.owner_id, version.c.number).order_by(version.c.id)
    ).all()
    highest, taken = {}, set()
    for row in rows:
        highest[row.owner_id] = max(highest.get(row.owner_id, 0), row.number)
    for row in rows:
        number = row.number
        if (row.owner_id, number) in taken:
            highest[row.owner_id] += 1
            number = highest[row.owner_id]
            connection.execute(
                version.update().where(version.c.id == row.id).values(number=number)
            )
        taken.add((row.owner_id, number))


def last_numbers(connection) -> dict[int, int]:
    """The highest version number each person has had, as far as the database still tells.

    A deleted version leaves no row, but the train_taste job that made it still names it: each
    such job made one version, numbered one past the owner's highest then, so the count of
    those jobs is at least the number of the newest deleted one (short of jobs a crash ran
    twice).
    """
    numbers = dict(
        connection.execute(
            sa.select(version.c.owner_id, sa.func.max(version.c.number)).group_by(
                version.c.owner_id
            )
        ).all()
    )
    made = {}
    for owner_id, params in connection.execute(
        sa.select(job.c.owner_id, job.c.params).where(job.c.kind == 'train_taste')
    ):
        if owner_id is not None and (params or {}).get('version_id') is not None:
            made[owner_id] = made.get(owner_id, 0) + 1
    return {
        owner_id: max(numbers.get(owner_id, 0), made.get(owner_id, 0))
        for owner_id in numbers.keys() | made.keys()
    }


def upgrade():
    connection = op.get_bind()
    renumber_duplicates(connection)
    with op.batch_alter_table('taste_version', schema=None) as batch_op:
        batch_op.create_unique_constraint(
            'uq_taste_version_owner_number', ['owner_id', 'number']
        )
    # A plain ADD COLUMN: no table rebuild, which SQLite would refuse while ratings and jobs
    # point at user rows.
    op.add_column(
        'user', sa.Column('last_taste_number', sa.Integer(), nullable=False, server_default='0')
    )
    user = sa.table('user', sa.column('id', sa.Integer), sa.column('last_taste_number', sa.Integer))
    for owner_id, number in last_numbers(connection).items():
        connection.execute(
            user.update().where(user.c.id == owner_id).values(last_taste_number=number)
        )


def downgrade():
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_column('last_taste_number')
    with op.batch_alter_table('taste_version', schema=None) as batch_op:
        batch_op.drop_constraint('uq_taste_version_owner_number', type_='unique')
