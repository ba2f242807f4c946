"""Recipes for correlated randomness, shared by every dealer.

A recipe says which fields of one item are *uniform* ring elements (a dealer
may let each party derive its share of them from a seed) and how the other,
*derived*, fields follow from them (their shares must be sent, at least to
one party). Items are returned to protocols as a tuple
``uniform fields + derived fields``:

* ``beaver`` ``(op, shape_a, shape_b, op_kwargs)``: ``(a, b, c = op(a, b))``
  [Beaver 1991].
* ``beaver_local`` ``(op, shape_a, shape_b, {})``: a 2-party matrix product's
  ``(a, b, d)`` with ``d = a0 @ b1 + a1 @ b0`` (the cross terms of the parties'
  shares: ``c - a0 @ b0 - a1 @ b1``): each party then needs one product
  ``(e + a_i) @ (f + b_i)`` online instead of two (:mod:`veil.mpc.beaver`). Its
  derived field follows from the *shares* of the uniform ones
  (:data:`FROM_SHARES`), not from their values.
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
  comparison (:mod:`veil.mpc.bit_comparison`; recipe and layout in
  :mod:`veil.mpc.comparison_material`). Some of its fields are XOR (boolean) shares:
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

import functools
import math
import secrets
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Sequence

import torch

from veil.mpc.comparison_material import (GROUP_BITS, GROUP_SUBSETS, ComparisonLayout, comparison_recipe,
                                           comparison_sources)
from veil.mpc.errors import ProviderError
from veil.mpc import ring_gemm
from veil.mpc.ring import DTYPE, bilinear, op_arguments, random_ring
from veil.mpc.sharing import split
from veil.shapes import broadcast_shape

Shape = tuple
Derive = Callable[[list, torch.Generator], list]


def _shape(s: Sequence[int]) -> Shape:
    return tuple(int(v) for v in s)


#: most multiply-adds one product item's derive may cost (``op(a, b)`` at the provider): the element bounds
#: let one matmul item cost 2^37 (minutes of the provider's CPU, 4x that for a 128-bit kind) while it held
#: the dealing slot every other session's dealings wait for. An honest item is one product of the
#: computation (the bench's largest, 256^3, is 2^24); 2^32 is ~2 s of int64 GEMM here (~8 s at 128 bits)
MAX_PRODUCT_WORK = 1 << 32


def product_work(op: str, shape_a: Shape, shape_b: Shape, shape_c: Shape) -> int:
    """Multiply-adds of ``op(a, b)``: each output entry sums the contracted dimension's products (a matmul's
    last dimension of ``a``, a convolution's input channels per group times its kernel)."""
    per_entry = 1 if op == "mul" else math.prod(shape_b[1:]) if op == "conv2d" else (shape_a[-1] if shape_a else 1)
    return math.prod(shape_c) * per_entry


def _product(op, shape_a, shape_b, op_kwargs) -> tuple:
    """A product recipe's parameters from a spec, checked once: ``(op's ring function, its extra
    arguments, shape a, shape b, shape of op(a, b))``; refused past :data:`MAX_PRODUCT_WORK`."""
    fn = bilinear(op)
    op_kwargs = op_arguments(op, op_kwargs)  # from a request: a convolution's geometry, nothing else
    shape_a, shape_b = _shape(shape_a), _shape(shape_b)
    shape_c = product_shape(op, shape_a, shape_b, op_kwargs)
    work = product_work(op, shape_a, shape_b, shape_c)
    if work > MAX_PRODUCT_WORK:
        raise ProviderError(f"a {op} item of shapes {shape_a} and {shape_b} costs {work} multiply-adds, more than "
                            f"{MAX_PRODUCT_WORK} per item at a crypto provider: split the product into smaller ones")
    return fn, op_kwargs, shape_a, shape_b, shape_c


