"""Optional active security: SPDZ2k MACs [Cramer, Damgard, Escudero, Scholl, Xing, CRYPTO 2018].

``x.share(alice, bob, crypto_provider=cp, active_security=True)`` shares a
64-bit ring value ``x`` (``k = 64``) as a 128-bit value ``x~`` with ``x~ = x
mod 2^64`` and its MAC ``alpha * x~``, both additively shared **mod 2^(k+s)
= 2^128** (``s = 64``); the key ``alpha`` is uniform in Z/2^s, drawn from
the operating system's CSPRNG for every session (:func:`new_session`, and a
new key per provider and parties). The orchestrator is the verifier (it sees
every opened value anyway) and gives ``alpha`` to the crypto provider, which
authenticates the material it deals; parties hold shares of ``alpha`` only.

Per party an authenticated share is four int64 limbs ``(v_lo, v_hi, m_lo,
m_hi)`` (:mod:`veil.mpc.ring128`). Protocol steps below take and return
``{party: limbs}`` dicts; :mod:`veil.tensors.mac_dispatch` maps tensor ops
onto them.

* Linear ops act on values and MACs mod 2^128; a public ``c`` is added by
  party 0 to the value and by every party as ``c * alpha_i`` to the MAC.
* Products of two shared tensors use authenticated 128-bit triples; the
  opened ``e = x~ - a`` and ``f = y~ - b`` (uniform mod 2^128) are recorded.
* Truncation opens ``c = x~ + K + r~`` (uniform mod 2^128; its low 64 bits
  are exactly the opening of :mod:`veil.mpc.truncation`) and finishes with
  that module's dealt ``q``, ``g``, lifted to 128 bits with their MACs:
  exact (``floor(x/d)`` or ``+1``) for every ``|x| <= 2^62 - d``.
* An output is opened as ``x~ + 2^64 rho`` (``rho`` dealt, authenticated), so
  the upper 64 bits of ``x~`` (which depend on other values) stay hidden.
* :func:`check` verifies every pending opening in **one round**: fresh
  public coefficients ``r_j`` uniform in Z/2^s; each party sends ``gamma_i =
  sum_j r_j mac_i(v_j) mod 2^128`` and the verifier checks ``sum_i gamma_i
  == alpha * sum_j r_j v_j mod 2^128``.

**Bound.** An additive error that changes an opened value mod 2^64 (with
any MAC error the cheater picks) passes one check with probability at most
``2^(-s + log2(s + 1)) = 2^-57.9`` (SPDZ2k's batch-check bound; for one
error ``2^v``, ``v < 64``, the check passes iff ``r_j (Delta - alpha 2^v) = 0
mod 2^128``, which needs the cheater to guess ``alpha`` modulo ``2^(128 - v -
t)`` for ``t`` the 2-adic valuation of ``r_j``: about ``2^-60`` at ``v = 63``).
Errors only in the upper ``s`` bits of a share, or only in a MAC, may pass,
but they cannot change any result mod 2^64. ``tests/mpc/test_mac_escape.py``
injects every bit position of every 128-bit share, triple, truncation pair
and opening and counts escapes.

Comparisons, ReLU and max use dealt authenticated edaBits and Beaver
products (:mod:`veil.mpc.mac_comparison`), so their openings join the same
check; :func:`refresh` adds a dealt authenticated sharing of zero. The
crypto provider and the orchestrator know ``alpha``: as in trusted-dealer
SPDZ, they must not collude with a party.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import torch

from veil.mpc import ring128 as r128
from veil.mpc.beaver import check_result_shape
from veil.mpc.errors import MacCheckError
from veil.mpc.party import open_parties, party_function, run_party
from veil.mpc.product_split import plan_split
from veil.mpc.prg import expand, new_seed
from veil.mpc.prg import seed_bytes as prg_seed_bytes
from veil.mpc.ring import DTYPE, bilinear, op_arguments
from veil.mpc.runtime import step_check
from veil.mpc.truncation import TRUNCATION_BOUND, floor_div_unsigned, shift_for, top_bit
from veil.shapes import broadcast_shape, numel

#: value bits (the ring of the data) and MAC security parameter: shares and MACs live mod 2^(K_BITS + S_BITS)
K_BITS = 64
S_BITS = 64
#: the per-check escape bound for an error in a value's low K_BITS bits (SPDZ2k)
ESCAPE_BOUND_LOG2 = -S_BITS + 5.86  # log2(s + 1) = log2(65)

Limbs = tuple  # (v_lo, v_hi, m_lo, m_hi) of one party
Shared = Mapping[Hashable, Limbs]


@dataclass(eq=False)
class MacKey:
    """One SPDZ2k key per (provider, parties): the verifier's state.

    Attributes:
        key_id: Names the key at the crypto provider.
        alpha: The key, uniform in [0, 2^64) (0-dim int64 read unsigned);
            never leaves the verifier and the provider.
        alpha_shares: party -> (lo, hi) 128-bit shares of ``alpha`` (handles).
        pending: Opened values not yet checked: ``(label, (lo, hi), terms)``.
    """

    key_id: str
    alpha: torch.Tensor
    alpha_shares: dict
    pending: list = field(default_factory=list)

    def __repr__(self) -> str:  # never print the key
        return f"MacKey(key_id={self.key_id!r}, pending={len(self.pending)})"


_KEYS: dict[tuple, tuple[Any, MacKey]] = {}

#: places per-party tensors at the parties: {party: [tensor, ...]} -> {party: [handle, ...]}
Place = Callable[[dict], dict]


def _random(shape: Sequence[int]) -> torch.Tensor:
    from veil.mpc.ring import random_ring

    return random_ring(shape)  # OS randomness


def key_for(provider: Any, parties: Sequence[Hashable], place: Place) -> MacKey:
    """The MAC key of ``provider`` and ``parties``, drawn and dealt on first use."""
    entry = _KEYS.get((id(provider), tuple(parties)))
    if entry is not None and entry[0] is provider:
        return entry[1]
    alpha = torch.tensor(secrets.randbits(S_BITS) - (1 << 63), dtype=DTYPE)  # uniform in Z/2^64, OS randomness
    pieces = r128.split(r128.lift_unsigned(alpha), len(parties), _random)
    placed = place({p: list(s) for p, s in zip(parties, pieces)})
    key = MacKey(f"mac-{secrets.token_hex(8)}", alpha, {p: tuple(placed[p]) for p in parties})
    provider.register_mac_key(key.key_id, alpha)
    _KEYS[(id(provider), tuple(parties))] = (provider, key)
    return key


def new_session() -> None:
    """Forgets every MAC key: the next authenticated sharing draws a fresh ``alpha``
    (tensors authenticated before cannot be combined with later ones)."""
    _KEYS.clear()


def input_shares(plain: torch.Tensor, key: MacKey, n: int) -> list[Limbs]:
    """Data-owner side: 128-bit shares of ``x~`` (``x`` sign-extended) and of ``alpha x~``."""
    value = r128.lift(plain.detach().to(DTYPE))
    mac = r128.mul(r128.lift_unsigned(key.alpha), value)
    return [v + m for v, m in zip(r128.split(value, n, _random), r128.split(mac, n, _random))]


def is_authenticated(value: Any) -> bool:
    return getattr(value, "mac", None) is not None


# ------------------------------------------------------------------ party functions (one party's limbs)

def _pieces(v: r128.Pair) -> tuple:
    """A 128-bit share as three int64s that add up over parties without overflow."""
    return v[0] & r128.MASK32, (v[0] >> 32) & r128.MASK32, v[1]


def _unpieces(s0: torch.Tensor, s1: torch.Tensor, hi: torch.Tensor) -> r128.Pair:
    return r128.combine([(0, s0), (2, s1)], [hi])


def _alpha_times(alpha: r128.Pair, public: r128.Pair) -> r128.Pair:
    return r128.mul(alpha, public)


def _meta(*tensors: Any) -> bool:
    """True when run on shape-only tensors (run_party infers a remote result's shapes so)."""
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors)


