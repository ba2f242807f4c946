"""A plan's content: a list of allowlisted ops over numbered slots.

Slots ``0 .. n_inputs-1`` hold the call's arguments, the next ``n_state`` hold
the plan's state (model parameters and buffers), and every op writes its tensor
results to further slots. Arguments refer to slots with :class:`SlotRef`.
This is data, never code: a worker validates every op name against its
allowlist when the plan arrives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from veil.exceptions import SerializationError
from veil.messaging import serde


@dataclass(frozen=True)
class SlotRef:
    slot: int


@dataclass(frozen=True)
class BatchSize:
    """An op argument that is ``scale`` times the rows of the plan's first input (``x.view(x.shape[0], -1)``,
    ``torch.zeros(x.size(0), 8)``), filled in when the plan runs: the plan follows the batch it is given
    (the last, shorter batch of a ``fit`` included) instead of the one it was traced on (veil/plans/batch.py)."""

    scale: int


MAX_BATCH_SCALE = 1 << 20


@dataclass
class PlanOp:
    op: str  # allowlist name
    args: tuple
    kwargs: dict
    out_slots: list  # one per tensor leaf of the result; -1: not kept
    grad_enabled: bool


@dataclass
class PlanSpec:
    """Everything a worker needs to run a plan."""

    name: str
    n_inputs: int
    n_state: int
    n_slots: int
    ops: list = field(default_factory=list)
    outputs: Any = None  # structure of SlotRefs (None: no result)


SLOT_EXT = 21
PLAN_EXT = 20
BATCH_EXT = 22


def _encode_plan(p: PlanSpec) -> bytes:
    ops = [[o.op, list(o.args), o.kwargs, o.out_slots, o.grad_enabled] for o in p.ops]
    return serde.encode_value([p.name, p.n_inputs, p.n_state, p.n_slots, ops, p.outputs])


def _decode_plan(data: bytes, ctx: serde.DecodeContext) -> PlanSpec:
    value = serde.decode_value(data, ctx)
    if not isinstance(value, list) or len(value) != 6:
        raise SerializationError("malformed plan")
    name, n_inputs, n_state, n_slots, ops, outputs = value
    for v in (n_inputs, n_state, n_slots):
        if type(v) is not int or not 0 <= v <= 1_000_000:
            raise SerializationError("plan slot counts must be small non-negative integers")
    if not isinstance(name, str) or not isinstance(ops, list):
        raise SerializationError("malformed plan header")
    parsed = []
    for o in ops:
        if not (isinstance(o, list) and len(o) == 5 and isinstance(o[0], str) and isinstance(o[1], list)
                and isinstance(o[2], dict) and isinstance(o[3], list) and isinstance(o[4], bool)):
            raise SerializationError("malformed plan op")
        if not all(type(s) is int and -1 <= s < n_slots for s in o[3]):
            raise SerializationError(f"plan op {o[0]!r} writes outside the plan's slots")
        parsed.append(PlanOp(o[0], tuple(o[1]), o[2], o[3], o[4]))
    return PlanSpec(name, n_inputs, n_state, n_slots, parsed, outputs)


def _decode_slot(data: bytes, ctx: serde.DecodeContext) -> SlotRef:
    value = msgpack.unpackb(data)
    if type(value) is not int or value < 0:
        raise SerializationError("slot reference must be a non-negative integer")
    return SlotRef(value)


def _decode_batch(data: bytes, ctx: serde.DecodeContext) -> BatchSize:
    value = msgpack.unpackb(data)
    if type(value) is not int or not 1 <= value <= MAX_BATCH_SCALE:
        raise SerializationError(f"a plan's batch-size argument must be a multiple from 1 to {MAX_BATCH_SCALE}")
    return BatchSize(value)


serde.register_ext(SLOT_EXT, (SlotRef,), lambda s: msgpack.packb(s.slot), _decode_slot)
serde.register_ext(PLAN_EXT, (PlanSpec,), _encode_plan, _decode_plan)
serde.register_ext(BATCH_EXT, (BatchSize,), lambda b: msgpack.packb(b.scale), _decode_batch)
