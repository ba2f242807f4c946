"""Paillier: veil.he vs python-paillier (phe) called directly, same key, same run.

Usage: python bench/bench_he_paillier.py [--n 1000] [--bits 2048]
Prints seconds for each and the ratio veil/phe (< 1 means veil is faster).
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from veil.he import paillier
from veil.he._parallel import num_threads


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--bits", type=int, default=2048)
    args = ap.parse_args()
    pub, priv = paillier.keygen(n_length=args.bits)
    x = torch.randn(args.n, dtype=torch.float64)
    vals = x.tolist()
    print(f"Paillier {args.bits}-bit, {args.n} float64 values, {num_threads()} threads")

    rows = []
    t_phe, phe_a = timed(lambda: [pub.encrypt(v) for v in tqdm(vals, desc="phe encrypt", leave=False)])
    t_veil, enc_a = timed(lambda: paillier.encrypt(x, pub))
    rows.append(("encrypt", t_veil, t_phe))
    phe_b = [pub.encrypt(v) for v in tqdm(vals[:], desc="phe encrypt (operand b)", leave=False)]
    enc_b = paillier.encrypt(x, pub)

    t_phe, phe_sum = timed(lambda: [a + b for a, b in zip(phe_a, phe_b)])
    t_veil, enc_sum = timed(lambda: enc_a + enc_b)
    rows.append(("add (ct+ct)", t_veil, t_phe))

    t_phe, _ = timed(lambda: [a * 3 for a in phe_a])
    t_veil, _ = timed(lambda: enc_a * 3)
    rows.append(("mul by int 3", t_veil, t_phe))

    t_phe, phe_dec = timed(lambda: [priv.decrypt(c) for c in tqdm(phe_sum, desc="phe decrypt", leave=False)])
    t_veil, dec = timed(lambda: enc_sum.decrypt(priv))
    rows.append(("decrypt", t_veil, t_phe))

    err = max(abs(a - b) for a, b in zip(dec.tolist(), phe_dec))
    print(f"{'op':<14}{'veil s':>10}{'phe s':>10}{'veil/phe':>10}")
    for name, tv, tp in rows:
        print(f"{name:<14}{tv:>10.4f}{tp:>10.4f}{tv / tp:>10.3f}")
    print(f"max |veil - phe| after add+decrypt: {err:.3g}")


if __name__ == "__main__":
    main()
