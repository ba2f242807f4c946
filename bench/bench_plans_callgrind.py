"""Instructions of the Boston training-plan rounds of bench_network.py row 6 (callgrind), per process.

Wall clock on the shared box swings 2x between runs; user-space instruction counts do not.
Modes (each measures ``N`` units after a warm-up, instrumentation switched on only around them):

- ``pure``: N epochs of the pure PyTorch loop (bench_core.train_pure, batch 8, SGD lr 0.001);
- ``fit``: N epochs of the training plan run locally by the worker function (``veil.plan.fit``'s body);
- ``virtual``: ``federated.train`` of N rounds over a VirtualWorker (one local epoch per round);
- ``net``: the same over a ``veil worker`` process on loopback, which runs under callgrind too
  (``server.*`` files: the worker's share, ``client.*``: the coordinator's).

Run from a directory outside the trees, with the tree under test on ``PYTHONPATH``:

    cd /tmp && PYTHONPATH=<tree> N=10 valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=OUT/client.MODE.%p <python> <tree>/bench/bench_plans_callgrind.py MODE OUT
    grep totals OUT/*.1

``NO_VALGRIND=1`` runs the driver without callgrind (a check of the driver itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import torch
import torch.nn.functional as F

import veil as sy
from veil.datasets import load_boston, train_test_split
from veil.workers.websocket_launcher import free_port

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import _mlp, train_pure  # noqa: E402  (same model and baseline as bench_network row 6)

TOKEN = "bench-network-token"


def _ctl(pids: list, *args: str) -> None:
    if os.environ.get("NO_VALGRIND"):
        return
    for pid in pids:
        subprocess.run(["callgrind_control", *args, str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _server(out: str) -> tuple:
    port = free_port()
    vg = [] if os.environ.get("NO_VALGRIND") else \
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/server.net.%p"]
    code = ("import sys, veil.workers.inline_lane as s; s.INLINE_BUDGET_SECONDS = 1e9\n"
            "from veil.cli import main; sys.exit(main(sys.argv[1:]))")
    srv = subprocess.Popen(vg + [sys.executable, "-c", code, "worker", "--id", "alice", "--port", str(port),
                                 "--token", TOKEN, "--max-command-seconds", "600"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in srv.stdout:
        if "listening on" in line:
            break
    threading.Thread(target=lambda: [None for _ in srv.stdout], daemon=True).start()
    return srv, port


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    n = int(os.environ.get("N", "10"))
    torch.set_num_threads(1)
    x, y, _ = load_boston()
    x_train, y_train, _, _ = train_test_split(x, y, seed=0)
    pids, srv = [os.getpid()], None
    if mode == "pure":
        def once() -> None:
            train_pure(x_train, y_train, n, 8)
    elif mode == "fit":
        from veil.plans import remote, training_plan

        plan = training_plan(_mlp(), F.mse_loss, 0.001, args_shape=[(-1, 13), (-1, 1)])
        state = [t.detach().clone().requires_grad_(t.requires_grad) for t in plan.state_tensors()]

        def once() -> None:
            for _ in range(n):
                remote._fit(None, plan.spec, x_train, y_train, state, 8, 1, seed=1)
    else:
        from veil import federated as fl

        hook = sy.TorchHook(torch)
        if mode == "net":
            srv, port = _server(out)
            pids.append(srv.pid)
            worker = sy.WebsocketClientWorker(hook, id="alice", host="127.0.0.1", port=port, token=TOKEN)
        else:
            worker = sy.VirtualWorker(hook, id="alice")
        fed = fl.federate(torch.utils.data.TensorDataset(x_train, y_train), [worker])

        def once() -> None:
            fl.train(_mlp(), fed, rounds=n, local_epochs=1, lr=0.001, batch_size=8, progress=False, seed=0)
    try:
        once()  # warm-up
        _ctl(pids, "-i", "on")
        once()
        _ctl(pids, "-i", "off")
        _ctl(pids, "-d")
        print(f"{mode}: {n} epochs/rounds measured; instructions: grep totals {out}/*.1")
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()


if __name__ == "__main__":
    main()
