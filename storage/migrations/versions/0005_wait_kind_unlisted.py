"""jobs.wait_kind names no step type: the CHECK listing 'approval' and 'webhook_gate' is dropped.

A parking step type declares its wait kind beside its code and the engine checks it there, so a new
one needs no schema change.

PostgreSQL drops the constraint in place. SQLite cannot drop a constraint: the table is rebuilt
(create the new table, copy, drop the old, rename, recreate its indexes, keep its AUTOINCREMENT
counter). storage.migrate runs every upgrade with foreign keys off, so dropping the old table fires
none of the ON DELETE actions that point at it (children, claims, logs keep their job ids), and checks
``PRAGMA foreign_key_check`` before it commits.

Revision ID: 0005_wait_kind_unlisted
Revises: 0004_processed_last_seen
"""

from collections.abc import Callable

from alembic import op

revision = "0005_wait_kind_unlisted"
down_revision = "0004_processed_last_seen"
branch_labels = None
depends_on = None

TABLE = "datamachine_jobs"
CONSTRAINT = "ck_jobs_wait_kind"
CHECK = "wait_kind IS NULL OR wait_kind IN ('approval', 'webhook_gate')"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {TABLE} DROP CONSTRAINT IF EXISTS {CONSTRAINT}")
    else:
        _rebuild_sqlite(_without_constraint)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT {CONSTRAINT} CHECK ({CHECK})")
    else:
        _rebuild_sqlite(_with_constraint)


def _without_constraint(ddl: str) -> str:
    start = ddl.find(f"CONSTRAINT {CONSTRAINT} CHECK (")
    if start < 0:
        return ddl
    end = _closing_paren(ddl, ddl.index("(", start))
    before, after = ddl[:start].rstrip(), ddl[end + 1 :]
    if before.endswith(","):  # "…, CONSTRAINT x CHECK (…), …" → "…, …"
        return before[:-1] + after
    return before + after.lstrip().removeprefix(",")


def _with_constraint(ddl: str) -> str:
    if f"CONSTRAINT {CONSTRAINT} " in ddl:
        return ddl
    body_end = ddl.rindex(")")
    return ddl[:body_end].rstrip() + f", \n\tCONSTRAINT {CONSTRAINT} CHECK ({CHECK})\n" + ddl[body_end:]


def _closing_paren(text: str, opening: int) -> int:
    depth, quoted = 0, False
    for i in range(opening, len(text)):
        ch = text[i]
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced CHECK clause in the {TABLE} definition")


def _rebuild_sqlite(change: Callable[[str], str]) -> None:
    """SQLite's table rebuild: the same definition changed by ``change``, every row, index and the
    AUTOINCREMENT counter kept. Runs inside storage.migrate's transaction, with foreign keys off."""
    bind = op.get_bind()

    def one(sql: str, *params: object) -> object:
        return bind.exec_driver_sql(sql, params).scalar()

    ddl = str(one("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", TABLE))
    changed = change(ddl)
    if changed == ddl:
        return
    temporary = f"{TABLE}_rebuilt"
    prefix = f"CREATE TABLE {TABLE} ("
    if not changed.startswith(prefix):
        raise ValueError(f"unexpected {TABLE} definition: {ddl[:80]!r}")
    indexes = [
        r[0]
        for r in bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", (TABLE,)
        ).all()
    ]
    counter = one("SELECT seq FROM sqlite_sequence WHERE name = ?", TABLE)
    columns = ", ".join(f'"{r[1]}"' for r in bind.exec_driver_sql(f"PRAGMA table_info({TABLE})").all())
    bind.exec_driver_sql(f"CREATE TABLE {temporary} (" + changed[len(prefix) :])
    bind.exec_driver_sql(f"INSERT INTO {temporary} ({columns}) SELECT {columns} FROM {TABLE}")
    bind.exec_driver_sql(f"DROP TABLE {TABLE}")
    bind.exec_driver_sql(f"ALTER TABLE {temporary} RENAME TO {TABLE}")
    for index in indexes:
        bind.exec_driver_sql(index)
    if counter is not None:  # the copy set it to the highest id left; ids of deleted jobs stay used
        bind.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = ?", (TABLE,))
        bind.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (TABLE, counter))
