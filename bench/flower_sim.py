"""Flower's simulation engine on the benchmark's task (run by bench_fl_scale.py --flower in .bench-venvs/flwr).

Same model (nn.Linear(13, 1)), split (fl_scale_data.client_data), one local epoch of SGD with
batch size 8 and lr 0.001 per round, FedAvg over all clients, on Ray with one CPU per client
actor. Prints one JSON line: round times (configure_fit to aggregate_fit), set-up, driver memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import psutil
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fl_scale_data  # noqa: E402

warnings.filterwarnings("ignore")


def main() -> None:
    import flwr
    import ray
    from flwr.client import NumPyClient
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import start_simulation

    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    proc = psutil.Process()

    class LinearClient(NumPyClient):
        def __init__(self, i: int) -> None:
            self.x, self.y = fl_scale_data.client_data(i, args.rows)
            self.model = nn.Linear(13, 1)

        def fit(self, parameters, config):
            with torch.no_grad():
                for t, v in zip(self.model.parameters(), parameters):
                    t.copy_(torch.from_numpy(v))
            opt = torch.optim.SGD(self.model.parameters(), lr=0.001)
            perm = torch.randperm(len(self.x))
            for s in range(0, len(self.x), 8):
                idx = perm[s:s + 8]
                opt.zero_grad()
                F.mse_loss(self.model(self.x[idx]), self.y[idx]).backward()
                opt.step()
            return [t.detach().numpy().copy() for t in self.model.parameters()], len(self.x), {}

    def client_fn(context):
        return LinearClient(int(context.node_config["partition-id"])).to_client()

    marks: dict = {"start": [], "end": []}

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            marks["start"].append(time.perf_counter())
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            marks["end"].append(time.perf_counter())
            marks.setdefault("failures", []).append(len(failures))
            return out

    init = [t.detach().numpy() for t in nn.Linear(13, 1).parameters()]
    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.clients,
                           min_available_clients=args.clients, initial_parameters=ndarrays_to_parameters(init))
    import threading

    peak = {"rss": proc.memory_info().rss}
    stop = threading.Event()

    def sample() -> None:  # the driver's peak memory, sampled as bench_fl_scale.py samples veil's
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            stop.wait(0.02)

    rss0 = proc.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=128 * 2**20,
             log_to_driver=False)
    ray_start = time.perf_counter() - t
    t = time.perf_counter()
    cpu0 = proc.cpu_times()
    start_simulation(client_fn=client_fn, num_clients=args.clients, config=ServerConfig(num_rounds=args.rounds),
                     strategy=strategy, client_resources={"num_cpus": 1}, keep_initialised=True)
    total = time.perf_counter() - t
    cpu1 = proc.cpu_times()
    stop.set()
    sampler.join()
    rss1 = proc.memory_info().rss
    rounds = [e - s for s, e in zip(marks["start"], marks["end"])]
    print(json.dumps({
        "backend": f"flower-{flwr.__version__}", "clients": args.clients, "ray_start_s": ray_start,
        "setup_s": marks["start"][0] - t if marks["start"] else total, "rounds_s": rounds, "total_s": total,
        "failures": marks.get("failures", []),
        "coordinator_rss_mib": {"before": rss0 / 2**20, "after_setup": rss0 / 2**20, "end": rss1 / 2**20,
                                "peak": max(peak["rss"], rss1) / 2**20},
        "coordinator_cpu_ms_per_client_round": 1000 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system)
        / (args.clients * args.rounds),
        "train_loss": float("nan"),
    }))


if __name__ == "__main__":
    main()
