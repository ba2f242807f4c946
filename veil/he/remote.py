"""Encrypted tensors on workers: wire type, storage, and pointers to ciphertexts.

A worker can hold and compute on ciphertexts it cannot decrypt: ``enc.send(w)``
stores the ciphertext (and, for CKKS, the *public* context first, in the same
message); the returned :class:`HEPointer` supports the scheme's operations,
each one allowlisted worker function call; ``.get()`` brings the ciphertext
back to its owner, who decrypts it locally.

A result computed with the data owner's data carries its op graph (what the
owner reviews) and nothing beyond its plaintext that the worker can help: a
Paillier product with the owner's plaintext is re-randomized, and a CKKS
``sum``/``dot``/``mm`` keeps only its result slots, flooded (one more level), and only their real parts with
the context's conjugation key (any with Galois keys: a complex ``x + i*y`` gave a second dot with ``y``); a
reduction on the owner's data under a context without it is refused (one-value segments need no rotation key).
Its plaintext is another matter: the requester chose the encrypted operand,
so ``dot(x, w)`` with ``x = (1, 2**64, ...)`` packs every ``w_i`` into it.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import phe
import tenseal as ts
import torch

from veil.exceptions import RemoteExecutionError, SerializationError
from veil.he import _paillier_encoding as enc
from veil.he import ckks_wire, conjugation, context_memory, context_scope, value_free, wire
from veil.he.ckks import CKKSContext, CKKSTensor, _tenseal_errors as he_errors
from veil.he.errors import CiphertextRefusedError, ConjugationKeyRequiredError, DepthRequiredError, HEError
from veil.he.paillier import PaillierTensor, checkpoints, value_free_encoding
from veil.ids import new_id
from veil.messaging import serde
from veil.messaging.allowlist import ALLOWLIST, register_worker_function
from veil.messaging.messages import ObjectMessage, ObjectRef, StoredObject
from veil.shapes import broadcast_shape
from veil.tensors import remote_ops
from veil.tensors.handle import RemoteHandle
from veil.workers import base, cancellation
from veil.workers.held_beside import register_held_beside
from veil.workers.monitor import register_size_estimator

HE_EXT = 30
HE_TYPES = (PaillierTensor, CKKSTensor, CKKSContext, phe.PaillierPublicKey)


def _decode(data: bytes, ctx: serde.DecodeContext) -> Any:
    session = ctx.session() if ctx.session is not None else None  # (whose CKKS contexts it may load under)
    try:
        with context_scope.decoding_for(session):
            obj = wire.decode(serde.decode_value(data, ctx))
    except HEError as e:
        raise serde.SerializationError(f"invalid encrypted object: {e}") from e
    if isinstance(obj, CKKSContext):  # (a held context of the same keys is shared: its first size stays, not
        obj.__dict__.setdefault(_WIRE_NBYTES, len(data))  # what another session's padded message took)
    elif isinstance(obj, (CKKSTensor, PaillierTensor)):
        # what it took on the wire: the quota's measure (below); a context a moved tensor carried is charged apart
        obj.__dict__[_WIRE_NBYTES] = len(data) - obj.__dict__.pop(ckks_wire.CARRIED_NBYTES, 0)
    return obj


serde.register_ext(HE_EXT, HE_TYPES, lambda obj: serde.encode_value(wire.encode(obj)), _decode)
base.STORABLE_TYPES.extend([PaillierTensor, CKKSTensor, CKKSContext])

# ---------------------------------------------------------------- quota (--max-session-mb)
# Ciphertexts are large (a CKKS vector ~0.3 MB, a public context with Galois keys tens of MB): each
# stored HE object is charged what it took on the wire, or an estimate for results computed here; a CKKS
# context what SEAL holds for it.
_WIRE_NBYTES = "_veil_wire_nbytes"
_SEGMENT_NBYTES = "_veil_segment_nbytes"


def _ckks_segment_nbytes(ctx: CKKSContext, segment: Any) -> int:
    """Serialized size of one fresh CKKS ciphertext under ``ctx`` (measured once per context)."""
    size = ctx.__dict__.get(_SEGMENT_NBYTES)
    if size is None:
        size = ctx.__dict__[_SEGMENT_NBYTES] = len(segment.serialize())
    return size


def _ckks_nbytes(t: CKKSTensor) -> int:
    known = t.__dict__.get(_WIRE_NBYTES)
    if known is not None:
        return known
    return sum(_ckks_segment_nbytes(t.context, s) for s in t.segments)


def ciphertext_bytes(n_bits: int) -> int:
    """What one Paillier ciphertext under an ``n_bits`` modulus holds in memory: its value (< n^2) in whole 64-bit
    limbs and one spare (a reduction's result keeps one more: a 2047-bit modulus's held 568 bytes, charged 567),
    gmpy2's object header (40 bytes) and its slot in the tensor's array (measured: 120 bytes at 256 bits)."""
    return 8 * (-(-2 * n_bits // 64) + 1) + 48


def _paillier_nbytes(t: PaillierTensor) -> int:
    held = max(1, t.shape.numel()) * ciphertext_bytes(t.public_key.n.bit_length())
    # (a received one: what it took on the wire, unless it holds more; a 256-bit ciphertext is 64 bytes there)
    return max(held, t.__dict__.get(_WIRE_NBYTES) or 0)


def _context_nbytes(ctx: CKKSContext) -> int:
    """What SEAL holds for the context (its keys inflated and its tables: several times its wire size,
    :mod:`veil.he.context_memory`), or its wire size if more."""
    return max(context_memory.held_bytes(ctx), ctx.__dict__.get(_WIRE_NBYTES) or 0)


register_size_estimator(CKKSTensor, _ckks_nbytes)
register_size_estimator(PaillierTensor, _paillier_nbytes)
register_size_estimator(CKKSContext, _context_nbytes)
_HELD_NBYTES = "_veil_held_nbytes"


def _context_held(ctx: CKKSContext) -> tuple:
    """``ctx`` as what a stored ciphertext of it (or the context's own entry) keeps alive: charged once to a
    session holding any (:mod:`veil.workers.held_beside`; an empty tensor naming a context of 277 MB was 1 kB).
    Its size cached (11 ms at ring 8192 with Galois keys, at every result stored), made again if its keys
    changed (a conjugation key added). Not a context holding its secret key: its key owner's, in this process
    (in-process simulation), which no session's message makes (a received one is made public)."""
    if ctx.has_secret_key:
        return ()
    state = (conjugation._KEY_BYTES in ctx.__dict__, ctx.raw.has_galois_keys(), ctx.raw.has_relin_keys())
    known = ctx.__dict__.get(_HELD_NBYTES)
    if known is None or known[0] != state:
        known = ctx.__dict__[_HELD_NBYTES] = (state, _context_nbytes(ctx))
    return ((ctx, known[1]),)


register_held_beside(CKKSContext, _context_held)
register_held_beside(CKKSTensor, lambda t: _context_held(t.context))

#: what an HEPointer may ask a worker to do with ciphertexts (by name, never getattr on a string)
_OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "rsub": lambda a, b: b - a,
    "mul": lambda a, b: a * b,
    "neg": lambda a, b: -a,
    "sum": lambda a, b: a.sum(),
    "dot": lambda a, b: a.dot(b),
    "mm": lambda a, b: a.mm(b),
}


