"""Where one batch-1 encrypted serving query's time goes: per opening round and between rounds.

Run (from /tmp, so the workers run the tree named by PYTHONPATH):
``PYTHONPATH=<tree> python <tree>/bench/profile_serving.py [--queries 20] [--profile FILE]``

Starts bench_serving.py's cluster and MNIST CNN, serves ``--warm`` queries by hand (the crypto
provider's spares then cover the timed ones: the online phase), then times ``--queries``
foreground ``service.step`` calls. Per query it prints the rounds by protocol step, the time
inside ``one_round`` (send, party handlers, replies) and the orchestrator's own Python between
rounds; then, from ``round_trace.py``'s timestamps in this process and the ``veil worker``
processes, the average network request stage by stage (bench_net_rounds.py's ``--breakdown``).
``--profile FILE``: cProfile of the orchestrator over the timed queries.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "serving"))

import round_trace  # noqa: E402
from bench_net_rounds import breakdown  # noqa: E402

import veil as sy  # noqa: E402
from veil.datasets import load_mnist_5k  # noqa: E402
from veil.workers.registry import HookContext  # noqa: E402
from veil.workers.websocket_launcher import free_port  # noqa: E402
from serving_helpers import mnist_cnn, train_briefly  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--warm", type=int, default=24)
    ap.add_argument("--profile", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()}")
    hook = sy.TorchHook(torch)
    data = load_mnist_5k()
    model = train_briefly(mnist_cnn(), data)
    images = data["x_test"][::50][: args.queries + args.warm]
    trace_dir = tempfile.mkdtemp(prefix="veil-serving-trace-")
    site = Path(trace_dir) / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys; sys.path.insert(0, {str(HERE)!r}); import round_trace\n")
    saved = dict(os.environ)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    os.environ["VEIL_ROUND_TRACE_WORKER"] = trace_dir
    cluster = sy.Cluster(*[sy.NetworkWorker(f"127.0.0.1:{free_port()}") for _ in range(3)], auto_managed=True)
    try:
        cluster.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    records = round_trace.install_orchestrator()
    prof = None
    try:
        model.share(cluster, input_shape=(1, 1, 28, 28), max_batch=1)
        service = sy.serving.service_of(model)
        client = sy.ModelClient(hook=HookContext(), timeout=300)
        client.connect_to_model((1, 1, 28, 28), (1, 10), cluster)

        def one(i: int) -> tuple[float, float]:
            rid = client.submit(images[i:i + 1])
            t0 = time.perf_counter()
            while not service.step(1):
                pass
            t1 = time.perf_counter()
            client.result(rid)
            return t0, t1

        for i in range(args.warm):
            one(i)
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
        windows = []
        del records[:]
        for i in range(args.queries):
            if prof:
                prof.enable()
            windows.append(one(args.warm + i))
            if prof:
                prof.disable()
        model.stop()
        client.close()
    finally:
        cluster.stop()
    if prof:
        prof.dump_stats(str(args.profile))
    rounds = [r for r in records if r.get("kind") == "round"]
    per_query = []
    for a, b in windows:
        rs = [r for r in rounds if a <= r["t0"] <= b]
        inside = sum(r["t1"] - r["t0"] for r in rs)
        per_query.append((b - a, inside, len(rs), collections.Counter(r["what"] for r in rs)))
    wall = statistics.median(q[0] for q in per_query)
    inside = statistics.median(q[1] for q in per_query)
    print(f"\nper query (median of {len(per_query)}): {wall * 1e3:.1f} ms, {per_query[0][2]} one_round calls; "
          f"inside one_round {inside * 1e3:.1f} ms, orchestrator between rounds {(wall - inside) * 1e3:.1f} ms")
    print("rounds of one query by step:", dict(per_query[0][3]))
    by_what: dict[str, list[float]] = collections.defaultdict(list)
    for r in rounds:
        by_what[r["what"]].append((r["t1"] - r["t0"]) * 1e3)
    print("| step | rounds per query | median ms per round |")
    for what, ts in by_what.items():
        print(f"| {what} | {len(ts) / len(windows):.0f} | {statistics.median(ts):.2f} |")
    gaps = []
    for a, b in windows:
        rs = sorted((r for r in rounds if a <= r["t0"] <= b), key=lambda r: r["t0"])
        gaps += [(y["t0"] - x["t1"]) * 1e3 for x, y in zip(rs, rs[1:])]
    print(f"orchestrator gap between consecutive rounds: median {statistics.median(gaps):.2f} ms, "
          f"mean {statistics.mean(gaps):.2f} ms")
    try:
        breakdown(records, trace_dir, windows, sum(q[2] for q in per_query))
    except KeyError as e:  # a worker record cut short (a request that failed): the stage table is skipped
        print(f"(no stage breakdown: incomplete worker record, {e})")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
