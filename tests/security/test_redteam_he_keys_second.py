"""Red team, second pass on the HE keys fixes (dcb9e4a, 138c629): the process-wide registry of received CKKS
contexts, and the new checks on key indexes.

Attackers: a session (scientist) that knows another session's public key (a public context is public: the one a
round's coordinator stores on every worker, or one a key holder used before) and sends a context of that public
key with evaluation keys of its own making; a key holder whose context passes the index checks with keys SEAL
cannot use. Entry points: ``ckks_wire.context_from_wire`` (every received context), ``ckks_wire.tensor_from_wire``
(a tensor that arrives without its context: a ``MoveMessage`` between workers, a result fetched back) and
``veil.he.op``.

Hole found and fixed: ``key_id`` hashes the parameters and the public key only, and a context received under a
held ``key_id`` replaced the registry's entry, so session B's context (A's public key, B's relinearization or
Galois keys) became what every later tensor of A's arriving without its context was loaded under: A's product
on the worker relinearized with B's key (a confused deputy: the worker computes A's ciphertexts under a hostile
session's keys). Now the registry is keyed by ``key_id`` and the digest of the context's bytes (its evaluation
keys): B's context is held beside A's, never in its place, and every tensor names its context's digest (wire
field ``keys``), so it loads only under those keys (a tensor whose keys are not held here is refused in one
line). Refusing B's context instead (the first version of this fix) told B whether A's key was in use here and
let B lock A out by storing first: both guarded below. ``CKKSContext.public()`` is deterministic (TenSEAL's copy
of a context with its secret key made new relinearization keys at each send), and a context of the same bytes is
shared, its quota size kept from its first arrival's TenSEAL bytes (not a later padded message). Held (guards):
relinearization keys at one empty index (or none) and Galois keys at n empty indexes load and fail each op in
one line (probed in a subprocess: no crash); key parts of another context's modulus chain are refused by SEAL on
arrival. Measured, not a test: crafted Galois keys at 20 to 100 filled indexes (ring 8192) held 27 to 184 MiB a
loaded copy on a fresh thread against 57 to 194 charged (averages below the charge; one copy of 20 indexes held
66 for 57).

Every test asserts the SAFE behaviour; a hole is ``xfail(strict=True)``.
"""

from __future__ import annotations

import gc
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.he import ckks, ckks_wire
from veil.he.errors import HEError, WireFormatError
from veil.ids import new_id
from veil.messaging.messages import MoveMessage, ObjectMessage, StoredObject

from fl_helpers import uid
from test_redteam_he_crypto import _field, _seal_ciphertext
from test_redteam_he_eval_second import _context_wire, _seal
from test_redteam_he_keys import _crafted_relin_parts, _kswitch_bytes, _public_bytes, _relin_parts
from test_redteam_he_leftovers_second import _one_line

ts = pytest.importorskip("tenseal")

X = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)


def _key_pair():
    return ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)


def _hostile_bytes(victim) -> bytes:
    """Session B's context: the victim's public key (and parameters: the same ``key_id``) with a relinearization
    key of B's making, the right shape (the honest key plus P: a product decrypts to x*x + c2, far off)."""
    return _public_bytes(victim, 4, _kswitch_bytes(victim, {0: _crafted_relin_parts(victim, "plus P")}))


def _squared(t) -> torch.Tensor:
    return t * t


# ------------------------------------------------------------------ 1. the registry of received contexts


def test_a_context_with_another_sessions_public_key_does_not_rebind_its_tensors():
    """Attack (confused deputy): A's public context is held by the worker (received from the wire); session B
    sends a context of A's public key with its own relinearization key; then one of A's ciphertexts arrives
    without its context (moved from another worker) and A multiplies it. The old registry took B's context as
    the entry (last one wins), so A's ciphertext was loaded under B's keys and the product A decrypted was
    garbage (x*x + c2). Must hold: B's context is held beside A's, and A's later tensor is loaded under A's own
    context: its product decrypts to torch's x*x."""
    mine = _key_pair()  # (A's key pair: the secret stays in A's process, never in the registry here)
    held = ckks_wire.context_from_wire(ckks_wire.context_to_wire(mine))
    kept_by_b = ckks_wire.context_from_wire(_context_wire(_hostile_bytes(mine)))
    later = ckks_wire.tensor_from_wire(ckks_wire.tensor_to_wire(ckks.encrypt(X, mine)))  # (no context with it)
    assert torch.allclose(_squared(later).decrypt(mine).double(), X * X, atol=1e-3), "A's product used B's keys"
    assert later.context is held and kept_by_b is not held


