"""The bitwise comparison's quad level (:mod:`veil.mpc.bit_comparison`): tree levels 2 and 3 in one round.

Its variables, the eq of a quad's four groups and the lt of the lower three (the top group's l3 enters
linearly), are packed 16 entries to a word from the group layout (one bit per entry and quad, every bit of a
word used, against one in 16 in the entries' words), one row per variable; the opening masks them with one
dealt field of that shape. With the masked variables public, a monomial is the XOR over the subsets S of
its variables of (the public bits outside S) & (the dealt product of the masks in S): local, on the packed
rows (1/16 of the entries' words), and unpacked to the binary levels' layout (quad q's bit at 16 q) after.
"""

from __future__ import annotations

import math

import torch

from veil.mpc.comparison_material import (GROUP_BITS, QUAD_EQ_MONOMIAL, QUAD_LT_MONOMIALS, QUAD_SUBSETS, QUAD_VARS,
                                          monomial_subsets, quad_rows)
from veil.mpc.party import party_function


def packed_words(numel: int) -> int:
    """Words the quad level opens for ``numel`` compared entries (its packed variables)."""
    return QUAD_VARS * quad_rows(numel)


#: positions that are multiples of 16 (a quad's lowest bit: where its lt and eq end)
QUAD_MASK = sum(1 << p for p in range(0, 64, 16))
#: a quad's lowest 4 bits
_QUAD_LOW4 = sum(0xF << p for p in range(0, 64, 16))
_FOUR = torch.arange(4, dtype=torch.int64)
#: a group's bit within its quad; a group-layout word's place among four (s: rows s * rows ..)
_GROUP_IN_QUAD, _FOUR_IN_16 = (4 * _FOUR).view(4, 1, 1), (4 * _FOUR).view(1, 4, 1)
#: the packed bit ``4 s + u`` of entry ``(4 u + s) rows + r``, at ``[u, s]``
_ENTRY_BIT = (4 * _FOUR.view(1, 4, 1) + _FOUR.view(4, 1, 1))


def _to_quads(four: torch.Tensor, groups: int) -> torch.Tensor:
    """``(groups, quad_rows)`` from a group-layout word ``four`` (``(4 quad_rows,)``): row ``i``'s bit ``16 q +
    4 s + u`` of word ``r`` is the bit of group ``4 q + i`` of entry ``(4 u + s) rows + r``, for ``i < groups``
    (word ``s rows + r`` of ``four`` holds those of the entries ``u (4 rows) + s rows + r``)."""
    rows = four.numel() // 4
    dev = four.device  # (meta in shape inference)
    lanes = (four.view(1, 4, rows) >> _GROUP_IN_QUAD[:groups].to(dev)) & _QUAD_LOW4
    return (lanes << _FOUR_IN_16.to(dev)).sum(1)  # the lanes' bits never overlap: their sum is their OR


def _from_quads(packed: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A packed row back in the entries' ``shape``: quad ``q`` at bit ``16 q`` of each entry's word."""
    out = (packed.view(1, 1, -1) >> _ENTRY_BIT.to(packed.device)) & QUAD_MASK  # [u, s, r]: entry (4 u + s) rows + r
    return out.view(-1)[:math.prod(shape)].view(shape)


def _quad_program(monomials: tuple) -> tuple:
    """The XOR of ``monomials`` of masked variables as ``((S, (T, ..)), ..)``: the polynomial is the XOR over
    ``S`` of ``C_S & m_S``, ``m_S`` the shared product of the masks in ``S`` (the empty S: 1, the first party
    adds ``C_S``), ``C_S`` the XOR of the public products over ``T = V - S`` for each monomial ``V`` with ``S``."""
    coeffs: dict = {}
    for mono in monomials:
        for sub in monomial_subsets(mono):
            coeffs.setdefault(tuple(sorted(sub)), []).append(tuple(sorted(set(mono) - set(sub))))
    return tuple(sorted((sub, tuple(rest)) for sub, rest in coeffs.items()))


_QUAD_LT_PROGRAM, _QUAD_EQ_PROGRAM = _quad_program(QUAD_LT_MONOMIALS), _quad_program((QUAD_EQ_MONOMIAL,))
#: the public products the programs use and each one's prefixes, shortest first
_QUAD_TERMS = tuple(sorted({t[:k] for prog in (_QUAD_LT_PROGRAM, _QUAD_EQ_PROGRAM) for _, ts in prog for t in ts
                            for k in range(1, len(t) + 1)}, key=lambda t: (len(t), t)))
_QUAD_PRODUCT_ROW = {subset: k for k, subset in enumerate(QUAD_SUBSETS)}


def _quad_finish(l3: torch.Tensor, opened: torch.Tensor, mask: torch.Tensor, products: torch.Tensor,
                 first: bool) -> tuple:
    """Shares of the quad level's packed ``(lt, eq)`` from the opened variables (all packed rows)."""
    public: dict = {(): -1}  # every bit of a packed word is an entry's
    for t in _QUAD_TERMS:
        public[t] = public[t[:-1]] & opened[t[-1]] if len(t) > 1 else opened[t[0]]
    shares = {(v,): mask[v] for v in range(QUAD_VARS)}
    shares.update({subset: products[k] for subset, k in _QUAD_PRODUCT_ROW.items()})

    def evaluate(program: tuple, total: torch.Tensor) -> torch.Tensor:
        for subset, rest in program:
            coeff = public[rest[0]]
            for t in rest[1:]:
                coeff = coeff ^ public[t]  # (a new tensor: never changes a public product in place)
            if subset:
                total ^= shares[subset] & coeff
            elif first:
                total ^= coeff
        return total

    return evaluate(_QUAD_LT_PROGRAM, l3), evaluate(_QUAD_EQ_PROGRAM, torch.zeros_like(l3))


def _check_quad_state(state) -> None:
    if not isinstance(state, list) or len(state) != 2 or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.dim() == 1 and t.numel() % 4 == 0
            for t in state) or state[0].shape != state[1].shape:
        raise ValueError("comparison state must be [lt, eq], int64 words of the group layout (4 quad_rows each)")


