"""``veil db migrate --from DATA_DIR --to postgresql://...``: an owner's SQLite state into PostgreSQL.

Copies both files a worker keeps under ``--data-dir`` (``veil-worker.sqlite3``:
audit log, key-value state, ledger entries; ``veil-dp-budget.sqlite3``: privacy
budgets, charges and their running totals, training accountants) row for row, ids included, in one
PostgreSQL transaction: either everything lands or nothing does. It refuses a
target whose tables already hold rows (no silent merge of two histories), and
never modifies the source files. Afterwards start the workers with ``--db URL``
instead of ``--data-dir``.

A source file that lacks its core tables (not a worker's state file) is refused,
not copied as zero rows. PostgreSQL text cannot hold NUL characters, which SQLite
keeps (text a scientist typed in an older version): each is copied as U+FFFD.
"""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

from veil.exceptions import CommandLineError
from veil.workers.database import Database, OwnerStateUnavailableError, is_database_url, redact

# file -> [(table, columns, identity column or None)]; the schemas are the owners' modules'.
_TABLES = {
    "veil-worker.sqlite3": [
        ("audit", ["seq", "ts", "worker", "action", "principal", "session", "object_ids", "outcome", "detail"], "seq"),
        ("kv", ["namespace", "key", "value", "updated"], None),
        ("ledger", ["seq", "ts", "namespace", "key", "amount", "note"], "seq"),
        ("release_requests", ["id", "ts", "worker", "principal", "session", "object_id", "reason", "shape", "dtype",
                              "digest", "sources", "graph", "state", "message", "decided_ts", "decided_by"], None),
    ],
    "veil-dp-budget.sqlite3": [
        ("budgets", ["user", "epsilon", "delta"], None),
        # (before the charges, copied in id order: appends, which the stamps' triggers do not count; the nonce of
        # each stamp's last bump with it: the copy is the same history, and a total kept in memory is checked by it)
        ("charge_stamps", ["user", "edits", "nonce"], None),
        ("charges", ["id", "user", "epsilon", "delta", "reason", "at"], "id"),
        # each user's running total (derived: checked against the copied charges' ids and stamps, recomputed if
        # stale; a file of an older version has no stamps, and its totals are summed again)
        ("charge_totals", ["user", "last_id", "epsilon", "epsilon_error", "delta", "delta_error", "edits",
                           "row_count"], None),
        ("training", ["user", "delta", "state", "epsilon"], None),
        # DP replay protection (charge_id: the horizon, veil.dp.ledger_rows; without it every id was tied to the
        # newest charge at the first fold)
        ("requests", ["user", "request_id", "charge_id"], None),
    ],
}
# Columns later versions added to a table (veil.dp.ledger_rows): copied where the source file has them.
_LATER_COLUMNS = {("charge_totals", "edits"), ("charge_totals", "row_count"), ("requests", "charge_id"),
                  ("charge_stamps", "nonce")}
# Tables every version of each file has (the others came later: absent, they copy as zero rows).
_CORE = {"veil-worker.sqlite3": {"audit", "kv", "ledger"}, "veil-dp-budget.sqlite3": {"budgets", "charges"}}


def _create_schemas(url: str) -> None:
    """Creates the target tables through the same classes the workers use."""
    from veil.dp.budget import BudgetLedger
    from veil.workers.persistence import OwnerDB

    from veil.workers.persistence import add_release_requests_table

    owner = OwnerDB(url)
    add_release_requests_table(owner)  # the review queue (veil.governance)
    owner.close()
    BudgetLedger(url).close()


