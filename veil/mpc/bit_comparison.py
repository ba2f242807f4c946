"""Private comparison by a dealer-assisted boolean circuit: ``[d > 0]`` and ``v * [d > 0]``.

The default comparison protocol (:data:`veil.mpc.comparison.COMPARISON_PROTOCOLS`).
It computes exactly what the FSS protocol of :mod:`veil.mpc.comparison`
computes, exact over the whole ring Z/2^64 (every ``d`` but ``-2^63``), with
far smaller dealt material and far less computation, at the price of rounds.

Let ``x = d - 1`` (so ``[d > 0] = [x >= 0]``), ``v_0 = d, v_1, ..`` the
values to multiply by the bit. The dealer deals arithmetic masks ``r_j``,
``r_0`` a second time as XOR shares ``R``, the quad level's masks and their
products, AND triples, a random bit ``rho``, and arithmetic shares of a small
table of the last level's mask bits (layout:
:class:`veil.mpc.comparison_material.ComparisonLayout`).

1. **Round 1.** Open ``v_j + r_j`` (uniform). ``X = v_0 + r_0 - 1 = x + r_0``.
   The sign bit of ``x`` is ``X_hi xor R_hi xor [X_lo < R_lo]`` (top bits and
   the borrow of the low 63 bits), the same identity as the FSS protocol.
2. **The borrow ``[X_lo < R_lo]``** with ``X`` public and ``R`` XOR-shared,
   as a comparison tree on whole 64-bit words (per position ``lt``: "X below
   R here", ``eq``: "equal here"; a pair combines as ``lt = lt_hi xor (eq_hi &
   lt_lo)``, ``eq = eq_hi & eq_lo``). Its first two levels (4-bit groups) are
   **local**: each group's ``lt`` and ``eq`` are polynomials in ``R``'s bits
   with public coefficients (from ``X``), and the dealer shares every product
   of ``R``'s bits within a group (11 per group). They compute in the *group
   layout* (:func:`veil.mpc.comparison_material.to_group_layout`: a 4x4 bit transpose
   per group across four entries' words, so that a word holds one bit of
   every group of four entries, where an entry's word uses one in four), in
   which the dealer deals ``R`` and the products. The top
   group's ``lt`` also takes ``X_hi xor R_hi xor 1``: it reaches the root of
   the tree unchanged (it is every level's high operand), so the root's ``lt``
   is the result bit ``b = [x >= 0]``.
3. **The quad level: tree levels 2 and 3 in one round** (:mod:`veil.mpc.quad_level`). Four groups merge
   at once: ``lt = l3 xor e3 l2 xor e3 e2 l1 xor e3 e2 e1 l0``, ``eq = e3 e2
   e1 e0``. The seven variables but ``l3`` are packed 16 entries to a word
   (a row each: one bit per entry and quad, where the entries' words use one
   bit in 16) and opened under one dealt mask of that shape; a monomial of
   masked variables is then the XOR over the subsets ``S`` of its variables
   of (the public bits outside ``S``) and (the product of the masks in
   ``S``), which the dealer shares (22 rows): local, on the packed rows.
4. **Two binary levels** (4 positions to 1) take one round each: two Beaver
   AND triples sharing the mask of ``eq_hi``, the three masked operands
   packed into one word, and the words of several entries compacted into one
   (:data:`COMPACT`: 10 and 21 entries' words). The last level's opening is
   the last round: its third operand (no ``eq`` is needed above the root) is
   ``lt_hi xor rho``. With the three opened bits public, ``b`` as an
   arithmetic 0/1 is one row of a dealt table (4 rows: one per value of the
   first two bits) times a public sign, plus a public bit, and ``v_j b = (v_j
   + r_j) b - r_j b`` the same row of ``r_j`` times the table
   (:func:`_select`): local.

Cost per compared entry, ``p`` values multiplied by the bit (``p = 0``: the
bit alone; 1 for ReLU): **4 rounds**; each party sends ``8 max(p, 1) + 8 (7/16
+ 1/10 + 1/21)`` bytes per other party (ReLU: 12.7 bytes; CrypTen's ReLU: 232
bytes in 9 rounds). The dealer's seeds make every uniform field free; the
last party gets the derived fields explicitly: ``8 (6 + 4p) + 41`` bytes
(ReLU: 121 bytes; the 63-bit DCF keys were 2,064 bytes for each of two
parties). Computation: about fifty int64 word operations per entry, no AES.

The local groups use the idea of dealing products of mask bits so that the
low levels of a comparison circuit need no interaction (function-dependent
preprocessing, as in the multi-input AND gates of e.g. Ohata-Nuida,
"Communication-efficient (client-aided) secure two-party protocols and its
application", FC 2020), once for the groups' mask bits and once for the quad
level's; the code is written from the formulas above.

Security: semi-honest, the dealer not colluding with a party (as Beaver
triples): every opened value is masked by a fresh uniform mask (arithmetic
``r_j``, the quad and AND masks, ``rho``), and each party's message is its share of
a masked value, so a coalition of all parties but one sees uniform values.
Any number of parties: XOR and additive shares for all of them.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import torch

from veil.mpc import quad_level  # the quad level's steps (cmp_quad_open, cmp_quad_next)
from veil.mpc.comparison_material import (AND_LEVELS, GROUP_BITS, GROUP_LEVELS, GROUP_SUBSETS, SELECT_CASES,
                                          TOP_GROUP_BITS, ComparisonLayout, group_rows, to_group_layout)
from veil.mpc.party import PARTY_FUNCTIONS, open_at_parties, party_function, run_party
from veil.mpc.providers.base import Provider
from veil.mpc.runtime import OPENED_LAYOUTS, runtime_of
from veil.mpc.truncation import finish_truncation, shift_for

Shares = Mapping[Hashable, torch.Tensor]

LAST = AND_LEVELS - 1


def _mask_of(level: int) -> int:
    """Bits at the positions that are multiples of ``2^(level + 1)``."""
    step = 2 << level
    return sum(1 << p for p in range(0, 64, step))


def _half(and_level: int) -> tuple[int, int]:
    """``(s, mask)`` of a binary AND level (1 .. AND_LEVELS - 1): it combines the position ``p + s`` (high)
    with ``p`` (low), ``s = 2^l`` for tree level ``l = GROUP_LEVELS + 1 + and_level`` (the quad level took
    tree levels 2 and 3), at the positions ``p`` in ``mask`` (multiples of ``2^(l+1)``); the word keeps
    its order of significance and the result ends at bit 0."""
    level = GROUP_LEVELS + 1 + and_level
    return 1 << level, _mask_of(level)


# ---------------------------------------------------------------- local 4-bit groups
# A polynomial over the bits of R is {monomial (subset of group offsets): coefficient}, meaning the
# XOR of coefficient & monomial; a coefficient is a function of X's bits, kept symbolically as a set
# of AND-terms (each a frozenset of offsets o standing for ~X_o; the empty term is 1), XORed. The
# polynomials of a group's lt and eq are expanded once, at import; the dealt group products make
# every monomial a share.


def _sym_xor(p: dict, q: dict) -> dict:
    out = dict(p)
    for mono, coeff in q.items():
        out[mono] = out.get(mono, frozenset()) ^ coeff
    return {mono: c for mono, c in out.items() if c}


def _sym_and(p: dict, q: dict) -> dict:
    out: dict = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            coeff: frozenset = frozenset()
            for t1 in c1:
                for t2 in c2:
                    coeff = coeff ^ {t1 | t2}
            out = _sym_xor(out, {tuple(sorted(set(m1) | set(m2))): coeff})
    return out


def _group_polynomials() -> tuple[dict, dict]:
    one, empty = frozenset({frozenset()}), ()
    lt = [{(o,): frozenset({frozenset({o})})} for o in range(GROUP_BITS)]  # ~X_o R_o
    eq = [{empty: frozenset({frozenset({o})}), (o,): one} for o in range(GROUP_BITS)]  # ~X_o ^ R_o
    lt_hi, eq_hi = _sym_xor(lt[3], _sym_and(eq[3], lt[2])), _sym_and(eq[3], eq[2])
    lt_lo, eq_lo = _sym_xor(lt[1], _sym_and(eq[1], lt[0])), _sym_and(eq[1], eq[0])
    return _sym_xor(lt_hi, _sym_and(eq_hi, lt_lo)), _sym_and(eq_hi, eq_lo)


_LT_POLY, _EQ_POLY = _group_polynomials()


def _program(poly: dict) -> tuple:
    """A polynomial as ``((monomial, AND-term), ...)``, the term an offsets tuple (sorted). Each
    monomial of a 4-bit group's ``lt`` and ``eq`` has a single AND-term for coefficient."""
    if any(len(coeff) != 1 for coeff in poly.values()):
        raise AssertionError("a group polynomial's coefficient is one AND-term")
    return tuple((mono, tuple(sorted(next(iter(coeff))))) for mono, coeff in sorted(poly.items()))


