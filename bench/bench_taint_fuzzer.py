"""Long taint-fuzzer run: how many random requests, how many sentinel leaks, by hole.

    .venv/bin/python bench/bench_taint_fuzzer.py [--virtual N] [--network N] [--seed S] [--recycle K]
        [--minutes M]

Same engine as tests/security/test_taint_fuzzer.py (tests/security/taint_fuzz.py):
a worker holding private and DP-only sentinel tensors gets N random requests of
every message type and every allowlisted op / worker function, with owner
references in every argument position, as scientist, serving client and peer.
Prints messages, messages/s, leaks per hole, whether owner data stayed
bit-identical and whether the worker still serves. Baseline for the rate: the
same worker answering N trivial ``torch.ones`` commands.

``--recycle K``: every K messages the fuzzed worker is replaced by a fresh one
(owner data reloaded, integrity and "still serves" checked first), so the rate
does not fall as the store fills with the fuzzer's objects (search / list scan
it); every reply is still scanned. ``--minutes M`` stops at a time budget (the
count reached is what is reported).
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
from taint_fuzz import (  # noqa: E402
    OPEN_POLICY_RELEASES,
    FuzzReport,
    NetworkTarget,
    VirtualTarget,
    bit_identical,
    run_fuzz,
)


def _baseline(target, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        target.send("scientist", m.CommandMessage("torch.ones", [2], {}, None))
    return n / (time.perf_counter() - t0)


def _one(kind: str, make_target, n: int, seed: int, recycle: int, deadline: float | None,
         policy: str = "open") -> dict:
    target = make_target()
    base_rate = _baseline(target, min(n, 500))
    t0 = time.perf_counter()
    total = FuzzReport()
    changed: list = []
    serves, chunks = True, 0
    while total.messages < n and (deadline is None or time.time() < deadline):
        if chunks:
            target = make_target()
        before = target.owner_tensors()
        report = run_fuzz(target, min(recycle, n - total.messages), seed + 7919 * chunks)
        changed += bit_identical(before, target.owner_tensors())
        serves = serves and target.serves()
        total.messages += report.messages
        total.leaks += report.leaks
        total.replies.update(report.replies)
        chunks += 1
        if hasattr(target, "close"):
            target.close()
        if chunks % 10 == 0:
            print(f"  {kind}: {total.messages} messages, {len(total.leaks)} leaks, "
                  f"{total.messages / (time.perf_counter() - t0):.0f}/s", flush=True)
    elapsed = time.perf_counter() - t0
    # derived values of `open`-policy data are the requester's (README threat model): counted apart
    # (under --policy review nothing derived may leave either: every hit is a leak)
    sanctioned = OPEN_POLICY_RELEASES if policy == "open" else ("-",)
    open_releases = [lk for lk in total.leaks if lk.hole.startswith(sanctioned)]
    leaks = [lk for lk in total.leaks if not lk.hole.startswith(sanctioned)]
    print(f"{kind}: {total.messages} messages in {elapsed:.1f} s ({total.messages / elapsed:.0f}/s; "
          f"trivial-command baseline {base_rate:.0f}/s; {chunks} fresh workers of <= {recycle} messages), "
          f"leaks {len(leaks)} (+ {len(open_releases)} sanctioned open-policy derived releases), "
          f"owner data changed: {changed or 'none'}, still serves: {serves}", flush=True)
    for hole, count in total.by_hole().most_common():
        print(f"    {count:6d}  {hole}")
    for leak in leaks[:20]:
        print(f"    leak: {leak}")
    print(f"    replies: {dict(total.replies)}", flush=True)
    return {"messages": total.messages, "leaks": len(leaks), "by_hole": total.by_hole()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--virtual", type=int, default=100_000, help="requests against a VirtualWorker")
    p.add_argument("--network", type=int, default=10_000, help="requests against a `veil worker` process")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--recycle", type=int, default=5_000, help="messages per fresh worker")
    p.add_argument("--policy", choices=["open", "review"], default="open",
                   help="dataset policy of the private sentinels (review: derived values may not leave either)")
    p.add_argument("--minutes", type=float, default=None, help="time budget of the virtual run (stop early)")
    p.add_argument("--network-minutes", type=float, default=None, help="time budget of the network run")
    args = p.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    hook = sy.TorchHook(torch)
    deadline = None if args.minutes is None else time.time() + 60 * args.minutes
    if args.virtual:
        policy = None if args.policy == "open" else args.policy
        _one("virtual", lambda: VirtualTarget(hook, policy), args.virtual, args.seed, args.recycle, deadline,
             args.policy)
    if args.network:
        deadline = None if args.network_minutes is None else time.time() + 60 * args.network_minutes
        targets = []

        def make_network():
            t = NetworkTarget(tempfile.mkdtemp())
            targets.append(t)
            return t

        try:
            _one("network", make_network, args.network, args.seed + 1, max(args.recycle, 20_000), deadline)
            print(f"    reconnects: {sum(t.reconnects for t in targets)}")
        finally:
            for t in targets:
                t.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
