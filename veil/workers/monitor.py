"""The reference monitor: the only door between a client's message and a worker's objects.

Every client-initiated access names (principal, object ref, purpose) and goes
through :meth:`ReferenceMonitor.resolve`. The monitor

- scopes names to the principal's session (its own namespace, the owner's
  protected data, hand-offs addressed to it); anything else is *unknown*, and
  unknown ids and ids of other sessions fail with the same error and text;
- applies the owner's rules for the purpose: ``allowed_users``, ``reveal_to``,
  the DP-only policy, dealer material never revealed, owner data never
  deleted or replaced by clients;
- records capabilities on every object it stores (``Entry.kind``,
  ``reveal_to`` and ``provenance``: derived objects inherit the union of their
  sources' provenance and the strictest ``reveal_to``);
- charges each session's memory quota; and
- writes the audit row (allowed releases, every refusal and unknown-id probe).

The object store answers only the monitor: it holds the store's key.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Callable, Iterable, Iterator

import torch

from veil.exceptions import ObjectNotFoundError, PermissionDeniedError, VeilError, register_remote_error
from veil.messaging import messages as m
from veil.tensors.handle import RemoteHandle
from veil.mpc.runtime import DEALT_LAYOUTS
from veil.workers import capabilities, dealt
from veil.workers.capabilities import CAP_PREFIX, DEALER_TAG  # noqa: F401  (re-exported)
from veil.workers.store import SHARED_NS, Entry, Kind, ObjectStore, StoreKey

__all__ = ["Purpose", "Kind", "Principal", "ReferenceMonitor", "QuotaExceededError", "DEALER_TAG", "Entry",
           "register_size_estimator"]


@register_remote_error
class QuotaExceededError(VeilError):
    """A session would hold more memory on a worker than the owner allows (``--max-session-mb``)."""


class Purpose(str, Enum):
    """Why a message names an object (see :data:`PURPOSES`)."""

    COMPUTE = "compute"  # an allowlisted op reads it; the result stays on the worker
    REVEAL = "reveal"  # its value goes back to the requester (.get)
    MOVE = "move"  # it is copied/moved to another worker
    HAND_OFF = "hand_off"  # a stored pointer acts on a peer for the requester (remote_get)
    PROTOCOL_STEP = "protocol_step"  # a protocol's party step or opening uses it
    DP_RELEASE = "dp_release"  # a differentially private release reads it


@dataclass(frozen=True)
class PurposeRule:
    """What a purpose lets out of the worker, and whether allowed uses are audited."""

    releases_value: bool  # the value (not a function of it under a protocol) leaves the worker
    audit_allowed: bool
    action: str  # audit action name


#: the explicit table of purposes
PURPOSES: dict[Purpose, PurposeRule] = {
    Purpose.COMPUTE: PurposeRule(False, False, "compute"),
    Purpose.REVEAL: PurposeRule(True, True, "get"),
    Purpose.MOVE: PurposeRule(True, True, "move"),
    Purpose.HAND_OFF: PurposeRule(True, True, "remote_get"),
    Purpose.PROTOCOL_STEP: PurposeRule(False, False, "protocol_step"),
    Purpose.DP_RELEASE: PurposeRule(False, True, "dp_release"),
}

#: worker functions whose results are dealer material when a dealer (peer / in-process) runs them
DEALER_OUTPUTS: set[str] = {"veil.mpc.expand_material", "veil.mpc.receive_comparison"}
#: worker-function prefixes whose results are protocol shares
PROTOCOL_PREFIXES: tuple[str, ...] = ("veil.mpc.",)
#: openable step -> argument positions that must hold fresh dealer masks when the opened
#: values include a share the requester may not reveal (serving: a client's input)
OPENING_MASKS: dict[str, tuple[int, ...]] = {"beaver_mask": (2, 3), "trunc_mask": (1,), "fss_mask": (1,),
                                              # the bitwise comparison (veil/mpc/bit_comparison.py)
                                              "cmp_mask_values": (1,), "cmp_and_open": (1, 2, 3),
                                              "cmp_bit_open": (9,)}
#: in-process audit rows kept (network workers write to their OwnerDB)
AUDIT_LOG_SIZE = 10_000


@dataclass(frozen=True)
class Principal:
    """Who is asking.

    Attributes:
        session: recorded as ``created_by`` of what it stores (session id, or the
            claimed sender on in-process workers).
        user: the identity ``allowed_users`` rules see (authenticated on network workers).
        namespace: where its objects live (the session id on network workers; the
            shared namespace in-process, where there are no sessions).
        roles: authenticated roles ("scientist", "peer", "admin"); empty in-process.
        isolated: a network session: sees only its namespace, protected owner data
            and hand-offs.
    """

    session: str
    user: str
    namespace: str = SHARED_NS
    roles: frozenset = frozenset()
    isolated: bool = False

    def acting_as(self, user: str) -> "Principal":
        return self if user == self.user else replace(self, user=user)

    @property
    def is_peer(self) -> bool:
        return "peer" in self.roles

    @property
    def may_deal(self) -> bool:
        """Whether what it stores can be dealer material (a crypto provider: a peer, or in-process)."""
        return not self.isolated or self.is_peer


_EMPTY: frozenset = frozenset()


#: bytes charged for a stored object of a type without a size estimator (pointers, small wrappers):
#: every object counts, so a session cannot fill a worker with many "free" objects
DEFAULT_OBJECT_BYTES = 1024
#: type -> bytes an object of it holds, for the per-session quota (HE ciphertexts, plans register theirs)
SIZE_ESTIMATORS: dict[type, Callable[[Any], int]] = {}


def register_size_estimator(tp: type, estimate: Callable[[Any], int]) -> None:
    """Tells the quota how many bytes a stored ``tp`` holds (see :data:`SIZE_ESTIMATORS`)."""
    SIZE_ESTIMATORS[tp] = estimate


def _nbytes(obj: Any) -> int:
    """Bytes a stored object holds, for the per-session quota."""
    tp = type(obj)
    if tp is torch.Tensor or tp is torch.nn.Parameter:
        try:
            return obj.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return obj.numel() * obj.element_size()
    estimate = SIZE_ESTIMATORS.get(tp)
    if estimate is None:
        return DEFAULT_OBJECT_BYTES
    return max(int(estimate(obj)), DEFAULT_OBJECT_BYTES)


def strictest_reveal_to(sources: Iterable[Entry]) -> tuple | None:
    """The intersection of the sources' ``reveal_to`` sets (None when none restricts)."""
    return dealt.strictest((e.reveal_to for e in sources), None)


