"""Authenticated (SPDZ2k) products past the provider's per-item bound, split as :mod:`veil.mpc.product_split`
splits plain ones: each piece an authenticated triple within the bound, every piece's ``e`` and ``f`` opened
in the one round of the unsplit product (``mac_beaver_masks``) and recorded for the batched MAC check, the
pieces' results and MACs summed (contracted dimension) or concatenated (blocks) mod 2^128 at each party.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from veil.mpc import ring128 as r128
from veil.mpc.mac import _meta, _open128, _pieces, _shapes_only
from veil.mpc.party import party_function, run_party
from veil.mpc.product_split import SplitPlan, check_join, sliced_operands
from veil.mpc.ring import DTYPE, bilinear

#: limbs of an authenticated share: value (lo, hi), MAC (lo, hi)
LIMBS = 4


@party_function("mac_beaver_masks", openable=True)
def _masks(xs: list, as_: list, ys: list, bs: list) -> tuple:
    """Several products' ``e = x~ - a`` (all of them first), then their ``f = y~ - b``, mod 2^128: one opening."""
    if not all(type(v) is list for v in (xs, ys, as_, bs)) or not (len(xs) == len(ys) == len(as_) == len(bs) > 0):
        raise ValueError("mac_beaver_masks needs four lists of the same positive length (x, a, y, b per product)")
    if not all(type(p) is list and len(p) == 2 and all(isinstance(t, torch.Tensor) for t in p)
               for v in (xs, ys, as_, bs) for p in v):
        raise ValueError("mac_beaver_masks: every operand and mask is a pair of int64 limbs")
    out: tuple = ()
    for x, a in (*zip(xs, as_), *zip(ys, bs)):
        out += _pieces(r128.sub(tuple(x), tuple(a)))
    return out


@party_function("mac_product_join")
def _join(zs: list, block_sizes: list) -> tuple:
    """A party's authenticated share of the product from its pieces' (4 limbs each): each block's pieces
    summed mod 2^128 (values and MACs), the blocks concatenated along the first dimension."""
    check_join(zs, block_sizes, "mac_product_join")
    if any(type(z) is not list or len(z) != LIMBS for z in zs):
        raise ValueError("mac_product_join needs the pieces' 4 limbs and positive block sizes that add up to them")
    starts = [0, *itertools.accumulate(block_sizes)][:-1]  # (linear: a sum per block was quadratic in them)
    if _meta(*zs[0]):
        rows = sum(int(zs[s][0].shape[0]) for s in starts) if len(starts) > 1 else None
        shape = tuple(zs[0][0].shape) if rows is None else (rows, *zs[0][0].shape[1:])
        return _shapes_only(shape, LIMBS)
    blocks = []
    for start, n in zip(starts, block_sizes):
        value, mac = (zs[start][0], zs[start][1]), (zs[start][2], zs[start][3])
        for z in zs[start + 1:start + n]:
            value, mac = r128.add(value, (z[0], z[1])), r128.add(mac, (z[2], z[3]))
        blocks.append((*value, *mac))
    if len(blocks) == 1:
        return tuple(t.clone() if any(t is z for z in zs[0]) else t for t in blocks[0])
    return tuple(torch.cat([b[j] for b in blocks]).to(DTYPE) for j in range(LIMBS))


def split_beaver(x: dict, y: dict, key: Any, provider: Any, op: str, op_kwargs: dict, plan: SplitPlan) -> dict:
    """:func:`veil.mpc.mac.beaver` of a product split by ``plan`` (one round, as the unsplit product)."""
    parties, k = list(x), len(plan.pieces)
    limbs = [sliced_operands({p: x[p][j] for p in parties}, {p: y[p][j] for p in parties}, plan) for j in range(LIMBS)]
    xs = [{p: tuple(limbs[j][0][i][p] for j in range(LIMBS)) for p in parties} for i in range(k)]
    ys = [{p: tuple(limbs[j][1][i][p] for j in range(LIMBS)) for p in parties} for i in range(k)]
    first = parties[0]
    tris = [provider.authenticated_triples(key.key_id, op, tuple(xi[first][0].shape), tuple(yi[first][0].shape),
                                           parties, **op_kwargs) for xi, yi in zip(xs, ys)]
    opened = _open128("mac_beaver_masks", {p: ([list(xi[p][:2]) for xi in xs], [list(t[p][0:2]) for t in tris],
                                               [list(yi[p][:2]) for yi in ys], [list(t[p][2:4]) for t in tris])
                                           for p in parties}, 2 * k)
    fn = bilinear(op)
    zs = {p: [] for p in parties}
    for i, (xi, yi, tri) in enumerate(zip(xs, ys, tris)):
        e, f = opened[i], opened[k + i]
        ef = r128.bilinear(fn, e, f, **op_kwargs)
        for n, p in enumerate(parties):
            zs[p].append(list(run_party("mac_beaver_finish", list(tri[p]), list(e), list(f), list(ef),
                                        list(key.alpha_shares[p]), op=op, first=(n == 0), op_kwargs=op_kwargs)))
        key.pending.append((f"Beaver mask e = x - a ({op}, piece {i})", e,
                            {p: [(1, xi[p][2], xi[p][3]), (-1,) + tuple(tri[p][6:8])] for p in parties}))
        key.pending.append((f"Beaver mask f = y - b ({op}, piece {i})", f,
                            {p: [(1, yi[p][2], yi[p][3]), (-1,) + tuple(tri[p][8:10])] for p in parties}))
    return {p: tuple(run_party("mac_product_join", zs[p], list(plan.block_sizes))) for p in parties}
