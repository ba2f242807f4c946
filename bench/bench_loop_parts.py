"""The pipelined Boston pointer loop of bench_network.py row 3, one side at a time, in one process (#19).

Wall clock on the shared box swings 2x between runs, and with posted batches the client and the worker
run at the same time, so the loop's time is about the larger of their two CPU costs. This driver
measures each alone, per training step (``boston_loop.boston_step``: MLP 13-32-24-1, batch 8, SGD lr
0.001, the batches of bench_network's loop, epoch after epoch):

- ``client``: the client's pointer path, outbox and serialization, against a worker stand-in that
  answers every request and posted batch with an OkReply at once (nothing runs remotely);
- ``server``: the worker's request path (``try_inline`` / ``serve_bytes`` of a ``WebsocketServerWorker``
  session, in process, no sockets): the client's frames of the loop are recorded against one server,
  then replayed into a fresh one; every reply of the measured window is checked to be an OkReply;
- ``floor``: the worker's torch ops of one step called as the worker calls them (``op.func(*args)``),
  without veil: what no change to veil can remove from the server's count.

Each runs ``N`` steps after 300 warm-up steps and prints CPU time per step (``time.thread_time``).
Instruction counts (the measure that does not move with the load), from a directory outside the trees:

    cd /tmp && PYTHONPATH=<tree> N=200 VG=1 valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=OUT/MODE.%p <python> <tree>/bench/bench_loop_parts.py MODE
    grep totals OUT/*          # instructions for N steps
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import _mlp  # noqa: E402  (the model of bench_network's row 3)
from boston_loop import BATCH, batch_starts, boston_data, boston_step  # noqa: E402

TOKEN = "bench-loop-parts-token"
WARM = 300


def _instrument(on: bool) -> None:
    if os.environ.get("VG"):
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _server(hook, worker_id: str) -> tuple:
    """A WebsocketServerWorker that is not listening, with one scientist session: (server, session)."""
    import veil as sy
    import veil.workers.websocket_server as ws
    from veil.workers.websocket_auth import authenticate

    ws.INLINE_BUDGET_SECONDS = 1e9  # one process does both sides: no request is "slow"
    tokens = sy.TokenTable()
    tokens.add(TOKEN, "scientist")
    server = ws.WebsocketServerWorker(hook, id=worker_id, port=0, tokens=tokens)
    session = authenticate(tokens, [TOKEN])
    server.sessions[session.id] = session
    return server, session


def _serve(server, session, data: bytes) -> bytes:
    """What the connection handler does: inline first, else the handler thread's path."""
    reply, decoded = server.try_inline(data, session)
    return reply if reply is not None else server.serve_bytes(data, session, None, decoded)


def loop_parts(mode: str, n: int) -> float:
    """CPU seconds per step of ``mode`` (``client`` or ``server``)."""
    import veil as sy
    from veil.messaging import messages as m
    from veil.messaging.frames import FrameParts
    from veil.messaging.serde import deserialize, serialize
    from veil.workers.skeletons import ClientSkeletons

    hook = sy.TorchHook(torch)
    server, session = _server(hook, "alice")
    frames: list = []

    def record(data) -> bytes:
        data = b"".join(bytes(p) for p in data) if type(data) is FrameParts else bytes(data)
        frames.append(data)
        return _serve(server, session, data)

    # a network client whose transport is this process: the server above, or a stand-in
    net = sy.WebsocketClientWorker(hook, id="alice", host="127.0.0.1", port=1, token=TOKEN, lazy=True)
    net._conn = object()
    net._skeletons = ClientSkeletons(net._conn) if hasattr(net, "_skeletons") else None
    owed: list = []
    net._recv_msg = record
    net.post = lambda data: owed.append(record(data))
    net.collect = lambda: owed.pop(0)
    step = boston_step(net)

    for _ in range(WARM):
        step()
    net.flush()
    if mode == "client":
        ok = serialize(m.OkReply(), sender="alice")
        net._recv_msg = lambda data: ok
        net.post = lambda data: owed.append(ok)
        started = time.thread_time()
        _instrument(True)
        for _ in range(n):
            step()
        net.flush()
        _instrument(False)
        return (time.thread_time() - started) / n
    start = len(frames)
    for _ in range(n):
        step()
    net.flush()
    window = frames[start:]
    print(f"{len(window)} requests, {sum(map(len, window)) / n:.0f} B per step")
    replay, replay_session = _server(hook, "alice-replay")
    for data in frames[:start]:
        _serve(replay, replay_session, data)
    started = time.thread_time()
    _instrument(True)
    replies = [_serve(replay, replay_session, data) for data in window]
    _instrument(False)
    spent = (time.thread_time() - started) / n
    assert all(deserialize(r)[0] == m.OkReply() for r in replies), "a replayed request failed"
    return spent


def floor(n: int) -> float:
    """CPU seconds per step of the worker's torch ops alone (see the module docstring)."""
    x, y = boston_data()
    model = _mlp()
    params = list(model.parameters())
    add_, get_grad, set_grad = torch.Tensor.add_, torch.Tensor.grad.__get__, torch.Tensor.grad.__set__
    starts = batch_starts(x.shape[0], BATCH)

    def step() -> None:
        i = next(starts)
        for p in params:
            set_grad(p, None)
        h = F.relu(F.linear(x[i:i + BATCH], params[0], params[1]))
        h = F.relu(F.linear(h, params[2], params[3]))
        F.mse_loss(F.linear(h, params[4], params[5]), y[i:i + BATCH]).backward()
        grads = [get_grad(p) for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads):
                add_(p, g, alpha=-0.001)

    for _ in range(WARM):
        step()
    started = time.thread_time()
    _instrument(True)
    for _ in range(n):
        step()
    _instrument(False)
    return (time.thread_time() - started) / n


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "client"
    n = int(os.environ.get("N", "500"))
    torch.set_num_threads(1)
    spent = floor(n) if mode == "floor" else loop_parts(mode, n)
    print(f"{mode}: {spent * 1e6:.1f} us CPU per step ({n} steps)")


if __name__ == "__main__":
    main()
