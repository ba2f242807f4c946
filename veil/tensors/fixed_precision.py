"""FixedPrecisionTensor: real numbers encoded as integers of Z/2^64.

The wrapper looks like a floating-point tensor to PyTorch (its ``dtype`` is
the original float dtype, so autograd accepts ``requires_grad=True``) while
its ``.child`` holds the encoded integers: a plain int64 tensor, or an
:class:`~veil.tensors.additive.AdditiveSharingTensor` after ``.share(...)``.
Ops are intercepted at the aten level (``__torch_dispatch__``) and follow
:data:`veil.tensors.rules.fixed_precision.FIXED_PRECISION_RULES`, so
PyTorch's autograd differentiates through fixed-point (and shared) values.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from veil.mpc.encoding import FixedPointEncoding, decode, encode, make_encoding
from veil.mpc.errors import NotEncodedError, PrecisionMismatchError
from veil.mpc.providers.base import RECORD_HOOKS, Provider
from veil.tensors._dispatch import dispatch
from veil.tensors.additive import AdditiveSharingTensor
from veil.tensors.additive import share as share_int
from veil.tensors.rules.common import is_float_public
from veil.tensors.rules.fixed_precision import FIXED_PRECISION_RULES, truncate


class FixedPrecisionTensor(torch.Tensor):
    """A real tensor in fixed-point encoding.

    Attributes:
        child: The encoded int64 values (plain tensor or shared tensor).
        encoding: Base and fractional precision of the encoding.
        pending_divisor: 1, or the public divisor a shared product still owes
            (``veil.tensors.rules.fixed_precision.LAZY_TRUNCATION``):
            reading ``child`` pays it first (one truncation round), so every
            reader sees the values at the encoding's scale.
    """

    encoding: FixedPointEncoding
    pending_divisor: int = 1
    #: how a value derived from one owing source pays: (source, the source's ``_veil_assigned`` then, local op)
    _veil_via: tuple | None = None
    #: how many values ``child`` was assigned (a derived value redoes its op only on the same one)
    _veil_assigned: int = 0

    @staticmethod
    def __new__(
        cls,
        child: torch.Tensor,
        encoding: FixedPointEncoding,
        dtype: torch.dtype = torch.float32,
        requires_grad: bool = False,
        pending_divisor: int = 1,
        settle_via: tuple | None = None,
    ):
        if child.dtype != torch.int64:
            raise NotEncodedError(f"the child of a FixedPrecisionTensor must be int64, got {child.dtype}")
        if not dtype.is_floating_point:
            raise TypeError(f"a FixedPrecisionTensor stands for a float tensor, got dtype {dtype}")
        out = torch.Tensor._make_wrapper_subclass(
            cls, child.shape, strides=child.stride(), dtype=dtype, device=child.device, requires_grad=requires_grad
        )
        out.child = child
        out.encoding = encoding
        if pending_divisor != 1:
            out.pending_divisor = int(pending_divisor)
            out._veil_via = settle_via
            for owed in _WATCHED:
                owed[id(out)] = weakref.ref(out)
        return out

    @property
    def child(self) -> torch.Tensor:
        if self.pending_divisor != 1:  # a lazy product: its truncation is due now
            via, self._veil_via = self._veil_via, None
            # derived from one owing source by a local op: the source pays (once for all that derive from
            # it) and the op is redone on what it paid, unless the source was assigned since (in place)
            if via is not None and via[0]._veil_assigned == via[1]:
                self._veil_raw = via[2](via[0].child)
            else:
                self._veil_raw = truncate(self._veil_raw, self.pending_divisor)
            self.pending_divisor = 1
        return self._veil_raw

    @child.setter
    def child(self, value: torch.Tensor) -> None:
        self._veil_raw, self.pending_divisor, self._veil_via = value, 1, None
        self.__dict__.pop("_veil_public", None)  # a constant's public value (rules' PUBLIC_ATTR) is no more
        self._veil_assigned += 1  # a new value (an in-place op): what derived from the old one must not redo

    def settle(self) -> "FixedPrecisionTensor":
        """Pays the truncation this tensor still owes now (one round if shared and owing); returns itself."""
        self.child  # noqa: B018  (reading it pays)
        return self

    @property
    def raw_child(self) -> torch.Tensor:
        """The encoded values times ``pending_divisor`` (no truncation paid): for the rules that carry it."""
        return self._veil_raw

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return dispatch(cls, FIXED_PRECISION_RULES, func, args, kwargs or {})

    def __repr__(self) -> str:
        enc = f"base={self.encoding.base}, precision_fractional={self.encoding.precision_fractional}"
        if self.is_shared:  # printing pays nothing owed (no protocol round to show a tensor)
            owed = f", pending_divisor={self.pending_divisor}" if self.pending_divisor != 1 else ""
            return f"FixedPrecisionTensor({enc}, child={self._veil_raw!r}{owed})"
        return f"FixedPrecisionTensor({enc}, value={self.float_precision()})"

    @property
    def is_shared(self) -> bool:
        """Whether the encoded values are secret-shared."""
        return isinstance(self._veil_raw, AdditiveSharingTensor)

    def share(
        self,
        *parties: Any,
        crypto_provider: Optional[Provider] = None,
        generator: Optional[torch.Generator] = None,
        place: Optional[Callable] = None,
        requires_grad: Optional[bool] = None,
        active_security: bool = False,
    ) -> "FixedPrecisionTensor":
        """Secret-shares the encoded values.

        See :func:`veil.tensors.additive.share` for the arguments;
        ``requires_grad`` defaults to this tensor's.
        """
        if self.is_shared:
            raise TypeError("this FixedPrecisionTensor is already shared")
        child = share_int(self.child, parties, crypto_provider, generator=generator, place=place,
                          active_security=active_security)
        grad = self.requires_grad if requires_grad is None else requires_grad
        return type(self)(child, self.encoding, self.dtype, requires_grad=grad)

    def get(self) -> "FixedPrecisionTensor":
        """Reconstructs shared encoded values (a plain-child fixed-precision tensor)."""
        if not self.is_shared:
            return self
        return type(self)(self.child.get(), self.encoding, self.dtype, requires_grad=self.requires_grad)

    def copy(self) -> "FixedPrecisionTensor":
        """An independent copy (shared children are copied share by share)."""
        return type(self)(torch.ops.aten.clone.default(self.child), self.encoding, self.dtype)

    def refresh(self) -> "FixedPrecisionTensor":
        """Same value, re-randomized shares (see ``AdditiveSharingTensor.refresh``).

        Raises:
            TypeError: If the values are not secret-shared.
        """
        if not self.is_shared:
            raise TypeError("refresh() re-randomizes shares: this FixedPrecisionTensor is not shared")
        return type(self)(self.child.refresh(), self.encoding, self.dtype)

    def float_precision(self) -> torch.Tensor:
        """Decodes to a plain float tensor (not differentiable)."""
        return float_precision(self)

    # PySyft 0.2 spellings.
    float_prec = float_precision

    def _veil_assign(self, other: "FixedPrecisionTensor") -> None:
        self.child = other.child
        self.encoding = other.encoding

    @classmethod
    def _veil_check_compatible(cls, tensors: Sequence["FixedPrecisionTensor"]) -> FixedPointEncoding:
        """Raises PrecisionMismatchError unless all tensors share one encoding."""
        first = tensors[0].encoding
        for t in tensors[1:]:
            if t.encoding != first:
                raise PrecisionMismatchError(
                    f"cannot combine fixed-precision tensors with {first} and {t.encoding}: encode both alike, "
                    f"e.g. fix_precision(base={first.base}, precision_fractional={first.precision_fractional}) "
                    "(precision_fractional counts base-`base` digits; veil's default is base=2, 16 bits; "
                    "PySyft 0.2's was base=10, 3 digits)"
                )
        return first

    @classmethod
    def _veil_apply_local(cls, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Runs ``func`` on the encoded children and rewraps tensor outputs."""
        leaves = tree_flatten((args, kwargs))[0]
        fixed = [a for a in leaves if isinstance(a, cls)]
        encoding = cls._veil_check_compatible(fixed)
        if any(is_float_public(a) and isinstance(a, torch.Tensor) for a in leaves):
            raise NotEncodedError(f"{func}: mixing fixed-precision and float tensors; fix_precision() the float one")
        unwrap = lambda a: a.child if isinstance(a, cls) else a  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        dtype = fixed[0].dtype
        flat, spec = tree_flatten(out)
        flat = [cls(o, encoding, dtype) if isinstance(o, torch.Tensor) else o for o in flat]
        return tree_unflatten(flat, spec)


