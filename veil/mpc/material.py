"""Recipes for correlated randomness, shared by every dealer.

A recipe says which fields of one item are *uniform* ring elements (a dealer
may let each party derive its share of them from a seed) and how the other,
*derived*, fields follow from them (their shares must be sent, at least to
one party). Items are returned to protocols as a tuple
``uniform fields + derived fields``:

* ``beaver`` ``(op, shape_a, shape_b, op_kwargs)``: ``(a, b, c = op(a, b))``
  [Beaver 1991].
* ``truncation`` ``(shape, divisor)``: ``(r, floor(r / divisor), g)`` with
  ``r`` read unsigned and ``g`` its wrap correction (:mod:`veil.mpc.truncation`).
* ``zero`` ``(shape,)``: ``(0,)``, fresh random shares of zero (``refresh``).
* ``beaver_mac`` ``(key_id, op, shape_a, shape_b, op_kwargs)``: a SPDZ2k
  triple ``(a, b, c, alpha*a, alpha*b, alpha*c)`` mod 2^128 under the MAC
  key registered as ``key_id`` at this provider (:mod:`veil.mpc.mac`); every
  field is 128-bit, stored as two int64 fields ``(lo, hi)`` (12 fields).
* ``truncation_mac`` ``(key_id, shape, divisor)``: a SPDZ2k truncation pair
  ``(r, q, g, alpha*r, alpha*q, alpha*g)`` mod 2^128, likewise 12 fields.
* ``zero_mac`` ``(shape,)``: 128-bit shares of 0 and of its MAC ``alpha*0 = 0``
  (``refresh`` of authenticated shares; no key needed), 4 fields.
* ``comparison_mac`` ``(key_id, shape)``: an authenticated random ``r`` with
  its bits (an edaBit, :mod:`veil.mpc.mac_comparison`): ``(r, bits, products,
  alpha*r, alpha*bits, alpha*products)`` mod 2^128, ``bits`` of shape ``(64,
  *shape)`` holding the 64 low bits of ``r`` as 0/1 ring elements,
  ``products`` of shape ``(11, 16, *shape)`` the products of each 4-bit
  group's bits over the subsets :data:`GROUP_SUBSETS`; 12 fields.

Wide (128-bit) kinds are in :data:`WIDE_KINDS`: providers split, sum and
correct their shares with :func:`split_wide`, :func:`sum_wide` and
:func:`last_shares_wide` (carries between the limbs).

* ``comparison`` ``(shape, n_values)``: the material of the bitwise
  comparison (:mod:`veil.mpc.bit_comparison`; layout in
  :class:`ComparisonLayout`). Some of its fields are XOR (boolean) shares:
  :func:`xor_fields` names them, and dealers combine and split those by XOR.

* ``fixed_mask`` ``(fixed_id, shape)``: ``(b,)``, the fixed mask of a constant
  operand (:mod:`veil.mpc.fixed_operand`), uniform but dealt as a *derived*
  field (it never masks an opening of a protected value) and kept at the
  provider under ``fixed_id`` (:data:`FIXED_MASKS`); once per id.
* ``fixed_beaver`` ``(fixed_id, op, shape_a, shape_b, op_kwargs)``: ``(a, c =
  op(a, b))`` for the fixed ``b`` kept under ``fixed_id``: a Beaver triple
  whose right operand's mask is opened once per model, not per product.

FSS comparison material (masks and DCF keys) is not a recipe: see
:mod:`veil.mpc.fss.material`.
"""

from __future__ import annotations

import math
import secrets
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from veil.mpc.errors import ProviderError
from veil.mpc.ring import DTYPE, bilinear, random_ring
from veil.mpc.sharing import split

Shape = tuple
Derive = Callable[[list, torch.Generator], list]


def _shape(s: Sequence[int]) -> Shape:
    return tuple(int(v) for v in s)


def _beaver(spec) -> tuple[list, list, Derive]:
    op, shape_a, shape_b, op_kwargs = spec
    fn = bilinear(op)
    shape_a, shape_b = _shape(shape_a), _shape(shape_b)
    shape_c = _product_shape(op, shape_a, shape_b, op_kwargs)
    return [shape_a, shape_b], [shape_c], lambda u, g: [fn(u[0], u[1], **dict(op_kwargs))]


