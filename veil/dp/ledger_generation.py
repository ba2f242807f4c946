"""The budget ledger's generation: a random number drawn when the ledger's database is made, and drawn again by
every import into it (``veil db migrate``).

A user whose rows were never changed but by appends has no stamp (:mod:`veil.dp.ledger_rows`): stamp 0 in any
ledger. A running total a worker keeps in memory for her (summed where the database's own was stale: an older
file, rows an older process appended) is trusted only while the generation is the one it was summed at, so a
different ledger put in the file's place, or imported into a served database, is never read through a total of
the old one's rows. A copy of the same file (a restore) keeps the generation: its rows are those the total summed,
or fewer, and a charge on it writes the database's own total, which is preferred.
"""

from __future__ import annotations

import secrets

from veil.workers.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_generation (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    generation BIGINT NOT NULL
);
"""


def _draw() -> int:
    """A random non-zero signed 64-bit number (0 reads as none drawn)."""
    return int.from_bytes(secrets.token_bytes(8), "big", signed=True) or 1


def create(db: Database) -> None:
    """The table and, where it has none (a new ledger, or an older file), a generation: nothing written when it
    is there (a read-only standby still opens)."""
    db.executescript(SCHEMA)
    if db.execute("SELECT 1 FROM ledger_generation").fetchone() is None:
        with db.write_transaction():  # (replicas starting at once: the first one's stands)
            db.execute("INSERT INTO ledger_generation(one, generation) VALUES (1, ?) ON CONFLICT(one) DO NOTHING",
                       (_draw(),))


def renew(db: Database) -> None:
    """A new generation (in an import's transaction: the rows it brings are another history's)."""
    db.execute("INSERT INTO ledger_generation(one, generation) VALUES (1, ?) "
               "ON CONFLICT(one) DO UPDATE SET generation = excluded.generation", (_draw(),))
