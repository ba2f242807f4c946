"""Fixed precision and secret sharing of *remote* tensors (PySyft 0.2, Part 10).

``ptr.fix_precision()`` encodes on the worker that holds the values;
``.share(bob, alice, crypto_provider=james)`` then makes that worker split its
own encoded values into uniformly random shares and place them on the
parties, under ids the caller picked. The caller (the coordinator) only ever
holds pointers: ``.get()`` on the result gives a local FixedPrecisionTensor
whose child is an AdditiveSharingTensor of pointers, never a plaintext.

Release rule: sharing hands every share to the parties the caller names, so a
worker shares only what the requester could ``.get()`` itself (the same
check as ``.get()``/``.move()``); DP-only data is refused like any other op.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.compat.encoding_guards import check_room, encode_value_free, encoding_of, piecewise
from veil.governance import provenance
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST, NO_RESULT, register_worker_function
from veil.mpc.encoding import FixedPointEncoding, decode, encode, make_encoding
from veil.mpc.errors import NotEncodedError
from veil.tensors.pointer import PointerTensor
from veil.workers import output_bounds, owner_guard

ENCODE = "veil.compat.encode"
DECODE = "veil.compat.decode"
SHARE_OWN = "veil.compat.share_own"


def _encode(worker: Any, tensor: torch.Tensor, base: int, precision_fractional: int) -> torch.Tensor:
    encoding = encoding_of(base, precision_fractional)
    if not isinstance(tensor, torch.Tensor) or tensor.dtype.is_complex:
        raise NotEncodedError("fix_precision() needs a real tensor")
    check_room(worker, tensor.numel(), 8, ENCODE)
    # (a piece at a time: its temporaries are bounded, the result is what the quota sized)
    if worker.monitor.request_reads_owner_data():  # its success must not depend on the owner's values
        return piecewise(lambda piece: encode_value_free(piece, encoding), tensor.detach(), torch.int64)
    return piecewise(lambda piece: encode(piece, encoding), tensor.detach(), torch.int64)


def _decode(worker: Any, tensor: torch.Tensor, base: int, precision_fractional: int, dtype_name: str) -> torch.Tensor:
    from veil.messaging.serde import DTYPES

    encoding = encoding_of(base, precision_fractional)
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or dtype is None \
            or not dtype.is_floating_point:
        raise NotEncodedError("float_precision() needs int64 encoded values and a float dtype")
    check_room(worker, tensor.numel(), dtype.itemsize, DECODE)
    return piecewise(lambda piece: decode(piece, encoding, dtype), tensor, dtype)


def _share_own(worker: Any, oid: int, party_ids: list, share_ids: list) -> None:
    """Runs on the data's worker: splits its own int64 values among the parties."""
    from veil.mpc.ring import random_ring

    if (not isinstance(party_ids, list) or not isinstance(share_ids, list) or len(party_ids) != len(share_ids)
            or len(party_ids) < 2 or len(set(party_ids)) != len(party_ids)
            or not all(isinstance(p, str) for p in party_ids) or not all(type(i) is int for i in share_ids)):
        raise ValueError("share needs at least two distinct party ids and one new id per party")
    from veil.workers import review_gate
    from veil.workers.monitor import Purpose

    # The parties get what the requester could get: the monitor's release rules (private, DP-only,
    # capabilities) and the owner's review policy apply as to a .get().
    user = worker.requesting_user()
    principal = worker.principal(worker.requester()).acting_as(user)
    # (before the value's mark is read: an in-process worker runs this beside the owner's tightening to dp-only,
    # whose scan may list the values before the share kept here is stored: provenance.marked_if_tightened)
    count = provenance.tightening_count(worker)
    entry = worker.monitor.resolve(principal, oid, Purpose.REVEAL, "secret-shared by its worker (share_own)")
    owner_guard.check_dp_only(SHARE_OWN, [entry], worker.id)
    review_gate.release(worker, [oid], [entry], user, "share", consume=False)
    value = entry.obj
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64:
        raise NotEncodedError("only int64 (encoded) values can be secret-shared: call fix_precision() first")
    value = value.detach()
    # a piece per party is made here whole, whatever the value's storage (a stored expand view: its 8 bytes)
    output_bounds.check_view_room(worker.monitor, principal, SHARE_OWN, [value] * len(party_ids), {}, transient=True)
    destinations = [None if p == worker.id else worker.resolve_worker(p) for p in party_ids]  # all checks first
    if worker.id in party_ids:  # the share kept here is the session's: refused before any share is drawn
        check_room(worker, value.numel(), 8, SHARE_OWN)
    if provenance.marked_if_tightened(worker, count, entry):  # (dp-only since its check: refused, approval kept)
        owner_guard.check_dp_only(SHARE_OWN, [entry], worker.id)
    review_gate.release(worker, [oid], [entry], user, "share")  # (the approval used up once every check passed)
    pieces, last = [], value
    for _ in party_ids[:-1]:
        piece = random_ring(tuple(value.shape))  # os.urandom: uniform in Z/2^64
        pieces.append(piece)
        last = last - piece
    pieces.append(last)
    # the requester's own share here is stored as the command handler stores results (its namespace)
    for dest, sid, piece in zip(destinations, share_ids, pieces):
        if dest is None:
            stored = worker.monitor.store(principal, sid, piece, sources=[entry], op_name=SHARE_OWN)
            _stamp_share(worker, oid, entry, stored, piece, len(pieces))
            provenance.marked_if_tightened(worker, count, stored)  # (stored: any later tightening's scan sees it)
        else:
            provenance.marked_if_tightened(worker, count, entry)  # (its capabilities carry the mark)
            # the share carries the source's capabilities (reveal_to, provenance) like a moved object
            caps = worker.monitor.export_capabilities(
                principal, entry, f"then veil.compat.share_own on {worker.id!r}: one of {len(pieces)} shares of it "
                                  f"(the other parties: {', '.join(repr(p) for p in party_ids if p != dest.id)})")
            worker.send_msg(m.ObjectMessage([m.StoredObject(sid, piece, caps)]), dest)


