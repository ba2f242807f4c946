"""Sizes a command before its op runs, so that a session quota refuses a huge allocation before it happens.

The monitor charges a result once it exists (``ReferenceMonitor.store``): a request for ``torch.zeros(n)``,
``outer`` or a loss over a broadcast of two long vectors was allocated in full, for the moment of one
request, before the quota said no. With a quota set (``--max-session-mb``), :func:`check` first sizes the
op and refuses the command when it does not fit what the session has left:

- its results: the op runs on PyTorch's ``meta`` device (shapes and dtypes only, the same for every value,
  so nothing about a secret input), summing the new storage of its outputs and the growth of any input's
  storage (``out=`` resized);
- what its kernel may materialize beyond its inputs' storage: an expanded view's logical size, the
  broadcast of its tensor inputs (a loss over a (n, 1) and an (n,) tensor builds n x n differences);
- ops whose result size depends on values cannot run on meta: those with a bound from shapes alone
  (:data:`VALUE_BOUNDS`: ``nonzero``, ``masked_select``, ``unique``...) are sized by it; any other (a size
  given as a stored tensor, ``one_hot`` without ``num_classes``, ``repeat_interleave`` without
  ``output_size``) is refused under a quota, with the reason.

The meta run costs tens of microseconds, so the answer is kept per session, op and argument signature
(shapes, dtypes, plain values; long strings are never kept): a training loop pays it once per shape. A plan
is sized op by op against one running total (:class:`Budget`): its slots stay alive until it ends.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

import torch

from veil.shapes import broadcast_shape, numel
from veil.tensors.tree import leaves
from veil.workers import grad_charges, grad_cycles
from veil.workers.grad_cycles import graph_nodes, wants_graph
from veil.workers.output_pieces import PIECE_OPS, pieces

#: signatures whose sizes are remembered (least recently used first out). Shared by every session, each
#: entry under its session's key (no session hits another's); what one session can still observe is that its
#: own entries were evicted by others' new signatures (tens of microseconds each, a coarse count of others'
#: activity) -- kept: the miss it saves is a meta run, far below a command's own cost and noise
CACHE_SIZE = 4096
#: a signature with more items than this, or a string longer than MAX_KEY_STRING, is not kept: sized each time
MAX_KEY_ITEMS = 64
MAX_KEY_STRING = 64

_cache: OrderedDict = OrderedDict()
_lock = threading.Lock()


class Unsizable(Exception):
    """An op whose result size depends on values and has no bound from shapes alone."""


class ArgumentError(Exception):
    """The op's own error, met on meta (bad arguments: a shape mismatch, a missing tensor): it is not run,
    and the client gets that error as the op would have given it (``cause``), not a quota refusal."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


#: words of a meta run's error that say it failed for want of values (not for bad arguments)
_VALUE_WORDS = ("meta", "item()", "data-dependent", "data dependent")


class _Unkeyable(Exception):
    """An argument that does not fit a signature (an object, a long list or string): sized without the cache."""


def _tensors(args: Any, kwargs: dict) -> list:
    return [t for t in leaves((args, kwargs), torch.Tensor)]


def _nonzero_bound(args: Any, kwargs: dict) -> int:
    x = _tensors(args, kwargs)[0]
    return numel(x.shape) * max(x.dim(), 1) * 8


def _broadcast_bound(args: Any, kwargs: dict) -> int:
    ts = _tensors(args, kwargs)
    return numel(broadcast_shape(*(t.shape for t in ts))) * max(t.element_size() for t in ts)


def _unique_bound(args: Any, kwargs: dict) -> int:
    x = _tensors(args, kwargs)[0]
    return numel(x.shape) * (x.element_size() + 16)  # values, inverse indices, counts


def _where_bound(args: Any, kwargs: dict) -> int:
    if len(args) == 1 and not kwargs:  # where(condition): nonzero as a tuple
        return _nonzero_bound(args, kwargs)
    raise Unsizable("a where() over these arguments")


