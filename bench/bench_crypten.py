"""veil vs CrypTen 0.4.1 vs plain PyTorch: SMPC workloads side by side, in the same run.

Run: ``.venv/bin/python bench/bench_crypten.py [--repeat 3] [--passes 2] [--skip-models]
[--skip-network] [--crypten-provider both|TFP|TTP] [--threads 1] [--crypten-threads 1]``

Workloads (bench/bench_mpc.py's): elementwise mul of 1e6 fixed-point values,
256x256 @ 256x256 matmul, ReLU on 1e5 values, private inference of the MNIST
CNN (conv16-avgpool-relu-conv32-avgpool-relu-conv64-avgpool-relu-flatten-
linear10, batch 1 and 64; the timed call encrypts the input) and one
encrypted SGD step (forward, MSE backward, update) of a 784-128-128-10 MLP at
batch 128 and of the same CNN at batch 64. 2 parties, 16 fractional bits, ring Z/2^64 in both frameworks.

Timing: CrypTen, then veil, ``--passes`` times; each keeps its best pass (the
shared cores' load drifts), and within a pass the best of ``--repeat`` calls
after one warm-up call. veil over VirtualWorkers and over network workers take
turns call by call within each workload, so the network column's ratio to the
virtual one compares calls made in the same minute. Threads: each CrypTen party process and veil get 1 torch thread by
default (``--crypten-threads``, ``--threads``): on 2 shared cores, 2 threads
per process stall on every parallel region whenever the other core is busy
(measured 3-4x slower for both frameworks under load).

Columns:

- **torch s**: the plain workload in this process, best of many calls with
  1 thread and with one per core.
- **veil s**: veil over VirtualWorkers in this process (bench_mpc's set-up):
  every call includes the crypto provider dealing fresh material
  (``max_batch=1``, seeded dealing; the provider runs in-process) and every
  message's serialization; no sockets.
- **veil online s**: the same call with its material dealt ahead
  (``WorkerDealer.record`` + ``deal_ahead``, then the call with
  ``on_exhausted="raise"``, so it provably deals nothing): openings and local
  work only. **veil ahead+online s**: dealing ahead + that call (best of
  ``--repeat``, the pair timed together).
- **veil net s** (unless ``--skip-network``): the same over three ``veil
  worker`` processes on loopback (two parties and the crypto provider, which
  deals worker to worker), orchestrated from this process over WebSockets.
  **veil net online/veil online**: the ratio of the two online columns (best
  calls); **same, medians**: of the medians of the ``--repeat`` online calls
  (steadier: one lucky virtual call moves the best-of ratio most).
- **CrypTen s**: two CrypTen processes (bench/crypten_party.py, gloo on
  loopback), wall time measured by rank 0 around the call after a barrier.
  Providers (``--crypten-provider both``, the default, runs both in turn):
  CrypTen's default TFP ("trusted first party": party 0 generates every
  triple itself and shares it by PRZS, with no messages, so dealing costs only
  local compute; party 0 knows the triples) and TTP (a third process deals,
  seeded like veil's crypto provider). Dealing is in the time either way.
- **rounds**: veil's opening rounds (``count_openings``; the request that
  makes the provider deal is one more message hop per fresh item, not
  counted); CrypTen's communicator rounds (one per collective call; with TTP
  its dealer requests count).
- **sent/party**: what one party sends. veil: its shares of opened values
  (party -> orchestrator, which relays openings). CrypTen: counted by wrapping
  its communicator (its own statistic adds both directions for all_reduce but
  one direction for broadcast, scatter, ...; it is kept in the JSON as
  ``crypten_stat_bytes``). Mean of the two parties.
- **sent+recv/party**: everything a party sends and receives. veil: party ->
  orchestrator + orchestrator -> party (opened values and commands) + crypto
  provider -> party (seeds and corrections), for one call after a warm-up one
  (each call carries the previous call's truncation finish). In process, every
  party gets a truncation's opened ``c`` (8 B/entry; remote parties after the
  first get its packed top bits, 1/8 B/entry). CrypTen: sent + received over its
  communicator (with TTP: the dealer's traffic too).

CrypTen details: the models are built from crypten.nn layers with the torch
models' weights (``crypten.nn.from_pytorch`` goes through
``torch.onnx.export``, which on torch 2.13 needs onnxscript); the SGD step
calls ``update_parameters(lr, grad_threshold=None)``, a plain update like
veil's (CrypTen's default threshold adds a comparison per parameter).

The CrypTen venv is ``.bench-venvs/crypten`` (made on the first run, ~1
minute): torch 2.13.0 first, then ``crypten==0.4.1 --no-deps`` and what
``import crypten`` imports (numpy, pyyaml, omegaconf, onnx). A plain install
fails: crypten declares the deprecated ``sklearn`` package, which refuses to
install, and torchvision, tensorboard, pandas and scipy, which the import
does not need.

Output: the table, and ``bench/out/crypten_compare.json`` (every pass's
times, both CrypTen ranks' counts, max errors, load averages).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import veil as sy  # noqa: E402
from bench_mpc import _time as _best  # noqa: E402
from bench_mpc import dealing_plan, model_cases, online_once, op_cases, traffic, virtual_setup  # noqa: E402
from veil.mpc.providers.worker_dealer import dealer_for  # noqa: E402

VENV = ROOT / ".bench-venvs" / "crypten"
PARTY = Path(__file__).resolve().parent / "crypten_party.py"
OUT = Path(__file__).resolve().parent / "out" / "crypten_compare.json"
CRYPTEN_DEPS = ["numpy", "pyyaml", "omegaconf", "onnx"]  # what `import crypten` imports (checked on 0.4.1)
IMPORT_CHECK = (
    "import sys, torch.onnx._internal.torchscript_exporter.registration as r; "
    "sys.modules['torch.onnx._internal.registration'] = r; "
    "import torch, crypten; print(crypten.__version__, torch.__version__)"
)


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ CrypTen venv


def _run_step(title: str, cmd: list[str]) -> float:
    """Runs one set-up command, echoing its output indented; returns seconds taken."""
    log(f"[crypten venv] {title}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            log(f"    {line}")
    if proc.wait() != 0:
        raise RuntimeError(f"{title} failed (exit {proc.returncode}): {' '.join(cmd)}")
    dt = time.perf_counter() - t0
    log(f"[crypten venv] {title}: done in {dt:.0f} s")
    return dt


def _venv_ok(python: Path) -> str | None:
    if not python.exists():
        return None
    r = subprocess.run([str(python), "-c", IMPORT_CHECK], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    out = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    return out if out.startswith("0.4.1 2.13.0") else None


def ensure_crypten_venv(venv: Path = VENV) -> tuple[Path, dict]:
    """The CrypTen venv's python, made if missing; and how long each install step took."""
    python = venv / "bin" / "python"
    found = _venv_ok(python)
    if found:
        log(f"[crypten venv] {venv} ready (crypten, torch = {found})")
        return python, {}
    log(f"[crypten venv] setting up {venv} (about a minute; needs the package index)")
    steps = {}
    if not python.exists():
        steps["venv"] = _run_step("1/4 create venv", [sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    # torch first, pinned to the exact version this machine serves quickly; the other installs
    # then see it as satisfied instead of resolving (and downloading) another torch.
    steps["torch"] = _run_step("2/4 torch 2.13.0", pip + ["torch==2.13.0"])
    # crypten 0.4.1 declares the deprecated `sklearn` package (which refuses to install), torchvision,
    # tensorboard, pandas and scipy: none is imported by `import crypten`.
    steps["crypten"] = _run_step("3/4 crypten 0.4.1 (--no-deps)", pip + ["--no-deps", "crypten==0.4.1"])
    steps["deps"] = _run_step("4/4 what crypten imports", pip + CRYPTEN_DEPS)
    log("[crypten venv] (pip's 'crypten 0.4.1 requires ..., which is not installed' lines are expected: "
        "import crypten does not need those)")
    found = _venv_ok(python)
    if not found:
        r = subprocess.run([str(python), "-c", IMPORT_CHECK], capture_output=True, text=True)
        raise RuntimeError(f"crypten does not import in {venv}:\n{r.stdout}\n{r.stderr[-3000:]}")
    log(f"[crypten venv] ready (crypten, torch = {found}; {sum(steps.values()):.0f} s in all)")
    return python, steps


# ------------------------------------------------------------------ CrypTen run


def run_crypten(python: Path, repeat: int, skip_models: bool, provider: str, threads: int,
                timeout: float = 1800) -> dict:
    """Runs the two CrypTen parties (+ the TTP server with provider TTP); rank 0's results."""
    rdv = Path(tempfile.gettempdir()) / f"crypten_rdv_{os.getpid()}_{secrets.token_hex(4)}"
    rdv.unlink(missing_ok=True)
    ranks = 3 if provider == "TTP" else 2
    cmd = [str(python), str(PARTY), "--repeat", str(repeat), "--provider", provider, "--threads", str(threads)]
    if skip_models:
        cmd.append("--skip-models")
    procs, outs, errs = [], [], []
    try:
        for rank in range(ranks):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "RENDEZVOUS": f"file://{rdv}",
                   "DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": str(threads)}
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=env, cwd=str(ROOT)))
        for rank, p in enumerate(procs):
            o, e = [], []

            def pump(stream, sink, echo):
                for line in stream:
                    sink.append(line)
                    if echo and line.startswith("[crypten]"):
                        log("  " + line.rstrip())

            threads_ = [threading.Thread(target=pump, args=(p.stdout, o, False), daemon=True),
                        threading.Thread(target=pump, args=(p.stderr, e, rank == 0), daemon=True)]
            for t in threads_:
                t.start()
            outs.append((o, threads_))
            errs.append(e)
        deadline = time.monotonic() + timeout
        # Wait for all; if one fails, the others would block in a collective: stop them too.
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("CrypTen parties timed out:\n" + "".join(errs[0][-40:]))
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        rdv.unlink(missing_ok=True)
        for _, ts in outs:
            for t in ts:
                t.join(5)
    results = []
    for rank in range(2):
        lines = [ln for ln in outs[rank][0] if ln.startswith("CRYPTEN_RESULT ")]
        if procs[rank].returncode != 0 or not lines:
            raise RuntimeError(f"CrypTen rank {rank} failed (exit {procs[rank].returncode}):\n"
                               + "".join(errs[rank][-40:]))
        results.append(json.loads(lines[-1][len("CRYPTEN_RESULT "):]))
    r0, r1 = results
    for name, v in r0["results"].items():
        w = r1["results"][name]
        v["per_rank"] = [{k: x[k] for k in ("s", "rounds", "bytes", "sent", "received")} for x in (v, w)]
        # Per party as veil reports it: the mean over the two parties (with TTP only party 0 talks
        # to the dealer, so the ranks differ); rounds: the larger count (party 0's with TTP).
        v["sent"], v["received"] = (v["sent"] + w["sent"]) / 2, (v["received"] + w["received"]) / 2
        v["bytes"] = (v["bytes"] + w["bytes"]) / 2
        v["rounds"] = max(v["rounds"], w["rounds"])
    return r0


