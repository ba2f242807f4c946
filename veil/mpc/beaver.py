"""SPDZ multiplication of secret-shared values with Beaver triples.

Given shares of ``x`` and ``y`` and a dealt triple ``(a, b, c = op(a, b))``
for a bilinear ``op`` (elementwise product, matmul, conv2d, ...), the parties
open ``e = x - a`` and ``f = y - b`` (uniformly masked, so they reveal
nothing) and each party ``i`` computes locally

    z_i = c_i + op(e, b_i) + op(a_i, f)   (+ op(e, f) for party 0 only)

so that ``sum z_i = op(x, y)`` in Z/2^64, because op is bilinear
[Beaver 1991; SPDZ, Damgard et al. 2012; as in CrypTen's beaver.py].

A matrix product between two parties (2-D, from :data:`LOCAL_MIN_WORK`
multiply-adds) takes a ``beaver_local`` item instead
(:mod:`veil.mpc.material`): ``(a, b, d)`` with ``d = a0 @ b1 + a1 @ b0`` shared,
and party ``i`` computes

    z_i = (e + a_i) @ (f + b_i) + d_i - e[rows of the other party] @ f

(``sum z_i = e f + e b + a f + a0 b0 + a1 b1 + d = x y``): one full product and
half of ``e @ f`` per party online instead of two full products; the dealer
computes two products instead of one. Same round, same bytes; ``d_i`` is a
uniform share as ``c_i`` is.

Cost per product: **1 round**; each party sends its share of ``e`` and ``f``
(``numel(x) + numel(y)`` ring elements of 8 bytes; for an elementwise product
that is 2 ring elements per product entry) to each other party. The triple
itself is dealt offline by the provider. Independent products can share
their round (:func:`finish_products`, step ``beaver_masks``): a backward
pass's pairs of gradients do (:mod:`veil.tensors.pending_products`). A product whose one triple
would cost the provider more than its per-item bound is dealt in pieces that open in that same round
(:func:`deal_product`, :mod:`veil.mpc.product_split`).

Shares are only touched through torch ops (``-``, ``+``, the op itself) and
opened through :func:`veil.mpc.opening.open_values`, so the same code runs
on local tensors and on remote pointers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Optional, Sequence

import torch

from veil.mpc.party import open_at_parties, party_function, run_party
from veil.mpc.providers.base import Provider
from veil.mpc.material import LOCAL_PRODUCT_OPS, MAX_PRODUCT_WORK, product_shape, product_work, request_work_bound
from veil.mpc.output_buffers import output_buffer
from veil.mpc.product_split import SplitPlan, plan_split, sliced_operands
from veil.mpc import ring_gemm
from veil.mpc.ring import bilinear, meta_result, op_arguments
from veil.shapes import broadcast_shape

Shares = Mapping[Hashable, torch.Tensor]


@party_function("beaver_mask", openable=True, light=True, borrows=True)
def _mask(x_i: torch.Tensor, y_i: torch.Tensor, a_i: torch.Tensor, b_i: torch.Tensor) -> tuple:
    """A party's shares of ``e = x - a`` and ``f = y - b`` (uniformly masked)."""
    return _minus(x_i, a_i, 0), _minus(y_i, b_i, 1)


