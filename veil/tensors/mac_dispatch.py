"""Tensor glue of active security: aten ops on SPDZ2k-authenticated shared tensors.

An authenticated :class:`~veil.tensors.additive.AdditiveSharingTensor` ``x``
keeps the low 64-bit limb of its 128-bit value shares as ``x.child`` (so
``x.child`` still reconstructs the value mod 2^64) and the three other limbs
in ``x.mac`` (:class:`MacLimbs`: value high limb, MAC low and high limbs,
each an unauthenticated AdditiveSharingTensor of the same shape). The
protocols are in :mod:`veil.mpc.mac`; this module maps each op to one of:

* **limb-wise** (structural ops, ``cat``, zero padding, zeros): the op moves
  entries only, so it runs on each limb unchanged;
* **carrying linear** (``sum``, ``neg``, ``x - y``, ...): the op is applied
  to 32-bit digits of the low limbs and recombined mod 2^128
  (:func:`veil.mpc.ring128.linear`, run on each party);
* **public bilinear** (``x @ W``, ``conv2d(x, W)`` for a public ``W``): 16-bit
  digits on both sides (:func:`veil.mpc.ring128.bilinear`);
* **protocol** (shared products, truncation, public constants, openings);
* **comparison** (``>``, ``==``, ReLU, max, argmax, max-pooling): the
  comparison rules (:mod:`veil.tensors.rules.comparison`) run on
  authenticated tensors too; their protocol step is :func:`sign_select`
  (:mod:`veil.mpc.mac_comparison`);

and refuses the rest (e.g. division by a shared value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from veil.mpc import mac, mac_comparison  # importing registers their party functions (workers too)
from veil.mpc import ring128 as r128
from veil.mpc.errors import ShareMismatchError, UnsupportedOperationError
from veil.mpc.op_classes import BILINEAR_RING_OP, OpClass, classify, ops_of
from veil.mpc.party import run_party
from veil.mpc.ring import DTYPE

aten = torch.ops.aten


@dataclass
class MacLimbs:
    """The limbs of an authenticated tensor besides ``x.child`` (unauthenticated ASTs)."""

    hi: Any
    mac_lo: Any
    mac_hi: Any

    def __repr__(self) -> str:  # never print shares
        return f"MacLimbs(shape={tuple(self.hi.shape)})"


_ZERO_OPS = ops_of(OpClass.PUBLIC_CONSTANT)
_LIMBWISE = (aten.zeros_like.default, aten.new_zeros.default)
_ADD_SUB = (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar)
_FLOOR_DIV = (aten.div.Tensor_mode, aten.div.Scalar_mode, aten.floor_divide.default, aten.floor_divide.Scalar)
_CARRYING = (aten.sum, aten.cumsum.default, aten.neg.default)


# ------------------------------------------------------------------ placing shares and keys

def _placer(parties: Sequence[Any]):
    """Places per-party limbs at the parties (workers: sent, ids: kept local)."""
    from veil.ids import new_id
    from veil.messaging import messages as m
    from veil.tensors.mpc_glue.remote_sharing import is_worker, local_worker_of
    from veil.tensors.additive import party_id
    from veil.tensors.pointer import PointerTensor

    by_id = {party_id(p): p for p in parties}

    def place(per_party: dict) -> dict:
        out = {}
        for pid, tensors in per_party.items():
            worker = by_id[pid]
            if not is_worker(worker):
                out[pid] = list(tensors)
                continue
            owner = local_worker_of([worker])
            ids = [new_id() for _ in tensors]
            owner.send_msg(m.ObjectMessage([m.StoredObject(i, t.contiguous()) for i, t in zip(ids, tensors)]), worker)
            out[pid] = [PointerTensor(worker, i, owner, tuple(t.shape), DTYPE) for i, t in zip(ids, tensors)]
        return out

    return place


def share_authenticated(tensor: torch.Tensor, parties: Sequence[Any], provider: Any) -> Any:
    """``tensor`` shared mod 2^128 with SPDZ2k MACs (``share(..., active_security=True)``)."""
    from veil.mpc.sharing import split
    from veil.tensors.additive import AdditiveSharingTensor, party_id

    split(tensor.detach()[:0], 2)  # the dtype checks of plain sharing
    ids = [party_id(p) for p in parties]
    place = _placer(parties)
    key = mac.key_for(provider, ids, place)
    pieces = mac.input_shares(tensor.detach().to(DTYPE), key, len(ids))
    placed = place({p: list(s) for p, s in zip(ids, pieces)})
    return _wrap(AdditiveSharingTensor, placed, provider, key)


# ------------------------------------------------------------------ limbs <-> tensors

def _ast(cls: type, shares: dict, provider: Any) -> Any:
    return cls(dict(shares), provider)


def _wrap(cls: type, per_party: dict, provider: Any, key: mac.MacKey) -> Any:
    """An authenticated tensor from ``{party: (v_lo, v_hi, m_lo, m_hi)}``."""
    limbs = [_ast(cls, {p: per_party[p][k] for p in per_party}, provider) for k in range(4)]
    out = limbs[0]
    out.mac, out.mac_key = MacLimbs(*limbs[1:]), key
    return out


def _limbs(x: Any) -> dict:
    return {p: (x.child[p], x.mac.hi.child[p], x.mac.mac_lo.child[p], x.mac.mac_hi.child[p]) for p in x.child}


def _limb_tensors(x: Any, cls: type) -> list:
    """The four limbs of ``x`` as unauthenticated tensors."""
    return [cls(x.child, x.crypto_provider), x.mac.hi, x.mac.mac_lo, x.mac.mac_hi]


def is_authenticated(value: Any) -> bool:
    return mac.is_authenticated(value)


def _key(cls: type, args: Any) -> mac.MacKey:
    shared = [a for a in tree_flatten(args)[0] if isinstance(a, cls)]
    keys = {id(a.mac_key) if is_authenticated(a) else None for a in shared}
    if len(keys) != 1 or None in keys:
        raise ShareMismatchError("cannot combine authenticated (active_security=True) and unauthenticated shares")
    cls._veil_check_compatible([cls(a.child, a.crypto_provider) for a in shared])
    return shared[0].mac_key


def _public_int(value: Any, what: str) -> Any:
    from veil.tensors.rules.additive import public_int

    return public_int(value, what)


def _scalar(value: Any) -> Any:
    from veil.tensors.rules.common import scalar_value

    return scalar_value(value)


# ------------------------------------------------------------------ op paths

def _limbwise(cls: type, func: Any, args: Any, kwargs: dict, key: mac.MacKey) -> Any:
    """``func`` moves entries only: run it on each limb."""
    flat, spec = tree_flatten((args, kwargs))
    outs = []
    for k in range(4):
        leaves = [_limb_tensors(a, cls)[k] if isinstance(a, cls) else a for a in flat]
        a, kw = tree_unflatten(leaves, spec)
        outs.append(func(*a, **kw))
    flat_outs = [tree_flatten(o)[0] for o in outs]
    out_spec = tree_flatten(outs[0])[1]
    result = []
    for leaves in zip(*flat_outs):
        if isinstance(leaves[0], cls):
            value = leaves[0]
            value.mac, value.mac_key = MacLimbs(*leaves[1:]), key
            result.append(value)
        else:
            result.append(leaves[0])
    return tree_unflatten(result, out_spec)


def _digit_tensors(cls: type, x: Any, limb: int, width: int) -> list:
    """Unsigned ``width``-bit digits of limb 0 (value) or 2 (MAC) of ``x``, as unauthenticated tensors."""
    source = _limb_tensors(x, cls)[limb]
    per_party = {p: run_party("mac_digits", s, width=width) for p, s in source.child.items()}
    return [cls({p: per_party[p][i] for p in per_party}, x.crypto_provider) for i in range(64 // width)]


def _combine(cls: type, provider: Any, terms: list, hi_extra: list) -> tuple:
    """Per party, the 128-bit share ``sum 2^(16 c) T + 2^64 sum(hi_extra)``: (lo, hi) tensors."""
    parties = list(terms[0][1].child)
    out = {p: run_party("mac_combine", [c for c, _ in terms], [t.child[p] for _, t in terms],
                        [h.child[p] for h in hi_extra]) for p in parties}
    return cls({p: out[p][0] for p in parties}, provider), cls({p: out[p][1] for p in parties}, provider)


def _carrying_linear(cls: type, func: Any, args: tuple, kwargs: dict, key: mac.MacKey) -> Any:
    """``func`` linear with small coefficients in its shared arguments, mod 2^128."""
    flat, spec = tree_flatten((args, kwargs))
    shared = [a for a in flat if isinstance(a, cls)]
    provider = shared[0].crypto_provider

    def apply(replace) -> Any:
        leaves = [replace(a) if isinstance(a, cls) else a for a in flat]
        a, kw = tree_unflatten(leaves, spec)
        return func(*a, **kw)

    limbs = []
    for lo_index, hi_index in ((0, 1), (2, 3)):
        digit = {id(a): _digit_tensors(cls, a, lo_index, 32) for a in shared}
        t0 = apply(lambda a: digit[id(a)][0])
        t1 = apply(lambda a: digit[id(a)][1])
        hi = apply(lambda a: _limb_tensors(a, cls)[hi_index])
        limbs += list(_combine(cls, provider, [(0, t0), (2, t1)], [hi]))
    out = limbs[0]
    out.mac, out.mac_key = MacLimbs(*limbs[1:]), key
    return out


def _public_bilinear(cls: type, func: Any, x: Any, public: torch.Tensor, public_first: bool, key: mac.MacKey,
                     extra: tuple = (), kwargs: dict | None = None) -> Any:
    """``func(P, x)`` or ``func(x, P)`` mod 2^128 for a public int64 ``P``."""
    kwargs = kwargs or {}
    p_lo, p_hi = r128.lift(public)

    def f(pub, shr):
        return func(pub, shr, *extra, **kwargs) if public_first else func(shr, pub, *extra, **kwargs)

    # 32-bit digits of P when few products meet in one entry (as in ring128.bilinear): 8 images, not 16
    width = 32 if r128._products_per_entry(f, p_lo, torch.zeros(tuple(x.shape), dtype=DTYPE)) < 1 << 12 else 16
    p_digits = r128.digits(p_lo, width)
    limbs = []
    for lo_index, hi_index in ((0, 1), (2, 3)):
        x_digits = _digit_tensors(cls, x, lo_index, 16)
        terms = [((width // 16) * i + j, f(pi, xj)) for i, pi in enumerate(p_digits) for j, xj in enumerate(x_digits)]
        x_lo, x_hi = _limb_tensors(x, cls)[lo_index], _limb_tensors(x, cls)[hi_index]
        hi_extra = [f(p_lo, x_hi)]
        if bool((p_hi != 0).any()):
            hi_extra.append(f(p_hi, x_lo))
        limbs += list(_combine(cls, x.crypto_provider, terms, hi_extra))
    out = limbs[0]
    out.mac, out.mac_key = MacLimbs(*limbs[1:]), key
    return out


def _from_public(cls: type, value: torch.Tensor, like: Any, key: mac.MacKey) -> Any:
    return _wrap(cls, mac.public(value.to(DTYPE), list(like.child), key), like.crypto_provider, key)


def _add_public(cls: type, x: Any, public: Any, key: mac.MacKey, negate: bool = False) -> Any:
    public = torch.as_tensor(_public_int(public, "add"), dtype=DTYPE)
    return _wrap(cls, mac.add_public(_limbs(x), public, key, negate), x.crypto_provider, key)


def _scale(cls: type, x: Any, public: Any, key: mac.MacKey) -> Any:
    """Elementwise ``x * c`` for a public integer ``c`` (broadcasting)."""
    c = torch.as_tensor(public, dtype=DTYPE)
    per_party = {p: run_party("mac_scale", *limbs, c) for p, limbs in _limbs(x).items()}
    return _wrap(cls, per_party, x.crypto_provider, key)


def _beaver(cls: type, x: Any, y: Any, op: str, key: mac.MacKey, op_kwargs: dict | None = None) -> Any:
    out = mac.beaver(_limbs(x), _limbs(y), key, x.crypto_provider, op, tuple(x.shape), tuple(y.shape), op_kwargs)
    return _wrap(cls, out, x.crypto_provider, key)


def truncate(value: Any, divisor: int) -> Any:
    """Authenticated ``value / divisor`` (:func:`veil.mpc.mac.truncate`)."""
    if int(divisor) != divisor or divisor <= 0:
        raise ValueError(f"divisor must be a positive integer, got {divisor!r}")
    cls = type(value)
    if int(divisor) == 1:  # a copy: opening the result must not free the operand's shares
        return _limbwise(cls, aten.clone.default, (value,), {}, value.mac_key)
    out = mac.truncate(_limbs(value), int(divisor), value.mac_key, value.crypto_provider, tuple(value.shape))
    return _wrap(cls, out, value.crypto_provider, value.mac_key)


def reconstruct_checked(value: Any) -> torch.Tensor:
    """Opens an authenticated value after checking it and every pending opening."""
    return mac.open_output(_limbs(value), value.mac_key, value.crypto_provider, tuple(value.shape))


def refresh(value: Any) -> Any:
    """Same value, fresh value and MAC shares (a dealt authenticated zero sharing added)."""
    out = mac.refresh(_limbs(value), value.crypto_provider, tuple(value.shape))
    return _wrap(type(value), out, value.crypto_provider, value.mac_key)


def sign_select(d: Any, extras: Sequence[Any] = (), products: bool = True) -> tuple[Any, list]:
    """Authenticated ``[d > 0]`` and ``v * [d > 0]`` for ``v`` in ``(d, *extras)``
    (:func:`veil.mpc.mac_comparison.sign_select`): tensors with MACs."""
    cls = type(d)
    key = _key(cls, [d, *extras])
    bit, prods = mac_comparison.sign_select(_limbs(d), [_limbs(e) for e in extras], key, d.crypto_provider,
                                            tuple(d.shape), products)
    wrap = lambda shares: _wrap(cls, shares, d.crypto_provider, key)  # noqa: E731
    return wrap(bit), [wrap(p) for p in prods]


def public_like(value: torch.Tensor, like: Any) -> Any:
    """An authenticated sharing of the public int64 ``value`` under ``like``'s key."""
    return _from_public(type(like), torch.as_tensor(value, dtype=DTYPE), like, like.mac_key)


