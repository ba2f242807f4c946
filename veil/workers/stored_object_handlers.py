"""The worker's built-in handlers of requests about objects already stored: get, delete, search, list, move,
remote_get.

Each takes ``(worker, message, sender)`` and reaches stored objects only through the worker's reference monitor;
what leaves the worker (get, move) passes the owner's review (``review_gate.py``). Commands and ObjectMessage,
which store objects, are ``handlers.py``'s.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.exceptions import ObjectNotFoundError, SerializationError
from veil.messaging import messages as m
from veil.workers import handlers as _handlers, listing, output_bounds, review_gate
from veil.workers.base import STORABLE_TYPES, BaseWorker, moving_to_peer, register_handler
from veil.workers.get_ids import resolve_each
from veil.workers.leaving_rows import moving, on_record_before_leaving
from veil.workers.monitor import Purpose
from veil.workers.store import Entry

_PLAIN_TENSOR = torch.Tensor


def _claimed_user(msg: Any, sender: str) -> str:
    return msg.user if isinstance(msg.user, str) and msg.user else sender


@register_handler(m.GetObjectsMessage)
def _handle_get(worker: BaseWorker, msg: m.GetObjectsMessage, sender: str) -> Any:
    from veil.tensors.pointer import PointerTensor, PointerWire

    if not isinstance(msg.ids, list):
        raise SerializationError("GetObjectsMessage.ids must be a list")
    principal = worker.principal(sender).acting_as(_claimed_user(msg, sender))
    entries = resolve_each(worker.monitor, principal, msg.ids, Purpose.REVEAL)  # (its deadline: get_ids.py)
    output_bounds.check_view_room(worker.monitor, principal, "get", [e.obj for e in entries], {}, transient=True)
    review_gate.release(worker, msg.ids, entries, principal.user, "get")
    out = []
    for oid, entry in zip(msg.ids, entries):
        obj = entry.obj
        taken = msg.delete and not entry.protected
        if isinstance(obj, PointerTensor):
            # the requester takes over the remote object only when we let go of it
            out.append(PointerWire.of(obj, garbage_collect_data=taken and obj.garbage_collect_data))
            if taken:
                obj.garbage_collect_data = False
        else:
            out.append(_released(oid, entry))
        if taken:  # (only the entry released: its release left the turn, and the id may name a new one now)
            worker.monitor.discard(principal, oid, only=entry)
    return m.ObjectsReply(out)


def _released(oid: int, entry: Entry) -> Any:
    """What a get/move lets out: a float derived from owner data with canonical NaNs and zeros (no hidden bits
    past the owner's review: veil/governance/canonical.py); anything else as stored."""
    obj = entry.obj
    if type(obj) is _PLAIN_TENSOR and not entry.provenance and not entry.protected:
        return obj  # (the scientist's own tensor: no import, no pass over it)
    from veil.governance.canonical import released

    return released(oid, entry)


@register_handler(m.DeleteMessage)
def _handle_delete(worker: BaseWorker, msg: m.DeleteMessage, sender: str) -> Any:
    if not isinstance(msg.ids, list):
        raise SerializationError("DeleteMessage.ids must be a list")
    principal = worker.principal(sender)
    for oid in msg.ids:
        worker.monitor.discard(principal, oid)
    return m.OkReply()


def _describe_entry(oid: int, entry: Entry, hide_counts: bool) -> m.Descriptor:
    from veil.messaging.serde import DTYPE_NAMES

    t = entry.obj
    shape = tuple(t.shape)
    if hide_counts and entry.meta.get("dp_only") and shape:
        # (only DP-only data refuses every computation: another tensor's count would show in a result's shape)
        shape = (0, *shape[1:])  # record count kept private (enable_dp(hide_count=True)): reported as 0
    return m.Descriptor(oid, shape, DTYPE_NAMES[t.dtype], bool(t.requires_grad), entry.tags, entry.description)


@register_handler(m.SearchMessage)
def _handle_search(worker: BaseWorker, msg: m.SearchMessage, sender: str) -> Any:
    from veil.compat.search_terms import checked_terms, search_page  # (PySyft's terms: tags, ids, descriptions)

    terms, principal = checked_terms(msg.query), worker.principal(sender)  # (bounded, as a page's matching work)
    hide, owned = worker.monitor.hide_dp_counts, worker.monitor.owned_entries(principal, msg.after, lambda e: (
        listing.pointable(e.obj) or e.created_by == principal.session))  # (never a cursor: an undescribed other's)
    return m.DescriptorsReply(*search_page(owned, terms, lambda oid, e: listing.pointable(e.obj),
                                           lambda oid, e: _describe_entry(oid, e, hide)))


@register_handler(m.ListObjectsMessage)
def _handle_list(worker: BaseWorker, msg: m.ListObjectsMessage, sender: str) -> Any:
    # Only the sender's own objects: listing others' ids would hand out capabilities.
    principal, hide = worker.principal(sender), worker.monitor.hide_dp_counts
    mine = worker.monitor.owned_entries(principal, msg.after, lambda e: e.created_by == principal.session)
    return m.DescriptorsReply(*listing.page(mine, lambda oid, e: listing.pointable(e.obj),  # (as search:
        # tensors only; a stored plan has no shape, and describing it failed every later listing of the session)
        lambda oid, e: _describe_entry(oid, e, hide)))  # (a page never walks, nor names, another's object)


@register_handler(m.MoveMessage)
def _handle_move(worker: BaseWorker, msg: m.MoveMessage, sender: str) -> Any:
    if not isinstance(msg.ids, list) or not isinstance(msg.new_ids, list) or len(msg.ids) != len(msg.new_ids):
        raise SerializationError("MoveMessage needs lists of ids and new ids of equal length")
    principal = worker.principal(sender).acting_as(_claimed_user(msg, sender))
    detail = f"to {msg.destination}" if isinstance(msg.destination, str) else ""
    entries = resolve_each(worker.monitor, principal, msg.ids, Purpose.MOVE, detail)
    for oid, entry in zip(msg.ids, entries):
        if not isinstance(entry.obj, tuple(STORABLE_TYPES)):
            raise SerializationError(f"object {oid} cannot be moved")
    output_bounds.check_view_room(worker.monitor, principal, "move", [e.obj for e in entries], {}, transient=True)
    review_gate.release(worker, msg.ids, entries, principal.user, "move", consume=False)
    destination = worker.resolve_worker(msg.destination)  # (after the refusals: reachability tells a refused none)
    with moving(worker, entries):
        on_record_before_leaving(worker)  # its allowed rows, off the turn; then capabilities travel, never wider
        objects = [worker.monitor.outgoing(principal, new, e) for new, e in zip(msg.new_ids, entries)]
        for so, oid, entry in zip(objects, msg.ids, entries):
            so.obj = _released(oid, entry)
        with review_gate.releasing(worker, msg.ids, entries, principal.user, "move"), moving_to_peer():
            worker.send_msg(m.ObjectMessage(objects), destination)  # (CKKS tensors with their contexts)
    for oid, entry in zip(msg.ids, entries):  # owner-protected data is copied, never taken; the entry moved only
        worker.monitor.discard(principal, oid, only=entry)
    return m.OkReply()


@register_handler(m.RemoteGetMessage)
def _handle_remote_get(worker: BaseWorker, msg: m.RemoteGetMessage, sender: str) -> Any:
    from veil.tensors.pointer import PointerTensor

    principal = worker.principal(sender)
    entry = worker.monitor.resolve(principal, msg.id, Purpose.HAND_OFF)
    if not isinstance(entry.obj, PointerTensor):
        raise ObjectNotFoundError(f"object {msg.id} on worker {worker.id!r} is not a pointer; nothing to remote_get")
    if principal.isolated:
        _handlers._refuse_deputy(worker, principal, msg.id, "remote_get")
    worker.monitor.replace(principal, msg.id, entry.obj.get())
    return m.OkReply()
