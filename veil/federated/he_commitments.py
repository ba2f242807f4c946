"""Per-client commitments of an encrypted aggregation round (:mod:`veil.federated.he_agg`).

Each client, right after it encrypts its update, stores SHA-256 of its ciphertext's wire encoding bound to
the round's random id and its own client id; the coordinator fetches every commitment before any
ciphertext is handed to an aggregating client. Each aggregator then checks what it was handed against the
commitments (``veil.fl.check_commitments``) and answers one flag per client.

Why: an aggregator that sees every ciphertext cannot have an accomplice hand the other aggregator one
forged from them (the accomplice committed before anything was handed over), a ciphertext of an old round
(or of another client) does not match a commitment to this round's, and a client whose copies differ is
identified (and dropped) instead of refusing the round.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import torch

from veil.exceptions import ObjectNotFoundError, RemoteExecutionError
from veil.he.ckks import CKKSTensor
from veil.he.paillier import PaillierTensor
from veil.messaging.allowlist import ALLOWLIST, register_worker_function
from veil.messaging.messages import ObjectRef
from veil.messaging.serde import encode_value
from veil.tensors import remote_ops
from veil.tensors.pointer import PointerTensor
from veil.workers import cancellation

DOMAIN = b"veil.fl.he_agg commitment v1"
DIGEST_BYTES = 32
MAX_CLIENTS = 100_000  # one check names at most this many ciphertexts (bounded work per request)
_MAX_ID_CHARS = 256
_CHECK_EVERY = 4096  # entries of a check between two of its command's checkpoints


def commitment(round_id: str, client_id: str, ciphertext: Any, encoded: bytes | None = None) -> bytes:
    """SHA-256 over the domain, the round id, the client id (each length-prefixed: no two (round, client)
    pairs share an input) and SHA-256 of the ciphertext's wire encoding (``encoded``: that inner digest,
    computed once per ciphertext however many entries name it)."""
    h = hashlib.sha256(DOMAIN)
    for part in (round_id.encode(), client_id.encode()):
        h.update(len(part).to_bytes(8, "big") + part)
    h.update(encoded if encoded is not None else _inner(ciphertext))
    return h.digest()


def _inner(ciphertext: Any) -> bytes:
    return hashlib.sha256(encode_value(ciphertext)).digest()


def as_tensor(digest: bytes) -> torch.Tensor:
    return torch.tensor(list(digest), dtype=torch.uint8)


def as_bytes(t: Any) -> bytes:
    """A fetched commitment (its form checked: a client may send anything)."""
    if type(t) is not torch.Tensor or t.dtype != torch.uint8 or tuple(t.shape) != (DIGEST_BYTES,):
        raise ValueError(f"a commitment is {DIGEST_BYTES} bytes (uint8), got {type(t).__name__} "
                         f"{tuple(getattr(t, 'shape', ()))[:4]}")
    return bytes(t.tolist())


def form_of(ciphertext: Any) -> list | None:
    """``[scheme, shape, key, exponent or scale]`` of a ciphertext (None: not one): what every honest ciphertext
    of a round shares. A client commits to whatever it encrypted, so a ciphertext under another key, of another
    size, at another Paillier exponent or CKKS scale matched its commitment, then failed the aggregators'
    addition (one client refused the round) or was broadcast into every entry of the sum."""
    if type(ciphertext) is PaillierTensor:
        n = ciphertext.public_key.n
        return ["paillier", list(ciphertext.shape), key_name(n), ciphertext.exponent]
    if type(ciphertext) is CKKSTensor:
        return ["ckks", list(ciphertext.shape), key_name(ciphertext.context.key_id), _ckks_scale(ciphertext)]
    return None


def ckks_scale_name(scale: float) -> str:
    """A CKKS scale as a form names it (exact: SEAL adds ciphertexts of one scale only)."""
    return float(scale).hex()


def _ckks_scale(ciphertext: CKKSTensor) -> str | None:
    """The one scale of all its segments' ciphertexts (None: no segment, or several scales)."""
    scales = {c.scale for s in ciphertext.segments for c in s.ciphertext()}
    return ckks_scale_name(scales.pop()) if len(scales) == 1 else None


def key_name(key: Any) -> str:
    """A short public name of a Paillier modulus (an int) or a CKKS key id (bytes)."""
    raw = key if type(key) is bytes else str(int(key)).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def _valid_form(form: Any) -> bool:
    return (type(form) is list and len(form) == 4 and form[0] in ("paillier", "ckks") and type(form[1]) is list
            and len(form[1]) <= 8 and all(type(d) is int for d in form[1]) and type(form[2]) is str
            and len(form[2]) <= _MAX_ID_CHARS and (form[3] is None or type(form[3]) is int
                                                   or (type(form[3]) is str and len(form[3]) <= _MAX_ID_CHARS)))