# ------------------------------------------------------------------ veil and torch


def _best_plain(fn) -> float:
    """Plain torch: the fastest of 1 thread and one per core (and this process's setting).

    With 2 threads on 2 shared cores, a busy second core stalls every parallel
    region for a scheduler slice (a 0.1 ms matmul reads 5-10 ms); 1 thread
    dodges that, 2 threads win on a quiet machine. The best is the baseline.
    """
    n = torch.get_num_threads()
    best = float("inf")
    try:
        for k in sorted({n, 1, os.cpu_count() or 1}):
            torch.set_num_threads(k)
            best = min(best, _best_calls(fn))
    finally:
        torch.set_num_threads(n)
    return best


def _best_calls(fn, min_calls: int = 5, budget_s: float = 0.5) -> float:
    """Best of at least ``min_calls`` calls, more while under ``budget_s`` (sub-ms ops are noisy here)."""
    fn()
    best, calls, t_end = float("inf"), 0, time.perf_counter() + budget_s
    while calls < min_calls or (time.perf_counter() < t_end and calls < 1000):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best


def _cases(parties, cp) -> list:
    """[(name, veil callable, plain callable, check)] for every workload; check(veil out) -> max error."""
    out = []
    for name, shared, fn, plain in op_cases(parties, cp):
        def check(res, fn=fn, plain=plain):
            return float((res.get().float_precision() - fn(*plain)).abs().max())
        out.append((name, (lambda fn=fn, shared=shared: fn(*shared)), (lambda fn=fn, plain=plain: fn(*plain)),
                    check))
    return out


