"""A user's rows in the budget ledger: bounded in number, and every change to them but an append seen at once.

Bound: each charge leaves a ``charges`` row and, with a request id, a ``requests`` row. DP-SGD steps of a tiny
sample rate or queries at epsilon 1e-9 cost ~0, so without a bound a scientist inside her budget grew the owner's
database without limit. Past :data:`MAX_CHARGE_ROWS` rows, a user's oldest rows are folded into one (the first
of them, its id kept: its epsilon and delta are their sum, rounded up, never in the spender's favour), leaving
:data:`KEEP_CHARGE_ROWS`; the replay ids of the folded charges are forgotten with them. The replay horizon is
thus the user's newest KEEP_CHARGE_ROWS to MAX_CHARGE_ROWS charges: a request id older than that is charged
again if sent again (a second release, charged as one), never released free. Replay ids without a charge id
(written before this version, by a process of an older one, or copied by an older ``veil db migrate``) are tied
at a fold to the user's newest charge, and forgotten when that charge is folded (forgotten at once, an older
process's id charged a moment before was charged again: the horizon cut short).

Stamp: the running total (:mod:`veil.dp.charge_totals`) is caught up by adding the rows after its ``last_id``;
a row put back below that id (a restore, an explicit id on PostgreSQL), an older row raised by hand or a row
deleted was invisible to it. Triggers on ``charges`` bump the user's ``charge_stamps.edits`` on each update and
delete, on each insert below the user's newest id, and (SQLite) on an insert replacing a row (``REPLACE``: its
delete fires no delete trigger), or (PostgreSQL) for every user on a ``TRUNCATE`` (rows restored after it with
their old ids were appends): a total is trusted only at the ``edits`` it was summed at (one primary-key
look-up). On PostgreSQL the trigger first takes the user's ``budgets`` row lock, which every
charge holds: a change made beside a charge in flight is stamped after that charge commits, never before it.
Each bump also draws a random ``nonce`` (0: none drawn yet): a restore (a copy of the SQLite file, a PostgreSQL
dump) brings an older, lower stamp back, and later changes raise it to the same count over other rows; a total a
worker keeps in memory is trusted only at the same count and nonce (a stored one is the database's own, restored
with its rows). A bump that leaves the nonce (an older worker process's trigger, made again at its start) draws
one by a trigger on ``charge_stamps`` (``charge_stamps_drawn``, a name older versions never make). A stamp never
goes down: triggers refuse deleting one (while its user has charges or a total),
lowering one, or (SQLite) inserting one below the user's (``REPLACE INTO charge_stamps`` deletes the row it
replaces without a trigger), or (PostgreSQL) truncating them. Only the owner's shell, or an import, could try: a
scientist reaches the ledger through charges, whose triggers only raise stamps, and a charge is one transaction.

Order: a fold takes the lowest ids for the oldest charges; on PostgreSQL each charge first brings the id sequence
above the table's newest id (:func:`ids_rise`: a sequence restarted, or left behind by a restore, handed out ids
below a user's newest, and a fold then took her newest charges and forgot their replay ids). Cost: a fold's own
deletes are not stamped row by row (PostgreSQL: ``veil.folding``, set for its transaction; SQLite: the delete
trigger dropped and made again in its transaction; its update stamps the user), and replay ids are found through
``requests("user", charge_id)``. An older file's SQLite triggers are made again at open.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import zlib
from typing import TYPE_CHECKING

from veil.dp import ledger_generation
from veil.workers.database import Database

if TYPE_CHECKING:
    from veil.dp.charge_totals import Total

#: A user's charge rows past which her oldest are folded into one ...
MAX_CHARGE_ROWS = 10_000
#: ... leaving this many (folding is then due again after MAX - KEEP more charges: its cost is amortized).
KEEP_CHARGE_ROWS = 5_000
#: The most rows one charge folds (~0.5 s, ~10 MB): a user with far more (an older ledger, or rows a worker of an
#: older version appended beside: it folds nothing) is brought under the bound over several charges. Folding a
#: million at once held the lock every charge waits for ~9 s (a delete trigger per row; past SQLite's 30 s busy
#: timeout at a few million, other users' charges failed) and read them all into memory (~200 MB).
FOLD_AT_MOST = 50_000

STAMPS = """
CREATE TABLE IF NOT EXISTS charge_stamps (
    "user" TEXT PRIMARY KEY,
    edits BIGINT NOT NULL
);
"""

#: PostgreSQL: a random bigint, the nonce a bump draws (uniqueness, not secrecy: nothing is keyed by it).
_PG_DRAW = "floor((random() - 0.5) * 1.8e19)::bigint"

_BUMP = ('INSERT INTO charge_stamps("user", edits, nonce) VALUES ({row}."user", 1, ' + _PG_DRAW + ') '
         'ON CONFLICT("user") DO UPDATE SET edits = charge_stamps.edits + 1, nonce = excluded.nonce;')

_KEPT = ("charge_stamps rows are kept while the user has charges or a running total, and never lowered "
         "(veil.dp.ledger_rows): to give budget back, delete charges rows")

#: In every SQLite trigger's text: an older file's triggers (without it) are made again at open. (It holds the
#: previous version's mark, so a worker of that version beside this one keeps these triggers.)
_SQLITE_VERSION = "-- veil charge stamps 2, nonce 3"


def _sqlite_bump(user: str) -> str:
    """SQLite: the stamp of ``user`` (an expression) raised by one. Not an upsert: a BEFORE INSERT trigger sees
    an upsert's values, so ``charge_stamps_not_lowered`` would refuse the bump of a stamp above 1."""
    return (f'INSERT INTO charge_stamps("user", edits) SELECT {user}, 0 '
            f'WHERE NOT EXISTS (SELECT 1 FROM charge_stamps WHERE "user" = {user}); '
            f'UPDATE charge_stamps SET edits = edits + 1, nonce = random() WHERE "user" = {user};')


