"""Wire format of CKKS contexts and tensors (TenSEAL's own serialization, no pickle).

Context (public parts only; the secret key never goes on the wire)::

    {"he": "ckks", "kind": "context", "v": 1, "data": <tenseal bytes>}

Tensor::

    {"he": "ckks", "kind": "tensor", "v": 1, "key_id": <32 bytes>,
     "shape": [...], "dtype": "float32", "segments": [<tenseal bytes>, ...],
     "keys": <32 bytes: SHA-256 of its context's public TenSEAL bytes>}

A tensor is loaded against a context: the one passed to
:func:`tensor_from_wire`, else one this process received with
:func:`context_from_wire`, looked up by ``key_id`` (parameters and public
key) and ``keys`` (the digest of its evaluation keys: another session's
context of the same public key is held beside it, never in its place; a
tensor naming none is refused unless its key owner is in this process and
the decode is for no network session).
Only a context of the decoding session's scope or the shared one is looked up
(:mod:`veil.he.context_scope`: another session's is refused as one nobody holds).
A move to a peer sends a tensor with its context (``"context"``: a context dict,
:func:`veil.he.context_scope.carrying_contexts`; once per context, the later
tensors naming its bytes' digest): it is loaded under that one.
Contexts learned from the wire are public, so a worker can compute on what
it receives but not decrypt it.
"""

from __future__ import annotations

import hashlib
import threading
import weakref

import tenseal as ts

from veil.he import _wire_checks as chk, context_scope, conjugation, seal_bytes
from veil.he.ckks import CKKSContext, CKKSTensor, _tenseal_errors
from veil.he.errors import HEError, KeyMismatchError, WireFormatError

BACKEND = "ckks"

# (key_id, keys digest) -> public context received from the wire or registered here (weak: dropped with its last
# user). ``key_id`` hashes the parameters and the public key only; the digest names the evaluation keys too. Keyed
# by key_id alone, the last context received was every later tensor's of the key that arrived without its own
# (moved, fetched), so any session knowing a public key (a public context is public) had another session's
# ciphertexts relinearized and rotated under its own keys. Scoped by the session that sent it
# (:mod:`veil.he.context_scope`): looked up for every session, whether another's context was held was an oracle.
_received: weakref.WeakValueDictionary[tuple[str, bytes, bytes], CKKSContext] = weakref.WeakValueDictionary()
# key_id -> a local context holding its secret key (its key owner lives in this process)
_secret: weakref.WeakValueDictionary[bytes, CKKSContext] = weakref.WeakValueDictionary()
_received_lock = threading.Lock()

#: attribute of a received tensor: the bytes of the context it carried (a move's)
CARRIED_NBYTES = "_veil_carried_nbytes"
#: attributes of a context: SHA-256 of the TenSEAL bytes it arrived as; (state, SHA-256) of its own public bytes
_WIRE_DIGEST, _OWN_DIGEST = "_veil_wire_digest", "_veil_own_digest"


def keys_digest(ctx: CKKSContext) -> bytes:
    """SHA-256 naming ``ctx``'s evaluation keys: of the bytes it arrived as, else of its public bytes (what it
    sends: :meth:`CKKSContext.public` is those bytes). Cached; made again if its keys changed since (a
    conjugation key added: seconds for tens of MB of Galois keys, once)."""
    wire = ctx.__dict__.get(_WIRE_DIGEST)
    if wire is not None:
        return wire
    state = (conjugation._KEY_BYTES in ctx.__dict__, ctx.raw.has_galois_keys(), ctx.raw.has_relin_keys())
    known = ctx.__dict__.get(_OWN_DIGEST)
    if known is None or known[0] != state:
        known = ctx.__dict__[_OWN_DIGEST] = (state, hashlib.sha256(ctx.serialize(secret_key=False)).digest())
    return known[1]


def remember(ctx: CKKSContext) -> None:
    """Registers a local context so that tensors coming back under it decode against it: one holding its secret
    key decodes every tensor of its key_id, for no network session (a public copy does not replace it: an
    encrypted round's registration, weak, would leave with the round and take the key owner's with it). Local
    code's: in the shared scope (every session's tensors may name it: the owner made it available)."""
    if ctx.has_secret_key:
        with _received_lock:
            _secret[ctx.key_id] = ctx
        return
    digest = keys_digest(ctx)
    with _received_lock:
        _received[context_scope.SHARED, ctx.key_id, digest] = ctx


def context_to_wire(ctx: CKKSContext) -> dict:
    """Public context (keys for encryption, relinearization, rotations; no secret key)."""
    return {"he": BACKEND, "kind": "context", "v": chk.WIRE_VERSION, "data": ctx.serialize(secret_key=False)}


