"""The op rules of the inline work estimate (``inline_work.py``): an op's work and its results' extent from shapes.

Cheap by design (a dict lookup per op name, arithmetic on shapes, no meta run; ~1.5 us on a small op): every
op not in :data:`RULES` is sized by :func:`_default`, its operands' total or their broadcast, whichever is larger
(an in-place op by the tensor it writes); results keep their exact shape where that is cheap to tell
(:data:`ELEMENTWISE`, in-place ops, matrix products), else a bound on their extent. A tensor's extent counts
each dimension as at least 1 (``prod(max(d, 1))``), so a zero-element tensor of shape
(10^9, 0) still counts 10^9 (its ``sum(1)`` is 10^9 zeros). Ops whose work has no cheap bound are never
inline (:data:`NEVER`). An estimate errs high: a request that errs goes to a handler thread, where it runs
exactly as it would have here.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from veil.shapes import extent as _extent

#: the work a result piece costs (a view object made and kept: ~2 us, ~2000 element operations)
PIECE_WORK = 2000
#: the factor of a sort, top-k, unique or median over element operations (a log factor, and slower kernels)
SORT_FACTOR = 16

INF = math.inf


def _broadcast(shapes: list) -> tuple | None:
    """Torch's broadcast of ``shapes`` (None: they do not broadcast: the op is not a broadcasting one)."""
    first = shapes[0]
    for s in shapes:
        if s != first:
            break
    else:
        return first  # (the usual case: equal shapes)
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for s in shapes:
        for i, d in enumerate(s, rank - len(s)):
            o = out[i]
            if d != o:
                if o == 1:
                    out[i] = d
                elif d != 1:
                    return None
    return tuple(out)


def _ints(value: Any, out: list) -> bool:
    """Appends the int leaves of ``value``; False when it has another kind of leaf (a float, a tensor...)."""
    tp = type(value)
    if tp is int:
        out.append(value)
        return True
    if tp is list or tp is tuple:
        return all(_ints(v, out) for v in value)
    return tp is bool


def _arg(args: Any, kwargs: dict, at: int, name: str, default: Any = None) -> Any:
    if len(args) > at:
        return args[at]
    return kwargs.get(name, default)


def _per_dim(value: Any, k: int, default: int | None = None) -> tuple:
    """An int or a list of ints as ``k`` ints (ValueError: anything else)."""
    if value is None and default is not None:
        return (default,) * k
    if type(value) is int:
        return (value,) * k
    ints: list = []
    if not (type(value) in (list, tuple) and _ints(value, ints)) or len(ints) not in (1, k):
        raise ValueError("not ints")
    return tuple(ints) * k if len(ints) == 1 else tuple(ints)


# ------------------------------------------------------------------ rules: (args, kwargs, ops, size) -> (work, out)
# ``ops``: each tensor operand, in the order of the arguments, as ``(shape or None, extent bound, bytes)``;
# ``size(value)``: one argument's operand tuple (None: not a tensor, or unknown). ``out``: a bound on the extent
# of each result (what a later command of the same request that names it is sized with).


def _total(ops: list) -> int:
    total = 0
    for op in ops:
        total += op[1]
    return total


