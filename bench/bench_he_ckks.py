"""CKKS: veil.he vs raw TenSEAL on a 4,096-value vector, then encrypted FedAvg.

Usage: python bench/bench_he_ckks.py [--reps 20] [--clients 10] [--params 100000]
Prints per-op milliseconds, veil/tenseal ratios, and for FedAvg the per-client
encryption time, aggregation time and bytes per client vs plaintext bytes.
"""

from __future__ import annotations

import argparse
import time

import msgpack
import tenseal as ts
import torch
from tqdm import tqdm

from veil.he import aggregation as agg
from veil.he import ckks


def per_call_ms(fn, reps):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def ops(reps: int) -> None:
    ctx = ckks.context(galois_keys=False)
    raw = ctx.raw
    x = torch.randn(4096, dtype=torch.float64)
    xl = x.tolist()
    ea, eb = ckks.encrypt(x, ctx), ckks.encrypt(x, ctx)
    ra, rb = ts.ckks_vector(raw, xl), ts.ckks_vector(raw, xl)
    rows = [
        ("encrypt", per_call_ms(lambda: ckks.encrypt(x, ctx), reps), per_call_ms(lambda: ts.ckks_vector(raw, x.tolist()), reps)),
        ("add", per_call_ms(lambda: ea + eb, reps), per_call_ms(lambda: ra + rb, reps)),
        ("mul ct*ct", per_call_ms(lambda: ea * eb, reps), per_call_ms(lambda: ra * rb, reps)),
        ("mul ct*plain", per_call_ms(lambda: ea * x, reps), per_call_ms(lambda: ra * x.tolist(), reps)),
        ("decrypt", per_call_ms(lambda: ea.decrypt(), reps), per_call_ms(lambda: torch.tensor(ra.decrypt()), reps)),
    ]
    print(f"CKKS N=8192, [60,40,40,60], scale 2^40, 4096 values, {reps} reps")
    print(f"{'op':<14}{'veil ms':>10}{'tenseal ms':>12}{'veil/ts':>9}")
    for name, tv, tt in rows:
        print(f"{name:<14}{tv:>10.3f}{tt:>12.3f}{tv / tt:>9.3f}")


def fedavg(clients: int, params: int) -> None:
    key_ctx = ckks.context(galois_keys=False)  # the key holder
    pub = key_ctx.public()  # what clients and the aggregator get
    g = torch.Generator().manual_seed(0)
    updates = [{"w": torch.randn(params, generator=g)} for _ in range(clients)]
    weights = [float(100 + 10 * i) for i in range(clients)]
    enc, t_enc, sizes = [], [], []
    for u in tqdm(updates, desc="client encrypt", leave=False):
        t = time.perf_counter()
        e = agg.encrypt_update(u, protocol="ckks", context=pub)
        t_enc.append(time.perf_counter() - t)
        sizes.append(len(msgpack.packb(agg.update_to_wire(e), use_bin_type=True)))
        enc.append(e)
    t = time.perf_counter()
    total = agg.aggregate_encrypted(enc, weights=weights)
    t_agg = time.perf_counter() - t
    t = time.perf_counter()
    out = agg.decrypt_update(total, key_ctx)
    t_dec = time.perf_counter() - t
    expected = sum(w * u["w"] for w, u in zip(weights, updates)) / sum(weights)
    err = float((out["w"] - expected).abs().max())
    plain_bytes = params * 4
    print(f"\nEncrypted FedAvg (weighted), {clients} clients x {params:,} float32 params")
    print(f"  per-client encryption: {sum(t_enc) / clients:.3f} s (mean)")
    print(f"  aggregation ({clients} weighted sums, no secret key): {t_agg:.3f} s")
    print(f"  key holder decryption: {t_dec:.3f} s; max error vs plaintext FedAvg {err:.2e}")
    print(f"  bytes per client: {sizes[0]:,} encrypted vs {plain_bytes:,} plaintext ({sizes[0] / plain_bytes:.1f}x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--params", type=int, default=100_000)
    args = ap.parse_args()
    ops(args.reps)
    fedavg(args.clients, args.params)


if __name__ == "__main__":
    main()
