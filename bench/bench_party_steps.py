"""CPU time and page faults of the parties' local steps of one fixed-point product (no messages).

Run (from /tmp to compare trees): ``PYTHONPATH=<tree> python <tree>/bench/bench_party_steps.py [--n 1000000]
[--calls 40] [--alive-mb 160]``

Calls each party function of the tree on ``PYTHONPATH`` (Beaver combine for party 0 and party 1, truncation
finish for party 0 and for the others from packed top bits) on random ring tensors of ``--n`` entries, with
``--alive-mb`` of other tensors alive in the heap (as a party's store holds): printed per step, CPU ms min /
median of ``--calls`` calls and minor page faults per call. A fresh tensor of the product's size costs a pass
over memory; when two are alive at once glibc may trim the heap top on free and fault every page in again
on the next call, which the fault column shows (the wall clock on a shared box does not).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from veil.mpc import truncation
from veil.mpc.party import PARTY_FUNCTIONS


def _per_call(fn, calls: int) -> str:
    times = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
        del out
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / calls
    return f"{min(times) * 1e3:.2f}/{statistics.median(times) * 1e3:.2f} ms ({faults:.0f} faults)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--alive-mb", type=int, default=160)
    ap.add_argument("--divisor", type=int, default=1 << 16)
    args = ap.parse_args()
    torch.set_num_threads(1)

    def ring(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int64).random_(-(2**63), None)

    a, b, c, e, f, q, g = (ring(args.n) for _ in range(7))
    alive = [ring(1 << 20) for _ in range(args.alive_mb // 8)]  # noqa: F841  (kept alive on purpose)
    bits = truncation.pack_top_bits(c)
    combine, finish = PARTY_FUNCTIONS["beaver_combine"], PARTY_FUNCTIONS["trunc_finish"]
    steps = [
        ("combine, party 0", lambda: combine(a, b, c, e, f, op="mul", first=True, op_kwargs={})),
        ("combine, party 1", lambda: combine(a, b, c, e, f, op="mul", first=False, op_kwargs={})),
        ("truncation finish, party 0", lambda: finish(c, q, g, divisor=args.divisor, first=True)),
        ("truncation finish, party 1", lambda: PARTY_FUNCTIONS["trunc_finish_bits"](bits, q, g)),
    ]
    for name, fn in steps:
        print(f"{name}: {_per_call(fn, args.calls)}")


if __name__ == "__main__":
    main()
