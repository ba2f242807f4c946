"""Comparisons on SPDZ2k-authenticated shares: ``[d > 0]`` and ``v * [d > 0]`` with MACs.

The authenticated counterpart of :func:`veil.mpc.comparison.sign_select`
(same contract, same range) for shares of :mod:`veil.mpc.mac` (values and
MACs mod 2^128, value ring Z/2^64). Every step is an authenticated linear
map or an authenticated Beaver product, and every opened value joins the
key's pending openings, so the batched MAC check (:func:`veil.mpc.mac.check`)
covers the comparison with the same bound as any product: an additive error
that changes an opened value mod 2^64 escapes with probability at most
``2^-57.9`` per check.

**Design (trusted crypto provider).** The provider knows ``alpha`` and
deals honestly (as for triples), so it can deal *edaBits* (Escudero, Ghosh,
Keller, Rachuri, Scholl, "Improved primitives for MPC over mixed
arithmetic-binary circuits", CRYPTO 2020) without the cut-and-choose that
the dealer-free setting needs: an authenticated uniform 128-bit ``r~`` and
authenticated 0/1 arithmetic shares (mod 2^128) of the 64 bits ``r_i`` of
``r = r~ mod 2^64``, plus, to make the first two levels of the circuit local
(as the semi-honest circuit does, :mod:`veil.mpc.bit_comparison`), the
authenticated products of each 4-bit group's bits over its 11 subsets of two
or more (recipe ``comparison_mac``, :mod:`veil.mpc.material`). A party that
changes its share of any of these changes a value that is later opened or
output without the matching MAC change: caught like a tampered triple.
Binary sharings (XOR, mod 2) would need their own MACs; arithmetic 0/1 bits
mod 2^128 keep the one SPDZ2k key, and an AND is a Beaver product.

Let ``x = d - 1`` (so ``[d > 0] = [x >= 0]``, as the semi-honest protocols).

1. **Round 1.** Open ``c = x~ + r~`` mod 2^128 (uniform: hides all 128 bits
   of ``x~``; the step is :mod:`veil.mpc.mac`'s truncation mask with ``K =
   -1``), recorded for the MAC check. ``C = c mod 2^64 = x + r mod 2^64``,
   so ``x = C - r`` and its sign bit is ``C_63 xor r_63 xor [C_lo < r_lo]``
   (``lo``: the low 63 bits; the borrow of the subtraction).
2. **The borrow** by a comparison tree over the 64 bit positions: a node
   is the affine map ``t -> lt + eq t`` ("below here, else as the lower
   positions say"); two adjacent nodes compose as ``lt = lt_hi + eq_hi
   lt_lo``, ``eq = eq_hi eq_lo`` (for 0/1 values the sum is the XOR: both
   terms are never 1). Leaf ``i < 63``: ``lt_i = (1 - C_i) r_i`` and ``eq_i =
   1 - (C_i xor r_i) = (1 - C_i) + (2 C_i - 1) r_i``, linear in ``r_i`` with
   public coefficients. Leaf 63 folds in the top bits and the final negation:
   with ``s = C_63 xor r_63``, ``(lt, eq) = (1 - s, 2 s - 1)``, so that the
   root's ``lt`` is ``1 - (s xor borrow) = [x >= 0]`` (composition is
   associative whatever the values are: an ``eq`` of -1 is fine).
3. **Levels 0 and 1 are local**: a group of 4 leaves composes to
   polynomials in the group's bits with public coefficients, whose monomials
   are dealt. The other **4 levels (16 groups to 1) take one round each**:
   all products of a level (``eq_hi lt_lo`` and ``eq_hi eq_lo`` of every
   pair, only the first at the root) are one authenticated Beaver product,
   ``eq_hi`` times ``(lt_lo, eq_lo)`` stacked (broadcast: ``eq_hi - a`` is
   opened once for both, as two triples sharing ``a``).
4. **Products** ``v_j * bit`` (ReLU, max): one more Beaver round for all
   ``v_j`` stacked, times the bit broadcast.

Cost per compared entry: **5 rounds** for the bit, **6** for ReLU (as the
semi-honest circuit). Opened per entry: ``c``, then ``8 + 16``, ``4 + 8``,
``2 + 4`` and ``1 + 1`` masked operands over the levels, and ``p + 1`` for
``p`` values multiplied by the bit: 47 128-bit values for ReLU, sent as 24
bytes each (three int64 pieces): 1,128 bytes per party, plus the check.
Dealt: 240 authenticated 128-bit values (7.5 KB) per entry plus the
triples; with seeded dealing only the last party receives the derived fields.

Abort is independent of the data: every shared value of the circuit enters
an opening or the output additively, so an additive error in it shows up in
an opened value whatever ``x`` is; which dealt fields enter, and with which
public coefficients, depends only on the public (uniform) ``C``.

Range: the semi-honest circuit's: exact for every ``d`` in Z/2^64 but
``-2^63`` (``d - 1`` wraps), whatever the upper 64 bits of ``d~``.

Security: active (with abort) against any coalition of parties that does
not include the crypto provider or the orchestrator (both know ``alpha``);
the opened ``c``, ``e``, ``f`` are uniform mod 2^128 given the dealer's
masks. Errors confined to the upper 64 bits of a share may pass a check
(as for every SPDZ2k value) but never change a result mod 2^64.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import torch

from veil.mpc import mac
from veil.mpc import ring128 as r128
from veil.mpc.comparison_material import GROUP_BITS, GROUP_SUBSETS
from veil.mpc.material import EDABIT_BITS, EDABIT_GROUPS
from veil.mpc.party import party_function, run_party
from veil.mpc.providers.fss_dealing import MAX_VALUES

Shared = Mapping[Hashable, tuple]

#: tree nodes after the local levels (one per 4-bit group)
_NODES = EDABIT_GROUPS
#: opening rounds of :func:`sign_select`: the mask, then one per tree level above the local ones (16 -> 1)
BIT_ROUNDS = 1 + 4
_SUBSET_INDEX = {subset: k for k, subset in enumerate(GROUP_SUBSETS)}


# ------------------------------------------------------------------ party functions

def _check_limbs(*groups: Any) -> None:
    for g in groups:
        if not isinstance(g, (list, tuple)) or len(g) != 4 or not all(isinstance(t, torch.Tensor) for t in g):
            raise ValueError("an authenticated share is a list of 4 int64 tensors (v_lo, v_hi, m_lo, m_hi)")


def _small_combination(terms: list) -> r128.Pair:
    """``sum k * s mod 2^128`` for small public integer tensors ``k`` and 128-bit ``s = (lo, hi)``:
    exact images of the 32-bit halves of ``lo`` recombined with carries (far cheaper than a
    schoolbook product per term; exact while ``sum |k| < 2^30``)."""
    t0 = t1 = hi = None
    for k, (lo, up) in terms:
        d0, d1 = r128.digits(lo, 32)
        a0, a1, a2 = k * d0, k * d1, k * up
        t0, t1, hi = (a0, a1, a2) if t0 is None else (t0 + a0, t1 + a1, hi + a2)
    return r128.combine([(0, t0), (2, t1)], [hi])


def _affine(const: torch.Tensor, terms: list, alpha: r128.Pair, first: bool) -> tuple:
    """One party's shares of ``const + sum coef * s`` and of its MAC, for public small-integer
    coefficients (int64 tensors) and authenticated shares ``s`` (4 limbs each)."""
    value = _small_combination([(k, (s[0], s[1])) for k, s in terms])
    if first:
        value = r128.add(value, r128.lift(const))
    mac_share = _small_combination([(k, (s[2], s[3])) for k, s in terms] + [(const, alpha)])
    return value + mac_share


def _poly_mul(p: dict, q: dict) -> dict:
    """Product of polynomials in bits (``{monomial: public coefficient}``, monomials as sorted
    tuples of group offsets; ``r_o^2 = r_o``, though the composition never squares a bit)."""
    out: dict = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            m = tuple(sorted(set(m1) | set(m2)))
            out[m] = out[m] + c1 * c2 if m in out else c1 * c2
    return out


def _poly_add(p: dict, q: dict) -> dict:
    out = dict(p)
    for m, c in q.items():
        out[m] = out[m] + c if m in out else c
    return out


@party_function("macc_leaves")
def _leaves(c_lo: torch.Tensor, bits: list, products: list, alpha: list, first: bool) -> tuple:
    """The first two levels of the tree, locally: ``(lt, eq)`` of the 16 groups of 4 bit
    positions (shape ``(16, *shape)``), polynomials in the group's bits whose monomials are dealt."""
    if not isinstance(first, bool):
        raise ValueError("macc_leaves needs a boolean first")
    _check_limbs(bits, products)
    shape = tuple(c_lo.shape)
    if tuple(bits[0].shape) != (EDABIT_BITS,) + shape or \
            tuple(products[0].shape) != (len(GROUP_SUBSETS), _NODES) + shape:
        raise ValueError("macc_leaves: the edaBit's bits and products do not match the opened mask's shape")
    cb = torch.stack([(c_lo >> i) & 1 for i in range(EDABIT_BITS)])  # public bits of C
    # per leaf: lt = A + B r, eq = D + E r
    a = torch.zeros_like(cb)
    b, d, e = 1 - cb, 1 - cb, 2 * cb - 1
    top = cb[EDABIT_BITS - 1]  # leaf 63: s = C_63 + (1 - 2 C_63) r_63; (lt, eq) = (1 - s, 2 s - 1)
    a[-1], b[-1], d[-1], e[-1] = 1 - top, 2 * top - 1, 2 * top - 1, 2 - 4 * top
    grouped = [t.view((_NODES, GROUP_BITS) + shape) for t in (a, b, d, e)]  # [group, offset]
    lt = eq = None
    for o in range(GROUP_BITS):  # f_3(f_2(f_1(f_0(t)))): lt <- lt_o + eq_o lt, eq <- eq_o eq
        ga, gb, gd, ge = (t[:, o] for t in grouped)
        lt_o, eq_o = {(): ga, (o,): gb}, {(): gd, (o,): ge}
        lt = lt_o if lt is None else _poly_add(lt_o, _poly_mul(eq_o, lt))
        eq = eq_o if eq is None else _poly_mul(eq_o, eq)

    def monomial(m: tuple) -> list:
        if len(m) == 1:
            return [t.view((_NODES, GROUP_BITS) + shape)[:, m[0]] for t in bits]
        return [t[_SUBSET_INDEX[m]] for t in products]

    alpha = tuple(alpha)
    out = ()
    for poly in (lt, eq):
        out += _affine(poly.get((), torch.zeros_like(cb[:_NODES])),
                       [(c, monomial(m)) for m, c in poly.items() if m], alpha, first)
    return out


