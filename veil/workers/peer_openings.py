"""Peer openings: the parties of an SMPC opening send their masked shares to each other.

In the star opening (:class:`veil.mpc.party.OpenMessage`) every party returns its share of the
opened values to the orchestrator, which sums them. In a *peer opening* the orchestrator sends each
party a :class:`PeerOpenMessage` naming the step, the parties (worker ids, as the parties know each
other: ``veil worker --peer``), a round id it drew at random, and the ids the opened values are
stored under. Each party then

1. runs the step under the reference monitor's opening rules (``monitor.open_step``: only openable
   steps, the session's compute rights, fresh dealer masks consumed once where a value is protected
   for someone else), exactly as for a star opening;
2. sends its outputs, as the peer command :data:`PEER_SHARE`, only to the other parties the message
   names, over its authenticated peer connections (``--peer``; never to a worker it has no peer link to),
   to all of them at once (one thread per further peer);
3. waits, with the worker lock handed back (:func:`veil.workers.cancellation.outside_turn`), for the
   other parties' shares of the same round, sums them with its own (XORs the outputs that are XOR
   shares: ``XOR_OPENABLE`` steps, the leading ``XOR_LEADING`` outputs) and stores the opened values in
   the requesting session's namespace under the given ids (plain client objects: the values the star
   would have sent it as public arguments). The reply carries no tensor.

**Top bits only** (``reveal="top_bits"``, the steps in :data:`TOP_BITS_STEPS`: truncation's
``trunc_mask``): only the first named party needs the opened value itself; the others need only its
top bits (:mod:`veil.mpc.truncation`). Then the other parties send their shares to the first party
only, which sums them, keeps the opened value and sends each of them the value's top bits packed 8
to a byte (:func:`veil.mpc.truncation.pack_top_bits`), which they store instead: 1/64 of the bytes
back, and a party other than the first learns exactly what the star opening would show it.

The receiving side (:class:`PeerRounds`, one per worker) keeps at most one contribution per named
sender per round; a contribution is accepted only from a peer session (``--accept-peer``) whose name
the round lists, for a round id this worker's session registered with the same step, with exactly the
count, shapes and dtypes of this party's own outputs. A round is consumed once: when it ends (opened,
failed, abandoned, its session gone) its id is remembered as closed and later shares for it are
refused. Contributions that arrive before their round is registered wait (outside the worker lock,
bounded in number and time) instead of being buffered, so a flood of them holds no more memory than
the requests the server already has in flight.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from veil.exceptions import PermissionDeniedError, RemoteExecutionError
from veil.messaging import messages as m
from veil.messaging.allowlist import register_worker_function
from veil.mpc.party import XOR_LEADING, XOR_OPENABLE, check_openable, run_openable
from veil.mpc.truncation import pack_top_bits
from veil.workers import cancellation
from veil.workers.base import register_handler
from veil.workers.store import Kind
from veil.workers.websocket_auth import SESSION_END_HANDLERS, register_peer_command

PEER_SHARE = "veil.mpc.peer_share"
#: most parties of one peer opening
MAX_PARTIES = 16
#: how long a party waits for the other parties' shares, and a share for its round's registration
#: (the environment variable is for tests and very slow machines)
WAIT_SECONDS = float(os.environ.get("VEIL_PEER_WAIT_SECONDS", "60"))
#: rounds open at once on one worker, and shares waiting for their round's registration (in all, and
#: per peer: an honest peer's connection has one request in flight at a time)
MAX_OPEN_ROUNDS = 64
MAX_WAITING_SHARES = 32
MAX_WAITING_PER_PEER = 4
#: ended round ids remembered (late shares for them are refused at once, not left waiting)
CLOSED_MEMORY = 4096
#: openable steps of one output a peer opening may reveal to its first party only (the others get the
#: packed top bits of the opened value): truncation, whose other parties need only c's top bits
TOP_BITS_STEPS = frozenset({"trunc_mask"})
REVEALS = ("", "top_bits")


@m.register_message
@dataclass
class PeerOpenMessage:
    """Run an openable step, exchange its outputs with the other parties, store the sums here."""

    TYPE: ClassVar[int] = 41
    name: str = ""
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    round: str = ""
    parties: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    #: "" every party keeps the opened values; "top_bits" only the first party does, the others keep
    #: the packed top bits of the (one) opened value
    reveal: str = ""

    def __post_init__(self) -> None:
        if type(self.args) is list:
            self.args = tuple(self.args)


class PeerOpeningError(RemoteExecutionError):
    """A peer opening that cannot go on (a refused or missing share, a party that did not answer)."""


@dataclass
class _Round:
    namespace: str
    name: str
    senders: frozenset
    expected: list  # (shape, dtype) of this party's own outputs
    got: dict = field(default_factory=dict)  # sender -> its outputs


class PeerRounds:
    """The peer openings a worker's sessions are running, and the shares delivered for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open: dict[str, _Round] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._waiting: dict[str, int] = {}

    def open(self, namespace: str, round_id: str, name: str, senders: frozenset, expected: list) -> _Round:
        """Registers a round expecting one contribution from each of ``senders``: tensors of the
        ``(shape, dtype)`` pairs of ``expected``."""
        with self._cond:
            if round_id in self._open or round_id in self._closed:
                raise PeerOpeningError(f"peer opening round {round_id!r} is not fresh")
            if len(self._open) >= MAX_OPEN_ROUNDS:
                raise PeerOpeningError("too many peer openings in progress on this worker")
            rnd = _Round(namespace, name, senders, list(expected))
            self._open[round_id] = rnd
            self._cond.notify_all()
            return rnd

    def check_fresh(self, round_id: str) -> None:
        """Refuses a round id in use or ended, before the step consumes any dealt mask."""
        with self._cond:
            if round_id in self._open or round_id in self._closed:
                raise PeerOpeningError(f"peer opening round {round_id!r} is not fresh")

    def close(self, round_id: str, rnd: _Round | None = None) -> None:
        """Ends a round (opened, failed or abandoned): its id is never served again."""
        with self._cond:
            if rnd is not None and self._open.get(round_id) is rnd:
                del self._open[round_id]
            elif round_id in self._open:  # another session's round of that id: not ours to end
                return
            self._closed[round_id] = None
            while len(self._closed) > CLOSED_MEMORY:
                self._closed.popitem(last=False)
            self._cond.notify_all()

    def end_session(self, namespace: str) -> None:
        with self._cond:
            for round_id in [r for r, rnd in self._open.items() if rnd.namespace == namespace]:
                del self._open[round_id]
                self._closed[round_id] = None
            self._cond.notify_all()

    def deposit(self, round_id: str, sender: str, name: str, tensors: list) -> None:
        """A peer's share for ``round_id``; waits (bounded) for the round to be registered here."""
        deadline = time.monotonic() + WAIT_SECONDS
        with self._cond:
            rnd = self._open.get(round_id)
            if rnd is None and round_id not in self._closed:
                if sum(self._waiting.values()) >= MAX_WAITING_SHARES \
                        or self._waiting.get(sender, 0) >= MAX_WAITING_PER_PEER:
                    raise PeerOpeningError("too many peer shares waiting for their rounds on this worker")
                self._waiting[sender] = self._waiting.get(sender, 0) + 1
                try:
                    while rnd is None and round_id not in self._closed:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(min(left, 0.5))
                        rnd = self._open.get(round_id)
                finally:
                    self._waiting[sender] -= 1
                    if not self._waiting[sender]:
                        del self._waiting[sender]
            if rnd is None:
                raise PeerOpeningError(f"no peer opening round {round_id!r} here (ended, or never registered)")
            why = _share_error(rnd, sender, name, tensors)
            if why is not None:
                raise PeerOpeningError(f"peer share for round {round_id!r} refused: {why}")
            rnd.got[sender] = tensors
            self._cond.notify_all()

    def wait(self, round_id: str, rnd: _Round) -> list[list[torch.Tensor]]:
        """Every other party's share of the round, in sender order; raises past the wait or when cancelled."""
        deadline = time.monotonic() + WAIT_SECONDS
        with self._cond:
            while len(rnd.got) < len(rnd.senders):
                if self._open.get(round_id) is not rnd:
                    raise PeerOpeningError(f"peer opening round {round_id!r} was ended")
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(rnd.senders - set(rnd.got))
                    raise PeerOpeningError(f"peer opening round {round_id!r}: no share from {missing}")
                self._cond.wait(min(left, 0.5))
                cancellation.check()  # the orchestrator disconnected, or the command ran out of time
            return [rnd.got[s] for s in sorted(rnd.senders)]