#: the most a Paillier operation may lower an exponent by (base-16 digits): lowering by k raises every
#: ciphertext to 16^k, so a hostile pair of exponents (+-2048 under a 16384-bit modulus) held the worker for
#: seconds per element; real tensors differ by tens
MAX_EXPONENT_SHIFT = 64

#: the most one Paillier op may build, session quota or not: ciphertexts and, while it runs, a
#: (ciphertext, plaintext) pair of ~128 bytes each (a (1, N) ciphertext times an (M, 1) plaintext makes N*M of
#: both before its first deadline check; 2400 x 2400 under a 256-bit key was ~1 GB from a 160 kB request)
MAX_OP_BYTES = 2**30
_PAIR_BYTES = 128
#: a value-free product's correction cache (``_oblivious_power.powers``): three new ciphertext-sized values per
#: distinct ciphertext, besides this for their tuple, its key and its dict slot
_CORRECTION_ENTRY_BYTES = 256


def _he_op(worker: Any, name: str, a: Any, b: Any, out_id: int) -> None:
    op = _OPS.get(name)
    if op is None:
        raise RemoteExecutionError(f"encrypted operation {name!r} is not supported")
    if not isinstance(a, (PaillierTensor, CKKSTensor)):
        raise RemoteExecutionError(f"{name}: left operand is not a ciphertext")
    owner_data = worker.monitor.request_reads_owner_data()
    if isinstance(a, CKKSTensor):
        _check_depth(name, a, owner_data)
        _check_conjugation(name, a, owner_data)
    value_free = isinstance(b, torch.Tensor) and owner_data
    given = b  # (the operand as stored: its lineage; what the op encodes may be a clamped copy)
    if isinstance(a, PaillierTensor):
        b = _paillier_operand(worker, name, a, b, value_free)
    elif value_free:
        b = _ckks_plaintext(name, a, b)
    cancellation.checkpoint()  # (the deadline, and a disconnect, before the work)
    try:
        with value_free_encoding() if value_free else contextlib.nullcontext(), checkpoints(cancellation.checkpoint):
            ckks_product = value_free and isinstance(a, CKKSTensor) and name in _PRODUCTS
            result = op(_rerandomized(a) if ckks_product else a, b)
            if ckks_product:
                _check_product_scale(name, result, a)
                result = _at_product_level(result, a)
            if owner_data:
                result = _releasable(name, result, value_free)
    except HEError as e:
        raise RemoteExecutionError(f"encrypted {name} refused: {type(e).__name__}: {e}") from e
    stored = worker.monitor.store_output(out_id, result)
    if owner_data:
        _record_lineage(worker, name, a, given, result, stored)