def _stamp_share(worker: Any, oid: int, entry: Any, stored: Any, piece: torch.Tensor, parties: int) -> None:
    """Governance (#16): the share kept here is the value less the others' shares, which the requester may hold:
    its graph shows the value it was cut from (the command handler stamps only the results it stores)."""
    from veil.governance import provenance
    from veil.governance.state import tracking

    if tracking(worker):
        lineage = provenance.lineage_of(SHARE_OWN, (), {}, {oid: entry})
        if lineage is not None:
            lineage.node["args"] = f"\u00b7; the share kept here, of {parties}"
        provenance.stamp(stored, lineage, piece)


# encode and decode take a value the requester may not read (a serving client's, data under review): their outcome
# and their work depend on no value (one answer for any value, NaN and inf included; the result keeps its
# restriction), so that parameter is a secret one (oblivious.worker_function_refusal); the others stay public
register_worker_function(ENCODE, _encode, secret_parameters=("tensor",))
register_worker_function(DECODE, _decode, secret_parameters=("tensor",))
register_worker_function(SHARE_OWN, _share_own, shapes=NO_RESULT)


class SharedPointer:
    """What ``remote.share(...)`` returns: ``.get()`` gives the shared tensor (its shares stay remote)."""

    def __init__(self, shared: Any) -> None:
        self.child = shared

    def get(self) -> Any:
        return self.child

    def __repr__(self) -> str:
        return f"[SharedPointer -> {self.child!r}]"


def share_remote(ptr: PointerTensor, parties: tuple, crypto_provider: Any = None) -> Any:
    """Has ``ptr``'s worker share its own int64 values; returns the local AdditiveSharingTensor of pointers."""
    from veil.tensors.mpc_glue.remote_sharing import resolve_provider
    from veil.tensors.additive import AdditiveSharingTensor

    if ptr.dtype != torch.int64:
        raise NotEncodedError(f"cannot secret-share a remote {ptr.dtype} tensor: call ptr.fix_precision() first")
    if len(parties) < 2:
        raise ValueError(f"share() needs at least 2 parties, got {len(parties)}")
    if crypto_provider is None:
        from veil.compat.crypto_provider import default_crypto_provider

        crypto_provider = default_crypto_provider(parties)
    provider = resolve_provider(crypto_provider, parties)
    owner = ptr.owner
    share_ids = [new_id() for _ in parties]
    from veil.tensors import remote_ops

    remote_ops.call(ALLOWLIST.by_name(SHARE_OWN), (ptr.id_at_location, [p.id for p in parties], share_ids), {},
                    location=ptr.location)
    shares = {
        p.id: PointerTensor(p, sid, owner, tuple(ptr.shape), torch.int64) for p, sid in zip(parties, share_ids)
    }
    return AdditiveSharingTensor(shares, provider)