#: per open dealer ``record()`` block, the tensors created in it that owe a truncation: id -> weak
#: reference (not a WeakSet, which compares tensors with ==, elementwise)
_WATCHED: list[dict] = []


@contextlib.contextmanager
def _watch_owed() -> Iterator[None]:
    """A dealer's record hook (``veil.mpc.providers.base.RECORD_HOOKS``): when the block ends without an
    error, the tensors it created that are still alive and owing pay now, inside the recorded block."""
    owed: dict[int, weakref.ref] = {}
    _WATCHED.append(owed)
    try:
        yield
    finally:
        _WATCHED[:] = [w for w in _WATCHED if w is not owed]  # (by identity: == would compare tensors)
    for tensor in [r() for r in owed.values()]:
        if tensor is None:
            continue
        tensor.settle()


RECORD_HOOKS.append(_watch_owed)


def consumed_owing(tensor: FixedPrecisionTensor) -> None:
    """``tensor``'s debt was paid into another value (a weight gradient folded into plain SGD's update):
    an open ``record()`` block does not pay it at its end. The recorded plan is then what a call takes:
    paid there, it recorded a truncation that no later call takes, and ``deal_ahead`` dealt one more
    each call, kept unused (a party's memory grew by the material every step). Read later, it still pays.
    The owing value it derives from (a view's product: ``x^T g`` under the gradient's ``t()``) goes too."""
    while tensor is not None:
        for owed in _WATCHED:
            owed.pop(id(tensor), None)
        via = tensor._veil_via
        tensor = via[0] if via is not None and via[0]._veil_assigned == via[1] else None