def _shapes_only(shape: Sequence[int], n: int) -> tuple:
    """``n`` empty int64 meta tensors: the cheap answer to a shape query (the limb code is long)."""
    return tuple(torch.empty(tuple(shape), dtype=DTYPE, device="meta") for _ in range(n))


@party_function("mac_digits")
def _mac_digits(limb: torch.Tensor, width: int) -> tuple:
    """Unsigned ``width``-bit digits of one 64-bit limb (inputs to a digit-wise linear op)."""
    if width not in (16, 32):
        raise ValueError("mac_digits needs width 16 or 32")
    if _meta(limb):
        return _shapes_only(limb.shape, 64 // width)
    return tuple(r128.digits(limb, width))


#: most terms and high parts of one ``mac_combine``: an honest one (``mac_dispatch._public_bilinear``) combines the
#: products of at most 4 digits of a public operand with 4 of a share, plus at most 2 high parts. The requester
#: writes the lists: naming one empty share a million times cost the quota nothing and the party a loop step each
#: (red team, session 67)
MAX_COMBINE_TERMS = 16
MAX_COMBINE_HI = 2


@party_function("mac_combine")
def _mac_combine(columns: list, terms: list, hi_extra: list) -> tuple:
    """Recombines exact digit images into a 128-bit share (see :func:`veil.mpc.ring128.combine`)."""
    if type(columns) is not list or type(terms) is not list or type(hi_extra) is not list or \
            len(terms) > MAX_COMBINE_TERMS or len(hi_extra) > MAX_COMBINE_HI:
        raise ValueError(f"mac_combine takes lists of at most {MAX_COMBINE_TERMS} terms and {MAX_COMBINE_HI} high "
                         "parts")
    if len(columns) != len(terms) or not all(type(c) is int and 0 <= c < 8 for c in columns):
        raise ValueError("mac_combine needs one column index in [0, 8) per term")
    if _meta(*terms, *hi_extra):
        return _shapes_only(broadcast_shape(*[tuple(t.shape) for t in list(terms) + list(hi_extra)]), 2)
    return r128.combine(list(zip(columns, terms)), list(hi_extra))


@party_function("mac_add")
def _mac_add(x_lo, x_hi, xm_lo, xm_hi, y_lo, y_hi, ym_lo, ym_hi, subtract: bool) -> tuple:
    if _meta(x_lo, y_lo):
        return _shapes_only(broadcast_shape(tuple(x_lo.shape), tuple(y_lo.shape)), 4)
    op = r128.sub if subtract else r128.add
    return op((x_lo, x_hi), (y_lo, y_hi)) + op((xm_lo, xm_hi), (ym_lo, ym_hi))


@party_function("mac_add_public")
def _mac_add_public(v_lo, v_hi, m_lo, m_hi, a_lo, a_hi, public: torch.Tensor, first: bool, negate: bool) -> tuple:
    """``(-)x + c``: party 0 adds ``c`` to its value share, every party ``c alpha_i`` to its MAC share."""
    if _meta(v_lo, a_lo, public):
        return _shapes_only(broadcast_shape(tuple(v_lo.shape), tuple(public.shape)), 4)
    value, mac = (v_lo, v_hi), (m_lo, m_hi)
    if negate:
        value, mac = r128.neg(value), r128.neg(mac)
    c = r128.lift(public)
    shape = broadcast_shape(tuple(v_lo.shape), tuple(public.shape))
    value = tuple(t.expand(shape) for t in (r128.add(value, c) if first else value))
    mac = r128.add(mac, _alpha_times((a_lo, a_hi), c))
    return tuple(t.expand(shape).clone() for t in value + mac)


@party_function("mac_public")
def _mac_public(a_lo, a_hi, public: torch.Tensor, first: bool) -> tuple:
    """An authenticated public ``c``: party 0 holds ``c``, the others 0; MAC shares ``c alpha_i``."""
    if _meta(a_lo, public):
        return _shapes_only(public.shape, 4)
    c = r128.lift(public)
    value = c if first else (torch.zeros_like(c[0]), torch.zeros_like(c[1]))
    return value + _alpha_times((a_lo, a_hi), c)


@party_function("mac_scale")
def _mac_scale(v_lo, v_hi, m_lo, m_hi, public: torch.Tensor) -> tuple:
    """``c * x`` elementwise for a public integer ``c`` (value and MAC, broadcasting)."""
    if _meta(v_lo, public):
        return _shapes_only(broadcast_shape(tuple(v_lo.shape), tuple(public.shape)), 4)
    c = r128.lift(public)
    return r128.mul((v_lo, v_hi), c) + r128.mul((m_lo, m_hi), c)


@party_function("mac_beaver_mask", openable=True)
def _mac_beaver_mask(x_lo, x_hi, a_lo, a_hi, y_lo, y_hi, b_lo, b_hi) -> tuple:
    """A party's shares of ``e = x~ - a`` and ``f = y~ - b`` (uniform mod 2^128)."""
    return _pieces(r128.sub((x_lo, x_hi), (a_lo, a_hi))) + _pieces(r128.sub((y_lo, y_hi), (b_lo, b_hi)))


@party_function("mac_beaver_finish")
def _mac_beaver_finish(tri: list, e: list, f: list, ef: list, alpha: list, op: str, first: bool,
                       op_kwargs: dict) -> tuple:
    """``z = c + op(e, b) + op(a, f) (+ op(e, f))`` and its MAC, mod 2^128."""
    op_kwargs = op_arguments(op, op_kwargs)  # the requester's: never out=, a tensor or an unknown name
    if _meta(*tri):
        return _shapes_only(tri[4].shape, 4)  # the shape of c
    if len(tri) != 12 or len(e) != 2 or len(f) != 2 or len(ef) != 2 or tuple(ef[0].shape) != tuple(tri[4].shape):
        raise ValueError("mac_beaver_finish: a triple of 12 fields and opened values of 2 limbs, e*f shaped as c")
    check_result_shape(tri[0], tri[2], tri[4], e[0], f[0], op, op_kwargs)  # before any allocation
    fn = bilinear(op)
    a, b, c, ma, mb, mc = (tuple(tri[2 * i:2 * i + 2]) for i in range(6))
    e, f, ef = tuple(e), tuple(f), tuple(ef)
    z = r128.add(r128.add(c, r128.bilinear(fn, e, b, **op_kwargs)), r128.bilinear(fn, a, f, **op_kwargs))
    if first:
        z = r128.add(z, ef)
    mz = r128.add(r128.add(mc, r128.bilinear(fn, e, mb, **op_kwargs)), r128.bilinear(fn, ma, f, **op_kwargs))
    mz = r128.add(mz, _alpha_times(tuple(alpha), ef))
    return z + mz


@party_function("mac_trunc_mask", openable=True)
def _mac_trunc_mask(x_lo, x_hi, r_lo, r_hi, shift: int) -> tuple:
    """A party's share of ``c = x~ + K + r~`` (party 0 adds ``K``)."""
    if type(shift) is not int:
        raise ValueError("mac_trunc_mask needs an integer shift")
    c = r128.add((x_lo, x_hi), (r_lo, r_hi))
    if shift:
        c = r128.add(c, r128.lift(torch.tensor(shift, dtype=DTYPE)))
    return _pieces(c)


@party_function("mac_trunc_finish")
def _mac_trunc_finish(c: torch.Tensor, pair: list, alpha: list, divisor: int, first: bool) -> tuple:
    """``z = floor(c/d) - K/d - q + (1 - c_hi) g`` mod 2^128 (public part by party 0) and its MAC."""
    if type(divisor) is not int or divisor <= 1 or not isinstance(first, bool):
        raise ValueError("mac_trunc_finish needs an integer divisor > 1 and a boolean first")
    if _meta(c, *pair):
        return _shapes_only(broadcast_shape(tuple(c.shape), tuple(pair[2].shape)), 4)
    _, q, g, _, mq, mg = (tuple(pair[2 * i:2 * i + 2]) for i in range(6))
    wrap = r128.lift(1 - top_bit(c))
    public = r128.lift(floor_div_unsigned(c, divisor) - shift_for(divisor) // divisor)
    z = r128.sub(r128.mul(wrap, g), q)
    if first:
        z = r128.add(z, public)
    mz = r128.add(r128.sub(r128.mul(wrap, mg), mq), _alpha_times(tuple(alpha), public))
    return z + mz


@party_function("mac_output_mask", openable=True)
def _mac_output_mask(v_lo, v_hi, rho) -> tuple:
    """A party's share of ``x~ + 2^64 rho``: hides the upper bits of ``x~``."""
    return _pieces((v_lo, v_hi + rho))


@party_function("mac_gamma", openable=True)
def _mac_gamma(seed: torch.Tensor, items: list) -> tuple:
    """``gamma_j = sum_e r_je mac_j,e mod 2^128`` for each item (coefficients from ``seed``).

    An item is ``[shape, terms]``; its MAC share is ``sum coef * (lo, hi)`` over
    the terms (``lo`` may be 0: a share of ``2^64 hi``).
    """
    seed_bytes = prg_seed_bytes(seed, "a MAC check's seed")  # (its form alone decides: never its values)
    if type(items) is not list or not all(
            type(item) in (list, tuple) and len(item) == 2 and type(item[0]) in (list, tuple)
            and all(type(d) is int and d >= 0 for d in item[0]) and type(item[1]) in (list, tuple)
            and all(type(t) in (list, tuple) and len(t) == 3 and type(t[0]) is int for t in item[1])
            for item in items):
        # a shape or coefficient is the verifier's public integer: a stored object there (a share the requester
        # may not reveal) was read as a Python value, and whether the step failed followed it
        raise ValueError("mac_gamma: each item is [shape, terms]: a shape of whole numbers and terms "
                         "[coefficient (an integer), lo, hi]")
    for shape, terms in items:  # all sized before anything is drawn
        _check_gamma_shape(tuple(shape), terms)
    outs = []
    for j, (shape, terms) in enumerate(items):
        step_check()  # (the request lists the items: a cancelled or overdue session's check stops here)
        shape = tuple(shape)
        coeffs = expand(seed_bytes, f"mac/{j}", shape)  # uniform in Z/2^64 = Z/2^s
        total = None
        for coef, lo, hi in terms:
            if not isinstance(lo, torch.Tensor):
                lo = torch.zeros_like(hi)
            term = r128.mul(r128.lift(torch.tensor(coef, dtype=DTYPE)), (lo, hi)) if coef != 1 else (lo, hi)
            total = term if total is None else r128.add(total, term)
        total = tuple(t.expand(shape) for t in total)
        outs.append(r128.sum_all(r128.mul(r128.lift_unsigned(coeffs), total)))
    if not outs:
        empty = torch.zeros(0, dtype=DTYPE)
        return empty, empty, empty
    return _pieces((torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])))


