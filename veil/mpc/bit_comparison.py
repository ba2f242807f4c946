"""Private comparison by a dealer-assisted boolean circuit: ``[d > 0]`` and ``v * [d > 0]``.

The default comparison protocol (:data:`veil.mpc.comparison.COMPARISON_PROTOCOLS`).
It computes exactly what the FSS protocol of :mod:`veil.mpc.comparison`
computes, exact over the whole ring Z/2^64 (every ``d`` but ``-2^63``), with
far smaller dealt material and far less computation, at the price of rounds.

Let ``x = d - 1`` (so ``[d > 0] = [x >= 0]``), ``v_0 = d, v_1, ..`` the
values to multiply by the bit. The dealer deals arithmetic masks ``r_j``,
``r_0`` a second time as XOR shares ``R``, AND triples, and a random bit
``rho`` both as XOR and arithmetic shares with ``r_j * rho`` (layout:
:class:`veil.mpc.material.ComparisonLayout`).

1. **Round 1.** Open ``v_j + r_j`` (uniform). ``X = v_0 + r_0 - 1 = x + r_0``.
   The sign bit of ``x`` is ``X_hi xor R_hi xor [X_lo < R_lo]`` (top bits and
   the borrow of the low 63 bits), the same identity as the FSS protocol.
2. **Rounds 2-7: the borrow ``[X_lo < R_lo]``** with ``X`` public and ``R``
   XOR-shared, as a comparison tree on whole 64-bit words: per bit
   ``lt = R & ~X`` and ``eq = ~(R xor X)`` are local (XOR-linear); level
   ``l`` pairs each position ``p`` (a multiple of ``2^(l+1)``) with ``p +
   2^l`` above it and computes ``lt = lt_hi xor (eq_hi & lt_lo)``,
   ``eq = eq_hi & eq_lo`` with two Beaver AND triples sharing the mask of
   ``eq_hi`` (one round, 3 words opened). Six levels take 64 bits to 1
   (bit 63 is a neutral "equal" position).
3. **Round 8.** Open ``b xor rho`` (``b`` the XOR-shared result bit; the last
   level's AND is finished inside this step). With ``e`` public, the
   arithmetic bit is ``b = e + (1 - 2e) rho`` and ``v_j b = (v_j + r_j) b -
   r_j b`` with ``r_j b = e r_j + (1 - 2e) (r_j rho)``: local.

Cost per compared entry, ``p`` values multiplied by the bit (``p = 0``: the
bit alone; 1 for ReLU): **8 rounds**; each party sends ``8 max(p, 1) + 8 * 7
+ 8`` bytes per other party (the AND operands of a level are packed into the
free bits of one word, two at level 0; ReLU: 72 bytes; CrypTen's ReLU: 232
bytes, 9 rounds). The dealer's seeds make every uniform field free; the last party
gets explicit derived fields: ``8 (13 + 1 + p)`` bytes (ReLU: 120 bytes; the
63-bit DCF keys were 2,064 bytes for each of two parties). Computation: a
few dozen int64 word operations per entry.

Security: semi-honest, the dealer not colluding with a party (as Beaver
triples): every opened value is masked by a fresh uniform mask (arithmetic
``r_j``, the AND masks, ``rho``), and each party's message is its share of
a masked value, so a coalition of all parties but one sees uniform values.
Any number of parties: XOR and additive shares for all of them.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import torch

from veil.mpc.material import COMPARISON_LEVELS, ComparisonLayout
from veil.mpc.party import open_parties, party_function, run_party
from veil.mpc.providers.base import Provider

Shares = Mapping[Hashable, torch.Tensor]

LOW = (1 << 63) - 1


def _mask_of(level: int) -> int:
    """Bits at the positions that are multiples of ``2^(level + 1)``."""
    step = 2 << level
    return sum(1 << p for p in range(0, 64, step))


#: per level: (stride, positions that hold the level's results)
_LEVELS = [(1 << level, _mask_of(level)) for level in range(COMPARISON_LEVELS)]


def _half(level: int) -> tuple[int, int]:
    """``(s, mask)``: level ``l`` combines the position ``p + s`` (high) with ``p`` (low),
    ``s = 2^l``, for ``p`` in ``mask`` (multiples of ``2^(l+1)``), so the word
    keeps its order of significance; the result sits at ``p`` (bit 0 at the end)."""
    return _LEVELS[level]


def _leaves(xhat: torch.Tensor, r_x: torch.Tensor, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Shares of per-bit ``lt = ~X & R`` and ``eq = ~(X xor R)`` of the low 63 bits (bit 63: equal)."""
    not_x = ~((xhat - 1) & LOW)  # bit 63 set: X_lo and R_lo are both 0 there
    r_lo = r_x & LOW
    lt = r_lo & not_x
    return lt, (r_lo ^ not_x) if first else r_lo


