"""Privacy-ledger charges per second: SQLite file vs PostgreSQL, 1 and 4 worker processes.

Run: .venv/bin/python bench/bench_db_ledger.py [--charges 400]

Each process opens its own BudgetLedger (as each `veil worker` replica does) and
charges a small epsilon in a loop; "same user" makes every charge contend for
one user's row lock (the worst case: all replicas serving one data scientist),
"own user" gives each process its own user. PostgreSQL is a throwaway server
started here (tests/scale/postgres_server.py: Debian's binaries, fsync off as
in the tests, so these are upper bounds for a durable server). Baseline: the
same loop on an SQLite file (one writer at a time, on one machine only).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.scale.postgres_server import PostgresServer  # noqa: E402
from veil.dp import BudgetLedger  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--charges", type=int, default=400, help="per process")
    args = ap.parse_args()
    server = PostgresServer()
    try:
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