#: a dealing request's product items together cost at most this many items at :data:`MAX_PRODUCT_WORK`: the
#: request holds the dealing slot for all its items, and by ring elements alone (``MAX_BATCH_ELEMENTS``) a
#: request of 64 convolution items of 2^32 each passed (padding makes an item's work ~2^15 times its elements)
MAX_REQUEST_PRODUCT_ITEMS = 1


def request_work_bound() -> int:
    """Most multiply-adds of the product items of one dealing request together."""
    return MAX_REQUEST_PRODUCT_ITEMS * MAX_PRODUCT_WORK


def item_product_work(kind: str, spec) -> int:
    """Multiply-adds of one item's ``op(a, b)`` for a product kind (``beaver``, ``beaver_mac``,
    ``fixed_beaver``; refused past :data:`MAX_PRODUCT_WORK`), 0 for the other kinds."""
    if kind not in ("beaver", "beaver_local", "beaver_mac", "fixed_beaver"):
        return 0
    if not isinstance(spec, (tuple, list)) or len(spec) != (4 if kind in ("beaver", "beaver_local") else 5):
        raise ProviderError(f"a {kind} spec must be ([id,] op, shape_a, shape_b, op_kwargs)")
    op, shape_a, shape_b, op_kwargs = spec[-4:]
    _, _, shape_a, shape_b, shape_c = _product(op, shape_a, shape_b, op_kwargs)
    return product_work(op, shape_a, shape_b, shape_c) * (2 if kind == "beaver_local" else 1)  # (two products)


def check_request_work(kind: str, spec, count: int) -> None:
    """Refuses a dealing request whose ``count`` product items cost more than :func:`request_work_bound`."""
    work = count * item_product_work(kind, spec)  # (one item: refused past MAX_PRODUCT_WORK by its recipe)
    if work > request_work_bound():
        raise ProviderError(f"a dealing of {count} {kind!r} items would cost {work} multiply-adds, more than "
                            f"{request_work_bound()} in one request")


def _beaver(spec) -> tuple[list, list, Derive]:
    op, shape_a, shape_b, op_kwargs = spec
    fn, op_kwargs, shape_a, shape_b, shape_c = _product(op, shape_a, shape_b, op_kwargs)
    return [shape_a, shape_b], [shape_c], lambda u, g: [fn(u[0], u[1], **op_kwargs)]


#: matrix products a ``beaver_local`` item may be dealt for (2-D operands, two parties)
LOCAL_PRODUCT_OPS = ("mm", "matmul")
#: kinds whose derive takes every party's shares of the uniform fields (``[[a_0, b_0], [a_1, b_1]]``) instead of
#: their values: dealers split the uniform fields first (or expand each party's seed), then derive
FROM_SHARES = frozenset({"beaver_local"})


def _beaver_local(spec) -> tuple[list, list, Callable]:
    op, shape_a, shape_b, op_kwargs = spec
    fn, op_kwargs, shape_a, shape_b, shape_c = _product(op, shape_a, shape_b, op_kwargs)
    if op not in LOCAL_PRODUCT_OPS or op_kwargs or len(shape_a) != 2 or len(shape_b) != 2:
        raise ProviderError("a beaver_local item is a product of two matrices (mm or matmul, 2-D operands)")

    def cross_terms(shares: list) -> list:
        if len(shares) != 2:
            raise ProviderError("beaver_local material is dealt to two parties")
        (a0, b0), (a1, b1) = shares
        d = ring_gemm.products(None, [(a0, b1), (a1, b0)])  # (None where torch's int64 product serves)
        return [d if d is not None else torch.addmm(torch.mm(a0, b1), a1, b0)]

    return [shape_a, shape_b], [shape_c], cross_terms