def _share_error(rnd: _Round, sender: str, name: str, tensors: list) -> str | None:
    if sender not in rnd.senders:
        return f"{sender!r} is not a party of this round"
    if sender in rnd.got:
        return f"{sender!r} already sent its share"
    if name != rnd.name:
        return f"the round opens {rnd.name!r}, not {name!r}"
    if len(tensors) != len(rnd.expected):
        return f"{len(tensors)} values, expected {len(rnd.expected)}"
    for t, (shape, dtype) in zip(tensors, rnd.expected):
        if type(t) is not torch.Tensor or tuple(t.shape) != shape or t.dtype != dtype or t.layout != torch.strided:
            return f"values must be dense tensors of shapes and dtypes {rnd.expected}"
    return None


_MAKE_LOCK = threading.Lock()


def rounds_of(worker: Any) -> PeerRounds:
    rounds = getattr(worker, "_peer_rounds", None)
    if rounds is None:
        with _MAKE_LOCK:  # a share (outside the worker lock) and its round's request may both come first
            rounds = getattr(worker, "_peer_rounds", None)
            if rounds is None:
                rounds = worker._peer_rounds = PeerRounds()
    return rounds


def _check_message(worker: Any, msg: PeerOpenMessage) -> frozenset:
    """The other parties (the only workers this party sends its share to), after checking the fields."""
    check_openable(msg.name, msg.kwargs)
    if not isinstance(msg.round, str) or not 16 <= len(msg.round) <= 64 \
            or not (msg.round.isascii() and msg.round.isalnum()):
        raise PeerOpeningError("a peer opening needs a round id of 16-64 letters or digits")
    parties = msg.parties
    if not isinstance(parties, list) or not 2 <= len(parties) <= MAX_PARTIES \
            or not all(isinstance(p, str) for p in parties) or len(set(parties)) != len(parties):
        raise PeerOpeningError(f"a peer opening names 2-{MAX_PARTIES} distinct party ids")
    if worker.id not in parties:
        raise PeerOpeningError(f"worker {worker.id!r} is not among the parties {parties}")
    if not isinstance(msg.ids, list) or not all(type(i) is int and i > 0 for i in msg.ids):
        raise PeerOpeningError("a peer opening needs positive integer ids for the opened values")
    if msg.reveal not in REVEALS or (msg.reveal == "top_bits" and msg.name not in TOP_BITS_STEPS):
        raise PeerOpeningError(f"a peer opening of {msg.name!r} cannot reveal {msg.reveal!r}")
    return frozenset(p for p in parties if p != worker.id)


