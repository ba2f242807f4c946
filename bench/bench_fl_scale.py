"""FedAvg with many simulated clients: time per round and memory, in process or on Ray (vs Flower).

Run:
    .venv/bin/python bench/bench_fl_scale.py [--clients 1000] [--rounds 3]            # in process (default)
    .venv/bin/python bench/bench_fl_scale.py --backend ray --clients 1000 [--flower]  # Ray actors, + Flower
    .venv/bin/python bench/bench_fl_scale.py --backend ray --clients 1000 10000 --rounds 2 --flower

In process: each client is a VirtualWorker in this process holding a slice of
Boston Housing (resampled with replacement so that every client has --rows
rows) and a training plan for a linear model. Baseline: the same number of
client updates as plain PyTorch loops in the same process.

``--backend ray``: the clients live in Ray actors (``sy.ray.federated_clients``,
many virtual clients per actor; each actor builds its clients' data itself,
so the coordinator never holds it), dispatched in batches by ``fl.train``
(``--sequential``: one client at a time, the path before batching). Reported:
set-up, time of each round (``RoundRecord.seconds``; round 1 includes sending
the plan), the coordinator's resident memory (before the clients, after
set-up, at the end, and the peak sampled every 20 ms), its CPU time and the
actors' per client and round, each actor's memory, and bytes the coordinator
sent/received per client and round. Several ``--clients`` counts run in turn,
so the coordinator's memory can be compared across client counts.
``--flower``: Flower's simulation engine (``flwr[simulation]``, its own venv
under .bench-venvs/flwr, made on first use) runs the same model, split
(bench/fl_scale_data.py), rounds, batch size, learning rate and client count
in the same run, after veil's Ray has been shut down; the ratio is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import veil as sy
from veil import federated as fl
from veil.datasets import load_boston

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fl_scale_data  # noqa: E402  (bench/: the split shared with the Flower side)

ROOT = Path(__file__).resolve().parent.parent
FLWR_VENV = ROOT / ".bench-venvs" / "flwr"
FLWR_SPECS = ["torch==2.13.0", "flwr[simulation]>=1.20,<2", "psutil>=5.9,<8"]


def run_in_process(args: argparse.Namespace) -> None:
    proc = psutil.Process()
    hook = sy.TorchHook(torch)
    x, y, _ = load_boston()
    g = torch.Generator().manual_seed(0)
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    workers = [sy.VirtualWorker(hook, id=f"client{i}") for i in range(args.clients)]
    datasets = []
    for w in tqdm(workers, desc="sending client data", unit="client"):
        idx = torch.randint(0, len(x), (args.rows,), generator=g)
        datasets.append(fl.BaseDataset(x[idx], y[idx]).send(w))
    fed = fl.FederatedDataset(datasets)
    setup = time.perf_counter() - t
    model = nn.Linear(13, 1)
    t = time.perf_counter()
    hist = fl.train(model, fed, rounds=args.rounds, lr=0.001, batch_size=8)
    veil_time = time.perf_counter() - t
    gc.collect()
    rss1 = proc.memory_info().rss

    # Baseline: the same client updates in plain PyTorch (no workers, no averaging cost).
    ref = nn.Linear(13, 1)
    t = time.perf_counter()
    for _ in range(args.rounds):
        for ds in datasets:
            opt = torch.optim.SGD(ref.parameters(), lr=0.001)
            for i in range(0, args.rows, 8):
                opt.zero_grad()
                F.mse_loss(ref(x[i:i + 8]), y[i:i + 8]).backward()
                opt.step()
    plain_time = time.perf_counter() - t
    print(f"\n{args.clients} clients x {args.rows} rows, linear model, {args.rounds} FedAvg rounds")
    print(f"  set-up (workers + data): {setup:.1f} s")
    print(f"  veil: {veil_time:.2f} s ({veil_time / args.rounds:.2f} s/round); plain PyTorch loops: "
          f"{plain_time:.2f} s; ratio {veil_time / plain_time:.1f}x")
    print(f"  memory: {rss0 / 2**20:.0f} MiB before clients, {rss1 / 2**20:.0f} MiB after "
          f"({(rss1 - rss0) / 2**10 / args.clients:.1f} KiB per client)")
    print(f"  last round: train loss {hist.rounds[-1].train_loss:.2f} over {len(hist.rounds[-1].clients)} clients")


class PeakRSS:
    """Samples this process's resident memory every 20 ms in a thread: the peak of a phase."""

    def __init__(self) -> None:
        import threading

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_ray(args: argparse.Namespace, n_clients: int) -> dict:
    import ray

    import veil.ray as vray

    proc = psutil.Process()
    t = time.perf_counter()
    vray.init(address=args.address, num_cpus=args.num_cpus)
    ray_start = time.perf_counter() - t
    ray.cloudpickle.register_pickle_by_value(fl_scale_data)  # the actors build the data from this module
    hook = sy.TorchHook(torch)
    # Warm-up: the first traced plan imports torch's tracing machinery (~100 MiB, once per process);
    # memory "before clients" is taken after it so that the per-client figure is per client.
    warm = sy.VirtualWorker(hook, id="warmup")
    fl.train(nn.Linear(13, 1), fl.FederatedDataset([fl.BaseDataset(*fl_scale_data.client_data(0)).send(warm)]),
             rounds=1, progress=False)
    bare = ray.remote(vray.ClientHost).options(num_cpus=0).remote()  # an actor with no clients: the baseline
    bare_rss = ray.get(bare.stats.remote())["rss"]
    ray.kill(bare)
    gc.collect()
    rss0 = proc.memory_info().rss
    with PeakRSS() as peak:
        t = time.perf_counter()
        clients = vray.federated_clients(num_clients=n_clients, actors=args.actors, hook=hook,
                                         make_dataset=_ClientData(args.rows))
        fed = clients.federated_dataset(batched=not args.sequential)
        setup = time.perf_counter() - t
        rss_setup = proc.memory_info().rss
        stats = hook.local_worker.stats
        stats.reset()
        model = nn.Linear(13, 1)
        cpu0, actor_cpu0 = proc.cpu_times(), [s["cpu_s"] for s in clients.actor_stats()]
        t = time.perf_counter()
        hist = fl.train(model, fed, rounds=args.rounds, lr=0.001, batch_size=8, progress=False)
        total = time.perf_counter() - t
        cpu1 = proc.cpu_times()
        wire = stats.snapshot()
        del fed
        gc.collect()
        rss1 = proc.memory_info().rss
    actor_stats = clients.actor_stats()
    clients.shutdown()
    vray.shutdown()
    per_actor = [(s["rss"] - bare_rss) / max(1, s["clients"]) for s in actor_stats]
    client_rounds = n_clients * args.rounds
    out = {
        "backend": "veil-ray" + ("-sequential" if args.sequential else ""), "clients": n_clients,
        "actors": len(actor_stats), "ray_start_s": ray_start, "setup_s": setup,
        "rounds_s": [r.seconds for r in hist.rounds], "total_s": total,
        "coordinator_rss_mib": {"before": rss0 / 2**20, "after_setup": rss_setup / 2**20, "end": rss1 / 2**20,
                                "peak": peak.peak / 2**20},
        "coordinator_cpu_ms_per_client_round": 1000 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system)
        / client_rounds,
        "actor_cpu_ms_per_client_round": 1000 * sum(s["cpu_s"] - c for s, c in zip(actor_stats, actor_cpu0))
        / client_rounds,
        "actor_rss_mib": [s["rss"] / 2**20 for s in actor_stats], "bare_actor_rss_mib": bare_rss / 2**20,
        "actor_kib_per_client": sum(per_actor) / len(per_actor) / 2**10,
        "bytes_per_client_round": (wire["bytes_sent"] + wire["bytes_received"]) / client_rounds,
        "messages_per_client_round": wire["messages"] / client_rounds,
        "train_loss": hist.rounds[-1].train_loss, "dropped": sum(len(r.dropped) for r in hist.rounds),
    }
    return out


