"""A peer opening's outputs computed straight into the share slot its one reader will be answered with.

Placed at the fetch (``SlotPool.place``), a ``mul 1e6`` round's 16 MB of shares were copied into the slot on
the event loop while the peer waited (~2 ms each way, bench/RESULTS.md "Forty-first landing"). Here the
handler reserves a slot of the reader's connection before the step runs, the step writes its outputs there
(``veil.mpc.output_buffers``), and the fetch is answered with that slot. The peer maps its slots for good, so
it can read a slot's bytes the moment they are written, not only when its fetch is answered; hence a slot
is reserved only when everything that decides the release is settled before the step runs:

- the monitor allowed the step, consumed its masks, and its allowed row is on record (the wait, handing the
  turn over, happens before the step instead of after it; an argument written in place meanwhile, by another
  connection of the session, refuses the opening: the step would open what the monitor did not check);
- the outputs will be exactly the masks' layouts (shape and int64 dtype, worked out from the operands, or
  from the step run on meta tensors), so the check ``open_step`` makes afterwards cannot refuse them;
- it opens no value derived from owner data (the owner's review and dp-only marks are checked again once the
  step ran: an approval used up, a policy tightened meanwhile);
- the step is one that writes into the buffers (:data:`INTO_SLOT_STEPS`), and the round has one reader whose
  connection has slots (two parties on one host; a top-bits round's other parties, whose shares go to the
  first party only).

Otherwise the outputs are computed as before and copied at the fetch. A slot so filled is the reader's to
read as before: what lands there is what its fetch would have been sent.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.exceptions import PermissionDeniedError
from veil.messaging import messages as m
from veil.mpc.party import PARTY_FUNCTIONS
from veil.shapes import broadcast_shape
from veil.workers.leaving_rows import on_record_before_leaving

#: opening steps that write their outputs into the runner's buffers (``output_buffers.output_buffer``)
INTO_SLOT_STEPS = frozenset({"beaver_mask", "trunc_mask"})


def into_peer_slot(worker: Any, msg: Any, others: frozenset, name: str, args: tuple, kwargs: dict) -> tuple | None:
    """(pool, reservation) of the slot this round's outputs are to be computed in, or None (compute as before).
    Called in the opening's ``run``: the monitor allowed the step and its masks are consumed."""
    if name not in INTO_SLOT_STEPS:
        return None
    readers = frozenset({msg.parties[0]}) if msg.reveal == "top_bits" else others
    if msg.reveal == "top_bits" and worker.id == msg.parties[0]:
        return None  # (the first party publishes packed bits, a few bytes per entry)
    pools = getattr(worker, "peer_slot_pools", None)
    pool = pools.get(next(iter(readers))) if pools and len(readers) == 1 else None
    layout = worker.monitor.opening_layout() if pool is not None else None
    if layout is None or layout[1]:
        return None
    outputs = _output_layout(name, args, kwargs)
    wanted = layout[0]
    if outputs is None or any(dtype != torch.int64 for _, dtype in outputs) \
            or (wanted is not None and (len(outputs) > len(wanted) or outputs != wanted[:len(outputs)])):
        return None
    # nothing the peer may read is written before the allowed row is on record; the wait hands the turn over, so
    # the arguments the monitor checked must be as they were when the step runs (red team: another connection
    # of the session writing owner-derived data into a checked share in place meanwhile)
    versions = _versions(args, kwargs)
    on_record_before_leaving(worker)
    if _versions(args, kwargs) != versions:
        raise PermissionDeniedError(f"{name}: an argument of the opening was written while its audit row was "
                                    "recorded; nothing was opened")
    found = pool.reserve(outputs)
    return None if found is None else (pool, found)


def _versions(args: tuple, kwargs: dict) -> list:
    """Each tensor argument's version counter (any in-place write, through any view, moves it)."""
    return [(id(t), t._version) for t in m.arg_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]


#: the slot steps' outputs, each an operand minus or plus its mask elementwise (beaver._mask, truncation._trunc_mask):
#: (pairs of argument positions, fewest and most arguments; those past the pairs' are ints: trunc's shift). Their
#: layouts follow from the operands' without running the step on meta tensors (~0.2 ms a round on each party)
_ELEMENTWISE_OUTPUTS = {"beaver_mask": (((0, 2), (1, 3)), 4, 4), "trunc_mask": (((0, 1),), 2, 3)}


def _output_layout(name: str, args: tuple, kwargs: dict) -> list | None:
    """The step's outputs' (shape, dtype), from its arguments' (broadcast shape, promoted dtype) or as meta
    tensors (no arithmetic); None if it fails."""
    pairs, fewest, most = _ELEMENTWISE_OUTPUTS[name]
    operands = [(args[i], args[j]) for i, j in pairs] if fewest <= len(args) <= most and not kwargs else []
    if operands and all(isinstance(x, torch.Tensor) and isinstance(k, torch.Tensor) for x, k in operands) \
            and all(type(a) is int for a in args[fewest:]):
        try:
            return [(tuple(broadcast_shape(x.shape, k.shape)),
                     torch.promote_types(x.dtype, k.dtype)) for x, k in operands]
        except RuntimeError:  # (shapes that do not broadcast: the step itself raises when it runs)
            return None
    return _meta_layout(name, args, kwargs)


def _meta_layout(name: str, args: tuple, kwargs: dict) -> list | None:
    """The step's outputs' (shape, dtype), running it on its arguments as meta tensors; None if it fails."""
    meta = tuple(torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, torch.Tensor) else a
                 for a in args)
    try:
        out = PARTY_FUNCTIONS[name](*meta, **kwargs)
    except Exception:  # noqa: BLE001  (the step itself raises the error when it runs)
        return None
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(t, torch.Tensor) for t in outputs):
        return None
    return [(tuple(t.shape), t.dtype) for t in outputs]