@register_handler(PeerOpenMessage)
def _handle_peer_open(worker: Any, msg: PeerOpenMessage, sender: str) -> Any:
    others = _check_message(worker, msg)
    principal = worker.principal(sender)
    rounds = rounds_of(worker)
    rounds.check_fresh(msg.round)
    rnd = None
    try:
        outputs = worker.monitor.open_step(principal, msg.name, tuple(msg.args), msg.kwargs, run_openable)
        if len(msg.ids) != len(outputs):
            raise PeerOpeningError(f"{msg.name} opens {len(outputs)} values; {len(msg.ids)} ids were given")
        if msg.reveal == "top_bits":
            rnd, opened = _open_top_bits(worker, msg, principal, rounds, others, outputs)
        else:
            rnd = rounds.open(principal.namespace, msg.round, msg.name, others, _layout(outputs))
            with cancellation.outside_turn():  # the other parties' shares arrive here under the worker lock
                _send_all(worker, _share_message(msg, outputs), _peers(worker, others))
                received = rounds.wait(msg.round, rnd)
            opened = _combine(msg.name, outputs, received)
    finally:
        rounds.close(msg.round, rnd)
    for oid, value in zip(msg.ids, opened):
        # the opened values, as the orchestrator would have sent them in a star opening: public to it
        worker.monitor.store(principal, oid, value, kind=Kind.CLIENT)
    worker.monitor.audit("peer_open", principal, list(msg.ids), "allowed", f"{msg.name} with {sorted(others)}")
    return m.OkReply()


