"""What a plan writes in place, and which of its tensors may share storage, decided from the plan alone.

A plan's constants (tensors in its op arguments) and its state are kept with the stored plan and read by every
run of it: a plan that writes into one in place carries what one run saw (an owner's record) into the next run,
where nothing marks it as the owner's. The walk is conservative: an op not known to allocate its result may
return a view of (or the very) tensor it reads (``view_as``, ``type_as``, ``.data``, ``detach``, ``to``, ...).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch

from veil.messaging.allowlist import ALLOWLIST
from veil.plans.ops import PlanSpec, SlotRef
from veil.tensors.tree import leaves

_INPLACE_DUNDERS = frozenset(f"Tensor.__{n}__" for n in (
    "setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor", "ilshift",
    "irshift", "imatmul"))

#: ops that always allocate their result (never a view or an input itself), by the name's last part
_FRESH = re.compile(
    r"__r?(?:add|sub|mul|truediv|floordiv|mod|pow|matmul|and|or|xor|neg|abs|invert|eq|ne|lt|le|gt|ge)__|"
    r"add|sub|mul|div|true_divide|matmul|mm|bmm|addmm|linear|conv[123]d|sum|mean|prod|exp|log|log1p|sqrt|"
    r"rsqrt|abs|neg|sign|sin|cos|tanh|sigmoid|relu|relu6|gelu|silu|elu|leaky_relu|softplus|softmax|log_softmax|"
    r"logsigmoid|layer_norm|group_norm|batch_norm|normalize|clamp|clip|where|cat|stack|maximum|minimum|"
    r"reciprocal|floor|ceil|round|trunc|clone|zeros_like|ones_like|full_like|empty_like|full|zeros|ones|arange|"
    r"eye|embedding|mse_loss|l1_loss|smooth_l1_loss|cross_entropy|nll_loss|binary_cross_entropy(?:_with_logits)?|"
    r"cosine_similarity|(?:adaptive_)?(?:avg|max)_pool[12]d|amax|amin|var|std|square|pow|"
    r"take|gather|index_select|masked_select")  # (selections copy: their ATen schemas return no alias)

_GRAD_SETTER, _GRAD_GETTER = "Tensor.grad.__set__", "Tensor.grad.__get__"

_SIGNATURES: dict[str, Any] = {}  # (allowlisted op names only: an unknown one raises before it is kept)


def _bound(op: Any) -> dict:
    """The op's arguments by parameter name, where its function has a Python signature (``F.relu(x, True)``
    passes ``inplace`` by position); {} otherwise."""
    if op.op not in _SIGNATURES:
        try:
            _SIGNATURES[op.op] = inspect.signature(ALLOWLIST.by_name(op.op).func)
        except (TypeError, ValueError):
            _SIGNATURES[op.op] = None
    sig = _SIGNATURES[op.op]
    if sig is None:
        return {}
    try:
        return dict(sig.bind(*op.args, **op.kwargs).arguments)
    except TypeError:
        return {}


def _set(value: Any) -> bool:
    return not (value is False or value is None)  # (a tensor or anything unusual counts as set)


def written_args(op: Any) -> tuple:
    """What an op writes into in place (slots and constant tensors): ``self`` of ``add_``/``+=``/``x[i] =``,
    ``out=``, the input of ``inplace=True``, the running statistics of a training-mode ``batch_norm``, the weight of
    an ``embedding`` with ``max_norm``. Worked out once per op (a plan's checks walk its ops several times)."""
    known = op.__dict__.get("_written")
    if known is None:
        known = op.__dict__["_written"] = tuple(_written_args(op))
    return known


def _written_args(op: Any) -> list:
    method = op.op.rsplit(".", 1)[-1]
    targets: list = []
    if op.op in _INPLACE_DUNDERS or (method.endswith("_") and not method.startswith("_")):
        targets.append(op.args[0] if op.args else None)
    if "out" in op.kwargs:
        targets.append(op.kwargs["out"])
    if op.op == _GRAD_SETTER:  # ``x.grad = v``: what writes x.grad (out=, +=, backward) writes v
        targets += op.args[1:2]
    bound = _bound(op)
    if _set(bound.get("inplace", op.kwargs.get("inplace"))):
        targets.append(bound.get("input", op.args[0] if op.args else None))
    if method == "embedding" and _set(bound.get("max_norm")):  # (renormalizes the rows it looks up, in place)
        targets.append(bound.get("weight"))
    # (F.batch_norm's training defaults to False; arguments that do not bind count as training)
    if method == "batch_norm" and _set(bound.get("training", False) if bound else True):
        targets += [bound.get("running_mean"), bound.get("running_var")]
    return leaves(targets, SlotRef) + leaves(targets, torch.Tensor)


def key(value: Any) -> Any:
    """A slot's number, or a constant tensor's identity."""
    return value.slot if isinstance(value, SlotRef) else ("constant", id(value))


class Aliases:
    """Union-find over the slots and constants that may share storage."""

    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, k: Any) -> Any:
        root = k
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while k != root:  # (path compression: the walk stays linear in the plan's size)
            self.parent[k], k = root, self.parent.get(k, k)
        return root

    def union(self, keys: list) -> None:
        roots = [self.find(k) for k in keys]
        for r in roots[1:]:
            if r != roots[0]:
                self.parent[r] = roots[0]


