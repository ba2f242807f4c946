"""What a torch op of an inline request may compute, told from shapes before it runs (red team, session 66).

The inline lane (``inline_lane.py``) runs a short request on the worker's event loop thread, where nothing
interrupts it: while it runs, no other connection, ping, peer fetch or revocation is served. Bounding the
bytes of its stored operands bounds the work of ops that are linear in them, not of ops whose result or work
grows with a product of operand sizes (``outer``, ``kron``, a broadcast of an (n, 1) and a (1, n) operand, a
matrix product, a convolution with a large kernel), with public arguments (``zeros(n)``, ``repeat``, ``pad``,
``expand``, a pool's kernel) or with the number of pieces made (``unbind`` of 2^18 elements: 2^18 tensors,
~0.5 s). :func:`request_work` sizes each op of a request from what is known without running it: a stored
operand's shape (``ReferenceMonitor.stored_size``), a literal tensor's shape, and for a result of the
request's own earlier commands a bound on its extent; plus the op's public arguments. The unit is one
element operation; the request stays inline while the sum over its ops is at most :data:`INLINE_MAX_WORK`.

The rules per op name, and what they know of an op's result, are in ``inline_work_rules.py``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from veil.messaging import messages as m
from veil.shapes import extent as _extent
from veil.workers.inline_work_rules import INF, in_place, result_shape, rule_for

#: element operations the torch ops of one inline request may do in all (a few ms of one core: 2^22 float
#: additions, or a 128 x 128 x 256 matrix product); more takes a handler thread
INLINE_MAX_WORK = 1 << 22
#: the work of naming one operand (resolved and checked by the monitor: ~1 us)
OPERAND_WORK = 1000

_REF = m.ObjectRef
_TENSOR = torch.Tensor


# ------------------------------------------------------------------ a request's commands


def commands(decoded: tuple, skeletons: dict) -> Iterator[tuple]:
    """``(op, args, kwargs, return_ids)`` of each torch command of a decoded request, in the order they run:
    its deferred commands (skeleton uses expanded with the connection's definitions and those the request
    itself carries), then its own command (None for a store, get, delete, list or opening)."""
    msg, _, prelude = decoded
    defined: dict = {}
    for item in prelude or ():
        if type(item) is int:
            continue
        if type(item[0]) is int:  # a skeleton use [k, ids, return_ids(, define)]
            yield _use(skeletons, defined, item[0], item[1], item[2], item[3] if len(item) > 3 else None)
        else:
            yield item[0], item[1], item[2], item[3]
    tp = type(msg)
    if tp is m.CommandMessage:
        yield msg.op, msg.args, msg.kwargs, msg.return_ids
    elif tp is m.SkeletonCommand:
        yield _use(skeletons, defined, msg.skeleton, msg.ids, msg.return_ids, msg.define)


def _use(skeletons: dict, defined: dict, k: Any, ids: Any, return_ids: Any, define: Any) -> tuple:
    """A skeleton use's ``(op, args, kwargs, return_ids)``: its definition (the connection's, or one this
    request carries) with the slots filled (ValueError: malformed; the worker refuses it where it runs)."""
    if define is not None:
        if type(define) is not list or len(define) != 4 or type(define[1]) is not list or type(define[2]) is not dict:
            raise ValueError("a malformed definition")
        defined[k] = (define[0], define[1], define[2])
    found = defined.get(k)
    if found is None:
        skeleton = skeletons.get(k)
        if skeleton is None:
            raise ValueError("an unknown skeleton")
        found = defined[k] = (skeleton.op, skeleton.args, skeleton.kwargs)
    op, args, kwargs = found
    if type(ids) is not list:
        raise ValueError("malformed ids")
    return op, [_REF(ids[a.id]) if type(a) is _REF else a for a in args], kwargs, return_ids


def request_work(decoded: tuple, skeletons: dict, stored: Callable[[Any, int], tuple | None],
                 principal: Any) -> tuple[float, int]:
    """``(work, operand bytes)`` of a decoded request's torch commands: the work their rules estimate, in all
    (element operations; ``inf``: one is never inline, or has no estimate, or is malformed: its handler thread
    says how), and the bytes of the stored objects they name (each time named). ``stored(principal, id)``:
    ``(shape or None, extent, bytes)`` of a stored object the session may name (None: unknown; the op fails on
    it as anywhere). Stops counting once the work passes :data:`INLINE_MAX_WORK`."""
    # id -> its operand tuple: stored objects as looked up once, and what the request's earlier commands make
    # or rewrite (their results, an in-place op's tensor, an ``out=`` tensor) as ``(shape or None, extent, 0)``
    known: dict = {}

    def size(value: Any) -> tuple | None:
        if type(value) is _REF:
            oid = value.id
            got = known.get(oid, _MISSING)
            if got is _MISSING:
                got = known[oid] = stored(principal, oid) if type(oid) is int else None
            return got
        if isinstance(value, _TENSOR):  # a literal (its bytes are the request's)
            shape = tuple(value.shape)
            return shape, _extent(shape), 0
        return None

    work, nbytes = 0.0, 0
    try:
        steps = list(commands(decoded, skeletons))
        last = len(steps) - 1
        for at, (name, args, kwargs, return_ids) in enumerate(steps):
            if type(name) is not str or type(args) not in (list, tuple) or type(kwargs) is not dict:
                return INF, nbytes
            ops: list = []
            _operands(args, size, ops)
            if kwargs:
                _operands(kwargs, size, ops)
            for op in ops:
                nbytes += op[2]
            rule = rule_for(name)
            cost, out = rule(args, kwargs, ops, size)
            work += cost + len(ops) * OPERAND_WORK
            if work > INLINE_MAX_WORK:
                return work, nbytes
            if at == last:
                break  # (what the last command makes, nothing after it names)
            written = [rid for rid in return_ids if type(rid) is int and rid] if type(return_ids) is list else []
            if rule is in_place and args and type(args[0]) is _REF:
                written.append(args[0].id)
            if "out" in kwargs:
                written.extend(v.id for v in m.arg_leaves(kwargs["out"]) if type(v) is _REF)
            if written:
                shape = result_shape(name, rule, args, ops, size)
                made = (None, max(int(out), 1), 0) if shape is None else (shape, _extent(shape), 0)
                for oid in written:
                    known[oid] = made
    except (TypeError, ValueError, IndexError, AttributeError, OverflowError):
        return INF, nbytes
    return work, nbytes


_MISSING = object()


def _operands(value: Any, size: Callable, out: list) -> None:
    for v in (value.values() if type(value) is dict else value):
        tp = type(v)
        if tp is _REF or isinstance(v, _TENSOR):
            got = size(v)
            if got is not None:
                out.append(got)
        elif tp is list or tp is tuple or tp is dict:
            _operands(v, size, out)