#: (op, shape a, shape b, op kwargs) -> the product's shape: a meta op costs 0.1-0.5 ms and a dealing asks the
#: recipe several times (the dealer, every party's expansion, the layout); bounded like party.py's step cache
_PRODUCT_SHAPES: dict = {}


def _product_shape(op: str, shape_a: Shape, shape_b: Shape, op_kwargs) -> Shape:
    try:
        key = (op, shape_a, shape_b, tuple(op_kwargs.items() if isinstance(op_kwargs, dict) else op_kwargs))
        hash(key)
    except TypeError:  # an unhashable kwarg value (a list): not cached
        key = None
    shape = _PRODUCT_SHAPES.get(key) if key is not None else None
    if shape is None:
        meta = bilinear(op)(torch.empty(shape_a, dtype=DTYPE, device="meta"),
                            torch.empty(shape_b, dtype=DTYPE, device="meta"), **dict(op_kwargs))
        shape = tuple(meta.shape)
        if key is not None:
            if len(_PRODUCT_SHAPES) >= 512:
                _PRODUCT_SHAPES.clear()
            _PRODUCT_SHAPES[key] = shape
    return shape


def _truncation(spec) -> tuple[list, list, Derive]:
    from veil.mpc.truncation import TRUNCATION_BOUND, floor_div_unsigned, wrap_correction

    shape, divisor = _shape(spec[0]), int(spec[1])
    if not 1 < divisor <= TRUNCATION_BOUND:
        raise ProviderError(f"truncation divisor must be in [2, 2^62], got {divisor}")
    return [shape], [shape, shape], lambda u, g: [floor_div_unsigned(u[0], divisor), wrap_correction(u[0], divisor)]


def _zero(spec) -> tuple[list, list, Derive]:
    """Fresh additive shares of zero (re-randomizing a sharing: ``refresh``)."""
    shape = _shape(spec[0])
    return [], [shape], lambda u, g: [torch.zeros(shape, dtype=DTYPE)]


#: (requester scope, key id) -> SPDZ2k MAC key (0-dim int64, read unsigned: uniform in Z/2^64), held by
#: the crypto provider's process only (filled by ``register_mac_key``; parties never call a derive).
MAC_KEYS: dict[tuple, torch.Tensor] = {}

#: Whose provider-held secrets (MAC keys, fixed masks) a dealing may use and register: the provider
#: worker sets it to the requesting session around each request (:func:`provider_scope`; None in-process).
#: The ids travel to every party inside material specs, so a global table would let a party's owner,
#: with any session at the provider, deal itself triples of another session's key or fixed mask (and
#: so learn the MAC key or the served weights) or overwrite them.
_SCOPE: ContextVar = ContextVar("veil_provider_scope", default=None)


@contextmanager
def provider_scope(scope: str | None) -> Iterator[None]:
    """Runs a dealing or key registration on behalf of ``scope`` (a provider session id)."""
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def drop_provider_scope(scope: str | None) -> int:
    """Forgets the MAC keys and fixed masks ``scope`` registered (its session ended); returns how many."""
    dropped = 0
    for table in (MAC_KEYS, FIXED_MASKS):
        for key in [k for k in table if k[0] == scope]:
            table.pop(key, None)
            dropped += 1
    return dropped

#: kinds whose fields are 128-bit (SPDZ2k) elements, each stored as two int64
#: fields ``(lo, hi)``: they must be split, summed and corrected mod 2^128
#: (:func:`split_wide`, :func:`sum_wide`, :func:`last_shares_wide`), not limb by limb.
WIDE_KINDS = frozenset({"beaver_mac", "truncation_mac", "zero_mac", "comparison_mac"})


def register_mac_key(key_id: str, alpha: torch.Tensor) -> None:
    """Stores a MAC key at the provider (see :mod:`veil.mpc.mac`)."""
    if not isinstance(key_id, str) or not isinstance(alpha, torch.Tensor) or alpha.dtype != DTYPE or alpha.dim():
        raise ProviderError("a MAC key is a string id and a 0-dim int64 tensor")
    MAC_KEYS[(_SCOPE.get(), key_id)] = alpha.clone()


