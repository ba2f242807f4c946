"""CPU of one opening's bulk path in-process, before/after the netbulk change (best of N, one thread).

Run: ``.venv/bin/python bench/bench_reply_path.py [--entries 1000000] [--repeat 30]``

Times, with ``time.thread_time`` and the best of ``--repeat`` (pure CPU work in one thread: the
minimum filters other processes' load better than wall time), for a beaver_mask reply of one
``mul`` of ``--entries`` entries (two int64 tensors):

* the worker's reply path up to the socket: encode, then the 1 MiB fragments and websockets'
  ``Frame.serialize`` of each (what ``ws.send(iterable)`` does before the transport): joined
  (every reply before) or in parts from the tensors' memory (fresh replies now);
* the orchestrator's combine of two parties' replies: new tensors (before) or in place.
"""

from __future__ import annotations

import argparse
import time

import torch
from websockets.frames import Frame, Opcode

from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.reply_frames import REPLY_FRAGMENT, _fragments, _part_fragments


def _frames(fragments) -> int:
    """What websockets' send(iterable) does per fragment before the transport: one frame each."""
    total, first = 0, True
    for frag in fragments:
        frame = Frame(Opcode.BINARY if first else Opcode.CONT, frag, fin=False)
        total += len(frame.serialize(mask=False, extensions=[]))
        first = False
    return total


def _best(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {open('/proc/loadavg').read().strip()}")
    n = args.entries
    reply = m.ObjectsReply([torch.randint(-2**62, 2**62, (n,)), torch.randint(-2**62, 2**62, (n,))])

    def joined():
        return _frames(_fragments(serialize(reply, sender="w")))

    def parts():
        return _frames(_part_fragments(serialize(reply, sender="w", parts_over=REPLY_FRAGMENT)))

    assert abs(joined() - parts()) < 64  # the same bytes; the header travels as its own small fragment in parts
    data = serialize(reply, sender="w")
    a = [deserialize(data)[0].objects for _ in range(2)]

    def new_sum():
        return [t + o for t, o in zip(a[0], a[1])]

    def in_place():
        for t, o in zip(a[0], a[1]):
            t.add_(o)

    rows = [("worker reply path, joined (before)", joined), ("worker reply path, in parts (after)", parts),
            ("orchestrator combine, new tensors (before)", new_sum), ("orchestrator combine, in place (after)", in_place)]
    mb = 2 * n * 8 / 1e6
    print(f"\none mul of {n} entries: beaver_mask reply of {mb:.1f} MB per party\n")
    print("| path | CPU ms (best of %d) |\n|---|---|" % args.repeat)
    for name, fn in rows:
        print(f"| {name} | {_best(fn, args.repeat) * 1e3:.2f} |")
    print(f"\nload average after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
