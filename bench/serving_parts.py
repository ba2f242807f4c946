"""Where a served batch-1 query's client-observed latency goes, and the CPU it costs every process.

Run (from /tmp, so the workers run the tree named by PYTHONPATH):
``PYTHONPATH=<tree> python <tree>/bench/serving_parts.py [--queries 30] [--warm 24] [--gap 0.05]``

Starts bench_serving.py's cluster and MNIST CNN, serves it in the background (as ``model.serve``
does) and queries it from a client in the same process, ``--gap`` seconds apart. Per query it
splits the client's latency into: *submit* (the client's submit round), *detect* (submit done ->
the owner starts claiming it: the serving loop's polling), *compute* (claim, the model's rounds,
respond) and *deliver* (respond done -> the client has every output share: its fetches; detect and
deliver can be slightly negative: a party acts on a submit/respond before its round returns). It counts
the owner's ``pending`` and the client's ``fetch`` rounds, and the CPU seconds of this process and
of each ``veil worker`` process (load-independent, unlike the times) per query.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serving"))

import veil as sy  # noqa: E402
from veil.datasets import load_mnist_5k  # noqa: E402
from veil.serving import protocol  # noqa: E402
from veil.workers.registry import HookContext  # noqa: E402
from veil.workers.websocket_launcher import free_port  # noqa: E402
from serving_helpers import mnist_cnn, train_briefly  # noqa: E402


def child_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of this process's child processes (the cluster's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            kids = open(f"/proc/{os.getpid()}/task/{tid}/children").read().split()
        except OSError:
            continue
        for pid in map(int, kids):
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--warm", type=int, default=24)
    ap.add_argument("--gap", type=float, default=0.05, help="seconds between a result and the next submit")
    ap.add_argument("--burst", type=int, default=16, help="then submit this many at once, twice: batches formed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()}")
    hook = sy.TorchHook(torch)
    data = load_mnist_5k()
    model = train_briefly(mnist_cnn(), data)
    images = data["x_test"][:: max(1, len(data["x_test"]) // (args.queries + args.warm))][: args.queries + args.warm]
    with torch.no_grad():
        expected = model(images).argmax(1)
    cluster = sy.Cluster(*[sy.NetworkWorker(f"127.0.0.1:{free_port()}") for _ in range(3)], auto_managed=True)
    cluster.start()
    calls: dict[str, int] = {}
    original_call_all = protocol.call_all

    def counting_call_all(local, workers, action, *a, **k):
        calls[action] = calls.get(action, 0) + 1
        return original_call_all(local, workers, action, *a, **k)

    protocol.call_all = counting_call_all
    try:
        model.share(cluster, input_shape=(1, 1, 28, 28), max_batch=16)
        service = sy.serving.service_of(model)
        marks: list[tuple[float, float]] = []
        compute = service._compute

        sizes: list[int] = []

        def timed_compute(rids):
            t0 = time.perf_counter()
            compute(rids)
            marks.append((t0, time.perf_counter()))
            sizes.append(len(rids))

        service._compute = timed_compute
        client = sy.ModelClient(hook=HookContext(), timeout=300)
        client.connect_to_model((1, 1, 28, 28), (1, 10), cluster)
        model.serve(background=True)
        parts, correct = [], 0
        for i in range(args.warm + args.queries):
            if i == args.warm:
                calls.clear()
                cpu0, kids0 = time.process_time(), child_cpu()
            time.sleep(args.gap)
            t0 = time.perf_counter()
            rid = client.submit(images[i:i + 1])
            t1 = time.perf_counter()
            out = client.result(rid)
            t2 = time.perf_counter()
            while len(marks) <= i:  # the client can have its shares before the owner's respond round returns
                time.sleep(0.0002)
            c0, c1 = marks[i]
            if i >= args.warm:
                parts.append((t1 - t0, c0 - t1, c1 - c0, t2 - c1, t2 - t0))
                correct += int(out.argmax(1).item() == expected[i].item())
        cpu, kids = time.process_time() - cpu0, child_cpu()
        counted = dict(calls)
        bursts = []
        for _ in range(2):  # the first burst's shape is dealt cold; the second mostly from spares
            before, t0 = len(sizes), time.perf_counter()
            rids = [client.submit(images[i:i + 1]) for i in range(args.burst)]
            for r in rids:
                client.result(r)
            bursts.append((args.burst / (time.perf_counter() - t0), sizes[before:]))
        model.stop()
        client.close()
    finally:
        protocol.call_all = original_call_all
        cluster.stop()
    n = args.queries
    names = ("submit", "detect", "compute", "deliver", "total")
    med = [statistics.median(p[j] for p in parts) * 1e3 for j in range(5)]
    mean = [statistics.mean(p[j] for p in parts) * 1e3 for j in range(5)]
    print(f"{n} batch-1 queries, {args.gap * 1e3:.0f} ms apart, same label as plaintext {correct}/{n}")
    print("| ms per query | " + " | ".join(names) + " |")
    print("| median | " + " | ".join(f"{v:.1f}" for v in med) + " |")
    print("| mean | " + " | ".join(f"{v:.1f}" for v in mean) + " |")
    print(f"over 150 ms: {sum(p[4] > 0.150 for p in parts)}/{n}; max {max(p[4] for p in parts) * 1e3:.0f} ms")
    print("serving rounds per query: " + ", ".join(f"{a} {c / n:.2f}" for a, c in sorted(counted.items())))
    worker_cpu = sorted((kids.get(pid, 0.0) - t) * 1e3 / n for pid, t in kids0.items())
    print(f"CPU ms per query: owner+client process {cpu * 1e3 / n:.1f}, workers "
          f"{', '.join(f'{c:.1f}' for c in worker_cpu)} (total {cpu * 1e3 / n + sum(worker_cpu):.1f})")
    for tput, batches in bursts:
        print(f"burst of {args.burst}: {tput:.1f} queries/s, batches {batches}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