def _check_commitments(worker: Any, round_id: str, client_ids: list, ciphertexts: list,
                       digests: torch.Tensor, form: list | None = None) -> torch.Tensor:
    """On an aggregating client: 1 for each client whose ciphertext here is not a ciphertext, is not of the
    round's ``form`` (:func:`form_of`, when given) or does not match its commitment (``digests`` row), else 0.
    The ciphertexts come as ObjectRefs: the flags derive from them (their provenance, and any review of the
    owner's data, applies to the flags)."""
    n = len(client_ids) if type(client_ids) is list else -1
    if not (type(round_id) is str and 0 < len(round_id) <= _MAX_ID_CHARS and 0 < n <= MAX_CLIENTS
            and type(ciphertexts) is list and len(ciphertexts) == n
            and all(type(c) is str and len(c) <= _MAX_ID_CHARS for c in client_ids)
            and type(digests) is torch.Tensor and digests.dtype == torch.uint8
            and tuple(digests.shape) == (n, DIGEST_BYTES) and (form is None or _valid_form(form))):
        raise RemoteExecutionError("check_commitments: a round id, client ids, ciphertexts and one "
                                   f"{DIGEST_BYTES}-byte commitment per client expected")
    flags = [1] * n
    # id(object) -> None (not a ciphertext of the round's form) or its encoding's digest: whatever an object costs to
    # look at (a CKKS form reads every segment's ciphertexts, a copy each; the encoding hashes all its bytes) is paid
    # once per distinct object, however many entries name it (one 32-segment ciphertext named 10^5 times with a form
    # held the worker's turn ~50 s); what is left per entry is one short hash
    verdicts: dict[int, bytes | None] = {}
    expected = digests.contiguous().numpy().tobytes()  # (n x 32 bytes; a list of 32 ints per entry was ~10x that)
    for k, (client, obj) in enumerate(zip(client_ids, ciphertexts)):
        if not k % _CHECK_EVERY:
            cancellation.checkpoint()  # the command's deadline, and other sessions' turn, between slices
        key = id(obj)
        if key not in verdicts:
            ok_form = type(obj) in (CKKSTensor, PaillierTensor) and (form is None or form_of(obj) == form)
            # (the form first: hashing a ciphertext of any size would cost what its client chose)
            verdicts[key] = _inner(obj) if ok_form else None
        inner = verdicts[key]
        if inner is not None and hmac.compare_digest(commitment(round_id, client, obj, inner),
                                                     expected[k * DIGEST_BYTES:(k + 1) * DIGEST_BYTES]):
            flags[k] = 0
    return torch.tensor(flags, dtype=torch.uint8)


register_worker_function("veil.fl.check_commitments", _check_commitments)


def fetch(owner: Any, worker: Any, oid: int) -> bytes:
    """The commitment a client stored under ``oid`` (removed there)."""
    return as_bytes(PointerTensor(worker, oid, owner, (DIGEST_BYTES,), torch.uint8, False, mine=True).get())


def mismatches(aggregator: Any, round_id: str, held: dict, commitments: dict, form: list | None = None) -> set:
    """The clients (of ``held``: client id -> ciphertext id at ``aggregator``) whose ciphertext there is
    missing, not of the round's ``form`` or does not match its commitment, as the aggregator reports them."""
    if not held:
        return set()
    try:
        return _flagged(aggregator, round_id, held, commitments, form)
    except ObjectNotFoundError:  # a ciphertext never arrived (its sender's word, or the aggregator's): whose?
        if len(held) == 1:
            return set(held)
    bad = set()
    for client, cid in held.items():  # one by one: the missing ones are those clients' (other errors raise)
        try:
            bad |= _flagged(aggregator, round_id, {client: cid}, commitments, form)
        except ObjectNotFoundError:
            bad.add(client)
    return bad


def _flagged(aggregator: Any, round_id: str, held: dict, commitments: dict, form: list | None) -> set:
    clients = list(held)
    digests = torch.stack([as_tensor(commitments[c]) for c in clients])
    flags = remote_ops.call(ALLOWLIST.by_name("veil.fl.check_commitments"),
                            (round_id, clients, [ObjectRef(held[c]) for c in clients], digests,
                             *([form] if form is not None else [])), {},
                            location=aggregator).get()
    if type(flags) is not torch.Tensor or tuple(flags.shape) != (len(clients),):
        raise ValueError(f"aggregating client {aggregator.id!r} answered the commitment check with "
                         f"{type(flags).__name__}")
    return {c for c, bad in zip(clients, flags.tolist()) if bad}
