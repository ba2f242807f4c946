"""Optional active security: SPDZ information-theoretic MACs on shares.

``x.share(alice, bob, crypto_provider=cp, active_security=True)`` shares
``x`` *and* ``alpha * x`` (its MAC) under a global MAC key ``alpha`` [SPDZ,
Damgard et al. 2012]. ``alpha`` is drawn by the orchestrator (the verifier:
it already sees every opened value) and given to the crypto provider, which
needs it to authenticate Beaver triples and truncation pairs; the parties
hold only additive shares of ``alpha`` and of every MAC, so a party that
changes its share of a value by ``delta`` must also change its MAC share by
``alpha * delta``, which it cannot compute.

* Linear ops (every structural op, ``+``, ``-``, ``neg``, ``sum``, ``cat``,
  zero padding, convolution by a public kernel) act on values and MACs
  alike; a public constant ``c`` is added by party 0 to the value and by
  every party as ``c * alpha_i`` to the MAC; products by public integers
  scale both.
* Products of two shared tensors (``mul``, ``mm``, ``bmm``, ``mv``/``dot``,
  ``conv2d``) use authenticated triples ``(a, b, c, alpha*a, alpha*b,
  alpha*c)``; the opened ``e = x - a`` and ``f = y - b`` are recorded with
  their MACs.
* Truncation (division by a public integer ``d``: every fixed-point product,
  ``mean``, ``x / 3``) uses authenticated pairs ``(r, q, g, alpha*r,
  alpha*q, alpha*g)`` (:mod:`veil.mpc.truncation`): the parties open
  ``c = x + K + r`` (recorded with its MAC ``mac(x) + alpha*K + alpha*r``),
  then ``z = floor(c/d) - K/d - q + (1 - c_hi) g`` and ``mac(z) = alpha_i
  (floor(c/d) - K/d) - (alpha*q)_i + (1 - c_hi) (alpha*g)_i``; see
  :func:`truncate`. The result is ``floor(x/d)`` or ``floor(x/d) + 1`` for
  every ``|x| <= 2^62 - d``, with no failure probability. One round.
  Hence fixed-point ``*``, ``@``, ``nn.Linear``, ``conv2d``, ``avg_pool2d``,
  ``mean``, division by public values and the product-only approximations
  of :mod:`veil.mpc.functions` (``exp``, ``reciprocal``, ``sigmoid``, ...)
  run authenticated, and so does ``model.fix_precision().share(...,
  active_security=True)`` inference of a model built from such layers.
* Every opening is checked, batched: before ``.get()`` reveals a result, the
  pending openings and the result are verified in **one round**: with fresh
  public coefficients ``r`` (a 32-byte seed expanded by each party), each
  party sends, for every opened ``v_j``, ``gamma_ij = <r_j, mac_i(v_j)>``
  (one ring element per opening) and the verifier checks
  ``sum_i gamma_ij == alpha * <r_j, v_j>`` for every ``j``; otherwise
  :class:`~veil.mpc.errors.MacCheckError` is raised, naming the openings
  that failed (``Beaver mask e = x - a (mm)``, ``truncation mask c = x +
  r``, ``output``), and nothing is returned.

Limits (read before use):

* **The bound is weak for high-bit errors.** The ring is Z/2^64, not
  SPDZ2k's Z/2^(64+s) [Cramer et al. 2018]. An additive error ``delta =
  2^v * odd`` in a share (with any MAC adjustment the cheater picks) passes
  one check with probability exactly ``(k + 2) / 2^(k + 1)``, ``k = 64 - v``,
  over the uniform key and check coefficients: 0.75 for a top-bit error
  (``v = 63``), 0.5 for ``v = 62``, below ``2^-24`` for ``v <= 32``, below
  ``2^-40`` only for ``v <= 17``. The key is fixed per (provider, parties)
  for the process, so a cheater that guesses the low ``k`` bits of ``alpha``
  right (probability ``2^-k``; e.g. "alpha is even" for the top bit) escapes
  every later check of such errors too, until :func:`new_session` draws a
  fresh key. ``tests/mpc/test_mac_escape.py``
  measures these rates for errors in shares, triples, truncation pairs and
  openings. A ``2^-40`` bound for every error needs SPDZ2k (shares and MACs
  in Z/2^(64+40)), which veil does not implement. Truncation makes the
  escaping errors matter more: an error ``2^v`` in ``c`` becomes ``2^v / d``
  in the result.
* Comparisons, ReLU, max/argmax and max-pooling are refused on
  authenticated tensors (:class:`UnsupportedOperationError`, raised by
  :func:`refuse`): they would need authenticated comparison material
  (verifiable FSS keys or authenticated bit decompositions), not dealt.
  ``x / y`` for a shared ``y`` is refused as without MACs.
* The crypto provider and the orchestrator know ``alpha``: as in
  trusted-dealer SPDZ, they must not collude with a party.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from veil.mpc import truncation as _truncation  # noqa: F401  (registers trunc_mask / trunc_finish)
from veil.mpc.errors import MacCheckError, ShareMismatchError, UnsupportedOperationError
from veil.mpc.op_classes import BILINEAR_RING_OP, OpClass, classify, ops_of
from veil.mpc.party import open_parties, party_function, run_party
from veil.mpc.prg import expand, new_seed
from veil.mpc.ring import DTYPE, bilinear

aten = torch.ops.aten


@dataclass(eq=False)
class MacKey:
    """One MAC key per (provider, parties): the verifier's state.

    Attributes:
        key_id: Names the key at the crypto provider.
        alpha: The key (0-dim int64); never leaves the verifier and the provider.
        alpha_shares: Shares of ``alpha`` on the parties (an unauthenticated
            AdditiveSharingTensor).
        pending: Opened values not yet checked, with their shared MACs.
    """

    key_id: str
    alpha: torch.Tensor
    alpha_shares: Any
    pending: list = field(default_factory=list)

    def __repr__(self) -> str:  # never print the key
        return f"MacKey(key_id={self.key_id!r}, pending={len(self.pending)})"


_KEYS: dict[tuple, tuple[Any, MacKey]] = {}


def key_for(provider: Any, parties: Sequence[Any]) -> MacKey:
    """The MAC key of ``provider`` and ``parties``, dealt on first use."""
    from veil.tensors.additive import party_id, share

    ids = tuple(party_id(p) for p in parties)
    entry = _KEYS.get((id(provider), ids))
    if entry is not None and entry[0] is provider:
        return entry[1]
    alpha = torch.tensor(secrets.randbits(64) - (1 << 63), dtype=DTYPE)  # OS randomness
    alpha_shares = aten.view.default(share(alpha.reshape(1), parties, provider), [])
    key = MacKey(f"mac-{secrets.token_hex(8)}", alpha, alpha_shares)
    provider.register_mac_key(key.key_id, alpha)
    _KEYS[(id(provider), ids)] = (provider, key)
    return key


def new_session() -> None:
    """Forgets every MAC key: the next ``share(..., active_security=True)``
    deals a fresh ``alpha`` (tensors authenticated before cannot be combined
    with later ones). Limits how long one guessed key stays useful."""
    _KEYS.clear()


def authenticate(value: Any, plain: torch.Tensor, parties: Sequence[Any]) -> Any:
    """Attaches MAC shares of ``alpha * plain`` to the shared ``value``."""
    from veil.tensors.additive import share

    key = key_for(value.crypto_provider, parties)
    value.mac = share(plain.detach().to(DTYPE) * key.alpha, parties, value.crypto_provider)
    value.mac_key = key
    return value


def is_authenticated(value: Any) -> bool:
    return getattr(value, "mac", None) is not None


def _strip(value: Any, cls: type) -> Any:
    return cls(value.child, value.crypto_provider) if isinstance(value, cls) else value


def _macs(args: Any, cls: type) -> Any:
    return [a.mac if isinstance(a, cls) else a for a in args]


def _wrap(cls: type, value: Any, mac: Any, key: MacKey) -> Any:
    """Attaches ``mac`` (shares of ``alpha * value``) to the shared ``value``."""
    value.mac, value.mac_key = mac, key
    return value


def _key(cls: type, args: Sequence[Any]) -> MacKey:
    shared = [a for a in tree_flatten(args)[0] if isinstance(a, cls)]
    keys = {id(a.mac_key) if is_authenticated(a) else None for a in shared}
    if len(keys) != 1 or None in keys:
        raise ShareMismatchError("cannot combine authenticated (active_security=True) and unauthenticated shares")
    return shared[0].mac_key


def _public_times_alpha(key: MacKey, c: Any) -> Any:
    c = c if isinstance(c, torch.Tensor) else torch.tensor(c, dtype=DTYPE)
    return aten.mul.Tensor(key.alpha_shares, c.to(DTYPE))


# What each op does to MACs follows its class in the one op table (veil.mpc.op_classes).
_ADD_SUB = (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar)
_FLOOR_DIV = (aten.div.Tensor_mode, aten.div.Scalar_mode, aten.floor_divide.default, aten.floor_divide.Scalar)
_PUBLIC_CONSTANTS = ops_of(OpClass.PUBLIC_CONSTANT)


def _product_op(func: Any) -> Optional[str]:
    """The Beaver ring op of a bilinear aten op (convolution has its own path)."""
    if classify(func) is not OpClass.BILINEAR or func is aten.convolution.default:
        return None
    return BILINEAR_RING_OP[func.overloadpacket.__name__]


def _authenticated_public(cls: type, public: torch.Tensor, like: Any, key: MacKey) -> Any:
    """A public int64 tensor as an authenticated sharing (party 0 holds it)."""
    value = cls.from_public(public, _strip(like, cls))
    return _wrap(cls, value, _public_times_alpha(key, public), key)


def _linear(cls: type, func: Any, args: Any, kwargs: dict, key: MacKey) -> Any:
    """``func`` linear in its shared arguments: applied to values and MACs alike."""
    flat_args, spec = tree_flatten(args)
    values = func(*tree_unflatten([_strip(a, cls) for a in flat_args], spec), **kwargs)
    macs = func(*tree_unflatten([a.mac if isinstance(a, cls) else a for a in flat_args], spec), **kwargs)
    v_flat, v_spec = tree_flatten(values)
    m_flat = tree_flatten(macs)[0]
    out = [_wrap(cls, v, m, key) if isinstance(v, cls) else v for v, m in zip(v_flat, m_flat)]
    return tree_unflatten(out, v_spec)


def dispatch(cls: type, func: Any, args: tuple, kwargs: dict, local_ops: Sequence[Any]) -> Any:
    """Runs ``func`` on authenticated shares, keeping the MACs consistent.

    Raises:
        UnsupportedOperationError: For ops that would lose authentication.
    """
    from veil.tensors._dispatch import decompose
    from veil.tensors.rules.additive import public_int
    from veil.tensors.rules.common import scalar_value

    key = _key(cls, (args, kwargs))
    stripped = tuple(_strip(a, cls) for a in args)
    if func in local_ops or func.overloadpacket in local_ops:
        # Structural ops are linear in the shares; public tensor operands are indices.
        return _linear(cls, func, args, kwargs, key)
    if func in (aten.cat.default, aten.stack.default):
        like = next(t for t in args[0] if isinstance(t, cls))
        tensors = [t if isinstance(t, cls) else _authenticated_public(cls, public_int(t, str(func)), like, key)
                   for t in args[0]]
        return _linear(cls, func, (tensors,) + tuple(args[1:]), kwargs, key)
    pad_value = args[2] if len(args) > 2 else kwargs.get("value", 0)
    if func is aten.constant_pad_nd.default and scalar_value(pad_value) == 0:  # zero padding is linear
        return _linear(cls, func, args[:2], {}, key)
    if func in _PUBLIC_CONSTANTS:
        plain = torch.zeros(tuple(args[0].shape), dtype=DTYPE)
        public = func(plain, *[public_int(a, str(func)) if not isinstance(a, (list, tuple)) else a
                               for a in args[1:]], dtype=DTYPE)
        return _authenticated_public(cls, public, args[0], key)
    if func in _ADD_SUB and scalar_value(kwargs.get("alpha", 1)) == 1:
        x, y = args[0], scalar_value(args[1])
        value = func(*stripped)
        if isinstance(x, cls) and isinstance(y, cls):
            return _wrap(cls, value, func(x.mac, y.mac), key)
        if isinstance(x, cls):  # x +- c: every party adds c * alpha_i to its MAC share
            return _wrap(cls, value, func(x.mac, _public_times_alpha(key, y)), key)
        if isinstance(y, cls):  # c +- y
            return _wrap(cls, value, func(_public_times_alpha(key, public_int(x, str(func))), y.mac), key)
    if func in _FLOOR_DIV and isinstance(args[0], cls) and not isinstance(args[1], cls):
        mode = kwargs.get("rounding_mode", "floor" if func.overloadpacket is aten.floor_divide else None)
        d = scalar_value(args[1])
        if mode in ("floor", "trunc") and not isinstance(d, torch.Tensor):
            d = int(public_int(d, str(func)))
            if d > 0:
                return truncate(args[0], d)
    if func is aten.convolution.default:
        return _convolution(cls, args, key)
    product = _product_op(func)
    if product is not None:
        x, y = args[0], scalar_value(args[1])
        if isinstance(x, cls) and isinstance(y, cls):
            return _beaver(cls, x, y, product, key)
        for a, b in ((x, y), (y, x)):
            if isinstance(a, cls) and not isinstance(b, cls):
                b = b if not isinstance(b, torch.Tensor) or not b.dtype.is_floating_point else None
                if b is None:
                    break
                ordered = (a, b) if a is x else (b, a)
                value = func(*[_strip(o, cls) for o in ordered])
                macs = [o.mac if isinstance(o, cls) else o for o in ordered]
                return _wrap(cls, value, func(*macs), key)
    if classify(func) is not OpClass.COMPARISON:  # composite ops (addmm, rsub, ...): decomposed, MACs kept
        decomposed = decompose(func, args, kwargs)
        if decomposed is not NotImplemented:
            return decomposed
    raise UnsupportedOperationError(
        f"{func} is not available on authenticated shares (active_security=True): only linear ops, products by "
        "public integers, Beaver products (mul, mm, bmm, matmul, conv2d) and truncation (fixed-point products, "
        "division by a public integer) keep SPDZ MACs; comparisons, ReLU and max would need authenticated "
        "comparison material that veil does not deal"
    )


def _convolution(cls: type, args: tuple, key: MacKey) -> Any:
    """2-D convolution: Beaver (both shared) or linear (one public operand), then the bias."""
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
    if transposed or len(x.shape) != 4:
        raise UnsupportedOperationError("only 2-D, non-transposed convolution is implemented on shared tensors")
    if isinstance(x, cls) and isinstance(w, cls):
        conv_kwargs = dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups)
        out = _beaver(cls, x, w, "conv2d", key, conv_kwargs)
    else:
        rest = (None, stride, padding, dilation, transposed, output_padding, groups)
        out = _linear(cls, aten.convolution.default, (x, w) + rest, {}, key)
    if bias is not None:
        out = aten.add.Tensor(out, aten.view.default(bias, [1, -1, 1, 1]))
    return out


def _beaver(cls: type, x: Any, y: Any, op: str, key: MacKey, op_kwargs: Optional[dict] = None) -> Any:
    """Authenticated Beaver product: shares and MAC shares of ``op(x, y)``."""
    op_kwargs = dict(op_kwargs or {})
    cls._veil_check_compatible((_strip(x, cls), _strip(y, cls)))
    parties = list(x.child)
    provider = x.crypto_provider
    shape_x, shape_y = tuple(x.shape), tuple(y.shape)
    tri = provider.authenticated_triples(key.key_id, op, shape_x, shape_y, parties, **op_kwargs)
    e, f = open_parties("beaver_mask", {p: (x.child[p], y.child[p], tri[p][0], tri[p][1]) for p in parties})
    z = {p: run_party("beaver_combine", *tri[p][:3], e, f, op=op, first=(i == 0), op_kwargs=op_kwargs)
         for i, p in enumerate(parties)}
    mz = {p: run_party("beaver_combine", *tri[p][3:], e, f, op=op, first=False, op_kwargs=op_kwargs)
          for p in parties}
    # alpha * op(e, f), the public term's MAC, from the parties' key shares.
    mac = aten.add.Tensor(cls(mz, provider), _public_times_alpha(key, bilinear(op)(e, f, **op_kwargs)))
    key.pending.append((f"Beaver mask e = x - a ({op})", e,
                        aten.sub.Tensor(x.mac, cls({p: tri[p][3] for p in parties}, provider))))
    key.pending.append((f"Beaver mask f = y - b ({op})", f,
                        aten.sub.Tensor(y.mac, cls({p: tri[p][4] for p in parties}, provider))))
    return _wrap(cls, cls(z, provider), mac, key)


def truncate(value: Any, divisor: int) -> Any:
    """Authenticated truncation: shares and MAC shares of ``value / divisor``.

    The dealt-pair protocol of :mod:`veil.mpc.truncation` with every field
    authenticated: the opened ``c = x + K + r`` is recorded with its MAC for
    the batched check, and ``z``'s MAC follows from the public ``c`` and the
    MAC shares of ``q`` and ``g``. ``z`` is ``floor(x/d)`` or ``floor(x/d) +
    1`` for every ``|x| <= 2^62 - d`` (no failure probability).

    Args:
        value: An authenticated AdditiveSharingTensor.
        divisor: A public positive integer.
    """
    if int(divisor) != divisor or divisor <= 0:
        raise ValueError(f"divisor must be a positive integer, got {divisor!r}")
    divisor = int(divisor)
    if divisor == 1:  # a copy: opening the result must not free the operand's shares
        return _linear(type(value), aten.clone.default, (value,), {}, value.mac_key)
    cls, key, provider = type(value), value.mac_key, value.crypto_provider
    parties = list(value.child)
    pairs = provider.authenticated_truncation_pairs(key.key_id, tuple(value.shape), divisor, parties)
    shift = _truncation.shift_for(divisor)
    (c,) = open_parties("trunc_mask", {p: (value.child[p], pairs[p][0], shift if i == 0 else 0)
                                       for i, p in enumerate(parties)})
    z = {p: run_party("trunc_finish", c, pairs[p][1], pairs[p][2], divisor=divisor, first=(i == 0))
         for i, p in enumerate(parties)}
    # mac(z) = alpha (floor(c/d) - K/d) + (1 - c_hi) (alpha g) - (alpha q)
    public = _truncation.floor_div_unsigned(c, divisor) - shift // divisor
    wrap = 1 - _truncation.top_bit(c)
    mac = aten.add.Tensor(
        aten.sub.Tensor(_public_times_alpha(key, public), cls({p: pairs[p][4] for p in parties}, provider)),
        aten.mul.Tensor(cls({p: pairs[p][5] for p in parties}, provider), wrap),
    )
    shifted_mac = aten.add.Tensor(value.mac, _public_times_alpha(key, torch.tensor(shift, dtype=DTYPE)))
    key.pending.append(("truncation mask c = x + r",
                        c, aten.add.Tensor(shifted_mac, cls({p: pairs[p][3] for p in parties}, provider))))
    return _wrap(cls, cls(z, provider), mac, key)


def refuse(value: Any, what: str) -> None:
    """Raises for a protocol step that cannot keep ``value``'s MACs.

    Raises:
        UnsupportedOperationError: If ``value`` is authenticated.
    """
    if is_authenticated(value):
        raise UnsupportedOperationError(
            f"{what} is not available on authenticated shares (active_security=True): it needs authenticated "
            "comparison material (e.g. verifiable function-secret-sharing keys), which veil does not deal"
        )


@party_function("mac_gamma", openable=True)
def _mac_gamma(seed: torch.Tensor, macs: list) -> tuple:
    """A party's ``<r_j, mac_i(v_j)>`` for each item ``j``, coefficients ``r`` from ``seed``."""
    seed_bytes = bytes(seed.to(torch.uint8).tolist())
    gammas = [(expand(seed_bytes, f"mac/{j}", mac.shape) * mac).sum() for j, mac in enumerate(macs)]
    return (torch.stack(gammas) if gammas else torch.zeros(0, dtype=DTYPE),)