def _check_gamma_shape(shape: tuple, terms: Any) -> None:
    """An item's shape is its MAC terms' broadcast shape, as :func:`check` sends it (an opened value's MAC shares
    have its shape): its coefficients are drawn over it, so a larger one (a list of integers the request writes)
    would make a party draw and multiply what no stored share paid for (red team: ``[2**31]`` over a 1-entry
    share drew 16 GiB, whatever the quota)."""
    tensors = [t for _, lo, hi in terms for t in (lo, hi) if isinstance(t, torch.Tensor)]
    if not tensors or not all(isinstance(hi, torch.Tensor) for _, _, hi in terms):
        raise ValueError("mac_gamma: each item needs MAC terms whose hi part is a share")
    try:
        fits = broadcast_shape(shape, *(tuple(t.shape) for t in tensors)) == shape
    except (RuntimeError, ValueError):
        fits = False
    if not fits or numel(shape) > max(t.numel() for t in tensors):
        raise ValueError("mac_gamma: an item's shape must be the broadcast shape of its MAC terms")


# ------------------------------------------------------------------ protocols on {party: limbs}

def _open128(name: str, per_party: dict, n_values: int) -> list:
    opened = open_parties(name, per_party)
    return [_unpieces(*opened[3 * i:3 * i + 3]) for i in range(n_values)]


