"""Encrypted model serving vs plaintext inference: latency (batch 1), throughput (batched), rounds, bytes.

Starts an auto-managed three-worker cluster on loopback (two parties + crypto
provider), shares a briefly trained MNIST CNN (conv16-avgpool-relu-conv32-
avgpool-relu-conv64-avgpool-relu-flatten-dense10), serves it in the
background and queries it from a client with its own connections.

Rounds and bytes are counted by the owner's orchestration (one pass of the
serving loop for one query): ``rounds`` are SMPC opening rounds
(``veil.mpc.opening.count_openings``), ``bytes`` the orchestrator's and the
client's WebSocket traffic (worker-to-worker dealing is not included).

Two regimes: *cold* (the first queries: the crypto provider deals each
query's material while the query waits, in batches that grow 1, 2, 4, ...)
and, with ``--warm N``, *dealt ahead* (measured after N warm-up queries and
two warm-up batches, so the provider's spares cover the timed queries: the
online phase alone, what an offline/online split delivers).

Run: ``.venv/bin/python bench/bench_serving.py [--queries 10] [--batch 16] [--warm 16] [--peer]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serving"))

import veil as sy  # noqa: E402
from veil.datasets import load_mnist_5k  # noqa: E402
from veil.mpc.opening import count_openings  # noqa: E402
from veil.workers.registry import HookContext  # noqa: E402
from veil.workers.websocket_launcher import free_port  # noqa: E402
from serving_helpers import mnist_cnn, train_briefly  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warm", type=int, default=0, help="also time queries after N warm-up queries (dealt ahead)")
    ap.add_argument("--peer", action="store_true", help="Cluster(peer_openings=True): Beaver/truncation openings "
                    "party to party")
    args = ap.parse_args()
    torch.set_num_threads(1)
    hook = sy.TorchHook(torch)
    data = load_mnist_5k()
    model = train_briefly(mnist_cnn(), data)
    n = max(args.queries, args.batch)
    images = data["x_test"][:: max(1, len(data["x_test"]) // n)][:n]  # spread over digits (test set is ordered)
    with torch.no_grad():
        t = time.perf_counter()
        for i in range(args.queries):
            model(images[i:i + 1])
        plain_latency = (time.perf_counter() - t) / args.queries
        t = time.perf_counter()
        model(images[: args.batch])
        plain_tput = args.batch / (time.perf_counter() - t)
        expected = model(images).argmax(1)

    cluster = sy.Cluster(*[sy.NetworkWorker(f"127.0.0.1:{free_port()}") for _ in range(3)], auto_managed=True,
                         peer_openings=args.peer)
    cluster.start()
    try:
        model.share(cluster, input_shape=(1, 1, 28, 28), max_batch=args.batch)
        service = sy.serving.service_of(model)
        client = sy.ModelClient(hook=HookContext(), timeout=300)
        client.connect_to_model((1, 1, 28, 28), (1, 10), cluster)
        # One query served by hand (foreground step) to count its rounds and bytes.
        rid = client.submit(images[:1])
        owner_stats, client_stats = hook.local_worker.stats, client.hook.local_worker.stats
        owner_stats.reset()
        with count_openings() as opened:
            while not service.step(1):
                time.sleep(0.01)
        owner_bytes = owner_stats.bytes_sent + owner_stats.bytes_received
        client.result(rid)
        model.serve(background=True)
        client_stats.reset()
        correct, t = 0, time.perf_counter()
        for i in range(args.queries):
            correct += int(client.query_model(images[i:i + 1]).argmax(1).item() == expected[i].item())
        latency = (time.perf_counter() - t) / args.queries
        client_bytes = (client_stats.bytes_sent + client_stats.bytes_received) / args.queries
        def batched() -> tuple[float, int]:
            t = time.perf_counter()
            rids = [client.submit(images[i:i + 1]) for i in range(args.batch)]
            outs = torch.cat([client.result(r) for r in rids])
            return args.batch / (time.perf_counter() - t), int((outs.argmax(1) == expected[: args.batch]).sum())

        tput, correct_b = batched()
        warm = None
        if args.warm:
            for i in range(args.warm):
                client.query_model(images[i % n:i % n + 1])
            t = time.perf_counter()
            for i in range(args.queries):
                client.query_model(images[i:i + 1])
            warm_latency = (time.perf_counter() - t) / args.queries
            batched()  # the second batch of this shape: the provider deals 2, one spare
            warm = (warm_latency, *batched())
        model.stop()
        client.close()
    finally:
        cluster.stop()
    print(f"plaintext: latency {plain_latency * 1e3:.2f} ms/query, throughput {plain_tput:.0f} queries/s "
          f"(batch {args.batch})")
    print(f"encrypted: latency {latency * 1e3:.0f} ms/query ({latency / plain_latency:.0f}x plaintext), "
          f"throughput {tput:.1f} queries/s with {args.batch} queued ({plain_tput / tput:.0f}x slower)")
    print(f"per query (batch 1): {opened.rounds} opening rounds, {opened.bytes / 1e3:.0f} kB opened, "
          f"owner<->parties {owner_bytes / 1e3:.0f} kB, client<->parties {client_bytes / 1e3:.1f} kB")
    print(f"same label as plaintext: {correct}/{args.queries} (batch 1), {correct_b}/{args.batch} (batched)")
    if warm is not None:
        print(f"dealt ahead (after {args.warm} warm-up queries): latency {warm[0] * 1e3:.0f} ms/query, "
              f"throughput {warm[1]:.1f} queries/s with {args.batch} queued, same label {warm[2]}/{args.batch}")


if __name__ == "__main__":
    main()