def _convolution(cls: type, args: tuple, key: mac.MacKey) -> Any:
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
    if transposed or len(x.shape) != 4:
        raise UnsupportedOperationError("only 2-D, non-transposed convolution is implemented on shared tensors")
    conv_kwargs = dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups)
    if isinstance(x, cls) and isinstance(w, cls):
        out = _beaver(cls, x, w, "conv2d", key, conv_kwargs)
    else:
        from veil.mpc.ring import conv2d

        shared, public = (x, w) if isinstance(x, cls) else (w, x)
        public = _public_int(public, "convolution")
        out = _public_bilinear(cls, lambda a, b, **kw: _conv(cls, conv2d, a, b, **kw), shared, public,
                               public_first=not isinstance(x, cls), key=key, kwargs=conv_kwargs)
    if bias is not None:
        out = aten.add.Tensor(out, aten.view.default(bias, [1, -1, 1, 1]))
    return out


def _conv(cls: type, conv2d: Any, a: Any, b: Any, **kw) -> Any:
    """conv2d of one shared digit tensor and one public digit tensor, share by share."""
    if isinstance(a, cls):
        return cls({p: conv2d(s, b, **kw) for p, s in a.child.items()}, a.crypto_provider)
    if not isinstance(b, cls):  # public only (counting the products per entry)
        return conv2d(a, b, **kw)
    return cls({p: conv2d(a, s, **kw) for p, s in b.child.items()}, b.crypto_provider)


