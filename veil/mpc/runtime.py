"""The party runtime: how protocols reach shares that live somewhere else.

``veil.mpc`` is pure protocol code over *party handles*. A share is either a
plain int64 tensor (a party simulated in this process) or a handle to a
tensor held by another machine. The protocols never import what a handle
is; a :class:`PartyRuntime` registered for the handle's type does the three
things a protocol needs from the outside world:

* **run on parties** (:meth:`PartyRuntime.run_on_party`): run a registered
  party function where its shares live; the results stay there (handles).
* **open** (:meth:`PartyRuntime.open_on_parties`, :meth:`PartyRuntime.fetch`):
  run an *openable* step on every party at once and bring its outputs here,
  or fetch shares being reconstructed: one round, every party's request in
  flight together.
* **deal** (:meth:`PartyRuntime.handle`, :meth:`PartyRuntime.deliver`):
  name the material a crypto provider stored on a party, as a handle the
  protocols can pass on; send a provider's messages to every party at once.

The worker runtime (pointers to veil workers, local or over the network)
lives in :mod:`veil.tensors.mpc_glue.runtime` and registers itself at
import time; any other runtime (a test double, another transport) calls
:func:`register_runtime` the same way. Layering: nothing in ``veil.mpc``
imports ``veil.tensors`` or ``veil.workers`` (``tests/mpc/test_layering.py``).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence

import torch

#: tag a crypto provider puts on dealt objects it stores on a party (the
#: worker's reference monitor honours it from dealers only and never reveals
#: them); the same string as ``veil.workers.monitor.DEALER_TAG``
DEALER_TAG = "#veil.dealer"
#: tags a dealer adds to the objects of an ObjectMessage: a uniform field (it may mask an opening), and
#: the index of the item it belongs to within that message (:mod:`veil.workers.dealt`)
DEALT_MASK_TAG = "#veil.dealer.mask"
DEALT_ITEM_TAG = "#veil.dealer.item="
#: a derived field's uniform sources in its item (``material.derived_sources``), positions joined by "."
DEALT_SOURCES_TAG = "#veil.dealer.sources="
#: a constant operand's fixed mask (:mod:`veil.mpc.fixed_operand`): the layout's mark (in place of
#: ``uniform?``) and the tag; the party lets ``fixed_open`` open it once and nothing else open it
DEALT_FIXED = "fixed"
DEALT_FIXED_TAG = "#veil.dealer.fixed"
#: dealer worker function -> the layout of its results, ``f(args) -> [(item index, uniform?), ...]``
#: (filled by the dealing modules; the worker's monitor groups what they store by it)
DEALT_LAYOUTS: dict[str, Callable[[tuple], list]] = {}
#: openable step whose outputs are packed -> ``f(output index, its mask, the step's arguments as received)``:
#: the ``(shape, dtype)`` that output must have to hold one masked bit group per mask entry, or None for
#: the mask's own (the worker's monitor checks it; filled by the protocol modules, e.g. the comparison's
#: compacted AND words and packed result bit)
OPENED_LAYOUTS: dict[str, Callable[[int, torch.Tensor, tuple], Optional[tuple]]] = {}


class PartyRuntime(ABC):
    """What the protocols need from the machines that hold the shares.

    A runtime serves the handle types in :attr:`handle_types`. Every method
    that talks to several parties sends to all of them before waiting for
    any (one round), and raises only after every party answered or failed,
    so a failure leaves no request in flight.
    """

    #: the handle classes this runtime serves (exact types, e.g. PointerTensor)
    handle_types: tuple[type, ...] = ()

    @abstractmethod
    def location(self, handle: Any) -> Any:
        """The party holding ``handle`` (parties are compared by identity)."""

    def describe(self, handle: Any) -> tuple:
        """``(shape as a tuple, dtype)`` of ``handle`` (a runtime whose handles keep them as plain values
        answers without the tensor properties' dispatch: step signatures read them for every argument)."""
        return tuple(handle.shape), handle.dtype

    @abstractmethod
    def run_on_party(self, name: str, args: tuple, kwargs: dict, outputs: Any) -> Any:
        """Runs party function ``name`` where the handles in ``args``/``kwargs`` live.

        Args:
            name: A name registered with :func:`veil.mpc.party.party_function`.
            args, kwargs: Handles of one party, public tensors and values.
            outputs: The function's output tree on meta tensors (shapes, dtypes).

        Returns:
            Handles to the results on that party, in the structure of ``outputs``.
            The runtime may send the step later, with the next request to that
            party; its errors are then raised by that request.
        """

    @abstractmethod
    def open_on_parties(self, name: str, per_party: Sequence[tuple], kwargs: dict) -> list[list[torch.Tensor]]:
        """Runs openable step ``name`` on several parties in one round.

        Args:
            per_party: For each party, its positional arguments (its handles).
            kwargs: Public keyword arguments, the same for every party.

        Returns:
            For each party (same order), the step's outputs as local tensors.
        """

    def opens_among(self, parties: Sequence[Any]) -> bool:
        """Whether these parties (:meth:`location` values) may open among themselves at all
        (:meth:`open_at_parties` answers None otherwise, whatever the step: its shapes need not be found)."""
        return False

    def open_at_parties(self, name: str, per_party: Sequence[tuple], kwargs: dict,
                        outputs: Sequence[torch.Tensor], top_bits: bool = False) -> Optional[list[list[Any]]]:
        """A *peer opening*: the parties exchange their outputs of openable step ``name`` among
        themselves and each keeps the opened values (nothing opened passes through here).

        Args:
            outputs: The step's outputs on meta tensors (shapes, dtypes).
            top_bits: Only the first party keeps the (one) opened value; the others keep its top bits
                packed 8 to a uint8 (``pack_top_bits`` of :mod:`veil.mpc.truncation`).

        Returns:
            For each party (same order), handles to the opened values on it; or None when these
            parties cannot open among themselves (the caller then opens through here, a star).
        """
        return None

    def one_host(self, parties: Sequence[Any]) -> bool:
        """True when these parties (:meth:`location` values) run on one host, so bytes between them cost a
        memory copy, not a network transfer: a protocol may then open a value to every party in one
        exchange where, across hosts, it sends fewer bytes in two (truncation's top bits)."""
        return False

    def in_process(self, handle: Any) -> bool:
        """True when the party holding ``handle`` lives in this process: a public value reaches it without
        its bytes being copied or sent, so a protocol may give it a whole opened value where a remote
        party gets only the part it needs (a truncation's top bits)."""
        return False

    @abstractmethod
    def fetch(self, handles: Sequence[Any]) -> list[torch.Tensor]:
        """Brings the shares behind ``handles`` here (an opening), one round for all."""

    @abstractmethod
    def deliver(self, requests: Sequence[tuple[Any, Any, Any]]) -> list[Any]:
        """Sends every ``(sender, message, party)`` request in one round; the replies, in order.

        For dealers: a provider sending each party its material at once."""

    def beside(self, calls: Sequence[Callable[[], Any]], parties: Sequence[Any], elements: int) -> Callable[[], list]:
        """Starts ``calls`` (each one party's part of a dealer's work, ending in a request to it)
        and returns a call that waits for all of them and gives their results, raising the first
        error after every one finished.

        A runtime may run them on threads beside the caller (network ``parties``, or in-process
        ones with ``elements`` ring elements each: worth a thread); this default runs them now."""
        results, errors = [], []
        for call in calls:
            try:
                results.append(call())
            except Exception as e:  # noqa: BLE001  (the others still run, as they would on threads)
                results.append(None)
                errors.append(e)

        def wait() -> list:
            if errors:
                raise errors[0]
            return results

        return wait

    @abstractmethod
    def handle(self, location: Any, object_id: int, owner: Any, shape: Sequence[int], dtype: torch.dtype) -> Any:
        """A handle to object ``object_id`` that a dealer stored on ``location``.

        ``owner`` is the orchestrator's end (who sends the requests)."""


_RUNTIMES: dict[type, PartyRuntime] = {}
_DEFAULT: list[PartyRuntime] = []


def register_runtime(runtime: PartyRuntime, default: bool = False) -> None:
    """Makes ``runtime`` serve its handle types (``default``: also :func:`remote_handle`)."""
    for tp in runtime.handle_types:
        _RUNTIMES[tp] = runtime
    if default or not _DEFAULT:
        _DEFAULT[:] = [runtime]
    from veil.mpc.opening import register_batch_fetcher

    for tp in runtime.handle_types:
        register_batch_fetcher(tp, runtime.fetch)


_STEP_CHECK: list[Callable[[], None]] = []
_STEP_CHECKPOINT: list[Callable[[], None]] = []
_ONE_AT_A_TIME: list[Callable[..., ContextManager]] = []
_OFF_TURN: list[Callable[[], ContextManager]] = []


def set_step_check(check: Callable[[], None], checkpoint: Optional[Callable[[], None]] = None,
                   one_at_a_time: Optional[Callable[..., ContextManager]] = None,
                   off_turn: Optional[Callable[[], ContextManager]] = None) -> None:
    """The worker runtime's command check (its deadline and cancellation), called between the items of a long
    protocol step that runs as a worker function (a comparison dealing, an expansion of dealt material): such a
    step ran on past the owner's per-command limit. ``checkpoint``: the check, then a hand-over of the worker's
    turn to waiting requests (a party's expansion and checks of received material: 256 items held its turn
    ~1 s, one field ~2 s). ``one_at_a_time(worker, slot)``: a context in which at most one such step of
    ``worker`` per ``slot`` runs at once (:func:`one_step_at_a_time`). ``off_turn()``: a context that gives the
    worker's turn back while a step waits on other workers or computes without its store (:func:`off_turn`).
    Nothing is checked where none is set."""
    _STEP_CHECK[:] = [check]
    _STEP_CHECKPOINT[:] = [checkpoint or check]
    _ONE_AT_A_TIME[:] = [one_at_a_time] if one_at_a_time is not None else []
    _OFF_TURN[:] = [off_turn] if off_turn is not None else []


def step_check() -> None:
    """Raises if the worker command running this protocol step is past its deadline or was cancelled."""
    if _STEP_CHECK:
        _STEP_CHECK[0]()


def step_checkpoint() -> None:
    """:func:`step_check`, then lets other requests waiting for this worker run first (:func:`set_step_check`)."""
    if _STEP_CHECKPOINT:
        _STEP_CHECKPOINT[0]()


def one_step_at_a_time(worker: Any, slot: str = "dealing") -> ContextManager:
    """Runs a step that hands its turn over (:func:`step_checkpoint`, :func:`off_turn`) alone among the steps of
    ``worker`` with the same ``slot``, users served in turns (each user's steps in arrival order): its material
    in progress is held until it sends or stores it, so steps that took turns about held theirs all at once (one
    per session, uncharged). The turn ran them one at a time before they handed it over. A provider's dealings
    (``"dealing"``: they wait on the parties) and a party's receiving steps (``"receiving"``: they wait on
    nobody) take different slots, so a worker that is both never waits for itself through another worker. The
    block gets a call that gives the slot up early (a dealing's material made, before it waits on replies)."""
    return _ONE_AT_A_TIME[0](worker, slot) if _ONE_AT_A_TIME else contextlib.nullcontext(_no_release)


def _no_release(*party: Any) -> None:
    return None


_AWAITING_REPLIES: list[Callable[[Any, list], ContextManager]] = []


def set_awaiting_replies(awaiting: Callable[[Any, list], ContextManager]) -> None:
    """The worker runtime's per-party slots of a provider (:func:`awaiting_replies`)."""
    _AWAITING_REPLIES[:] = [awaiting]


def awaiting_replies(worker: Any, party_ids: list) -> ContextManager:
    """Holds the provider ``worker``'s slots of every party in ``party_ids`` (all at once, in turns per user):
    a dealing takes them before the dealing slot (:func:`one_step_at_a_time`), which it gives up once its
    material is made, and waits on the parties' replies holding these alone. The block gets a call that frees
    one party's slot (by its index in ``party_ids``) once it answered: a party that never answers (a peer link
    times out after 120 s) holds back the dealings to it, no other, and at most one dealing's material waits
    on each party. A no-op where no runtime set it (in process: no turn, nothing waits)."""
    if not _AWAITING_REPLIES:
        return contextlib.nullcontext(_no_release)
    return _AWAITING_REPLIES[0](worker, party_ids)


def off_turn() -> ContextManager:
    """Runs the block without the worker's turn (taken back at its end): a provider's dealing, which never
    touches the store, generates and sends its material so. It held the turn while it waited on a party, and a
    request there that waited on the provider (holding that party's turn) then waited for it in turn: both
    stalled, with every other session of both workers, until a deadline. A no-op outside a worker's request."""
    return _OFF_TURN[0]() if _OFF_TURN else contextlib.nullcontext()


def runtime_of(handle: Any) -> Optional[PartyRuntime]:
    """The runtime serving ``handle``'s type, or None (a local tensor or a public value)."""
    return _RUNTIMES.get(type(handle))


def default_runtime() -> PartyRuntime:
    """The runtime dealers name their material with."""
    if not _DEFAULT:
        raise RuntimeError("no party runtime is registered: import veil (or veil.tensors.mpc_glue.runtime)")
    return _DEFAULT[0]


def remote_handle(location: Any, object_id: int, owner: Any, shape: Sequence[int], dtype: torch.dtype) -> Any:
    """Dealing: a handle to material a provider stored on ``location`` (the default runtime's)."""
    return default_runtime().handle(location, object_id, owner, shape, dtype)


def deliver(requests: Sequence[tuple[Any, Any, Any]]) -> list[Any]:
    """Dealing: every ``(sender, message, party)`` request in one round (the default runtime's)."""
    return default_runtime().deliver(requests)


def beside(calls: Sequence[Callable[[], Any]], parties: Sequence[Any], elements: int) -> Callable[[], list]:
    """Dealing: :meth:`PartyRuntime.beside` of the default runtime."""
    return default_runtime().beside(calls, parties, elements)


def runtimes() -> Mapping[type, PartyRuntime]:
    """Handle type -> runtime (read-only view, for tests and diagnostics)."""
    return dict(_RUNTIMES)