def beaver(x: Shared, y: Shared, key: MacKey, provider: Any, op: str, shape_x: tuple, shape_y: tuple,
           op_kwargs: Optional[dict] = None) -> dict:
    """Authenticated Beaver product ``op(x, y)`` mod 2^128 (one round)."""
    op_kwargs = dict(op_kwargs or {})
    plan = plan_split(op, shape_x, shape_y, op_kwargs)  # past the provider's per-item bound: in pieces
    if plan is not None:
        return mac_product_split.split_beaver(x, y, key, provider, op, op_kwargs, plan)
    parties = list(x)
    tri = provider.authenticated_triples(key.key_id, op, shape_x, shape_y, parties, **op_kwargs)
    # recipe order: a, b (uniform), then c, mac(a), mac(b), mac(c); each (lo, hi)
    order = {p: (tri[p][0:2], tri[p][2:4], tri[p][4:6], tri[p][6:8], tri[p][8:10], tri[p][10:12]) for p in parties}
    e, f = _open128("mac_beaver_mask", {p: tuple(x[p][:2]) + tuple(order[p][0]) + tuple(y[p][:2])
                                        + tuple(order[p][1]) for p in parties}, 2)
    ef = r128.bilinear(bilinear(op), e, f, **op_kwargs)
    out = {p: run_party("mac_beaver_finish", [t for pair in order[p] for t in pair], list(e), list(f), list(ef),
                        list(key.alpha_shares[p]), op=op, first=(i == 0), op_kwargs=op_kwargs)
           for i, p in enumerate(parties)}
    key.pending.append((f"Beaver mask e = x - a ({op})", e,
                        {p: [(1, x[p][2], x[p][3]), (-1,) + tuple(order[p][3])] for p in parties}))
    key.pending.append((f"Beaver mask f = y - b ({op})", f,
                        {p: [(1, y[p][2], y[p][3]), (-1,) + tuple(order[p][4])] for p in parties}))
    return out


