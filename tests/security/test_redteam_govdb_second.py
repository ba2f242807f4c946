"""Red team, second pass on today's governance/DB fixes (test_redteam_governance_db.py).

Attacks, each asserting what must hold:

- principal names that read the same through characters the first fix did not fold (variation selectors,
  a combining grapheme joiner, Hangul or Braille blanks, a trailing or no-break space): refused like case;
- the read-only reader connections (OwnerDB.reader, BudgetLedger.reader): no write gets through, neither a
  second statement in one string, ``SET TRANSACTION READ WRITE`` (PostgreSQL), a SELECT of ``set_config``
  turning the session default off (PostgreSQL), nor ``PRAGMA query_only = 0`` (SQLite); also after the
  server ended the reader's session (the reconnect is read-only too); one reader serves every page load.
"""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

import veil as sy

from tests.scale import conftest as scale_fixtures

postgres_server, pg_url = scale_fixtures.postgres_server, scale_fixtures.pg_url  # fixtures: a real PostgreSQL


# --------------------------------------------------------------------------- names that read the same


@pytest.mark.parametrize("second", [
    "alice\ufe0f",        # a variation selector (category Mn, drawn as nothing)
    "alice\U000e0100",    # a supplementary variation selector
    "alice\u034f",        # the combining grapheme joiner
    "alice\u3164",        # the Hangul filler (a letter, drawn blank)
    "\u115falice",        # the Hangul choseong filler
    "alice\u2800",        # the Braille blank
    "alice ",             # a trailing space
    "alice\u00a0",        # a trailing no-break space
    " alice",             # a leading space
], ids=["vs16", "vs17", "cgj", "hangul-filler", "choseong-filler", "braille-blank", "trailing-space",
        "no-break-space", "leading-space"])
def test_names_told_apart_only_by_a_blank_or_ignorable_character_are_refused(second):
    """The first fix folded case and NFKC forms and refused control/format characters, but a variation
    selector or a combining joiner (category Mn), a Hangul or Braille blank (letters/symbols drawn as
    nothing) or a space at either end made a second principal that ``veil users list`` and the console show
    as ``alice``. Must hold: refused at configuration in either order, in one line."""
    for a, b in (("alice", second), (second, "alice")):
        tokens = sy.TokenTable()
        try:
            tokens.add("redteam-govdb2-token-a", a)
        except ValueError as e:
            assert "\n" not in str(e)
            continue  # (a name with such a character is refused on its own)
        with pytest.raises(ValueError) as caught:
            tokens.add("redteam-govdb2-token-b", b)
        assert "\n" not in str(caught.value)
    tokens = sy.TokenTable()
    tokens.add("redteam-govdb2-token-a", "alice smith")
    with pytest.raises(ValueError):  # (two spaces, or a wide one, read as one)
        tokens.add("redteam-govdb2-token-b", "alice  smith")
    with pytest.raises(ValueError):
        tokens.add("redteam-govdb2-token-b", "alice\u2003smith")
    tokens = sy.TokenTable()  # (names with an inner space, or accented, that read differently stay allowed)
    tokens.add("redteam-govdb2-token-a", "alice smith")
    tokens.add("redteam-govdb2-token-b", "alic\u00e9")
    assert tokens.lookup("redteam-govdb2-token-b").name == "alic\u00e9"


ISSUER_SECRET = "redteam-govdb2-issuer-secret-0123456789"


def test_a_table_principal_named_with_a_fullwidth_slash_like_an_issued_client_is_refused_in_either_order():
    """``client\uff0fx`` (a fullwidth solidus) reads as issued client ``client/x``, and NFKC folds it to that,
    but the issuer check looked for a plain "/" in the name as given: both were admitted, one name on the
    user list for two principals. Must hold: refused whichever is configured second, in one line."""
    tokens = sy.TokenTable()
    tokens.add_issuer(ISSUER_SECRET, "client")
    with pytest.raises(ValueError) as caught:
        tokens.add("redteam-govdb2-token-a", "client\uff0fx")
    assert "\n" not in str(caught.value)
    tokens = sy.TokenTable()
    tokens.add("redteam-govdb2-token-a", "client\uff0fx")
    with pytest.raises(ValueError):
        tokens.add_issuer(ISSUER_SECRET, "client")
    tokens.add_issuer(ISSUER_SECRET, "other")  # (an issuer whose clients' names read differently: allowed)


