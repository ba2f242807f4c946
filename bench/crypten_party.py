"""One CrypTen 0.4.1 party of bench/bench_crypten.py (runs in the CrypTen venv, not veil's).

Started twice by bench_crypten.py (RANK 0 and 1, WORLD_SIZE=2, gloo over
loopback, RENDEZVOUS=file://...; CrypTen's DistributedCommunicator reads
DISTRIBUTED_BACKEND, RENDEZVOUS, WORLD_SIZE and RANK from the environment).
With ``--provider TTP`` a third process (RANK 2) runs CrypTen's trusted third
party server (``TTPServer``) and the parties fetch their triples from it.

For each workload: inputs are encrypted first (except the CNN cases, whose
timed call encrypts its input, as veil's bench_mpc does), one warm-up call
runs with CrypTen's communication logging on (``cfg.communicator.verbose``;
off, ``get_communication_stats()`` stays at 0) to read its rounds and bytes
(per party; every collective call is one round; its bytes add both
directions for all_reduce but one for broadcast, scatter, send..., so this
script also counts sent and received bytes apart by wrapping the
communicator), then ``--repeat`` calls with logging off, each after a
barrier, timed by ``time.perf_counter`` around the call. Each rank prints one
line ``CRYPTEN_RESULT {json}``; the parent takes rank 0's times and averages
the two ranks' bytes (they differ only with TTP, where party 0 alone talks to
the dealer).

Run by hand (two shells, CrypTen venv):
``RANK=0 WORLD_SIZE=2 RENDEZVOUS=file:///tmp/x DISTRIBUTED_BACKEND=gloo python bench/crypten_party.py``
and the same with ``RANK=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time

# CrypTen 0.4.1 imports torch.onnx._internal.registration, which torch 2.13 moved.
import torch.onnx._internal.torchscript_exporter.registration as _registration  # noqa: E402

sys.modules.setdefault("torch.onnx._internal.registration", _registration)

import torch  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import crypten  # noqa: E402
import crypten.communicator as comm  # noqa: E402
import crypten.nn as cnn  # noqa: E402


def _torch_cnn() -> nn.Module:  # the same CNN as bench_mpc._mnist_cnn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.AvgPool2d(2), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.AvgPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10),
    ).eval()


def _to_crypten(model: nn.Sequential) -> cnn.Module:
    """The same layers as crypten.nn modules, with the torch model's weights.

    (``crypten.nn.from_pytorch`` goes through ``torch.onnx.export``, which on
    torch 2.13 needs onnxscript and the dynamo exporter; building the layers
    directly gives the same CrypTen model without ONNX.)
    """
    layers = []
    for m in model:
        if isinstance(m, nn.Conv2d):
            c = cnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size[0])
        elif isinstance(m, nn.Linear):
            c = cnn.Linear(m.in_features, m.out_features)
        elif isinstance(m, nn.AvgPool2d):
            c = cnn.AvgPool2d(m.kernel_size)
        elif isinstance(m, nn.ReLU):
            c = cnn.ReLU()
        elif isinstance(m, nn.Flatten):
            c = cnn.Flatten()
        else:
            raise TypeError(type(m))
        if hasattr(m, "weight"):
            c.set_parameter("weight", m.weight.detach().clone())
            c.set_parameter("bias", m.bias.detach().clone())
        layers.append(c)
    return cnn.Sequential(*layers)


_SENT_RECV = [0, 0]


def _nbytes(x) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x if t is not None)
    return x.nelement() * x.element_size() if torch.is_tensor(x) else len(pickle.dumps(x))


def _count_sent_received(c) -> None:
    """Wraps the communicator's methods to count bytes sent and received by this party, apart.

    CrypTen's own statistic adds both directions for all_reduce/all_gather
    (2 x the tensor) but counts one side for broadcast, scatter, gather, reduce,
    send and recv; this counter splits them (logical payload, 2 parties: a
    party's all_reduce sends its tensor once and receives the other's).
    """
    ws, me = c.get_world_size(), c.get_rank()

    def wrap(name, rule):
        orig = getattr(c, name)

        def counted(*args, **kwargs):
            res = orig(*args, **kwargs)
            sent, received = rule(args, kwargs, res)
            _SENT_RECV[0] += sent
            _SENT_RECV[1] += received
            return res

        setattr(c, name, counted)

    def root(args, kwargs, key, pos):
        return kwargs[key] if key in kwargs else args[pos]

    wrap("all_reduce", lambda a, k, r: (_nbytes(a[0]) * (ws - 1), _nbytes(a[0]) * (ws - 1)))
    wrap("all_gather", lambda a, k, r: (_nbytes(a[0]) * (ws - 1), _nbytes(a[0]) * (ws - 1)))
    for name, key in (("reduce", "dst"), ("gather", "dst")):
        wrap(name, lambda a, k, r, key=key: (0, _nbytes(a[0]) * (ws - 1)) if root(a, k, key, 1) == me
             else (_nbytes(a[0]), 0))
    wrap("broadcast", lambda a, k, r: (_nbytes(a[0]) * (ws - 1), 0) if root(a, k, "src", 1) == me
         else (0, _nbytes(a[0])))
    wrap("scatter", lambda a, k, r: (_nbytes(a[0]) - _nbytes(r), 0) if root(a, k, "src", 1) == me
         else (0, _nbytes(r)))
    for name in ("send", "isend", "send_obj"):
        wrap(name, lambda a, k, r: (_nbytes(a[0]), 0))
    for name in ("recv", "irecv"):
        wrap(name, lambda a, k, r: (0, _nbytes(a[0])))
    wrap("recv_obj", lambda a, k, r: (0, _nbytes(r)))
    wrap("broadcast_obj", lambda a, k, r: (_nbytes(a[0]) * (ws - 1), 0) if root(a, k, "src", 1) == me
         else (0, _nbytes(r)))


def _stats(fn) -> dict:
    """One call with CrypTen's communication logging on: its rounds and bytes, and ours split by direction."""
    crypten.cfg.communicator.verbose = True
    comm.get().reset_communication_stats()
    _SENT_RECV[:] = [0, 0]
    out = fn()
    s = comm.get().get_communication_stats()
    crypten.cfg.communicator.verbose = False
    return out, {"rounds": int(s["rounds"]), "bytes": int(s["bytes"]), "sent": _SENT_RECV[0],
                 "received": _SENT_RECV[1]}


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        comm.get().barrier()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-ops", action="store_true")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per party process")
    ap.add_argument("--provider", default="TFP", choices=["TFP", "TTP"])
    ap.add_argument("--only", default="", help="comma-separated workload names (debugging)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    crypten.cfg.mpc.provider = args.provider
    crypten.init()
    rank = comm.get().get_rank()
    _count_sent_received(comm.get())
    if rank >= comm.get().get_world_size():  # the TTP server process (TTP provider only)
        crypten.mpc.provider.TTPServer()  # serves until rank 0 shuts the communicator down
        return
    torch.manual_seed(0)  # same plaintexts on both ranks; only rank 0's (src=0) are encrypted

    a, b = torch.randn(1_000_000), torch.randn(1_000_000)
    m1, m2 = torch.randn(256, 256), torch.randn(256, 256)
    r = torch.randn(100_000)
    cases = []  # (name, fn, plain result or None)
    if not args.skip_ops:
        ea, eb, em1, em2, er = (crypten.cryptensor(t, src=0) for t in (a, b, m1, m2, r))
        cases += [
            ("mul 1e6", lambda: ea * eb, a * b),
            ("matmul 256^3", lambda: em1.matmul(em2), m1 @ m2),
            ("relu 1e5", lambda: er.relu(), F.relu(r)),
        ]
    if not args.skip_models:
        tcnn = _torch_cnn()
        ccnn = _to_crypten(tcnn).encrypt(src=0)
        ccnn.eval()
        x1, x64 = torch.rand(1, 1, 28, 28), torch.rand(64, 1, 28, 28)

        def infer(x):
            with crypten.no_grad():
                return ccnn(crypten.cryptensor(x, src=0))

        mlp_t = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        mlp = _to_crypten(mlp_t).encrypt(src=0)
        mlp.train()
        loss_fn = cnn.MSELoss()
        xb = crypten.cryptensor(torch.rand(128, 784), src=0)
        yb = crypten.cryptensor(F.one_hot(torch.randint(0, 10, (128,)), 10).float(), src=0)

        def sgd_step():
            mlp.zero_grad()
            loss = loss_fn(mlp(xb), yb)
            loss.backward()
            # grad_threshold=None: a plain SGD update like veil's optimizer. CrypTen's default
            # (100) zeroes gradients whose square exceeds 100^2: one more comparison per parameter.
            mlp.update_parameters(0.1, grad_threshold=None)
            return loss

        cnn_train = _to_crypten(_torch_cnn()).encrypt(src=0)  # bench_mpc's "CNN SGD step batch 64"
        cnn_train.train()
        xc64 = crypten.cryptensor(torch.rand(64, 1, 28, 28), src=0)
        yc64 = crypten.cryptensor(F.one_hot(torch.randint(0, 10, (64,)), 10).float(), src=0)

        def cnn_step():
            cnn_train.zero_grad()
            loss = loss_fn(cnn_train(xc64), yc64)
            loss.backward()
            cnn_train.update_parameters(0.1, grad_threshold=None)  # (as sgd_step)
            return loss

        with torch.no_grad():
            ref1, ref64 = tcnn(x1), tcnn(x64)
        cases += [
            ("CNN inference batch 1", lambda: infer(x1), ref1),
            ("CNN inference batch 64", lambda: infer(x64), ref64),
            ("MLP SGD step batch 128", sgd_step, None),
            ("CNN SGD step batch 64", cnn_step, None),
        ]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    results = {}
    for name, fn, ref in cases:
        if only and name not in only:
            continue
        out, st = _stats(fn)  # warm-up call, with communication logging
        plain = out.get_plain_text()  # collective: both ranks
        err = float((plain - ref).abs().max()) if ref is not None else None
        off = int(((plain - ref).abs() > 0.01).sum()) if ref is not None else None
        t = _best(fn, args.repeat)
        results[name] = {"s": t, **st, "max_err": err, "n_off_by_0.01": off}
        if rank == 0:
            print(f"[crypten] {name}: {t:.4f} s, {st['rounds']} rounds, {st['bytes']:,} B", file=sys.stderr,
                  flush=True)
    comm.get().barrier()
    print("CRYPTEN_RESULT " + json.dumps({
        "rank": rank, "provider": args.provider, "crypten": crypten.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "results": results,
    }), flush=True)
    crypten.uninit()


if __name__ == "__main__":
    os.environ.setdefault("DISTRIBUTED_BACKEND", "gloo")
    main()