def test_a_tensor_computed_under_one_context_is_not_loaded_under_anothers_keys():
    """Attack (confused deputy, the other order): A's context and ciphertext were on this worker, A freed them
    (the registry holds entries weakly), and session B registered its context of A's public key before A's
    ciphertext, computed on another worker under A's context, was moved here without it. Must hold: the moved
    tensor is refused in one line (it names the keys it was computed under), not loaded under B's keys."""
    mine = _key_pair()
    at_first = ckks_wire.context_from_wire(ckks_wire.context_to_wire(mine))  # (another worker's copy of A's)
    moved = ckks_wire.tensor_to_wire(ckks.encrypt(X, at_first))
    del at_first
    gc.collect()
    hostile = ckks_wire.context_from_wire(_context_wire(_hostile_bytes(mine)))  # (B first: nothing held)
    try:
        loaded = ckks_wire.tensor_from_wire(moved)
    except HEError as exc:
        assert "evaluation keys" in _one_line(exc)
        return
    assert loaded.context is not hostile and torch.allclose(_squared(loaded).decrypt(mine).double(), X * X,
                                                             atol=1e-3), "A's ciphertext was loaded under B's keys"


def test_a_moved_ciphertext_is_multiplied_under_its_owners_keys_on_workers(hook):
    """Attack (confused deputy, end to end): A encrypts under a public context (a round's coordinator hands one
    to its clients) and stores a ciphertext on worker 1; session B stores its context of A's public key on
    worker 2; A moves the ciphertext to worker 2 (``MoveMessage``: it travels without its context) and has worker
    2 multiply it by itself. Must hold: what A gets back decrypts to torch's x*x (it was B's garbage: the move
    loaded A's ciphertext under B's relinearization key)."""
    from veil.he.remote import HEPointer

    mine = _key_pair()
    public = mine.public()
    one, two = (sy.VirtualWorker(hook, id=uid(f"he-deputy-{i}")) for i in (1, 2))
    pointer = ckks.encrypt(X, public).send(one)
    hostile = ckks.CKKSContext.from_bytes(_hostile_bytes(mine))
    hook.local_worker.send_msg(ObjectMessage([StoredObject(new_id(), hostile)]), two)
    moved = new_id()
    hook.local_worker.send_msg(MoveMessage([pointer.id_at_location], two.id, [moved]), one)
    there = HEPointer(two, hook.local_worker, moved, "ckks", (3,))
    product = (there * there).get().decrypt(mine).double()
    assert torch.allclose(product, X * X, atol=1e-3), f"A's product used B's keys: {product.tolist()}"


def test_an_honest_key_holder_sends_one_context_many_times():
    """Honest user (over-refusal): each send carries the key holder's public context. ``public()`` made new
    relinearization keys at every call (TenSEAL's copy of a context with its secret key regenerates them), so
    a worker saw other keys at each send. Must hold: every public copy of one context is the same bytes, and a
    worker holding one takes the next (the same held context)."""
    mine = _key_pair()
    first, second = mine.public(), mine.public()
    assert first.serialize() == second.serialize() == mine.serialize()
    held = ckks_wire.context_from_wire(ckks_wire.context_to_wire(first))
    assert ckks_wire.context_from_wire(ckks_wire.context_to_wire(second)) is held
    assert ckks_wire.context_from_wire(ckks_wire.context_to_wire(mine)) is held


def test_a_tensor_with_a_malformed_keys_digest_is_refused_in_one_line():
    """Attack (the new field): a tensor whose ``keys`` digest is not 32 bytes. Must hold: one line."""
    mine = _key_pair()
    held = ckks_wire.context_from_wire(ckks_wire.context_to_wire(mine))
    wire = ckks_wire.tensor_to_wire(ckks.encrypt(X, held))
    assert isinstance(wire.get("keys"), bytes) and len(wire["keys"]) == 32
    for bad in (b"x" * 31, "k" * 32, 7):
        with pytest.raises(WireFormatError) as refused:
            ckks_wire.tensor_from_wire({**wire, "keys": bad})
        _one_line(refused.value)


# ------------------------------------------------------------------ 2. contexts that pass the index checks


_PROBE = textwrap.dedent("""
    import struct, sys
    sys.path[:0] = [{tests!r}, {security!r}]
    import torch
    from veil.he import ckks, ckks_wire
    from test_redteam_he_crypto import _field, _seal_ciphertext
    from test_redteam_he_eval_second import _context_wire, _seal
    from test_redteam_he_keys import _public_bytes
    bare = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)
    version, data = _field(bare.serialize(), 1)[3:5], bare.raw.seal_context().data
    empty = _seal(version, 0, struct.pack("<4Q", *data.key_parms_id()) + struct.pack("<Q", {count})
                  + struct.pack("<Q", 0) * {count})
    ctx = ckks_wire.context_from_wire(_context_wire(_public_bytes(bare, {member}, empty)))
    x = ckks.encrypt(torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64), ctx)
    for name, op in (("mul", lambda: x * x), ("sum", x.sum), ("dot", lambda: x.dot(torch.ones(3))),
                     ("mm", lambda: x.reshape(1, 3).mm(torch.ones(3, 2)))):
        try:
            op()
            print(name, "computed")
        except Exception as exc:
            print(name, "refused", str(exc).count(chr(10)))
""")


