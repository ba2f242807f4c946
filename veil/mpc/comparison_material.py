"""The dealt material of the bitwise comparison (:mod:`veil.mpc.bit_comparison`): the ``comparison`` recipe.

Its layout (which field is where, :class:`ComparisonLayout`), the group layout the local 4-bit groups
compute in (:func:`to_group_layout`), the dealer's products of mask bits (:func:`group_products`,
:func:`quad_products`), the last level's :func:`select_table`, and which uniform fields each derived field
comes from (:func:`comparison_sources`, for the parties' monitor). :mod:`veil.mpc.material` registers the
recipe with the others.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch

from veil.mpc.errors import ProviderError

#: the bitwise comparison (:mod:`veil.mpc.bit_comparison`) works on 64-bit words: the first
#: ``GROUP_LEVELS`` levels of its comparison tree (4-bit groups) are local, thanks to dealt
#: products of the mask's bits; the other four tree levels take ``AND_LEVELS`` rounds: the first
#: round merges four groups at once (the *quad* level: tree levels 2 and 3), then one round per level
GROUP_BITS = 4
GROUP_LEVELS = 2
AND_LEVELS = 3
#: the subsets of a 4-bit group's positions with at least 2 members (the dealt products of R's bits)
GROUP_SUBSETS: tuple = tuple(
    tuple(o for o in range(GROUP_BITS) if m >> o & 1) for m in range(1 << GROUP_BITS) if bin(m).count("1") >= 2
)
#: the top group's bits (bit 63 of an entry's word and of R is compared apart: the sign)
TOP_GROUP_BITS = -(1 << 60)  # 0xF000000000000000 as an int64

#: the quad level's variables, the rows of its packed layout (:func:`quad_rows`): ``eq`` of the quad's groups
#: 0 .. 3 (rows 0 .. 3), then ``lt`` of groups 0 .. 2 (rows 4 .. 6); the quad's ``lt = l3 ^ e3 l2 ^ e3 e2 l1 ^
#: e3 e2 e1 l0`` and ``eq = e3 e2 e1 e0``: the monomials below, as rows (``l3`` enters linearly, unmasked)
QUAD_VARS = 7
QUAD_LT_MONOMIALS: tuple = ((3, 6), (3, 2, 5), (3, 2, 1, 4))
QUAD_EQ_MONOMIAL: tuple = (3, 2, 1, 0)
#: entries per word of the packed layout: one bit per entry and quad (bits ``16 q ..`` of the comparison's word)
QUAD_ENTRIES = 16


def monomial_subsets(monomial: tuple) -> list:
    """Every subset of a monomial's variables (a tuple of them), the empty one included."""
    return [tuple(v for k, v in enumerate(monomial) if m >> k & 1) for m in range(1 << len(monomial))]


#: the products of the quad level's mask bits a dealer shares (XOR): every subset of at least 2 variables of a
#: monomial above, so that each monomial of masked variables expands into dealt shares (22 subsets)
QUAD_SUBSETS: tuple = tuple(sorted({tuple(sorted(s)) for mono in (*QUAD_LT_MONOMIALS, QUAD_EQ_MONOMIAL)
                                    for s in monomial_subsets(mono) if len(s) >= 2}))