@party_function("macc_operands")
def _operands(lt: list, eq: list, last: bool) -> tuple:
    """The Beaver operands of one level: ``eq_hi`` and ``(lt_lo, eq_lo)`` stacked on a new first
    dimension (one product broadcast over it: ``eq_hi`` is masked and opened once); at the root,
    ``eq_hi`` and ``lt_lo``."""
    if not isinstance(last, bool):
        raise ValueError("macc_operands needs a boolean last")
    _check_limbs(lt, eq)
    if lt[0].dim() == 0 or lt[0].shape[0] % 2 or tuple(lt[0].shape) != tuple(eq[0].shape):
        raise ValueError("macc_operands needs (lt, eq) of one shape with an even first dimension")
    if last != (lt[0].shape[0] == 2):
        raise ValueError("macc_operands: last is the level of two nodes")
    eq_hi, lt_lo, eq_lo = [t[1::2] for t in eq], [t[0::2] for t in lt], [t[0::2] for t in eq]
    if last:
        return tuple(t.contiguous() for t in eq_hi + lt_lo)
    return tuple(t.contiguous() for t in eq_hi) + tuple(torch.stack([a, b]) for a, b in zip(lt_lo, eq_lo))


@party_function("macc_next")
def _next(lt: list, z: list, last: bool) -> tuple:
    """The next level's ``(lt, eq)`` from the products ``z = eq_hi (lt_lo, eq_lo)``: ``lt =
    lt_hi + z[0]``, ``eq = z[1]``; at the root, the bit ``lt_hi + z`` (tree dimension removed)."""
    if not isinstance(last, bool):
        raise ValueError("macc_next needs a boolean last")
    _check_limbs(lt, z)
    m = lt[0].shape[0] // 2 if lt[0].dim() else 0
    rest = tuple(lt[0].shape[1:])
    if m == 0 or tuple(z[0].shape) != (((1,) if last else (2, m)) + rest):
        raise ValueError("macc_next: the products do not match the level")
    lt_hi = [t[1::2] for t in lt]
    lt_z, eq_z = (z, None) if last else ([t[0] for t in z], [t[1] for t in z])
    new_lt = r128.add((lt_hi[0], lt_hi[1]), (lt_z[0], lt_z[1])) + r128.add((lt_hi[2], lt_hi[3]), (lt_z[2], lt_z[3]))
    if last:
        return tuple(t[0].contiguous() for t in new_lt)
    return tuple(t.contiguous() for t in new_lt) + tuple(t.contiguous() for t in eq_z)


