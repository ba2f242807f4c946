"""A worker's object store: objects by id, in one namespace per session, with their capabilities.

Only the worker's reference monitor (:mod:`veil.workers.monitor`) may call it:
every method takes the monitor's private :class:`StoreKey` first and refuses
anything else, so a handler that tries to read or write objects on its own
fails loudly instead of bypassing the owner's rules.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator

import torch

from veil.exceptions import PermissionDeniedError
from veil.workers.grad_charges import CHARGED
from veil.workers.held_beside import BesideCharges, parts_of

#: the namespace of the data owner's objects and of in-process workers (no sessions)
SHARED_NS = ""
#: ``Entry.meta`` key: bytes an object's op graph grew by when a command wrote it in place (governance), charged
#: to its session by the next :meth:`ObjectStore.charge_growth` that names it
OWED = "graph_owed"
#: ``Entry.meta`` key: the part of ``Entry.nbytes`` charged for its op graph (governance), beside its storage
GRAPH_CHARGED = "graph_nbytes"
_NO_OBJECTS = MappingProxyType({})  # a namespace that holds nothing yet (read-only)
#: on a tensor: it is (or was) some leaf's gradient (veil/messaging/allowlist.py marks those ``.grad`` gives and takes)
GRADIENT = "_veil_gradient"


class Kind:
    """What an object is, which decides how it may ever be revealed (``Entry.kind``)."""

    OWNER = "owner"  # loaded by the data owner (protected)
    CLIENT = "client"  # stored or computed by a client
    SHARE = "share"  # a party's share of a secret-shared value (output of a protocol step)
    DEALER = "dealer"  # correlated randomness (triples, truncation pairs, FSS keys, masks): never revealed

    ALL = ("owner", "client", "share", "dealer")


class _WeaklyReferable:
    __slots__ = ("__weakref__",)  # a dealt item refers to its fields' entries weakly (dealt.DealtItem)


@dataclass(slots=True)  # one per stored object, made on every command result
class Entry(_WeaklyReferable):
    """One stored object and its capabilities.

    Attributes:
        allowed_users: users who may ``.get()`` it (None: anyone who may name it).
        protected: the data owner's object: clients can never delete, replace or take it.
        created_by: the namespace (session id) it lives in.
        reveal_to: sessions or users it may be revealed to (None: no restriction beyond
            ``allowed_users``; ``()``: nobody).
        kind: one of :class:`Kind`.
        provenance: ids of the owner datasets (``worker.load`` ids) it derives from.
        nbytes: bytes charged to its session's quota.
    """

    obj: Any
    tags: tuple = ()
    description: str = ""
    allowed_users: tuple | None = None
    protected: bool = False
    created_by: str = ""
    meta: dict = field(default_factory=dict)
    reveal_to: tuple | None = None
    kind: str = Kind.CLIENT
    provenance: frozenset = frozenset()
    nbytes: int = 0
    grads_nbytes: int = 0  # the part of ``nbytes`` charged for its chain of gradients (charge_growth)
    beside: tuple | None = None  # what it keeps alive, charged once a session (held_beside.parts_of)
    shared: int = 0  # the bytes of its storage charged as another object's (ObjectStore.charged_already), not its


_GRADDED = (torch.Tensor, torch.nn.Parameter)  # (the types whose chain of gradients _grad_bytes walks)


def _grad_bytes(t: torch.Tensor, charged: Any = _NO_OBJECTS, stored: Any = _NO_OBJECTS) -> int:
    """Bytes of the storages down ``t``'s chain of gradients (each once, ``t``'s own not counted), but those
    charged already as they were made (``charged``: ids of the session's lingering charges,
    veil/workers/grad_charges.py) or as stored objects (``stored``: ids of the session's, ``x.grad = g``); each
    one counted is marked charged (its hook does not charge it again)."""
    storages, visited = {t.untyped_storage().data_ptr()}, {id(t)}
    total = 0
    while True:
        t = t.grad if type(t) in (torch.Tensor, torch.nn.Parameter) and (t.is_leaf or t.retains_grad) else None
        if t is None or id(t) in visited or t.layout is not torch.strided:  # (a.grad = b, b.grad = a: a cycle)
            return total
        visited.add(id(t))
        if id(t) in charged or id(t) in stored:
            continue
        setattr(t, CHARGED, True)
        storage = t.untyped_storage()
        if storage.data_ptr() not in storages:
            storages.add(storage.data_ptr())
            total += storage.nbytes()


class StoreKey:
    """The capability that opens an ObjectStore; only a ReferenceMonitor creates one."""

    __slots__ = ()


class ObjectStore:
    """(namespace, id) -> Entry. Ids never overwrite an existing object of the same namespace.

    Namespaces make other sessions' ids invisible: a session storing under an id
    another session uses gets no "already in use" answer (no existence oracle).
    Hand-off objects (stored by a peer worker for whoever names the id first) are
    indexed by id so the claimant can find them.
    """

    def __init__(self, worker_id: str, key: StoreKey) -> None:
        self.worker_id = worker_id
        self._key = key
        self._spaces: dict[str, dict[int, Entry]] = {SHARED_NS: {}}
        # id -> (namespace, requester account) of an unclaimed hand-off
        self._hand_offs: dict[int, tuple[str, str]] = {}
        self.usage: dict[str, int] = {}  # namespace -> bytes held
        #: (peer namespace, requester account) -> bytes of its unclaimed hand-offs (veil/workers/accounts.py)
        self.account_usage: dict[tuple[str, str], int] = {}
        #: ... -> how many (an account holding only empty objects still counts as one)
        self._account_objects: dict[tuple[str, str], int] = {}
        #: namespace -> {id of a deleted object something else still holds, or of a gradient ``backward`` made:
        #: the bytes it stays charged}; per namespace, so that a session's end drops its own at once (walking
        #: every session's, under the lock, cost each end as many steps as all sessions' live gradients)
        self._lingering: dict[str, dict[int, int]] = {}
        self._beside = BesideCharges()  # what stored objects keep alive beside them (a CKKS tensor's context)
        #: namespace -> {id of a tensor stored there: under how many ids}: one tensor is charged once, by its first
        #: id (a gradient, an in-place op's result stored under a new id; ``charged_already``)
        self._stored: dict[str, dict[int, int]] = {}
        # Writes are read-modify-write (usage, hand-offs): in-process workers may handle two
        # requests at once (a dealer's background thread next to the online phase).
        self._lock = threading.RLock()

    def _check(self, key: StoreKey) -> None:
        if key is not self._key:
            raise PermissionDeniedError(f"the object store of worker {self.worker_id!r} answers only its monitor")

    def __len__(self) -> int:
        with self._lock:
            return sum(len(s) for s in list(self._spaces.values()))

    # The hot methods (every command argument, result and deletion) test the key inline.

    def lookup(self, key: StoreKey, ns: str, oid: Any) -> Entry | None:
        if key is not self._key:
            self._check(key)
        space = self._spaces.get(ns)
        entry = space.get(oid) if space is not None else None
        if entry is None and ns != SHARED_NS:
            entry = self._spaces[SHARED_NS].get(oid)
        return entry

    def spaces(self, key: StoreKey, ns: str) -> tuple:
        """``(ns's objects, the shared objects)``, id -> Entry, for the monitor's hot lookups (it reads
        them, never writes: every change goes through put/claim/remove, under the lock). Read once per
        command: a namespace dropped meanwhile is a new dict the next time."""
        if key is not self._key:
            self._check(key)
        spaces = self._spaces
        return spaces.get(ns, _NO_OBJECTS), spaces[SHARED_NS]

    def has(self, key: StoreKey, ns: str, oid: int) -> bool:
        """Whether ``oid`` is taken in ``ns`` or among the shared (owner) objects."""
        if key is not self._key:
            self._check(key)
        space = self._spaces.get(ns)
        return (space is not None and oid in space) or oid in self._spaces[SHARED_NS]

    def locked(self, key: StoreKey) -> threading.RLock:
        """The store's lock, for the monitor's checks and :meth:`put` in one step (``with store.locked(key):``):
        two stores from threads outside the server's turn (peer hand-offs, worker functions, plan threads, Ray)
        both passed a quota check made before either put."""
        self._check(key)
        return self._lock

    def put(self, key: StoreKey, ns: str, oid: int, entry: Entry, hand_off: bool = False, account: str = "") -> None:
        """Stores ``entry`` under an id free in ``ns`` and among the shared objects (checked here, under the
        lock: a check made before it let two threads both store to one id, the second overwriting the first and
        its bytes charged twice); a ``hand_off`` waits for the first session that names ``oid``, charged
        meanwhile to the requester ``account`` its peer named (besides ``ns``'s usage)."""
        if key is not self._key:
            self._check(key)
        with self._lock:
            if self.has(key, ns, oid) or (hand_off and self._hand_offs.get(oid, (ns,))[0] != ns):
                # (taken, or another peer's hand-off not claimed yet: the monitor's text for a taken id)
                raise PermissionDeniedError(f"object id {oid} is already in use on worker {self.worker_id!r}")
            entry.created_by = entry.created_by or ns
            space = self._spaces.get(ns)
            if space is None:
                space = self._spaces[ns] = {}
            space[oid] = entry
            obj = entry.obj
            if ns != SHARED_NS and isinstance(obj, torch.Tensor):
                stored = self._stored.setdefault(ns, {})
                stored[id(obj)] = stored.get(id(obj), 0) + 1
            if (ns != SHARED_NS and type(obj) in _GRADDED and (obj.is_leaf or obj.retains_grad) and obj.grad is not None
                    and obj.layout is torch.strided):
                # a plan's result may come with a gradient (``backward(inputs=[result])``), which nothing charged
                grads = _grad_bytes(obj, self._lingering.get(ns, _NO_OBJECTS),
                                    self._stored.get(ns, _NO_OBJECTS)) - entry.grads_nbytes
                if grads > 0:
                    entry.grads_nbytes += grads
                    entry.nbytes += grads
            self.usage[ns] = self.usage.get(ns, 0) + entry.nbytes + self._beside_change(ns, entry, 1)
            if hand_off:
                acc = self._hand_offs[oid] = (ns, account)
                self.account_usage[acc] = self.account_usage.get(acc, 0) + entry.nbytes
                self._account_objects[acc] = self._account_objects.get(acc, 0) + 1

    def beside_bytes(self, key: StoreKey, ns: str, entry: Entry) -> int:
        """What storing ``entry`` in ``ns`` would charge beside its own bytes: the parts it keeps alive that
        ``ns`` is not charged yet (:mod:`veil.workers.held_beside`), for the quota's check before :meth:`put`."""
        self._check(key)
        with self._lock:
            return self._beside_change(ns, entry, 1, apply=False)

    def _beside_change(self, ns: str, entry: Entry, sign: int, apply: bool = True) -> int:
        if ns == SHARED_NS:  # (sessions are charged; the owner's and in-process objects are not)
            return 0
        if entry.beside is None:
            entry.beside = parts_of(entry.obj)
        return self._beside.change(ns, entry.beside, sign, apply)

    @contextmanager
    def all_or_none(self, key: StoreKey, ns: str, ids: list) -> Iterator[None]:
        """Stores a batch (one ObjectMessage) into ``ns`` whole or not at all: its ids are checked free and
        distinct before the first is stored, and a refusal part-way (the session's quota) removes what the
        batch stored before it. Under the lock: no other store or claim comes between. (A move's sender gives
        its approvals back when the destination refuses: it must then hold nothing of the batch.)"""
        self._check(key)
        with self._lock:
            seen: set = set()
            for oid in ids:
                if type(oid) is not int:  # (the monitor refuses it in one line)
                    continue
                if oid in seen or self.has(key, ns, oid):
                    raise PermissionDeniedError(f"object id {oid} is already in use on worker {self.worker_id!r}")
                seen.add(oid)
            try:
                yield
            except BaseException:
                for oid in seen:  # (each was free before the batch: whatever is there now, the batch put)
                    self.remove(key, ns, oid)
                raise

    def charge_growth(self, key: StoreKey, ns: str, found: dict, gradient: tuple | None = None) -> None:
        """``ns``'s tensors among ``found`` (id -> entry) whose storage now passes what they were charged:
        the difference is charged (``entry.nbytes`` stays at least its storage, so removal subtracts it).
        ``gradient``: (a gradient ``backward`` made, its bytes), charged to ``ns`` while it lives instead."""
        if key is not self._key:
            self._check(key)
        if gradient is not None:
            if id(gradient[0]) not in self._stored.get(ns, _NO_OBJECTS):  # (else its entry charges it: x.grad = g)
                self.linger(key, ns, gradient[1], gradient[0])
            return
        space = self._spaces.get(ns)
        if not space:
            return
        with self._lock:
            for oid, entry in found.items():
                owed = entry.meta.pop(OWED, 0) if entry.meta else 0  # (its op graph grew: governance)
                if owed and space.get(oid) is entry:
                    entry.nbytes += owed
                    self.usage[ns] = self.usage.get(ns, 0) + owed
                obj = entry.obj
                if isinstance(obj, torch.Tensor) and space.get(oid) is entry and obj.layout == torch.strided:
                    # (its op graph's charge, governance's meta[GRAPH_CHARGED], is no part of its storage's, nor
                    # its gradients')
                    grown = obj.untyped_storage().nbytes() - (entry.nbytes - entry.meta.get(GRAPH_CHARGED, 0)
                                                              - entry.grads_nbytes + entry.shared)
                    # its gradients, which a command may have made (backward) or grown (a plan's out= into
                    # x.grad): held as long as it is, uncharged they held any size beside a small tensor
                    grads = _grad_bytes(obj, self._lingering.get(ns, _NO_OBJECTS),
                                        self._stored.get(ns, _NO_OBJECTS)) - entry.grads_nbytes
                    if grads > 0:
                        entry.grads_nbytes += grads
                        grown = max(grown, 0) + grads
                    if grown > 0:
                        entry.nbytes += grown
                        self.usage[ns] = self.usage.get(ns, 0) + grown

    def _unaccount(self, oid: int, nbytes: int) -> None:
        """``oid`` is no longer an unclaimed hand-off: its requester account no longer holds it (lock held)."""
        acc = self._hand_offs.pop(oid, None)
        if acc is None:
            return
        objects = self._account_objects.get(acc, 0) - 1
        if objects > 0:
            self._account_objects[acc] = objects
            self.account_usage[acc] = self.account_usage.get(acc, 0) - nbytes
        else:
            self._account_objects.pop(acc, None)
            self.account_usage.pop(acc, None)

    # Counts, like ``usage``: read without the key (they open no object).

    def holds_account(self, ns: str, account: str) -> bool:
        """Whether requester ``account`` of peer namespace ``ns`` holds unclaimed hand-offs (empty ones too)."""
        return (ns, account) in self._account_objects

    def accounts(self, ns: str) -> int:
        """How many requester accounts hold unclaimed hand-offs in peer namespace ``ns``."""
        with self._lock:
            return sum(1 for acc in self._account_objects if acc[0] == ns)

    def claim(self, key: StoreKey, ns: str, oid: Any) -> Entry | None:
        """Moves an unclaimed hand-off ``oid`` into ``ns`` (the first session that names it)."""
        self._check(key)
        with self._lock:
            acc = self._hand_offs.get(oid) if type(oid) is int else None
            if acc is None or acc[0] == ns or self.has(key, ns, oid):  # (ns stored its own since it looked)
                return None
            src = acc[0]
            space = self._spaces.get(src, {})
            entry = space.pop(oid, None)
            if entry is None:
                self._unaccount(oid, 0)
                return None
            self._unaccount(oid, entry.nbytes)
            self._unstore(src, entry.obj)
            self.usage[src] = self.usage.get(src, 0) - entry.nbytes + self._beside_change(src, entry, -1)
            entry.created_by = ns
            self.put(key, ns, oid, entry)
            return entry

    def remove(self, key: StoreKey, ns: str, oid: int) -> Entry | None:
        if key is not self._key:
            self._check(key)
        with self._lock:
            space = self._spaces.get(ns)
            entry = space.pop(oid, None) if space is not None else None
            if entry is not None:
                self._unstore(ns, entry.obj)
                self.usage[ns] = self.usage.get(ns, 0) - entry.nbytes + self._beside_change(ns, entry, -1)
                acc = self._hand_offs.get(oid)
                if acc is not None and acc[0] == ns:  # (another peer's hand-off may use the same id)
                    self._unaccount(oid, entry.nbytes)
            return entry

    def _unstore(self, ns: str, obj: Any) -> None:
        """One id of ``ns`` no longer names ``obj`` (lock held)."""
        stored = self._stored.get(ns)
        if stored is not None and isinstance(obj, torch.Tensor):
            left = stored.pop(id(obj), 0) - 1
            if left > 0:
                stored[id(obj)] = left

    def charged_already(self, key: StoreKey, ns: str, obj: Any) -> bool:
        """Whether ``ns`` is charged ``obj`` already, for as long as it lives or as one of its ids names it (a
        gradient ``backward`` made, a tensor stored under another id): a new id of it is charged its entry only."""
        self._check(key)
        return isinstance(obj, torch.Tensor) and (id(obj) in self._stored.get(ns, _NO_OBJECTS)
                                                  or id(obj) in self._lingering.get(ns, _NO_OBJECTS))

    def named(self, key: StoreKey, ns: str, obj: Any) -> bool:
        """Whether an id of ``ns`` still names ``obj``."""
        self._check(key)
        return id(obj) in self._stored.get(ns, _NO_OBJECTS)

    def entries(self, key: StoreKey, ns: str | None) -> Iterator[tuple[int, Entry]]:
        """The entries of ``ns`` plus the shared ones (every entry when ``ns`` is None)."""
        self._check(key)
        with self._lock:  # a snapshot: another thread may store meanwhile
            if ns is None:
                return iter([(oid, e) for space in list(self._spaces.values()) for oid, e in space.items()])
            out = list(self._spaces[SHARED_NS].items())
            if ns != SHARED_NS:
                out += list(self._spaces.get(ns, {}).items())
            return iter(out)

    def linger(self, key: StoreKey, ns: str, nbytes: int, obj: Any) -> None:
        """Keeps charging ``ns`` the ``nbytes`` of an object it deleted while something else still holds it
        (an autograd graph saved it, another id names the same object), until it is freed. Once per object:
        deleting more names of one object (an in-place op's result stored under a new id) adds nothing, but what
        the largest of their charges passes the one lingering (its first id, deleted after a later one)."""
        self._check(key)
        at = (ns, id(obj))  # (an id is unique while the object lives, and the entry goes when it dies)
        with self._lock:
            held = self._lingering.get(ns)
            if held is not None and at[1] in held:
                more = nbytes - held[at[1]]
                if more > 0:
                    held[at[1]] = nbytes
                    self.usage[ns] = self.usage.get(ns, 0) + more
                return
            if ns not in self._spaces:  # (the session ended meanwhile)
                return
            if held is None:
                held = self._lingering[ns] = {}
            held[at[1]] = nbytes
            self.usage[ns] = self.usage.get(ns, 0) + nbytes
        weakref.finalize(obj, self._unlinger, at)

    def _unlinger(self, at: tuple[str, int]) -> None:
        with self._lock:
            held = self._lingering.get(at[0])
            nbytes = held.pop(at[1], 0) if held is not None else 0
            if at[0] in self.usage:
                self.usage[at[0]] -= nbytes

    def drop_namespace(self, key: StoreKey, ns: str) -> int:
        """Frees every object of ``ns`` (a disconnected session); returns how many."""
        self._check(key)
        with self._lock:
            if ns == SHARED_NS:
                return 0
            space = self._spaces.pop(ns, {})
            self.usage.pop(ns, None)
            self._lingering.pop(ns, None)
            self._stored.pop(ns, None)
            self._beside.drop(ns)
            for oid in space:
                acc = self._hand_offs.get(oid)
                if acc is not None and acc[0] == ns:
                    del self._hand_offs[oid]
            for acc in [acc for acc in self._account_objects if acc[0] == ns]:
                del self._account_objects[acc]
                self.account_usage.pop(acc, None)
            return len(space)

    def drop_account(self, key: StoreKey, ns: str, account: str) -> int:
        """Frees the unclaimed hand-offs a peer (namespace ``ns``) stored for requester ``account``, which
        ended at that peer; returns how many. Claimed ones live in their claimant's namespace already."""
        self._check(key)
        with self._lock:
            mine = [oid for oid, acc in self._hand_offs.items() if acc == (ns, account)]
            for oid in mine:
                self.remove(key, ns, oid)
            self.account_usage.pop((ns, account), None)
            self._account_objects.pop((ns, account), None)
            return len(mine)

    def clear_clients(self, key: StoreKey) -> None:
        """Frees every client object (owner-protected data stays)."""
        self._check(key)
        with self._lock:
            shared = self._spaces[SHARED_NS]
            for oid in [oid for oid, e in shared.items() if not e.protected]:
                self.remove(key, SHARED_NS, oid)
            for ns in [ns for ns in self._spaces if ns != SHARED_NS]:
                self.drop_namespace(key, ns)