_SQLITE_TRIGGERS = {
    "charges_inserted_below": f"""AFTER INSERT ON charges {_SQLITE_VERSION}
WHEN EXISTS (SELECT 1 FROM charges WHERE "user" = NEW."user" AND id > NEW.id)
BEGIN {_sqlite_bump('NEW."user"')} END""",
    "charges_updated": f"""AFTER UPDATE ON charges {_SQLITE_VERSION}
BEGIN {_sqlite_bump('OLD."user"')} {_sqlite_bump('NEW."user"')} END""",
    # (a fold drops it for its own delete, in its transaction: fold_oldest)
    "charges_deleted": f"""AFTER DELETE ON charges {_SQLITE_VERSION}
BEGIN {_sqlite_bump('OLD."user"')} END""",
    # (NEW.id is -1 in a BEFORE trigger when the insert names no id, as every charge: a row numbered -1 by an
    # import would be stamped at each; a REPLACE naming id -1 goes unseen. Its delete fires no delete trigger.)
    "charges_replaced": f"""BEFORE INSERT ON charges {_SQLITE_VERSION}
WHEN NEW.id <> -1 AND EXISTS (SELECT 1 FROM charges WHERE id = NEW.id)
BEGIN {_sqlite_bump('(SELECT "user" FROM charges WHERE id = NEW.id)')} END""",
    # (a stamp deleted or lowered by hand read as an older one: a total summed at it was trusted again, and a row
    # raised since was not counted. REPLACE deletes the row it replaces firing no delete or update trigger: the
    # insert's own trigger refuses a stamp below the user's)
    "charge_stamps_kept": f"""BEFORE DELETE ON charge_stamps {_SQLITE_VERSION}
WHEN EXISTS (SELECT 1 FROM charges WHERE "user" = OLD."user")
    OR EXISTS (SELECT 1 FROM charge_totals WHERE "user" = OLD."user")
BEGIN SELECT RAISE(ABORT, '{_KEPT}'); END""",
    "charge_stamps_rising": f"""BEFORE UPDATE ON charge_stamps {_SQLITE_VERSION}
WHEN typeof(NEW.edits) <> 'integer' OR NEW.edits < OLD.edits OR NEW."user" IS NOT OLD."user"
BEGIN SELECT RAISE(ABORT, '{_KEPT}'); END""",
    "charge_stamps_not_lowered": f"""BEFORE INSERT ON charge_stamps {_SQLITE_VERSION}
WHEN typeof(NEW.edits) <> 'integer' OR NEW.edits < (SELECT edits FROM charge_stamps WHERE "user" = NEW."user")
BEGIN SELECT RAISE(ABORT, '{_KEPT}'); END""",
    # (see POSTGRES_STAMPS_DRAWN: a bump that kept the nonce, an older process's trigger's, draws one here)
    "charge_stamps_drawn": f"""AFTER UPDATE OF edits ON charge_stamps {_SQLITE_VERSION}
WHEN NEW.edits IS NOT OLD.edits AND NEW.nonce IS OLD.nonce
BEGIN UPDATE charge_stamps SET nonce = random() WHERE "user" = NEW."user"; END""",
}


