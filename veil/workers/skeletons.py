"""Skeleton commands: a small synchronous command in short form (issue #19, the small round trip).

A training or inference script repeats the same few ops on the same shapes. The client defines each
such command once per connection (:class:`~veil.messaging.messages.SkeletonCommand` with ``define``:
op, arguments with ``ObjectRef(slot)`` placeholders for its pointers, kwargs, grad mode) and from then
on sends only "skeleton k, these ids, these result ids". The server keeps the validated definition in
the session (one table per connection, gone with it) and expands every use back into the
CommandMessage fields, which then run exactly as a CommandMessage would: ``check_request`` by role,
the allowlist, the reference monitor resolving and checking every id, the write guard, audit. What a
skeleton saves is parsing and dispatch, never a check.

Only plain torch ops (no worker functions), flat arguments (pointers at the top level, scalars,
slices, dtypes), and a bounded number of small definitions per session.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.exceptions import SerializationError
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.workers.monitor import PROTOCOL_PREFIXES

#: definitions one connection may hold (the client stops defining new ones at this count)
MAX_SKELETONS = 1024
#: arguments plus keyword arguments of one definition, and the longest string among them
MAX_SKELETON_ARGS = 16
MAX_SKELETON_STR = 128

_OPS_BY_NAME = ALLOWLIST._by_name
_REF = m.ObjectRef
_CONSTANT_TYPES = (int, float, bool, type(None), str, slice, torch.dtype)


class Skeleton:
    """A validated definition: the op's name, its argument list with the pointer positions, kwargs, grad."""

    __slots__ = ("op", "args", "positions", "slots", "n_slots", "kwargs", "grad", "prepared")

    def __init__(self, op: str, args: list, positions: tuple, slots: tuple, n_slots: int, kwargs: dict,
                 grad: bool) -> None:
        self.op, self.args, self.positions, self.slots = op, args, positions, slots
        self.n_slots, self.kwargs, self.grad = n_slots, kwargs, grad
        #: what every use shares, decided at the first use (:func:`prepare`; False: uses take the generic path)
        self.prepared: Any = None


def _constant(value: Any) -> bool:
    if type(value) is str:
        return len(value) <= MAX_SKELETON_STR
    if type(value) is slice:
        return all(type(v) in (int, bool, type(None)) for v in (value.start, value.stop, value.step))
    return type(value) in _CONSTANT_TYPES


def parse(define: Any) -> Skeleton:
    """A definition's fields, checked (SerializationError: malformed; the allowlist's refusal: unknown op)."""
    if type(define) is not list or len(define) != 4:
        raise SerializationError("a skeleton definition is [op, args, kwargs, grad_enabled]")
    name, args, kwargs, grad = define
    if type(name) is not str or type(args) is not list or type(kwargs) is not dict or type(grad) is not bool:
        raise SerializationError("a skeleton definition is [op name, argument list, keyword map, bool]")
    op = _OPS_BY_NAME.get(name)
    if op is None:
        op = ALLOWLIST.by_name(name)  # raises the refusal
    if op.worker_function:
        raise SerializationError(f"skeletons carry plain torch ops only, not {name!r}")
    if len(args) + len(kwargs) > MAX_SKELETON_ARGS:
        raise SerializationError(f"a skeleton takes at most {MAX_SKELETON_ARGS} arguments")
    positions, slots = [], []
    for at, value in enumerate(args):
        if type(value) is _REF:
            positions.append(at)
            slots.append(value.id)
        elif not _constant(value):
            raise SerializationError("skeleton arguments are pointer slots, numbers, short strings, slices or dtypes")
    for key, value in kwargs.items():
        # the key too is kept for the connection's life: a long one would be unbounded memory (red team)
        if type(key) is not str or len(key) > MAX_SKELETON_STR or not _constant(value):
            raise SerializationError("skeleton keyword arguments are named numbers, short strings or dtypes")
    n_slots = len(set(slots))
    if sorted(set(slots)) != list(range(n_slots)):
        raise SerializationError("skeleton slots must be numbered 0..n-1")
    return Skeleton(name, args, tuple(positions), tuple(slots), n_slots, kwargs, grad)


def expand(table: dict, msg: m.SkeletonCommand) -> tuple:
    """The CommandMessage fields ``(op, args, kwargs, return_ids, grad)`` of a skeleton command of the
    connection whose definitions are ``table`` (a definition in ``msg`` is checked and kept first)."""
    return expand_use(table, msg.skeleton, msg.ids, msg.return_ids, msg.define)


def expand_use(table: dict, k: Any, ids: Any, return_ids: Any, define: Any = None) -> tuple:
    """:func:`expand` of a use's fields (a deferred use in a batch is ``[k, ids, return_ids(, define)]``)."""
    if type(k) is not int or not 0 <= k < MAX_SKELETONS:
        raise SerializationError(f"skeleton number must be an integer in [0, {MAX_SKELETONS})")
    if define is not None:
        if k in table:
            raise SerializationError(f"skeleton {k} is already defined on this connection")
        table[k] = parse(define)
    skeleton = table.get(k)
    if skeleton is None:
        raise SerializationError(f"skeleton {k} is not defined on this connection")
    if type(ids) is not list or len(ids) != skeleton.n_slots:
        raise SerializationError(f"skeleton {k} ({skeleton.op}) takes {skeleton.n_slots} object ids")
    for oid in ids:
        if type(oid) is not int:
            raise SerializationError("skeleton object ids must be integers")
    if type(return_ids) is not list:
        raise SerializationError("skeleton result ids must be a list")
    args = list(skeleton.args)
    for at, slot in zip(skeleton.positions, skeleton.slots):
        args[at] = _REF(ids[slot])
    return skeleton.op, args, skeleton.kwargs, return_ids, skeleton.grad