def migrate(data_dir: str | Path, url: str) -> dict[str, int]:
    """Copies the SQLite state under ``data_dir`` into the database at ``url``; returns rows per table.

    Raises:
        ValueError: not a PostgreSQL URL, no state under ``data_dir``, or target tables not empty.
    """
    if not is_database_url(url):
        raise ValueError(f"--to expects a postgresql:// URL, got {redact(url)!r}")
    folder = Path(data_dir)
    present = [name for name in _TABLES if (folder / name).is_file()]
    if not present:
        raise ValueError(f"no veil worker state in {folder} (expected {' or '.join(_TABLES)})")
    from veil.dp import ledger_generation

    _create_schemas(url)
    db = Database(url)
    counts: dict[str, int] = {}
    try:
        with db.write_transaction():
            for name in present:
                # as_uri() percent-encodes '#', '?' and '%' of the path (an f-string URI would cut the path there
                # and open, or create, another file)
                source = sqlite3.connect(f"{(folder / name).resolve().as_uri()}?mode=ro", uri=True)
                try:
                    tables = {r[0] for r in source.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                    missing = sorted(_CORE[name] - tables)
                    if missing:
                        raise ValueError(f"{folder / name} is not a veil worker state file (no table "
                                         f"{', '.join(missing)}): nothing migrated")
                    for table, columns, identity in _TABLES[name]:
                        counts[table] = _copy_table(source, db, table, columns, identity)
                    if name == "veil-dp-budget.sqlite3":  # (another history: a total a served worker kept in
                        ledger_generation.renew(db)  # memory for a never-changed user is not trusted for it)
                finally:
                    source.close()
    finally:
        db.close()
    return counts


def _copy_table(source: sqlite3.Connection, db: Database, table: str, columns: list[str],
                identity: str | None) -> int:
    if db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]:
        raise ValueError(f"table {table!r} in the target database already holds rows: migrate into an empty database")
    # a file of an older version lacks the later columns, which take their defaults (a total's stamp -1: summed
    # again; a replay id's charge id NULL: tied to the newest charge at a fold); selecting one it lacks failed,
    # and the whole table (its replay ids) copied as zero rows
    have = {r[1] for r in source.execute(f"PRAGMA table_info({table})")}
    columns = [c for c in columns if c in have or (table, c) not in _LATER_COLUMNS]
    quoted = ", ".join(f'"{c}"' for c in columns)
    try:
        # unquoted: SQLite reads a double-quoted name of a missing column as a string literal
        rows = source.execute(f"SELECT {', '.join(columns)} FROM {table}"
                              + (f" ORDER BY {identity}" if identity else "")).fetchall()
    except sqlite3.OperationalError:  # a file from a version without this (non-core) table
        return 0
    marks = ", ".join("?" for _ in columns)
    for row in rows:
        db.execute(f"INSERT INTO {table} ({quoted}) VALUES ({marks})", tuple(_value(v) for v in row))
    if identity is not None and rows:  # new rows continue after the copied ids
        db.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{identity}'), "
                   f"(SELECT MAX({identity}) FROM {table}))")
    return len(rows)


def _value(v: object) -> object:
    """A SQLite value as PostgreSQL takes it: bytes for a BLOB, U+FFFD for each NUL in text."""
    if isinstance(v, memoryview):
        return bytes(v)
    if isinstance(v, str) and "\x00" in v:
        return v.replace("\x00", "\ufffd")
    return v


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="db_command", required=True)
    m = sub.add_parser("migrate", help="copy a worker's SQLite --data-dir state into PostgreSQL")
    m.add_argument("--from", dest="source", required=True, help="the worker's --data-dir")
    m.add_argument("--to", dest="target", required=True, help="postgresql://... (an empty database)")


def run(args: argparse.Namespace) -> int:
    import psycopg

    try:
        counts = migrate(args.source, args.target)
    except (ValueError, ConnectionError, OwnerStateUnavailableError) as e:
        raise CommandLineError(str(e)) from None
    except (psycopg.Error, sqlite3.Error) as e:  # one line, not a traceback; nothing was committed
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CommandLineError(f"{type(e).__name__}: {redact(detail)} (nothing migrated)") from None
    print(f"migrated {args.source} -> {redact(args.target)}: "
          + ", ".join(f"{table} {n}" for table, n in counts.items()), flush=True)
    return 0