#: most values multiplied by one comparison bit, as for FSS comparisons (``fss_dealing.MAX_VALUES``; max and
#: argmax use 2): ``macc_unstack`` returns 4 tensors per value, however few bytes they hold
MAX_STACKED = MAX_VALUES


@party_function("macc_stack")
def _stack(values: list) -> tuple:
    """The values to multiply by the bit, stacked (the bit is broadcast over them)."""
    if not isinstance(values, (list, tuple)) or not values or len(values) > MAX_STACKED:
        raise ValueError(f"macc_stack needs a list of 1 to {MAX_STACKED} values")
    _check_limbs(*values)
    return tuple(torch.stack([v[k] for v in values]) for k in range(4))


@party_function("macc_unstack")
def _unstack(z: list) -> tuple:
    """The products ``v_j * bit`` one by one: 4 limbs each (at most :data:`MAX_STACKED` values: the count follows
    the first dimension, not the bytes; limbs of shape (10^9, 0) made 4 * 10^9 tensors, a worker's memory, from
    one small request; red team: test_redteam_session66_pieces.py)."""
    _check_limbs(z)
    if z[0].dim() == 0 or not 0 < z[0].shape[0] <= MAX_STACKED:
        raise ValueError(f"macc_unstack needs stacked products of 1 to {MAX_STACKED} values")
    return tuple(z[k][j].contiguous() for j in range(z[0].shape[0]) for k in range(4))


