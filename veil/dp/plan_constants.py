"""Constant-creating ops (``torch.full``, ``zeros``, ``ones``, ``arange``, ``eye``, ``*_like``) in DP plans.

Such an op reads any tensor among its sizes or fill value into a Python number when it runs, so its
meta-device sizing cannot see that number and the DP dry run used to refuse it as value-sized. What
matters for privacy is where the number comes from:

- from the plan's constants or its parameters and buffers (the data scientist's values, the same for
  every record): the result is the same for every record, so the op is accepted, and sized with the
  number itself (:func:`public_scalars`);
- from the record (any slot computed from the plan's input): a size would follow the data's values, a fill
  value would be read out of a record, so the plan is refused before any charge (:func:`check_plan`).

Which slots hold record values is decided from the plan alone (:func:`record_slots`). An in-place write
reaches every tensor that may share the written one's storage: the walk groups the slots (and constants)
an op's result may alias (every op not known to allocate a fresh result: views, ``.data``, ``detach``,
``type_as``, ``to``, ...). A plan that writes in place into anything aliasing its parameters, buffers or
constants is refused (:func:`check_plan`): the records share them, so one record's result would follow the
records run before it, and the plan object would keep owner values after the release.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch

from veil.dp.errors import PrivacyParameterError
from veil.messaging.allowlist import ALLOWLIST
from veil.plans.ops import PlanSpec, SlotRef
from veil.tensors.tree import leaves

#: creation op -> how many leading positional arguments only give a shape and dtype (``*_like``'s input:
#: a record's shape is public); every other argument is a size or a fill value
CREATION_OPS: dict[str, int] = {
    "torch.full": 0, "torch.zeros": 0, "torch.ones": 0, "torch.arange": 0, "torch.eye": 0,
    "torch.full_like": 1, "torch.zeros_like": 1, "torch.ones_like": 1, "torch.empty_like": 1,
}

_INPLACE_DUNDERS = frozenset(f"Tensor.__{n}__" for n in (
    "setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor", "ilshift",
    "irshift", "imatmul"))

#: ops that always allocate their result (never a view or their input itself), by the name's last part;
#: any other op's result may alias its tensor arguments (conservatively: the walk cannot know strides)
_FRESH = re.compile(
    r"__r?(?:add|sub|mul|truediv|floordiv|mod|pow|matmul|and|or|xor|neg|abs|invert|eq|ne|lt|le|gt|ge)__|"
    r"add|sub|mul|div|true_divide|matmul|mm|bmm|addmm|linear|conv[123]d|sum|mean|prod|exp|log|log1p|sqrt|"
    r"rsqrt|abs|neg|sign|sin|cos|tanh|sigmoid|relu|relu6|gelu|silu|elu|leaky_relu|softplus|softmax|log_softmax|"
    r"logsigmoid|layer_norm|group_norm|batch_norm|normalize|clamp|clip|where|cat|stack|maximum|minimum|"
    r"reciprocal|floor|ceil|round|trunc|clone|zeros_like|ones_like|full_like|empty_like|full|zeros|ones|arange|"
    r"eye|embedding|mse_loss|l1_loss|smooth_l1_loss|cross_entropy|nll_loss|binary_cross_entropy(?:_with_logits)?|"
    r"cosine_similarity|(?:adaptive_)?(?:avg|max)_pool[12]d|amax|amin|var|std|square|pow")

_SIGNATURES: dict[str, Any] = {}


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


def written_args(op: Any) -> list:
    """What an op writes into in place (slots and constant tensors): ``self`` of ``add_``/``+=``/``x[i] =``,
    ``out=``, the input of ``inplace=True``, the running statistics of a training-mode ``batch_norm``."""
    method = op.op.rsplit(".", 1)[-1]
    targets: list = []
    if op.op in _INPLACE_DUNDERS or (method.endswith("_") and not method.startswith("_")):
        targets.append(op.args[0] if op.args else None)
    if "out" in op.kwargs:
        targets.append(op.kwargs["out"])
    bound = _bound(op)
    if _set(bound.get("inplace", op.kwargs.get("inplace"))):
        targets.append(bound.get("input", op.args[0] if op.args else None))
    # (F.batch_norm's training defaults to False; arguments that do not bind count as training)
    if method == "batch_norm" and _set(bound.get("training", False) if bound else True):
        targets += [bound.get("running_mean"), bound.get("running_var")]
    return leaves(targets, SlotRef) + leaves(targets, torch.Tensor)


def _value_args(op: Any) -> tuple:
    """The arguments of a creation op that are sizes or fill values."""
    return (op.args[CREATION_OPS[op.op]:], op.kwargs)


def _slots(value: Any) -> list[int]:
    return [ref.slot for ref in leaves(value, SlotRef)]


def _key(value: Any) -> Any:
    return value.slot if isinstance(value, SlotRef) else ("constant", id(value))


class _Aliases:
    """Union-find over slots and constants that may share storage."""

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


def _alias_groups(spec: PlanSpec) -> _Aliases:
    groups = _Aliases()
    for op in spec.ops:
        if _FRESH.fullmatch(op.op.rsplit(".", 1)[-1]) and not written_args(op):
            continue
        inputs = leaves((op.args, op.kwargs), SlotRef) + leaves((op.args, op.kwargs), torch.Tensor)
        groups.union([_key(v) for v in inputs] + [s for s in op.out_slots if s >= 0])
    return groups


def record_slots(spec: PlanSpec) -> tuple[set[int], bool]:
    """The slots that may hold values computed from the record (the plan's inputs, every result of an op that
    reads one, every slot that may alias one written with such values), and whether some op writes such values
    in place while also reading a slot not among them."""
    groups = _alias_groups(spec)
    tainted_groups = {groups.find(s) for s in range(spec.n_inputs)}
    tainted: set[int] = set(range(spec.n_inputs))
    leaked = False
    for op in spec.ops:
        read = _slots((op.args, op.kwargs))
        if not any(groups.find(s) in tainted_groups for s in read):
            continue
        written = written_args(op)
        if written and any(groups.find(s) not in tainted_groups for s in read):
            leaked = True
        tainted_groups.update(groups.find(_key(v)) for v in written)
        tainted_groups.update(groups.find(s) for s in op.out_slots if s >= 0)
    for s in range(spec.n_slots):
        if groups.find(s) in tainted_groups:
            tainted.add(s)
    return tainted, leaked


def _check_shared_writes(spec: PlanSpec, groups: _Aliases) -> None:
    shared = {groups.find(s) for s in range(spec.n_inputs, spec.n_inputs + spec.n_state)}
    for op in spec.ops:
        for v in leaves((op.args, op.kwargs), torch.Tensor):
            shared.add(groups.find(_key(v)))
    for op in spec.ops:
        if any(groups.find(_key(v)) in shared for v in written_args(op)):
            raise PrivacyParameterError(
                f"plan {spec.name!r} writes into its parameters or buffers in place ({op.op}, or a constant or "
                f"a view of one); a DP forward pass must leave them as they are: every record shares them (a "
                f"BatchNorm in training mode updates its running statistics: trace the model after model.eval())")


def check_plan(spec: PlanSpec) -> None:
    """Refuses (PrivacyParameterError) a plan writing into its parameters, buffers or constants, and a creation
    op whose size or fill value comes from the record."""
    _check_shared_writes(spec, _alias_groups(spec))
    tainted, leaked = record_slots(spec)
    for op in spec.ops:
        if op.op not in CREATION_OPS:
            continue
        read = _slots(_value_args(op))
        if any(s in tainted for s in read) or (leaked and read):
            raise PrivacyParameterError(
                f"plan {spec.name!r} uses {op.op} with a size or fill value computed from the record: a size "
                f"would follow the data's values (and a fill value be read out of a record); give it plain "
                f"numbers or the model's own tensors, or use torch.zeros_like(x) + value for a computed fill")


def public_scalars(name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments of a creation op (already accepted by :func:`check_plan`) with each one-element tensor
    size or fill value replaced by its number, so that the op can be sized on meta; other ops unchanged."""
    skip = CREATION_OPS.get(name)
    if skip is None:
        return args, kwargs

    def number(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return v.detach().reshape(()).item()
        if isinstance(v, (list, tuple)):
            return type(v)(number(x) for x in v)
        return v

    return (*args[:skip], *(number(a) for a in args[skip:])), {k: number(v) for k, v in kwargs.items()}