class Side:
    """One way of running veil's workloads: VirtualWorkers in this process, or network workers."""

    def __init__(self, label: str, parties, cp, me, cp_local, skip_models: bool):
        self.label, self.cp, self.me, self.cp_local, self.n = label, cp, me, cp_local, len(parties)
        self.cases = _cases(parties, cp)
        if not skip_models:
            self.cases += [(name, fn, pfn, None) for name, fn, pfn in model_cases(parties, cp)]


def run_veil(sides: list[Side], repeat: int, plain: bool) -> list[dict]:
    """Times every workload on every side; with ``plain`` also the plain-torch baseline (in the first side's row).

    The sides take turns call by call within each workload (virtual, network, virtual, ...), so the load
    the shared cores carry at that moment falls on both: the network column's ratio to the virtual one is
    a same-minute comparison, as in bench_net_rounds.py (run one after the other, minutes apart, it swung as
    much as the differences it measures: RESULTS "Fortieth landing").
    """
    results: list[dict] = [{} for _ in sides]
    for k, (name, *_rest) in enumerate(sides[0].cases):
        live = []  # (side index, fn, plan, row) of the sides whose set-up call worked
        for i, side in enumerate(sides):
            _, fn, pfn, check = side.cases[k]
            try:
                fn()  # warm-up; it also carries what the previous workload left riding on the next requests
                out, t = traffic(fn, side.me, side.cp_local, side.n)  # counted: this workload's steady state (a
                # truncation's finish rides on the next call: the previous call's is counted here, this one's next)
                t["max_err"] = check(out) if check else None
                live.append((i, fn, dealing_plan(fn, side.cp, side.me), t))
            except Exception as e:  # report the others; the table shows the failure
                log(f"  [{side.label}] {name}: FAILED {type(e).__name__}: {e}")
                t = {"error": f"{type(e).__name__}: {e}", "s": None, "rounds": None, "max_err": None}
            results[i][name] = t
        for i, fn, plan, t in live:
            t["s"] = t["online_s"] = t["total_s"] = float("inf")
            t["online_calls"] = []
        for _ in range(repeat):  # turn by turn: one call with fresh dealing, one dealt ahead, on each side
            for i, fn, plan, t in list(live):
                side = sides[i]
                try:
                    t["s"] = min(t["s"], _best(fn, 1))
                    online, total, deal = online_once(fn, side.cp, side.me, plan)
                except Exception as e:
                    log(f"  [{side.label}] {name}: FAILED {type(e).__name__}: {e}")
                    t.update(error=f"{type(e).__name__}: {e}", s=None, online_s=None, total_s=None)
                    live.remove((i, fn, plan, t))
                    continue
                t["online_calls"].append(online)
                t["online_s"] = min(t["online_s"], online)
                if total < t["total_s"]:  # the best pair on its own (the best online call's dealing may have
                    t["total_s"], t["deal_s"] = total, deal  # met a full garbage collection: 180 ms once)
        for i, fn, plan, t in live:  # the median too: one lucky virtual call moves the best-of ratio most
            t["online_median_s"] = statistics.median(t.pop("online_calls"))
        if plain:
            results[0][name]["torch_s"] = _best_plain(sides[0].cases[k][2])
        for i, side in enumerate(sides):
            t = results[i][name]
            if t.get("s") is None:
                continue
            log(f"  [{side.label}] {name}: {t['s']:.4f} s (online {t['online_s']:.4f}, dealt ahead + online "
                f"{t['total_s']:.4f}), {t['rounds']} rounds"
                + (f", torch {t['torch_s'] * 1e3:.3f} ms" if "torch_s" in t else ""))
    return results