def truncate(x: Shared, divisor: int, key: MacKey, provider: Any, shape: tuple) -> dict:
    """Authenticated ``x / divisor`` (``floor`` or ``floor + 1``, for ``|x| <= 2^62 - d``; one round)."""
    if int(divisor) != divisor or not 1 < divisor <= TRUNCATION_BOUND:
        raise ValueError(f"divisor must be an integer in [2, 2^62], got {divisor!r}")
    divisor = int(divisor)
    parties = list(x)
    pairs = provider.authenticated_truncation_pairs(key.key_id, shape, divisor, parties)
    shift = shift_for(divisor)
    (c,) = _open128("mac_trunc_mask", {p: tuple(x[p][:2]) + tuple(pairs[p][0:2]) + (shift if i == 0 else 0,)
                                       for i, p in enumerate(parties)}, 1)
    out = {p: run_party("mac_trunc_finish", c[0], list(pairs[p]), list(key.alpha_shares[p]), divisor=divisor,
                        first=(i == 0)) for i, p in enumerate(parties)}
    key.pending.append(("truncation mask c = x + r", c, {
        p: [(1, x[p][2], x[p][3]), (shift,) + tuple(key.alpha_shares[p]), (1,) + tuple(pairs[p][6:8])]
        for p in parties}))
    return out