def _getitem_bound(args: Any, kwargs: dict) -> int:
    """Advanced indexing with a boolean mask: the result's shape is the broadcast of the indices (a mask
    counts as an index of as many entries as it has elements: at most that many are selected) followed by
    the dimensions no index covers."""
    x, index = args[0], args[1] if len(args) > 1 else None
    items = index if type(index) is tuple else (index,)
    shapes, covered, d = [], 1, 0
    for item in items:
        if type(item) is torch.Tensor:
            if item.dtype == torch.bool:
                covered *= numel(x.shape[d:d + item.dim()])
                shapes.append((item.numel(),))
                d += item.dim()
            else:
                covered *= int(x.shape[d])
                shapes.append(tuple(item.shape))
                d += 1
        elif type(item) is int:
            covered *= int(x.shape[d])
            d += 1
        elif type(item) is slice:
            d += 1
        elif item is not None:  # (Ellipsis, lists...: not worth modelling next to a mask)
            raise Unsizable("a boolean mask beside this kind of index")
    rest = numel(x.shape) // max(covered, 1)
    return numel(broadcast_shape(*shapes)) * rest * x.element_size()


def _backward_bound(args: Any, kwargs: dict, watch: Callable | None = None) -> int:
    """``backward``: the gradients it creates for the leaves its graph reaches (a leaf that has one already
    is accumulated in place), for its root when it is a leaf itself (``x.backward(g)``) and for the tensors of
    ``inputs=`` (a non-leaf one gets a gradient too). Its graph is walked, at most MAX_GRAPH_NODES nodes;
    ``watch(leaf)`` for each leaf (:func:`check`: its gradients are charged as made, veil/workers/grad_charges.py).

    Raises:
        Unsizable: ``create_graph`` (its graph of gradients saves the intermediate gradients of every op it
            passes, of no size known before it runs, and torch keeps a leaf and that graph in a reference cycle
            the collector cannot break), or a sparse gradient (one row per index looked up, however few rows
            the weight has: ``embedding(..., sparse=True)``).
    """
    if wants_graph(args, kwargs):
        raise Unsizable("backward(create_graph=True) builds a graph of gradients of unknown size")
    root = args[0] if args and type(args[0]) in (torch.Tensor, torch.nn.Parameter) else None
    if root is None:
        return 0  # (no tensor: backward raises before allocating)
    inputs = kwargs.get("inputs", args[4] if len(args) > 4 else None)
    counted: set = set()  # ids of the tensors whose gradient is counted (each once)

    def add(t: torch.Tensor) -> int:
        if id(t) in counted or not t.requires_grad or ((t.is_leaf or t.retains_grad) and t.grad is not None):
            return 0
        counted.add(id(t))
        return numel(t.shape) * t.element_size()

    # a leaf root (torch accumulates into its .grad) and the tensors ``inputs=`` names, leaves or not
    named = [t for t in [root, *leaves(inputs, torch.Tensor)] if t is not root or t.grad_fn is None]
    if watch is not None:
        for t in named:
            if t.grad_fn is None:
                watch(t)
    total = sum(add(t) for t in named)
    for node in graph_nodes(root.grad_fn, MAX_GRAPH_NODES, _too_deep):
        variable = getattr(node, "variable", None)
        if type(variable) in (torch.Tensor, torch.nn.Parameter):
            if watch is not None:
                watch(variable)
            total += add(variable)
        elif getattr(node, "_saved_sparse", False) is True:
            raise Unsizable("a sparse gradient (embedding sparse=True) of one row per index looked up")
    return total


def _too_deep() -> None:
    raise Unsizable(f"a graph of more than {MAX_GRAPH_NODES} nodes")


#: nodes of an autograd graph ``backward``'s bound walks at most (a deeper graph: refused under a quota)
MAX_GRAPH_NODES = 100_000
#: ops sized by their autograd graph, by :func:`check` each time: remembered by the root's signature (a scalar
#: loss), one ``backward`` over a small graph let every later one run unsized, over any number of leaves
GRAPH_SIZED = frozenset({"Tensor.backward"})


#: op name -> a bound on the bytes of its results from its arguments' shapes alone, for ops whose result
#: size depends on values (they cannot run on meta); anything else that cannot run there is refused
VALUE_BOUNDS: dict[str, Callable[[Any, dict], int]] = {
    "torch.nonzero": _nonzero_bound, "Tensor.nonzero": _nonzero_bound,
    "torch.masked_select": _broadcast_bound, "Tensor.masked_select": _broadcast_bound,
    "torch.unique": _unique_bound, "Tensor.unique": _unique_bound,
    "torch.where": _where_bound, "Tensor.where": _where_bound,
    "Tensor.__getitem__": _getitem_bound,
    # a Python bool (no meta kernel, or .item() of one): what the comparison materializes
    "torch.allclose": _broadcast_bound, "Tensor.allclose": _broadcast_bound,
    "torch.equal": _broadcast_bound, "Tensor.equal": _broadcast_bound,
    # runs with grad tracking, which the meta run (no_grad) has not
    "Tensor.backward": _backward_bound,
}