@contextlib.contextmanager
def network_workers(hook):
    """(parties, crypto provider): three ``veil worker`` processes on loopback, connected; stopped after."""
    from veil.workers.websocket_launcher import free_port

    def tok() -> str:  # a leading '-' would read as an option on the worker's command line
        return "t" + secrets.token_urlsafe(24)

    workers = [sy.NetworkWorker(f"127.0.0.1:{free_port()}", id=f"net{i}") for i in range(2)]
    cp_addr = sy.NetworkWorker(f"127.0.0.1:{free_port()}", id="net_crypto_provider")
    kw = {}
    if "peer_openings" in sy.Cluster.__init__.__code__.co_varnames:  # trees without peer openings: the star
        kw["peer_openings"] = os.environ.get("VEIL_PEER_OPENINGS", "1") != "0"
        log(f"[veil net] peer openings: {'on' if kw['peer_openings'] else 'off'}")
    cluster = sy.Cluster(*workers, crypto_provider=cp_addr, auto_managed=True, owner_token=tok(),
                         client_token=tok(), peer_token=tok(), **kw)
    log("[veil net] starting 3 veil worker processes (2 parties + crypto provider) ...")
    t0 = time.perf_counter()
    cluster.start()
    try:
        log(f"[veil net] started in {time.perf_counter() - t0:.0f} s")
        *parties, cp = cluster.connect(hook, cluster.owner_token)
        dealer = dealer_for(cp, hook.local_worker)
        dealer.max_batch = 1  # fresh dealing every call, as over VirtualWorkers
        yield parties, cp
    finally:
        cluster.stop()


