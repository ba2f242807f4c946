"""What sizing a command's results before its op runs costs (``veil/workers/output_bounds.py``).

One in-process network worker (``WebsocketServerWorker.serve_bytes`` of an authenticated session: the
request path a connection's requests take, without the socket), the pointer loop's ops (Boston Housing's
MLP 13-32-24-1 at batch 8), timed in alternating blocks with no session quota (nothing sized: the baseline)
and with one (every op sized; after the first use of a shape, from the cache). Also the first-use cost of a
few ops (a meta run) and how long refusing a huge result takes.

Usage: ``.venv/bin/python bench/bench_output_bounds.py [--calls 2000] [--blocks 6] [--grad]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers import output_bounds
from veil.workers.websocket_auth import authenticate
from veil.workers.websocket_server import WebsocketServerWorker

TOKEN = "bench-output-bounds"


def _setup():
    hook = sy.TorchHook(torch)
    tokens = sy.TokenTable()
    tokens.add(TOKEN, "sci", "scientist")
    srv = WebsocketServerWorker(hook, id="bench-ob", port=0, tokens=tokens)
    session = authenticate(srv.tokens, [TOKEN])
    srv.sessions[session.id] = session
    return srv, session


def _req(srv, session, msg):
    return srv.serve_bytes(serialize(msg, sender="client"), session)


def _loop_ops(srv, session, grad: bool) -> list:
    """The pointer loop's forward ops at batch 8 (one layer of each kind), as CommandMessages (``grad``:
    the parameters and the activation require grad, as in a training step)."""
    tensors = {"x": torch.randn(8, 13), "w": torch.randn(32, 13).requires_grad_(grad),
               "b": torch.randn(32).requires_grad_(grad), "y": torch.randn(8, 32).requires_grad_(grad)}
    ids = {}
    for name, t in tensors.items():
        ids[name] = new_id()
        _req(srv, session, m.ObjectMessage([m.StoredObject(ids[name], t)]))
    ref = {k: m.ObjectRef(v) for k, v in ids.items()}
    return [("torch.nn.functional.linear", (ref["x"], ref["w"], ref["b"])), ("torch.relu", (ref["y"],)),
            ("torch.sub", (ref["y"], ref["y"])), ("Tensor.sum", (ref["y"],))]


def _time_block(srv, session, ops, calls: int, grad: bool) -> float:
    """Median microseconds per command over ``calls`` commands (results freed after each)."""
    samples = []
    for k in range(calls):
        op, args = ops[k % len(ops)]
        rid = new_id()
        msg = m.CommandMessage(op, args, {}, [rid], grad)
        t0 = time.perf_counter()
        _req(srv, session, msg)
        samples.append(time.perf_counter() - t0)
        srv.monitor.discard(srv.principal_of(session), rid)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--grad", action="store_true", help="commands with grad tracking (a training forward pass: "
                        "under a quota, what each graph saves is recorded and charged too)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    srv, session = _setup()
    ops = _loop_ops(srv, session, args.grad)
    srv.monitor.max_session_bytes = 1 << 30
    _time_block(srv, session, ops, 200, args.grad)  # warm: every shape sized once
    off, on = [], []
    for _ in range(args.blocks):
        srv.monitor.max_session_bytes = None
        off.append(_time_block(srv, session, ops, args.calls, args.grad))
        srv.monitor.max_session_bytes = 1 << 30
        on.append(_time_block(srv, session, ops, args.calls, args.grad))
    print(f"pointer-loop command{' with grad tracking' if args.grad else ''} (median of {args.blocks} blocks of "
          f"{args.calls}): no quota "
          f"{statistics.median(off):.1f} us, with a quota (sized, cached) {statistics.median(on):.1f} us, "
          f"ratio {statistics.median(on) / statistics.median(off):.3f}")
    print("first use of a shape (one meta run each, us):")
    for name, func, call_args in (
            ("linear 8x13 @ 13x32", torch.nn.functional.linear,
             (torch.randn(8, 13), torch.randn(32, 13), torch.randn(32))),
            ("matmul 256^3", torch.matmul, (torch.randn(256, 256), torch.randn(256, 256))),
            ("conv2d 64x1x28x28, 16 5x5", torch.nn.functional.conv2d,
             (torch.randn(64, 1, 28, 28), torch.randn(16, 1, 5, 5))),
            ("zeros 2^40", torch.zeros, (1 << 40,))):
        output_bounds.new_bytes(func, call_args, {})  # (a kernel's first meta call loads it)
        t0 = time.perf_counter()
        for _ in range(50):
            output_bounds.new_bytes(func, call_args, {})
        print(f"  {name}: {(time.perf_counter() - t0) / 50 * 1e6:.1f}")
    t0 = time.perf_counter()
    reply = deserialize(_req(srv, session, m.CommandMessage("torch.zeros", (1 << 40,), {}, [new_id()], False)))[0]
    print(f"refusing torch.zeros(2^40) with a 1 GiB quota: {(time.perf_counter() - t0) * 1e3:.2f} ms "
          f"({reply.error})")


if __name__ == "__main__":
    main()