#: ops that index by their second argument: a boolean (or uint8) tensor there is a mask, which selects, or
#: writes (``x[mask] = v`` runs on meta), as many entries as it holds True values
MASK_INDEXED = frozenset({"Tensor.__getitem__", "Tensor.__setitem__", "aten.index.Tensor", "torch.index_put",
                          "Tensor.index_put", "Tensor.index_put_", "aten.index_put.default",
                          "aten.index_put_.default"})


def value_sized(name: str, func: Callable, args: Any, kwargs: dict, fixed: frozenset = frozenset()) -> str | None:
    """Why the size of ``func(*args, **kwargs)``'s results, or of the work it does, follows its inputs' values
    (None: their shapes, dtypes and the plain arguments fix it): a mask index (:data:`MASK_INDEXED`), or an
    op that cannot run on ``meta`` for want of values (``nonzero``, ``masked_select``, ``unique``: the ops
    :data:`VALUE_BOUNDS` bounds; a size or count given as a tensor, which nothing bounds). An op that fails
    on meta for bad arguments is not one: it raises the same when it runs. ``fixed``: ids of tensors that are
    the same for every record (a plan's constants, its frozen state): a mask among them selects a fixed count.
    (DP plans: veil/dp/plan_grads.py)"""
    if name in MASK_INDEXED:  # integer tensor indices give the shape of the indices (x[t] of a 0-dim t
        # reads its value on the host, so not on meta, but its result has a fixed shape)
        masks = len(args) > 1 and any(t.dtype in (torch.bool, torch.uint8) and id(t) not in fixed
                                      for t in leaves(args[1], torch.Tensor))
        return "a boolean mask index" if masks else None
    inputs: list = []
    meta_args = [_on_meta(a, inputs) for a in args]
    meta_kwargs = {k: _on_meta(v, inputs) for k, v in kwargs.items()}
    if not inputs:
        meta_kwargs["device"] = "meta"
    try:
        with torch.no_grad():
            func(*meta_args, **meta_kwargs)
    except Exception as e:  # noqa: BLE001
        if isinstance(e, NotImplementedError) or any(w in str(e) for w in _VALUE_WORDS):
            return "no size from shapes alone"
    return None


def _key_of(value: Any, out: list) -> None:
    tp = type(value)
    if tp is torch.Tensor or tp is torch.nn.Parameter:
        out.append((value.dtype, value.shape, value.stride()))
    elif tp is str:
        if len(value) > MAX_KEY_STRING:
            raise _Unkeyable
        out.append((tp, value))
    elif tp in (int, float, bool, type(None)) or isinstance(value, (torch.dtype, torch.Size)):
        out.append((tp, value))
    elif tp in (list, tuple):
        out.append((tp, len(value)))
        for v in value:
            _key_of(v, out)
    elif tp is slice:
        out.append((tp, value.start, value.stop, value.step))
    else:
        raise _Unkeyable
    if len(out) > MAX_KEY_ITEMS:
        raise _Unkeyable


def _signature(scope: str, name: str, args: Any, kwargs: dict) -> tuple | None:
    """The cache key of a call. A float decides a size only in a creation op (``arange(0, 1e10, 0.5)``); in
    an op on tensors it is a value (``x * lr``), left out so that a changing one does not miss every time."""
    out: list = [scope, name]
    try:
        _key_of(args, out)
        for k in sorted(kwargs):
            out.append(k)
            _key_of(kwargs[k], out)
    except _Unkeyable:
        return None
    if any(type(item) is tuple and item and isinstance(item[0], torch.dtype) for item in out):
        out = [(float,) if type(item) is tuple and len(item) == 2 and item[0] is float else item for item in out]
    return tuple(out)