def add(x: Shared, y: Shared, subtract: bool = False) -> dict:
    return {p: run_party("mac_add", *x[p], *y[p], subtract=subtract) for p in x}


def refresh(x: Shared, provider: Any, shape: tuple) -> dict:
    """Same value, fresh shares: adds a dealt 128-bit sharing of zero to the values and
    to the MACs (``alpha * 0 = 0``), so the MACs stay valid; no communication."""
    zeros = provider.authenticated_zero_shares(shape, list(x))
    return add(x, {p: tuple(zeros[p]) for p in x})


def add_public(x: Shared, public: torch.Tensor, key: MacKey, negate: bool = False) -> dict:
    """``x + c`` (or ``c - x``) for a public int64 ``c``."""
    return {p: run_party("mac_add_public", *x[p], *key.alpha_shares[p], public.to(DTYPE), first=(i == 0),
                         negate=negate) for i, p in enumerate(x)}


def public(value: torch.Tensor, parties: Sequence[Hashable], key: MacKey) -> dict:
    """An authenticated sharing of a public int64 tensor."""
    return {p: run_party("mac_public", *key.alpha_shares[p], value.to(DTYPE), first=(i == 0))
            for i, p in enumerate(parties)}


def open_output(x: Shared, key: MacKey, provider: Any, shape: tuple) -> torch.Tensor:
    """Opens ``x`` mod 2^64 after checking it and every pending opening (two rounds)."""
    parties = list(x)
    # a dealt authenticated uniform value rho (a truncation pair's r~): the mask is 2^64 rho
    masks = provider.authenticated_truncation_pairs(key.key_id, shape, 2, parties)
    (opened,) = _open128("mac_output_mask", {p: (x[p][0], x[p][1], masks[p][0]) for p in parties}, 1)
    check(key, [("output", opened, {p: [(1, x[p][2], x[p][3]), (1, 0, masks[p][6])] for p in parties})])
    return opened[0]