def fields_from_shares(derive: Callable, uniform_shapes: list, n: int, make: Callable[[Shape], torch.Tensor],
                       split_field: Callable[[torch.Tensor], list]) -> list[list]:
    """A :data:`FROM_SHARES` item's fields as ``n`` shares each (uniform fields first): the uniform fields made
    (``make``) and split (``split_field``) first, the derived ones computed from every party's shares, then split.
    For dealers that split what they make (seeded dealing expands each party's seed instead)."""
    shares = [split_field(make(shape)) for shape in uniform_shapes]
    derived = derive([[field[i] for field in shares] for i in range(n)])
    return shares + [split_field(v) for v in derived]


def product_shape(op: str, shape_a: Shape, shape_b: Shape, op_kwargs) -> Shape:
    """The shape of ``op(a, b)`` for operands of these shapes (cached per requesting user; computed without
    allocating)."""
    if op == "mul":  # (elementwise: meta arithmetic would import torch._dynamo, ring.meta_result)
        return tuple(broadcast_shape(shape_a, shape_b))
    items = tuple(op_kwargs.items() if isinstance(op_kwargs, dict) else op_kwargs)
    try:
        hash((op, shape_a, shape_b, items))
    except TypeError:  # an unhashable kwarg value (a list): not cached
        return _meta_product_shape(op, shape_a, shape_b, items)
    return _kept_product_shape(op, shape_a, shape_b, items)


def _meta_product_shape(op: str, shape_a: Shape, shape_b: Shape, items: tuple) -> Shape:
    meta = bilinear(op)(torch.empty(shape_a, dtype=DTYPE, device="meta"),
                        torch.empty(shape_b, dtype=DTYPE, device="meta"), **dict(items))
    return tuple(meta.shape)


#: (op, shape a, shape b, op kwargs) -> the product's shape: a meta op costs 0.1-0.5 ms and a dealing asks the
#: recipe several times (the dealer, every party's expansion, the layout). In one process of one user a plain
#: bounded cache; on a worker kept per requesting user (one dict for every session said by a hit that another had
#: dealt those shapes, and 512 fresh ones cleared it for all), which the workers layer installs with
#: :func:`keep_product_shapes_with` (veil/workers/user_caches.py: mpc imports no workers code). At a crypto
#: provider the requester is the peer link, so the users of one peer worker share its entries
_kept_product_shape = functools.lru_cache(maxsize=512)(_meta_product_shape)


def keep_product_shapes_with(cache: Callable[[Callable], Callable]) -> None:
    """Installs how :func:`product_shape` keeps shapes: ``cache`` wraps the uncached function."""
    global _kept_product_shape
    _kept_product_shape = cache(_meta_product_shape)


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
#: held while MAC_KEYS or FIXED_MASKS is counted, filled or emptied (sessions' requests run on several threads):
#: never across work that grows with a request (a mask is drawn outside it) or with other sessions' keys
_TABLES_LOCK = threading.Lock()


class _ScopeIds:
    """The ids one scope holds in the tables (and the fixed masks being drawn for it), so that its count and its
    drop read its own ids only: walking every session's keys under the lock made each registration and each
    session's end O(all sessions' keys)."""

    __slots__ = ("mac", "fixed", "drawing")

    def __init__(self) -> None:
        self.mac: set = set()
        self.fixed: set = set()
        self.drawing: set = set()


#: scope -> its ids (under _TABLES_LOCK)
_SCOPE_IDS: dict = {}


def _ids_of(scope: str | None) -> _ScopeIds:
    ids = _SCOPE_IDS.get(scope)
    if ids is None:
        ids = _SCOPE_IDS[scope] = _ScopeIds()
    return ids

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
    with _TABLES_LOCK:  # (its own ids only; a mask being drawn for it is not kept when drawn)
        ids = _SCOPE_IDS.pop(scope, None)
        if ids is not None:
            for table, own in ((MAC_KEYS, ids.mac), (FIXED_MASKS, ids.fixed)):
                for key_id in own:
                    dropped += table.pop((scope, key_id), None) is not None
        _FIXED_HELD.pop(scope, None)
    return dropped