def expand_item(table: dict, item: list) -> tuple:
    """:func:`expand_use` of a deferred use ``[k, ids, return_ids(, define)]`` (a batch's hot path: the
    same checks, those on ids made while filling the slots, which parse numbered 0..n-1, all used)."""
    skeleton = table.get(item[0]) if len(item) == 3 else None
    ids, return_ids = item[1], item[2]
    if skeleton is None or type(ids) is not list or len(ids) != skeleton.n_slots or type(return_ids) is not list:
        return expand_use(table, *item)  # a definition, or the refusal with its reason
    args = list(skeleton.args)
    for at, slot in zip(skeleton.positions, skeleton.slots):
        oid = ids[slot]
        if type(oid) is not int:
            raise SerializationError("skeleton object ids must be integers")
        args[at] = _REF(oid)
    return skeleton.op, args, skeleton.kwargs, return_ids, skeleton.grad


def prepare(skeleton: Skeleton) -> Any:
    """What every use of ``skeleton`` shares, decided once: ``(op, order)``, its allowlisted op and the order
    in which its ids first appear among the arguments (None: the ids' own order), which is the order the
    monitor resolves them in for a CommandMessage; False: uses take the generic path (protocol steps read
    the command as sent, and skeletons never carry one). Kept in ``skeleton.prepared``."""
    op = _OPS_BY_NAME.get(skeleton.op)
    ok = op is not None and not op.worker_function and not skeleton.op.startswith(PROTOCOL_PREFIXES)
    order = tuple(dict.fromkeys(skeleton.slots))
    skeleton.prepared = (op, None if order == tuple(range(len(order))) else order) if ok else False
    return skeleton.prepared


def prepared_use(table: dict, item: list) -> Skeleton | None:
    """The prepared skeleton a well-formed deferred use ``[k, ids, return_ids]`` names, its ids all
    integers (``handlers.run_use`` runs it); None for anything else (a definition, an unknown number,
    the wrong arity, a malformed field: :func:`expand_item` keeps or refuses it with its reason)."""
    if len(item) != 3:
        return None
    skeleton = table.get(item[0])
    ids = item[1]
    if skeleton is None or type(ids) is not list or len(ids) != skeleton.n_slots or type(item[2]) is not list:
        return None
    prepared = skeleton.prepared
    if prepared is None:
        prepared = prepare(skeleton)
    if not prepared:
        return None
    for oid in ids:
        if type(oid) is not int:
            return None
    return skeleton


def definable(args: Any, kwargs: dict) -> bool:
    """Whether :func:`parse` accepts a definition with these arguments (pointers aside): the client
    defines nothing a worker would refuse (that command then travels as a CommandMessage)."""
    if len(args) + len(kwargs) > MAX_SKELETON_ARGS:
        return False
    for value in args:
        if type(value) is not _REF and not _constant(value) and not isinstance(value, torch.Tensor):
            return False
    for key, value in kwargs.items():
        if len(key) > MAX_SKELETON_STR or not _constant(value):
            return False
    return True


class ClientSkeletons:
    """The client's side of one connection's table: command signature -> skeleton number.

    A signature is an object standing for one command shape (the client's shape-inference Template:
    one per op, grad mode, argument values and shapes), keyed by identity: no tuple hashing per op.
    The table holds the signature itself, so its id is never reused while the number is kept.

    Synchronous definitions take numbers from 0 up (under the destination's send lock), deferred ones
    (:meth:`defer`, under the outbox's queue lock) from ``MAX_SKELETONS - 1`` down, so the two never
    take the same number; the table is full when they meet. Numbers are never reused."""

    __slots__ = ("conn", "numbers", "next", "last", "names")

    def __init__(self, conn: Any) -> None:
        self.conn, self.numbers, self.next, self.last = conn, {}, 0, MAX_SKELETONS
        self.names: dict[int, str] = {}  # deferred definitions' ops, for the text of a lost result

    def number(self, signature: Any) -> tuple[int | None, bool]:
        """``(k, defined)``: the signature's number, or the next free one (``defined`` False: the caller
        sends the definition and calls :meth:`keep` once the worker took it), or None when the table is full."""
        found = self.numbers.get(id(signature))
        if found is not None and found[0] is signature:
            return found[1], True
        if self.next >= self.last:
            return None, False
        return self.next, False

    def keep(self, signature: Any, k: int) -> None:
        self.numbers[id(signature)] = (signature, k)

    def taken(self) -> None:
        """The next number went out with a definition (kept or not by the worker: never reused)."""
        self.next += 1

    def defer(self, signature: Any, define: Any) -> tuple[int | None, Any]:
        """A deferred use's ``(k, definition)`` (definition None: the worker has it, or it rides earlier in
        the queue); ``(None, None)`` when the table is full or ``define()`` declines. A deferred definition
        is kept at once (the queue carries it in front of every later use) and dropped by :meth:`forget`
        if its batch fails before it ran."""
        found = self.numbers.get(id(signature))
        if found is not None and found[0] is signature:
            return found[1], None
        if self.next >= self.last:
            return None, None
        definition = define()
        if definition is None:
            return None, None
        self.last -= 1
        k = self.last
        self.numbers[id(signature)] = (signature, k)
        self.names[k] = definition[0]
        return k, definition

    def forget(self, k: int) -> None:
        """Number ``k``'s definition did not run on the worker: its signature is defined afresh next time."""
        for key, (_, number) in list(self.numbers.items()):
            if number == k:
                del self.numbers[key]
