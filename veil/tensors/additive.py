"""AdditiveSharingTensor: a value split into additive shares mod 2^64.

``x = sum_i x_i (mod 2^64)``, each share ``x_i`` held by one party. The
wrapper is a ``torch.Tensor`` subclass (dtype int64, shape of ``x``) that
intercepts aten ops in ``__torch_dispatch__`` and follows
:data:`veil.tensors.rules.additive.ADDITIVE_RULES`.

Shares are *handles supporting torch ops*: plain int64 tensors in-process, or
remote pointers. The code only ever applies torch ops to a share, never reads
it, except through :func:`veil.mpc.opening.reconstruct` / ``open_values``.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from veil.mpc.errors import NotEncodedError, ShareMismatchError
from veil.mpc.opening import reconstruct
from veil.mpc.providers.base import Provider
from veil.mpc.sharing import split
from veil.mpc.truncation import truncate_shares
from veil.tensors import mac_dispatch, pending_products
from veil.tensors._dispatch import dispatch
from veil.tensors.pointer import PointerTensor, pointer_meta
from veil.tensors.remote_ops import deferring
from veil.tensors.rules.additive import ADDITIVE_RULES
from veil.tensors.rules.common import STRUCTURAL_OPS

aten = torch.ops.aten


def party_id(party: Any) -> Hashable:
    """The key of a party in a share dict: a worker's ``id``, else itself."""
    return getattr(party, "id", party)


_CPU = torch.device("cpu")