_LT_PROGRAM, _EQ_PROGRAM = _program(_LT_POLY), _program(_EQ_POLY)
#: every AND-term the programs use and each one's prefixes, shortest first: ``term(t) = term(t[:-1]) & ~X_t[-1]``
_TERMS = tuple(sorted({t[:k] for prog in (_LT_PROGRAM, _EQ_PROGRAM) for _, t in prog for k in range(1, len(t) + 1)},
                      key=lambda t: (len(t), t)))
#: monomial -> row: singletons are rows of R_lo (R in the group layout), products rows of the dealt group products
_MONOMIAL_AT = {**{(o,): (0, o) for o in range(GROUP_BITS)},
                **{subset: (1, k) for k, subset in enumerate(GROUP_SUBSETS)}}


def _leaves(xhat: torch.Tensor, r4: torch.Tensor, products: torch.Tensor, first: bool):
    """Shares of ``(lt, eq)`` of every 4-bit group of ``X_lo`` vs ``R_lo``, locally, in the group layout
    (:func:`veil.mpc.comparison_material.to_group_layout`: 4 entries to a word, a group's result at its place in each).

    ``lt = lt3 ^ eq3 lt2 ^ eq3 eq2 lt1 ^ eq3 eq2 eq1 lt0`` and ``eq = eq3 eq2 eq1
    eq0`` with per bit ``lt_o = ~X_o R_o`` and ``eq_o = ~X_o ^ R_o``: polynomials
    in ``R``'s bits with public coefficients, whose monomials the dealer shared,
    evaluated from the programs compiled at import (straight-line word ops on
    a quarter of the entries' words: every bit of a group-layout word is used).
    """
    x4 = to_group_layout(xhat - 1)
    not_x = ~x4
    not_x[3] |= TOP_GROUP_BITS  # bit 63: X_lo and R_lo are both 0 there (equal)
    terms: dict = {}
    for t in _TERMS:
        terms[t] = terms[t[:-1]] & not_x[t[-1]] if len(t) > 1 else not_x[t[0]]
    r_lo = r4.clone()
    r_lo[3] &= ~TOP_GROUP_BITS
    words = (r_lo, products)
    scratch = torch.empty_like(not_x[0])  # each product w & c, XORed in (a fresh tensor per product costs more)

    def share(program: tuple) -> torch.Tensor:
        total = None
        for mono, term in program:
            if not mono:  # the public constant term, once
                if first:
                    if total is None:
                        total = terms[term].clone() if term else torch.full_like(scratch, -1)
                    else:
                        total ^= terms[term] if term else -1
                continue
            k, row = _MONOMIAL_AT[mono]
            w = words[k][row]
            if total is None:  # a new tensor: the XORs below change it in place
                total = w & terms[term] if term else w.clone()
            else:
                total ^= torch.bitwise_and(w, terms[term], out=scratch) if term else w
        return total

    lt = share(_LT_PROGRAM)
    # [x >= 0] = borrow xor R_hi xor X_hi xor 1: the top group's lt reaches the result through every AND level
    # as the high operand, so the other terms, XORed into it, come out with it (at the last level)
    top = r4[3] & TOP_GROUP_BITS
    if first:
        top ^= ~x4[3] & TOP_GROUP_BITS
    lt ^= top
    return lt, share(_EQ_PROGRAM)