def _packed_state(state: list) -> torch.Tensor:
    lt, eq = state
    return torch.cat([_to_quads(eq, 4), _to_quads(lt, 3)])


def _check_packed(t, what: str, rows: int, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (rows, *shape):
        raise ValueError(f"the quad level's {what} must be int64 of shape {(rows, *shape)}")


@party_function("cmp_quad_open", openable=True, xor=True)
def _quad_open(state: list, mask) -> tuple:
    """XOR shares of the quad level's packed variables (``QUAD_VARS`` rows) under their dealt mask."""
    _check_quad_state(state)
    packed = _packed_state(state)
    # as large as the packed variables: a smaller (broadcast) mask would hide several entries' bits with one
    _check_packed(mask, "mask", QUAD_VARS, tuple(packed.shape[1:]))
    packed ^= mask
    return (packed,)


@party_function("cmp_quad_open_values", openable=True, xor=1)
def _quad_open_values(state: list, mask, values: list, masks: list) -> tuple:
    """:func:`_quad_open`'s variables (XOR shares), then shares of ``v_j + r_j`` (additive): a value known
    only after the comparison's first round (a truncation's result) opened with the quad level."""
    if not isinstance(values, list) or not isinstance(masks, list) or len(values) != len(masks) or not values:
        raise ValueError("cmp_quad_open_values needs one mask per value")
    # each mask as large as its value, in the ring (the monitor pairs outputs with masks in order: the
    # variables with the quad mask, v_j + r_j with r_j; a broadcast r_j would hide only differences)
    if not all(isinstance(v, torch.Tensor) and isinstance(r, torch.Tensor) and v.dtype == r.dtype == torch.int64
               and v.shape == r.shape for v, r in zip(values, masks)):
        raise ValueError("cmp_quad_open_values needs int64 masks of their values' shapes")
    return (*_quad_open(state, mask), *(v + r for v, r in zip(values, masks)))


@party_function("cmp_quad_next")
def _quad_next(state: list, opened, mask, products, shape: list, first: bool) -> tuple:
    """Stores the binary levels' first state ``(lt, eq)`` in the entries' ``shape`` (``opened``: the quad level's
    opened variables)."""
    _check_quad_state(state)
    if not isinstance(first, bool):
        raise ValueError("comparison steps need a boolean first")
    rows = state[0].numel() // 4
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or \
            quad_rows(math.prod(shape)) != rows:
        raise ValueError(f"cmp_quad_next needs the entries' shape, a list of ints of {rows} packed words")
    shape = tuple(shape)
    for t, what, n in ((opened, "opened variables", QUAD_VARS), (mask, "mask", QUAD_VARS),
                       (products, "products", len(QUAD_SUBSETS))):
        _check_packed(t, what, n, (rows,))
    if opened.is_meta:  # run_party's shape inference (meta outputs: never a real tensor's uninitialized memory)
        return tuple(torch.empty(shape, dtype=torch.int64, device="meta") for _ in range(2))
    (l3,) = _to_quads(state[0] >> (3 * GROUP_BITS), 1)  # the top group's lt, unmasked
    lt_q, eq_q = _quad_finish(l3, opened, mask, products, first)
    return _from_quads(lt_q, shape), _from_quads(eq_q, shape)