def alias_groups(spec: PlanSpec) -> Aliases:
    """The slots and constants each op's results may share storage with. A Tensor method's result can alias only
    ``self`` (``u.view_as(x)`` is a view of ``u``); a function's, any tensor it reads."""
    groups = Aliases()
    for op in spec.ops:
        if _FRESH.fullmatch(op.op.rsplit(".", 1)[-1]) and not written_args(op):
            continue
        source = (op.args[:1], {}) if op.op.startswith("Tensor.") else (op.args, op.kwargs)
        inputs = leaves(source, SlotRef) + leaves(source, torch.Tensor) + list(written_args(op))
        groups.union([key(v) for v in inputs] + [s for s in op.out_slots if s >= 0])
    return groups


def _constants(spec: PlanSpec, groups: Aliases) -> set:
    return {groups.find(key(v)) for op in spec.ops for v in leaves((op.args, op.kwargs), torch.Tensor)}


def returns_constant(spec: PlanSpec, groups: Aliases) -> bool:
    """Whether a result of the plan may be one of its constants or a view of one (stored as the run's result,
    an in-place write into it would reach the constant every later run reads)."""
    if leaves(spec.outputs, torch.Tensor):  # a tensor in the outputs themselves: the constant, the same every run
        return True
    constants = _constants(spec, groups)
    return any(groups.find(ref.slot) in constants for ref in leaves(spec.outputs, SlotRef))


def shared_write(spec: PlanSpec, groups: Aliases, state: bool = True) -> str | None:
    """The first op writing in place into something every run of the plan reads: a constant or a view of one,
    and (``state``) a state slot or a view of one; None if there is none."""
    shared = _constants(spec, groups)
    if state:
        shared.update(groups.find(s) for s in range(spec.n_inputs, spec.n_inputs + spec.n_state))
    for op in spec.ops:
        if any(groups.find(key(v)) in shared for v in written_args(op)):
            return op.op
    return None


def reads_constant_grad(spec: PlanSpec, groups: Aliases) -> str | None:
    """The first op reading the gradient of a constant or a view of one, None if none: a constant's ``.grad`` is
    kept with the stored plan, so ``backward`` in a run over an owner's data left the owner's values there for
    the next run, on the requester's own tensor, to read."""
    constants = _constants(spec, groups)
    for op in spec.ops:
        if op.op == _GRAD_GETTER and op.args and groups.find(key(op.args[0])) in constants:
            return op.op
    return None