@pytest.mark.slow
@pytest.mark.parametrize("member, count", [(4, 1), (4, 0), (5, 8192)])
def test_keys_of_empty_indexes_fail_each_op_in_one_line(member, count):
    """Attack (a crash, past the new count checks): relinearization keys at one index (or none) that holds no
    key, Galois keys at exactly n indexes none of which holds a key: each passes ``_check_key_parts`` (empty
    indexes hold no parts). Must hold (probed in a subprocess): the process survives a product, sum, dot and mm
    under it, each refused in one line."""
    here = Path(__file__).resolve().parent
    script = _PROBE.format(tests=str(here.parent), security=str(here), member=member, count=count)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"the probe died ({run.returncode}): {run.stderr[-400:]}"
    lines = run.stdout.split("\n")[-5:-1]
    assert [line.split()[0] for line in lines] == ["mul", "sum", "dot", "mm"], run.stdout
    assert all(line.endswith("refused 0") for line in lines), run.stdout


def test_key_parts_of_another_modulus_chain_are_refused_on_arrival():
    """Attack: relinearization key parts of the right count and width whose parms id (header and parts) is
    another context's key level (a chain of other primes): what the key switch would reduce by. Must hold:
    refused in one line on arrival."""
    bare, other = _key_pair(), ckks.context(8192, (50, 30, 30, 50), galois_keys=False)
    version = _field(bare.serialize(), 1)[3:5]
    theirs = other.raw.seal_context().data
    k = len(theirs.key_context_data().parms().coeff_modulus())
    parms_id = tuple(theirs.key_parms_id())
    parts = _relin_parts(other)
    keys = _seal(version, 0, struct.pack("<4Q", *parms_id) + struct.pack("<QQ", 1, len(parts)) + b"".join(
        _seal_ciphertext(version, parms_id, 1.0, part.tolist(), k) for part in parts))
    with pytest.raises(WireFormatError) as refused:
        ckks_wire.context_from_wire(_context_wire(_public_bytes(bare, 4, keys)))
    _one_line(refused.value)


def test_a_padded_copy_of_a_held_context_does_not_raise_its_holders_charge():
    """Attack (the shared context, quota): a held context is now shared with every later arrival of its bytes,
    and the quota charged a context what its message took on the wire (set on the decoded object). Session B
    sends A's public context bytes in a wire dict padded with 32 MiB: the shared object would be charged 32 MiB
    at A's later stores. Must hold: B's copy is the held context, and what it is charged does not change."""
    from veil.he import remote
    from veil.messaging import serde

    mine = _key_pair()
    held = remote._decode(serde.encode_value(ckks_wire.context_to_wire(mine)), serde.DecodeContext())
    charged = remote._context_nbytes(held)
    padded = {**ckks_wire.context_to_wire(mine), "pad": bytes(32 << 20)}
    assert remote._decode(serde.encode_value(padded), serde.DecodeContext()) is held
    assert remote._context_nbytes(held) == charged < 32 << 20


def test_whether_a_public_key_is_held_here_is_not_shown_to_another_session():
    """Attack (side channel: existence): session B knows A's public key and sends a context of it with its own
    keys, once while A holds its context on the worker and once while A does not. Must hold: B gets the same
    answer both times (it learns nothing of A's use of the worker)."""
    answers = []
    for a_holds in (True, False):
        mine = _key_pair()
        held = [ckks_wire.context_from_wire(ckks_wire.context_to_wire(mine))] if a_holds else []
        try:
            ckks_wire.context_from_wire(_context_wire(_hostile_bytes(mine)))
            answers.append("stored")
        except WireFormatError:
            answers.append("refused")
        del held
    assert answers[0] == answers[1], answers


def test_a_session_that_stores_a_public_key_first_does_not_lock_its_holder_out():
    """Attack (denial of service): session B stores a context of A's public key (with its own keys) before A's
    first send to the worker. Must hold: A's own context and ciphertext are stored, and A's product there
    decrypts to torch's x*x."""
    mine = _key_pair()
    first = ckks_wire.context_from_wire(_context_wire(_hostile_bytes(mine)))  # (B's, held by B)
    own = ckks_wire.context_from_wire(ckks_wire.context_to_wire(mine))
    loaded = ckks_wire.tensor_from_wire(ckks_wire.tensor_to_wire(ckks.encrypt(X, mine)))  # (the registry's)
    assert first is not own and loaded.context is own and torch.allclose(_squared(loaded).decrypt(mine).double(), X * X, atol=1e-3)
