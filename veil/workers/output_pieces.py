"""Counts, before a request runs, the tensors it would make one per piece or per list entry.

Every result tensor costs the worker ~600 bytes of host memory and ~1.5 us, whatever it holds, and the quota sizes
bytes, which an empty or tiny tensor has next to none of. Where the number of results follows a dimension's length
or a number in the request (torch's split, chunk and unbind: :data:`PIECE_OPS`), or the length of a list argument
(protocol steps that return a tensor per entry: :data:`STEP_PIECES`), one small request made millions of them. They
are counted here from shapes and public arguments alone (:func:`check_pieces`): never more than the command's return
ids (a plan op's result slots, a peer opening's ids), :data:`MAX_PIECES` when the worker names them (an opening's
reply), and under a quota each charged what the store charges a tensor (:func:`check_piece_room`). Red team:
test_redteam_session66_pieces.py, test_redteam_session67_step_outputs.py.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

#: torch ops that return one tensor per piece (op name -> kind): how many follows a dimension's length or an
#: argument, not the bytes of the input. ``unbind`` of a (10^9, 0) tensor holds no byte and makes 10^9 tensors
#: (a worker killed by one small request, whatever its quota), as do ``chunk(10^9)`` of an empty dimension and
#: ``split(1)`` of a long empty one
PIECE_OPS = {"torch.split": "split", "Tensor.split": "split", "aten.split.Tensor": "split",
             "aten.split_with_sizes.default": "split", "torch.chunk": "chunk", "Tensor.chunk": "chunk",
             "torch.unbind": "unbind", "Tensor.unbind": "unbind", "aten.unbind.int": "unbind"}
#: pieces a command may make whose results the worker names (return ids None: described in the reply)
MAX_PIECES = 1 << 16
#: how a protocol step's wire name starts (``veil.mpc.party.WIRE_PREFIX``; an opening names the step alone)
STEP_PREFIX = "veil.mpc."


def _listed(args: tuple, kwargs: dict, at: int, key: str) -> int:
    value = args[at] if len(args) > at else kwargs.get(key)
    return len(value) if type(value) in (list, tuple) else 0


#: protocol steps that return a tensor per entry of a list argument -> at most how many for ``(args, kwargs)``
#: (lists of unequal lengths the step refuses itself, before it makes anything). A list naming one tiny share N
#: times costs ~10 bytes an entry on the wire and made N tensors, ~60x the message, as an opening's reply or a
#: command's results (counted only once made)
STEP_PIECES: dict[str, Callable[[tuple, dict], int]] = {
    "beaver_masks": lambda a, k: 2 * _listed(a, k, 0, "xs"),  # e then f per product
    "mac_beaver_masks": lambda a, k: 6 * _listed(a, k, 0, "xs"),  # e and f per product, three int64 pieces each
    "fss_mask": lambda a, k: _listed(a, k, 0, "values"),
    "cmp_mask_values": lambda a, k: _listed(a, k, 0, "values"),
    "cmp_quad_open_values": lambda a, k: 1 + _listed(a, k, 2, "values"),  # the quad word, then the values
    "cmp_select": lambda a, k: 1 + _listed(a, k, 2, "masks"),  # the bit, then a product per mask
    # (red team, session 67: an opening of fixed_mask over lists naming one empty share 72,000 times replied
    # 72,000 tensors; sgd_apply made one per listed parameter before the store refused them)
    "fixed_mask": lambda a, k: max(_listed(a, k, 0, "x_i"), 1),  # a piece's e per entry (a tensor: one)
    "sgd_apply": lambda a, k: _listed(a, k, 0, "params"),  # a new share per parameter
}


def counted(name: str) -> bool:
    """Whether ``name`` (a torch op, a protocol step's wire name or an opening's step) makes a counted number of
    tensors."""
    return name in PIECE_OPS or (name[len(STEP_PREFIX):] if name.startswith(STEP_PREFIX) else name) in STEP_PIECES


def pieces(name: str, args: Any, kwargs: dict) -> int | None:
    """At most how many tensors the :data:`PIECE_OPS` op ``name`` returns for these arguments, from shapes and
    the public arguments alone (never a value: a tensor given as a size counts as the longest dimension); None
    for any other op."""
    kind = PIECE_OPS.get(name)
    if kind is None:
        return None
    args = tuple(args) if type(args) in (list, tuple) else ()
    kwargs = kwargs if type(kwargs) is dict else {}
    t = args[0] if args else next((kwargs[k] for k in ("input", "self", "tensor") if k in kwargs), None)
    if not isinstance(t, torch.Tensor):
        return 1  # (torch refuses it)
    given = None
    if kind != "unbind":
        given = args[1] if len(args) > 1 else next(
            (kwargs[k] for k in ("split_size_or_sections", "split_size", "split_sizes", "chunks") if k in kwargs),
            None)
    at = 1 if kind == "unbind" else 2
    dim = args[at] if len(args) > at else kwargs.get("dim", 0)
    shape = tuple(t.shape)
    if type(dim) is int and -len(shape) <= dim < len(shape):
        length = shape[dim]
    else:  # (a dimension torch refuses, or a name): the longest one bounds it
        length = max(shape, default=1)
    if type(given) in (list, tuple):
        return len(given)
    if type(given) is int:
        if kind == "chunk":
            return max(given, 1)  # (chunk of an empty dimension returns `chunks` empty tensors)
        return -(-length // given) if given > 0 and length else 1
    return max(length, 1)


def step_pieces(name: str, args: Any, kwargs: Any) -> int | None:
    """At most how many tensors the :data:`STEP_PIECES` step ``name`` (wire name or step) returns for these
    arguments, from its lists' lengths; None for any other name."""
    count = STEP_PIECES.get(name[len(STEP_PREFIX):] if name.startswith(STEP_PREFIX) else name)
    if count is None:
        return None
    return count(tuple(args) if type(args) in (list, tuple) else (), kwargs if type(kwargs) is dict else {})


def check_pieces(name: str, args: Any, kwargs: dict, ids: Any) -> int:
    """Refuses, before it runs, a :data:`PIECE_OPS` op or :data:`STEP_PIECES` step that would return more tensors
    than the command names return ids for (:data:`MAX_PIECES` when the worker names them, ``ids`` None); how many it
    may return (0 for any other op)."""
    count = pieces(name, args, kwargs)
    if count is None:
        count = step_pieces(name, args, kwargs)
    if count is None:
        return 0
    most = MAX_PIECES if ids is None else max(len(ids), 1) if type(ids) is list else 1
    if count > most:
        from veil.exceptions import RemoteExecutionError

        named = "a request may have the worker name" if ids is None else "its command names (one return id each)"
        raise RemoteExecutionError(f"{name} would return {count} tensors, more than the {most} {named}: refused "
                                   "before it runs")
    return count


def check_piece_room(monitor: Any, principal: Any, name: str, count: int, transient: bool = False) -> None:
    """Under a quota, charges ``count`` result tensors what the store charges each before they are made: in the
    session's room, or with ``transient`` (an opening's reply) in the quota itself."""
    if count and monitor.max_session_bytes is not None and principal.isolated:
        from veil.workers.quota import MIN_TENSOR_BYTES

        (monitor.check_transient if transient else monitor.check_room)(principal, count * MIN_TENSOR_BYTES, name)