def _alpha(key_id: str) -> tuple:
    from veil.mpc import ring128

    alpha = MAC_KEYS.get((_SCOPE.get(), key_id))
    if alpha is None:
        raise ProviderError(f"unknown MAC key {key_id!r} at this crypto provider")
    return ring128.lift_unsigned(alpha)


def _beaver_mac(spec) -> tuple[list, list, Derive]:
    """SPDZ2k triple: uniform 128-bit ``a``, ``b``; ``c = op(a, b) mod 2^128`` and the three MACs."""
    from veil.mpc import ring128

    key_id, op, shape_a, shape_b, op_kwargs = spec
    _, (shape_c,), _ = _beaver((op, shape_a, shape_b, op_kwargs))
    shape_a, shape_b, fn = _shape(shape_a), _shape(shape_b), bilinear(op)

    def derive(u: list, g: torch.Generator) -> list:
        alpha = _alpha(key_id)
        a, b = (u[0], u[1]), (u[2], u[3])
        c = ring128.bilinear(fn, a, b, **dict(op_kwargs))
        return [*c, *ring128.mul(alpha, a), *ring128.mul(alpha, b), *ring128.mul(alpha, c)]

    return [shape_a] * 2 + [shape_b] * 2, [shape_c] * 2 + [shape_a] * 2 + [shape_b] * 2 + [shape_c] * 2, derive


def _truncation_mac(spec) -> tuple[list, list, Derive]:
    """SPDZ2k truncation pair: uniform 128-bit ``r~``; ``q``, ``g`` of its low 64 bits
    (:mod:`veil.mpc.truncation`) lifted to 128 bits; the three MACs."""
    from veil.mpc import ring128

    key_id, shape, divisor = spec
    _, _, derive_qg = _truncation((shape, divisor))
    shape = _shape(shape)

    def derive(u: list, g: torch.Generator) -> list:
        alpha = _alpha(key_id)
        r = (u[0], u[1])
        q, w = (ring128.lift_unsigned(t) for t in derive_qg([u[0]], g))
        return [*q, *w, *ring128.mul(alpha, r), *ring128.mul(alpha, q), *ring128.mul(alpha, w)]

    return [shape] * 2, [shape] * 10, derive


def _zero_mac(spec) -> tuple[list, list, Derive]:
    """128-bit shares of zero for the value and the MAC limbs (``alpha * 0 = 0``: no key)."""
    shape = _shape(spec[0])
    return [], [shape] * 4, lambda u, g: [torch.zeros(shape, dtype=DTYPE) for _ in range(4)]


#: bits of an edaBit: the value ring Z/2^64 of :mod:`veil.mpc.mac`
EDABIT_BITS = 64
#: the authenticated comparison's local first levels: 4-bit groups (as the semi-honest circuit's)
EDABIT_GROUPS = EDABIT_BITS // 4


def _comparison_mac(spec) -> tuple[list, list, Derive]:
    """edaBit with group products: uniform 128-bit ``r~``; the 64 bits of its low limb as
    128-bit 0/1 values (stacked on a new first dimension); per 4-bit group the products of
    its bits over each subset in :data:`GROUP_SUBSETS` (so that the first two levels of the
    comparison tree are local); the MACs of all three."""
    from veil.mpc import ring128

    if not isinstance(spec, (tuple, list)) or len(spec) != 2:
        raise ProviderError("comparison_mac spec must be (key_id, shape)")
    key_id, shape = spec
    shape = _shape(shape)
    bits_shape = (EDABIT_BITS,) + shape
    products_shape = (len(GROUP_SUBSETS), EDABIT_GROUPS) + shape

    def derive(u: list, g: torch.Generator) -> list:
        alpha = _alpha(key_id)
        r = (u[0], u[1])
        raw = torch.stack([(u[0] >> i) & 1 for i in range(EDABIT_BITS)])
        grouped = raw.view((EDABIT_GROUPS, GROUP_BITS) + shape)
        prods = []
        for subset in GROUP_SUBSETS:
            prod = grouped[:, subset[0]]
            for o in subset[1:]:
                prod = prod & grouped[:, o]
            prods.append(prod)
        prods = torch.stack(prods)

        def times_alpha(bit: torch.Tensor) -> tuple:  # alpha * b for b in {0, 1}: below 2^64, no product needed
            return alpha[0] * bit, torch.zeros_like(bit)

        bits, products = ring128.lift_unsigned(raw), ring128.lift_unsigned(prods)
        return [*bits, *products, *ring128.mul(alpha, r), *times_alpha(raw), *times_alpha(prods)]

    derived = [bits_shape] * 2 + [products_shape] * 2 + [shape] * 2 + [bits_shape] * 2 + [products_shape] * 2
    return [shape] * 2, derived, derive