def _create_sqlite_triggers(db: Database) -> None:
    """SQLite: the stamps' triggers, those of an older file (without :data:`_SQLITE_VERSION`: bumps by upsert,
    which the lowering guard refuses; no guard, so REPLACE lowered a stamp) or dropped by hand made again, in one
    write transaction (a charge of another process runs before or after it, never between)."""
    def stale() -> list[str]:
        have = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall())
        return [name for name in _SQLITE_TRIGGERS if _SQLITE_VERSION not in (have.get(name) or "")]

    if not stale():
        return  # (nothing written: the common open)
    with db.write_transaction():
        for name in stale():
            _make_sqlite_trigger(db, name)


def _make_sqlite_trigger(db: Database, name: str) -> None:
    db.execute(f"DROP TRIGGER IF EXISTS {name}")
    db.execute(f"CREATE TRIGGER {name} {_SQLITE_TRIGGERS[name]}")


POSTGRES_STAMPS_KEPT = f"""
CREATE OR REPLACE FUNCTION veil_charge_stamps_kept() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.edits >= OLD.edits AND NEW."user" = OLD."user" THEN
            RETURN NEW;
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        IF NOT EXISTS (SELECT 1 FROM charges WHERE "user" = OLD."user")
           AND NOT EXISTS (SELECT 1 FROM charge_totals WHERE "user" = OLD."user") THEN
            RETURN OLD;
        END IF;
    ELSIF NOT EXISTS (SELECT 1 FROM charges) AND NOT EXISTS (SELECT 1 FROM charge_totals) THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION '{_KEPT}';
END
$body$;
DO $body$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'charge_stamps_kept'
                   AND tgrelid = 'charge_stamps'::regclass) THEN
        CREATE TRIGGER charge_stamps_kept BEFORE DELETE OR UPDATE ON charge_stamps
            FOR EACH ROW EXECUTE FUNCTION veil_charge_stamps_kept();
        CREATE TRIGGER charge_stamps_not_truncated BEFORE TRUNCATE ON charge_stamps
            FOR EACH STATEMENT EXECUTE FUNCTION veil_charge_stamps_kept();
    END IF;
END
$body$;
"""

#: A bump that left the nonce as it was draws one: an older worker process makes ``veil_charges_changed`` (and,
#: on SQLite, a version before marks its triggers) again at its start, with a bump that raises the count and keeps
#: the nonce, which is not 0 once a newer bump drew it. A total kept in memory at a count such a bump reached was
#: trusted again after a restore and another such bump to the same count over other rows. Older versions never
#: make this trigger nor its function again (names they do not know).
POSTGRES_STAMPS_DRAWN = f"""
CREATE OR REPLACE FUNCTION veil_charge_stamps_drawn() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF NEW.edits IS DISTINCT FROM OLD.edits AND NEW.nonce IS NOT DISTINCT FROM OLD.nonce THEN
        NEW.nonce := {_PG_DRAW};
    END IF;
    RETURN NEW;
END
$body$;
DO $body$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'charge_stamps_drawn'
                   AND tgrelid = 'charge_stamps'::regclass) THEN
        CREATE TRIGGER charge_stamps_drawn BEFORE UPDATE ON charge_stamps
            FOR EACH ROW EXECUTE FUNCTION veil_charge_stamps_drawn();
    END IF;
END
$body$;
"""

_PG_LOCK = 'PERFORM 1 FROM budgets WHERE "user" = {row}."user" FOR UPDATE;'