class _ClientData:
    """make_dataset for the actors (a picklable callable: client i -> its rows)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return fl_scale_data.client_data(i, self.rows)


def ensure_flwr_venv() -> Path:
    python = FLWR_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import flwr, torch, ray"],
                                          capture_output=True).returncode == 0:
        return python
    print(f"[flower venv] setting up {FLWR_VENV} (minutes; needs the package index)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(FLWR_VENV)], check=True)
    for spec in FLWR_SPECS:  # torch first: the CPU wheel, before flwr could pull another
        subprocess.run([str(python), "-m", "pip", "install", "-q", spec], check=True)
    return python


def run_flower(args: argparse.Namespace, n_clients: int) -> dict:
    python = ensure_flwr_venv()
    cmd = [str(python), str(ROOT / "bench" / "flower_sim.py"), "--clients", str(n_clients), "--rows",
           str(args.rows), "--rounds", str(args.rounds), "--num-cpus", str(args.num_cpus or os.cpu_count())]
    done = subprocess.run(cmd, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                   if k != "PYTHONPATH"})
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"Flower simulation failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def _report(r: dict) -> None:
    later = r["rounds_s"][1:] or r["rounds_s"]
    print(f"  {r['backend']}: start {r.get('ray_start_s', 0):.1f} s, set-up {r['setup_s']:.1f} s, rounds "
          + ", ".join(f"{s:.2f}" for s in r["rounds_s"]) + f" s (mean after the first: {sum(later) / len(later):.2f} s)")
    mem = r["coordinator_rss_mib"]
    print(f"    coordinator memory: {mem['before']:.0f} MiB before clients, {mem['after_setup']:.0f} after set-up, "
          f"{mem['end']:.0f} at the end, peak {mem['peak']:.0f} "
          f"({(mem['peak'] - mem['before']) * 1024 / r['clients']:.2f} KiB per client at the peak); "
          f"CPU {r['coordinator_cpu_ms_per_client_round']:.3f} ms per client and round")
    if "actor_kib_per_client" in r:
        print(f"    actors: {', '.join(f'{m:.0f}' for m in r['actor_rss_mib'])} MiB (bare actor "
              f"{r['bare_actor_rss_mib']:.0f} MiB; {r['actor_kib_per_client']:.1f} KiB per client), CPU "
              f"{r['actor_cpu_ms_per_client_round']:.3f} ms per client and round; "
              f"{r['bytes_per_client_round'] / 1024:.2f} KiB and {r['messages_per_client_round']:.1f} messages "
              f"per client and round through the coordinator; {r['dropped']} clients dropped")
    print(f"    last round train loss {r['train_loss']:.2f}")


def _run_alone(n: int) -> list:
    """This benchmark for one client count in a child process; its results."""
    import tempfile

    argv = sys.argv[1:]
    keep, skip = [], False
    for a in argv:  # drop --clients ... and --json ... from our own arguments
        if a in ("--clients", "--json"):
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        keep.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        done = subprocess.run([sys.executable, __file__, *keep, "--clients", str(n), "--json", str(out)])
        if done.returncode != 0:
            raise RuntimeError(f"the {n}-client run failed ({done.returncode})")
        return json.loads(out.read_text())[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["inprocess", "ray"], default="inprocess")
    parser.add_argument("--clients", type=int, nargs="+", default=[1000],
                        help="client count(s); with --backend ray each runs in turn (e.g. --clients 1000 10000)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--actors", type=int, default=None, help="Ray actors (default: the CPUs)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--address", default=None, help="a Ray cluster (default: $VEIL_RAY_ADDRESS, else local)")
    parser.add_argument("--sequential", action="store_true",
                        help="Ray: dispatch one client at a time through worker handles (the pre-batching path)")
    parser.add_argument("--flower", action="store_true", help="also run Flower's simulation (same run)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.backend == "inprocess":
        args.clients = args.clients[0]
        run_in_process(args)
        return
    runs = []
    for n in args.clients:
        if len(args.clients) > 1:  # each count in a fresh process: memory high-water marks do not carry over
            results = _run_alone(n)
        else:
            results = [run_ray(args, n)]
            if args.flower:
                results.append(run_flower(args, n))
        runs.append(results)
        print(f"\n{n} clients x {args.rows} rows, linear model, {args.rounds} FedAvg rounds, {os.cpu_count()} CPUs, "
              f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}")
        for r in results:
            _report(r)
        if len(results) == 2:
            v, f = (sum(r["rounds_s"][1:] or r["rounds_s"]) / len(r["rounds_s"][1:] or r["rounds_s"])
                    for r in results)
            print(f"  round time veil / Flower: {v / f:.2f}x (after the first round)", flush=True)
    if len(runs) > 1:
        print("\ncoordinator peak memory over the no-client baseline, by client count:")
        for results in runs:
            print("  " + "; ".join(f"{r['backend']} {r['clients']}: "
                                  f"{r['coordinator_rss_mib']['peak'] - r['coordinator_rss_mib']['before']:.1f} MiB"
                                  for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