class AdditiveSharingTensor(torch.Tensor):
    """Additive secret shares of an int64 tensor.

    Attributes:
        child: Ordered dict party id -> share (int64 tensor or remote handle).
        crypto_provider: The :class:`~veil.mpc.providers.base.Provider`
            dealing correlated randomness for products and truncation.
    """

    child: dict
    crypto_provider: Provider
    #: With active security (:mod:`veil.mpc.mac`, SPDZ2k): the other 128-bit limbs
    #: (:class:`veil.tensors.mac_dispatch.MacLimbs`) and the key.
    mac: Any = None
    mac_key: Any = None
    #: a product not opened yet (:mod:`veil.tensors.pending_products`): reading ``child`` finishes it
    _veil_pending: Any = None

    @staticmethod
    def __new__(cls, shares: Mapping[Hashable, torch.Tensor], crypto_provider: Optional[Provider]):
        if len(shares) < 2:
            raise ValueError(f"an AdditiveSharingTensor needs at least 2 shares, got {len(shares)}")
        first = next(iter(shares.values()))
        shape = None
        for pid, s in shares.items():
            # a pointer's shape and dtype as plain values (its tensor properties cost a dispatch each)
            s_shape, s_dtype = pointer_meta(s)[:2] if type(s) is PointerTensor else (tuple(s.shape), s.dtype)
            shape = s_shape if shape is None else shape
            if s_dtype != torch.int64:
                raise NotEncodedError(f"share of party {pid!r} has dtype {s_dtype}, expected torch.int64")
            if s_shape != shape:
                raise ShareMismatchError(f"share shapes differ: {shape} vs {s_shape} ({pid!r})")
        if type(first) is PointerTensor:  # (contiguous, as the pointer itself)
            out = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.int64, device=_CPU, requires_grad=False)
        else:
            out = torch.Tensor._make_wrapper_subclass(
                cls, first.shape, strides=first.stride(), dtype=torch.int64, device=first.device, requires_grad=False
            )
        out.child = dict(shares)
        out.crypto_provider = crypto_provider
        return out

    @property
    def child(self) -> dict:
        if self._veil_pending is not None:  # a pending product: it (and the others pending) opens now
            pending_products.finish(self)
        return self._veil_shares

    @child.setter
    def child(self, shares: dict) -> None:
        self._veil_shares, self._veil_pending = shares, None

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, cls) and a.mac is not None for a in tree_flatten((args, kwargs))[0]):
            return mac_dispatch.dispatch(cls, func, args, kwargs, STRUCTURAL_OPS)  # keeps MACs or refuses
        with deferring():  # share-local ops on pointers ride on the parties' next requests
            return dispatch(cls, ADDITIVE_RULES, func, args, kwargs)

    def __repr__(self) -> str:
        # Never print shares: they are secrets of their holders.
        return (
            f"AdditiveSharingTensor(shape={tuple(self.shape)}, parties={list(self.parties)}, "
            f"crypto_provider={self.crypto_provider!r})"
        )

    @property
    def parties(self) -> tuple:
        """Party ids, in share order (party 0 adds public terms)."""
        return tuple(self._veil_shares)  # (a pending product's are known: nothing to finish)

    def get(self) -> torch.Tensor:
        """Reconstructs the shared value (an int64 tensor).

        Raises:
            MacCheckError: With active security, if a MAC check fails.
        """
        if self.mac is not None:
            return mac_dispatch.reconstruct_checked(self)
        return reconstruct(self.child)

    def copy(self) -> "AdditiveSharingTensor":
        """An independent copy (each party copies its share; MACs too)."""
        return aten.clone.default(self)

    def refresh(self) -> "AdditiveSharingTensor":
        """Same value, fresh shares: every party adds its share of a random
        zero sharing dealt by the crypto provider (no communication between
        the parties; the orchestrator never sees the zero shares)."""
        if self.mac is not None:
            return mac_dispatch.refresh(self)
        zeros = self.crypto_provider.zero_shares(tuple(self.shape), list(self.parties))
        from veil.mpc.refresh import refresh_shares

        out = type(self)(refresh_shares(self.child, zeros), self.crypto_provider)
        return out

    def truncate(self, divisor: int) -> "AdditiveSharingTensor":
        """Shares of ``self / divisor`` (see :mod:`veil.mpc.truncation`).

        With active security, authenticated truncation pairs keep the MACs
        (:func:`veil.tensors.mac_dispatch.truncate`).
        """
        if self.mac is not None:
            return mac_dispatch.truncate(self, divisor)
        return type(self)(truncate_shares(self.child, divisor, self.crypto_provider), self.crypto_provider)

    def _veil_assign(self, other: "AdditiveSharingTensor") -> None:
        self.child = dict(other.child)
        self.crypto_provider = other.crypto_provider
        self.mac, self.mac_key = other.mac, other.mac_key

    @classmethod
    def from_public(cls, value: torch.Tensor, like: "AdditiveSharingTensor") -> "AdditiveSharingTensor":
        """Trivial sharing of a public int64 value: party 0 holds it, others 0.

        The zeros are made from the other parties' own shares (``new_zeros``),
        so remote parties create them locally.
        """
        value = torch.as_tensor(value, dtype=torch.int64)
        shares = {}
        for i, (pid, s) in enumerate(like.child.items()):
            zeros = torch.ops.aten.new_zeros.default(s, list(value.shape))
            shares[pid] = zeros + value if i == 0 else zeros
        return cls(shares, like.crypto_provider)

    @classmethod
    def _veil_check_compatible(cls, tensors: Sequence["AdditiveSharingTensor"]) -> tuple:
        """Checks shared operands agree on parties and provider.

        Raises:
            ShareMismatchError: Naming the differing parties or providers.
        """
        first = tensors[0]
        for t in tensors[1:]:
            if t.parties != first.parties:
                raise ShareMismatchError(
                    f"cannot combine tensors shared among {list(first.parties)} and {list(t.parties)}"
                )
            if t.crypto_provider is not first.crypto_provider:
                raise ShareMismatchError(
                    f"cannot combine tensors with different crypto providers: "
                    f"{first.crypto_provider!r} vs {t.crypto_provider!r}"
                )
        return first.parties, first.crypto_provider

    @classmethod
    def _veil_apply_local(cls, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Runs ``func`` on each party's share and re-assembles the outputs."""
        if not kwargs and all(isinstance(a, cls) or _flat_public(a) for a in args):
            return _apply_flat(cls, func, args)  # the usual op (shares and public values at the top level)
        shared = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, cls)]
        parties, provider = cls._veil_check_compatible(shared)
        per_party = {}
        for p in parties:
            unwrap = lambda a: a.child[p] if isinstance(a, cls) else a  # noqa: E731
            per_party[p] = tree_flatten(func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs)))
        leaves, spec = per_party[parties[0]]
        out = [
            cls({p: per_party[p][0][k] for p in parties}, provider) if isinstance(leaf, torch.Tensor) else leaf
            for k, leaf in enumerate(leaves)
        ]
        return tree_unflatten(out, spec)


