"""In-process SMPC: dealing ahead and the online call, cycle after cycle, with their page faults.

Run: ``.venv/bin/python bench/bench_deal_cycles.py [--cycles 41] [workload ...]`` (workloads of ``bench_mpc.op_cases``;
default ``"mul 1e6" "matmul 256^3"``).

Each cycle deals one call's material ahead (``WorkerDealer.deal_ahead``, timed) and then runs the call on it alone
(timed): the two halves of ``bench_crypten``'s "ahead + online" column over VirtualWorkers, many times, printing the
minimum and median of the dealing, the online call and their sum, and the minor page faults per cycle (a fresh
buffer costs its faults: the in-process copies this measures). To compare two trees, run it from each with
``PYTHONPATH=<tree>`` in turn (the bench's own helpers come from this file's folder): the other tree is the baseline.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_mpc import dealing_plan, op_cases, virtual_setup  # noqa: E402

from veil.mpc.providers.worker_dealer import dealer_for  # noqa: E402


def cycles(name: str, parties, cp, me, n: int) -> dict:
    _, shared, fn, _ = [c for c in op_cases(parties, cp) if c[0] == name][0]

    def call():
        return fn(*shared)

    call()
    call()
    plan = dealing_plan(call, cp, me)
    dealer = dealer_for(cp, me)
    deal, online = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t0 = time.perf_counter()
        dealer.deal_ahead(plan)
        t1 = time.perf_counter()
        dealer.on_exhausted = "raise"  # (the online call deals nothing)
        try:
            call()
        finally:
            dealer.on_exhausted = "deal"
        deal.append(t1 - t0)
        online.append(time.perf_counter() - t1)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
    total = [a + b for a, b in zip(deal, online)]
    return {"deal": deal, "online": online, "total": total, "faults": faults}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=41)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (as bench_crypten's veil column)")
    ap.add_argument("workloads", nargs="*", default=["mul 1e6", "matmul 256^3"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}; veil from {os.path.dirname(sys.modules['veil'].__file__)}")
    _, me, parties, cp = virtual_setup(2)
    print("| workload | deal ms (min, median) | online ms | deal + online ms | minor faults per cycle |")
    print("|---|---|---|---|---|")
    for name in args.workloads:
        r = cycles(name, parties, cp, me, args.cycles)
        cells = [f"{min(r[k]) * 1e3:.1f}, {statistics.median(r[k]) * 1e3:.1f}" for k in ("deal", "online", "total")]
        print(f"| {name} | " + " | ".join(cells) + f" | {r['faults']:.0f} |")


if __name__ == "__main__":
    main()
