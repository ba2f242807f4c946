"""Distributed comparison functions (DCF), vectorized over a batch.

A DCF key pair for ``(α, β)`` over ``n``-bit inputs lets two parties compute,
without interaction, additive shares in ``(Z/2^64)^K`` of
``f(x) = β · [x < α]`` for any public ``x``; each key alone is pseudo-random
and reveals nothing about ``α`` or ``β``. Construction: Boyle, Chandran,
Gilboa, Gupta, Ishai, Kumar, Tomasi, "Function Secret Sharing for
Mixed-Mode and Fixed-Point Secure Computation", Eurocrypt 2021, Fig. 1, with
the PRG of :mod:`veil.mpc.fss.prg` (λ = 128). Every operation runs on a
chunk of entries at once (one AES call per block kind, tree level and chunk).

A key of ``N`` entries is five int64 tensors (:class:`DCFKey`): the party's
root seeds ``(N, 2)``, the per-level seed corrections ``(n, N, 2)`` and value
corrections ``(n, N, K)``, the control-bit corrections bit-packed by level
``(2, N)`` (left, right) and the leaf correction ``(N, K)``. Only the root
seed differs between the two keys. Size per entry: ``16 + n(16 + 8K) + 16 +
8K`` bytes.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from veil.mpc.fss import prg
from veil.mpc.ring import DTYPE, random_ring

#: the most input bits (control-bit corrections are packed in one int64)
MAX_BITS = 63


class DCFKey(NamedTuple):
    seed: torch.Tensor  # (N, 2)
    scw: torch.Tensor  # (n, N, 2): seed corrections
    vcw: torch.Tensor  # (n, N, K): value corrections
    tcw: torch.Tensor  # (2, N): bit i = level i's left / right control-bit correction
    leaf: torch.Tensor  # (N, K)


def key_shapes(n_entries: int, n_bits: int, k: int) -> list[tuple]:
    """Shapes of a key's tensors (what a receiver checks)."""
    return [(n_entries, 2), (n_bits, n_entries, 2), (n_bits, n_entries, k), (2, n_entries), (n_entries, k)]


def _check(n_bits: int) -> None:
    if not 1 <= n_bits <= MAX_BITS:
        raise ValueError(f"a DCF takes 1..{MAX_BITS} input bits, got {n_bits}")


# Performance notes. Gen expands each seed on the Keep side (alpha's bit) and
# the Lose side directly (the side is an input bit of the PRG), so nothing is
# selected per entry; updates are in place with all-ones/zero int64 masks
# instead of torch.where (several times slower); per-level bits are unpacked
# and packed for all levels at once. Entries are processed in chunks of
# CHUNK, large enough to amortize torch's per-op overhead and small enough
# to stay in cache (16384 measured best on a quiet 2-core box; on a busy one,
# chunks below torch's parallel grain, 32768 elements / 8, do better).
CHUNK = 16384
#: key generation between two hand-overs of the caller's turn (``between``), in entries x tree levels for
#: payloads of up to 7 words (fewer for wider ones): a worker's dealing step, where a chunk of CHUNK entries
#: held every other client ~0.4-1.3 s of one quiet core (1-17 words); now ~50 ms, whatever the width. The
#: hand-overs fall between groups of levels of full chunks: chunks of 2048 entries (or 682 at 17 words) made
#: the keys 1.7-3x slower, torch's per-op overhead on small tensors
YIELD_ENTRY_LEVELS = 2048 * 62


def _bits(v: torch.Tensor, n_bits: int) -> torch.Tensor:
    """(n_bits, N): the bits of ``v``, most significant first."""
    return (v.unsqueeze(0) >> torch.arange(n_bits - 1, -1, -1, dtype=DTYPE).view(-1, 1)) & 1


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """(n, N) 0/1 -> (N,) with bit ``i`` = level ``i`` (sum of distinct powers = or)."""
    return (bits << torch.arange(bits.shape[0], dtype=DTYPE).view(-1, 1)).sum(0)


def _unpack(packed: torch.Tensor, n_bits: int) -> torch.Tensor:
    return (packed.unsqueeze(0) >> torch.arange(n_bits, dtype=DTYPE).view(-1, 1)) & 1