def check(key: MacKey, extra: Sequence[tuple] = ()) -> None:
    """Verifies every pending opening of ``key`` (and ``extra``) in one round.

    Args:
        key: The MAC key whose pending openings to check.
        extra: More ``(label, opened value, shared MAC)`` items (e.g. an output).

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
    parties = list(items[0][2].child)
    (gamma,) = open_parties("mac_gamma", {p: (seed_t, [mac.child[p] for _, _, mac in items]) for p in parties})
    expected = []
    for j, (_, value, mac) in enumerate(items):
        value = torch.as_tensor(value, dtype=DTYPE).expand(tuple(mac.shape))
        expected.append((expand(seed, f"mac/{j}", mac.shape) * value).sum())
    expected = torch.stack(expected) * key.alpha
    if tuple(gamma.shape) != tuple(expected.shape):
        raise MacCheckError("SPDZ MAC check failed: a party answered the check with the wrong number of values")
    failed = [items[j][0] for j in torch.nonzero(gamma != expected).flatten().tolist()]
    if failed:
        names = "; ".join(dict.fromkeys(failed))
        raise MacCheckError(
            f"SPDZ MAC check failed on {len(failed)} of {len(items)} opened value(s) ({names}): a share or a MAC "
            "share was modified by a party (or the parties hold inconsistent material); the computation was "
            "aborted and no result revealed"
        )


def reconstruct_checked(value: Any) -> torch.Tensor:
    """Opens an authenticated value after checking it and every pending opening."""
    from veil.mpc.opening import reconstruct

    plain = reconstruct(value.child)
    check(value.mac_key, [("output", plain, value.mac)])
    return plain