# ---------------------------------------------------------------- AND levels


@party_function("cmp_leaves")
def _leaves_step(xhat: torch.Tensor, r4: torch.Tensor, products: torch.Tensor, first: bool) -> tuple:
    """Stores ``(lt, eq)`` of the 4-bit groups (:func:`_leaves`, group layout), the state of the quad level (it
    rides on that level's opening; computed once, not again when the level is finished)."""
    if not isinstance(first, bool):
        raise ValueError("cmp_leaves needs a boolean first")
    if not isinstance(xhat, torch.Tensor) or xhat.dtype != torch.int64:
        raise ValueError("cmp_leaves needs an int64 xhat")
    rows = group_rows(xhat.numel())
    for t, n, what in ((r4, GROUP_BITS, "R"), (products, len(GROUP_SUBSETS), "the group products")):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (n, rows):
            raise ValueError(f"cmp_leaves needs {what} as int64 of shape {(n, rows)} (the group layout)")
    if xhat.is_meta:  # run_party's shape inference
        return torch.empty(rows, dtype=xhat.dtype, device="meta"), torch.empty(rows, dtype=xhat.dtype, device="meta")
    return _leaves(xhat, r4, products, first)


# ---------------------------------------------------------------- binary AND levels

# The AND-level kernels below allocate one tensor per output and work in place on it after
# (each fresh int64 tensor costs ~3x an in-place pass: ~75 against ~20 us on 10^5 entries here).
# They never write to their inputs: the state and the dealt words are the party's stored objects,
# the opened word is the round's public value. Masking distributes over XOR, ``(x & m) ^ (y & m) =
# (x ^ y) & m``, and an AND with a masked operand is masked, so each output is masked once.


