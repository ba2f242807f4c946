"""Privacy-ledger charges per second: SQLite file vs PostgreSQL, 1 and 4 worker processes.

Run: .venv/bin/python bench/bench_db_ledger.py [--charges 400] [--folds 3 | --only-folds | --no-folds]

Each process opens its own BudgetLedger (as each `veil worker` replica does) and
charges a small epsilon in a loop; "same user" makes every charge contend for
one user's row lock (the worst case: all replicas serving one data scientist),
"own user" gives each process its own user. PostgreSQL is a throwaway server
started here (tests/scale/postgres_server.py: Debian's binaries, fsync off as
in the tests, so these are upper bounds for a durable server). Baseline: the
same loop on an SQLite file (one writer at a time, on one machine only).

Folds (veil.dp.ledger_rows): the charge that takes a user past MAX_CHARGE_ROWS rows folds her oldest into one,
in the transaction every charge waits for. Timed per statement, on SQLite and PostgreSQL, without and with the
``requests("user", charge_id)`` index (dropped for the first: the baseline in the same run), beside an ordinary
charge of that user (median of 20). Then a PostgreSQL charge with and without the check that keeps charge ids
rising (``ledger_rows.ids_rise``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.scale.postgres_server import PostgresServer  # noqa: E402
from veil.dp import BudgetLedger, ledger_rows  # noqa: E402


def _charge(url: str, user: str, n: int, start, out) -> None:
    ledger = BudgetLedger(url)
    start.wait()
    t = time.perf_counter()
    for _ in range(n):
        ledger.charge(user, 1e-6, 0.0, "bench")
    out.put(time.perf_counter() - t)
    ledger.close()


def run(url: str, procs: int, n: int, same_user: bool) -> float:
    users = ["u"] * procs if same_user else [f"u{i}" for i in range(procs)]
    with BudgetLedger(url) as ledger:
        for u in set(users):
            ledger.set_budget(u, 1e6, 0.0)
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=_charge, args=(url, u, n, start, out)) for u in users]
    for p in ps:
        p.start()
    t = time.perf_counter()
    start.set()
    for _ in ps:
        out.get()
    wall = time.perf_counter() - t
    for p in ps:
        p.join()
    return procs * n / wall


_REQUESTS_INDEX = "requests_by_user_charge"


def _append_rows(ledger: BudgetLedger, user: str, n: int) -> None:
    """n charges of ``user`` with their replay ids, appended in one transaction (as n charges would leave)."""
    db = ledger._db
    with db.write_transaction():
        top = db.execute("SELECT COALESCE(MAX(id), 0) FROM charges").fetchone()[0]
        db.execute('WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) '
                   'INSERT INTO charges("user", epsilon, delta, reason, at) '
                   "SELECT CAST(? AS TEXT), 1e-6, 0, 'bench', CAST(? AS DOUBLE PRECISION) FROM n",
                   (n, user, time.time()))
        db.execute('INSERT INTO requests("user", request_id, charge_id) '
                   """SELECT "user", 'bulk-' || CAST(id AS TEXT), id FROM charges WHERE "user" = ? AND id > ?""",
                   (user, top))


def fold_cost(url: str, with_index: bool, stamp_each_row: bool, folds: int) -> tuple[float, float, dict]:
    """(median fold charge s, median ordinary charge s, median s per fold statement) for one user at the bound,
    beside 4 other users with as many rows and replay ids. ``stamp_each_row``: the fold's deletes stamp the user
    per row as before (PostgreSQL: the fold's marker for the stamp trigger is not set; SQLite: its delete trigger is
    not dropped)."""
    timings: dict[str, list[float]] = {}
    ledger = BudgetLedger(url)
    db = ledger._db
    if with_index:
        db.execute(f'CREATE INDEX IF NOT EXISTS {_REQUESTS_INDEX} ON requests ("user", charge_id)')
    else:
        db.execute(f"DROP INDEX IF EXISTS {_REQUESTS_INDEX}")
    for other in ("o1", "o2", "o3", "o4"):
        ledger.set_budget(other, 1e6, 0.0)
        _append_rows(ledger, other, ledger_rows.MAX_CHARGE_ROWS)
    ledger.set_budget("u", 1e6, 0.0)
    _append_rows(ledger, "u", ledger_rows.MAX_CHARGE_ROWS - 1)
    ledger.charge("u", 1e-6, 0.0, "bench", request_id="u-first")  # (the total caught up: exactly MAX rows)
    plain = []
    for i in range(20):  # ordinary charges: each one in, the bound kept by deleting the oldest plain row
        t = time.perf_counter()
        ledger.charge("u", 1e-6, 0.0, "bench", request_id=f"u-plain-{i}")
        plain.append(time.perf_counter() - t)
    real_execute, real_fold = db.execute, ledger_rows.fold_oldest
    fold_s: list[float] = []

    def timed_execute(sql, params=()):
        if stamp_each_row and ("veil.folding" in sql or "TRIGGER" in sql and "charges_deleted" in sql):
            return None  # (the marker, or SQLite's drop and making again of the delete trigger, left out)
        t = time.perf_counter()
        out = real_execute(sql, params)
        timings.setdefault(" ".join(sql.split()[:3]), []).append(time.perf_counter() - t)
        return out

    def timed_fold(d, user, total):
        if total.row_count <= ledger_rows.MAX_CHARGE_ROWS:
            return real_fold(d, user, total)
        db.execute = timed_execute
        try:
            return real_fold(d, user, total)
        finally:
            db.execute = real_execute

    ledger_rows.fold_oldest = timed_fold
    try:
        for n in range(folds):
            rows = db.execute('SELECT COUNT(*) FROM charges WHERE "user" = ?', ("u",)).fetchone()[0]
            _append_rows(ledger, "u", ledger_rows.MAX_CHARGE_ROWS - rows)  # (at the bound again)
            ledger.spent("u")
            t = time.perf_counter()
            ledger.charge("u", 1e-6, 0.0, "bench", request_id=f"u-fold-{n}")
            fold_s.append(time.perf_counter() - t)
    finally:
        ledger_rows.fold_oldest = real_fold
        ledger.close()
    return (statistics.median(fold_s), statistics.median(plain),
            {k: statistics.median(v) for k, v in timings.items()})


def print_folds(server: PostgresServer, folds: int) -> None:
    print(f"\nfold of {ledger_rows.MAX_CHARGE_ROWS - ledger_rows.KEEP_CHARGE_ROWS + 1} rows at "
          f"{ledger_rows.MAX_CHARGE_ROWS} (median of {folds}; an ordinary charge of that user beside it)")
    for name, make in (("SQLite", lambda: str(Path(tempfile.mkdtemp()) / "ledger.sqlite3")),
                       ("PostgreSQL", server.new_database)):
        for label, with_index, stamp_each_row in (("before: no index, a stamp per folded row", False, True),
                                                  ("index, a stamp per folded row", True, True),
                                                  ("after: index, one stamp per fold", True, False)):
            fold, plain, parts = fold_cost(make(), with_index, stamp_each_row, folds)
            print(f"{name:>10} {label:<42} fold charge {fold * 1e3:7.1f} ms, ordinary charge {plain * 1e3:6.2f} ms")
            for statement, s in parts.items():
                print(f"{'':>12}{statement:<28} {s * 1e3:8.2f} ms")


def ids_rise_cost(url: str, n: int = 300) -> tuple[float, float]:
    """Median s of a PostgreSQL charge with and without ``ledger_rows.ids_rise`` (the id sequence's check before
    each insert), interleaved on one ledger."""
    real, times = ledger_rows.ids_rise, ([], [])
    with BudgetLedger(url) as ledger:
        ledger.set_budget("u", 1e6, 0.0)
        try:
            for i in range(2 * n):
                ledger_rows.ids_rise = real if i % 2 == 0 else (lambda db: None)
                t = time.perf_counter()
                ledger.charge("u", 1e-6, 0.0, "bench", request_id=f"r-{i}")
                times[i % 2].append(time.perf_counter() - t)
        finally:
            ledger_rows.ids_rise = real
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--charges", type=int, default=400, help="per process")
    ap.add_argument("--folds", type=int, default=3, help="folds timed per database and index setting")
    ap.add_argument("--only-folds", action="store_true", help="time the folds only")
    ap.add_argument("--no-folds", action="store_true", help="time the charges per second only")
    args = ap.parse_args()
    server = PostgresServer()
    try:
        if not args.no_folds:
            print_folds(server, args.folds)
            with_check, without = ids_rise_cost(server.new_database())
            print(f"PostgreSQL charge with the id sequence check {with_check * 1e3:.2f} ms, without "
                  f"{without * 1e3:.2f} ms (median of 300 each, interleaved)")
        if args.only_folds:
            return
        rows = []
        for procs, same in ((1, True), (4, True), (4, False)):
            lite = str(Path(tempfile.mkdtemp()) / "ledger.sqlite3")
            pg = server.new_database()
            rows.append((procs, same, run(lite, procs, args.charges, same), run(pg, procs, args.charges, same)))
        print(f"\nledger charges per second ({args.charges} per process)")
        print(f"{'processes':>9} {'users':>9} {'SQLite':>8} {'PostgreSQL':>10} {'PG/SQLite':>9}")
        for procs, same, lite, pg in rows:
            print(f"{procs:>9} {'same' if same else 'own':>9} {lite:8.0f} {pg:10.0f} {pg / lite:9.2f}x")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
