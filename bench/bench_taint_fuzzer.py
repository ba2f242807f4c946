"""Long taint-fuzzer run: how many random requests, how many sentinel leaks, by hole.

    .venv/bin/python bench/bench_taint_fuzzer.py [--virtual N] [--network N] [--seed S]

Same engine as tests/security/test_taint_fuzzer.py (tests/security/taint_fuzz.py):
a worker holding private and DP-only sentinel tensors gets N random requests of
every message type and every allowlisted op / worker function, with owner
references in every argument position, as scientist, serving client and peer.
Prints messages, messages/s, leaks per hole, whether owner data stayed
bit-identical and whether the worker still serves. Baseline for the rate: the
same worker answering N trivial ``torch.ones`` commands.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "security"))

import veil as sy  # noqa: E402
import veil.dp  # noqa: E402,F401
import veil.he  # noqa: E402,F401
import veil.mpc  # noqa: E402,F401
import veil.plans  # noqa: E402,F401
import veil.serving  # noqa: E402,F401
from veil.messaging import messages as m  # noqa: E402
from taint_fuzz import NetworkTarget, VirtualTarget, bit_identical, run_fuzz  # noqa: E402


def _baseline(target, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        target.send("scientist", m.CommandMessage("torch.ones", [2], {}, None))
    return n / (time.perf_counter() - t0)


def _one(kind: str, target, n: int, seed: int) -> dict:
    before = target.owner_tensors()
    base_rate = _baseline(target, min(n, 500))
    t0 = time.perf_counter()
    report = run_fuzz(target, n, seed)
    elapsed = time.perf_counter() - t0
    changed = bit_identical(before, target.owner_tensors())
    serves = target.serves()
    print(f"{kind}: {report.messages} messages in {elapsed:.1f} s ({report.messages / elapsed:.0f}/s; "
          f"trivial-command baseline {base_rate:.0f}/s), leaks {len(report.leaks)}, "
          f"owner data changed: {changed or 'none'}, still serves: {serves}")
    for hole, count in report.by_hole().most_common():
        print(f"    {count:6d}  {hole}")
    print(f"    replies: {dict(report.replies)}")
    return {"messages": report.messages, "leaks": len(report.leaks), "by_hole": report.by_hole()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--virtual", type=int, default=100_000, help="requests against a VirtualWorker")
    p.add_argument("--network", type=int, default=10_000, help="requests against a `veil worker` process")
    p.add_argument("--seed", type=int, default=2026)
    args = p.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    hook = sy.TorchHook(torch)
    if args.virtual:
        _one("virtual", VirtualTarget(hook), args.virtual, args.seed)
    if args.network:
        target = NetworkTarget(tempfile.mkdtemp())
        try:
            _one("network", target, args.network, args.seed + 1)
            print(f"    reconnects: {target.reconnects}")
        finally:
            target.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
