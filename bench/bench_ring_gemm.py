"""Ring products in Z/2^64: torch's int64 ops against veil.mpc.ring_gemm's float64 limbs, same run.

Each row times the same product both ways (the median of ``--repeat`` calls, alternating) on one thread,
checks the two results are equal, and prints the ratio; the last rows are a party's Beaver combine
(``c + e @ b' + a @ f``) and SPDZ2k's 128-bit product (MAC mode), both ways.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ring_gemm.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from veil.mpc import ring, ring128, ring_gemm


def _rand(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.int64).random_(-(1 << 63), None)


def _both(fn_int, fn_limbs, repeat: int) -> tuple[float, float, bool]:
    """Median seconds of each, calls alternating; and whether their results agree."""
    ring_gemm._choice = False
    first = fn_int()
    ring_gemm._choice = True
    same = torch.equal(first, fn_limbs()) if isinstance(first, torch.Tensor) else all(
        torch.equal(a, b) for a, b in zip(first, fn_limbs()))
    times: dict[bool, list] = {False: [], True: []}
    for _ in range(repeat):
        for choice, fn in ((False, fn_int), (True, fn_limbs)):
            ring_gemm._choice = choice
            start = time.perf_counter()
            fn()
            times[choice].append(time.perf_counter() - start)
    return statistics.median(times[False]), statistics.median(times[True]), same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for m, k, n in ((64, 64, 64), (128, 128, 128), (256, 256, 256), (128, 784, 100), (512, 512, 512)):
        x, y = _rand(m, k), _rand(k, n)
        rows.append((f"matmul {m}x{k}x{n}", *_both(lambda: torch.mm(x, y), lambda: ring_gemm.mm(x, y), args.repeat)))
    for xs, ws in (((64, 1, 28, 28), (16, 1, 3, 3)), ((64, 16, 13, 13), (32, 16, 3, 3)), ((64, 32, 5, 5), (64, 32, 3, 3))):
        x, w = _rand(*xs), _rand(*ws)
        rows.append((f"conv2d {xs} * {ws}", *_both(lambda: F.conv2d(x, w), lambda: ring.conv2d(x, w), args.repeat)))
    e, a, b, f, c = (_rand(256, 256) for _ in range(5))
    rows.append(("Beaver combine 256^3 (two products)",
                 *_both(lambda: torch.addmm(c, e, b).addmm_(a, f),
                        lambda: ring_gemm.products(c, [(e, b), (a, f)]), args.repeat)))
    p, q = (_rand(128, 128), _rand(128, 128)), (_rand(128, 128), _rand(128, 128))
    rows.append(("SPDZ2k 128-bit matmul 128^3",
                 *_both(lambda: ring128.bilinear(torch.mm, p, q),
                        lambda: ring128.bilinear(ring.BILINEAR_OPS["mm"], p, q), args.repeat)))
    print(f"| product | torch int64 ms | limbs ms | int64/limbs | equal |  (median of {args.repeat}, one thread)")
    print("|---|---|---|---|---|")
    for name, t_int, t_limbs, same in rows:
        print(f"| {name} | {1e3 * t_int:.2f} | {1e3 * t_limbs:.2f} | {t_int / t_limbs:.1f}x | {same} |")
    ring_gemm._choice = None
    print(f"this host's one-time choice: {'limbs' if ring_gemm.limbs_pay() else 'int64'}")


if __name__ == "__main__":
    main()
