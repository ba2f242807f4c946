"""SMPC benchmark: shared ops over VirtualWorkers vs plain PyTorch, same run.

Run: .venv/bin/python bench/bench_mpc.py [--parties 2] [--repeat 3] [--unseeded] [--skip-ops] [--skip-models]
     [--mac]   (instead: active security (SPDZ2k MACs) vs plain sharing, same run; see mac_vs_plain)
     [--background [--calls 4] [--network]]   (instead: dealing overlapped with the online phase; see
                                               background_vs_ahead)

Ops: elementwise mul of 1e6 fixed-point values, 256x256 @ 256x256 matmul,
ReLU on 1e5 values. Models (second table): private inference of the MNIST
CNN of tests/mpc/test_private_cnn_accuracy.py at batch 1 and 64, and one
encrypted SGD step (forward, MSE backward, update) of a 784-128-128-10 MLP
at batch 128 and of the CNN at batch 64. For each: best-of wall time (dealing by the crypto
provider included, a fresh item per call: the dealer runs in-process), the
online time (the material dealt ahead by ``WorkerDealer.deal_ahead``:
openings and local work only), dealing ahead + online, plain torch time, opening
rounds, and bytes per party: what the orchestrator sent to / received from
each party (commands + openings relayed through it) and what the crypto
provider sent to each party. Ring elements are 8 bytes.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
from veil.mpc.communicator import communicate
from veil.mpc.providers.worker_dealer import dealer_for


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.AvgPool2d(2), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.AvgPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10),
    ).eval()


def settled(out):
    """``out`` with the truncation a lazy shared product still owes paid (``pending_divisor``, see
    veil.tensors.rules.fixed_precision.LAZY_TRUNCATION): a timed call does all of its own work."""
    getattr(out, "child", None)  # reading the child pays it
    sy.local_worker.wait_posted()  # and the rounds posted to network parties are answered (their work done)
    return out


def model_cases(parties, cp) -> list:
    """[(name, veil callable, plain-torch callable)] of the whole-model workloads (bench_crypten reuses them)."""

    def sh(t, **kw):
        return t.fix_precision().share(*parties, crypto_provider=cp, **kw)

    plain_cnn = _mnist_cnn()
    cnn = copy.deepcopy(plain_cnn).fix_precision().share(*parties, crypto_provider=cp)
    plain_mlp = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    mlp = copy.deepcopy(plain_mlp)
    mlp.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1).fix_precision()
    plain_opt = torch.optim.SGD(plain_mlp.parameters(), lr=0.1)
    x, y = torch.rand(128, 784), F.one_hot(torch.randint(0, 10, (128,)), 10).float()
    xb, yb = sh(x), sh(y)
    x1, x64 = torch.rand(1, 1, 28, 28), torch.rand(64, 1, 28, 28)
    plain_cnn_t = _mnist_cnn().train()  # the same CNN, trained: conv and average-pool backward passes
    cnn_t = copy.deepcopy(plain_cnn_t)
    cnn_t.fix_precision().share(*parties, crypto_provider=cp, requires_grad=True)
    opt_c = torch.optim.SGD(cnn_t.parameters(), lr=0.1).fix_precision()
    plain_opt_c = torch.optim.SGD(plain_cnn_t.parameters(), lr=0.1)
    y64 = F.one_hot(torch.randint(0, 10, (64,)), 10).float()
    x64s, y64s = sh(x64), sh(y64)

    def sgd_step(model, optimizer, xs, ys):
        optimizer.zero_grad()
        loss = F.mse_loss(model(xs), ys)
        loss.backward()
        optimizer.step()
        return settled(loss)  # a training loop reads its loss (veil would not pay its mean's division otherwise)

    def infer(model, x):
        with torch.no_grad():
            return settled(model(x))

    return [
        ("CNN inference batch 1", lambda: infer(cnn, sh(x1)), lambda: infer(plain_cnn, x1)),
        ("CNN inference batch 64", lambda: infer(cnn, sh(x64)), lambda: infer(plain_cnn, x64)),
        ("MLP SGD step batch 128", lambda: sgd_step(mlp, opt, xb, yb), lambda: sgd_step(plain_mlp, plain_opt, x, y)),
        ("CNN SGD step batch 64", lambda: sgd_step(cnn_t, opt_c, x64s, y64s),
         lambda: sgd_step(plain_cnn_t, plain_opt_c, x64, y64)),
    ]


def op_cases(parties, cp) -> list:
    """[(name, shared args, fn, plain args)] of the single-op workloads (bench_crypten reuses them)."""
    a, b = torch.randn(1_000_000), torch.randn(1_000_000)
    m1, m2 = torch.randn(256, 256), torch.randn(256, 256)
    r = torch.randn(100_000)

    def sh(t):
        return t.fix_precision().share(*parties, crypto_provider=cp)

    return [
        ("mul 1e6", (sh(a), sh(b)), lambda x, y: settled(x * y), (a, b)),
        ("matmul 256^3", (sh(m1), sh(m2)), lambda x, y: settled(x @ y), (m1, m2)),
        ("relu 1e5", (sh(r),), lambda x: settled(F.relu(x)), (r,)),
    ]


def traffic(fn, me, cp, n: int):
    """Calls ``fn`` once; returns (its result, opening rounds, bytes and messages per party).

    Bytes per party: orchestrator -> party, party -> orchestrator (what ``me``
    sent and received, over ``n`` parties) and crypto provider -> party
    (``cp``'s sends; None for a provider whose counters are not in this process).
    """
    s0 = (me.stats.snapshot(), cp.stats.snapshot() if cp is not None else None)
    with communicate() as comm:  # veil.mpc.communicator: rounds and opened bytes per party
        out = fn()
    s1 = (me.stats.snapshot(), cp.stats.snapshot() if cp is not None else None)
    return out, {
        "rounds": comm.rounds,
        "opened": comm.as_dict()["opened_bytes_per_party"] or 0,
        "to_party": (s1[0]["bytes_sent"] - s0[0]["bytes_sent"]) / n,
        "from_party": (s1[0]["bytes_received"] - s0[0]["bytes_received"]) / n,
        "cp_sent": (s1[1]["bytes_sent"] - s0[1]["bytes_sent"]) / n if cp is not None else None,
        "msgs": (s1[0]["messages"] - s0[0]["messages"]) / n,
    }


def virtual_setup(n_parties: int = 2, seeded: bool = True, hook=None):
    """(hook, me, parties, cp): VirtualWorker parties and crypto provider, fresh dealing per call."""
    hook = hook or sy.TorchHook(torch)
    me = hook.local_worker
    parties = [sy.VirtualWorker(hook, id=f"p{i}") for i in range(n_parties)]
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    dealer = dealer_for(cp, me)
    dealer.seeded = seeded
    dealer.max_batch = 1  # time a fresh triple every call (dealing is part of the cost)
    return hook, me, parties, cp


def online_time(fn, cp, me, repeat: int) -> float:
    """Best time of ``fn`` when its dealt material is already at the parties (see :func:`offline_online`)."""
    return offline_online(fn, cp, me, repeat)[0]


def offline_online(fn, cp, me, repeat: int) -> tuple[float, float, float]:
    """``(online s, total s, dealing s)``, best of ``repeat``: the offline/online split.

    One recorded call gives the plan (what ``fn`` takes from the crypto
    provider); then, per repetition, the provider deals that plan ahead
    (``WorkerDealer.deal_ahead``: one request per key) and ``fn`` runs with
    ``on_exhausted="raise"``, so the online time provably includes no dealing
    (openings and local work only). Total = dealing ahead + online.
    """
    plan = dealing_plan(fn, cp, me)
    return min(online_once(fn, cp, me, plan) for _ in range(repeat))


def dealing_plan(fn, cp, me):
    """What one call of ``fn`` takes from the crypto provider (``fn`` is called once, recorded)."""
    with dealer_for(cp, me).record() as plan:
        fn()
    return plan


def online_once(fn, cp, me, plan) -> tuple[float, float, float]:
    """``(online s, total s, dealing s)`` of one call: ``plan`` dealt ahead, then ``fn`` dealing nothing."""
    dealer = dealer_for(cp, me)
    saved = dealer.on_exhausted
    try:
        t0 = time.perf_counter()
        dealer.deal_ahead(plan)
        t1 = time.perf_counter()
        dealer.on_exhausted = "raise"
        fn()
        t2 = time.perf_counter()
    finally:
        dealer.on_exhausted = saved
    return t2 - t1, t2 - t0, t1 - t0


def background_dealing(fn, cp, me, calls: int) -> tuple[float, float, float]:
    """``(online, ahead, background)`` seconds per call over ``calls`` calls in a row, same material each way.

    online: the material of all calls dealt first (not timed), then the calls;
    ahead: per call, ``deal_ahead(plan)`` then the call (dealing and the
    online phase one after the other); background: ``deal_ahead(plan, calls,
    background=True)`` and the calls at once (the dealing thread runs while the
    calls open values), until the thread is done. Calls run with
    ``on_exhausted="raise"``: no call deals on demand.
    """
    dealer = dealer_for(cp, me)
    with dealer.record() as plan:
        fn()
    saved = dealer.on_exhausted
    dealer.on_exhausted = "raise"
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            dealer.deal_ahead(plan)
            fn()
        ahead = time.perf_counter() - t0
        dealer.deal_ahead(plan, calls)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        online = time.perf_counter() - t0
        t0 = time.perf_counter()
        job = dealer.deal_ahead(plan, calls, background=True)
        for _ in range(calls):
            fn()
        job.wait()
        background = time.perf_counter() - t0
    finally:
        dealer.on_exhausted = saved
        dealer.drop_ahead()
    return online / calls, ahead / calls, background / calls


def background_vs_ahead(cases, cp, me, calls: int, label: str) -> None:
    """One table row per workload: online alone, dealt ahead + online in turn, dealing in the background."""
    print(f"\n{label}: {calls} calls in a row, seconds per call")
    print("| workload | online s | ahead then online s | background + online s | background/ahead "
          "| background/online |")
    print("|---|---|---|---|---|---|")
    for name, fn in cases:
        background_dealing(fn, cp, me, 1)  # warm-up
        on, ahead, bg = background_dealing(fn, cp, me, calls)
        print(f"| {name} | {on:.3f} | {ahead:.3f} | {bg:.3f} | {bg / ahead:.2f} | {bg / on:.2f} |", flush=True)


def _background(args) -> None:
    import contextlib
    import os

    hook, me, parties, cp = virtual_setup(args.parties, seeded=not args.unseeded)

    def cases(parties, cp):
        out = [] if args.skip_ops else [(n, (lambda fn=fn, sh=sh: fn(*sh))) for n, sh, fn, _ in op_cases(parties, cp)]
        return out + ([] if args.skip_models else [(n, fn) for n, fn, _ in model_cases(parties, cp)])

    print(f"load average {os.getloadavg()} at the start; torch threads {torch.get_num_threads()}")
    background_vs_ahead(cases(parties, cp), cp, me, args.calls, "veil over VirtualWorkers")
    if args.network:
        from bench_crypten import network_workers

        with contextlib.ExitStack() as stack:
            net_parties, net_cp = stack.enter_context(network_workers(hook))
            background_vs_ahead(cases(net_parties, net_cp), net_cp, me, args.calls,
                                "veil over network workers (3 veil worker processes)")
    print(f"load average {os.getloadavg()} at the end")


def _models(parties, cp, me, repeat: int) -> None:
    """Latency, rounds and bytes per party of whole-model workloads."""
    n = len(parties)
    print()
    print("| workload | veil s | online s | dealt ahead + online s | rounds | opened B/party | orch->party B "
          "| party->orch B | cp->party B | msgs/party |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, fn, _plain in model_cases(parties, cp):
        _, t = traffic(fn, me, cp, n)
        best = _time(fn, repeat)
        online, total, _ = offline_online(fn, cp, me, repeat)
        print(f"| {name} | {best:.3f} | {online:.3f} | {total:.3f} | {t['rounds']} | {t['opened']:,.0f} | "
              f"{t['to_party']:,.0f} | {t['from_party']:,.0f} | {t['cp_sent']:,.0f} | {t['msgs']:.1f} |")


def mac_vs_plain(parties, cp, me, repeat: int) -> None:
    """Active security's cost: each op with ``active_security=True`` vs without, same run.

    Timed: the op and ``.get()`` (which runs the batched MAC check), dealing included.
    """
    a, b = torch.randn(100_000), torch.randn(100_000)
    m1, m2 = torch.randn(128, 128), torch.randn(128, 128)
    lin = nn.Linear(256, 64)
    xs = torch.randn(32, 256)
    cases = [
        ("mul 1e5 (fixed point)", (a, b), lambda x, y: x * y),
        ("matmul 128^3 (fixed point)", (m1, m2), lambda x, y: x @ y),
        ("linear 256->64, batch 32, shared weights", (xs, lin.weight.detach().t(), lin.bias.detach()),
         lambda x, w, c: x @ w + c),
        ("sum 1e5 + public scale", (a,), lambda x: (x * 3).sum()),
        ("ReLU 1e4 (fixed point)", (a[:10_000],), torch.relu),
        ("x > 0, 1e4 (fixed point)", (a[:10_000],), lambda x: x > 0),
    ]
    print("| op (2 parties unless stated) | plain s | MAC s | MAC/plain | rounds plain | rounds MAC "
          "| opened B/party plain | opened B/party MAC | max err MAC |")
    print("|---|---|---|---|---|---|---|---|---|")
    n = len(parties)
    for name, plain_args, fn in cases:
        row = {}
        for mode in (False, True):
            shared = [t.fix_precision().share(*parties, crypto_provider=cp, active_security=mode) for t in plain_args]
            out, t = traffic(lambda: fn(*shared).get(), me, cp, n)
            row[mode] = (_time(lambda: fn(*shared).get(), repeat), t, out)
        err = float((row[True][2].float_precision() - fn(*plain_args).float()).abs().max())
        (tp, sp, _), (tm, sm, _) = row[False], row[True]
        print(f"| {name} | {tp:.3f} | {tm:.3f} | {tm / tp:.1f}x | {sp['rounds']} | {sm['rounds']} | "
              f"{sp['opened']:,.0f} | {sm['opened']:,.0f} | {err:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parties", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--unseeded", action="store_true", help="send every share instead of seeds")
    ap.add_argument("--skip-ops", action="store_true")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--mac", action="store_true", help="only: active security (SPDZ2k) vs plain, same run")
    ap.add_argument("--background", action="store_true",
                    help="only: dealing in the background vs dealing ahead, per call (see background_vs_ahead)")
    ap.add_argument("--calls", type=int, default=4, help="--background: calls in a row")
    ap.add_argument("--network", action="store_true", help="--background: also over network workers")
    ap.add_argument("--threads", type=int, default=1, help="--background: torch threads (0: torch's default)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.background:
        if args.threads:
            import os

            torch.set_num_threads(args.threads)
            os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the veil worker processes
        return _background(args)
    hook, me, parties, cp = virtual_setup(args.parties, seeded=not args.unseeded)
    if args.mac:
        return mac_vs_plain(parties, cp, me, args.repeat)
    cases = op_cases(parties, cp)
    print(f"parties={args.parties} seeded={not args.unseeded} torch={torch.__version__}")
    if args.skip_ops:
        cases = []
    print("| op | veil s | online s | dealt ahead + online s | torch s | ratio | rounds | opened B/party "
          "| orch->party B | party->orch B | cp->party B | msgs/party | max err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, shared, fn, plain in cases:
        t_plain = _time(lambda: fn(*plain), max(args.repeat, 5))
        out, t = traffic(lambda: fn(*shared), me, cp, args.parties)
        t_veil = _time(lambda: fn(*shared), args.repeat)
        t_online, t_total, _ = offline_online(lambda: fn(*shared), cp, me, args.repeat)
        err = float((out.get().float_precision() - fn(*plain)).abs().max())
        print(f"| {name} | {t_veil:.3f} | {t_online:.3f} | {t_total:.3f} | {t_plain:.5f} | {t_veil / t_plain:.0f}x | {t['rounds']} | "
              f"{t['opened']:,.0f} | {t['to_party']:,.0f} | {t['from_party']:,.0f} | {t['cp_sent']:,.0f} | {t['msgs']:.1f} | {err:.1e} |")
    if not args.skip_models:
        _models(parties, cp, me, args.repeat)


if __name__ == "__main__":
    main()
