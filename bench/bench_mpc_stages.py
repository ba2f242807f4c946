"""Where an SMPC call's time goes over network workers: per stage, orchestrator and parties.

Run: ``.venv/bin/python bench/bench_mpc_stages.py [--calls 5] [workload ...]`` (default: mul 1e6,
relu 1e5, CNN inference batch 64).

Three ``veil worker`` processes as bench_crypten.py sets them up (2 parties + crypto provider),
started with ``bench/stage_probe.py``'s timers (``bench/stage_site/sitecustomize.py``). Per
workload: one recorded call gives the plan; then per call the provider deals it ahead (untimed),
and the call runs followed by a flush of the parties' deferred steps (so the call's last local
steps are inside its own window). The same over VirtualWorkers gives the same-run ratio. Printed
per workload: best and median wall time, mean CPU per call (all processes), bytes each way per party, the orchestrator's
stages (encode, client send = mask + socket write, client recv = waiting + reading, decode, the
combine of opened shares), how much the parties' transfers overlapped (sum of the per-thread
send/recv time over the time any of them was running: 2.0 = two parties fully in parallel), and
each party's stages (deferred steps, opening step, encode, decode, event-loop thread CPU =
websocket receive and reply).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
STAGES_DIR = tempfile.mkdtemp(prefix="veil-stages-")
os.environ["VEIL_STAGES_DIR"] = STAGES_DIR
os.environ["OMP_NUM_THREADS"] = "1"  # one torch thread per worker, as bench_crypten.py runs them
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE / "stage_site"), str(HERE), str(HERE.parent),
                                            os.environ.get("PYTHONPATH", "")])

import stage_probe  # noqa: E402

stage_probe.install(server=False)

import torch  # noqa: E402

import veil as sy  # noqa: E402
from bench_crypten import network_workers  # noqa: E402
from bench_mpc import model_cases, op_cases, virtual_setup  # noqa: E402
from veil.mpc.providers.worker_dealer import dealer_for  # noqa: E402

DEFAULT = ["mul 1e6", "relu 1e5", "CNN inference batch 64"]


def _children() -> list[int]:
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def _worker_pids() -> dict[str, int]:
    out = {}
    for pid in _children():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--id" in cmd:
            out[cmd[cmd.index(b"--id") + 1].decode()] = pid
    return out


def _worker_snapshots(pids: dict[str, int]) -> dict[str, dict]:
    for p in pids.values():
        try:
            os.unlink(os.path.join(STAGES_DIR, f"{p}.json"))
        except FileNotFoundError:
            pass
        os.kill(p, signal.SIGUSR1)
    out, deadline = {}, time.monotonic() + 10
    while len(out) < len(pids) and time.monotonic() < deadline:
        for wid, p in pids.items():
            path = os.path.join(STAGES_DIR, f"{p}.json")
            if wid not in out and os.path.exists(path):
                out[wid] = json.loads(Path(path).read_text())
        time.sleep(0.005)
    return out


def _delta(after: dict, before: dict) -> dict:
    st = {}
    for k, v in after["stages"].items():
        b = before["stages"].get(k, [0, 0.0, 0.0])
        if v[0] - b[0]:
            st[k] = [v[0] - b[0], v[1] - b[1], v[2] - b[2]]
    return {"stages": st, "process_cpu": after["process_cpu"] - before["process_cpu"],
            "loop_cpu": after["loop_cpu"] - before["loop_cpu"],
            "threads": {k: v - before["threads"].get(k, 0.0) for k, v in after["threads"].items()
                        if v - before["threads"].get(k, 0.0) > 5e-4}}


def _overlap(events: list[tuple]) -> float:
    """Sum of the intervals' lengths over the length of their union."""
    if not events:
        return 0.0
    total = sum(e - s for _, _, s, e in events)
    union, cur_s, cur_e = 0.0, None, None
    for _, _, s, e in sorted(events, key=lambda x: x[2]):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                union += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    union += cur_e - cur_s
    return total / union if union else 0.0


def _calls(cases: dict, me, parties, cp, names: list[str], calls: int, probe: bool) -> dict:
    dealer = dealer_for(cp, me)
    pids = _worker_pids() if probe else {}
    res = {}
    for name in names:
        call = cases[name]
        with dealer.record() as plan:
            call()
        for p in parties:
            me.flush(p)
        recs = []
        for _ in range(calls):
            dealer.deal_ahead(plan)
            dealer.on_exhausted = "raise"
            try:
                w0 = _worker_snapshots(pids) if probe else {}
                o0, s0 = stage_probe.snapshot(), me.stats.snapshot()
                del stage_probe.TIMELINE[:]
                t0 = time.perf_counter()
                call()
                for p in parties:
                    me.flush(p)
                wall = time.perf_counter() - t0
                o1, s1 = stage_probe.snapshot(), me.stats.snapshot()
                w1 = _worker_snapshots(pids) if probe else {}
            finally:
                dealer.on_exhausted = "deal"
            rec = {"wall": wall, "orch": _delta(o1, o0),
                   "to_party": (s1["bytes_sent"] - s0["bytes_sent"]) / len(parties),
                   "from_party": (s1["bytes_received"] - s0["bytes_received"]) / len(parties),
                   "overlap": _overlap(list(stage_probe.TIMELINE)),
                   "workers": {wid: _delta(w1[wid], w0[wid]) for wid in w1 if wid in w0}}
            recs.append(rec)
        res[name] = _mean(recs)
    return res


