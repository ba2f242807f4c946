"""CPU cost of bulk transfers, for a loaded machine: client + worker process CPU per direction.

Wall-clock throughput on a shared box swings several-fold with other jobs; the CPU time both
processes spend (all threads, from ``/proc/<pid>/task/*/schedstat``) does much less. Reports the
raw websockets echo of the ``.send()`` frame (one direction = half the round trip), ``.send()``
and ``.get()`` of one float32 tensor, best of ``--repeat`` (by CPU), and their ratios.

Usage: ``.venv/bin/python bench/bench_wire_cpu.py [--mb 100] [--repeat 6]``
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import torch

import veil as sy
from veil.workers.websocket_transport import BlockingConnection

sys.path.insert(0, os.path.dirname(__file__))
from bench_network import TOKEN, _capture, _echo_server_code, _load, _spawn  # noqa: E402
from veil.workers.websocket_launcher import free_port, start_worker  # noqa: E402


def _cpu(pid: int) -> float:
    """Seconds of CPU the process's threads have run."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except OSError:  # a thread that just ended
            pass
    return total / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wp = start_worker("bench_alice", ["--token", TOKEN, "--max-message-mb", str(4 * args.mb)],
                      env={"OMP_NUM_THREADS": "1"})
    echo = None
    try:
        net = sy.WebsocketClientWorker(sy.TorchHook(torch), id="bench_alice", host="127.0.0.1", port=wp.port,
                                       token=TOKEN)
        x = torch.randn(args.mb * 2**20 // 4)
        seen, undo = _capture(net)
        p = x.send(net)  # warm-up, and the request frame the echo sends
        request = seen["request"]
        undo()
        p.get()
        port = free_port()
        echo = _spawn(_echo_server_code(port))
        conn = BlockingConnection(f"ws://127.0.0.1:{port}", {}, max_size=2**30)
        held = {}

        def op_echo():
            conn.send(request)
            conn.recv(300)

        def op_send():
            held["p"] = x.send(net)

        def op_get():
            held["p"].get()

        me = os.getpid()
        ops = [("raw echo", op_echo, echo.pid, 2), (".send()", op_send, wp.pid, 1), (".get()", op_get, wp.pid, 1)]
        best: dict[str, tuple[float, float, float]] = {}
        print(f"{args.mb} MB float32, best of {args.repeat} by CPU; load {_load()}")
        for _ in range(args.repeat):
            for name, fn, server, per in ops:
                c, s, w = _cpu(me), _cpu(server), time.perf_counter()
                fn()
                r = ((_cpu(me) - c) / per, (_cpu(server) - s) / per, (time.perf_counter() - w) / per)
                if name not in best or r[0] + r[1] < sum(best[name][:2]):
                    best[name] = r
        for name, (c, s, w) in best.items():
            print(f"   {name:<9} per direction: client {c * 1e3:6.1f} ms + worker {s * 1e3:6.1f} ms CPU "
                  f"= {(c + s) * 1e3:6.1f} ms   (wall {w * 1e3:6.1f} ms)")
        raw = sum(best["raw echo"][:2])
        print("   ratio to raw (>= 0.8 wanted): CPU send %.2f get %.2f; wall send %.2f get %.2f; load %s" % (
            raw / sum(best[".send()"][:2]), raw / sum(best[".get()"][:2]),
            best["raw echo"][2] / best[".send()"][2], best["raw echo"][2] / best[".get()"][2], _load()))
        conn.close()
        net.close()
    finally:
        if echo is not None:
            echo.kill()
            echo.wait()
        wp.stop()


if __name__ == "__main__":
    main()