POSTGRES_TRIGGERS = f"""
CREATE OR REPLACE FUNCTION veil_charges_changed() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    -- (a fold's own deletes: it stamps the user once, by its update; a stamp per row, each taking the row lock
    -- and writing charge_stamps, made a fold of 5,000 rows take ~1 s under the lock every charge waits for)
    IF TG_OP = 'DELETE' AND current_setting('veil.folding', true) = 'fold:' || OLD."user" THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        {_PG_LOCK.format(row="NEW")}
        IF EXISTS (SELECT 1 FROM charges WHERE "user" = NEW."user" AND id > NEW.id) THEN
            {_BUMP.format(row="NEW")}
        END IF;
        RETURN NULL;
    END IF;
    {_PG_LOCK.format(row="OLD")}
    {_BUMP.format(row="OLD")}
    IF TG_OP = 'UPDATE' THEN
        {_PG_LOCK.format(row="NEW")}
        {_BUMP.format(row="NEW")}
    END IF;
    RETURN NULL;
END
$body$;
DO $body$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'charges_changed' AND tgrelid = 'charges'::regclass) THEN
        CREATE TRIGGER charges_changed AFTER INSERT OR UPDATE OR DELETE ON charges
            FOR EACH ROW EXECUTE FUNCTION veil_charges_changed();
    END IF;
END
$body$;
CREATE OR REPLACE FUNCTION veil_charges_truncated() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    UPDATE charge_stamps SET edits = edits + 1, nonce = {_PG_DRAW};
    INSERT INTO charge_stamps("user", edits, nonce) SELECT "user", 1, {_PG_DRAW} FROM budgets
        ON CONFLICT("user") DO NOTHING;
    RETURN NULL;
END
$body$;
DO $body$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'charges_truncated' AND tgrelid = 'charges'::regclass)
    THEN
        CREATE TRIGGER charges_truncated AFTER TRUNCATE ON charges
            FOR EACH STATEMENT EXECUTE FUNCTION veil_charges_truncated();
    END IF;
END
$body$;
"""

#: Replay ids by their charge: a fold forgets the folded charges' ids through it (else it read every replay id of
#: the user, up to MAX_CHARGE_ROWS, to find them). Made at every open, after the charge_id column is there.
REQUESTS_BY_CHARGE = 'CREATE INDEX IF NOT EXISTS requests_by_user_charge ON requests ("user", charge_id);'

#: PostgreSQL, before each charge's insert: the id sequence brought above the table's newest id if it fell behind
#: (restarted, or rows restored without it): charges then took ids below a user's newest, which a fold (oldest
#: ids first) took for her oldest and forgot their replay ids at once, and ids still in use failed the charge.
#: SQLite's AUTOINCREMENT never hands out an id below the table's largest.
_SEQUENCE_CAUGHT_UP = """
SELECT setval(seq, GREATEST(top, COALESCE(pg_sequence_last_value(seq), 0))) FROM (
    SELECT pg_get_serial_sequence('charges', 'id')::regclass AS seq, (SELECT MAX(id) FROM charges) AS top) s
WHERE top > COALESCE(pg_sequence_last_value(seq), 0)
"""

#: Columns later versions added to tables of older files: (table, column, type and default).
_ADDED_COLUMNS = (
    ("charge_totals", "edits", "BIGINT NOT NULL DEFAULT -1"),  # (-1: never a stamp, so summed again once)
    ("charge_totals", "row_count", "BIGINT NOT NULL DEFAULT 0"),
    ("requests", "charge_id", "BIGINT"),
    ("charge_stamps", "nonce", "BIGINT NOT NULL DEFAULT 0"),  # (0: none drawn, a total in memory not trusted)
)


def create(db: Database) -> None:
    """The stamps, the added columns and the triggers (after the ledger's tables and ``charge_totals``)."""
    db.executescript(STAMPS)
    ledger_generation.create(db)
    _add_missing_columns(db)  # (first: the triggers write charge_stamps.nonce)
    if db.dialect == "sqlite":
        _create_sqlite_triggers(db)
    else:
        db.executescript(POSTGRES_TRIGGERS)
        db.executescript(POSTGRES_STAMPS_KEPT)
        db.executescript(POSTGRES_STAMPS_DRAWN)
    db.executescript(REQUESTS_BY_CHARGE)  # (an older file, and one `veil db migrate` fills, get it at open)