def _pairs(fields: list) -> list:
    return [(fields[i], fields[i + 1]) for i in range(0, len(fields), 2)]


def split_wide(fields: list, n: int, random: Callable) -> list[list]:
    """Per field, ``n`` shares of a wide kind's field values (mod 2^128 per (lo, hi) pair)."""
    from veil.mpc import ring128

    out = []
    for pair in _pairs(fields):
        shares = ring128.split(pair, n, random)
        out += [[s[0] for s in shares], [s[1] for s in shares]]
    return out


def sum_wide(shares_per_field: list[list]) -> list:
    """Field values from every party's shares of a wide kind's fields."""
    from veil.mpc import ring128

    out = []
    for lo, hi in _pairs(shares_per_field):
        out += list(ring128.total(zip(lo, hi)))
    return out


def last_shares_wide(values: list, others_per_field: list[list]) -> list:
    """The last party's shares: ``value - sum(others)`` mod 2^128 per (lo, hi) pair."""
    from veil.mpc import ring128

    out = []
    for value, (lo, hi) in zip(_pairs(values), _pairs(others_per_field)):
        out += list(ring128.sub(value, ring128.total(zip(lo, hi))) if lo else value)
    return out


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
#: positions that are multiples of 4 (one bit per group)
GROUP_MASK = sum(1 << p for p in range(0, 64, GROUP_BITS))
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


def derived_sources(kind: str, spec) -> list | None:
    """Per derived field of ``kind``, the positions (in its item) of the uniform fields it is computed from;
    None where not tracked. A party's monitor lets a computation use a derived field only as the end of
    those masks: they mask no opening after it (a bit of ``c1 = a & b1`` or of the select table, moved
    into a state beside the opening of ``a`` or ``rho``, would cancel against it: red team)."""
    if kind != "comparison":
        return None
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
    shape, n_values = _shape(spec[0]), spec[1]
    if type(n_values) is not int or not 0 <= n_values <= MAX_COMPARISON_VALUES:
        raise ProviderError(f"comparison n_values must be an int in [0, {MAX_COMPARISON_VALUES}], got {n_values!r}")
    first_product = spec[2] if len(spec) == 3 else 0
    if type(first_product) is not int or not 0 <= first_product <= min(n_values, 1):
        raise ProviderError(f"comparison first_product must be 0, or 1 with values, got {first_product!r}")
    return shape, ComparisonLayout(n_values, first_product)


def _comparison(spec) -> tuple[list, list, Derive]:
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



#: (requester scope, fixed id) -> the fixed mask ``b`` of a constant operand (:mod:`veil.mpc.fixed_operand`),
#: held by the crypto provider's process only (filled by the ``fixed_mask`` recipe; parties never call a
#: derive); a session's masks go when it ends (:func:`drop_provider_scope`)
FIXED_MASKS: dict[tuple, torch.Tensor] = {}
#: most ring elements of fixed masks one requester scope keeps (a requester cannot fill the provider's
#: memory beyond this per session, and cannot use up another session's room)
MAX_FIXED_ELEMENTS = 1 << 25
#: kinds whose derived fields are fixed masks: parties mark them (``veil.workers.dealt``) so that they
#: are opened once, by ``fixed_open``, and never anywhere else
FIXED_KINDS = frozenset({"fixed_mask"})


def _fixed_id(value) -> str:
    if not isinstance(value, str) or not 16 <= len(value) <= 64:
        raise ProviderError("a fixed operand id is a string of 16 to 64 characters")
    return value