def dispatch(cls: type, func: Any, args: tuple, kwargs: dict, local_ops: Sequence[Any]) -> Any:
    """Runs ``func`` on authenticated shares, keeping the MACs consistent.

    Raises:
        UnsupportedOperationError: For ops that would lose authentication.
    """
    from veil.tensors._dispatch import decompose
    from veil.tensors.rules.common import INPLACE_TO_OUTOFPLACE, run_inplace

    key = _key(cls, (args, kwargs))
    if func in INPLACE_TO_OUTOFPLACE:
        return run_inplace(cls, func, args, kwargs)
    if func.overloadpacket in _CARRYING or func in _CARRYING:  # before local_ops, which hold the linear class
        return _carrying_linear(cls, func, args, kwargs, key)
    if func in local_ops or func.overloadpacket in local_ops or func in _LIMBWISE:
        return _limbwise(cls, func, args, kwargs, key)
    if func in (aten.cat.default, aten.stack.default):
        like = next(t for t in args[0] if isinstance(t, cls))
        tensors = [t if isinstance(t, cls) else _from_public(cls, _public_int(t, str(func)), like, key)
                   for t in args[0]]
        return _limbwise(cls, func, (tensors,) + tuple(args[1:]), kwargs, key)
    pad_value = args[2] if len(args) > 2 else kwargs.get("value", 0)
    if func is aten.constant_pad_nd.default and _scalar(pad_value) == 0:  # zero padding moves entries
        return _limbwise(cls, func, args[:2], {}, key)
    if func in _ZERO_OPS:
        plain = torch.zeros(tuple(args[0].shape), dtype=DTYPE)
        public = func(plain, *[_public_int(a, str(func)) if not isinstance(a, (list, tuple)) else a
                               for a in args[1:]], dtype=DTYPE)
        return _from_public(cls, public, args[0], key)
    if func in _ADD_SUB and _scalar(kwargs.get("alpha", 1)) == 1:
        x, y = args[0], _scalar(args[1])
        subtract = func in (aten.sub.Tensor, aten.sub.Scalar)
        if isinstance(x, cls) and isinstance(y, cls):
            return _wrap(cls, mac.add(_limbs(x), _limbs(y), subtract), x.crypto_provider, key)
        if isinstance(x, cls):
            public = _public_int(y, str(func))
            return _add_public(cls, x, -public if subtract else public, key)
        return _add_public(cls, y, x, key, negate=subtract)  # c +- y
    if func in _FLOOR_DIV and isinstance(args[0], cls) and not isinstance(args[1], cls):
        mode = kwargs.get("rounding_mode", "floor" if func.overloadpacket is aten.floor_divide else None)
        d = _scalar(args[1])
        if mode in ("floor", "trunc") and not isinstance(d, torch.Tensor):
            d = int(_public_int(d, str(func)))
            if d > 0:
                return truncate(args[0], d)
    if func is aten.convolution.default:
        return _convolution(cls, args, key)
    if classify(func) is OpClass.BILINEAR:
        x, y = args[0], _scalar(args[1])
        op = BILINEAR_RING_OP[func.overloadpacket.__name__]
        if isinstance(x, cls) and isinstance(y, cls):
            return _beaver(cls, x, y, op, key)
        shared, public = (x, y) if isinstance(x, cls) else (y, x)
        if not (isinstance(public, torch.Tensor) and public.dtype.is_floating_point):
            public = torch.as_tensor(_public_int(public, str(func)), dtype=DTYPE)
            if op == "mul":
                return _scale(cls, shared, public, key)
            return _public_bilinear(cls, func, shared, public, public_first=shared is not x, key=key)
    if classify(func) is OpClass.COMPARISON:  # the comparison rules; their protocol step keeps the MACs
        from veil.tensors.rules.additive import ADDITIVE_RULES

        rule = ADDITIVE_RULES.lookup(func)
        if rule is not None and rule.handler is not None:
            return rule.handler(cls, func, args, kwargs)
    else:  # composite ops (addmm, rsub, ...): decomposed, MACs kept
        decomposed = decompose(func, args, kwargs)
        if decomposed is not NotImplemented:
            return decomposed
    raise UnsupportedOperationError(
        f"{func} is not available on authenticated shares (active_security=True): only linear ops, products by "
        "public integers, Beaver products (mul, mm, bmm, matmul, conv2d), truncation (fixed-point products, "
        "division by a public integer) and comparisons (>, ==, ReLU, max, argmax, max-pooling) keep SPDZ2k MACs"
    )


__all__ = ["MacLimbs", "dispatch", "share_authenticated", "truncate", "reconstruct_checked", "refresh",
           "is_authenticated", "sign_select", "public_like"]

