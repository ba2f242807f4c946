"""Soak / DoS bench: clients' latency on a `veil worker`, quiet vs. under attack.

    .venv/bin/python bench/bench_soak.py [--clients 20] [--ops 100]

Phase 1 (quiet): N client connections each run M ops (``(x + i).get()``: one
command and one get, 2 round trips) against one ``veil worker`` process.
Phase 2 (attacked): the same while an attacker process (a) runs a plan ``fit``
with 10,000 epochs, (b) floods handshakes (valid token without Upgrade, and bad
tokens) and (c) sends frames of ~300 nested tuples. Prints p50/p99 of the
clients' op latency in both phases, their ratio (goal: p99 within 3x of quiet),
ops lost (errors or wrong results; goal: 0), whether the worker survived, and
how many attack requests were made.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

TOKEN = "soak-scientist-token"
ATTACKER_TOKEN = "soak-attacker-token"


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _clients(port: int, n: int, ops: int) -> tuple[list[float], int]:
    import veil as sy

    hook = sy.TorchHook(torch)
    latencies: list[float] = []
    lost = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        w = sy.WebsocketClientWorker(hook, id="alice", host="127.0.0.1", port=port, token=TOKEN, timeout=120)
        try:
            base = torch.arange(4.0) + k
            x = base.send(w)
            for i in range(3):  # warm-up: connection, shape-inference caches
                (x + i).get()
            mine = []
            for i in range(ops):
                t0 = time.perf_counter()
                try:
                    ok = torch.equal((x + i).get(), base + i)
                except Exception:
                    ok = False
                mine.append(time.perf_counter() - t0)
                if not ok:
                    with lock:
                        lost[0] += 1
            with lock:
                latencies.extend(mine)
        finally:
            w.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, lost[0]


def attacker(port: int, stop_file: str) -> None:
    """Runs until ``stop_file`` exists; prints its request counts."""
    import msgpack
    import torch.nn.functional as F
    from torch import nn

    import veil as sy
    from veil.messaging.serde import EXT_CODES
    from veil.plans import training_plan
    from veil.workers.websocket_auth import handshake_headers
    from veil.workers.websocket_transport import BlockingConnection

    counts = {"fit": 0, "handshakes": 0, "nested": 0}
    done = threading.Event()

    def long_fit() -> None:
        hook = sy.TorchHook(torch)
        w = sy.WebsocketClientWorker(hook, id="alice", host="127.0.0.1", port=port, token=ATTACKER_TOKEN,
                                     timeout=3600)
        model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 1))
        plan = training_plan(model, F.mse_loss, lr=0.01, args_shape=[(-1, 13), (-1, 1)]).send(w)
        x, y = torch.randn(400, 13).send(w), torch.randn(400, 1).send(w)
        counts["fit"] += 1
        try:
            plan.fit(x, y, batch_size=8, epochs=10_000)
        except Exception:
            pass

    def flood() -> None:
        while not done.is_set():
            for headers in (handshake_headers(ATTACKER_TOKEN), handshake_headers("wrong-token-xxxxxxxx")):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    c.request("GET", "/", headers=headers)
                    c.getresponse().read()
                    c.close()
                    counts["handshakes"] += 1
                except OSError:
                    pass
            time.sleep(0.01)

    def nested() -> None:
        inner = msgpack.packb([])
        for _ in range(300):
            inner = msgpack.packb([msgpack.ExtType(EXT_CODES.TUPLE, inner)])
        frame = msgpack.packb([1, 1, "x", [], "torch.add", [msgpack.ExtType(EXT_CODES.TUPLE, inner)], {}, None,
                               False])
        conn = BlockingConnection(f"ws://127.0.0.1:{port}", handshake_headers(ATTACKER_TOKEN))
        while not done.is_set():
            conn.send(frame)
            conn.recv(60)
            counts["nested"] += 1
            time.sleep(0.01)
        conn.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (long_fit, flood, nested)]
    for t in threads:
        t.start()
    while not (counts["fit"] and counts["handshakes"] and counts["nested"]):
        time.sleep(0.05)
    time.sleep(1.0)  # the fit request is on the wire now
    print("ready", flush=True)
    while not os.path.exists(stop_file):
        time.sleep(0.1)
    done.set()
    print(f"attack: fit {counts['fit']}, handshakes {counts['handshakes']}, nested frames {counts['nested']}",
          flush=True)
    os._exit(0)  # leaves the fit running: the worker must cancel it when the connection drops


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--ops", type=int, default=100, help="ops per client per phase")
    p.add_argument("--attacker", nargs=2, metavar=("PORT", "STOP_FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.attacker:
        attacker(int(args.attacker[0]), args.attacker[1])
        return 0

    import tempfile

    from veil.workers.websocket_launcher import start_worker

    wp = start_worker("alice", ["--token", TOKEN, "--user", f"attacker={ATTACKER_TOKEN}"])
    try:
        quiet, lost_quiet = _clients(wp.port, args.clients, args.ops)
        stop_file = os.path.join(tempfile.mkdtemp(), "stop")
        attack = subprocess.Popen([sys.executable, __file__, "--attacker", str(wp.port), stop_file],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = attack.stdout.readline().strip()  # the fit and the floods are under way
        if ready != "ready":
            raise RuntimeError(f"attacker did not start: {ready!r}")
        attacked, lost_attacked = _clients(wp.port, args.clients, args.ops)
        open(stop_file, "w").close()
        out, _ = attack.communicate(timeout=60)
        alive = wp.alive()
        # the worker still serves after the attacker left (its fit cancelled)
        after, lost_after = _clients(wp.port, 2, 20)
    finally:
        wp.stop()
    q50, q99 = statistics.median(quiet), _percentile(quiet, 0.99)
    a50, a99 = statistics.median(attacked), _percentile(attacked, 0.99)
    print(f"clients {args.clients} x ops {args.ops} (each op: 1 command + 1 get)")
    print(f"quiet    : p50 {q50 * 1e3:7.2f} ms  p99 {q99 * 1e3:7.2f} ms  lost {lost_quiet}")
    print(f"attacked : p50 {a50 * 1e3:7.2f} ms  p99 {a99 * 1e3:7.2f} ms  lost {lost_attacked}")
    print(f"ratio    : p50 {a50 / q50:.2f}x  p99 {a99 / q99:.2f}x  (goal: p99 within 3x)")
    print(out.strip().splitlines()[-1] if out.strip() else "attack: (no report)")
    print(f"worker alive after the attack: {alive}; served after the attacker left: lost {lost_after} of "
          f"{len(after)}; cancelled commands in its log: "
          f"{sum('cancelled' in line for line in wp.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