def _and_operands(lt, eq, level):
    h, m = _half(level)
    return (eq >> h) & m, lt & m, eq & m  # eq_hi, lt_lo, eq_lo


def _and_finish(lt, eq, opened, triple, products, level, first):
    """Shares of the next level's ``(lt, eq)`` from the opened ``(e, f1, f2)``."""
    h, m = _half(level)
    e, f1, f2 = opened
    a, b1, b2 = (t & m for t in triple)
    c1, c2 = (t & m for t in products)
    z1 = c1 ^ (e & b1) ^ (a & f1)
    z2 = c2 ^ (e & b2) ^ (a & f2)
    if first:
        z1 ^= e & f1
        z2 ^= e & f2
    return ((lt >> h) & m) ^ z1, z2


@party_function("cmp_mask_values", openable=True)
def _mask_values(values: list, masks: list) -> tuple:
    """Round 1: shares of ``v_j + r_j``."""
    return tuple(v + r for v, r in zip(values, masks))


@party_function("cmp_and_open", openable=True, xor=True)
def _and_open(lt, eq, a, b1, b2, level: int, leaves: bool, first: bool) -> tuple:
    """XOR shares of ``eq_hi ^ a``, ``lt_lo ^ b1``, ``eq_lo ^ b2`` (``lt, eq`` = ``xhat, R`` when ``leaves``)."""
    _check_level(level)
    if not isinstance(leaves, bool) or not isinstance(first, bool):
        raise ValueError("cmp_and_open needs boolean leaves and first")
    if leaves:
        lt, eq = _leaves(lt, eq, first)
    _, m = _half(level)
    eq_hi, lt_lo, eq_lo = _and_operands(lt, eq, level)
    return _pack(eq_hi ^ (a & m), lt_lo ^ (b1 & m), eq_lo ^ (b2 & m), level)


def _pack(e, f1, f2, level: int) -> tuple:
    """The three masked operands in as few words as their bit positions allow (XOR-compatible).

    Level 0's operands use the even bits: ``e | f1 << 1`` and ``f2``; from
    level 1 on they use one bit in four or fewer: ``e | f1 << 1 | f2 << 2``.
    """
    if level == 0:
        return e | (f1 << 1), f2
    return (e | (f1 << 1) | (f2 << 2),)


def _unpack(words: Sequence[torch.Tensor], level: int) -> tuple:
    _, m = _half(level)
    if level == 0:
        return words[0] & m, (words[0] >> 1) & m, words[1] & m
    w = words[0]
    return w & m, (w >> 1) & m, (w >> 2) & m


@party_function("cmp_and_next")
def _and_next(lt, eq, opened: list, a, b1, b2, c1, c2, level: int, leaves: bool, first: bool) -> tuple:
    """Stores the next level's shares of ``(lt, eq)``."""
    _check_level(level)
    if lt.is_meta:  # run_party's shape inference
        return torch.empty_like(lt), torch.empty_like(lt)
    if leaves:
        lt, eq = _leaves(lt, eq, first)
    return _and_finish(lt, eq, _unpack(opened, level), (a, b1, b2), (c1, c2), level, first)


