"""One SMPC call over VirtualWorkers as a timeline: which thread ran what, when.

Run: ``.venv/bin/python bench/bench_virtual_timeline.py [--calls 40] [--threads on|off|auto] [workload]``
(default workload: matmul 256^3; any name of bench_mpc's op and model cases).

In process, the parties of a big round run on threads of the runtime's pool (``parallel_in_process``) and
share the GIL with the orchestrator; where a call's time goes is then a question of what each thread does
when, which a profile of one thread cannot show. This wraps (monkeypatches, nothing in veil changes) every
party function a command or an opening runs, the commands (``handlers._run_command``), the worker's
request handling, (de)serialization, the request copy of ``VirtualWorker`` and the rounds with
``perf_counter`` timers, runs ``--calls`` online calls (the crypto provider deals each call's material
ahead, untimed, as bench_net_rounds does) and prints the median call's events in start order, then the
median duration of each kind of event over all calls. ``--threads on`` / ``off`` force parties onto
threads or onto the caller's thread (``auto``: the runtime decides).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mpc import model_cases, op_cases, virtual_setup  # noqa: E402
from bench_mpc import dealing_plan  # noqa: E402
from bench_net_rounds import online_call  # noqa: E402

import veil.mpc.party as party  # noqa: E402
import veil.workers.base as base  # noqa: E402
import veil.workers.handlers as handlers  # noqa: E402
import veil.workers.outbox as outbox  # noqa: E402
import veil.workers.virtual as virtual  # noqa: E402
from veil.mpc import truncation  # noqa: E402
from veil.tensors.mpc_glue import runtime  # noqa: E402

EVENTS: list[tuple[str, str, float, float]] = []  # (thread, what, start, end)
_ON = [False]


def _timed(fn, what):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _ON[0]:
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append((threading.current_thread().name, what(args) if callable(what) else what, t0,
                           time.perf_counter()))
    return wrapper


def install() -> None:
    for name, fn in list(party.PARTY_FUNCTIONS.items()):  # openings look their step up here
        party.PARTY_FUNCTIONS[name] = _timed(fn, f"step {name}")
    # deferred commands (a combine, a truncation finish) run through _run_command: named by their op
    handlers._run_command = _timed(handlers._run_command, lambda a: f"command {str(a[3]).rsplit('.', 1)[-1]}")
    for owner, name, what in ((base, "deserialize", "decode request"),
                              (outbox, "deserialize", "decode reply"), (base, "serialize", "encode reply"),
                              (outbox, "serialize", "encode request"),
                              (virtual, "owned_frame", "request copy"), (party, "open_parties", "opening (star)"),
                              (truncation, "pack_top_bits", "pack top bits"), (runtime, "one_round", "round")):
        setattr(owner, name, _timed(getattr(owner, name), what))
    outbox.Outbox.send_msg = _timed(outbox.Outbox.send_msg, "send_msg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--threads", choices=["on", "off", "auto"], default="auto")
    ap.add_argument("name", nargs="?", default="matmul 256^3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.threads != "auto":
        runtime._spare_cores = lambda parties: args.threads == "on"
    install()
    torch.manual_seed(0)
    hook, me, parties, cp = virtual_setup(2)
    cases = {n: (lambda s=s, f=f: f(*s)) for n, s, f, _ in op_cases(parties, cp)}
    cases.update({n: fn for n, fn, _ in model_cases(parties, cp)})
    fn = cases[args.name]
    plan = dealing_plan(fn, cp, me)
    for _ in range(5):
        online_call(fn, cp, me, plan, [])
    calls = []
    for _ in range(args.calls):
        EVENTS.clear()
        windows: list = []
        _ON[0] = True
        try:
            wall = online_call(fn, cp, me, plan, [], windows)[0]
        finally:
            _ON[0] = False
        t0, t1 = windows[0]
        calls.append((wall, [e for e in EVENTS if t0 <= e[2] <= t1], t0))
    calls.sort(key=lambda c: c[0])
    wall, events, t0 = calls[len(calls) // 2]
    print(f"{args.name}, threads {args.threads}: median call {wall * 1e3:.2f} ms of {args.calls}; its events "
          f"(ms from the call's start):")
    print("| thread | event | start | end | ms |\n|---|---|---|---|---|")
    for thread, what, a, b in sorted(events, key=lambda e: e[2]):
        print(f"| {thread} | {what} | {(a - t0) * 1e3:.3f} | {(b - t0) * 1e3:.3f} | {(b - a) * 1e3:.3f} |")
    durations = defaultdict(list)
    for _, evs, _ in calls:
        for _, what, a, b in evs:
            durations[what].append((b - a) * 1e3)
    print("\nmedian ms per event, all calls (count per call):")
    for what, v in sorted(durations.items(), key=lambda kv: -statistics.median(kv[1]) * len(kv[1])):
        print(f"| {what} | {statistics.median(v):.3f} | {len(v) / len(calls):.1f} |")


if __name__ == "__main__":
    main()