def _on_meta(value: Any, inputs: list) -> Any:
    tp = type(value)
    if tp is torch.Tensor or tp is torch.nn.Parameter:
        t = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        inputs.append(t)
        return t
    if tp in (list, tuple):
        return tp(_on_meta(v, inputs) for v in value)
    if tp is dict:
        return {k: _on_meta(v, inputs) for k, v in value.items()}
    return value


#: ops that broadcast their tensor inputs into a result far smaller than the broadcast (a loss, a comparison
#: to one bool): their kernels materialize the broadcast first. (An elementwise op's result *is* its
#: broadcast, counted as a result; a matmul or convolution does not broadcast its operands that way.)
BROADCAST_REDUCING = frozenset({
    "torch.nn.functional.mse_loss", "torch.nn.functional.l1_loss", "torch.nn.functional.smooth_l1_loss",
    "torch.nn.functional.binary_cross_entropy", "torch.nn.functional.binary_cross_entropy_with_logits",
    "torch.nn.functional.cosine_similarity", "torch.allclose", "torch.equal", "Tensor.allclose", "Tensor.equal",
})


def _materialized(name: str, args: Any, kwargs: dict) -> int:
    """Bytes a kernel may materialize beyond its inputs' storage: the logical size of an expanded (or
    otherwise overlapping) input past its storage, and for :data:`BROADCAST_REDUCING` ops the broadcast of
    the tensor inputs past the largest of them."""
    ts = _tensors(args, kwargs)
    if not ts:
        return 0
    logical = [numel(t.shape) * t.element_size() for t in ts]
    extra = max(max(0, size - t.untyped_storage().nbytes()) for size, t in zip(logical, ts))
    if len(ts) > 1 and name in BROADCAST_REDUCING:
        try:
            shape = broadcast_shape(*(t.shape for t in ts))
        except RuntimeError:  # (not broadcastable: a matmul, a convolution...)
            return extra
        extra = max(extra, numel(shape) * max(t.element_size() for t in ts) - max(logical))
    return extra


#: worker functions whose ops are sized one by one as they run (a plan's, against its :class:`Budget`)
SIZED_PER_OP = frozenset({"veil.plan.run", "veil.plan.fit", "veil.plan.load_state"})


def check_view_room(monitor: Any, principal: Any, name: str, args: Any, kwargs: dict, transient: bool = False) -> None:
    """Refuses (QuotaExceededError) a worker function (a protocol step, a command or an opening, a secure
    aggregation or federated step...), or a get or move, that would make more than its tensors' storage holds
    (:func:`amplified_bytes`) past the session's room, or with ``transient`` (a reply: a get, a move, an opening)
    past the quota itself (``check_transient``). Torch ops are sized on meta (:func:`check`); worker functions are
    veil's own code, whose results and temporaries are their operands' size (a combine's its dealt ``c``'s; seed
    expansions check their own), but what the session is charged is each stored tensor's storage, once: a
    ``Tensor.expand`` of one element made an N x N operand for 256 bytes, an (N, 1) and a (1, N) operand an
    N x N mask, one tensor named k times in a list k copies, and the step or reply built them whole before
    anything was refused (red team, session 64: tests/security/test_redteam_session64_*.py)."""
    if monitor.max_session_bytes is None or not principal.isolated:
        return
    extra = amplified_bytes(_tensors(args, kwargs))
    if extra:
        (monitor.check_transient if transient else monitor.check_room)(principal, extra, name)


_DENSE_TYPES = (torch.Tensor, torch.nn.Parameter)


def amplified_bytes(tensors: list) -> int:
    """Bytes ``tensors`` may make beyond the storage they hold, each storage counted once: the sum of their
    logical sizes past that (an expanded or overlapping view, one tensor named several times), or the
    broadcast of all of them past the largest (an elementwise step on an (N, 1) and a (1, N) operand),
    whichever is larger; 0 for tensors of their own storage, slices of one storage, a matrix product's."""
    # dense tensors of their own data only: a pointer's, a shared or fixed-point wrapper's data is elsewhere
    # (reading their storage fails: a pointer refuses it), and a sparse tensor has none to read
    tensors = [t for t in tensors if type(t) in _DENSE_TYPES and t.layout is torch.strided and not t.is_meta]
    if not tensors:
        return 0
    logical = [numel(t.shape) * t.element_size() for t in tensors]
    held = {}
    for t in tensors:
        storage = t.untyped_storage()
        held[storage.data_ptr() or id(storage)] = storage.nbytes()
    extra = sum(logical) - sum(held.values())
    if len(tensors) > 1:
        try:
            shape = broadcast_shape(*(tuple(t.shape) for t in tensors))
        except (RuntimeError, ValueError):  # (not broadcastable: a matmul, a convolution...)
            pass
        else:
            extra = max(extra, numel(shape) * max(t.element_size() for t in tensors) - max(logical))
    return max(extra, 0)