class RemoteFixedPrecision:
    """A pointer to encoded values (PySyft: a pointer to a FixedPrecisionTensor).

    Attributes:
        child: PointerTensor to the int64 encoded values on ``location``.
        encoding: the fixed-point encoding used.
        dtype: the float dtype the values decode to.
    """

    def __init__(self, child: PointerTensor, encoding: FixedPointEncoding, dtype: torch.dtype) -> None:
        self.child, self.encoding, self.dtype = child, encoding, dtype

    @property
    def location(self) -> Any:
        return self.child.location

    @property
    def shape(self) -> torch.Size:
        return self.child.shape

    def get(self) -> Any:
        from veil.tensors.fixed_precision import FixedPrecisionTensor

        return FixedPrecisionTensor(self.child.get(), self.encoding, self.dtype)

    def float_precision(self) -> PointerTensor:
        """Decodes on the worker: a pointer to the float values."""
        from veil.messaging.serde import DTYPE_NAMES
        from veil.tensors import remote_ops

        enc = self.encoding
        return remote_ops.call(ALLOWLIST.by_name(DECODE),
                               (self.child, enc.base, enc.precision_fractional, DTYPE_NAMES[self.dtype]), {})

    float_prec = float_precision

    def share(self, *parties: Any, crypto_provider: Any = None, **_ignored: Any) -> SharedPointer:
        from veil.tensors.fixed_precision import FixedPrecisionTensor

        shared = share_remote(self.child, parties, crypto_provider)
        return SharedPointer(FixedPrecisionTensor(shared, self.encoding, self.dtype))

    def _same(self, other: Any) -> PointerTensor:
        if not isinstance(other, RemoteFixedPrecision) or other.encoding != self.encoding:
            raise TypeError("combine remote fixed-precision values with the same encoding (fix_precision() both alike)")
        return other.child

    def __add__(self, other: Any) -> "RemoteFixedPrecision":
        return RemoteFixedPrecision(self.child + self._same(other), self.encoding, self.dtype)

    def __sub__(self, other: Any) -> "RemoteFixedPrecision":
        return RemoteFixedPrecision(self.child - self._same(other), self.encoding, self.dtype)

    def __repr__(self) -> str:
        enc = self.encoding
        return (f"[FixedPrecision base={enc.base} precision_fractional={enc.precision_fractional}]"
                f"\n\t-> {self.child!r}")


def fix_precision_remote(ptr: PointerTensor, precision_fractional: int | None = None, base: int = 2,
                         **_ignored: Any) -> RemoteFixedPrecision:
    """``ptr.fix_precision()``: the worker encodes its own values."""
    from veil.tensors import remote_ops

    if ptr.dtype.is_complex:
        raise NotEncodedError("fix_precision() needs a real tensor")
    encoding = make_encoding(precision_fractional, base)
    dtype = ptr.dtype if ptr.dtype.is_floating_point else torch.get_default_dtype()
    child = remote_ops.call(ALLOWLIST.by_name(ENCODE), (ptr, encoding.base, encoding.precision_fractional), {})
    return RemoteFixedPrecision(child, encoding, dtype)


def send_fixed_precision(fpt: Any, worker: Any, **kwargs: Any) -> RemoteFixedPrecision:
    """``x.fix_precision().send(w)``: the encoded values travel, the encoding stays with the pointer."""
    from veil.api import send

    if fpt.is_shared:
        raise TypeError("a shared FixedPrecisionTensor already lives on its parties; .get() it before sending")
    return RemoteFixedPrecision(send(fpt.child, worker, **kwargs), fpt.encoding, fpt.dtype)