def _fixed_mask(spec) -> tuple[list, list, Derive]:
    """The fixed mask ``b`` of a constant operand: uniform (``os.urandom``), kept under its id."""
    if not isinstance(spec, (tuple, list)) or len(spec) != 2:
        raise ProviderError("fixed_mask spec must be (fixed_id, shape)")
    fixed_id, shape = _fixed_id(spec[0]), _shape(spec[1])
    scope = _SCOPE.get()
    key = (scope, fixed_id)

    def derive(u: list, g: torch.Generator) -> list:
        # once per id: dealt twice, the parties' shares of the first b would no longer match the provider's
        if key in FIXED_MASKS:
            raise ProviderError(f"fixed operand {fixed_id!r} was already dealt")
        held = sum(t.numel() for k, t in FIXED_MASKS.items() if k[0] == scope)
        if held + math.prod(shape) > MAX_FIXED_ELEMENTS:
            raise ProviderError(f"this crypto provider keeps at most {MAX_FIXED_ELEMENTS} fixed-mask elements")
        b = random_ring(shape)  # a key-like secret: the OS's CSPRNG, not the dealer's generator
        FIXED_MASKS[key] = b
        return [b.clone()]  # dealers correct a derived value in place into the last party's share

    return [], [shape], derive


def _fixed_beaver(spec) -> tuple[list, list, Derive]:
    """A triple ``(a, op(a, b))`` for the fixed mask ``b`` kept under ``fixed_id`` (right operand)."""
    if not isinstance(spec, (tuple, list)) or len(spec) != 5:
        raise ProviderError("fixed_beaver spec must be (fixed_id, op, shape_a, shape_b, op_kwargs)")
    fixed_id, op, shape_a, shape_b, op_kwargs = spec
    fixed_id = _fixed_id(fixed_id)
    (shape_a, shape_b), (shape_c,), _ = _beaver((op, shape_a, shape_b, op_kwargs))
    fn = bilinear(op)
    key = (_SCOPE.get(), fixed_id)

    def derive(u: list, g: torch.Generator) -> list:
        b = FIXED_MASKS.get(key)
        if b is None or tuple(b.shape) != shape_b:
            raise ProviderError(f"no fixed mask {fixed_id!r} of shape {shape_b} at this crypto provider")
        return [fn(u[0], b, **dict(op_kwargs))]

    return [shape_a], [shape_c], derive


RECIPES: dict[str, Callable] = {
    "beaver": _beaver, "truncation": _truncation, "beaver_mac": _beaver_mac,
    "truncation_mac": _truncation_mac, "zero": _zero, "comparison": _comparison,
    "zero_mac": _zero_mac, "comparison_mac": _comparison_mac,
    "fixed_mask": _fixed_mask, "fixed_beaver": _fixed_beaver,
}


def xor_fields(kind: str, spec) -> frozenset:
    """Positions (in ``uniform + derived``) of the fields of ``kind`` that are XOR shares."""
    return ComparisonLayout(int(spec[1])).xor if kind == "comparison" else frozenset()


def combine(values: Sequence[torch.Tensor], xor: bool) -> torch.Tensor:
    """The shared value from all its shares: their sum mod 2^64, or their XOR."""
    total = values[0]
    for v in values[1:]:
        total = total ^ v if xor else total + v
    return total


def last_share(value: torch.Tensor, others: Sequence[torch.Tensor], xor: bool) -> torch.Tensor:
    """The share that completes ``others`` to ``value``."""
    if not others:
        return value
    return value ^ combine(others, True) if xor else value - combine(others, False)


def recipe(kind: str, spec) -> tuple[list, list, Derive]:
    """(uniform field shapes, derived field shapes, derive function) of a kind.

    Raises:
        ProviderError: For an unknown kind.
    """
    try:
        return RECIPES[kind](spec)
    except KeyError:
        raise ProviderError(f"unknown correlated-randomness kind {kind!r}; known: {sorted(RECIPES)}") from None


def dealer_generator() -> torch.Generator:
    """A generator for the derived fields' randomness, seeded from the OS."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def split_shares(value: torch.Tensor, n: int, xor: bool, generator=None) -> list:
    """``n`` shares of ``value``: additive, or XOR for a boolean field (any ``n - 1`` uniform)."""
    if not xor:
        return split(value, n, generator)
    others = [random_ring(value.shape, generator) for _ in range(n - 1)]
    return others + [last_share(value, others, True)]