def context_from_wire(d: dict) -> CKKSContext:
    """Load a public context and remember it for later tensors with its ``key_id``. What its keys inflate to is
    bounded before TenSEAL reads them (:mod:`veil.he.seal_bytes`: 40 kB of zstd held 160 MB of Galois keys).
    A context of these bytes the decoding session holds is returned; one of other evaluation keys, or another
    session's of the same bytes, is held beside it (never replaced, never handed to another session)."""
    chk.header(d, BACKEND, "context")
    data = chk.field(d, "data", bytes)
    try:
        seal_bytes.check_context_bytes(data)
        ctx = CKKSContext.from_bytes(data)
        _check_key_parts(ctx)
    except HEError as exc:
        raise WireFormatError(f"invalid CKKS context bytes: {exc}") from exc
    if ctx.has_secret_key:
        # We never send secret keys; refuse to hold one that arrived anyway.
        ctx = ctx.public()
    digest = ctx.__dict__[_WIRE_DIGEST] = hashlib.sha256(data).digest()
    ctx.__dict__["_veil_wire_nbytes"] = len(data)  # (the quota's wire size: its bytes, not the message's padding)
    scope = context_scope.current()
    with _received_lock:
        owner = _secret.get(ctx.key_id) if scope.key_owner else None  # (never a network session's: an oracle)
        if owner is not None:
            # The key owner lives in this process (in-process simulation): keep its
            # context, so tensors coming back decode against the secret key.
            return owner
        scope = scope.name
        known = _received.get((scope, ctx.key_id, digest))
        if known is not None:
            return known  # (this session holds these keys: one context)
        _received[scope, ctx.key_id, digest] = ctx
    return ctx


def _check_key_parts(ctx: CKKSContext) -> None:
    """Refuses a context whose relinearization or Galois keys hold, at some index, other than one part (a pair of
    polynomials) per data prime: SEAL loads any number, and a key switch at a level of more primes than the key
    has parts aborted the process (std::terminate, 'unsigned overflow'): one crafted conjugation key with fewer
    parts killed a worker sealing a reduction. And keys at more indexes than an honest context has: one
    relinearization index (a product relinearizes with the key at index 0 whenever SEAL counts one non-empty
    index, so keys at index 1 alone segfaulted the worker at the first ciphertext product), at most one Galois
    index per ring coefficient (SEAL loads up to 131072, empty ones the quota does not see). Metadata only
    (SEAL's key lists, a few ms)."""
    parms = ctx.raw.seal_context().data.key_context_data().parms()
    parts = len(parms.coeff_modulus()) - 1
    for present, keys, what, most in ((ctx.raw.has_relin_keys, ctx.raw.relin_keys, "relinearization", 1),
                                      (ctx.raw.has_galois_keys, ctx.raw.galois_keys, "Galois",
                                       parms.poly_modulus_degree())):
        if not present():
            continue
        indexes = keys().data.data()
        if len(indexes) > most:
            raise WireFormatError(f"a CKKS context's {what} keys must span at most {most} index(es), these span "
                                  f"{len(indexes)}")
        for index in indexes:
            if index and (len(index) != parts or any(part.data().size() != 2 for part in index)):
                raise WireFormatError(f"a CKKS context's {what} key must hold {parts} parts of 2 polynomials (one "
                                      f"per data prime), this one holds {len(index)}")


def tensor_to_wire(t: CKKSTensor) -> dict:
    out = {
        "he": BACKEND,
        "kind": "tensor",
        "v": chk.WIRE_VERSION,
        "key_id": t.context.key_id,
        "shape": list(t.shape),
        "dtype": chk.dtype_name(t.dtype),
        "segments": [s.serialize() for s in t.segments],
    }
    out["keys"] = keys_digest(t.context)  # (a move or a result names the keys it is under)
    carried = context_scope.carried()
    if carried is not None:  # (a move: the receiving peer session loads it under this, in its own scope)
        sent = carried.get((BACKEND, id(t.context)))
        if sent is None:  # (once per context and move: a thousand one-value ciphertexts were 1000 contexts)
            wire = context_to_wire(t.context)
            sent = carried[BACKEND, id(t.context)] = (t.context, hashlib.sha256(wire["data"]).digest())
            out["context"] = wire
        out["keys"] = sent[1]  # (the bytes carried: the later tensors of the move load under the first's)
    return out


