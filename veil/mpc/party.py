"""Party functions: one protocol step run by each party on its own shares.

A protocol (Beaver, truncation, comparison) is written as a few *party
functions* (pure torch code on one party's shares and public values) and two
ways of running them:

* :func:`run_party` computes a step whose result stays with the party (a new
  share). For a remote share it is **one command message** to that party; the
  result's shape is found locally by running the function on meta tensors.
* :func:`open_parties` runs an *openable* step on every party and sums the
  results: an opening. For remote shares it is **one message per party** (an
  :class:`OpenMessage`, whose reply carries the step's output), all in one
  round. Only functions registered with ``openable=True`` may be opened, and
  each of them outputs values masked by dealer randomness (``x - a``).

Local shares (plain tensors) run the same functions in-process, so the
protocol code is identical for simulations and for workers.

Trust model (semi-honest, as PySyft 0.2 and CrypTen): the orchestrator relays
openings of masked values; it never receives an unmasked share through this
module (it can still ``.get()`` pointers it owns, like any PySyft user).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Hashable, Mapping

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import register_worker_function
from veil.mpc import wire_ops  # noqa: F401  (allowlists aten ops on shares)
from veil.mpc.errors import MPCError
from veil.mpc.opening import record_opening
from veil.tensors.pointer import PointerTensor
from veil.workers.base import register_handler

#: name -> pure party function (explicit registry; see ``party_function``)
PARTY_FUNCTIONS: dict[str, Callable[..., Any]] = {}
#: names whose outputs may be returned to the orchestrator (masked values only)
OPENABLE: set[str] = set()
#: openable names whose outputs are XOR shares (combined by ``^``, not ``+``)
XOR_OPENABLE: set[str] = set()

WIRE_PREFIX = "veil.mpc."


def party_function(name: str, openable: bool = False, xor: bool = False) -> Callable[[Callable], Callable]:
    """Registers a party function and allowlists it as a worker function.

    ``xor``: an openable step whose outputs are XOR (boolean) shares.
    """

    def register(fn: Callable) -> Callable:
        if name in PARTY_FUNCTIONS:
            raise ValueError(f"party function {name!r} is already registered")
        PARTY_FUNCTIONS[name] = fn
        if openable:
            OPENABLE.add(name)
            if xor:
                XOR_OPENABLE.add(name)
        register_worker_function(WIRE_PREFIX + name, lambda worker, *a, **k: fn(*a, **k))
        return fn

    return register


@m.register_message
@dataclass
class OpenMessage:
    """Run an openable party function and return its outputs (one opening share)."""

    TYPE: ClassVar[int] = 40
    name: str = ""
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if type(self.args) is list:
            self.args = tuple(self.args)


@register_handler(OpenMessage)
def _handle_open(worker: Any, msg: OpenMessage, sender: str) -> Any:
    if not isinstance(msg.name, str) or msg.name not in OPENABLE:
        raise MPCError(f"{msg.name!r} is not an openable protocol step")
    if not isinstance(msg.kwargs, dict) or not all(isinstance(k, str) for k in msg.kwargs):
        raise MPCError("OpenMessage kwargs must be a map with string keys")
    args, kwargs = worker.monitor.opening(worker.principal(sender), msg.name, tuple(msg.args), msg.kwargs)
    with torch.no_grad():
        out = PARTY_FUNCTIONS[msg.name](*args, **kwargs)
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        raise MPCError(f"{msg.name} must return tensors")
    return m.ObjectsReply(outputs)


def _location(values: Any) -> PointerTensor | None:
    """The one pointer location among ``values`` (None if all local)."""
    first = None
    for leaf in tree_flatten(values)[0]:
        if type(leaf) is PointerTensor:
            if first is None:
                first = leaf
            elif leaf.location is not first.location:
                raise MPCError(
                    f"a party step mixes shares on {first.location.id!r} and {leaf.location.id!r}"
                )
    return first


def _wire(value: Any) -> Any:
    return tree_map(lambda v: m.ObjectRef(v.id_at_location) if type(v) is PointerTensor else v, value)


def _meta(value: Any) -> Any:
    def to_meta(v):
        if isinstance(v, torch.Tensor):
            return torch.empty(tuple(v.shape), dtype=v.dtype, device="meta")
        return v

    return tree_map(to_meta, value)


def run_party(name: str, *args: Any, _defer: bool = False, **kwargs: Any) -> Any:
    """Runs party function ``name`` where its share arguments live.

    ``_defer``: for a step that the same protocol follows with a message to
    the same party (an opening): the command rides on that message instead of
    taking its own (an error then surfaces there, as "deferred command ...
    failed"). Not for a protocol's last step, whose next message may never come.

    Returns:
        The function's output: local tensors, or pointers to the results on
        the party's worker (same tree structure).
    """
    fn = PARTY_FUNCTIONS[name]
    first = _location((args, kwargs))
    if first is None:
        return fn(*args, **kwargs)
    defer = _defer
    meta_out = fn(*_meta(args), **_meta(kwargs))
    flat, spec = tree_flatten(meta_out)
    ids = [new_id() for _ in flat]
    owner, location = first.owner, first.location
    msg = m.CommandMessage(WIRE_PREFIX + name, _wire(args), _wire(kwargs), ids, False)
    if defer:
        owner.defer_command(location, msg)
    else:
        owner.send_msg(msg, location)
    ptrs = [PointerTensor(location, oid, owner, t.shape, t.dtype) for oid, t in zip(ids, flat)]
    return tree_unflatten(ptrs, spec)


def open_parties(name: str, per_party: Mapping[Hashable, tuple], **kwargs: Any) -> list[torch.Tensor]:
    """Runs an openable step on every party and sums the outputs (one round).

    Args:
        name: An openable party function returning a tuple of tensors.
        per_party: party -> positional arguments for that party.
        **kwargs: Public keyword arguments, identical for every party.

    Returns:
        The opened values (sums over parties in Z/2^64), in output order.
    """
    if name not in OPENABLE:
        raise MPCError(f"{name!r} is not an openable protocol step")
    fn = PARTY_FUNCTIONS[name]
    totals: list[torch.Tensor] | None = None
    for args in per_party.values():
        first = _location(args)
        if first is None:
            out = fn(*args, **kwargs)
            outputs = list(out) if isinstance(out, (tuple, list)) else [out]
        else:
            reply = first.owner.send_msg(OpenMessage(name, _wire(tuple(args)), kwargs), first.location)
            outputs = list(reply.objects)
        if totals is None:
            totals = outputs
        elif name in XOR_OPENABLE:
            totals = [t ^ o for t, o in zip(totals, outputs)]
        else:
            totals = [t + o for t, o in zip(totals, outputs)]
    n = len(per_party)
    per_party_bytes = 8 * (n - 1) * sum(t.numel() for t in totals)  # each party's share of every opened entry
    record_opening(sum(n * (n - 1) * t.numel() for t in totals), {p: per_party_bytes for p in per_party})
    return totals
