"""Red team, second pass: the ledger's running totals (veil/dp/charge_totals.py, d1082bb) and the budget query
outside the turn (c53d3fe). The one property: a scientist never spends more than her budget, so the spent total
the ledger judges a charge by is never below the exact sum of her charges, and what she is told agrees with it.

Holes found (fixed):

- a recomputed total (an older file, rows appended by an older process) added the database's rounding bound of
  the *signed* sum: rows an older version wrote with negative epsilon cancel in the sum, not in its rounding
  error, so the sum came out below the exact one with a bound of 0 (rows 1, 1000 x 2**-53, -1: spent 0 where
  1.1e-13 was spent; a budget of 1e-13 then took another 1e-13). The bound is of the sum of magnitudes now.
- a full re-sum counted ids above 0 only: rows an import numbered from 0 or below (SQLite takes any rowid
  given) were left out, so a user whose rows were all there had spent nothing.
- the budget query (``veil.dp.budget``) read remaining and spent under two holds of the ledger: a charge landing
  between them made the answer disagree with the ledger (left + spent above the budget). One read now.

Attacks that hold (guarded below): concurrent charges of one user from two processes on PostgreSQL while a third
re-sums the stale total and an older process appends rows (ids of different transactions commit out of order,
but a user's charges are serialized by her budgets row lock, so her ids are monotonic in commit order).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from veil.dp import BudgetLedger
from veil.dp.budget import _SCHEMA as LEDGER_SCHEMA
from veil.dp.errors import BudgetExceededError
from veil.workers.database import Database

from tests.scale import conftest as _postgres
from tests.security.test_redteam_ledger_scale import append_as_an_older_version

pg_url, postgres_server = _postgres.pg_url, _postgres.postgres_server  # (fixtures: a real PostgreSQL)


def _exact_spent(db: Database, user: str) -> Fraction:
    return sum((Fraction(float(r[0])) for r in db.execute('SELECT epsilon FROM charges WHERE "user" = ?', (user,))),
               Fraction(0))


def test_negative_rows_of_an_older_version_do_not_hide_spent_budget(tmp_path):
    """An older file whose rows cancel: 1, a thousand 2**-53, then -1 (what an older version's negative charge
    left). A plain sum gives 0; the ledger must count at least the exact 1.1e-13 and refuse a charge that the
    budget of 1e-13 no longer holds."""
    path = tmp_path / "ledger.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(LEDGER_SCHEMA)
    old.execute('INSERT INTO budgets("user", epsilon, delta) VALUES (?, ?, ?)', ("mallory", 1e-13, 1e-5))
    rows = [1.0] + [2.0 ** -53] * 1000 + [-1.0]
    old.executemany('INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, ?, 0, ?, 0)',
                    [("mallory", e, "older version") for e in rows])
    old.commit()
    old.close()
    with BudgetLedger(path) as ledger:
        exact = _exact_spent(ledger._db, "mallory")
        assert exact > Fraction(1e-13)  # (already over her budget)
        assert Fraction(ledger.spent("mallory")[0]) >= exact
        assert Fraction(ledger.remaining("mallory")[0]) <= Fraction(1e-13) - exact
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 1e-13, 0.0, "does not fit")


def test_a_stale_total_caught_up_over_negative_rows_is_not_below_the_exact_sum(tmp_path):
    """The catch-up path (a running total, then rows an older process appended) adds the same bound."""
    path = tmp_path / "ledger.sqlite3"
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 2.0, 1e-5)
        ledger.charge("mallory", 0.5, 0.0, "new process")
        append_as_an_older_version(path, "mallory", [1.0] + [2.0 ** -53] * 500 + [-1.0])
        exact = _exact_spent(ledger._db, "mallory")
        assert Fraction(ledger.spent("mallory")[0]) >= exact
        assert Fraction(ledger.remaining("mallory")[0]) <= 2 - exact


def test_the_budget_query_agrees_with_itself_while_another_session_charges(monkeypatch):
    """``veil.dp.budget`` answers (left, spent) of one moment: a charge of another of the user's sessions landing
    during the query must not make left + spent exceed her budget."""
    from veil.dp.worker_functions import _budget
    from veil.dp.worker_owner import enable_dp
    import veil as sy

    hook = sy.TorchHook(torch)
    w = sy.VirtualWorker(hook, id=f"ledger-second-{time.monotonic_ns()}")
    settings = enable_dp(w, budgets={"alice": (1.0, 1e-5)})
    w.requesting_user = lambda: "alice"
    ledger = settings.ledger
    spent_of_one_read = type(ledger)._spent
    calls = [0]

    def spent_then_another_charge(self, user, db=None):
        out = spent_of_one_read(self, user, db)
        calls[0] += 1
        if calls[0] == 1:  # another session's charge lands right after the query's first read
            self.charge(user, 0.25, 0.0, "another session")
        return out

    monkeypatch.setattr(type(ledger), "_spent", spent_then_another_charge)
    try:
        left_eps, left_delta, spent_eps, spent_delta = (float(v) for v in _budget(w))
        assert left_eps + spent_eps == pytest.approx(1.0)
        assert left_delta + spent_delta == pytest.approx(1e-5)
    finally:
        ledger.close()


@pytest.mark.slow
def test_postgres_concurrent_charges_and_re_sums_never_overspend(pg_url):
    """PostgreSQL: two processes charge one user at once (their ids come from one sequence, committed in any
    order across users), a third re-sums her stale total again and again (the budget query's store), an older
    process appends rows without the running total. Must hold: the rows never exceed the budget, and the stored
    total, once caught up, is the rows' sum."""
    with BudgetLedger(pg_url) as setup:
        setup.set_budget("mallory", 1.0, 1e-5)
        setup.set_budget("bob", 1000.0, 1e-5)
    ledgers = [BudgetLedger(pg_url) for _ in range(3)]
    older = Database(pg_url)
    stop = threading.Event()
    errors: list[BaseException] = []

    def charging(ledger: BudgetLedger, user: str) -> None:
        try:
            while not stop.is_set():
                try:
                    ledger.charge(user, 0.01, 0.0, "DP query")
                except BudgetExceededError:
                    if user == "mallory":
                        return
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def re_summing() -> None:
        try:
            while not stop.is_set():
                ledgers[2].remaining("mallory")
                with older.write_transaction():  # an older version: under her row lock, no running total
                    older.execute('SELECT 1 FROM budgets WHERE "user" = ? FOR UPDATE', ("mallory",))
                    older.execute('INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, 0.001, 0, ?, 0)',
                                  ("mallory", "older process"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=charging, args=(ledgers[0], "mallory")),
               threading.Thread(target=charging, args=(ledgers[1], "mallory")),
               threading.Thread(target=charging, args=(ledgers[1], "bob")),
               threading.Thread(target=re_summing)]
    for t in threads:
        t.start()
    threads[0].join(60)
    threads[1].join(60)
    stop.set()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        exact = _exact_spent(ledgers[0]._db, "mallory")
        # the older process charges without looking at the budget; each charge of a newer one must have fit the
        # sum of all her rows before it (in id order, her commit order)
        running = Fraction(0)
        checked = 0
        for epsilon, reason in ledgers[0]._db.execute(
                'SELECT epsilon, reason FROM charges WHERE "user" = ? ORDER BY id', ("mallory",)):
            running += Fraction(float(epsilon))
            if reason == "DP query":
                assert running <= Fraction(1.0) * (1 + Fraction(1, 10 ** 9)), float(running)
                checked += 1
        assert checked >= 10
        spent = Fraction(ledgers[0].spent("mallory")[0])
        assert spent >= exact and spent - exact < Fraction(1, 10 ** 9)
        with pytest.raises(BudgetExceededError):
            ledgers[0].charge("mallory", 0.01, 0.0, "over")
    finally:
        older.close()
        for ledger in ledgers:
            ledger.close()


def test_rows_numbered_from_zero_or_below_count(tmp_path):
    """An older file whose charges an import numbered from 0 (or below: SQLite takes any rowid given): the full
    sum must count them (it summed ids above 0 only: a user whose rows were all at ids <= 0 had spent nothing)."""
    path = tmp_path / "ledger.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(LEDGER_SCHEMA)
    old.execute('INSERT INTO budgets("user", epsilon, delta) VALUES (?, ?, ?)', ("mallory", 1.0, 1e-5))
    old.executemany('INSERT INTO charges(id, "user", epsilon, delta, reason, at) VALUES (?, ?, 0.45, 0, ?, 0)',
                    [(-1, "mallory", "imported"), (0, "mallory", "imported")])
    old.commit()
    old.close()
    with BudgetLedger(path) as ledger:
        assert ledger.spent("mallory")[0] == pytest.approx(0.9)
        with pytest.raises(BudgetExceededError):
            ledger.charge("mallory", 0.2, 0.0, "does not fit")
        ledger.charge("mallory", 0.1, 0.0, "fits")
        assert ledger.remaining("mallory")[0] == pytest.approx(0.0, abs=1e-12)


def test_the_consoles_reader_counts_a_stale_total_without_writing(tmp_path):
    """The console's Budgets page reads with the ledger's read-only connection: on a stale total (rows an older
    process appended) it must count every row and write nothing (a write there fails on a read-only connection,
    or would store a total outside the ledger's lock)."""
    path = tmp_path / "ledger.sqlite3"
    with BudgetLedger(path) as ledger:
        ledger.set_budget("mallory", 1.0, 1e-5)
        ledger.charge("mallory", 0.25, 0.0, "new process")
        append_as_an_older_version(path, "mallory", [0.5])
        stored = ledger._db.execute("SELECT * FROM charge_totals").fetchall()
        reader = ledger.reader()
        with reader.lock:
            assert ledger._spent("mallory", reader)[0] == pytest.approx(0.75)
        assert ledger._db.execute("SELECT * FROM charge_totals").fetchall() == stored
        assert ledger.remaining_and_spent("mallory")[1][0] == pytest.approx(0.75)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([1e-6, 0.001, 0.01, 0.07, 0.1, 0.3]), min_size=2, max_size=30))
def test_the_running_total_is_never_below_the_exact_sum_of_the_charges(epsilons):
    """A compensated running sum ends within a few ulps of the exact sum, on either side: read plainly (total +
    error) it sat below the exact sum of the charges for most such lists (e.g. 0.07, 0.3, 0.001, 0.01, ...), a
    drift in the spender's favour the module promises never to make (and the PostgreSQL test above failed on it
    one run in four). Must hold: spent is never below the exact sum, and within 1e-12 of it."""
    with BudgetLedger(":memory:") as ledger:
        ledger.set_budget("mallory", 100.0, 1e-5)
        for e in epsilons:
            ledger.charge("mallory", e, 0.0, "DP query")
        exact = sum(Fraction(e) for e in epsilons)
        spent = Fraction(ledger.spent("mallory")[0])
        assert exact <= spent <= exact * (1 + Fraction(1, 10 ** 12)), (float(spent), float(exact))