def tensor_from_wire(d: dict, context: CKKSContext | None = None) -> CKKSTensor:
    """Rebuild a :class:`CKKSTensor` under ``context`` (or a context received earlier).

    Raises:
        WireFormatError: malformed dict, unknown context, or invalid ciphertext bytes.
        KeyMismatchError: ``context`` is not the one the tensor was encrypted under.
    """
    chk.header(d, BACKEND, "tensor")
    key_id = chk.field(d, "key_id", bytes)
    shape, dtype = chk.shape(d), chk.dtype(d)
    numel = 1
    for s in shape:
        numel *= s
    blobs = chk.field(d, "segments", list)
    if len(blobs) > max(numel, 1) or not all(isinstance(b, bytes) for b in blobs):
        raise WireFormatError("CKKS 'segments' must be a list of at most numel byte strings")
    keys = d.get("keys")
    if keys is not None and (type(keys) is not bytes or len(keys) != 32):
        raise WireFormatError("CKKS 'keys' must be the 32-byte digest of the tensor's context")
    carried = d.get("context")
    if context is None and carried is not None:
        context = context_from_wire(carried)  # (registered in this decode's scope: a peer link's, for a move)
    elif context is None:
        context = _registered(key_id, keys)
    elif not isinstance(context, CKKSContext):
        raise TypeError("context must be a veil CKKSContext")
    if context.key_id != key_id:
        raise KeyMismatchError("the received CKKS tensor was encrypted under another context")
    segments = []
    try:
        with _tenseal_errors("ciphertext deserialization"):
            for b in blobs:
                stored_scale = seal_bytes.check_vector_bytes(b)  # (before TenSEAL loads every ciphertext in it)
                segments.append(ts.ckks_vector_from(context.raw, b))
                _check_loaded(context, segments[-1], len(b), stored_scale)
    except HEError as exc:
        raise WireFormatError(f"invalid CKKS ciphertext bytes: {exc}") from exc
    sizes = [s.size() for s in segments]
    if sum(sizes) != numel or any(sz > context.slots or sz < 1 for sz in sizes):
        raise WireFormatError("CKKS segment sizes do not add up to the tensor's shape")
    out = CKKSTensor(context, segments, shape, dtype)
    if carried is not None:  # (the quota charges the context it carried as a context, not as ciphertext bytes)
        out.__dict__[CARRIED_NBYTES] = len(carried["data"])
    return out


def _registered(key_id: bytes, keys: bytes | None) -> CKKSContext:
    """The context a tensor of ``key_id`` under evaluation keys ``keys`` is loaded under here: its key owner's,
    else the one received with those keys. A tensor naming none (every tensor this code sends names them) is
    refused as one naming keys not held: it was loaded under the only context of its public key, and refused
    where none or several were held, so a session that knew another's public key only (not the evaluation keys
    sent with it) learned whether and how many contexts of it were held here, and computed under them.
    Looked up in the decoding session's scope and the shared one (:mod:`veil.he.context_scope`): the same
    lookups, and the same refusal, whether or not another session holds the context named. A key owner in
    this process (in-process simulation, or the worker's own code) decodes every tensor of its key for no
    network session (``Scope.key_owner``)."""
    scope = context_scope.current()
    with _received_lock:
        context = _secret.get(key_id) if scope.key_owner else None
        if context is None and keys is not None:
            context = _received.get((scope.name, key_id, keys))
            if context is None:
                context = _received.get((context_scope.SHARED, key_id, keys))
            if context is None and scope.sees_all:  # (the owner's and peers' sessions: any session's)
                context = next((c for (_, k, d), c in list(_received.items()) if k == key_id and d == keys), None)
    if context is None:
        raise WireFormatError("CKKS tensor refers to a context (public key and evaluation keys) this process has "
                              "not received")
    return context


def _check_loaded(context: CKKSContext, segment, wire_bytes: int, stored_scale: float) -> None:
    """Refuses, as soon as it is loaded, a ciphertext that is not two polynomials (a third, times a plaintext,
    comes back beside the two that rerandomization and flooding cover), or that held far more than its bytes:
    SEAL inflates compressed data, so 500 bytes of zeros were 393 kB under an 8192 ring (a tensor of 10 MB was
    8 GB, charged to the session quota as 10 MB). An honest ciphertext is random below its primes, so its
    compressed bytes are at least one polynomial's entropy (half of that is the bound: a seeded c1 is 64 bytes).
    And one whose scales are not its context's: TenSEAL encodes a plaintext operand at the vector's stored scale
    (a product with the owner's values at 2**55 held 15 more bits of each than agreed); an honest one keeps the
    context's through every operation."""
    raws = segment.ciphertext()
    if len(raws) != 1 or raws[0].size() != 2:
        raise WireFormatError("a CKKS ciphertext must be one ciphertext of 2 polynomials")
    raw = raws[0]
    if stored_scale != context.global_scale or raw.scale != context.global_scale:
        raise WireFormatError(f"a CKKS ciphertext must be at its context's scale ({context.global_scale:g})")
    level = context.raw.seal_context().data.get_context_data(raw.parms_id())
    entropy_bytes = raw.poly_modulus_degree() * level.total_coeff_modulus_bit_count() // 8
    if wire_bytes < entropy_bytes // 2:
        raise WireFormatError(f"a CKKS ciphertext of {wire_bytes} bytes inflates to {entropy_bytes} bytes or "
                              "more of random polynomial (a compression bomb)")