def _add_missing_columns(db: Database) -> None:
    if _missing_columns(db):  # (nothing written when all are there: a read-only standby still opens)
        with db.write_transaction():
            if db.dialect == "postgresql":  # (first: replicas starting at once read, then alter, one at a time;
                # each holding the read's lock while waiting to alter was a deadlock)
                db.execute("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(b"veil ledger_rows columns"),))
            for table, column, kind in _missing_columns(db):
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def ids_rise(db: Database) -> None:
    """In a charge's transaction, before its insert: the next charge id is above every id in the table (see
    :data:`_SEQUENCE_CAUGHT_UP`; one index look-up on PostgreSQL, nothing on SQLite)."""
    if db.dialect == "postgresql":
        db.execute(_SEQUENCE_CAUGHT_UP)


def _missing_columns(db: Database) -> list[tuple[str, str, str]]:
    have = {table: {d[0].lower() for d in db.execute(f"SELECT * FROM {table} LIMIT 0").description}
            for table in {t for t, _c, _k in _ADDED_COLUMNS}}
    return [(t, c, k) for t, c, k in _ADDED_COLUMNS if c not in have[t]]


def edits(db: Database, user: str) -> int:
    """How many times the user's rows were changed other than by an append (0: never)."""
    row = db.execute('SELECT edits FROM charge_stamps WHERE "user" = ?', (user,)).fetchone()
    return 0 if row is None else int(row[0])


def stamp(db: Database, user: str) -> tuple[int, int]:
    """The user's stamp: its count (:func:`edits`) and the nonce its last bump drew; a user never changed: 0 and
    the ledger's generation (:mod:`veil.dp.ledger_generation`). A nonce of 0: none known (a bump by an older
    version's trigger, a ledger without a generation)."""
    count, nonce, generation = db.execute(
        'SELECT (SELECT edits FROM charge_stamps WHERE "user" = ?), '
        '(SELECT nonce FROM charge_stamps WHERE "user" = ?), (SELECT generation FROM ledger_generation)',
        (user, user)).fetchone()
    if count is None:
        return 0, int(generation or 0)
    return int(count), int(nonce)


def _sum_upward(values: list[float]) -> float:
    """The sum of ``values``, correctly rounded and then raised by an ulp if that rounded it down."""
    try:
        total = math.fsum(values)
    except OverflowError:  # (past the largest float: charges of 1e308 on an unlimited budget failed every fold)
        return math.inf if math.fsum(v * 2.0 ** -64 for v in values) > 0 else -sys.float_info.max
    if math.isfinite(total) and math.fsum(values + [-total]) > 0:
        total = math.nextafter(total, math.inf)
    return total


def fold_oldest(db: Database, user: str, total: "Total") -> "Total":
    """In the charge's transaction (the user's lock held): folds the user's oldest rows into one when she has
    more than :data:`MAX_CHARGE_ROWS` (at most :data:`FOLD_AT_MOST` at a time), and forgets their replay ids;
    returns ``total`` with its row count and stamp brought to what is left (its sums stand: they never counted
    less than the folded rows held)."""
    if total.row_count <= MAX_CHARGE_ROWS:
        return total
    rows = db.execute('SELECT id, epsilon, delta, at FROM charges WHERE "user" = ? ORDER BY id LIMIT ?',
                      (user, min(total.row_count - KEEP_CHARGE_ROWS + 1, FOLD_AT_MOST))).fetchall()
    if len(rows) < 2:
        return dataclasses.replace(total, row_count=len(rows))
    first, last = int(rows[0][0]), int(rows[-1][0])
    # (these deletes are not stamped, for this transaction only: the update below stamps her once. PostgreSQL: the
    # trigger skips them. SQLite: no trigger runs while it is dropped, which no other connection sees, and a
    # stamp per row, even one the trigger's WHEN skipped, made a fold of 5,001 rows take 14-25 ms under the lock)
    if db.dialect == "postgresql":
        db.execute("SELECT set_config('veil.folding', ?, true)", ("fold:" + user,))
    else:
        db.execute("DROP TRIGGER IF EXISTS charges_deleted")
    db.execute('DELETE FROM charges WHERE "user" = ? AND id > ? AND id <= ?', (user, first, last))
    if db.dialect == "postgresql":
        db.execute("SELECT set_config('veil.folding', '', true)")
    else:
        _make_sqlite_trigger(db, "charges_deleted")
    db.execute('UPDATE charges SET epsilon = ?, delta = ?, reason = ?, at = ? WHERE id = ?',
               (_sum_upward([float(r[1]) for r in rows]), _sum_upward([float(r[2]) for r in rows]),
                f"compacted: the sum of {len(rows)} older rows (the ledger keeps a user's newest "
                f"{KEEP_CHARGE_ROWS} to {MAX_CHARGE_ROWS} charges one by one)",
                max(float(r[3]) for r in rows), first))
    db.execute('DELETE FROM requests WHERE "user" = ? AND charge_id <= ?', (user, last))
    # (replay ids an older process wrote, or an import, carry no charge id: tied to the newest charge, they stay
    # until it is folded; forgotten here, an older process's id charged a moment ago was charged again)
    db.execute('UPDATE requests SET charge_id = ? WHERE "user" = ? AND charge_id IS NULL', (total.last_id, user))
    return dataclasses.replace(total, row_count=total.row_count - len(rows) + 1, edits=edits(db, user))