# ------------------------------------------------------------------ the protocol

def sign_select(d: Shared, extras: Sequence[Shared], key: mac.MacKey, provider: Any, shape: Sequence[int],
                products: bool = True) -> tuple[dict, list[dict]]:
    """Authenticated shares of ``[d > 0]`` and of ``v * [d > 0]`` for ``v`` in ``(d, *extras)``.

    Args:
        d: party -> the 4 limbs of its authenticated share (:mod:`veil.mpc.mac`).
        extras: More authenticated values of ``d``'s shape to multiply by the bit.
        key: The MAC key of every operand.
        provider: Deals the edaBits and triples under ``key``.
        shape: The shape of ``d``.
        products: False for the bit alone (no extras).

    Returns:
        ``(bits, products)`` as :func:`veil.mpc.comparison.sign_select`, every
        share authenticated (4 limbs). Exact for every ``d`` but ``-2^63``;
        the openings are checked with the next :func:`veil.mpc.mac.check`.
    """
    if not products and extras:
        raise ValueError("extras are multiplied by the bit: they need products=True")
    parties = list(d)
    shape = tuple(int(s) for s in shape)
    mat = provider.authenticated_comparison_material(key.key_id, shape, parties)
    # (lo, hi) of r, bits, group products, alpha*r, alpha*bits, alpha*products
    r = {p: (mat[p][0], mat[p][1], mat[p][6], mat[p][7]) for p in parties}
    bits = {p: [mat[p][2], mat[p][3], mat[p][8], mat[p][9]] for p in parties}
    group_products = {p: [mat[p][4], mat[p][5], mat[p][10], mat[p][11]] for p in parties}
    shift = -1  # x = d - 1
    (c,) = mac._open128("mac_trunc_mask", {p: (d[p][0], d[p][1], r[p][0], r[p][1], shift if i == 0 else 0)
                                           for i, p in enumerate(parties)}, 1)
    key.pending.append(("comparison mask c = x + r", c, {
        p: [(1, d[p][2], d[p][3]), (shift,) + tuple(key.alpha_shares[p]), (1, r[p][2], r[p][3])] for p in parties}))
    first = {p: i == 0 for i, p in enumerate(parties)}
    state = {p: run_party("macc_leaves", c[0], bits[p], group_products[p], list(key.alpha_shares[p]), first=first[p])
             for p in parties}
    nodes = _NODES
    while nodes > 1:
        last = nodes == 2
        shape_x, shape_y = ((1,) + shape, (1,) + shape) if last else ((nodes // 2,) + shape, (2, nodes // 2) + shape)
        ops = {p: run_party("macc_operands", list(state[p][:4]), list(state[p][4:]), last=last) for p in parties}
        z = mac.beaver({p: ops[p][:4] for p in parties}, {p: ops[p][4:] for p in parties}, key, provider, "mul",
                       shape_x, shape_y)
        state = {p: run_party("macc_next", list(state[p][:4]), list(z[p]), last=last) for p in parties}
        nodes //= 2
    bit = {p: tuple(state[p]) for p in parties}
    if not products:
        return bit, []
    values = [d] + list(extras)
    stacked = {p: run_party("macc_stack", [list(v[p]) for v in values]) for p in parties}
    n = len(values)
    z = mac.beaver(stacked, bit, key, provider, "mul", (n,) + shape, shape)  # the bit's f opened once
    split = {p: run_party("macc_unstack", list(z[p])) for p in parties}
    return bit, [{p: tuple(split[p][4 * j:4 * j + 4]) for p in parties} for j in range(n)]