#: reductions whose CKKS result keeps, in its other slots, partial sums of what it reduced
_REDUCTIONS = frozenset({"sum", "dot", "mm"})
#: ops that raise a Paillier ciphertext to the plaintext operand: ``c**w`` keeps ``w`` in its randomness (``r**w``)
_PRODUCTS = frozenset({"mul", "dot", "mm"})


def _check_depth(name: str, a: CKKSTensor, owner_data: bool) -> None:
    """Refuses, before any work, a CKKS op its ciphertext has too few levels left for (a product takes one, and
    sealing a reduction computed on the owner's data another), naming the context that has them. Value-free:
    the levels follow from the ops that made the ciphertext."""
    sealing = owner_data and name in _REDUCTIONS
    needed = (1 if name in _PRODUCTS else 0) + (1 if sealing else 0)
    left = a.levels_left()
    if left >= needed:
        return
    used = a.context.raw.seal_context().data.key_context_data().chain_index() - 1 - left
    why = " and ".join((["its product"] if name in _PRODUCTS else []) +
                       (["sealing a result computed on the owner's data"] if sealing else []))
    raise DepthRequiredError(
        f"encrypted {name} needs {needed} multiplicative level(s) ({why}) and this ciphertext has {left} left; "
        f"encrypt under a context with {used + needed}: veil.he.ckks.context(depth={used + needed})")


def _check_conjugation(name: str, a: CKKSTensor, owner_data: bool) -> None:
    """Refuses, before any work, a CKKS reduction on the owner's data whose context has no conjugation key: its
    sealing could not keep the real parts, and one-value segments (a sum of products, no rotation key needed)
    of ``x + i*y`` gave ``y . w`` in the released number's imaginary part, a second answer. Metadata only."""
    if owner_data and name in _REDUCTIONS and conjugation.keys(a.context) is None:
        raise ConjugationKeyRequiredError(
            f"encrypted {name} on the owner's data needs the conjugation key in the ciphertext's context (its "
            "imaginary parts would be a second answer): a context with Galois keys, or "
            "veil.he.conjugation.add_conjugation_key(ctx) before sending")


def _ckks_levels(segment: Any) -> int:
    return segment.ciphertext()[0].coeff_modulus_size() - 1


def _rerandomized(a: CKKSTensor) -> CKKSTensor:
    """``a`` with a fresh encryption of zero added to each segment: randomness the requester does not know, at no
    level. The requester holds the secret key, so it can craft its ciphertext's randomness: two segments alike, or
    two products of one ciphertext, made the sum (``mm`` of a row [s, s]) or difference of products with the
    owner's values transparent, a failure exactly when those values cancelled (w[0] == -w[1], w[0] == w[1])."""
    with he_errors("encrypted product"):
        return a._like([s.add(ts.ckks_vector(a.context.raw, [0.0] * s.size())) for s in a.segments])


def _check_product_scale(name: str, result: CKKSTensor, a: CKKSTensor) -> None:
    """Refuses a product with the owner's plaintext that TenSEAL encoded at a scale other than the context's: it
    encodes at the vector's stored scale (not in the ciphertext SEAL reads) and rescales the product back to it,
    so a stored 2**55 put 15 more bits of each owner value in the result. Metadata only: any segment refuses,
    whatever the values (the wire refuses such a vector first; this holds for any other way in)."""
    scale = a.context.global_scale
    if any(seg.ciphertext()[0].scale != scale for seg in result.segments):
        raise CiphertextRefusedError(f"encrypted {name}: a ciphertext is stored at a scale other than its "
                                     f"context's ({scale:g}); encrypt it under the context unchanged")


