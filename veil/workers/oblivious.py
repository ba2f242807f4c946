"""Ops whose result shape or success depends on values: refused on values the requester may not learn.

A serving owner computes on a client's share but may not learn it; what it
always learns is whether a command succeeded, the error text and the
result's shape. ``nonzero(x & 2)`` has as many rows as set bits,
``zeros(12)[x]`` fails iff some value is >= 12, ``1 // x`` iff one is 0:
repeated per bit, each is the whole share. This module names those ops and
the argument positions where a secret value (a share revealable only to
someone else, dealt material) decides their shape or success; the worker
refuses them before they run, whatever the values. Errors of any other
command on a secret value are value-free (``owner_guard.client_error``).

Not complete (README known limits): any op that can fail on values is a
1-bit oracle (``cross_entropy`` with a secret target, a secret 0-d tensor
where an op wants an int); the complete rule is an allowlist of
data-oblivious ops for secret values.
"""

from __future__ import annotations

from typing import Any, Iterable

from veil.messaging import messages as m

#: ops whose result shape depends on the values of any tensor input
VALUE_SHAPED = frozenset({
    "torch.nonzero", "torch.masked_select", "torch.unique", "torch.nn.functional.one_hot",
    "torch.repeat_interleave",
})
#: op -> (positions, keyword names) of arguments whose values are indices or divisors: out of range or zero,
#: the op fails (or, a boolean index, selects a value-dependent number of elements)
VALUE_CHECKED: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    "Tensor.__getitem__": ((1,), ("indices",)),
    "Tensor.__setitem__": ((1,), ("indices",)),
    "Tensor.index_select": ((2,), ("index",)),
    "torch.index_select": ((2,), ("index",)),
    "torch.gather": ((2,), ("index",)),
    "torch.take": ((1,), ("index",)),
    "torch.scatter": ((2,), ("index",)),
    "torch.scatter_add": ((2,), ("index",)),
    "torch.nn.functional.embedding": ((0,), ("input",)),
    "Tensor.__floordiv__": ((1,), ("other",)),
    "Tensor.__rfloordiv__": ((0,), ("self",)),
    "torch.floor_divide": ((1,), ("other",)),
    "Tensor.div": ((1,), ("other",)),
    "Tensor.div_": ((1,), ("other",)),
    "torch.div": ((1,), ("other",)),
    "torch.divide": ((1,), ("other",)),
    "Tensor.__mod__": ((1,), ("other",)),
    "torch.remainder": ((1,), ("other",)),
    "torch.fmod": ((1,), ("other",)),
}


def _ref_ids(value: Any) -> Iterable[int]:
    tp = type(value)
    if tp is m.ObjectRef:
        yield value.id
    elif tp is list or tp is tuple:
        for v in value:
            yield from _ref_ids(v)
    elif tp is dict:
        for v in value.values():
            yield from _ref_ids(v)


def refusal(op_name: str, args: Any, kwargs: dict, secret: set) -> str | None:
    """Why ``op_name`` may not run with the wire arguments ``args``/``kwargs`` when the objects ``secret``
    (ids) are values the requester may not learn (None: it may run)."""
    if op_name in VALUE_SHAPED:
        if any(i in secret for i in _ref_ids((args, kwargs))):
            return f"{op_name}: its result's shape would depend on the values of a share you may not reveal"
        return None
    checked = VALUE_CHECKED.get(op_name)
    if checked is None:
        return None
    positions, names = checked
    values = [args[p] for p in positions if p < len(args)] + [kwargs[n] for n in names if n in kwargs]
    if any(i in secret for i in _ref_ids(values)):
        return (f"{op_name}: whether it succeeds would depend on the values of a share you may not reveal "
                "(an index or divisor)")
    return None