#: kinds whose fields are 128-bit (SPDZ2k) elements, each stored as two int64
#: fields ``(lo, hi)``: they must be split, summed and corrected mod 2^128
#: (:func:`split_wide`, :func:`sum_wide`, :func:`last_shares_wide`), not limb by limb.
WIDE_KINDS = frozenset({"beaver_mac", "truncation_mac", "zero_mac", "comparison_mac"})


#: MAC keys one network session may hold at the provider (a key per set of parties it computes with: an
#: honest orchestrator registers one or a few); they live in the provider's memory until its session ends.
#: In-process requests (scope None: this process's own orchestrator, any number of VirtualWorker
#: providers) are not counted
MAX_MAC_KEYS_PER_SCOPE = 64


def register_mac_key(key_id: str, alpha: torch.Tensor) -> None:
    """Stores a MAC key at the provider (see :mod:`veil.mpc.mac`): an id of 1 to 64 characters (keys are
    scoped per requester, so the id need not be unguessable), at most :data:`MAX_MAC_KEYS_PER_SCOPE` per
    network session."""
    if (not isinstance(key_id, str) or not 1 <= len(key_id) <= 64 or not isinstance(alpha, torch.Tensor)
            or alpha.dtype != DTYPE or alpha.dim()):
        raise ProviderError("a MAC key is a string id of 1 to 64 characters and a 0-dim int64 tensor")
    scope, alpha = _SCOPE.get(), alpha.clone()
    with _TABLES_LOCK:  # the count and the insert as one step: threads of one session cannot both pass the cap
        own = _ids_of(scope).mac
        if scope is not None and key_id not in own and len(own) >= MAX_MAC_KEYS_PER_SCOPE:
            own.intersection_update([i for i in own if (scope, i) in MAC_KEYS])  # (ids popped from the table)
            if len(own) >= MAX_MAC_KEYS_PER_SCOPE:
                raise ProviderError(f"this session holds {MAX_MAC_KEYS_PER_SCOPE} MAC keys at the crypto provider "
                                    f"already")
        MAC_KEYS[(scope, key_id)] = alpha
        own.add(key_id)


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
    fn, op_kwargs, shape_a, shape_b, shape_c = _product(op, shape_a, shape_b, op_kwargs)

    def derive(u: list, g: torch.Generator) -> list:
        alpha = _alpha(key_id)
        a, b = (u[0], u[1]), (u[2], u[3])
        c = ring128.bilinear(fn, a, b, **op_kwargs)
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