def _open_top_bits(worker: Any, msg: PeerOpenMessage, principal: Any, rounds: PeerRounds, others: frozenset,
                   outputs: list) -> tuple:
    """A top-bits round: the first party gathers the others' shares and keeps the opened value; it sends
    each other party only the packed top bits, which that party keeps. Returns (round, kept values)."""
    if len(outputs) != 1:
        raise PeerOpeningError(f"{msg.name} opens {len(outputs)} values; a top-bits opening opens one")
    first = msg.parties[0]
    if worker.id == first:
        rnd = rounds.open(principal.namespace, msg.round, msg.name, others, _layout(outputs))
        with cancellation.outside_turn():
            opened = _combine(msg.name, outputs, rounds.wait(msg.round, rnd))
            _send_all(worker, _share_message(msg, [pack_top_bits(opened[0])]), _peers(worker, others))
        return rnd, opened
    packed = ((outputs[0].numel() + 7) // 8,)
    rnd = rounds.open(principal.namespace, msg.round, msg.name, frozenset({first}), [(packed, torch.uint8)])
    with cancellation.outside_turn():
        _send_all(worker, _share_message(msg, outputs), _peers(worker, {first}))
        (bits,) = rounds.wait(msg.round, rnd)
    return rnd, bits


def _layout(tensors: list) -> list:
    return [(tuple(t.shape), t.dtype) for t in tensors]


def _share_message(msg: PeerOpenMessage, tensors: list) -> m.CommandMessage:
    return m.CommandMessage(PEER_SHARE, (msg.round, msg.name, *tensors), {}, [], False)


def _peers(worker: Any, ids: Any) -> list:
    return [worker.resolve_worker(p) for p in sorted(ids)]  # configured peers only


def _combine(name: str, outputs: list, received: list) -> list:
    """The opened values: this party's outputs plus (XOR for XOR shares) every other party's."""
    n_xor = len(outputs) if name in XOR_OPENABLE else XOR_LEADING.get(name, 0)  # outputs combined by ^
    for values in received:
        for j, (total, v) in enumerate(zip(outputs, values)):
            if j < n_xor:
                total.bitwise_xor_(v)
            else:
                total.add_(v)  # int64 wraps: the sum mod 2^64
    return outputs


_SEND_POOL: ThreadPoolExecutor | None = None


def _send_all(worker: Any, share: Any, peers: list) -> None:
    """Sends ``share`` to every peer, to all of them at once when there are several (each peer link has
    its own connection and send lock; the sends block in socket writes and reads, which release the GIL).
    Raises the first failure after every send finished."""
    global _SEND_POOL
    if len(peers) == 1:
        worker.send_msg(share, peers[0])
        return
    if _SEND_POOL is None:
        with _MAKE_LOCK:
            if _SEND_POOL is None:
                _SEND_POOL = ThreadPoolExecutor(MAX_PARTIES, thread_name_prefix="veil-peer-send")
    futures = [_SEND_POOL.submit(worker.send_msg, share, peer) for peer in peers[1:]]
    errors: list[BaseException] = []
    try:
        worker.send_msg(share, peers[0])
    except BaseException as e:  # noqa: BLE001  (the other sends finish first)
        errors.append(e)
    for fut in futures:
        try:
            fut.result()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    if errors:
        raise errors[0]


def _peer_share(worker: Any, round_id: Any, name: Any, *tensors: Any) -> None:
    """Runs on the receiving party: stores a peer's share for a round one of its sessions runs."""
    monitor = worker.monitor
    principal = monitor.current_principal()
    if principal is None or not principal.isolated or principal.roles != frozenset({"peer"}):
        # only a peer worker's own connection delivers shares (not a scientist, client or admin session)
        if principal is not None:
            monitor.audit("peer_share", principal, [], "refused", "not a peer connection")
        raise PermissionDeniedError("peer shares come only from peer workers")
    if not isinstance(round_id, str) or not isinstance(name, str):
        raise PeerOpeningError("a peer share names a round id and a step")
    try:
        with cancellation.outside_turn():  # the round's own request registers it under the worker lock
            rounds_of(worker).deposit(round_id, principal.user, name, list(tensors))
    except PeerOpeningError as e:
        monitor.audit("peer_share", principal, [], "refused", str(e))
        raise


def _end_session(worker: Any, session_id: str) -> None:
    rounds = getattr(worker, "_peer_rounds", None)
    if rounds is not None:
        rounds.end_session(session_id)


register_worker_function(PEER_SHARE, _peer_share, shapes="none")
register_peer_command(PEER_SHARE)
SESSION_END_HANDLERS.append(_end_session)