def entries_past_storage(tensors: list) -> int:
    """Entries ``tensors`` name past those their storages hold, each storage counted once: one tensor named again,
    an expanded or overlapping view (0 for distinct tensors of their own storage, or slices of one)."""
    tensors = [t for t in tensors if type(t) in _DENSE_TYPES and t.layout is torch.strided and not t.is_meta]
    held: dict = {}
    for t in tensors:
        storage = t.untyped_storage()
        key = storage.data_ptr() or id(storage)
        held[key] = max(held.get(key, 0), storage.nbytes() // t.element_size())
    return max(0, sum(numel(t.shape) for t in tensors) - sum(held.values()))


def check_named_again(worker: Any, name: str, tensors: list, entry_bytes: int) -> None:
    """Refuses, before it allocates, a worker function that makes ``entry_bytes`` for every entry of ``tensors``
    (a flattened state) when those past their storage would come to more than the worker's largest message, with
    or without a quota (which sizes the whole: :func:`check_view_room`): one big tensor named N times, a few bytes
    per name, made N float64 copies and their concatenation in one call. Honest states name each tensor once."""
    limit = getattr(worker, "max_message", None)
    if not limit:  # (an in-process worker: no message to bound by)
        return
    past = entries_past_storage(tensors) * entry_bytes
    if past > limit:
        from veil.exceptions import RemoteExecutionError

        raise RemoteExecutionError(
            f"{name}: its tensors would make {past / 2**20:.1f} MiB past the storage they hold (a tensor named "
            f"again, an expanded view), more than the worker's largest message ({limit / 2**20:.1f} MiB): refused "
            "before anything is made; name each tensor once")


def new_bytes(func: Callable, args: Any, kwargs: dict, name: str = "") -> int:
    """Bytes ``func(*args, **kwargs)`` may allocate: the new storage of its results (views and inputs
    returned as they are: 0; an input's storage growth counts), or :data:`VALUE_BOUNDS`' bound for ``name``,
    or what it may materialize beyond its inputs, whichever is larger.

    Raises:
        Unsizable: it cannot run on meta and ``name`` has no bound from shapes.
    """
    inputs: list = []
    meta_args = [_on_meta(a, inputs) for a in args]
    meta_kwargs = {k: _on_meta(v, inputs) for k, v in kwargs.items()}
    if not inputs:  # a creation op (zeros, arange, randn...): made on meta
        meta_kwargs["device"] = "meta"
    before = [t.untyped_storage().nbytes() for t in inputs]
    try:
        with torch.no_grad():
            result = func(*meta_args, **meta_kwargs)
    except Exception as e:  # noqa: BLE001  (no meta kernel, a value-dependent size, bad arguments)
        bound = VALUE_BOUNDS.get(name)
        if bound is None:
            text = str(e)
            if not isinstance(e, NotImplementedError) and not any(w in text for w in _VALUE_WORDS):
                raise ArgumentError(e) from None  # (either way the op does not run: only the error differs)
            raise Unsizable(f"{type(e).__name__}: {text.splitlines()[0][:120] if text else ''}") from None
        try:
            results = bound(args, kwargs)
        except Unsizable:
            raise
        except Exception as e2:  # noqa: BLE001  (arguments the bound does not understand: the op says what is wrong)
            raise Unsizable(f"{type(e2).__name__}") from None
        return max(results, _materialized(name, args, kwargs))
    total = sum(max(0, t.untyped_storage().nbytes() - b) for t, b in zip(inputs, before))  # out= resized
    bases: set = set()
    for t in leaves(result, torch.Tensor):
        if t.device.type != "meta":  # (an op that ignored the device: a size we cannot vouch for)
            raise Unsizable(f"{name or 'the op'} did not run on the meta device")
        base = t._base if t._base is not None else t
        if any(base is i for i in inputs) or id(base) in bases:
            continue
        bases.add(id(base))
        total += base.untyped_storage().nbytes()
    return max(total, _materialized(name, args, kwargs))


def predicted_bytes(scope: str, name: str, func: Callable, args: Any, kwargs: dict) -> int:
    """:func:`new_bytes`, remembered per ``scope`` (a session: nothing one learns from another's timing),
    op and signature.

    Raises:
        Unsizable: as :func:`new_bytes` (remembered too).
    """
    key = _signature(scope, name, args, kwargs)
    if key is not None:
        with _lock:
            known = _cache.get(key)
            if known is not None:
                _cache.move_to_end(key)
                if type(known) is str:
                    raise Unsizable(known)
                return known
    try:
        size: Any = new_bytes(func, args, kwargs, name)
    except Unsizable as e:
        size = str(e)
    # (an ArgumentError is not kept: an honest client fixes its call, and the error object holds its text)
    if key is not None:
        with _lock:
            _cache[key] = size
            if len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    if type(size) is str:
        raise Unsizable(size)
    return size


def check(monitor: Any, principal: Any, name: str, func: Callable, args: Any, kwargs: dict,
          pending: int = 0, grad: bool | None = None) -> int:
    """Refuses (QuotaExceededError) a command that would not fit the session's quota (``pending``: bytes
    the same request already holds uncharged, a plan's earlier results), before its op allocates; returns
    its size. ``grad``: whether the op runs with grad tracking (None: as this thread does now). No quota, or
    an in-process caller: nothing to do (0)."""
    if name in GRAPH_SIZED and principal.isolated:  # (with or without a quota: its cycles end with the session)
        grad_cycles.note(principal.namespace, args, kwargs, MAX_GRAPH_NODES)
    if monitor.max_session_bytes is None or not principal.isolated:
        return 0
    try:
        if name in GRAPH_SIZED:  # (never remembered: its size follows the graph, not the root's signature)
            size = _backward_bound(args, kwargs, lambda leaf: grad_charges.watch(monitor, principal, leaf))
        else:
            size = predicted_bytes(principal.namespace, name, func, args, kwargs)
            size += _saved_old_value(name, args, torch.is_grad_enabled() if grad is None else grad)
            if name in PIECE_OPS:  # (views of no new storage, each a tensor the store charges MIN_TENSOR_BYTES)
                from veil.workers.quota import MIN_TENSOR_BYTES

                size += (pieces(name, args, kwargs) or 0) * MIN_TENSOR_BYTES
    except Unsizable as e:
        raise monitor.refuse_unsized(principal, name, str(e)) from None
    if size > 0 or pending:
        monitor.check_room(principal, size + pending, name)
    return size


def _saved_old_value(name: str, args: Any, grad: bool) -> int:
    """What an in-place op on a tensor autograd tracks may save in its graph beside it: a copy of the value it
    overwrites (``pow_``, ``clamp_``, ``abs_`` need it for the gradient), as large as the tensor. Its result is
    its input (sized 0), and without this a session saved a copy per command past its quota
    (:meth:`GraphSaves.settle` charges what it saves)."""
    target = args[0] if grad and args and type(args) in (list, tuple) else None
    if type(target) not in (torch.Tensor, torch.nn.Parameter) or not target.requires_grad or target.is_leaf:
        return 0
    from veil.workers.owner_guard import writes_first_argument  # (owner_guard -> store -> grad_charges)

    keeps = writes_first_argument(name) and name.rsplit(".", 1)[-1] not in KEEP_NO_OLD_VALUE
    return numel(target.shape) * target.element_size() if keeps else 0


#: in-place methods whose graph saves no copy of the value they overwrite (their gradient needs none, or their
#: result, which is the tensor itself): not sized for one (any other in-place op on a tracked tensor is)
KEEP_NO_OLD_VALUE = frozenset({
    "add_", "sub_", "addcdiv_", "addcmul_", "lerp_", "neg_", "relu_", "sqrt_", "copy_", "fill_", "zero_",
    "masked_fill_", "normal_", "uniform_", "detach_", "requires_grad_", "squeeze_", "unsqueeze_", "t_",
    "transpose_", "__iadd__", "__isub__", "__setitem__", "__set__"})


class _Copies(threading.local):
    held = 0  # bytes of owner data copied for the worker function this thread runs (handlers._owner_checks)
    made: frozenset = frozenset()  # the ids of those copies (the function's own: nothing else sees them)


_COPIES = _Copies()


def hold_copies(nbytes: int, made: Any = ()) -> None:
    """The owner data copied for the worker function about to run on this thread (0 once it ended): its
    plan runs size their ops beside it (:class:`Budget`), as the copies live as long as the run; ``made``: the
    copies (a plan step need not copy them again to put them back: no one sees them after a failed run)."""
    _COPIES.held, _COPIES.made = nbytes, frozenset(id(t) for t in made)


def own_copies() -> frozenset:
    """The ids of the owner data copies the running worker function was given (:func:`hold_copies`)."""
    return _COPIES.made


class Budget:
    """Sizes a plan's ops against one running total: a plan keeps every slot alive until it ends, so each
    op must fit beside what the earlier ones made (``size_check`` of ``veil.plans.interpreter.run``), and
    beside the copies of owner data its worker function was given (:func:`hold_copies`)."""

    def __init__(self, monitor: Any, principal: Any) -> None:
        self.monitor, self.principal, self.held = monitor, principal, _COPIES.held

    def __call__(self, name: str, func: Callable, args: Any, kwargs: dict) -> None:
        self.held += check(self.monitor, self.principal, name, func, args, kwargs, self.held)


#: worker functions whose results may carry the autograd graph of many ops (a plan's forward run): what
#: their graphs save is charged to their first result, as for a torch op (filled by the modules)
KEEPS_GRAPH: set[str] = set()


class GraphSaves:
    """What the autograd graph of one command saves beside its inputs and results (``cross_entropy`` keeps
    its log-softmax): recorded while the op runs (``torch.autograd.graph.saved_tensors_hooks``) and charged
    to its first result, since the graph keeps it alive as long as that result. Inputs a graph keeps after
    the session deleted them stay charged to it (``ObjectStore.linger``). A command that stores no new result
    (an in-place op: ``y.pow_(2)`` saves y's old value) has them charged while the graph holds them (``settle``)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        self.saved: dict[int, torch.Tensor] = {}  # storage -> the first tensor the graph saved of it

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        self.storages[ptr] = storage.nbytes()
        self.saved.setdefault(ptr, t)
        return t

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _unpacked)

    def settle(self, entries: list, args: Any, kwargs: dict, result: Any, ids: Any = None,
               charge: tuple | None = None) -> int:
        """Once the op ran: marks the stored inputs the graph saved (``meta["graph_saved"]``: deleted, they stay
        charged while the graph holds them, ``ReferenceMonitor.discard``, tracked or not: ``x * w`` keeps ``x``),
        and returns the bytes of the saved storages that are neither an input's nor a result's, for its first
        new result to carry. ``charge``: (monitor, principal), to charge them while the graph holds them instead
        when the command stores no new result (``ids``: its return ids, None to store each result not an input;
        an in-place op's ``y.pow_(2)`` saves y's old value): 0 is returned then."""
        if not self.storages:
            return 0
        for e in entries:
            obj = e.obj
            if type(obj) is torch.Tensor and obj.untyped_storage().data_ptr() in self.storages:
                e.meta["graph_saved"] = True
        known = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs, result), torch.Tensor)}
        rest = [(self.saved[ptr], n) for ptr, n in self.storages.items() if ptr not in known]
        if charge is None or _stores_new(entries, result, ids):
            return sum(n for _, n in rest)
        for t, nbytes in rest:  # (the tensor the graph saved is freed with it, and the charge then: linger)
            charge[0].charge_growth(charge[1], {}, (t, nbytes))
        return 0


def _stores_new(entries: list, result: Any, ids: Any) -> bool:
    """Whether a command storing ``result`` under return ``ids`` (None: each result not an input) stores a new
    tensor: a result under an id not 0 that is none of its inputs (an in-place op's, under a new id, is its input:
    a charge it carried went into the input's one lingering charge once deleted, every later copy uncharged)."""
    if ids is not None and not (type(ids) is list and any(type(oid) is int and oid != 0 for oid in ids)):
        return False
    inputs = {id(e.obj) for e in entries}
    return any(id(t) not in inputs for t in leaves(result, torch.Tensor))


def _unpacked(t: torch.Tensor) -> torch.Tensor:
    return t