def fix_precision(
    tensor: torch.Tensor,
    precision_fractional: Optional[int] = None,
    base: int = 2,
    requires_grad: Optional[bool] = None,
) -> FixedPrecisionTensor:
    """Encodes a real tensor in fixed precision.

    Args:
        tensor: The values (any real dtype; ints are encoded as reals).
        precision_fractional: Fractional digits; default 16 for base 2 and 3
            for base 10 (PySyft's encoding).
        base: Radix of the scale.
        requires_grad: Whether the result is an autograd leaf requiring
            gradients; defaults to ``tensor.requires_grad``.

    Raises:
        EncodingOverflowError: If a value is out of range or not finite.
    """
    if isinstance(tensor, FixedPrecisionTensor):
        raise TypeError("tensor is already in fixed precision")
    encoding = make_encoding(precision_fractional, base)
    dtype = tensor.dtype if tensor.dtype.is_floating_point else torch.get_default_dtype()
    grad = tensor.requires_grad if requires_grad is None else requires_grad
    return FixedPrecisionTensor(encode(tensor, encoding), encoding, dtype, requires_grad=grad)


def float_precision(tensor: FixedPrecisionTensor) -> torch.Tensor:
    """Decodes a fixed-precision tensor to plain floats.

    Raises:
        TypeError: If the values are still secret-shared (call ``.get()``).
    """
    if not isinstance(tensor, FixedPrecisionTensor):
        raise TypeError(f"expected a FixedPrecisionTensor, got {type(tensor).__name__}")
    if tensor.is_shared:
        raise TypeError("values are secret-shared: call .get() before float_precision()")
    return decode(tensor.child, tensor.encoding, tensor.dtype)


# PySyft 0.2 spellings.
fix_prec = fix_precision
float_prec = float_precision