def _at_product_level(result: CKKSTensor, a: CKKSTensor) -> CKKSTensor:
    """A CKKS product with the owner's plaintext, every segment at the level a product of ``a`` has (one below
    ``a``'s lowest). TenSEAL replaces a product that comes out transparent (a plaintext encoding to zeros: the
    owner's values all 0, or all below ~2**-41) by a fresh encryption of zero at the top level, so the result's
    levels left, and with them DepthRequiredError or the clamp probe of the next op, said whether the owner's
    values were zero. Adding and subtracting an encryption of zero at the product's level brings each segment
    down to it (the same work whatever the values)."""
    level = min(_ckks_levels(s) for s in a.segments) - 1
    refs: dict[int, Any] = {}
    out = []
    with he_errors("encrypted product"):
        for seg in result.segments:
            ref = refs.get(seg.size())
            if ref is None:
                ref = ts.ckks_vector(result.context.raw, [0.0] * seg.size())
                while _ckks_levels(ref) > level:  # (a fresh zero, multiplied by 1 down to the product's level)
                    ref = ref.mul(1.0)
                refs[seg.size()] = ref
            out.append(seg.add(ref).sub(ref))
    return result._like(out)


def _releasable(name: str, result: Any, owner_plaintext: bool) -> Any:
    """A result computed with the owner's data, as it may leave once approved: a Paillier product with the owner's
    plaintext re-randomized (other ops leave the randomness the requester chose, or one already fresh), a CKKS
    reduction with its other slots zeroed and its noise flooded (:meth:`CKKSTensor.sealed`; one level)."""
    if isinstance(result, PaillierTensor):
        return result.obfuscate() if owner_plaintext and name in _PRODUCTS else result
    return result.sealed() if name in _REDUCTIONS else result


def key_fingerprint(t: PaillierTensor | CKKSTensor) -> str:
    """A short public name of the key a ciphertext is under (the same for every ciphertext of that key)."""
    if isinstance(t, CKKSTensor):
        return f"CKKS key {t.context.key_id.hex()[:12]}"
    return f"Paillier key {hashlib.sha256(str(int(t.public_key.n)).encode()).hexdigest()[:12]}"


def _plain_text(value: Any) -> str:
    """A plaintext operand the scientist sent with the command, as the owner's graph shows it."""
    text = f"tensor{list(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def worker_output_lineage(worker: Any, op_name: str, operands: list, stored: Any) -> tuple[Any, dict, bool]:
    """Governance (#16): the lineage of a result a worker function stored itself (``store_output``: the command
    handler stamps only the results it stores), as ``(lineage or None, its input entries, whether datasets were
    named from provenance)``. Its inputs are found by identity; the owner's own tensor reaches a worker function
    as a copy, so a source dataset no input accounts for is named from the result's provenance."""
    from veil.governance import provenance
    from veil.governance.state import tracking

    if not stored.provenance or not tracking(worker):
        return None, {}, False
    by_object, datasets = {}, {}
    for oid, entry in worker.monitor.owner_entries():
        if any(entry.obj is x for x in operands):
            by_object[id(entry.obj)] = (oid, entry)
        elif entry.protected and oid in stored.provenance:
            datasets[oid] = entry
    entries = dict(by_object[id(x)] for x in operands if id(x) in by_object)
    covered = frozenset().union(*(provenance.sources_of(oid, e) for oid, e in entries.items()))
    copied = {oid: e for oid, e in datasets.items() if oid not in covered} if any(
        isinstance(x, torch.Tensor) and id(x) not in by_object for x in operands) else {}
    entries.update(copied)
    return provenance.lineage_of(op_name, (), {}, entries), entries, bool(copied)