def _keep_best(best: dict | None, new: dict) -> dict:
    """Per workload, the pass with the lowest time (counts are the same in every pass); all times kept."""
    if best is None:
        for v in new.values():
            v["s_passes"] = [v["s"]]
        return new
    for name, v in new.items():
        b = best[name]
        passes = b["s_passes"] + [v["s"]]
        torch_s = [x for x in (b.get("torch_s"), v.get("torch_s")) if x is not None]
        extra = {k: min(x for x in (b.get(k), v.get(k)) if x is not None)
                 for k in ("online_s", "total_s", "online_median_s")
                 if b.get(k) is not None or v.get(k) is not None}
        if v["s"] is not None and (b["s"] is None or v["s"] < b["s"]):
            b.clear()
            b.update(v)
        b.update(extra)
        b["s_passes"] = passes
        if torch_s:
            b["torch_s"] = min(torch_s)
    return best


# ------------------------------------------------------------------ table


def _mb(b) -> str:
    return "-" if b is None else f"{b / 1e6:.2f}"


def _s(t) -> str:
    return "-" if t is None else f"{t:.3f}"


def _ratio(a, b) -> str:
    return "-" if a is None or b is None or not b else f"{a / b:.2f}"


def table(rows: dict) -> str:
    """Times: veil fresh dealing per call / online (dealt ahead) / dealt ahead + online; CrypTen TFP and TTP."""
    head = ("| workload | torch s | veil s | veil online s | veil ahead+online s | veil net online s | CrypTen TFP s "
            "| CrypTen TTP s | online/TFP | online/TTP | ahead+online/TTP | veil net online/veil online "
            "| same, medians "
            "| rounds veil/TFP/TTP | sent/party MB veil/TFP/TTP | sent+recv/party MB veil/TFP/TTP |")
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for name, r in rows.items():
        v, n = r["veil"], r.get("veil_net") or {}
        tfp, ttp = r.get("crypten_TFP") or {}, r.get("crypten_TTP") or {}
        on, tot = v.get("online_s"), v.get("total_s")

        def sr(c):
            return c["sent"] + c["received"] if c else None

        lines.append(
            f"| {name} | {r['torch_s']:.5f} | {_s(v.get('s')) if v.get('s') is not None else 'failed'} | {_s(on)} | "
            f"{_s(tot)} | {_s(n.get('online_s'))} | {_s(tfp.get('s'))} | {_s(ttp.get('s'))} | "
            f"{_ratio(on, tfp.get('s'))} | {_ratio(on, ttp.get('s'))} | {_ratio(tot, ttp.get('s'))} | "
            f"{_ratio(n.get('online_s'), on)} | {_ratio(n.get('online_median_s'), v.get('online_median_s'))} | "
            f"{v.get('rounds') if v.get('rounds') is not None else '-'} / {tfp.get('rounds', '-')} / "
            f"{ttp.get('rounds', '-')} | {_mb(v.get('sent'))} / {_mb(tfp.get('sent'))} / {_mb(ttp.get('sent'))} | "
            f"{_mb(v.get('sent_recv'))} / {_mb(sr(tfp))} / {_mb(sr(ttp))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="best of N timed calls (after one warm-up call)")
    ap.add_argument("--passes", type=int, default=2,
                    help="run CrypTen, veil and veil-net this many times in turn; keep each one's best pass "
                         "(the shared cores' load drifts between runs)")
    ap.add_argument("--skip-models", action="store_true", help="ops only (mul, matmul, relu)")
    ap.add_argument("--skip-network", action="store_true", help="no veil-over-network-workers column")
    ap.add_argument("--skip-crypten", action="store_true")
    ap.add_argument("--crypten-provider", default="both", choices=["TFP", "TTP", "both"],
                    help="CrypTen's tuple provider: TFP (CrypTen's own default), TTP, or both in turn (default)")
    ap.add_argument("--crypten-threads", type=int, default=1,
                    help="torch threads per CrypTen party process (2 processes on 2 cores)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for veil (this process and its network workers), like each CrypTen "
                         "party's; 0: torch's default (one per core)")
    ap.add_argument("--venv", type=Path, default=VENV)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the veil worker processes
    started = time.time()
    load0 = os.getloadavg()
    meta = {"cpus": os.cpu_count(), "loadavg_start": load0, "repeat": args.repeat, "passes": args.passes,
            "torch": torch.__version__, "veil_torch_threads": torch.get_num_threads(),
            "crypten_provider": args.crypten_provider, "crypten_threads": args.crypten_threads}
    log(f"cpus={os.cpu_count()} load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads in this process), repeat={args.repeat}, passes={args.passes}")

    if not args.skip_crypten:
        python, steps = ensure_crypten_venv(args.venv)
        meta["crypten_venv_setup_s"] = steps
    torch.manual_seed(0)
    hook, me, parties, cp = virtual_setup(2)
    providers = ["TFP", "TTP"] if args.crypten_provider == "both" else [args.crypten_provider]
    crypten_res = {prov: None for prov in providers}
    veil_res = net_res = None
    with contextlib.ExitStack() as stack:
        net = None if args.skip_network else stack.enter_context(network_workers(hook))
        sides = [Side("veil", parties, cp, me, cp, args.skip_models)]
        if net is not None:
            sides.append(Side("veil net", *net, me, None, args.skip_models))
        for p in range(1, args.passes + 1):
            tag = f"pass {p}/{args.passes}"
            for prov in providers if not args.skip_crypten else []:
                log(f"{tag}: CrypTen, 2 party processes on loopback (gloo), provider {prov}, "
                    f"{args.crypten_threads} torch thread(s) each ...")
                t0 = time.perf_counter()
                r = run_crypten(python, args.repeat, args.skip_models, prov, args.crypten_threads)
                meta["crypten_version"], meta["crypten_torch"] = r["crypten"], r["torch"]
                crypten_res[prov] = _keep_best(crypten_res[prov], r["results"])
                log(f"{tag}: CrypTen {prov} done in {time.perf_counter() - t0:.0f} s")
            log(f"{tag}: veil over VirtualWorkers (+ plain torch)"
                + (", and over network workers, call by call in turn ..." if net is not None else " ..."))
            res = run_veil(sides, args.repeat, plain=True)
            veil_res = _keep_best(veil_res, res[0])
            if net is not None:
                net_res = _keep_best(net_res, res[1])

    rows = {}
    for name, v in veil_res.items():
        if v["s"] is not None:
            v["sent"] = v["from_party"]
            v["sent_recv"] = v["from_party"] + v["to_party"] + v["cp_sent"]
        row = {"torch_s": v.pop("torch_s"), "veil": v}
        if net_res:
            row["veil_net"] = net_res[name]
        for prov, res in crypten_res.items():
            if res:
                c = dict(res[name])
                c["crypten_stat_bytes"] = c.pop("bytes")
                row[f"crypten_{prov}"] = c
        rows[name] = row
    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.time() - started
    print()
    print(table(rows))
    print()
    log(f"load average at the end {meta['loadavg_end'][0]:.2f}; whole run {meta['wall_s']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    log(f"saved {args.out}")


if __name__ == "__main__":
    main()
