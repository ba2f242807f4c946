"""Instructions per synchronous small round trip, client and server process separately (callgrind).

Wall clock on the shared box swings 2x between runs; user-space instruction counts do not.
The server (a ``veil worker``, or the raw websockets echo server of bench_network.py) runs
under callgrind too; both switch instrumentation on after a warm-up, for ``N`` round trips of
the 8x13 add with pipelining off (``op``) or the raw echo of a 51-byte frame (``echo``);
``loop``: ``N`` steps of the pipelined Boston MLP training loop of bench_network.py (batch 8,
``boston_loop.boston_step``).

Run from a directory outside the trees (``python -c``/``-m`` put the working directory first
on ``sys.path``), with the tree under test on ``PYTHONPATH``:

    cd /tmp && PYTHONPATH=<tree> N=500 valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=OUT/client.%p <python> <tree>/bench/bench_rtt_callgrind.py op OUT
    grep totals OUT/*.1      # client.*.1 and server.*.1: instructions for N round trips

``NO_VALGRIND=1`` runs the same without callgrind (a check of the driver). The worker's inline budget is raised (valgrind makes every request "long", which would move
the session to handler threads: not the path being measured).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import torch

import veil as sy
from veil.workers.websocket_launcher import free_port
from veil.workers.websocket_transport import BlockingConnection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boston_loop import boston_step  # noqa: E402  (bench_network's row 3, one step per call)

TOKEN = "bench-network-token"


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    n = int(os.environ.get("N", "500"))
    torch.set_num_threads(1)
    port = free_port()
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/server.{mode}.%p"]
    if os.environ.get("NO_VALGRIND"):  # a quick check of the driver itself
        vg = []
    if mode == "echo":
        code = ("import asyncio\nfrom websockets.asyncio.server import serve\n"
                "async def echo(ws):\n    async for m in ws: await ws.send(m)\n"
                "async def main():\n"
                f"    async with serve(echo, '127.0.0.1', {port}, compression=None, max_size=2**30):\n"
                "        print('listening on :0', flush=True); await asyncio.Future()\n"
                "asyncio.run(main())\n")
        cmd = vg + [sys.executable, "-c", code]
    else:
        code = ("import sys, veil.workers.inline_lane as s; s.INLINE_BUDGET_SECONDS = 1e9\n"
                "from veil.cli import main; sys.exit(main(sys.argv[1:]))")
        cmd = vg + [sys.executable, "-c", code, "worker", "--id", "alice", "--port", str(port), "--token", TOKEN]
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in srv.stdout:
            if "listening on" in line:
                break
        threading.Thread(target=lambda: [None for _ in srv.stdout], daemon=True).start()
        if mode == "echo":
            conn = BlockingConnection(f"ws://127.0.0.1:{port}", {}, max_size=2**30)
            frame = bytes(51)

            def once() -> None:
                conn.send(frame)
                conn.recv(60)
        elif mode == "loop":
            net = sy.WebsocketClientWorker(sy.TorchHook(torch), id="alice", host="127.0.0.1", port=port, token=TOKEN)
            once = boston_step(net)
        else:
            net = sy.WebsocketClientWorker(sy.TorchHook(torch), id="alice", host="127.0.0.1", port=port, token=TOKEN)
            net.pipelining = False
            p = torch.randn(8, 13).send(net)

            def once() -> None:
                p + p
        for _ in range(300):
            once()

        def ctl(*args: str) -> None:
            for pid in (srv.pid, os.getpid()):
                subprocess.run(["callgrind_control", *args, str(pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        ctl("-i", "on")
        for _ in range(n):
            once()
        if mode == "loop":
            net.flush()  # the last deferred commands run inside the measured window
        ctl("-i", "off")
        ctl("-d")
        print(f"{n} round trips ({mode}); instructions: grep totals {out}/*.1")
    finally:
        srv.kill()
        srv.wait()


if __name__ == "__main__":
    main()
