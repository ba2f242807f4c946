"""Optional active security: SPDZ information-theoretic MACs on shares.

``x.share(alice, bob, crypto_provider=cp, active_security=True)`` shares
``x`` *and* ``alpha * x`` (its MAC) under a global MAC key ``alpha`` [SPDZ,
Damgard et al. 2012]. ``alpha`` is drawn by the orchestrator (the verifier:
it already sees every opened value) and given to the crypto provider, which
needs it to authenticate Beaver triples; the parties hold only additive
shares of ``alpha`` and of every MAC, so a party that changes its share of a
value by ``delta`` must also change its MAC share by ``alpha * delta``, which
it cannot compute.

* Linear ops (every structural op, ``+``, ``-``, ``neg``, ``sum``) act on
  values and MACs alike; a public constant ``c`` is added by party 0 to the
  value and by every party as ``c * alpha_i`` to the MAC; products by public
  integers scale both.
* Products of two shared tensors (``mul``, ``mm``, ``bmm``) use authenticated
  triples ``(a, b, c, alpha*a, alpha*b, alpha*c)``; the opened ``e = x - a``
  and ``f = y - b`` are recorded with their MACs.
* Every opening is checked, batched: before ``.get()`` reveals a result, the
  pending openings and the result are verified in **one round**: with fresh
  public coefficients ``r`` (a 32-byte seed expanded by each party), each
  party sends ``gamma_i = sum_j <r_j, mac_i(v_j)>`` and the verifier checks
  ``sum_i gamma_i == alpha * sum_j <r_j, v_j>``; otherwise
  :class:`~veil.mpc.errors.MacCheckError` is raised and nothing is returned.

Limits (read before use):

* The ring is Z/2^64, not SPDZ2k's Z/2^(64+s) [Cramer et al. 2018]: an
  additive error ``delta`` escapes detection with probability
  ``2^(v - 64)`` where ``2^v`` is the largest power of two dividing
  ``delta``; a change of the top bit only (``delta = 2^63``) is caught with
  probability 1/2 per check. Any error in the low 32 bits is caught except
  with probability below ``2^-32``.
* Truncation (fixed-point products), comparisons, ReLU and max are refused
  on authenticated tensors (:class:`UnsupportedOperationError`): they need
  authenticated truncation pairs and comparison material, not implemented.
  Fixed-point tensors may be authenticated for linear work only.
* The crypto provider and the orchestrator know ``alpha``: as in
  trusted-dealer SPDZ, they must not collude with a party.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from veil.mpc.errors import MacCheckError, ShareMismatchError, UnsupportedOperationError
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


_ADD_SUB = (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar)
_PRODUCTS = {aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", aten.mm.default: "mm", aten.bmm.default: "bmm"}


def dispatch(cls: type, func: Any, args: tuple, kwargs: dict, local_ops: Sequence[Any]) -> Any:
    """Runs ``func`` on authenticated shares, keeping the MACs consistent.

    Raises:
        UnsupportedOperationError: For ops that would lose authentication.
    """
    from veil.tensors.rules.common import scalar_value

    key = _key(cls, (args, kwargs))
    stripped = tuple(_strip(a, cls) for a in args)
    if func in local_ops or func.overloadpacket in local_ops:
        # Structural ops are linear in the shares; public tensor operands are indices.
        flat_args, spec = tree_flatten(args)
        values = func(*tree_unflatten([_strip(a, cls) for a in flat_args], spec), **kwargs)
        macs = func(*tree_unflatten([a.mac if isinstance(a, cls) else a for a in flat_args], spec), **kwargs)
        v_flat, v_spec = tree_flatten(values)
        m_flat = tree_flatten(macs)[0]
        out = [_wrap(cls, v, m, key) if isinstance(v, cls) else v for v, m in zip(v_flat, m_flat)]
        return tree_unflatten(out, v_spec)
    if func in _ADD_SUB and scalar_value(kwargs.get("alpha", 1)) == 1:
        x, y = args[0], scalar_value(args[1])
        value = func(*stripped)
        if isinstance(x, cls) and isinstance(y, cls):
            return _wrap(cls, value, func(x.mac, y.mac), key)
        if isinstance(x, cls):  # x +- c: every party adds c * alpha_i to its MAC share
            return _wrap(cls, value, func(x.mac, _public_times_alpha(key, y)), key)
    if func in (aten.rsub.Scalar, aten.rsub.Tensor) and not isinstance(args[1], cls):
        value = func(*stripped)
        return _wrap(cls, value, aten.sub.Tensor(_public_times_alpha(key, scalar_value(args[1])), args[0].mac), key)
    if func in _PRODUCTS:
        x, y = args[0], scalar_value(args[1])
        if isinstance(x, cls) and isinstance(y, cls):
            return _beaver(cls, x, y, _PRODUCTS[func], key)
        for a, b in ((x, y), (y, x)):
            if isinstance(a, cls) and not isinstance(b, cls):
                b = b if not isinstance(b, torch.Tensor) or not b.dtype.is_floating_point else None
                if b is None:
                    break
                ordered = (a, b) if a is x else (b, a)
                value = func(*[_strip(o, cls) for o in ordered])
                macs = [o.mac if isinstance(o, cls) else o for o in ordered]
                return _wrap(cls, value, func(*macs), key)
    raise UnsupportedOperationError(
        f"{func} is not available on authenticated shares (active_security=True): only linear ops, products by "
        "public integers and Beaver products (mul, mm, bmm) keep SPDZ MACs; truncation and comparisons need "
        "authenticated material that veil does not deal yet"
    )


def _beaver(cls: type, x: Any, y: Any, op: str, key: MacKey) -> Any:
    """Authenticated Beaver product: shares and MAC shares of ``op(x, y)``."""
    parties = list(x.child)
    provider = x.crypto_provider
    shape_x, shape_y = tuple(x.shape), tuple(y.shape)
    tri = provider.authenticated_triples(key.key_id, op, shape_x, shape_y, parties)
    e, f = open_parties("beaver_mask", {p: (x.child[p], y.child[p], tri[p][0], tri[p][1]) for p in parties})
    z = {p: run_party("beaver_combine", *tri[p][:3], e, f, op=op, first=(i == 0), op_kwargs={})
         for i, p in enumerate(parties)}
    mz = {p: run_party("beaver_combine", *tri[p][3:], e, f, op=op, first=False, op_kwargs={}) for p in parties}
    # alpha * op(e, f), the public term's MAC, from the parties' key shares.
    mac = aten.add.Tensor(cls(mz, provider), _public_times_alpha(key, bilinear(op)(e, f)))
    key.pending.append((e, aten.sub.Tensor(x.mac, cls({p: tri[p][3] for p in parties}, provider))))
    key.pending.append((f, aten.sub.Tensor(y.mac, cls({p: tri[p][4] for p in parties}, provider))))
    return _wrap(cls, cls(z, provider), mac, key)


@party_function("mac_gamma", openable=True)
def _mac_gamma(seed: torch.Tensor, macs: list) -> tuple:
    """A party's ``sum_j <r_j, mac_i(v_j)>`` for coefficients ``r`` from ``seed``."""
    seed_bytes = bytes(seed.to(torch.uint8).tolist())
    total = torch.zeros((), dtype=DTYPE)
    for j, mac in enumerate(macs):
        total = total + (expand(seed_bytes, f"mac/{j}", mac.shape) * mac).sum()
    return (total,)