def _record_lineage(worker: Any, name: str, a: Any, b: Any, result: Any, stored: Any) -> None:
    """Governance (#16): the op graph the owner reviews before ``result`` leaves."""
    from veil.governance import provenance

    lineage, entries, copied = worker_output_lineage(worker, "veil.he.op", [a] if b is None else [a, b], stored)
    if lineage is None:
        return
    for oid, entry in entries.items():  # a ciphertext input's node: its shape (a tensor's is read from it)
        nid = f"in-{oid:x}"
        if nid in lineage.graph and not isinstance(entry.obj, torch.Tensor):
            lineage.graph[nid] = dict(lineage.graph[nid], shape=list(entry.obj.shape),
                                      label="scientist's ciphertext (not derived from owner data)")
    b_is_input = b is not None and (any(e.obj is b for e in entries.values()) or copied)
    operands = ["\u00b7"] + (["\u00b7"] if b_is_input else [] if b is None else [_plain_text(b)])
    shapes = " and ".join(str(list(x.shape)) for x in (a, b) if hasattr(x, "shape"))
    lineage.node["args"] = f"{name}({', '.join(operands)}) under {key_fingerprint(a)}"
    lineage.node["label"] = f"encrypted {name} of {shapes} under {key_fingerprint(a)}"
    provenance.stamp(stored, lineage, result)
    root = stored.meta[provenance.GRAPH][stored.meta[provenance.ROOT]]
    root["shape"] = list(result.shape)


def _paillier_operand(worker: Any, name: str, a: PaillierTensor, b: Any, value_free: bool) -> Any:
    """Checks a Paillier op before it runs: the exponents it would bridge, the room its result needs under a
    session quota, and, for a plaintext computed from the owner's data, encoding that no value can fail
    (success or ``EncodingOverflowError`` was a threshold oracle on data under review, with a key the
    requester chose). Returns the plaintext operand to use."""
    # (neg and sum, b None, bridge no exponents: theirs is the tensor's own, whatever it is)
    exponents = [a.exponent] + ([b.exponent] if isinstance(b, PaillierTensor) else
                                [] if b is None else [0, enc.DEFAULT_FLOAT_EXPONENT])
    if max(exponents) - min(exponents) > MAX_EXPONENT_SHIFT:
        raise RemoteExecutionError(f"encrypted {name} refused: exponents {a.exponent} and "
                                   f"{getattr(b, 'exponent', 'of a plaintext')} are more than "
                                   f"{MAX_EXPONENT_SHIFT} base-16 digits apart")
    if isinstance(b, PaillierTensor) or b is None:
        other = b.shape if isinstance(b, PaillierTensor) else ()
    else:
        b = enc.as_tensor(b)
        other = b.shape
    count = max(1, a.shape.numel())  # ciphertexts the op makes: neg, sum, dot (its products)
    if name == "mm" and a.ndim:
        # each row times each column (its products), then summed: an empty inner dimension makes no products
        # but still a result of rows x columns (each an empty sum), which counting a's numel called nothing
        rows, inner, cols = a.shape[:-1].numel(), a.shape[-1], other[-1] if len(other) == 2 else 1
        count = max(1, rows * max(1, inner) * cols)
    elif name in ("add", "sub", "rsub", "mul"):
        try:
            count = broadcast_shape(tuple(a.shape), tuple(other)).numel()
        except RuntimeError as e:
            raise RemoteExecutionError(f"encrypted {name}: shapes do not broadcast: {e}") from None
    per = ciphertext_bytes(a.public_key.n.bit_length())
    if _op_bytes(name, count, a, per, value_free) > MAX_OP_BYTES:
        raise RemoteExecutionError(f"encrypted {name} refused: it would make {count} ciphertexts of "
                                   f"{a.public_key.n.bit_length()}-bit modulus, past the {MAX_OP_BYTES >> 20} MiB "
                                   "one op may build (split the operands)")
    monitor = worker.monitor
    principal = monitor.current_principal()
    if principal is not None and monitor.max_session_bytes is not None:
        monitor.check_room(principal, count * per, "veil.he.op")
    if value_free:
        b = _oblivious_plaintext(name, a, b)
    return b


def _op_bytes(name: str, count: int, a: PaillierTensor, per: int, value_free: bool) -> int:
    """The most a Paillier op making ``count`` ciphertexts holds at once: its results and (ciphertext, plaintext)
    pairs; a value-free product's correction cache (one entry per distinct ciphertext of ``a``); and, where
    a finished set of ``count`` is copied (a reduction's tree levels, a product's re-randomized copy), twice
    its ciphertexts."""
    built = count * (per + _PAIR_BYTES)
    if value_free and name in _PRODUCTS:
        built += min(count, max(1, a.shape.numel())) * (3 * per + _CORRECTION_ENTRY_BYTES)
    if name in ("dot", "mm") or (value_free and name == "mul"):
        built = max(built, 2 * count * per)
    return built