def _minus(x: torch.Tensor, a: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """``x - a`` laid out as the dealt ``a`` (contiguous) where ``x`` is a strided view (a transposed weight):
    the result is sent, and a strided one would be copied to be. Output ``k`` of an opening step: into the
    runner's buffer for it, if it set one (:mod:`veil.mpc.output_buffers`)."""
    if x.is_meta or a.is_meta:  # run_party's shape inference: no meta arithmetic (see ring.meta_result)
        return meta_result(x, a)
    out = output_buffer(k, a.shape, a.dtype) if k is not None and x.shape == a.shape and x.dtype == a.dtype \
        else None
    if out is not None:
        return torch.sub(x, a, out=out)
    if x.shape == a.shape and x.dtype == a.dtype and not x.is_contiguous() and a.is_contiguous():
        return torch.sub(x, a, out=torch.empty_like(a))  # (of another dtype: a's would cut the promoted result)
    return x - a


@party_function("beaver_masks", openable=True, light=True, borrows=True)
def _masks(xs: list, ys: list, as_: list, bs: list) -> tuple:
    """Several products' ``e = x - a`` (all of them first), then their ``f = y - b``: one opening."""
    if not all(type(v) is list for v in (xs, ys, as_, bs)) or not (len(xs) == len(ys) == len(as_) == len(bs) > 0):
        raise ValueError("beaver_masks needs four lists of the same positive length (x, y, a, b per product)")
    if not all(isinstance(t, torch.Tensor) for v in (xs, ys, as_, bs) for t in v):
        raise ValueError("beaver_masks: every operand and mask must be a tensor")
    return (*[_minus(x, a) for x, a in zip(xs, as_)], *[_minus(y, b) for y, b in zip(ys, bs)])


@party_function("beaver_combine", borrows=True)
def _combine(a_i, b_i, c_i, e, f, op: str, first: bool, op_kwargs: dict) -> torch.Tensor:
    """``z_i = c_i + op(e, b_i) + op(a_i, f)`` (+ ``op(e, f)`` for party 0)."""
    if type(op_kwargs) is not dict or op_kwargs:  # the requester's: never out=, a tensor or an unknown name
        op_kwargs = op_arguments(op, op_kwargs)
    if c_i.is_meta:  # run_party's shape inference: the result has c's shape (meta ops cost ~1 ms each)
        return torch.empty_like(c_i)
    check_result_shape(a_i, b_i, c_i, e, f, op, op_kwargs)
    fused = _FUSED.get(op)
    if op == "mul" and first and not op_kwargs and _same_shape(c_i, e, b_i, a_i, f):
        # elementwise: e * f added in place too (one more multiply-add pass over memory already in use)
        # instead of a new b + f of the product's size: a fresh buffer costs its page faults, ~3x a pass
        z_i = torch.addcmul(c_i, e, b_i)
        z_i.addcmul_(e, f)
        return z_i.addcmul_(a_i, f)
    # op(e, b_i) + op(e, f) = op(e, b_i + f): party 0 adds the public term with one op fewer (for a
    # matmul or a convolution the sum is an operand's size, much smaller than a second op)
    left = b_i + f if first else b_i
    if op in ("mm", "matmul") and not op_kwargs:  # both products in one pass of float64 limb GEMMs
        z_i = ring_gemm.products(c_i, [(e, left), (a_i, f)])
        if z_i is not None:
            return z_i
    if fused is not None and not op_kwargs and fused[0](c_i, e, left, a_i, f):
        z_i = fused[1](c_i, e, left)  # c + op(e, left) into one new tensor, then op(a, f) added in place:
        fused[2](z_i, a_i, f)  # no temporaries of the product's size (each cost a pass and page faults)
        return z_i
    fn = bilinear(op)
    z_i = fn(e, left, **op_kwargs)
    z_i += fn(a_i, f, **op_kwargs)
    z_i += c_i
    return z_i


#: the most parties a local product's row split may name (it is dealt to two)
_LOCAL_PARTS = 2


@party_function("beaver_combine_local", borrows=True)
def _combine_local(a_i, b_i, d_i, e, f, part: int, parts: int) -> torch.Tensor:
    """``z_i = (e + a_i) @ (f + b_i) + d_i - e[rows not this part's] @ f`` (a ``beaver_local`` item's combine)."""
    if type(part) is not int or type(parts) is not int or not 0 <= part < parts <= _LOCAL_PARTS:
        raise ValueError(f"beaver_combine_local: part must be an int in [0, parts), parts at most {_LOCAL_PARTS}")
    if d_i.is_meta:  # run_party's shape inference: the result has d's shape
        return torch.empty_like(d_i)
    if not all(t.dim() == 2 for t in (a_i, b_i, d_i, e, f)) or tuple(e.shape) != tuple(a_i.shape) \
            or tuple(f.shape) != tuple(b_i.shape) or a_i.shape[1] != b_i.shape[0] \
            or tuple(d_i.shape) != (a_i.shape[0], b_i.shape[1]):
        raise ValueError("beaver_combine_local: the opened values and the dealt item are not one matrix product's")
    _check_work("mm", tuple(a_i.shape), tuple(b_i.shape), tuple(d_i.shape))
    z_i = ring_gemm.addmm(d_i, e + a_i, f + b_i)
    rows = e.shape[0]
    mine = (rows * part // parts, rows * (part + 1) // parts)  # e @ f once over all parties: each its rows
    for start, stop in ((0, mine[0]), (mine[1], rows)):
        if stop > start:
            z_i[start:stop].sub_(ring_gemm.mm(e[start:stop], f))
    return z_i


def check_result_shape(a_i, b_i, c_i, e, f, op: str, op_kwargs: dict) -> None:
    """Refuses operands whose products would not have the dealt ``c``'s shape, before anything is
    computed: the opened ``e`` and ``f`` come with the request, and a broadcast or an outer product of
    them with the dealt factors could otherwise allocate far more than any of them holds."""
    shape = tuple(c_i.shape)
    if op == "mul":
        ok = tuple(broadcast_shape(shape, e.shape, b_i.shape, a_i.shape, f.shape)) == shape
    else:
        ok = all(product_shape(op, tuple(x.shape), tuple(y.shape), op_kwargs) == shape
                 for x, y in ((e, b_i), (a_i, f), (e, f)))
    if not ok:
        raise ValueError(f"beaver_combine: the {op} of the opened values and the dealt factors does not have "
                         f"the dealt product's shape {list(shape)}")
    _check_work(op, tuple(e.shape), tuple(f.shape), shape)


def _check_work(op: str, shape_a: tuple, shape_b: tuple, shape_c: tuple) -> None:
    """Refuses a combine costing more multiply-adds than any dealt item (``material.MAX_PRODUCT_WORK``): an
    honest combine's operands are one item's, and a requester naming stored tensors of its own (views charged
    their storage) could otherwise ask for an N^3 product in one command (red team, session 64)."""
    if product_work(op, shape_a, shape_b, shape_c) > MAX_PRODUCT_WORK:
        raise ValueError(f"beaver_combine: an {op} of shapes {list(shape_a)} and {list(shape_b)} costs more than "
                         f"{MAX_PRODUCT_WORK} multiply-adds, more than any dealt item")


def _same_shape(c, *operands) -> bool:
    return all(t.shape == c.shape for t in operands)


def _matrices(c, e, left, a, f) -> bool:
    return c.dim() == e.dim() == left.dim() == a.dim() == f.dim() == 2


def _batches(c, e, left, a, f) -> bool:
    return c.dim() == e.dim() == left.dim() == a.dim() == f.dim() == 3


#: op -> (applies to these shapes, ``c + op(x, y)`` as a new tensor, ``z += op(x, y)`` in place);
#: exact in Z/2^64 like the unfused ops (int64 wraps the same way)
_FUSED = {
    "mul": (_same_shape, torch.addcmul, torch.Tensor.addcmul_),
    "mm": (_matrices, torch.addmm, torch.Tensor.addmm_),
    "matmul": (_matrices, torch.addmm, torch.Tensor.addmm_),
    "bmm": (_batches, torch.baddbmm, torch.Tensor.baddbmm_),
}


def deal_triple(x: Shares, y: Shares, op: str, provider: Provider, **op_kwargs) -> dict:
    """The dealt triple ``party -> (a, b, c)`` of one product ``op(x, y)`` (checks parties and op first)."""
    parties = list(x.keys())
    if list(y.keys()) != parties:
        raise ValueError(f"operands are shared among different parties: {parties} vs {list(y.keys())}")
    bilinear(op)  # fail early on an unknown op
    first_x, first_y = x[parties[0]], y[parties[0]]
    return provider.beaver_triples(op, tuple(first_x.shape), tuple(first_y.shape), parties, **op_kwargs)


def beaver_op(x: Shares, y: Shares, op: str, provider: Provider, **op_kwargs) -> dict:
    """Computes shares of ``op(x, y)`` for secret-shared ``x`` and ``y``.

    Each party runs two steps: ``beaver_mask`` (opened: one message per
    party, the protocol's single round) and ``beaver_combine`` (local to the
    party: one command message for a remote share).

    Args:
        x: party -> share of the left operand.
        y: party -> share of the right operand (same parties, same order).
        op: Bilinear op name from :data:`veil.mpc.ring.BILINEAR_OPS`.
        provider: Deals the triple.
        **op_kwargs: Extra op arguments (conv stride, padding, ...).

    Returns:
        party -> share of ``op(x, y)`` in Z/2^64 (no fixed-point truncation).
    """
    return finish_products([deal_product(x, y, op, provider, **op_kwargs)])[0]


@dataclass
class Product:
    """One Beaver product whose triple is dealt and whose masked operands are not opened yet."""

    x: Shares
    y: Shares
    op: str
    op_kwargs: dict
    triples: Optional[dict]  # party -> (a, b, c), or (a, b, d) for a local item; None for a split product
    #: a product too large for one dealt item (:mod:`veil.mpc.product_split`): its pieces, each dealt its
    #: own triple and opened in the same round, and the per-block piece counts their results are joined by
    pieces: Optional[tuple] = None
    #: dealt as a ``beaver_local`` item (two parties' matrix product: ``beaver_combine_local``)
    local: bool = False


#: multiply-adds from which a matrix product takes a local item: below, the half product it saves a party costs
#: less than its extra elementwise passes and calls (a batch-1 model's layers), and the dealer's second product
LOCAL_MIN_WORK = ring_gemm.MIN_WORK


def _dealt(x: Shares, y: Shares, op: str, provider: Provider, op_kwargs: dict) -> Product:
    """One product with its item dealt: a ``beaver_local`` item for a matrix product between two parties where
    the provider deals them (one product per party online instead of two), else a Beaver triple."""
    parties = list(x.keys())
    if op in LOCAL_PRODUCT_OPS and not op_kwargs and len(parties) == 2 and list(y.keys()) == parties:
        shape_x, shape_y = tuple(x[parties[0]].shape), tuple(y[parties[0]].shape)
        matrices = len(shape_x) == len(shape_y) == 2 and shape_x[1] == shape_y[0]
        work = math.prod(shape_x) * shape_y[1] if matrices else 0
        # (at the provider it costs two products: material.item_product_work)
        if matrices and LOCAL_MIN_WORK <= work and 2 * work <= request_work_bound():
            items = provider.local_triples(op, shape_x, shape_y, parties)
            if items is not None:
                return Product(x, y, op, {}, items, local=True)
    return Product(x, y, op, dict(op_kwargs), deal_triple(x, y, op, provider, **op_kwargs))


def deal_product(x: Shares, y: Shares, op: str, provider: Provider, **op_kwargs) -> Product:
    """``op(x, y)`` with its material dealt: one triple, or, past the provider's per-item bound, one per
    piece of the product (the pieces' operands sliced at each party; their masks open together)."""
    parties = list(x.keys())
    if list(y.keys()) != parties:
        raise ValueError(f"operands are shared among different parties: {parties} vs {list(y.keys())}")
    plan = plan_split(op, tuple(x[parties[0]].shape), tuple(y[parties[0]].shape), op_kwargs)
    if plan is None:
        return _dealt(x, y, op, provider, dict(op_kwargs))
    return _split_product(x, y, op, dict(op_kwargs), provider, plan)


def _split_product(x: Shares, y: Shares, op: str, op_kwargs: dict, provider: Provider, plan: SplitPlan) -> Product:
    pieces = [_dealt(xj, yj, op, provider, op_kwargs) for xj, yj in zip(*sliced_operands(x, y, plan))]
    return Product(x, y, op, op_kwargs, None, (tuple(pieces), plan.block_sizes))


def finish_products(products: Sequence[Product]) -> list[dict]:
    """Shares of every product, their masked operands opened together: **one round** for all of them.

    The products must be independent (no operand of one is another's result) and shared among the
    same parties in the same order. One product opens ``beaver_mask``; several open ``beaver_masks``
    (each ``e`` and ``f`` under its own triple's mask, as one product would).
    """
    parties = list(products[0].x.keys())
    if any(list(p.x.keys()) != parties or list(p.y.keys()) != parties for p in products):
        raise ValueError("products opened together must be shared among the same parties, in the same order")
    flat, spans = [], []  # a split product's pieces open beside the others, in the same round
    for q in products:
        units = q.pieces[0] if q.pieces is not None else (q,)
        spans.append((len(flat), len(units)))
        flat.extend(units)
    results = _finish_unsplit(flat, parties)
    return [results[start] if q.pieces is None else
            {p: run_party("product_join", [results[start + j][p] for j in range(n)], list(q.pieces[1]))
             for p in parties}
            for q, (start, n) in zip(products, spans)]


def _finish_unsplit(products: Sequence[Product], parties: list) -> list[dict]:
    # e, f where each party uses them: public tensors (a star opening) or, between network workers
    # that open among themselves, handles to the values each party reconstructed (peer openings)
    if len(products) == 1:
        (one,) = products
        opened = open_at_parties("beaver_mask", {p: (one.x[p], one.y[p], *one.triples[p][:2]) for p in parties})
        pairs = {p: [tuple(opened[p])] for p in parties}
    else:
        n = len(products)
        opened = open_at_parties("beaver_masks", {p: (
            [q.x[p] for q in products], [q.y[p] for q in products],
            [q.triples[p][0] for q in products], [q.triples[p][1] for q in products]) for p in parties})
        pairs = {p: [(opened[p][k], opened[p][n + k]) for k in range(n)] for p in parties}
    return [{p: run_party("beaver_combine_local", *q.triples[p], *pairs[p][k], part=i, parts=len(parties))
             if q.local else
             run_party("beaver_combine", *q.triples[p], *pairs[p][k], op=q.op, first=(i == 0),
                       op_kwargs=dict(q.op_kwargs)) for i, p in enumerate(parties)}
            for k, q in enumerate(products)]


def beaver_mul(x: Shares, y: Shares, provider: Provider) -> dict:
    """Elementwise product (broadcasting like ``torch.mul``)."""
    return beaver_op(x, y, "mul", provider)


def beaver_matmul(x: Shares, y: Shares, provider: Provider) -> dict:
    """Matrix product with ``torch.matmul`` semantics."""
    return beaver_op(x, y, "matmul", provider)


def beaver_conv2d(x: Shares, w: Shares, provider: Provider, stride=1, padding=0, dilation=1, groups=1) -> dict:
    """2-D convolution of shared input ``x`` with shared kernel ``w`` (no bias)."""
    return beaver_op(x, w, "conv2d", provider, stride=stride, padding=padding, dilation=dilation, groups=groups)