def derived_kind(sources: Iterable[Entry], op_name: str | None, principal: Principal) -> str:
    """Kind of a result: dealer outputs (from a dealer), protocol shares, or tainted by its inputs."""
    if op_name is not None:
        if op_name in DEALER_OUTPUTS and principal.may_deal:
            return Kind.DEALER
        if op_name.startswith(PROTOCOL_PREFIXES):
            return Kind.SHARE
    kind = Kind.CLIENT
    for e in sources:
        if e.kind == Kind.DEALER:
            return Kind.DEALER  # plain ops on dealer material stay dealer material: never revealable
        if e.kind == Kind.SHARE:
            kind = Kind.SHARE
    return kind


class ReferenceMonitor:
    """One per worker; owns the worker's object store.

    Args:
        worker_id: the worker's name (in error texts).
        max_session_bytes: per-session memory quota (None: unlimited).
    """

    def __init__(self, worker_id: str, max_session_bytes: int | None = None) -> None:
        self.worker_id = worker_id
        self.__key = StoreKey()
        self._store = ObjectStore(worker_id, self.__key)
        self.max_session_bytes = max_session_bytes
        #: in-process audit rows (dicts); a network server replaces ``audit_sink``
        self.audit_log: deque = deque(maxlen=AUDIT_LOG_SIZE)
        self.audit_sink: Callable[[str, Principal, list, str, str], None] = self._audit_in_memory
        self._local = threading.local()
        self._taints: dict[str, tuple] = {}  # namespace -> reveal_to every new object of it gets
        #: the owner's review policy (veil.governance), asked before an opening reveals a client object
        #: derived from owner data; the worker installs it: (principal, oid, entry, action) -> None or raise
        self.release_hook: Callable[[Principal, int, Entry, str], None] | None = None

    # ------------------------------------------------------------- audit

    def _audit_in_memory(self, action: str, principal: Principal, ids: list, outcome: str, detail: str) -> None:
        self.audit_log.append({"action": action, "principal": principal.user, "session": principal.session,
                               "object_ids": [i for i in ids if type(i) is int], "outcome": outcome,
                               "detail": detail[:500]})

    def audit(self, action: str, principal: Principal, ids: list, outcome: str = "allowed", detail: str = "") -> None:
        self.audit_sink(action, principal, list(ids), outcome, detail)

    def _refuse(self, error: VeilError, action: str, principal: Principal, ids: list) -> VeilError:
        self.audit(action, principal, ids, "refused", str(error))
        error.audited = True  # the server does not write a second row
        return error

    def unknown(self, oid: Any) -> ObjectNotFoundError:
        """The one error for ids that do not exist and ids the requester may not name."""
        shown = oid if type(oid) is int else type(oid).__name__
        return ObjectNotFoundError(f"object {shown!r} not found on worker {self.worker_id!r}")

    # ------------------------------------------------------------ lookup

    def _find(self, principal: Principal, oid: Any) -> Entry | None:
        if type(oid) is not int:
            return None
        entry = self._store.lookup(self.__key, principal.namespace, oid)
        if entry is not None:
            if not principal.isolated or entry.protected or entry.created_by == principal.namespace:
                return entry
        elif principal.isolated:
            return self._store.claim(self.__key, principal.namespace, oid)
        return None

    def stored_bytes(self, principal: Principal, ids: Iterable[Any]) -> int:
        """Bytes of the objects among ``ids`` that ``principal`` may name now: a size, for scheduling only.

        Reveals no value, claims no hand-off and audits nothing (no access happens); ids that are
        unknown, not nameable, or not yet stored (results of earlier commands of the same request)
        count 0. The server uses it to keep large protocol steps off its event loop."""
        total = 0
        store, key = self._store, self.__key
        for oid in ids:
            entry = store.lookup(key, principal.namespace, oid) if type(oid) is int else None
            if entry is not None and (not principal.isolated or entry.protected
                                      or entry.created_by == principal.namespace):
                total += entry.nbytes
        return total

    def resolve(self, principal: Principal, ref: Any, purpose: Purpose, detail: str = "") -> Entry:
        """The entry ``ref`` (an ObjectRef or id) names, if ``principal`` may use it for ``purpose``.

        Raises:
            ObjectNotFoundError: unknown, or not nameable by this principal (same text).
            PermissionDeniedError: nameable but the owner's rules refuse this purpose.
        """
        oid = ref.id if type(ref) is m.ObjectRef else ref
        rule = PURPOSES[purpose]
        entry = self._find(principal, oid)
        if entry is None:
            raise self._refuse(self.unknown(oid), rule.action, principal, [oid])
        if rule.releases_value:
            self._check_release(principal, entry, oid, rule.action)
        if principal.isolated and purpose is not Purpose.REVEAL and isinstance(entry.obj, RemoteHandle):
            raise self._refuse(self.chain_error(oid), rule.action, principal, [oid])
        if rule.audit_allowed:
            self.audit(rule.action, principal, [oid], "allowed", detail)
        return entry

    def chain_error(self, oid: Any) -> PermissionDeniedError:
        """Network pointer chains are refused (docs/architecture.md, "Pointer chains")."""
        return PermissionDeniedError(
            f"object {oid} on worker {self.worker_id!r} is a pointer to another worker: pointer chains are not "
            "followed on network workers (the worker would act there with its own peer rights, not yours); "
            "use a pointer to that worker directly")

    def _dp_only_error(self, what: str) -> PermissionDeniedError:
        return PermissionDeniedError(
            f"{what} refused: this data on worker {self.worker_id!r} is under the owner's differential-privacy "
            "policy and answers only differentially private releases")

    def _check_release(self, principal: Principal, entry: Entry, oid: int, action: str) -> None:
        error = self._release_error(principal, entry, oid, action)
        if error is not None:
            raise self._refuse(error, action, principal, [oid])

    def _release_error(self, principal: Principal, entry: Entry, oid: int, action: str) -> VeilError | None:
        """Why ``principal`` may not reveal ``entry`` (None: it may)."""
        error: VeilError | None = None
        user = principal.user
        if entry.kind == Kind.DEALER:
            error = PermissionDeniedError(
                f"object {oid} on worker {self.worker_id!r} is dealer material (triples, masks, keys): it is "
                "never revealed")
        elif entry.allowed_users is not None and user not in entry.allowed_users:
            error = PermissionDeniedError(
                f"object {oid} on worker {self.worker_id!r} is private: user {user!r} may not retrieve it "
                f"(allowed: {list(entry.allowed_users)}); compute on it through pointers instead")
        elif entry.reveal_to is not None and not self._may_see(principal, entry.reveal_to):
            error = PermissionDeniedError(
                f"object {oid} on worker {self.worker_id!r} may be revealed only to its designated recipient "
                "(a share of someone else's value); it is released by the protocol's output step")
        elif entry.meta.get("dp_only"):
            error = self._dp_only_error(action)
        return error

    def release_output(self, principal: Principal, ref: Any, recipients: list) -> Entry:
        """A protocol's output step: ``ref``'s value goes to ``recipients`` (session ids) only.

        The object must be a share whose ``reveal_to`` names every recipient (it
        derives from their inputs); anything else (owner data, client objects,
        dealer material) is refused.
        """
        oid = ref.id if type(ref) is m.ObjectRef else ref
        entry = self.resolve(principal, oid, Purpose.PROTOCOL_STEP)
        recipients = [r for r in recipients if r is not None]
        if (entry.kind != Kind.SHARE or entry.reveal_to is None or entry.protected or entry.meta.get("dp_only")
                or any(r not in entry.reveal_to for r in recipients)):
            raise self._refuse(PermissionDeniedError(
                f"object {oid} on worker {self.worker_id!r} is not an output share of these requests"),
                "release", principal, [oid])
        self.audit("release", principal, [oid], "allowed", f"to {len(recipients)} recipient(s)")
        return entry

    def taint(self, principal: Principal, reveal_to: tuple) -> None:
        """From now on, everything ``principal``'s session stores is revealable only to ``reveal_to``.

        Openings hand a protocol's intermediate values back as plain tensors, so
        capabilities cannot follow them; a session computing on inputs protected
        for someone else (a serving batch) is tainted as a whole until
        :meth:`untaint`.
        """
        current = self._taints.get(principal.namespace)
        self._taints[principal.namespace] = tuple(sorted(set(reveal_to) | set(current or ())))

    def untaint(self, principal: Principal) -> None:
        self._taints.pop(principal.namespace, None)

    def may_reveal(self, principal: Principal, entry: Entry) -> bool:
        """Whether ``principal`` could .get() ``entry`` (no audit row)."""
        return self._release_error(principal, entry, 0, "check") is None

    # --------------------------------------------------------- arguments

    def resolve_args(self, principal: Principal, value: Any, purpose: Purpose, found: dict[int, Entry]) -> Any:
        """Replaces ObjectRefs in (nested) arguments by their objects; ``found``: id -> entry."""
        tp = type(value)
        if tp is m.ObjectRef:
            entry = found.get(value.id)
            if entry is None:
                entry = found[value.id] = self.resolve(principal, value.id, purpose)
            return entry.obj
        if tp is tuple or tp is list:
            return tp([self.resolve_args(principal, v, purpose, found) for v in value])
        if tp is dict:
            return {k: self.resolve_args(principal, v, purpose, found) for k, v in value.items()}
        return value

    def resolve_list(self, principal: Principal, values: Any, purpose: Purpose, found: dict[int, Entry]) -> list:
        """:meth:`resolve_args` for a command's top-level argument list (the hot path: one call per
        command). Purposes that neither release values nor audit allowed uses only need the name
        scoping of :meth:`_find`; anything else goes through :meth:`resolve`."""
        quiet = purpose is Purpose.COMPUTE or purpose is Purpose.PROTOCOL_STEP
        out = []
        for v in values:
            tp = type(v)
            if tp is m.ObjectRef:
                oid = v.id
                entry = found.get(oid)
                if entry is None:
                    entry = self._find(principal, oid) if quiet else self.resolve(principal, oid, purpose)
                    if entry is None:
                        raise self._refuse(self.unknown(oid), PURPOSES[purpose].action, principal, [oid])
                    found[oid] = entry
                out.append(entry.obj)
            elif tp is list or tp is tuple or tp is dict:
                out.append(self.resolve_args(principal, v, purpose, found))
            else:
                out.append(v)
        return out

    def resolve_opening(self, principal: Principal, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Arguments of an openable protocol step (its outputs go back to the requester).

        Openings open protocol shares: every referenced object must be a share or
        dealer material, or something the requester may reveal anyway. When a
        value is protected for someone else (a serving client's input, or dealt
        material bound to one), the step's mask positions must hold fresh uniform
        dealt fields, and every dealt item the opening touches is bound to that
        protection (:mod:`veil.workers.dealt`).
        """
        found: dict[int, Entry] = {}
        args = self.resolve_args(principal, args, Purpose.PROTOCOL_STEP, found)
        kwargs = self.resolve_args(principal, kwargs, Purpose.PROTOCOL_STEP, found)
        ids = list(found)
        protecting: list = []  # reveal_to of the values protected for someone else
        dealt_entries = []
        for oid, entry in found.items():
            if entry.kind == Kind.DEALER:
                dealt_entries.append(entry)
                if entry.reveal_to is not None and not self._may_see(principal, entry.reveal_to):
                    protecting.append(entry.reveal_to)
                continue
            if entry.kind == Kind.SHARE:
                if not self.may_reveal(principal, entry):
                    protecting.append(entry.reveal_to if entry.reveal_to is not None else ())
                continue
            self._check_release(principal, entry, oid, "open")  # owner data, client objects: as a .get()
            if self.release_hook is not None:
                self.release_hook(principal, oid, entry, "open")
        self._local.opened_masks = None
        if protecting:
            self._local.opened_masks = self._check_masks(principal, name, found, ids)
            dealt.bind_all(dealt_entries, dealt.strictest(protecting, None))
        elif dealt_entries:  # opened unmasked: the requester may know these items; they never mask a
            dealt.bind_all(dealt_entries, None)  # protected value (bound to the taint, r stayed a "fresh" mask)
        self.audit("open", principal, ids, "allowed", name)
        return args, kwargs

    def hides(self, principal: Principal, entry: Entry) -> bool:
        """Whether ``entry``'s value is secret from ``principal``: dealt material, or a value revealable
        only to others (its shape, an op's failure or an error text must not depend on it)."""
        return entry.kind == Kind.DEALER or (entry.reveal_to is not None
                                             and not self._may_see(principal, entry.reveal_to))

    @staticmethod
    def _may_see(principal: Principal, reveal_to: tuple) -> bool:
        return principal.session in reveal_to or principal.user in reveal_to

    def _check_masks(self, principal: Principal, name: str, found: dict[int, Entry], ids: list) -> list:
        """The mask tensors of an opening of protected values, in order (each checked, then marked used)."""
        positions = OPENING_MASKS.get(name)
        raw = getattr(self._local, "opening_refs", None) or ()
        error = None
        masks: list[Entry] = []
        if positions is None:
            error = f"{name} may not open shares protected for another party"
        else:
            for pos in positions:
                value = raw[pos] if pos < len(raw) else None
                refs = list(_refs(value))
                if not refs:
                    error = f"{name} needs dealt masks at argument {pos} to open shares protected for another party"
                    break
                if any(type(v) is not m.ObjectRef for v in _leaves(value)):
                    # fss_mask([x], [0, r]) zips x with the inline 0: every mask must be a dealt field
                    error = f"{name}: argument {pos} holds a value that is not dealt material; every mask must be " \
                            "a dealt field to open shares protected for another party"
                    break
                for r in refs:
                    entry = found.get(r.id)
                    why = dealt.mask_error(entry)
                    if why is None and any(entry is e for e in masks):
                        why = "appears twice in one opening"
                    if why is not None:
                        error = f"{name}: the mask at argument {pos} {why}; it cannot open shares protected for " \
                                "another party"
                        break
                    masks.append(entry)
                if error is not None:
                    break
        if error is not None:
            raise self._refuse(PermissionDeniedError(error), "open", principal, ids)
        for entry in masks:
            entry.meta["opened"] = True
        return [e.obj for e in masks]

    def open_step(self, principal: Principal, name: str, args: tuple, kwargs: dict,
                  run: Callable[[str, tuple, dict], list]) -> list:
        """An OpenMessage: resolves the wire-level arguments (keeping the raw refs for the mask check),
        runs the step with ``run`` and returns its outputs, each as large as its mask when masks were
        required (a broadcast mask would hide only differences)."""
        self._local.opening_refs = args
        try:
            args, kwargs = self.resolve_opening(principal, name, args, kwargs)
        finally:
            self._local.opening_refs = None
        masks, self._local.opened_masks = self._local.opened_masks, None
        outputs = run(name, args, kwargs)
        if masks is not None:
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in outputs]
            if len(outputs) > len(masks) or any(s != tuple(k.shape) for s, k in zip(shapes, masks)):
                raise self._refuse(PermissionDeniedError(
                    f"{name}: every output must be hidden by a mask of its own shape"), "open", principal, [])
            # a float x * 2^80 + r is x: the mask hides only what is added to it mod 2^64, in its own dtype
            if any(t.dtype != k.dtype for t, k in zip(outputs, masks)):
                raise self._refuse(PermissionDeniedError(
                    f"{name}: every output must have its mask's dtype (ring elements, added mod 2^64)"), "open",
                    principal, [])
        return outputs

    # ------------------------------------------------------------ storing

    def store(self, principal: Principal, oid: Any, obj: Any, *, sources: Iterable[Entry] = (),
              op_name: str | None = None, kind: str | None = None, reveal_to: tuple | None = None,
              tags: tuple = (), description: str = "", allowed_users: tuple | None = None,
              hand_off: bool | None = None) -> Entry:
        """Stores a client object under ``oid`` in the principal's namespace, with derived capabilities.

        Raises:
            PermissionDeniedError: ``oid`` is taken in this namespace (or by the owner's data).
            QuotaExceededError: the session would exceed its memory quota.
        """
        if type(oid) is not int or oid <= 0:
            raise VeilError(f"object id must be a positive integer, got {oid!r}")
        ns = principal.namespace
        if hand_off is None:  # what a peer worker stores is for whoever names the id first
            hand_off = principal.isolated and "peer" in principal.roles
        store, key = self._store, self.__key
        if store.has(key, ns, oid):
            raise PermissionDeniedError(f"object id {oid} is already in use on worker {self.worker_id!r}")
        if type(sources) is not list:
            sources = list(sources)
        nbytes = _nbytes(obj) if ns != SHARED_NS else 0  # sessions are charged; in-process has none
        if self.max_session_bytes is not None and ns != SHARED_NS:
            used = store.usage.get(ns, 0)
            if used + nbytes > self.max_session_bytes:
                error = QuotaExceededError(
                    f"worker {self.worker_id!r}: this session would hold {(used + nbytes) / 2**20:.1f} MiB, more "
                    f"than the owner's limit of {self.max_session_bytes / 2**20:.1f} MiB per session; free objects "
                    "(del pointers) or ask the owner to raise --max-session-mb")
                raise self._refuse(error, "store", principal, [oid])
        provenance = _EMPTY
        if sources:  # one pass: does any source restrict reveals or carry provenance? (plain client data: no)
            restricted = False
            for e in sources:
                if e.reveal_to is not None:
                    restricted = True
                if e.provenance and not e.provenance <= provenance:
                    provenance = provenance | e.provenance
            if reveal_to is None and restricted:
                reveal_to = strictest_reveal_to(sources)
        if kind is None:
            kind = derived_kind(sources, op_name, principal)
        taint = self._taints.get(ns) if kind == Kind.SHARE else None
        if taint is not None:  # a share computed while the session holds others' protected inputs
            reveal_to = taint if reveal_to is None else tuple(sorted(set(reveal_to) & set(taint)))
        entry = Entry(obj, tags=tuple(tags), description=description, allowed_users=allowed_users,
                      created_by=principal.session, reveal_to=reveal_to, kind=kind, provenance=provenance,
                      nbytes=nbytes)
        store.put(key, ns, oid, entry, hand_off=hand_off)
        return entry

    def store_objects(self, principal: Principal, objects: list) -> None:
        """ObjectMessage: client-sent objects; dealt material when a dealer tags it; peer hand-offs.

        Capabilities that travelled with an object (:meth:`export_capabilities`) are applied; they
        only ever restrict it, except ``kind`` share/dealer, honoured from dealers / peers only.
        """
        parsed = [(so, *self._import_capabilities(principal, so.tags)) for so in objects]  # all checks first
        dealt_entries, layout = [], []
        for so, tags, caps in parsed:
            entry = self.store(principal, so.id, so.obj, kind=caps["kind"], reveal_to=caps["reveal_to"],
                               tags=tags, description=so.description, allowed_users=so.allowed_users)
            if caps["kind"] == Kind.DEALER and caps["item"] is not None:
                dealt_entries.append(entry)
                layout.append((caps["item"], caps["mask"]))
            if caps["provenance"]:  # travelled with the object (sent objects have no sources here)
                entry.provenance = entry.provenance | caps["provenance"]
            if caps["dp_only"]:
                entry.meta["dp_only"] = True
        if dealt_entries:
            dealt.group(dealt_entries, layout)

    def group_dealt(self, principal: Principal, op_name: str, args: tuple, entries: list) -> None:
        """Groups what a dealer's worker function just stored into items (which fields are uniform)."""
        if principal.may_deal and op_name in DEALT_LAYOUTS:
            dealt.group(entries, DEALT_LAYOUTS[op_name](tuple(args)))

    def bind_dealt(self, principal: Principal, entries: list) -> None:
        """A command uses dealt material: unbound items bind to the strictest restriction of the command's
        inputs and the session's taint (what it computes can be revealed no wider)."""
        reveal_to = dealt.strictest((e.reveal_to for e in entries), self._taints.get(principal.namespace))
        dealt.bind_all(entries, reveal_to)

    # ------------------------------------------------------ capabilities on the move

    def export_capabilities(self, principal: Principal, entry: Entry) -> tuple:
        """Tags that carry ``entry``'s capabilities to another worker (:func:`capabilities.export_tags`)."""
        return capabilities.export_tags(principal, entry, self.worker_id)

    def outgoing(self, principal: Principal, new_id: int, entry: Entry) -> m.StoredObject:
        """The StoredObject that moves ``entry`` to another worker, its capabilities included."""
        return capabilities.outgoing(principal, new_id, entry, self.worker_id)

    def _import_capabilities(self, principal: Principal, tags: Any) -> tuple[tuple, dict]:
        return capabilities.parse_tags(tags, principal.may_deal)

    def store_output(self, oid: int, obj: Any) -> Entry:
        """For worker functions that store a result under an id they were given (HE ops, encrypted
        aggregation): stored for the current request's principal, derived from its inputs."""
        current = getattr(self._local, "request", None)
        if current is None:
            raise PermissionDeniedError(f"worker {self.worker_id!r}: store_output outside a request")
        principal, sources, op_name = current
        return self.store(principal, oid, obj, sources=sources, op_name=op_name)

    def current_principal(self) -> Principal | None:
        """Who asked for the worker function now running (protocol functions check their roles
        and round ownership with it); None outside a request."""
        current = getattr(self._local, "request", None)
        return None if current is None else current[0]

    def running(self, principal: Principal, sources: list, op_name: str) -> "_Running":
        """Context for executing an op: :meth:`store_output` sees who asked and the op's inputs."""
        return _Running(self._local, (principal, sources, op_name))

    def replace(self, principal: Principal, oid: int, obj: Any, purpose: Purpose = Purpose.HAND_OFF) -> None:
        """Replaces a client object's value (remote_get); owner data is never replaced."""
        entry = self.resolve(principal, oid, purpose)
        if entry.protected:
            raise self._refuse(PermissionDeniedError(
                f"object {oid} on worker {self.worker_id!r} belongs to the data owner: it is never replaced"),
                PURPOSES[purpose].action, principal, [oid])
        entry.obj = obj

    def discard(self, principal: Principal, oid: Any) -> bool:
        """Deletes a client object of the principal; owner data and unknown ids are left alone."""
        entry = self._find(principal, oid)
        if entry is None or entry.protected:
            return False
        return self._store.remove(self.__key, principal.namespace, oid) is not None

    def owned_entries(self, principal: Principal) -> Iterator[tuple[int, Entry]]:
        """What the principal may list/search: the owner's data and its own objects."""
        for oid, e in self._store.entries(self.__key, principal.namespace):
            if e.protected or not principal.isolated or e.created_by == principal.namespace:
                yield oid, e

    def end_session(self, namespace: str) -> int:
        """Frees everything a session stored (disconnect); returns how many objects."""
        self._taints.pop(namespace, None)
        return self._store.drop_namespace(self.__key, namespace)

    def session_bytes(self, namespace: str) -> int:
        return self._store.usage.get(namespace, 0)

    # ---------------------------------------------------------- owner API

    def owner_load(self, oid: int, obj: Any, tags: tuple, description: str, allowed_users: tuple | None,
                   owner: str) -> Entry:
        """The data owner's own object: protected, its own provenance."""
        entry = Entry(obj, tags=tags, description=description, allowed_users=allowed_users, protected=True,
                      created_by=owner, kind=Kind.OWNER, provenance=frozenset({oid}), nbytes=_nbytes(obj))
        self._store.put(self.__key, SHARED_NS, oid, entry)
        return entry

    def owner_entries(self) -> Iterator[tuple[int, Entry]]:
        """Every entry (the data owner's view: DP setup, the admin listing)."""
        return self._store.entries(self.__key, None)

    def owner_objects(self) -> dict[int, Any]:
        return {oid: e.obj for oid, e in self._store.entries(self.__key, None)}

    def owner_clear(self) -> None:
        self._store.clear_clients(self.__key)

    def __len__(self) -> int:
        return len(self._store)


class _Running:
    __slots__ = ("_local", "_value", "_previous")

    def __init__(self, local: threading.local, value: tuple) -> None:
        self._local, self._value = local, value

    def __enter__(self) -> None:
        self._previous = getattr(self._local, "request", None)
        self._local.request = self._value

    def __exit__(self, *exc: Any) -> None:
        self._local.request = self._previous


class _NoDeputy:
    """The owner of every pointer a network client sends (in any argument, nested or stored).

    A pointer acts through its owner (``owner.send_msg``); this owner refuses, so a client's
    pointer can never make the worker act on another worker with the worker's own peer rights
    (the confused deputy), whatever op, worker function or protocol step it reaches. Its
    garbage collection never deletes anything there.
    """

    id = "(a network client's pointer)"

    def schedule_delete(self, location: Any, oid: int) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # anything a pointer would do through its owner
        raise PermissionDeniedError(
            "a pointer sent by a network client is a pointer to another worker: pointer chains are not "
            "followed on network workers (the worker would act there with its own peer rights, not "
            "yours); use a pointer to that worker directly")


#: see _NoDeputy (veil.workers.base.BaseWorker._make_pointer uses it for network sessions)
NO_DEPUTY = _NoDeputy()


def _leaves(value: Any) -> Iterator[Any]:
    """The non-container values of a wire argument (lists, tuples and dict values are walked)."""
    if type(value) in (list, tuple):
        for v in value:
            yield from _leaves(v)
    elif type(value) is dict:
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def _refs(value: Any) -> Iterator[m.ObjectRef]:
    return (v for v in _leaves(value) if type(v) is m.ObjectRef)