def _mean(recs: list[dict]) -> dict:
    """CPU and bytes: the mean over the calls (steadier than one call on a shared box); wall: best and median."""
    n = len(recs)
    walls = sorted(r["wall"] for r in recs)

    def avg(ds: list[dict]) -> dict:
        out = {"stages": {}, "process_cpu": sum(d["process_cpu"] for d in ds) / n,
               "loop_cpu": sum(d.get("loop_cpu", 0.0) for d in ds) / n, "threads": {}}
        for d in ds:
            for k, v in d["stages"].items():
                acc = out["stages"].setdefault(k, [0, 0.0, 0.0])
                for i in range(3):
                    acc[i] += v[i] / n
            for k, v in d.get("threads", {}).items():
                out["threads"][k] = out["threads"].get(k, 0.0) + v / n
        return out

    return {"wall": walls[0], "wall_median": walls[n // 2], "orch": avg([r["orch"] for r in recs]),
            "to_party": sum(r["to_party"] for r in recs) / n, "from_party": sum(r["from_party"] for r in recs) / n,
            "overlap": sum(r["overlap"] for r in recs) / n,
            "workers": {wid: avg([r["workers"][wid] for r in recs if wid in r["workers"]])
                        for wid in recs[0]["workers"]}}


def _report(name: str, net: dict, virt: dict | None) -> None:
    print(f"\n### {name}: network {net['wall'] * 1e3:.1f} ms (median {net['wall_median'] * 1e3:.1f})"
          + (f", VirtualWorkers {virt['wall'] * 1e3:.1f} ms (median {virt['wall_median'] * 1e3:.1f}), ratio of "
             f"bests {net['wall'] / virt['wall']:.2f}" if virt else ""))
    cpu = net["orch"]["process_cpu"] + sum(d["process_cpu"] for d in net["workers"].values())
    print(f"CPU per call, all processes: {cpu * 1e3:.1f} ms"
          + (f" (VirtualWorkers, one process: {virt['orch']['process_cpu'] * 1e3:.1f} ms)" if virt else ""))
    print(f"per party: orchestrator -> party {net['to_party'] / 1e6:.2f} MB, party -> orchestrator "
          f"{net['from_party'] / 1e6:.2f} MB; transfers overlap {net['overlap']:.2f} (2.0 = both parties at once)")
    print(f"orchestrator process CPU {net['orch']['process_cpu'] * 1e3:.1f} ms")
    print("| where | stage | calls | wall ms | thread CPU ms |\n|---|---|---|---|---|")  # means per call
    for k, (n, w, c) in sorted(net["orch"]["stages"].items()):
        print(f"| orchestrator | {k} | {n:.0f} | {w * 1e3:.1f} | {c * 1e3:.1f} |")
    for wid, d in sorted(net["workers"].items()):
        for k, (n, w, c) in sorted(d["stages"].items()):
            print(f"| {wid} | {k} | {n:.0f} | {w * 1e3:.1f} | {c * 1e3:.1f} |")
        print(f"| {wid} | event-loop thread (websocket receive + reply) | | | {d['loop_cpu'] * 1e3:.1f} |")
        print(f"| {wid} | whole process | | | {d['process_cpu'] * 1e3:.1f} |")
        print(f"| {wid} | by thread | | | " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(d["threads"].items())) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workloads", nargs="*", default=DEFAULT)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--skip-virtual", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"load average before: {open('/proc/loadavg').read().strip()}")
    hook = sy.TorchHook(torch)
    virt = {}
    if not args.skip_virtual:
        _, me, parties, cp = virtual_setup(2, hook=hook)
        cases = {n: (lambda s=s, f=f: f(*s)) for n, s, f, _ in op_cases(parties, cp)}
        cases.update({n: fn for n, fn, _ in model_cases(parties, cp)})
        virt = _calls(cases, me, parties, cp, args.workloads, args.calls, probe=False)
    with network_workers(hook) as (parties, cp):
        me = hook.local_worker
        cases = {n: (lambda s=s, f=f: f(*s)) for n, s, f, _ in op_cases(parties, cp)}
        cases.update({n: fn for n, fn, _ in model_cases(parties, cp)})
        net = _calls(cases, me, parties, cp, args.workloads, args.calls, probe=True)
    for name in args.workloads:
        _report(name, net[name], virt.get(name))
    print(f"\nload average after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
