"""The torch functions and tensor methods a worker agrees to execute.

One explicit table maps a wire name (``"torch.add"``, ``"Tensor.sum"``,
``"torch.nn.functional.relu"``) to the callable and to how the caller learns the
result's shape. Callers look ops up by the callable they intercepted; workers
look them up by name. An op that is not in the table is refused on both sides,
so the wire can never name ``torch.load``, ``os.system`` or a private attribute.
Extensions (SMPC providers, DP sanitizers, plans) add *worker functions*, which
receive the executing worker as first argument, with :func:`register_worker_function`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from veil.exceptions import OperationNotAllowedError

#: how a caller learns result shapes: run on meta tensors, no result, or ask the worker
INFER, NO_RESULT, WORKER_DESCRIBES = "infer", "none", "worker"


@dataclass(frozen=True)
class Op:
    name: str
    func: Callable[..., Any]
    shapes: str = INFER
    worker_function: bool = False  # called as func(worker, *args, **kwargs)
    #: a worker function's parameters that may hold a value the requester may not learn (a share revealable only
    #: to others, dealt material): every other one is public (veil/workers/oblivious.py, worker_function_refusal)
    secret_parameters: frozenset = frozenset()


TORCH_FUNCTIONS = """
abs absolute acos add addbmm addcdiv addcmul addmm addmv all allclose amax amin any arange argmax argmin
argsort asin atan atan2 baddbmm bernoulli bmm broadcast_tensors cat ceil chunk clamp clamp_max clamp_min
clip clone concat conv1d conv2d conv_transpose2d cos cosh cross cummax cummin cumprod cumsum diag diagonal
div divide dot dropout einsum empty_like eq equal erf exp expm1 eye flatten flip floor floor_divide fmod
full full_like gather ge gt hstack index_select isclose isfinite isinf isnan kron le lerp log log10 log1p
log2 log_softmax logical_and logical_not logical_or logical_xor logsumexp lt masked_fill masked_select matmul max
maximum mean median min minimum mm mul multiply mv narrow ne neg negative nonzero norm numel ones ones_like
outer permute pow prod rand rand_like randint randn randn_like randperm reciprocal relu remainder repeat_interleave
reshape round rsqrt scatter scatter_add select sigmoid sign sin sinh softmax sort split sqrt square squeeze stack
std sub subtract sum t take tan tanh tensordot tile topk trace transpose tril triu true_divide trunc unbind
unique unsqueeze var vstack where zeros zeros_like
"""

NN_FUNCTIONAL = """
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool2d avg_pool1d avg_pool2d batch_norm binary_cross_entropy
binary_cross_entropy_with_logits conv1d conv2d cosine_similarity cross_entropy dropout elu embedding gelu
group_norm hardtanh l1_loss layer_norm leaky_relu linear log_softmax logsigmoid max_pool1d max_pool2d
max_pool2d_with_indices mse_loss nll_loss normalize one_hot pad relu relu6 sigmoid silu smooth_l1_loss softmax
softplus tanh
"""

TENSOR_METHODS = """
__abs__ __add__ __and__ __eq__ __floordiv__ __ge__ __getitem__ __gt__ __iadd__ __imul__ __invert__ __isub__
__itruediv__ __le__ __lt__ __matmul__ __mod__ __mul__ __ne__ __neg__ __or__ __pos__ __pow__ __radd__ __rmatmul__
__rmul__ __rpow__ __rsub__ __rtruediv__ __rfloordiv__ __setitem__ __sub__ __truediv__ __xor__
abs abs_ add add_ addcdiv_ addcmul_ addmm all amax amin any argmax argmin argsort bool byte ceil chunk clamp clamp_
clamp_min clone contiguous copy_ cos cumsum detach detach_ diag div div_ double eq exp expand expand_as fill_
flatten flip float floor ge gt half index_select int le log log_softmax long lt masked_fill masked_fill_ matmul max
mean min mm mul mul_ narrow ne neg neg_ norm normal_ permute pow pow_ prod reciprocal relu relu_ repeat requires_grad_
reshape reshape_as round rsqrt select sigmoid sign sin softmax sort split sqrt sqrt_ square squeeze squeeze_ std
sub sub_ sum t t_ tanh to topk transpose transpose_ tril triu type_as unbind unflatten unfold uniform_ unsqueeze
unsqueeze_ var view view_as where zero_ lerp_ addmm_ maximum minimum
"""

# Methods that return nothing useful and whose result the caller never needs.
NO_RESULT_METHODS = ("backward",)


#: set on a tensor handed out or set as a gradient: it gets no gradient of its own and its own is not handed out,
#: so a chain of gradients is at most two deep (the worker walks the chain of every tensor a failed command names,
#: and charges it to the quota on every command: built one level per command, a chain 10^5 deep made each later
#: command naming its root walk 10^5 tensors)
_GRADIENT = "_veil_gradient"


def _has_grad(t: torch.Tensor) -> bool:
    return (t.is_leaf or t.retains_grad) and t.grad is not None  # (a non-leaf's .grad: torch would warn)


def _get_grad(t: torch.Tensor) -> torch.Tensor | None:
    # non-leaf tensors have no .grad (torch would only warn), nor has a gradient: answer None quietly
    if not _has_grad(t) or getattr(t, _GRADIENT, False):
        return None
    grad = t.grad
    setattr(grad, _GRADIENT, True)
    return grad


def _set_grad(t: torch.Tensor, value: torch.Tensor | None) -> None:
    if value is not None:
        if getattr(t, _GRADIENT, False) or (isinstance(value, torch.Tensor) and _has_grad(value)):
            raise TypeError("a gradient has no gradient of its own (x.grad = v: x is a gradient, or v has one)")
    t.grad = value
    if value is not None:
        setattr(value, _GRADIENT, True)


def _get_data(t: torch.Tensor) -> torch.Tensor:
    return t.data


def _set_requires_grad(t: torch.Tensor, value: bool) -> None:
    # a Python bool only: bool() of a tensor computed from protected data would store one bit of it in a
    # flag every later descriptor shows (torch's own requires_grad_ refuses a tensor the same way)
    if type(value) is not bool:
        raise TypeError(f"requires_grad takes True or False, not {type(value).__name__}")
    t.requires_grad = value


def _copy(t: torch.Tensor) -> torch.Tensor:
    """An independent copy that keeps ``requires_grad`` but not the graph (``ptr.copy()``)."""
    out = t.detach().clone()
    if t.requires_grad:
        out.requires_grad_(True)
    return out


class Allowlist:
    """Name <-> callable table; see the module docstring."""

    def __init__(self) -> None:
        self._by_name: dict[str, Op] = {}
        self._by_func: dict[Any, Op] = {}

    def add(self, name: str, func: Callable, shapes: str = INFER, worker_function: bool = False, intercepted: Any = None,
            secret_parameters: tuple = ()) -> Op:
        if name in self._by_name:
            raise ValueError(f"op {name!r} is already allowlisted")
        op = Op(name, func, shapes, worker_function, frozenset(secret_parameters))
        self._by_name[name] = op
        key = func if intercepted is None else intercepted
        try:
            self._by_func.setdefault(key, op)
        except TypeError:  # unhashable callables are reachable by name only
            pass
        return op

    def by_name(self, name: Any) -> Op:
        op = self._by_name.get(name) if isinstance(name, str) else None
        if op is None:
            raise OperationNotAllowedError(f"operation {name!r} is not in the worker's allowlist")
        return op

    def by_func(self, func: Any) -> Op:
        try:
            op = self._by_func.get(func)
        except TypeError:
            op = None
        if op is None:
            raise OperationNotAllowedError(
                f"operation {describe_callable(func)!r} is not in veil's allowlist of remote operations"
            )
        return op

    def names(self) -> list[str]:
        return sorted(self._by_name)


def describe_callable(func: Any) -> str:
    """A readable name for error messages (``Tensor.item``, ``torch.load``...)."""
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    mod = getattr(func, "__module__", None)
    qual = qual.replace("TensorBase.", "Tensor.")
    return qual if qual.startswith("Tensor.") or not mod else f"{mod}.{qual}"


def _names(block: str) -> list[str]:
    return block.split()


def build_default_allowlist() -> Allowlist:
    table = Allowlist()
    for name in _names(TORCH_FUNCTIONS):
        table.add(f"torch.{name}", getattr(torch, name))
    for name in _names(NN_FUNCTIONAL):
        table.add(f"torch.nn.functional.{name}", getattr(F, name))
    for name in _names(TENSOR_METHODS):
        table.add(f"Tensor.{name}", getattr(torch.Tensor, name))
    for name in NO_RESULT_METHODS:
        table.add(f"Tensor.{name}", getattr(torch.Tensor, name), shapes=NO_RESULT)
    # Properties reach __torch_function__ as their descriptor's __get__/__set__.
    table.add("Tensor.grad.__get__", _get_grad, WORKER_DESCRIBES, intercepted=torch.Tensor.grad.__get__)
    table.add("Tensor.grad.__set__", _set_grad, NO_RESULT, intercepted=torch.Tensor.grad.__set__)
    table.add("Tensor.data.__get__", _get_data, intercepted=torch.Tensor.data.__get__)
    table.add(
        "Tensor.requires_grad.__set__", _set_requires_grad, NO_RESULT, intercepted=torch.Tensor.requires_grad.__set__
    )
    table.add("Tensor.T.__get__", torch.Tensor.t, intercepted=torch.Tensor.T.__get__)
    table.add("veil.copy", _copy)
    return table


ALLOWLIST = build_default_allowlist()


def register_worker_function(name: str, func: Callable, shapes: str = WORKER_DESCRIBES,
                             secret_parameters: tuple = ()) -> Op:
    """Allowlists a function a worker runs with itself as first argument (protocol steps). Outside ``veil.mpc``,
    its parameters are public unless named in ``secret_parameters``: a value the requester may not learn is refused
    anywhere else before the function runs (such a function must then be value-oblivious: it runs under
    veil/workers/oblivious.py's guard)."""
    return ALLOWLIST.add(name, func, shapes, worker_function=True, secret_parameters=secret_parameters)
