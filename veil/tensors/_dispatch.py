"""The thin dispatcher shared by veil's ``__torch_dispatch__`` tensors.

``__torch_dispatch__`` of a wrapper tensor calls :func:`dispatch`, which

1. looks the aten op up in the type's :class:`RuleTable` (exact overload
   first, then the overload packet),
2. for a ``LOCAL`` rule, lets the tensor type run the same op on its
   children (unwrap -> op -> rewrap; ``cls._veil_apply_local``),
3. for a ``HANDLER`` rule, calls the registered handler, which may encode
   public operands or run a protocol,
4. for an op with no rule, runs torch's decomposition of it if there is one
   (composite ops such as ``addmm`` or ``rsub``), else refuses.

No op-specific code lives here: all knowledge of ops is in ``rules/``.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch._decomp import decomposition_table

from veil.mpc.errors import UnsupportedOperationError

Op = Union[torch._ops.OpOverload, torch._ops.OpOverloadPacket]
Handler = Callable[[type, Any, tuple, dict], Any]


class RuleKind(enum.Enum):
    """How an op runs on a wrapper tensor."""

    LOCAL = "local"  # the same op on the children, outputs rewrapped
    HANDLER = "handler"  # a dedicated function (encoding, protocol, ...)


@dataclass(frozen=True)
class Rule:
    """One entry of a rule table."""

    kind: RuleKind
    handler: Optional[Handler] = None


class RuleTable:
    """An explicit mapping from aten ops to rules, for one tensor type.

    Args:
        name: The tensor type's name, used in error messages.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._rules: dict[Op, Rule] = {}

    def _add(self, op: Op, rule: Rule) -> None:
        if op in self._rules:
            raise ValueError(f"{self.name}: duplicate rule for {op}")
        self._rules[op] = rule

    def local(self, *ops: Op) -> None:
        """Declares ops that run unchanged on the children."""
        for op in ops:
            self._add(op, Rule(RuleKind.LOCAL))

    def handler(self, *ops: Op) -> Callable[[Handler], Handler]:
        """Decorator registering ``fn(cls, func, args, kwargs)`` for ops."""

        def register(fn: Handler) -> Handler:
            for op in ops:
                self._add(op, Rule(RuleKind.HANDLER, fn))
            return fn

        return register

    def lookup(self, func: torch._ops.OpOverload) -> Optional[Rule]:
        """The rule for ``func``: its exact overload, else its packet."""
        rule = self._rules.get(func)
        if rule is None:
            rule = self._rules.get(func.overloadpacket)
        return rule

    def ops(self) -> list[Op]:
        """All ops with a rule (for documentation and tests)."""
        return list(self._rules)


def decompose(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any:
    """Runs a composite op as torch's decomposition into simpler aten ops
    (``addmm`` -> ``mm`` + ``add``, ``rsub`` -> ``sub``, ...), each of which
    dispatches again; ``NotImplemented`` if torch has none."""
    fn = decomposition_table.get(func)
    if fn is None:
        return NotImplemented
    # without torch's dtype-casting and out= wrappers: the wrapper tensors keep their own dtype
    return inspect.unwrap(fn)(*args, **kwargs)


def dispatch(cls: type, table: RuleTable, func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any:
    """Runs ``func`` on wrapper tensors of type ``cls`` following ``table``.

    Raises:
        UnsupportedOperationError: If ``table`` has no rule for ``func``.
    """
    rule = table.lookup(func)
    if rule is None:
        decomposed = decompose(func, args, kwargs)
        if decomposed is not NotImplemented:
            return decomposed
        raise UnsupportedOperationError(
            f"{table.name} does not support {func}; add a rule in veil/tensors/rules/"
        )
    if rule.kind is RuleKind.LOCAL:
        return cls._veil_apply_local(func, args, kwargs)
    return rule.handler(cls, func, args, kwargs)