# --------------------------------------------------------------------------- read-only readers on PostgreSQL


def _refused_write(reader, sql: str) -> bool:
    from veil.workers.database import OwnerStateUnavailableError

    try:
        with reader.lock:
            reader.execute(sql)
    except (psycopg.Error, OwnerStateUnavailableError, sqlite3.Error, ValueError) as e:
        assert "\n" not in str(e).strip()
        return True
    return False


#: writes through a reader: alone, after a read, after turning read-only off for the transaction (PostgreSQL)
#: or the session (SQLite), in a data-modifying WITH
_WRITES = ["DELETE FROM audit",
           "SELECT 1; DELETE FROM audit",
           "BEGIN; SET TRANSACTION READ WRITE; DELETE FROM audit; COMMIT",
           "PRAGMA query_only = 0; DELETE FROM audit",
           "WITH gone AS (DELETE FROM audit RETURNING 1) SELECT COUNT(*) FROM gone"]


def test_the_owner_databases_reader_cannot_write_on_sqlite(tmp_path):
    """Must hold on SQLite: no write gets through the reader (``PRAGMA query_only = 0`` first neither), and
    the owner's rows are unchanged."""
    from veil.workers.persistence import OwnerDB, db_read

    db = OwnerDB(str(tmp_path / "owner.db"))
    try:
        db.audit("w", "query", "alice", "s", ["o1"], "allowed", "kept")
        reader = db.reader()
        assert reader is not db._db
        for sql in (*_WRITES, "PRAGMA query_only = 0", *_WRITES):
            if sql.startswith("PRAGMA"):
                _refused_write(reader, sql)  # (refused or not: the writes after it must be)
                continue
            assert _refused_write(reader, sql), sql
        assert db_read(db, "SELECT principal, detail FROM audit WHERE action = 'query'") == [("alice", "kept")]
    finally:
        db.close()


def test_the_owner_databases_reader_cannot_write_on_postgresql_even_after_a_reconnect(pg_url):
    """The console's pages read on ``OwnerDB.reader()``, whose sessions default to read-only transactions.
    ``BEGIN; SET TRANSACTION READ WRITE; DELETE ...`` in one string deleted the owner's audit rows through
    it. Must hold on PostgreSQL: every write is refused (also after a SELECT that turns the session default
    off), also once the server ended the reader's session and it reconnected; each page load reuses the one
    reader; the rows the owner stored are unchanged."""
    from veil.workers.persistence import OwnerDB, db_read

    db = OwnerDB(pg_url)
    try:
        db.audit("w", "query", "alice", "s", ["o1"], "allowed", "kept")
        reader = db.reader()
        for sql in _WRITES:
            assert _refused_write(reader, sql), sql
        with reader.lock:  # (a single SELECT may change the session's default; no later query may write)
            reader.execute("SELECT set_config('default_transaction_read_only', 'off', false)")
        for sql in _WRITES:
            assert _refused_write(reader, sql), sql
        with psycopg.connect(pg_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (reader._conn.pgconn.backend_pid,))
        for _ in range(2):  # (the first may meet the ended session; the reconnect must be read-only too)
            try:
                db_read(db, "SELECT 1")
            except Exception:  # noqa: BLE001 - the lost session, reported once
                pass
        assert db.reader() is reader
        for sql in _WRITES:
            assert _refused_write(reader, sql), sql
        rows = db_read(db, "SELECT principal, detail FROM audit WHERE action = 'query'")
        assert rows == [("alice", "kept")]
        assert all(db.reader() is reader for _ in range(5))
    finally:
        db.close()