def _and_finish(lt, eq, opened, triple, products, level, first):
    """Shares of the next level's ``(lt, eq)`` from the opened ``(e, f1, f2)`` (masked by ``_unpack``):
    ``lt' = lt_hi ^ c1 ^ e b1 ^ a f1 (^ e f1)``, ``eq' = c2 ^ e b2 ^ a f2 (^ e f2)``, at the level's positions."""
    h, m = _half(level)
    e, f1, f2 = opened
    a, b1, b2 = triple
    c1, c2 = products
    z1 = lt >> h
    z1 ^= c1
    z1 &= m
    z2 = c2 & m
    z1 ^= e & b1
    z1 ^= a & f1
    z2 ^= e & b2
    z2 ^= a & f2
    if first:
        z1 ^= e & f1
        z2 ^= e & f2
    return z1, z2


def _and_word(lt, eq, a, b1, b2, level) -> torch.Tensor:
    """XOR shares of the masked operands ``eq_hi ^ a``, ``lt_lo ^ b1``, ``eq_lo ^ b2`` at the level's positions,
    packed in one word at offsets 0, 1, 2: the positions are multiples of 8, so the packing is XOR-compatible.
    At the last level (no ``eq`` after it) the third is ``lt_hi ^ rho``, ``b2`` being ``rho``."""
    h, m = _half(level)
    word = eq >> h
    word ^= a
    word &= m
    f1 = lt ^ b1
    f1 &= m
    f1 <<= 1
    word |= f1
    f2 = (lt >> h if level == LAST else eq) ^ b2
    f2 &= m
    f2 <<= 2
    word |= f2
    return word