#: (requester scope, fixed id) -> the fixed mask ``b`` of a constant operand (:mod:`veil.mpc.fixed_operand`),
#: held by the crypto provider's process only (filled by the ``fixed_mask`` recipe; parties never call a
#: derive); a session's masks go when it ends (:func:`drop_provider_scope`)
FIXED_MASKS: dict[tuple, torch.Tensor] = {}
#: most ring elements of fixed masks one requester scope keeps (a requester cannot fill the provider's
#: memory beyond this per session, and cannot use up another session's room)
MAX_FIXED_ELEMENTS = 1 << 25
#: most fixed masks (ids) one requester scope keeps: by elements alone, one-element masks filled the table with
#: 2^25 entries in one session (~1.3 KB each here: ~40 GB)
MAX_FIXED_MASKS_PER_SCOPE = 4096
#: scope -> (fixed masks, their ring elements) it keeps in FIXED_MASKS, kept as the table fills and empties under
#: _TABLES_LOCK (the check under the lock is one look-up: summed over every session's masks, each dealing took
#: longer than the last while every session's registrations and drops waited)
_FIXED_HELD: dict = {}
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

    def derive(u: list, g: torch.Generator) -> list:
        # (the scope when it derives, as for MAC keys: a recipe checked before the dealing's scope is entered
        # named every session's masks under None)
        scope = _SCOPE.get()
        key, size = (scope, fixed_id), math.prod(shape)
        with _TABLES_LOCK:  # its id and room reserved as one step (threads of one session cannot both pass)
            ids = _ids_of(scope)
            # once per id: dealt twice, the parties' shares of the first b would no longer match the provider's
            if key in FIXED_MASKS or fixed_id in ids.drawing:
                raise ProviderError(f"fixed operand {fixed_id!r} was already dealt")
            count, held = _FIXED_HELD.get(scope, (0, 0))
            if scope is not None and count >= MAX_FIXED_MASKS_PER_SCOPE:
                raise ProviderError(f"this session keeps {MAX_FIXED_MASKS_PER_SCOPE} fixed masks at the crypto "
                                    f"provider already")
            if held + size > MAX_FIXED_ELEMENTS:
                raise ProviderError(f"this crypto provider keeps at most {MAX_FIXED_ELEMENTS} fixed-mask elements")
            _FIXED_HELD[scope] = (count + 1, held + size)
            ids.drawing.add(fixed_id)
        # drawn outside the lock (2^25 elements take seconds: every session's key lookups and ends waited)
        try:
            b = random_ring(shape)  # a key-like secret: the OS's CSPRNG, not the dealer's
        except BaseException:
            with _TABLES_LOCK:  # (the draw failed: its id and room are free again)
                if _SCOPE_IDS.get(scope) is ids and fixed_id in ids.drawing:
                    ids.drawing.discard(fixed_id)
                    count, held = _FIXED_HELD.get(scope, (1, size))
                    _FIXED_HELD[scope] = (count - 1, held - size)
            raise
        with _TABLES_LOCK:
            kept = _SCOPE_IDS.get(scope) is ids and fixed_id in ids.drawing  # (not: its session ended meanwhile)
            if kept:
                ids.drawing.discard(fixed_id)
                FIXED_MASKS[key] = b
                ids.fixed.add(fixed_id)
        if not kept:
            raise ProviderError("this session ended at the crypto provider while its fixed mask was drawn")
        return [b.clone()]  # dealers correct a derived value in place into the last party's share

    return [], [shape], derive


def _fixed_beaver(spec) -> tuple[list, list, Derive]:
    """A triple ``(a, op(a, b))`` for the fixed mask ``b`` kept under ``fixed_id`` (right operand)."""
    if not isinstance(spec, (tuple, list)) or len(spec) != 5:
        raise ProviderError("fixed_beaver spec must be (fixed_id, op, shape_a, shape_b, op_kwargs)")
    fixed_id, op, shape_a, shape_b, op_kwargs = spec
    fixed_id = _fixed_id(fixed_id)
    fn, op_kwargs, shape_a, shape_b, shape_c = _product(op, shape_a, shape_b, op_kwargs)

    def derive(u: list, g: torch.Generator) -> list:
        b = FIXED_MASKS.get((_SCOPE.get(), fixed_id))  # (the scope when it derives, as in _fixed_mask)
        if b is None or tuple(b.shape) != shape_b:
            raise ProviderError(f"no fixed mask {fixed_id!r} of shape {shape_b} at this crypto provider")
        return [fn(u[0], b, **op_kwargs)]

    return [shape_a], [shape_c], derive


def derived_sources(kind: str, spec) -> list | None:
    """Per derived field of ``kind``, the positions (in its item) of the uniform fields it is computed from;
    None where not tracked. A party's monitor lets a computation use a derived field only as the end of
    those masks: they mask no opening after it (a bit of ``c1 = a & b1`` or of the select table, moved
    into a state beside the opening of ``a`` or ``rho``, would cancel against it: red team)."""
    return comparison_sources(spec) if kind == "comparison" else None


RECIPES: dict[str, Callable] = {
    "beaver": _beaver, "beaver_local": _beaver_local, "truncation": _truncation, "beaver_mac": _beaver_mac,
    "truncation_mac": _truncation_mac, "zero": _zero, "comparison": comparison_recipe,
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