def _oblivious_plaintext(name: str, a: PaillierTensor, b: torch.Tensor) -> torch.Tensor:
    """A plaintext from the owner's data, made safe to encode whatever its values (:mod:`veil.he.value_free`):
    encoded at an exponent in [DEFAULT_FLOAT_EXPONENT, 0] for floats, 0 for integers (lower for an add: a's)."""
    b = value_free.finite(b, f"encrypted {name} refused")
    lowest = enc.DEFAULT_FLOAT_EXPONENT if b.is_floating_point() else 0
    if name in ("add", "sub", "rsub"):
        lowest = min(lowest, a.exponent)
    value_free.check_paillier_room(value_free.largest(b.dtype), lowest, a.public_key,
                                   f"encrypted {name} refused: a {str(b.dtype).replace('torch.', '')} plaintext "
                                   "computed from the owner's data")
    return b


def _ckks_plaintext(name: str, a: CKKSTensor, b: torch.Tensor) -> torch.Tensor:
    """A CKKS plaintext from the owner's data, clamped; the bound itself is tried on one segment."""
    return value_free.ckks_clamped(b, lambda bound: a.segments[0].mul(bound) if a.segments else None,
                                   f"encrypted {name} refused")


register_worker_function("veil.he.op", _he_op, shapes="none")


class HEPointer(RemoteHandle):
    """Pointer to a ciphertext on a worker; operations run there and return new HEPointers.

    A :class:`~veil.tensors.handle.RemoteHandle`: freed through the same deletion queue as tensor pointers.
    """

    HANDLE_KIND = "he"

    def __init__(self, location: Any, owner: Any, id_at_location: int, kind: str, shape: tuple):
        self._init_handle(location, id_at_location, owner)
        self.kind, self.shape = kind, tuple(shape)

    def _apply(self, name: str, other: Any = None) -> "HEPointer":
        if isinstance(other, HEPointer):
            if other.location is not self.location:
                raise ValueError(f"ciphertexts on {self.location.id!r} and {other.location.id!r}: move one first")
            other = ObjectRef(other.id_at_location)
        out = new_id()
        remote_ops.call(ALLOWLIST.by_name("veil.he.op"), (name, ObjectRef(self.id_at_location), other, out), {},
                        location=self.location)
        return HEPointer(self.location, self.owner, out, self.kind, self.shape)

    def __add__(self, other: Any) -> "HEPointer":
        return self._apply("add", other)

    __radd__ = __add__

    def __sub__(self, other: Any) -> "HEPointer":
        return self._apply("sub", other)

    def __rsub__(self, other: Any) -> "HEPointer":
        return self._apply("rsub", other)

    def __mul__(self, other: Any) -> "HEPointer":
        return self._apply("mul", other)

    __rmul__ = __mul__

    def __neg__(self) -> "HEPointer":
        return self._apply("neg")

    def sum(self) -> "HEPointer":
        return self._apply("sum")

    def dot(self, other: Any) -> "HEPointer":
        return self._apply("dot", other)

    def mm(self, other: Any) -> "HEPointer":
        return self._apply("mm", other)

    __matmul__ = mm

    def get(self) -> Any:
        """The ciphertext, back with its owner (who decrypts it locally)."""
        return self.fetch()[0]

    def __repr__(self) -> str:
        return self.handle_head("HEPointer", f"{self.kind} {self.shape}")


def send_encrypted(obj: PaillierTensor | CKKSTensor, worker: Any) -> HEPointer:
    """Stores a ciphertext on ``worker`` (CKKS: with its public context; no secret key ever leaves)."""
    owner = worker.hook.local_worker
    oid = new_id()
    objects = [StoredObject(oid, obj)]
    if isinstance(obj, CKKSTensor):
        ckks_wire.remember(obj.context)  # so that .get() decodes against our own (secret) context
        objects.insert(0, StoredObject(new_id(), obj.context.public()))
    try:
        owner.send_msg(ObjectMessage(objects), worker)
    except SerializationError as e:
        if isinstance(obj, CKKSTensor) and obj.context.raw.has_galois_keys() and "exceeds worker" in str(e):
            # (the client's one line for a message past the worker's advertised limit: say what makes it big)
            raise SerializationError(
                f"{e}: the CKKS public context sent with it carries Galois keys (rotations for sum, dot and mm; "
                "~34 MB at ring 8192, ~180 MB at 16384); products need none: veil.he.ckks.context(..., "
                "galois_keys=False), or veil.he.evaluation.default_context() for encrypted evaluation") from None
        raise
    kind = "ckks" if isinstance(obj, CKKSTensor) else "paillier"
    return HEPointer(worker, owner, oid, kind, tuple(obj.shape))