def _default(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    """Linear in the operands, or their broadcast (an elementwise op's result, a loss's intermediate)."""
    total = _total(ops)
    if len(ops) < 2:
        return total, total
    known, unknown, seen = [], 1, []
    for op in ops:
        if op[0] is not None:
            known.append(op[0])
        elif not any(op is other for other in seen):  # (one earlier result named twice broadcasts with itself)
            seen.append(op)
            unknown *= op[1]  # (its shape is unknown: the broadcast is at most the product)
    shape = _broadcast(known) if known else ()
    out = total if shape is None else max(total, _extent(shape) * unknown)
    return out + total, out


def in_place(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    """Writes its first operand, which the others broadcast to (torch refuses one that would grow it)."""
    total, first = _total(ops), size(args[0]) if args else None
    return total, first[1] if first is not None else total


def _sum(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    """Results no larger than the operands together, no broadcast (cat, stack, gather, a class-index loss)."""
    total = _total(ops)
    return total, total


def _sort(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    total = _total(ops)
    return total * SORT_FACTOR, total


def _product(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    """kron, outer, tensordot, an embedding: at most the product of the operands' extents."""
    out = 1
    for op in ops:
        out *= op[1]
    return out, out


def _macs(a: tuple, b: tuple) -> int:
    """Multiply-adds of ``a @ b`` (torch.matmul's rules, each dimension at least 1); the product of their
    extents, a bound, when a shape is unknown."""
    sa, sb = a[0], b[0]
    if not sa or not sb:
        return a[1] * b[1]
    sa = sa if len(sa) > 1 else (1, *sa)
    sb = sb if len(sb) > 1 else (*sb, 1)
    if len(sa) == 2 and len(sb) == 2:
        batch = 1
    else:
        batch = _broadcast([sa[:-2], sb[:-2]])
        batch = _extent(batch) if batch is not None else _extent(sa[:-2]) * _extent(sb[:-2])
    return batch * (sa[-2] or 1) * (sa[-1] or 1) * (sb[-1] or 1)


def _matmul_rule(first: int, swap: bool = False) -> Callable:
    """mm, matmul, bmm, mv, dot (operands 0 and 1), addmm and the like (1 and 2: an addend first)."""

    def rule(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
        if len(args) < first + 2:  # (matrices given by keyword: the product of all operands bounds it)
            return _product(args, kwargs, ops, size)
        a, b = size(args[first]), size(args[first + 1])
        if a is None or b is None:
            return _product(args, kwargs, ops, size)
        macs = _macs(b, a) if swap else _macs(a, b)
        return macs + _total(ops), macs + _total(ops)

    return rule


def _linear(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    """F.linear(x, W, b): each row of x times W's rows."""
    x, w = size(_arg(args, kwargs, 0, "input")), size(_arg(args, kwargs, 1, "weight"))
    if x is None or w is None:
        return _product(args, kwargs, ops, size)
    macs = x[1] * (max(w[0][0], 1) if w[0] else w[1])
    return macs + _total(ops), macs + _total(ops)


def _index_extent(item: Any, size: Callable) -> int:
    """How many positions an index selects at most: a tensor's extent, a list's length (a list of indices
    broadcasts: the product of its items'), a tuple's items' product; an int, slice, None or ... one."""
    tp = type(item)
    if tp is list or tp is tuple:
        n = 1
        for v in item:
            n *= _index_extent(v, size)
        return max(n, len(item)) if tp is list else n
    got = size(item)
    return got[1] if got is not None else 1


def _index_rule(at: int, name: str) -> Callable:
    """Indexing (``x[i]``, ``x[i] = v``, index_select, aten.index): the indexed tensor's extent times the
    index's (rows may repeat)."""

    def rule(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
        x = size(args[0]) if args else None
        out = (x[1] if x is not None else 1) * _index_extent(_arg(args, kwargs, at, name), size)
        return out + _total(ops), out

    return rule


def _shape_made(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    """view, reshape, expand, unflatten: a result of the shape given (zero elements may stand for a large
    shape, whose reductions are that large; an expanded view, for as many elements as it shows)."""
    first = size(args[0]) if args else None
    n = first[1] if first is not None else 0
    ints: list = []
    for value in (*args[1:], *kwargs.values()):
        if not _ints(value, ints):
            if isinstance(value, torch.dtype):
                return n, n * 8  # (a view as a narrower dtype: up to 8 times the elements)
            return INF, INF
    made = 1
    for d in ints:
        made *= max(abs(d), 1)
    return n + 1, max(n, made * (n if -1 in ints else 1))


def _unfold(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    """unfold(dim, size, step): windows of ``size`` elements, at most one per element (a view: what runs on
    it later is that large)."""
    first, window = (size(args[0]) if args else None), _arg(args, kwargs, 2, "size")
    if first is None or type(window) is not int:
        return INF, INF
    return first[1] + 1, first[1] * max(window, 1)


def _pieces_rule(kind: str) -> Callable:
    """unbind, split, chunk: one tensor per piece (a view object each: ~2 us)."""

    def rule(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
        first = size(args[0]) if args else None
        if first is None:
            return INF, INF
        shape, n = first[0], first[1]
        given = None if kind == "unbind" else _arg(args, kwargs, 1, "split_size_or_sections"
                                                   if kind == "split" else "chunks")
        dim = _arg(args, kwargs, 1 if kind == "unbind" else 2, "dim", 0)
        length = n  # (at most one piece per element)
        if shape and type(dim) is int and -len(shape) <= dim < len(shape):
            length = max(shape[dim], 1)
        if type(given) in (list, tuple):
            pieces = len(given)
        elif type(given) is int:
            pieces = min(given, length) if kind == "chunk" else -(-length // given) if given > 0 else length
        else:
            pieces = length
        return n + max(pieces, 1) * PIECE_WORK, n

    return rule


def _nonzero(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    """nonzero, where(condition): an index per element and dimension."""
    first = size(args[0]) if args else None
    if first is None or first[0] is None:
        return INF, INF
    n = first[1] * max(len(first[0]), 1)
    return n + first[1], n


def _where(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    if len(args) == 1 and not kwargs:
        return _nonzero(args, kwargs, ops, size)
    return _default(args, kwargs, ops, size)


def _norm(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    """A nuclear norm is a singular value decomposition (cubic work); the others are linear."""
    p = _arg(args, kwargs, 1, "p")
    if type(p) is str and p != "fro":
        return INF, INF
    return _default(args, kwargs, ops, size)


def _spatial(args: Any, kwargs: dict, size: Callable, k: int) -> tuple:
    """(batch extent, spatial dims) of an (N, C, *L) or (C, *L) input with ``k`` spatial dims (ValueError:
    its shape is unknown)."""
    x = size(_arg(args, kwargs, 0, "input"))
    if x is None or x[0] is None or len(x[0]) < k + 1:
        raise ValueError("unknown input shape")
    return _extent(x[0][:-k]), tuple(max(d, 1) for d in x[0][-k:])


def _conv_rule(k: int | None, aten: bool = False) -> Callable:
    """conv1d, conv2d, aten.convolution: output positions times the weight's extent (each output element
    reads C_in / groups x kernel inputs); a transposed one: never inline."""

    def rule(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
        try:
            w = size(_arg(args, kwargs, 1, "weight"))
            if w is None or w[0] is None or len(w[0]) < 3:
                raise ValueError("unknown weight shape")
            if aten and _arg(args, kwargs, 6, "transposed", True) is not False:
                raise ValueError("a transposed convolution")
            dims = len(w[0]) - 2 if k is None else k
            batch, lengths = _spatial(args, kwargs, size, dims)
            stride = _per_dim(_arg(args, kwargs, 3, "stride", 1), dims, 1)
            dilation = _per_dim(_arg(args, kwargs, 5, "dilation", 1), dims, 1)
            padding = _arg(args, kwargs, 4, "padding", 0)
            same = padding == "same"
            padding = (0,) * dims if type(padding) is str else _per_dim(padding, dims, 0)
        except (ValueError, TypeError, IndexError):
            return INF, INF
        outs = 1
        for L, K, s, p, d in zip(lengths, w[0][2:], stride, padding, dilation):
            span = abs(d) * (max(K, 1) - 1) + 1
            outs *= L if same else max((L + 2 * abs(p) - span) // max(s, 1) + 1, 1)
        out = batch * outs * max(w[0][0], 1)
        return batch * outs * w[1] + out + _total(ops), out

    return rule


def _pool_rule(k: int) -> Callable:
    """avg and max pools: output positions (at most (L + 2 p) / s + 2 a dimension) times the kernel's extent."""

    def rule(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
        try:
            batch, lengths = _spatial(args, kwargs, size, k)
            kernel = _per_dim(_arg(args, kwargs, 1, "kernel_size"), k)
            stride = _arg(args, kwargs, 2, "stride")
            stride = kernel if stride is None or stride == [] or stride == () else _per_dim(stride, k)
            padding = _per_dim(_arg(args, kwargs, 3, "padding", 0), k, 0)
        except (ValueError, TypeError, IndexError):
            return INF, INF
        outs = window = 1
        for L, K, s, p in zip(lengths, kernel, stride, padding):
            outs *= (L + 2 * abs(p)) // max(s, 1) + 2
            window *= max(K, 1)
        out = batch * outs
        return out * window + batch * _extent(lengths), out

    return rule


def _adaptive_rule(k: int) -> Callable:
    """Adaptive pools: the output size is given; a window is at most L / o + 2 long, so a dimension costs at
    most L + 2 o."""

    def rule(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
        try:
            batch, lengths = _spatial(args, kwargs, size, k)
            given = _arg(args, kwargs, 1, "output_size")
            given = (given,) * k if type(given) is int or given is None else tuple(given)
            given = given * k if len(given) == 1 else given
            sizes = [L if o is None else o for L, o in zip(lengths, given)]
            if len(given) != k or any(type(o) is not int for o in sizes):
                raise ValueError("output size")
        except (ValueError, TypeError, IndexError):
            return INF, INF
        work = out = batch
        for L, o in zip(lengths, sizes):
            work *= L + 2 * max(o, 1)
            out *= max(o, 1)
        return work, out

    return rule


def _pad(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    """F.pad, aten.constant_pad_nd: each padded dimension grows by its two pads."""
    first, pads = size(_arg(args, kwargs, 0, "input")), []
    if first is None or not _ints(_arg(args, kwargs, 1, "pad"), pads) or len(pads) % 2:
        return INF, INF
    shape, n = first[0], first[1]
    if shape is not None and len(pads) // 2 <= len(shape):
        dims = list(shape)
        for i in range(len(pads) // 2):
            dims[-1 - i] += pads[2 * i] + pads[2 * i + 1]
        out = _extent(dims)
    else:
        out = n
        for i in range(0, len(pads), 2):
            out *= 1 + abs(pads[i]) + abs(pads[i + 1])
    return out + n, out


def _matmul_shape(sa: tuple, sb: tuple) -> tuple | None:
    """``torch.matmul``'s result shape (None: the shapes do not multiply)."""
    if not sa or not sb:
        return None
    a = sa if len(sa) > 1 else (1, *sa)
    b = sb if len(sb) > 1 else (*sb, 1)
    batch = _broadcast([a[:-2], b[:-2]])
    if batch is None or a[-1] != b[-2]:
        return None
    out = (*batch, a[-2], b[-1])
    if len(sa) == 1:
        out = out[:-2] + out[-1:]
    return out[:-1] if len(sb) == 1 else out


#: ops whose result has exactly the broadcast shape of their tensor operands (elementwise; a later command of the
#: same request that names their result is sized with that shape, not a bound)
ELEMENTWISE = frozenset(
    [f"torch.{n}" for n in (
        "add sub subtract mul multiply div divide true_divide pow neg negative abs absolute exp expm1 log log1p "
        "log2 log10 sqrt rsqrt sigmoid tanh relu sin cos tan sinh cosh asin acos atan atan2 erf sign floor ceil "
        "round trunc reciprocal square maximum minimum eq ne lt le gt ge logical_and logical_or logical_xor "
        "logical_not lerp clamp clamp_min clamp_max clip remainder fmod floor_divide isnan isinf isfinite softmax "
        "log_softmax").split()]
    + [f"Tensor.{n}" for n in (
        "__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __floordiv__ __rfloordiv__ "
        "__mod__ __pow__ __rpow__ __neg__ __pos__ __abs__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __and__ __or__ "
        "__xor__ __invert__ abs add sub mul div pow neg exp log sqrt rsqrt sigmoid tanh relu sin cos sign floor "
        "ceil round reciprocal square maximum minimum eq ne lt le gt ge clamp clamp_min softmax log_softmax float "
        "double half int long bool byte detach clone contiguous").split()]
    + [f"torch.nn.functional.{n}" for n in (
        "relu relu6 sigmoid tanh gelu silu elu leaky_relu hardtanh softplus logsigmoid softmax log_softmax "
        "dropout").split()])


#: in-place ops that change their tensor's shape (same extent; the shape is not kept)
RESHAPED_IN_PLACE = frozenset({"Tensor.squeeze_", "Tensor.unsqueeze_", "Tensor.t_", "Tensor.transpose_"})


def result_shape(name: str, rule: Callable, args: Any, ops: list, size: Callable) -> tuple | None:
    """The exact shape of an op's result, where it is cheap to tell (elementwise, in place, matrix products),
    else None."""
    if rule is _default:
        if name in ELEMENTWISE and ops and all(op[0] is not None for op in ops):
            return _broadcast([op[0] for op in ops])
        return None
    if rule is in_place:
        if name in RESHAPED_IN_PLACE:
            return None
        first = size(args[0]) if args else None
        return first[0] if first is not None else None
    if rule is _MM or rule is _RMM or rule is _linear:
        if len(args) < 2:
            return None
        a, b = size(args[0]), size(args[1])
        if a is None or b is None or a[0] is None or b[0] is None:
            return None
        if rule is _linear:
            x, w = a[0], b[0]
            if not x or len(w) not in (1, 2) or x[-1] != w[-1]:
                return None
            return x[:-1] + w[:1] if len(w) == 2 else x[:-1]
        return _matmul_shape(b[0], a[0]) if rule is _RMM else _matmul_shape(a[0], b[0])
    return None


def _never(args: Any, kwargs: dict, ops: list, size: Callable) -> tuple:
    return INF, INF


#: ops whose result or work is fixed by public arguments, or has no bound from shapes that is cheap to tell:
#: never inline (creation ops, einsum, repeat/tile, diag, one_hot, transposed convolutions, backward over a
#: graph of any size; a Python list times an int is allowlisted no more: veil/mpc/wire_ops.py)
NEVER = frozenset(
    [f"torch.{n}" for n in "zeros ones full arange rand randn randint randperm eye einsum repeat_interleave tile "
                           "diag conv_transpose2d".split()]
    + ["torch.nn.functional.one_hot", "Tensor.repeat", "Tensor.diag", "Tensor.backward", "aten.repeat.default",
       "aten.new_zeros.default"])

_MM = _matmul_rule(0)
_ADDMM = _matmul_rule(1)
_F = "torch.nn.functional."

#: op name -> its rule (every other op: :func:`_default`, or :func:`in_place` for a name ending in ``_``)
RULES: dict[str, Callable] = {name: _never for name in NEVER}
RULES.update({name: _MM for name in (
    "torch.mm", "torch.matmul", "torch.bmm", "torch.mv", "torch.dot", "Tensor.mm", "Tensor.matmul",
    "Tensor.__matmul__", "aten.mm.default", "aten.bmm.default", "aten.mv.default", "aten.dot.default",
    "aten.matmul.default")})
RULES.update({name: _ADDMM for name in (
    "torch.addmm", "torch.addmv", "torch.addbmm", "torch.baddbmm", "Tensor.addmm", "Tensor.addmm_")})
_RMM = RULES["Tensor.__rmatmul__"] = _matmul_rule(0, swap=True)
RULES[_F + "linear"] = _linear
RULES.update({name: _product for name in ("torch.kron", "torch.outer", "torch.tensordot")})
RULES.update({name: _index_rule(1, "indices") for name in ("Tensor.__getitem__", "Tensor.__setitem__",
                                                             "aten.index.Tensor")})
RULES.update({name: _index_rule(2, "index") for name in ("torch.index_select", "Tensor.index_select",
                                                         "aten.index_select.default")})
RULES[_F + "embedding"] = _product
RULES.update({name: _sum for name in (
    "torch.cat", "torch.concat", "torch.stack", "torch.hstack", "torch.vstack", "torch.gather", "torch.take",
    "torch.scatter", "torch.scatter_add", "aten.cat.default", "aten.stack.default", "aten.gather.default",
    _F + "cross_entropy", _F + "nll_loss")})
RULES.update({name: _sort for name in (
    "torch.sort", "torch.argsort", "torch.topk", "torch.unique", "torch.median", "Tensor.sort", "Tensor.argsort",
    "Tensor.topk")})
RULES.update({name: _shape_made for name in (
    "Tensor.view", "Tensor.reshape", "torch.reshape", "Tensor.expand", "Tensor.unflatten", "aten.view.default",
    "aten._unsafe_view.default", "aten.reshape.default", "aten.expand.default")})
RULES.update({name: _unfold for name in ("Tensor.unfold", "aten.unfold.default")})
RULES.update({name: _pieces_rule("unbind") for name in ("torch.unbind", "Tensor.unbind", "aten.unbind.int")})
RULES.update({name: _pieces_rule("split") for name in (
    "torch.split", "Tensor.split", "aten.split.Tensor", "aten.split_with_sizes.default")})
RULES.update({name: _pieces_rule("chunk") for name in ("torch.chunk", "Tensor.chunk")})
RULES["torch.nonzero"] = _nonzero
RULES.update({name: _where for name in ("torch.where", "Tensor.where")})
RULES.update({name: _norm for name in ("torch.norm", "Tensor.norm")})
RULES.update({name: _conv_rule(k) for name, k in (
    ("torch.conv1d", 1), ("torch.conv2d", 2), (_F + "conv1d", 1), (_F + "conv2d", 2))})
RULES["aten.convolution.default"] = _conv_rule(None, aten=True)
RULES.update({_F + name: _pool_rule(k) for name, k in (
    ("avg_pool1d", 1), ("avg_pool2d", 2), ("max_pool1d", 1), ("max_pool2d", 2), ("max_pool2d_with_indices", 2))})
RULES.update({_F + name: _adaptive_rule(k) for name, k in (
    ("adaptive_avg_pool1d", 1), ("adaptive_avg_pool2d", 2), ("adaptive_max_pool2d", 2))})
RULES.update({_F + "pad": _pad, "aten.constant_pad_nd.default": _pad})


def rule_for(name: str) -> Callable:
    """The rule that sizes op ``name`` (what :func:`~veil.workers.inline_work.request_work` calls per op)."""
    rule = RULES.get(name)
    if rule is not None:
        return rule
    if name[-1:] == "_" and name[-2:] != "__" or name in ("Tensor.__iadd__", "Tensor.__isub__", "Tensor.__imul__",
                                                           "Tensor.__itruediv__"):
        return in_place
    return _default