def gen(alpha: torch.Tensor, beta: torch.Tensor, n_bits: int, generator: Optional[torch.Generator] = None,
        between: Optional[Callable[[], None]] = None) -> tuple[DCFKey, DCFKey]:
    """Keys for ``f(x) = beta * [x < alpha]``, entry by entry.

    Args:
        alpha: (N,) int64 thresholds in ``[0, 2^n_bits)``.
        beta: (N, K) int64 payloads.
        n_bits: Input bits ``n`` (1..63).
        generator: Seeds the root seeds reproducibly (tests only); by default
            they come from the OS CSPRNG.
        between: Called on this thread after about ``YIELD_ENTRY_LEVELS`` of work (a worker step's deadline
            check and turn hand-over: between groups of tree levels); None: nothing called. The keys are the same.
    """
    _check(n_bits)
    n_entries, k = beta.shape
    roots = random_ring((2, n_entries, 2), generator)  # both parties' root seeds
    roots[..., 0] &= -2
    scw = torch.empty((n_bits, n_entries, 2), dtype=DTYPE)
    vcw = torch.empty((n_bits, n_entries, k), dtype=DTYPE)
    tcw = torch.zeros((2, n_entries), dtype=DTYPE)
    leaf = torch.empty((n_entries, k), dtype=DTYPE)
    per_step = max(1, YIELD_ENTRY_LEVELS // (CHUNK * (1 + k // 8))) if between is not None else 0
    _over_chunks(n_entries, lambda lo, hi: _gen_chunk(alpha[lo:hi], beta[lo:hi], n_bits, roots[:, lo:hi],
                                                       scw[:, lo:hi], vcw[:, lo:hi], tcw[:, lo:hi], leaf[lo:hi],
                                                       per_step),
                 between)
    # The keys share their correction tensors (read-only for evaluators): no copy of the bulk.
    return DCFKey(roots[0], scw, vcw, tcw, leaf), DCFKey(roots[1], scw, vcw, tcw, leaf)


def _gen_chunk(alpha, beta, n_bits, roots, scw, vcw, tcw, leaf, per_step: int = 0) -> Iterator[None]:
    """Fills one chunk's key tensors; pauses (yields) after every ``per_step`` levels (0: runs through)."""
    n_entries, k = beta.shape
    t = torch.zeros((2, n_entries), dtype=DTYPE)
    t[1] = 1
    v_alpha = torch.zeros((n_entries, k), dtype=DTYPE)
    u = torch.empty((2, 2, n_entries, 2), dtype=DTYPE)  # (Keep | Lose, party, entry, word)
    u[0] = roots  # u[0] holds the current seeds (party, entry, word) until the side bit goes in
    alpha_bits = _bits(alpha, n_bits)
    t_cws = torch.empty((n_bits, 2, n_entries), dtype=DTYPE)  # (level, Keep | Lose, entry)
    for i in range(n_bits):
        a = alpha_bits[i]
        u[0, ..., 0] |= a
        u[1] = u[0]
        u[1, ..., 0] ^= 1
        child, tc, v = prg.expand(u, k)
        torch.bitwise_xor(child[1, 0], child[1, 1], out=scw[i])  # s_cw: the Lose seeds' difference
        # With d = Conv(v_0) - Conv(v_1) per side: (-1)^t1 V_cw = a*beta - d_Lose - V_alpha
        # (beta enters when Lose = L, i.e. a = 1) and V_alpha' = d_Keep - d_Lose + a*beta.
        d = v[:, 0] - v[:, 1]
        a_beta = beta * a.view(-1, 1)
        raw = a_beta - d[1]
        raw -= v_alpha
        torch.mul(raw, (1 - 2 * t[1]).view(-1, 1), out=vcw[i])
        v_alpha = d[0] - d[1]
        v_alpha += a_beta
        # t_cw^Keep = t0^Keep ^ t1^Keep ^ 1 and t_cw^Lose = t0^Lose ^ t1^Lose
        # (turned into left/right and packed after the loop).
        torch.bitwise_xor(tc[:, 0], tc[:, 1], out=t_cws[i])
        t_cws[i, 0] ^= 1
        # s_b <- s_b^Keep ^ t_b s_cw ; t_b <- t_b^Keep ^ t_b t_cw^Keep
        torch.bitwise_xor(child[0], scw[i] & (-t).unsqueeze(-1), out=u[0])
        t = tc[0] ^ (t & t_cws[i, 0])
        if per_step and (i + 1) % per_step == 0 and i + 1 < n_bits:  # (the leaf goes with the last levels)
            yield
    keep, lose = t_cws[:, 0], t_cws[:, 1]
    left = (keep ^ lose) & -alpha_bits  # Lose is the left side where alpha's bit is 1
    left ^= keep
    tcw[0] = _pack(left)
    tcw[1] = _pack(left ^ keep ^ lose)
    leaf_values = prg.convert(u[0], k)
    torch.sub(leaf_values[1], leaf_values[0], out=leaf)
    leaf -= v_alpha
    leaf *= (1 - 2 * t[1]).view(-1, 1)


def evaluate(b: int, key: DCFKey, x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Party ``b``'s (0 or 1) shares of ``beta * [x < alpha]`` for (N,) inputs ``x``: (N, K)."""
    _check(n_bits)
    out = torch.empty(tuple(key.leaf.shape), dtype=DTYPE)
    def run(lo: int, hi: int) -> None:
        part = DCFKey(key.seed[lo:hi], key.scw[:, lo:hi], key.vcw[:, lo:hi], key.tcw[:, lo:hi], key.leaf[lo:hi])
        out[lo:hi] = _eval_chunk(b, part, x[lo:hi], n_bits)

    _over_chunks(x.shape[0], run)
    return out


def _over_chunks(n: int, fn: Callable[[int, int], Optional[Iterator[None]]],
                 between: Optional[Callable[[], None]] = None) -> None:
    """Runs ``fn(lo, hi)`` over chunks of ``CHUNK`` entries, on torch's intra-op thread count.

    Chunks write disjoint slices, and torch's small elementwise ops and
    OpenSSL's AES release the GIL, so threads overlap where one chunk's ops are
    too small for torch to parallelize by itself. ``fn`` may return a generator
    (its chunk's work, paused at each yield): with ``between``, one chunk per
    thread at a time is advanced step by step, ``between()`` on this thread
    before each step of them (a generator runs on one pool thread at a time).
    """
    spans = [(lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK)]
    threads = min(torch.get_num_threads(), len(spans))
    step = len(spans) if between is None else max(1, threads)
    with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool:
        run = map if pool is None else pool.map
        for at in range(0, len(spans), max(1, step)):  # (no spans: no entries)
            if between is None:  # each chunk run through (a generator's steps too)
                list(run(lambda span: _finish(fn(*span)), spans[at:at + step]))
                continue
            running = [g for g in (fn(lo, hi) for lo, hi in spans[at:at + step]) if g is not None]
            while running:
                between()
                more = list(run(_advance, running))
                running = [g for g, go_on in zip(running, more) if go_on]


def _advance(steps: Iterator[None]) -> bool:
    """Runs one step of a chunk's work; False once it is done."""
    return next(steps, _DONE) is not _DONE


def _finish(steps: Optional[Iterator[None]]) -> None:
    if steps is not None:
        for _ in steps:
            pass


_DONE = object()


def _eval_chunk(b: int, key: DCFKey, x: torch.Tensor, n_bits: int) -> torch.Tensor:
    seed, scw, vcw, tcw, leaf = key
    k = leaf.shape[-1]
    s = seed.clone()
    t = torch.full(x.shape, b, dtype=DTYPE)
    acc = torch.zeros(leaf.shape, dtype=DTYPE)
    x_bits = _bits(x, n_bits)
    left = _unpack(tcw[0], n_bits)
    side_tcw = (left ^ _unpack(tcw[1], n_bits)) & -x_bits  # the t correction of the side x walks
    side_tcw ^= left
    for i in range(n_bits):
        s[:, 0] |= x_bits[i]  # u = seed | side: expand only the side x walks
        child, tc, v = prg.expand(s, k)
        t_mask = -t
        child ^= scw[i] & t_mask.view(-1, 1)
        tc ^= side_tcw[i] & t
        acc += v
        acc += vcw[i] & t_mask.view(-1, 1)
        s, t = child, tc
    acc += prg.convert(s, k)
    acc += leaf & (-t).view(-1, 1)
    return acc if b == 0 else acc.neg_()
