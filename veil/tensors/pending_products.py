"""Shared products of a backward pass left pending until one is read, so that independent ones open
in one round.

Inside a backward pass a product of two shared tensors (``x * y``, ``x @ y``, a convolution) deals
its Beaver triple at once but does not open its masked operands yet: its result is an
:class:`~veil.tensors.additive.AdditiveSharingTensor` marked pending. The first read of any pending
result's shares (``.child``) finishes every product this thread left pending, their masked operands
opened together in **one round** (:func:`veil.mpc.beaver.finish_products`), and so does the end of
the backward pass (an autograd engine callback), so its errors still surface in ``backward()``. The
pairs are autograd's: a matmul's backward computes ``grad @ W^T`` and ``x^T @ grad`` one after the
other, a product's backward ``grad * y`` and ``grad * x``; each pair costs one round instead of two
(an MLP's SGD step 26 -> 24 rounds). Outside a backward pass products open at once, as a PySyft
user expects (an error at the op).

What stays as it was: the triples are dealt in the same order (a recorded dealing plan replays);
each product's operands are captured when it is made (a later in-place op on an operand rebinds
that tensor's shares and never changes what the product multiplies); a product read from another
thread finishes alone.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from veil.mpc.beaver import Product, deal_product, finish_products
from veil.mpc.material import product_shape
from veil.mpc.party import run_party
from veil.mpc.ring import op_arguments
from veil.mpc.errors import MPCError

#: False: every shared product opens at once (one round each), as before this module
LAZY_PRODUCTS = True

_LOCAL = threading.local()  # .pending: weak references to this thread's pending results


def deferring() -> bool:
    """Whether a shared product made now is left pending (inside a backward pass, see above)."""
    return LAZY_PRODUCTS and torch._C._current_autograd_node() is not None


class Pending:
    """A pending result's product, until its shares exist (``failed``: why they never will)."""

    __slots__ = ("product", "lock", "failed")

    def __init__(self, product: Product) -> None:
        self.product = product
        self.lock = threading.Lock()
        self.failed: BaseException | None = None


def defer_product(cls: type, x: Any, y: Any, op: str, **op_kwargs: Any) -> Any:
    """``op(x, y)`` of two shared tensors as a pending result of class ``cls`` (the triple dealt now)."""
    provider = x.crypto_provider
    xs, ys = x.child, y.child  # an operand still pending is finished here: it is an input of this one
    product = deal_product(dict(xs), dict(ys), op, provider, **op_kwargs)
    if product.pieces is None:
        out = cls({p: t[2] for p, t in product.triples.items()}, provider)  # c's shares: the result's shape, parties
    else:  # a split product (veil/mpc/product_split.py): zeros of its shape stand in until it opens
        first = next(iter(xs))
        shape = list(product_shape(op, tuple(xs[first].shape), tuple(ys[first].shape), op_arguments(op, op_kwargs)))
        out = cls({p: run_party("product_placeholder", xs[p], shape) for p in xs}, provider)
    out._veil_pending = Pending(product)
    pending = getattr(_LOCAL, "pending", None)
    if pending is None:
        pending = _LOCAL.pending = []
    pending.append(weakref.ref(out))
    if torch._C._current_autograd_node() is not None:
        # the pass's end finishes what is left: one callback per product (a pass that fails drops its
        # callbacks, so no flag could say one is queued); those that find nothing left cost nothing
        torch.autograd.Variable._execution_engine.queue_callback(_backward_done)
    return out


def _backward_done() -> None:
    _finish_pending(None)


def finish(tensor: Any) -> None:
    """Finishes ``tensor``'s product and every other product this thread left pending (one round per
    set of parties); ``tensor`` may belong to another thread (then it finishes alone)."""
    _finish_pending(tensor)
    if tensor._veil_pending is not None:  # another thread was finishing it: wait for that one
        with tensor._veil_pending.lock:
            pass
        _raise_if_failed(tensor)


def _finish_pending(tensor: Any) -> None:
    refs, _LOCAL.pending = getattr(_LOCAL, "pending", None) or [], []
    batch = [t for t in (r() for r in refs) if t is not None and t._veil_pending is not None]
    if tensor is not None and not any(t is tensor for t in batch):
        batch.append(tensor)
    groups: dict[tuple, list] = {}
    for t in batch:
        groups.setdefault(tuple(t.parties), []).append(t)
    for group in groups.values():
        _finish_group(group)


def _finish_group(group: list) -> None:
    held = []
    try:
        for t in group:  # claim each (another thread may be finishing one of them)
            state = t._veil_pending
            if state is not None and state.failed is None and state.lock.acquire(blocking=False):
                if t._veil_pending is state:
                    held.append((t, state))
                else:
                    state.lock.release()
        if not held:
            return
        try:
            shares = finish_products([state.product for _, state in held])
        except BaseException as e:
            for _, state in held:
                state.failed = e
            raise
        for (t, _), result in zip(held, shares):
            t.child = result  # (the setter clears the pending state)
    finally:
        for _, state in held:
            state.lock.release()


def _raise_if_failed(tensor: Any) -> None:
    state = tensor._veil_pending
    if state is not None and state.failed is not None:
        raise MPCError(f"this shared product could not be computed: {state.failed}") from state.failed
