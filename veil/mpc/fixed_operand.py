"""Products with a constant shared operand: its Beaver mask opened once, not in every product.

A served model multiplies every query's shared input ``x`` by the same shared
weights ``w``. A Beaver product (:mod:`veil.mpc.beaver`) opens ``x - a`` *and*
``w - b`` each time, so most of a query's opened bytes are the weights, masked
afresh. With a *fixed* mask ``b`` for ``w`` (the usual precomputation for a
constant operand; SecureML reuses one mask of its data matrix across iterations
the same way):

1. once per operand (:func:`fix_operand`): the provider deals shares of a
   uniform ``b`` and keeps ``b`` (``fixed_mask``: one id per operand), the
   parties open ``f = w - b`` (``fixed_open``) and each keeps ``f`` and its
   share of ``b`` (party 0: ``b_0 + f``);
2. per product (:func:`fixed_product`): the provider deals a fresh ``(a, c =
   op(a, b))`` for that ``b`` (``fixed_beaver``), the parties open only ``e =
   x - a`` (``fixed_mask``) and compute ``z_i = c_i + op(e, b_i) + op(a_i, f)``
   (+ ``op(e, f)`` for party 0), so that ``sum z_i = op(x, w)``.

Security: ``e`` is masked by a fresh uniform ``a`` (the reference monitor's
rules for a protected ``x``: ``OPENING_MASKS["fixed_mask"]``); ``c`` is a
derived field of ``a``'s item. ``b`` hides ``w`` only: it is dealt as a derived
field (never a mask of another opening) and the parties open it once, in
``fixed_open`` (``veil.workers.openings.FIXED_OPENINGS``), which refuses a value
protected for someone else (a second ``w' - b`` would give ``w' - w``). The
orchestrator that owns ``w`` learns ``b = w - f``: harmless, since ``b`` masks
nothing else and ``a`` stays unknown to it.

``w`` is the right operand of a bilinear op (``conv2d(x, w)``, ``mm(x, w)``).
Per query this opens ``numel(x)`` ring elements instead of ``numel(x) +
numel(w)``; the round count is unchanged.
"""

from __future__ import annotations

import secrets
from typing import Hashable, Mapping

import torch

from veil.mpc import beaver
from veil.mpc.party import open_at_parties, party_function, run_party
from veil.mpc.product_split import plan_left_blocks, wire_slices
from veil.mpc.providers.base import Provider
from veil.mpc.ring import bilinear

Shares = Mapping[Hashable, torch.Tensor]


@party_function("fixed_open", openable=True)
def _open(w_i: torch.Tensor, b_i: torch.Tensor) -> tuple:
    """A party's share of ``f = w - b`` (the monitor lets a fixed mask open once, here)."""
    return (w_i - b_i,)


@party_function("fixed_keep")
def _keep(b_i: torch.Tensor, f: torch.Tensor, first: bool) -> tuple:
    """What a party keeps of a fixed operand: its left factor (party 0 adds the public ``f``: ``op(e, b_0)
    + op(e, f) = op(e, b_0 + f)``) and ``f`` itself."""
    return (b_i + f if first else b_i.clone()), f.clone()


@party_function("fixed_mask", openable=True)
def _mask(x_i, a_i) -> tuple:
    """A party's share of ``e = x - a`` (``a`` fresh and uniform); lists: each piece's of a split product."""
    if type(x_i) is list or type(a_i) is list:
        if type(x_i) is not list or type(a_i) is not list or len(x_i) != len(a_i) or not x_i or not all(
                isinstance(t, torch.Tensor) for t in x_i + a_i):
            raise ValueError("fixed_mask needs a tensor and its mask, or two lists of them of the same length")
        return tuple(x - a for x, a in zip(x_i, a_i))
    return (x_i - a_i,)


@party_function("fixed_combine")
def _combine(a_i, c_i, e, left_i, f, op: str, op_kwargs: dict) -> torch.Tensor:
    """``z_i = c_i + op(e, left_i) + op(a_i, f)``: Beaver's local step with the left factor kept."""
    return beaver._combine(a_i, left_i, c_i, e, f, op, False, op_kwargs)


class FixedOperand:
    """A shared constant right operand with its fixed mask opened: what each party keeps.

    Attributes:
        fixed_id: The provider's id of the fixed mask.
        shape: The operand's shape.
        kept: party -> (left factor, ``f``) on that party.
    """

    __slots__ = ("fixed_id", "shape", "kept", "provider")

    def __init__(self, fixed_id: str, shape: tuple, kept: dict, provider: Provider) -> None:
        self.fixed_id, self.shape, self.kept, self.provider = fixed_id, shape, kept, provider

    def __repr__(self) -> str:
        return f"FixedOperand(shape={self.shape}, parties={list(self.kept)})"


def fix_operand(w: Shares, provider: Provider) -> FixedOperand:
    """Deals a fixed mask for the shared constant ``w`` and opens ``w - b`` once (one round)."""
    parties = list(w.keys())
    shape = tuple(w[parties[0]].shape)
    fixed_id = secrets.token_hex(16)  # unguessable: another session cannot ask for triples on this b
    masks = provider.fixed_operand_mask(fixed_id, shape, parties)
    opened = open_at_parties("fixed_open", {p: (w[p], masks[p][0]) for p in parties})
    kept = {p: run_party("fixed_keep", masks[p][0], opened[p][0], first=(i == 0)) for i, p in enumerate(parties)}
    return FixedOperand(fixed_id, shape, kept, provider)


def fixed_product(x: Shares, w: FixedOperand, op: str, **op_kwargs) -> dict:
    """Shares of ``op(x, w)`` for shared ``x`` and a fixed operand ``w`` (one round: ``x - a`` opened).

    Args:
        x: party -> share of the left operand (the parties of ``w``, in its order).
        w: The right operand, from :func:`fix_operand`.
        op: Bilinear op name from :data:`veil.mpc.ring.BILINEAR_OPS`.
        **op_kwargs: Extra op arguments (conv stride, padding, ...).

    Returns:
        party -> share of ``op(x, w)`` in Z/2^64 (no fixed-point truncation).
    """
    parties = list(x.keys())
    if parties != list(w.kept):
        raise ValueError(f"operands are shared among different parties: {parties} vs {list(w.kept)}")
    bilinear(op)
    shape_x = tuple(x[parties[0]].shape)
    blocks = plan_left_blocks(op, shape_x, w.shape, op_kwargs)
    if blocks is not None:  # past the provider's per-item bound: blocks of x, every e opened in this one round
        sliced = {p: run_party("product_pieces", x[p], None, [wire_slices(b) for b in blocks], []) for p in parties}
        triples = [w.provider.fixed_operand_triples(w.fixed_id, op, tuple(piece.shape), w.shape, parties, **op_kwargs)
                   for piece in sliced[parties[0]]]
        opened = open_at_parties("fixed_mask", {p: (list(sliced[p]), [t[p][0] for t in triples]) for p in parties})
        return {p: run_party("product_join", [
            run_party("fixed_combine", t[p][0], t[p][1], opened[p][j], *w.kept[p], op=op, op_kwargs=dict(op_kwargs))
            for j, t in enumerate(triples)], [1] * len(blocks)) for p in parties}
    triples = w.provider.fixed_operand_triples(w.fixed_id, op, shape_x, w.shape, parties, **op_kwargs)
    opened = open_at_parties("fixed_mask", {p: (x[p], triples[p][0]) for p in parties})
    return {p: run_party("fixed_combine", triples[p][0], triples[p][1], opened[p][0], *w.kept[p], op=op,
                         op_kwargs=dict(op_kwargs))
            for p in parties}