_CONTAINERS = (list, tuple, dict)


def _flat_public(a: Any) -> bool:
    """A public argument with no tensor in it: a value, or a list or tuple of values (sizes, dims)."""
    if type(a) not in _CONTAINERS:
        return not isinstance(a, torch.Tensor) or type(a) is torch.Tensor
    return type(a) is not dict and not any(isinstance(v, torch.Tensor) or type(v) in _CONTAINERS for v in a)


def _apply_flat(cls, func: Callable, args: tuple) -> Any:
    """:meth:`AdditiveSharingTensor._veil_apply_local` for arguments with no container (no keyword): the
    arguments without pytree walks (~8 per op with the output's, most of a deferred op's orchestration),
    a tensor or a tuple of tensors out without one either."""
    shared = [a for a in args if isinstance(a, cls)]
    parties, provider = cls._veil_check_compatible(shared)
    per_party = [func(*[a.child[p] if isinstance(a, cls) else a for a in args]) for p in parties]
    first = per_party[0]
    if isinstance(first, torch.Tensor):
        return cls(dict(zip(parties, per_party)), provider)
    if type(first) is tuple and all(isinstance(t, torch.Tensor) for t in first):
        return tuple(cls({p: out[k] for p, out in zip(parties, per_party)}, provider) for k in range(len(first)))
    flat = [tree_flatten(out) for out in per_party]
    leaves, spec = flat[0]
    out = [cls({p: f[0][k] for p, f in zip(parties, flat)}, provider) if isinstance(leaf, torch.Tensor) else leaf
           for k, leaf in enumerate(leaves)]
    return tree_unflatten(out, spec)


def share(
    tensor: torch.Tensor,
    parties: Sequence[Any],
    crypto_provider: Provider,
    generator: Optional[torch.Generator] = None,
    place: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None,
    active_security: bool = False,
) -> AdditiveSharingTensor:
    """Secret-shares an integer tensor among parties.

    Args:
        tensor: An integer tensor (floats must be ``fix_precision``-ed first).
        parties: Party ids or workers (keys become ``party.id`` if present).
        crypto_provider: Provider for the protocols run on the result, or a
            crypto-provider *worker* (dealing through a WorkerDealer).
        generator: Optional seeded generator (tests); default OS randomness.
        place: Optional ``place(share, party) -> handle`` that moves each share
            to its party (e.g. ``lambda s, w: s.send(w)``). Default: when all
            parties are workers, seeded shares are placed on them
            (:mod:`veil.tensors.mpc_glue.remote_sharing`); otherwise shares stay local.
        active_security: Also share SPDZ MACs of the values, so that every
            opening is checked and tampering aborts the computation
            (SPDZ2k, :mod:`veil.mpc.mac`; linear ops, products and
            truncation, so fixed-point arithmetic too; no comparisons).

    Raises:
        NotEncodedError: If ``tensor`` is floating point.
        ValueError: If fewer than two distinct parties are given.
    """
    if isinstance(tensor, AdditiveSharingTensor):
        raise TypeError("tensor is already secret-shared")
    ids = [party_id(p) for p in parties]
    if len(set(ids)) != len(ids):
        raise ValueError(f"parties must be distinct, got {ids}")
    if crypto_provider is None:  # PySyft's spelling: a dedicated in-process dealer, with a one-time warning
        from veil.compat.crypto_provider import default_crypto_provider

        crypto_provider = default_crypto_provider(parties)
    from veil.tensors.mpc_glue.remote_sharing import is_worker, resolve_provider, share_on_workers

    crypto_provider = resolve_provider(crypto_provider, parties)
    if active_security:
        if place is not None or generator is not None:
            raise ValueError("active_security=True places shares itself: drop place= and generator=")
        return mac_dispatch.share_authenticated(tensor, parties, crypto_provider)
    if place is None and generator is None and all(is_worker(p) for p in parties):
        split(tensor.detach()[:0], 2)  # same dtype checks as the local path
        pieces = share_on_workers(tensor, parties)
    else:
        pieces = split(tensor.detach(), len(ids), generator)
        if place is not None:
            pieces = [place(s, p) for s, p in zip(pieces, parties)]
    return AdditiveSharingTensor(dict(zip(ids, pieces)), crypto_provider)