#: entries per opened word at each binary AND level: its three operands take 3 bits at each of its positions,
#: one lane of 2^(l+1) bits apart (32 at the first binary level, 64 at the last), so floor(lane / 3) entries'
#: words share one word, each 3 bits further up. The bits never overlap: the packing is XOR-compatible (shares
#: pack to shares of the packed word) and reveals each opened bit once, in the same place for every party.
COMPACT = {level: (2 << (GROUP_LEVELS + 1 + level)) // 3 for level in range(1, AND_LEVELS)}


#: the shifts of a word's entries within a compacted word (entry i of a word at 3 i)
_LANE_SHIFTS = torch.arange(0, 3 * max(COMPACT.values()), 3, dtype=torch.int64).unsqueeze(1)


def _compact(word: torch.Tensor, level: int) -> torch.Tensor:
    """The level's words of ``word`` (entries' shape) packed ``COMPACT[level]`` to an int64: flat, entry
    ``i * rows + j`` at shift ``3 i`` of word ``j`` (the last row padded with zeros)."""
    k = COMPACT[level]
    flat = word.reshape(-1)
    rows = compact_words(level, flat.numel())
    if rows * k != flat.numel():
        flat = torch.cat([flat, flat.new_zeros(rows * k - flat.numel())])
    lanes = flat.view(k, rows) << _LANE_SHIFTS[:k].to(flat.device)
    return lanes.sum(0)  # the lanes' bits never overlap: their sum is their OR


def _expand(packed: torch.Tensor, level: int, like: torch.Tensor) -> torch.Tensor:
    """:func:`_compact`'s words back in ``like``'s shape (the level's bits only)."""
    k = COMPACT[level]
    n = like.numel()
    rows = compact_words(level, n)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int64 or tuple(packed.shape) != (rows,):
        raise ValueError(f"an opened word of comparison level {level} must be a flat int64 tensor of {rows} words")
    out = packed.unsqueeze(0) >> _LANE_SHIFTS[:k].to(packed.device)  # (on packed's device: meta in shape inference)
    out &= _half(level)[1] * 7  # bits p, p + 1, p + 2 at the level's positions p
    return out.view(-1)[:n].view(like.shape)


def compact_words(level: int, numel: int) -> int:
    """Words of a binary level's opened (compacted) word for ``numel`` compared entries."""
    return -(-numel // COMPACT[level])


def opened_words(level: int, numel: int) -> int:
    """Words an AND level opens for ``numel`` compared entries (the quad level: its packed variables)."""
    return quad_level.packed_words(numel) if level == 0 else compact_words(level, numel)


def _opened_word_layout(j: int, mask: torch.Tensor, args: tuple) -> tuple | None:
    """OPENED_LAYOUTS of ``cmp_and_open``: output 0 is the level's compacted word (its level is argument 4),
    masked by ``a``."""
    level = args[4] if len(args) > 4 else None
    if j or type(level) is not int or not 0 < level < AND_LEVELS:
        return None if j else ((-1,), torch.int64)  # (no binary level: no shape matches, the opening is refused)
    return (compact_words(level, mask.numel()),), torch.int64


OPENED_LAYOUTS["cmp_and_open"] = _opened_word_layout


def _unpack(w: torch.Tensor, level: int) -> tuple:
    _, m = _half(level)
    f1 = w >> 1
    f1 &= m
    f2 = w >> 2
    f2 &= m
    return w & m, f1, f2


def _check_state(state, first) -> None:
    if not isinstance(first, bool):
        raise ValueError("comparison steps need a boolean first")
    if not isinstance(state, list) or len(state) != 2:
        raise ValueError("comparison state must be [lt, eq]")


def _check_level(level) -> None:
    if type(level) is not int or not 0 < level < AND_LEVELS:
        raise ValueError(f"a binary comparison level must be an int in [1, {AND_LEVELS})")


@party_function("cmp_mask_values", openable=True)
def _mask_values(values: list, masks: list) -> tuple:
    """Round 1: shares of ``v_j + r_j``."""
    return tuple(v + r for v, r in zip(values, masks))


@party_function("cmp_and_open", openable=True, xor=True)
def _and_open(state: list, a, b1, b2, level: int, first: bool) -> tuple:
    """XOR shares of ``eq_hi ^ a``, ``lt_lo ^ b1``, ``eq_lo ^ b2``, packed in one word (a binary level)."""
    _check_state(state, first)
    _check_level(level)
    lt, eq = state
    word = _and_word(lt, eq, a, b1, b2, level)
    # one mask entry per compared entry: a smaller (broadcast) mask would hide several entries' bits with one
    if any(not isinstance(k, torch.Tensor) or k.shape != word.shape for k in (a, b1, b2)):
        raise ValueError("cmp_and_open: the AND masks must have the compared entries' shape")
    return (_compact(word, level),)


@party_function("cmp_and_next")
def _and_next(state: list, opened, a, b1, b2, c1, c2, level: int, first: bool) -> tuple:
    """Stores the next level's shares of ``(lt, eq)`` (``opened``: the level's compacted word)."""
    _check_state(state, first)
    _check_level(level)
    if opened.is_meta:  # run_party's shape inference (meta outputs: never a real tensor's uninitialized memory)
        return torch.empty_like(a, device="meta"), torch.empty_like(a, device="meta")
    lt, eq = state
    return _and_finish(lt, eq, _unpack(_expand(opened, level, a), level), (a, b1, b2), (c1, c2), level, first)


@party_function("cmp_select")
def _select(word, opened: list, masks: list, table, masks_tables: list, first: bool) -> tuple:
    """Shares of the arithmetic bit ``b = [x >= 0]`` and of ``v_j * b`` from the last AND level's opened word.

    The word holds (3 bits per entry) ``e = eq_hi ^ a``, ``f = lt_lo ^ b1`` and ``o = lt_hi ^ rho``, so ``b =
    lt_hi ^ (eq_hi & lt_lo) = o ^ u`` with ``u = rho ^ ((e ^ a) & (f ^ b1))``, which for public ``e, f`` is
    row ``e | f << 1`` of the dealt select table (:func:`veil.mpc.comparison_material.select_table`, arithmetic shares).
    Then ``b = o + (1 - 2o) u`` and ``v_j b = (v_j + r_j) b - r_j b`` with ``r_j b = o r_j + (1 - 2o) (r_j
    u)``, ``r_j u`` the same row of ``r_j`` times the table (``masks_tables``): local, one gather each."""
    if not isinstance(first, bool) or len(masks) != len(masks_tables) or len(opened) < len(masks):
        raise ValueError("cmp_select needs one mask and one table product per product and a boolean first")
    entries = tuple(table.shape[1:]) if isinstance(table, torch.Tensor) else None
    if entries is None or any(not isinstance(t, torch.Tensor) or t.dtype != torch.int64
                              or tuple(t.shape) != (SELECT_CASES, *entries) for t in (table, *masks_tables)):
        raise ValueError(f"cmp_select needs int64 select tables of {SELECT_CASES} rows of the entries' shape")
    if word.is_meta:  # run_party's shape inference (meta outputs: never a real tensor's uninitialized memory)
        return tuple(torch.empty(entries, dtype=table.dtype, device="meta") for _ in range(1 + len(masks)))
    opened_bits = _expand(word, LAST, table[0])  # e | f << 1 | o << 2 per entry (refuses all but the word)
    row = (opened_bits & 3).unsqueeze(0)
    o = opened_bits >> 2
    sign = o * -2
    sign += 1
    bit = torch.gather(table, 0, row).squeeze(0)
    bit *= sign
    if first:
        bit += o
    products = []
    for v_hat, r, r_table in zip(opened, masks, masks_tables):  # v_hat * bit - r * b, r * b local
        p = v_hat * bit
        p.addcmul_(sign, torch.gather(r_table, 0, row).squeeze(0), value=-1)
        products.append(p.addcmul_(o, r, value=-1))
    return (bit, *products)


def sign_select(d: Shares, extras: Sequence[Shares], provider: Provider,
                products: bool = True) -> tuple[dict, list[dict]]:
    """Shares of ``[d > 0]`` and of ``v * [d > 0]`` for ``v`` in ``(d, *extras)`` (4 rounds).

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
    opened = open_at_parties("cmp_mask_values", {p: (values[p][:lay.n_masks], masks[p]) for p in parties})
    word, _ = _circuit(mats, lay, shape, {p: opened[p][0] for p in parties})
    return _select_all(word, {p: opened[p][:n_values] for p in parties}, mats, lay, range(n_values))


@party_function("cmp_trunc_finish")
def _trunc_finish_unshifted(c, q_i, g_i, divisor: int, first: bool):
    """:func:`truncate_relu`'s truncation at a party that opened ``c = y + r`` itself (peer openings):
    ``trunc_finish`` of ``c + K`` (the star adds ``K`` where it opens ``c``)."""
    if type(divisor) is not int or divisor <= 1:
        raise ValueError("cmp_trunc_finish needs an integer divisor > 1")
    return PARTY_FUNCTIONS["trunc_finish"](c + shift_for(divisor), q_i, g_i, divisor=divisor, first=first)


def truncate_relu(y: Shares, divisor: int, provider: Provider) -> dict:
    """Shares of ``max(y / divisor, 0)`` (truncation, then ReLU) in 4 rounds instead of 1 + 4.

    See :func:`truncate_relu_with_bit`, which also returns the shared bit ``[y > 0]``.
    """
    return truncate_relu_with_bit(y, divisor, provider)[0]


def truncate_relu_with_bit(y: Shares, divisor: int, provider: Provider) -> tuple[dict, dict]:
    """Shares of ``max(y / divisor, 0)`` and of the 0/1 bit ``[y > 0]`` (ReLU's derivative) in 4 rounds.

    The comparison runs on ``y`` itself (``[y > 0]``): round 1 opens ``y + r_0``
    (the comparison's mask) and ``y + r_t`` (a truncation pair's, ``c = y + r_t
    + K`` after opening) in one step; the truncated ``z`` is then local
    (:func:`veil.mpc.truncation.finish_truncation`, or ``cmp_trunc_finish`` at every
    party when the parties opened ``c`` among themselves), and ``z + r_1`` is opened
    with the quad level (``cmp_quad_open_values``), ready for the final
    local select ``z * [y > 0]``. That equals ``max(z, 0)`` but at ``y = 0``
    (``z`` in {0, 1}: 0 instead of ``z``), within truncation's own one ulp:
    ``y > 0`` gives ``z >= 0``, ``y < 0`` gives ``z <= 0``.

    Range: truncation's, ``|y| <= 2^62 - divisor``; every opened value is
    uniformly masked by a fresh dealt field (``r_0``, ``r_t``, the AND masks,
    ``r_1``, ``rho``).
    """
    parties = list(y.keys())
    shape = tuple(y[parties[0]].shape)
    pairs = provider.truncation_pairs(shape, divisor, parties)
    lay = ComparisonLayout(2, first_product=1)  # r_0 masks y for the comparison, r_1 masks z for the product
    material = provider.comparison_material(shape, 2, parties, first_product=1)
    mats = {p: list(material[p]) for p in parties}
    opened = open_at_parties("cmp_mask_values", {p: ([y[p], y[p]], [mats[p][0], pairs[p][0]]) for p in parties})
    c = opened[parties[0]][1]
    if runtime_of(c) is not None:  # a peer opening: every party holds c and truncates its own share
        z = {p: run_party("cmp_trunc_finish", opened[p][1], pairs[p][1], pairs[p][2], divisor=divisor,
                          first=(i == 0)) for i, p in enumerate(parties)}
    else:
        z = finish_truncation(c + shift_for(divisor), pairs, divisor)
    late = {p: ([z[p]], [mats[p][1]]) for p in parties}
    word, z_hat = _circuit(mats, lay, shape, {p: opened[p][0] for p in parties}, late)
    bits, (out,) = _select_all(word, z_hat, mats, lay, [1])
    return out, bits


def _circuit(mats: dict, lay: ComparisonLayout, shape: tuple, xhat: dict,
             late: dict | None = None) -> tuple[dict, dict]:
    """The AND levels: ``(word, late_opened)``, each party -> its copy (public tensors in a star opening,
    handles on the party in a peer opening), ``word`` the last level's opened word, from which the select
    computes ``b = [x >= 0]`` (``x = xhat - r_0 - 1``). ``late``: party -> ``(values, masks)`` opened with
    the quad level.

    Nothing opened here is needed by the orchestrator (the results are shares): between parties that open
    among themselves (:func:`veil.mpc.party.open_at_parties`) every round goes party to party."""
    parties = list(mats)
    first = {p: i == 0 for i, p in enumerate(parties)}
    # (lt, eq) of the 4-bit groups, local: the step rides on the quad level's opening
    state = {p: list(run_party("cmp_leaves", xhat[p], mats[p][lay.r_xor], mats[p][lay.group_products],
                               first=first[p])) for p in parties}
    # the quad level: tree levels 2 and 3 in one round
    (q_mask,), (q_products,) = lay.level_masks(0), lay.level_products(0)
    late_opened: dict = {}
    if late:
        opened = open_at_parties("cmp_quad_open_values", {p: (state[p], mats[p][q_mask], *late[p]) for p in parties})
        late_opened = {p: opened[p][1:] for p in parties}
    else:
        opened = open_at_parties("cmp_quad_open", {p: (state[p], mats[p][q_mask]) for p in parties})
    # the next level's opening follows at every party: the step rides on it
    state = {p: list(run_party("cmp_quad_next", state[p], opened[p][0], mats[p][q_mask], mats[p][q_products],
                               list(shape), first=first[p])) for p in parties}
    for level in range(1, AND_LEVELS):
        trip = {p: [mats[p][i] for i in lay.level_masks(level)] for p in parties}
        opened = open_at_parties("cmp_and_open", {p: (state[p], *trip[p], level, first[p]) for p in parties})
        word = {p: opened[p][0] for p in parties}
        if level == LAST:
            break
        prods = {p: [mats[p][i] for i in lay.level_products(level)] for p in parties}
        state = {p: list(run_party("cmp_and_next", state[p], word[p], *trip[p], *prods[p], level=level,
                                   first=first[p])) for p in parties}
    return word, late_opened


def _select_all(word: dict, opened: dict, mats: dict, lay: ComparisonLayout,
                which: Sequence[int]) -> tuple[dict, list[dict]]:
    """``(bits, products)`` from the last AND level's opened word (party -> its copy): ``opened``, party ->
    the opened ``v_j + r_j`` for the masks ``j`` in ``which``."""
    parties = list(mats)
    outs = {p: run_party("cmp_select", word[p], list(opened[p]), [mats[p][j] for j in which],
                         mats[p][lay.table], [mats[p][lay.masks_table(j)] for j in which], first=i == 0)
            for i, p in enumerate(parties)}
    bits = {p: outs[p][0] for p in parties}
    return bits, [{p: outs[p][1 + j] for p in parties} for j in range(len(which))]