@party_function("cmp_bit_open", openable=True, xor=True)
def _bit_open(lt, eq, opened: list, a, b1, b2, c1, c2, xhat, r_x, rho, first: bool) -> tuple:
    """Finishes the last AND level and returns XOR shares of ``b ^ rho`` (``b = [x >= 0]``)."""
    if not isinstance(first, bool):
        raise ValueError("cmp_bit_open needs a boolean first")
    last = COMPARISON_LEVELS - 1
    lt, _ = _and_finish(lt, eq, _unpack(opened, last), (a, b1, b2), (c1, c2), last, first)
    b = (lt ^ (r_x >> 63)) & 1  # borrow xor R_hi
    if first:
        b = b ^ ((((xhat - 1) >> 63) & 1) ^ 1)  # xor X_hi xor 1: [x >= 0] = not sign
    return (b ^ (rho & 1),)


@party_function("cmp_select")
def _select(e, opened: list, masks: list, rho, masks_rho: list, first: bool) -> tuple:
    """Shares of the arithmetic bit and of ``v_j * bit`` from the opened ``e = b ^ rho``."""
    if not isinstance(first, bool) or len(masks) != len(masks_rho) or len(opened) < len(masks):
        raise ValueError("cmp_select needs one mask and one r*rho per product and a boolean first")
    if e.is_meta:
        return tuple(torch.empty_like(e) for _ in range(1 + len(masks)))
    sign = 1 - 2 * e
    bit = sign * rho
    if first:
        bit = bit + e
    products = [v_hat * bit - (e * r + sign * r_rho) for v_hat, r, r_rho in zip(opened, masks, masks_rho)]
    return (bit, *products)


def _check_level(level) -> None:
    if type(level) is not int or not 0 <= level < COMPARISON_LEVELS:
        raise ValueError(f"comparison level must be an int in [0, {COMPARISON_LEVELS})")


def sign_select(d: Shares, extras: Sequence[Shares], provider: Provider,
                products: bool = True) -> tuple[dict, list[dict]]:
    """Shares of ``[d > 0]`` and of ``v * [d > 0]`` for ``v`` in ``(d, *extras)`` (8 rounds).

    Same contract as :func:`veil.mpc.comparison.sign_select`.
    """
    if not products and extras:
        raise ValueError("extras are multiplied by the bit: they need products=True")
    parties = list(d.keys())
    n_values = 1 + len(extras) if products else 0
    lay = ComparisonLayout(n_values)
    shape = tuple(d[parties[0]].shape)
    material = provider.comparison_material(shape, n_values, parties)
    mats = {p: list(material[p]) for p in parties}
    values = {p: [d[p]] + [w[p] for w in extras] for p in parties}
    masks = {p: mats[p][:lay.n_masks] for p in parties}
    opened = open_parties("cmp_mask_values", {p: (values[p][:lay.n_masks], masks[p]) for p in parties})
    first = {p: i == 0 for i, p in enumerate(parties)}
    # level state: (xhat, R) for the leaves, then stored (lt, eq) shares
    state = {p: (opened[0], mats[p][lay.r_xor]) for p in parties}
    leaves = True
    for level in range(COMPARISON_LEVELS):
        trip = {p: [mats[p][i] for i in lay.triple(level)] for p in parties}
        prods = {p: [mats[p][i] for i in lay.products(level)] for p in parties}
        words = open_parties("cmp_and_open", {p: (*state[p], *trip[p], level, leaves, first[p])
                                                  for p in parties})
        if level == COMPARISON_LEVELS - 1:
            break
        state = {p: run_party("cmp_and_next", *state[p], words, *trip[p], *prods[p], level=level,
                              leaves=leaves, first=first[p]) for p in parties}
        leaves = False
    (bit_open,) = open_parties("cmp_bit_open", {
        p: (*state[p], words, *trip[p], *prods[p], opened[0], mats[p][lay.r_xor], mats[p][lay.rho], first[p])
        for p in parties})
    outs = {p: run_party("cmp_select", bit_open, opened[:n_values], masks[p][:n_values], mats[p][lay.rho_arith],
                         [mats[p][i] for i in lay.masks_rho], first=first[p]) for p in parties}
    bits = {p: outs[p][0] for p in parties}
    return bits, [{p: outs[p][1 + j] for p in parties} for j in range(n_values)]