def check(key: MacKey, extra: Sequence[tuple] = ()) -> None:
    """Verifies every pending opening of ``key`` (and ``extra``) in one round.

    Args:
        key: The MAC key whose pending openings to check.
        extra: More ``(label, opened (lo, hi), {party: MAC terms})`` items.

    Raises:
        MacCheckError: If a share or MAC was tampered with; the message names
            the openings whose check failed.
    """
    items = list(key.pending) + list(extra)
    key.pending.clear()
    if not items:
        return
    seed = new_seed()
    seed_t = torch.frombuffer(bytearray(seed), dtype=torch.uint8)
    parties = list(items[0][2])
    per_party = {p: (seed_t, [[list(_shape(item)), [list(t) for t in item[2][p]]] for item in items])
                 for p in parties}
    g0, g1, ghi = open_parties("mac_gamma", per_party)
    if tuple(g0.shape) != (len(items),):
        raise MacCheckError("SPDZ2k MAC check failed: a party answered the check with the wrong number of values")
    gamma = _unpieces(g0, g1, ghi)
    alpha = r128.lift_unsigned(key.alpha)
    expected_lo, expected_hi = [], []
    for j, (_, value, _) in enumerate(items):
        shape = _shape(items[j])
        coeffs = r128.lift_unsigned(expand(seed, f"mac/{j}", shape))
        value = tuple(torch.as_tensor(v, dtype=DTYPE).expand(shape) for v in value)
        lo, hi = r128.mul(alpha, r128.sum_all(r128.mul(coeffs, value)))
        expected_lo.append(lo)
        expected_hi.append(hi)
    ok = r128.eq(gamma, (torch.stack(expected_lo), torch.stack(expected_hi)))
    failed = [items[j][0] for j in torch.nonzero(~ok).flatten().tolist()]
    if failed:
        names = "; ".join(dict.fromkeys(failed))
        raise MacCheckError(
            f"SPDZ2k MAC check failed on {len(failed)} of {len(items)} opened value(s) ({names}): a share or a MAC "
            "share was modified by a party (or the parties hold inconsistent material); the computation was "
            "aborted and no result revealed"
        )


def _shape(item: tuple) -> tuple:
    """The broadcast shape of an item's opened value and MAC terms."""
    shapes = [tuple(item[1][0].shape)]
    for terms in item[2].values():
        shapes += [tuple(t.shape) for _, lo, hi in terms for t in (lo, hi) if hasattr(t, "shape")]
        break
    return tuple(broadcast_shape(*shapes))


from veil.mpc import mac_product_split  # noqa: E402  (registers its party functions at every worker; imports this)