def check(key: MacKey, extra: Sequence[tuple] = ()) -> None:
    """Verifies every pending opening of ``key`` (and ``extra``) in one round.

    Args:
        key: The MAC key whose pending openings to check.
        extra: More ``(opened value, shared MAC)`` pairs (e.g. an output).

    Raises:
        MacCheckError: If a share or MAC was tampered with.
    """
    items = list(key.pending) + list(extra)
    key.pending.clear()
    if not items:
        return
    seed = new_seed()
    seed_t = torch.frombuffer(bytearray(seed), dtype=torch.uint8)
    parties = list(items[0][1].child)
    (gamma,) = open_parties("mac_gamma", {p: (seed_t, [mac.child[p] for _, mac in items]) for p in parties})
    expected = torch.zeros((), dtype=DTYPE)
    for j, (value, mac) in enumerate(items):
        value = torch.as_tensor(value, dtype=DTYPE).expand(tuple(mac.shape))
        expected = expected + (expand(seed, f"mac/{j}", mac.shape) * value).sum()
    if not torch.equal(gamma, expected * key.alpha):
        raise MacCheckError(
            f"SPDZ MAC check failed on {len(items)} opened value(s): a share or a MAC share was modified by a "
            "party (or the parties hold inconsistent material); the computation was aborted and no result revealed"
        )


def reconstruct_checked(value: Any) -> torch.Tensor:
    """Opens an authenticated value after checking it and every pending opening."""
    from veil.mpc.opening import reconstruct

    plain = reconstruct(value.child)
    check(value.mac_key, [(plain, value.mac)])
    return plain