def quad_rows(numel: int) -> int:
    """Words per row of the quad level's packed layout for ``numel`` compared entries."""
    return -(-numel // QUAD_ENTRIES)


def group_rows(numel: int) -> int:
    """Words per row of the group layout (:func:`to_group_layout`, 4 entries to a word) for ``numel`` entries."""
    return 4 * quad_rows(numel)


#: a 4x4 bit transpose within each group across four words, as two rounds of swaps (shift, mask, word pairs)
_GROUP_SWAPS = ((1, 0x5555555555555555, ((0, 1), (2, 3))), (2, 0x3333333333333333, ((0, 2), (1, 3))))


def to_group_layout(word: torch.Tensor) -> torch.Tensor:
    """Entries' words in the *group layout*, ``(4, group_rows)``: bit ``4 g + u`` of row ``o``, word ``j`` is
    bit ``4 g + o`` of entry ``u * group_rows + j`` (zeros past the last entry). A 4-bit group's four bits
    then sit in four rows at one place, every bit of a word in use: the comparison's local groups compute
    on a quarter of the words (each of an entry's words uses one bit of each group)."""
    flat = word.reshape(-1)
    rows = group_rows(flat.numel())
    out = torch.zeros(4 * rows, dtype=flat.dtype, device=flat.device)
    out[:flat.numel()] = flat
    out = out.view(4, rows)
    for shift, mask, pairs in _GROUP_SWAPS:
        for i, k in pairs:
            t = ((out[i] >> shift) ^ out[k]) & mask
            out[k] ^= t
            out[i] ^= t << shift
    return out


#: most values multiplied by one comparison bit (argmax uses 2; 0 = the bit alone)
MAX_COMPARISON_VALUES = 16


def group_products(r4: torch.Tensor) -> torch.Tensor:
    """The dealer's products of ``R``'s bits within each 4-bit group, from ``R`` in the group layout: row ``k``
    is the AND of the rows ``o`` in subset ``k`` of :data:`GROUP_SUBSETS` (bit 63, the sign, left out)."""
    low = r4.clone()
    low[3] &= ~TOP_GROUP_BITS
    return _row_products(low, GROUP_SUBSETS)


def _row_products(rows: torch.Tensor, subsets: tuple) -> torch.Tensor:
    out = torch.empty((len(subsets), *rows.shape[1:]), dtype=rows.dtype)
    for k, subset in enumerate(subsets):
        torch.bitwise_and(rows[subset[0]], rows[subset[1]], out=out[k])
        for v in subset[2:]:
            out[k] &= rows[v]
    return out


def quad_products(mask: torch.Tensor) -> torch.Tensor:
    """The dealer's products of the quad level's mask bits: row ``k`` is the AND of the rows of ``mask``
    (``QUAD_VARS`` rows, packed layout) in subset ``k`` of :data:`QUAD_SUBSETS`."""
    return _row_products(mask, QUAD_SUBSETS)


class ComparisonLayout(NamedTuple):
    """Field positions in one item of ``comparison`` material (``n_values`` values).

    Uniform fields: the arithmetic masks ``r_j`` (``max(n_values, 1)`` of
    them), then the AND levels' XOR masks (:meth:`level_masks`): the quad
    level's mask of its 7 variables (``(QUAD_VARS, quad_rows)``), and per
    binary level ``a, b1, b2`` of two AND triples sharing their left operand;
    at the last level ``b2`` is ``rho``, the mask of the comparison's own top
    bit (only bit 0 of the last level's words counts). Derived fields: ``R``
    (``r_0`` XOR-shared in the group layout, :func:`to_group_layout`: ``(4,
    group_rows)``), the group products of ``R``'s bits (:func:`group_products`,
    XOR, ``(11, group_rows)``), the quad products (:func:`quad_products`, XOR,
    ``(22, quad_rows)``), per binary level but the last ``c1 = a & b1`` and
    ``c2 = a & b2`` (XOR), the last level's :func:`select_table` (arithmetic,
    ``SELECT_CASES`` rows of the entries' shape), and ``r_j`` times it
    (arithmetic, same shape) for the values multiplied by the bit, ``j >= first_product`` (1: ``r_0``
    masks a compared value that is not multiplied, as in
    :func:`veil.mpc.bit_comparison.truncate_relu`).
    """

    n_values: int
    first_product: int = 0

    @property
    def n_masks(self) -> int:
        return max(self.n_values, 1)

    def level_masks(self, level: int) -> tuple:
        """Positions of AND level ``level``'s masks: the quad level's one (0), ``(a, b1, b2)`` after."""
        if not 0 <= level < AND_LEVELS:
            raise ValueError(f"comparison AND levels are 0 .. {AND_LEVELS - 1}")
        if level == 0:
            return (self.n_masks,)
        base = self.n_masks + 1 + 3 * (level - 1)
        return base, base + 1, base + 2

    @property
    def rho(self) -> int:
        return self.level_masks(AND_LEVELS - 1)[2]

    @property
    def n_uniform(self) -> int:
        return self.n_masks + 1 + 3 * (AND_LEVELS - 1)

    @property
    def r_xor(self) -> int:
        return self.n_uniform

    @property
    def group_products(self) -> int:
        return self.n_uniform + 1

    def level_products(self, level: int) -> tuple:
        """Positions of an AND level's dealt XOR products: the quad products (level 0), ``c1, c2`` (the binary
        levels but the last)."""
        base = self.n_uniform + 2
        if level == 0:
            return (base,)
        if not 0 < level < AND_LEVELS - 1:
            raise ValueError("the last AND level has no dealt XOR products")
        base += 1 + 2 * (level - 1)
        return base, base + 1

    @property
    def table(self) -> int:
        """Position of the :func:`select_table` (arithmetic shares)."""
        return self.n_uniform + 3 + 2 * (AND_LEVELS - 2)

    def masks_table(self, j: int) -> int:
        """Position of ``r_j`` times the :func:`select_table`, ``first_product <= j < n_values``."""
        if not self.first_product <= j < self.n_values:
            raise ValueError(f"value {j} is not multiplied by this comparison's bit")
        return self.table + 1 + j - self.first_product

    @property
    def n_fields(self) -> int:
        return self.table + 1 + self.n_values - self.first_product

    @property
    def xor(self) -> frozenset:
        """Fields that are XOR shares."""
        return frozenset(range(self.n_masks, self.table))


#: rows of the last AND level's select table: one per value of its first two opened bits
SELECT_CASES = 4


def select_table(a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """The dealer's table that turns the last AND level's opened bits into the comparison's arithmetic bit
    (:func:`veil.mpc.bit_comparison._select`), from 0/1 tensors of the level's mask bits ``a``, ``b`` (=
    ``b1``) and ``rho``: row ``k = e | f << 1`` holds ``rho xor ((e xor a) & (f xor b))``."""
    return torch.stack([rho ^ (((k & 1) ^ a) & ((k >> 1) ^ b)) for k in range(SELECT_CASES)])


def comparison_sources(spec) -> list:
    """Per derived field of a ``comparison`` item, the positions of the uniform fields it is computed from
    (:func:`veil.mpc.material.derived_sources`)."""
    _, lay = _comparison_layout(spec)
    n_values, first_product = lay
    last = lay.level_masks(AND_LEVELS - 1)
    out: list = [(0,)] * 2  # R and the group products: r_0's bits
    out += [lay.level_masks(0)]  # the quad products
    for level in range(1, AND_LEVELS - 1):
        out += [lay.level_masks(level)] * 2
    return out + [last] + [(j, *last) for j in range(first_product, n_values)]


def comparison_spec(shape: Sequence[int], n_values: int, first_product: int = 0) -> tuple:
    """The ``comparison`` recipe's spec (the default ``first_product`` left out: one spec per material)."""
    base = (tuple(int(s) for s in shape), int(n_values))
    return base + (int(first_product),) if first_product else base


def _comparison_layout(spec) -> tuple[tuple, ComparisonLayout]:
    """``(shape, layout)`` of a validated ``comparison`` spec."""
    if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3):
        raise ProviderError("comparison spec must be (shape, n_values) or (shape, n_values, first_product)")
    shape, n_values = tuple(int(v) for v in spec[0]), spec[1]
    if type(n_values) is not int or not 0 <= n_values <= MAX_COMPARISON_VALUES:
        raise ProviderError(f"comparison n_values must be an int in [0, {MAX_COMPARISON_VALUES}], got {n_values!r}")
    first_product = spec[2] if len(spec) == 3 else 0
    if type(first_product) is not int or not 0 <= first_product <= min(n_values, 1):
        raise ProviderError(f"comparison first_product must be 0, or 1 with values, got {first_product!r}")
    return shape, ComparisonLayout(n_values, first_product)


def comparison_recipe(spec) -> tuple[list, list, Callable]:
    """The ``comparison`` recipe (:func:`veil.mpc.material.recipe`): uniform shapes, derived shapes, derive."""
    shape, lay = _comparison_layout(spec)
    n_values, first_product = lay

    def derive(u: list, g: torch.Generator) -> list:
        # R: r_0, XOR-shared in the group layout, and the group products of its low 63 bits (bit 63: the sign)
        r4 = to_group_layout(u[0])
        out = [r4, group_products(r4)]
        out.append(quad_products(u[lay.level_masks(0)[0]]))
        for level in range(1, AND_LEVELS - 1):
            a, b1, b2 = (u[i] for i in lay.level_masks(level))
            out += [a & b1, a & b2]
        table = select_table(*(u[i] & 1 for i in lay.level_masks(AND_LEVELS - 1)))
        return out + [table] + [u[j] * table for j in range(first_product, n_values)]

    rows = quad_rows(math.prod(shape))
    uniform = [shape] * lay.n_uniform
    uniform[lay.level_masks(0)[0]] = (QUAD_VARS, rows)
    derived = [(4, 4 * rows), (len(GROUP_SUBSETS), 4 * rows), (len(QUAD_SUBSETS), rows)]  # R, group and quad products
    derived += [shape] * (2 * (AND_LEVELS - 2))
    tables = 1 + n_values - first_product  # the select table and its products, SELECT_CASES rows each
    return uniform, derived + [(SELECT_CASES, *shape)] * tables, derive
