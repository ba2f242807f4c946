"""Red team: what the encrypted evaluation and the HE quota left after the earlier rounds.

Attackers: the data owner who holds the CKKS secret key and has the model owner score its batch
(``veil.he.evaluation.linear_scores``); a scientist whose ciphertext meets a worker's owner data (``veil.he.op``);
a session that stores public contexts on a worker under ``--max-session-mb``; and an honest user whose context is
past the worker's message limit.

Every test asserts the SAFE behaviour; a hole is ``xfail(strict=True)``.
"""

from __future__ import annotations

import os

import pytest
import torch

import veil as sy
from veil.he import ckks, ckks_wire, conjugation, context_memory, evaluation as ev, flooding
from veil.he.errors import CiphertextRefusedError
from veil.ids import new_id
from veil.messaging.messages import ObjectMessage, StoredObject

from test_redteam_he_crypto import _with_field

ts = pytest.importorskip("tenseal")
sealapi = pytest.importorskip("tenseal.sealapi")

D, M, B = 4, 2, 3
SIGMA = flooding.sigma(2.0**40, product=True)


def uid(prefix: str) -> str:
    return f"{prefix}-{new_id() % 10**8}"


@pytest.fixture(scope="module")
def ctx():
    return ev.default_context()


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(11)
    return torch.randn(D, M, generator=g, dtype=torch.float64), torch.randn(M, generator=g, dtype=torch.float64)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"not a one-line error: {text!r}"
    return text


def _with_imaginary(vector, imaginary: list[float], tmp_path):
    """The key holder's crafted input: ``vector`` plus ``i * imaginary`` (SEAL's encoder takes complex values;
    TenSEAL's does not), still a fresh-looking ciphertext of 2 polynomials at the top level and the context's
    scale."""
    data = vector.context().seal_context().data
    raw = vector.ciphertext()[0]
    plain = sealapi.Plaintext()
    sealapi.CKKSEncoder(data).encode([complex(0.0, v) for v in imaginary], raw.parms_id(), raw.scale, plain)
    sealapi.Evaluator(data).add_plain_inplace(raw, plain)
    path = str(tmp_path / f"crafted-{new_id()}")
    raw.save(path)
    with open(path, "rb") as f:
        saved = f.read()
    os.remove(path)
    return ts.ckks_vector_from(vector.context(), _with_field(vector.serialize(), 2, saved))


def _complex_slots(vector, key: ckks.CKKSContext, count: int) -> torch.Tensor:
    """Every value the key holder reads from a returned ciphertext, imaginary parts included."""
    data = key.raw.seal_context().data
    plain = sealapi.Plaintext()
    sealapi.Decryptor(data, key.raw.secret_key().data).decrypt(vector.ciphertext()[0], plain)
    return torch.tensor(sealapi.CKKSEncoder(data).decode_complex(plain)[:count], dtype=torch.complex128)


# ------------------------------------------------------------------ 1. complex inputs: a second answer per batch


def test_the_scores_imaginary_parts_carry_no_second_batch(ctx, model, tmp_path):
    """Attack: the data owner encrypts each feature as ``x + i*y`` (two batches in one) and has the model owner
    score it; the real weights give ``x @ W`` in the real parts and ``y @ W`` in the imaginary ones, which
    TenSEAL's decrypt leaves out and SEAL's complex decoder reads: twice the linear queries per batch against the
    model's weights, and imaginary parts the real flooding never touched. Must hold: the imaginary parts are ~0
    (linear_scores keeps the real parts, c + conj(c), with the context's conjugation key) and the real parts are
    still torch's ``x @ W + b``."""
    w, b = model
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(2))
    honest = ev.encrypt_batch(x, ctx, M)
    crafted = [_with_imaginary(seg, y[:, j].repeat(M).tolist(), tmp_path) for j, seg in enumerate(honest.segments)]
    assert torch.allclose(_complex_slots(crafted[0], ctx, B).imag, y[:, 0], atol=1e-6)  # the attack is armed
    out = ev.linear_scores(ckks.CKKSTensor(ctx, crafted, honest.shape, torch.float32), w, b)
    scores = _complex_slots(out.segments[0], ctx, M * B).reshape(M, B).T
    assert torch.allclose(scores.real, x @ w + b, atol=8 * SIGMA + 1e-5)
    second = y @ w
    assert scores.imag.abs().max() < 1e-5, f"the imaginary parts gave y @ W: {scores.imag.tolist()} vs {second}"


def test_a_context_without_the_conjugation_key_is_refused_in_one_line(model):
    """Attack: the data owner sends its batch under a context without the conjugation key (the model owner
    could not cancel the imaginary parts). Must hold: refused before any work with one line that names the
    context to use, and the same model owner then scores an honest batch of default_context()."""
    w, b = model
    bare = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with pytest.raises(CiphertextRefusedError) as refused:
        ev.linear_scores(ev.encrypt_batch(x, bare, M), w, b)
    assert "conjugation key" in _one_line(refused.value) and "default_context" in str(refused.value)
    honest = ev.default_context()
    public = ckks_wire.context_from_wire(ckks_wire.context_to_wire(honest.public()))  # what the model owner has
    assert conjugation.keys(public) is not None and not public.has_secret_key
    received = ckks_wire.tensor_from_wire(ckks_wire.tensor_to_wire(ev.encrypt_batch(x, honest, M)), public)
    scores = ev.linear_scores(received, w, b).decrypt(honest).T.double()
    assert torch.allclose(scores, x @ w + b, atol=8 * SIGMA + 1e-5)


@pytest.mark.slow
def test_an_approved_encrypted_dot_on_owner_data_gives_no_second_dot(hook, tmp_path):
    """Attack (remote): the scientist encrypts ``x + i*y`` under its own context (with Galois keys: a dot
    rotates), sends it to the owner and has it dot with the owner's review data; once approved, the imaginary
    part of the one released number was ``y . w``, a second query the owner never saw. Must hold: the released
    number's imaginary part is ~0 (the sealing keeps the real part) and its real part is ``x . w``."""
    from veil.exceptions import ReviewPendingError

    weights = torch.tensor([3.0, -1.5, 7.25, 2.0, 0.5, -4.0], dtype=torch.float64)
    x = torch.tensor([0.5, 1.0, -1.0, 2.0, 0.25, 1.5], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # reads w[0]
    owner = sy.VirtualWorker(hook, id=uid("he-complex"))
    owner.load(weights.clone(), tags=("#weights",), policy="review")
    ctx = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), global_scale=2**40)
    enc = ckks.encrypt(x, ctx)
    enc = enc._like([_with_imaginary(enc.segments[0], y.tolist(), tmp_path)])
    result = enc.send(owner).dot(owner.search(["#weights"])[0])
    with pytest.raises(ReviewPendingError) as pending:
        result.get()
    owner.release_requests.approve(pending.value.request_id)
    released = _complex_slots(result.get().segments[0], ctx, 1)[0]
    assert abs(released.real - float(x @ weights)) < 1e-3
    assert abs(released.imag) < 1e-4, f"the imaginary part gave y . w = {released.imag} (w[0] = {weights[0]})"


# ------------------------------------------------------------------ 2. errors that tell the weights


def test_all_zero_weights_give_the_bias_not_an_error(ctx):
    """Attack: the model owner's service relays linear_scores' errors to the data owner; "all weights are zero"
    told the other side a property of the model's own values. Must hold: zero weights score like any others
    (torch's ``x @ 0 + b``), the result at the level any weights give (levels said which too)."""
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    b = torch.tensor([0.75, -2.0], dtype=torch.float64)
    enc = ev.encrypt_batch(x, ctx, M)
    zero = ev.linear_scores(enc, torch.zeros(D, M, dtype=torch.float64), b)
    some = ev.linear_scores(enc, torch.ones(D, M, dtype=torch.float64), b)
    assert zero.levels_left() == some.levels_left()
    assert torch.allclose(zero.decrypt().T.double(), (x @ torch.zeros(D, M, dtype=torch.float64) + b),
                          atol=8 * SIGMA + 1e-5)


# ------------------------------------------------------------------ 3. the quota charges what SEAL holds


def _seal_lower_bound(ctx: ckks.CKKSContext) -> int:
    """What SEAL certainly holds for a loaded public context: its public and relinearization keys at full width
    (8 bytes an RNS word) and its tables (at least 33 bytes per n * primes**2, veil.he.seal_bytes)."""
    parms = ctx.raw.seal_context().data.key_context_data().parms()
    n, k = parms.poly_modulus_degree(), len(parms.coeff_modulus())
    keys = 2 * k * n * 8 + ((k - 1) * 2 * k * n * 8 if ctx.raw.has_relin_keys() else 0)
    return keys + 33 * n * k * k


def test_a_stored_context_is_charged_what_seal_holds_not_its_wire_bytes(hook):
    """Attack: a session stores public contexts on a worker with a per-session quota; each was charged its wire
    bytes (1.8 MB at ring 8192) while SEAL held 6 times that (keys inflated, tables built on no wire): a quota of
    100 MB let a session hold 600. Must hold: a stored context is charged at least what SEAL certainly holds for
    it, and a quota that the wire bytes fit but the held memory does not refuses it in one line, the worker
    storing on."""
    from veil.messaging.serde import deserialize, serialize
    from veil.workers.monitor import Principal, QuotaExceededError

    def arrived(obj):
        return deserialize(serialize(ObjectMessage([StoredObject(1, obj)])))[0].objects[0].obj

    bare = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)
    wire_bytes = len(bare.public().serialize())
    held = _seal_lower_bound(bare)
    assert held > 3 * wire_bytes  # (the quota below fits the wire bytes, not what is held)
    session = Principal("hq", "u", namespace="hq", isolated=True)
    tight = sy.VirtualWorker(hook, id=uid("he-ctx-quota"), max_session_bytes=3 * wire_bytes)
    with pytest.raises(QuotaExceededError) as refused:
        tight.monitor.store(session, 1, arrived(bare.public()))
    _one_line(refused.value)
    assert tight.monitor.store(session, 2, torch.ones(3)).nbytes > 0  # the session stores on
    roomy = sy.VirtualWorker(hook, id=uid("he-ctx-roomy"), max_session_bytes=64 * 2**20)
    charged = roomy.monitor.store(session, 1, arrived(bare.public())).nbytes
    assert charged >= held, f"charged {charged} bytes for a context SEAL holds {held}+ bytes of"


def test_the_bound_is_seal_sizes_and_grows_with_galois_keys(ctx):
    """The charge follows SEAL's sizes, not the values: the conjugation key adds one key-switching key's width
    (and 1.5 for SEAL's pool), and the bound stays above what is certainly held."""
    bare = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)
    with_key = ckks_wire.context_from_wire(ckks_wire.context_to_wire(ctx.public()))
    without = ckks_wire.context_from_wire(ckks_wire.context_to_wire(bare.public()))
    one_key = 3 * 2 * 4 * 8192 * 8  # 3 data primes' pairs of polynomials over 4 primes, 8-byte words
    assert context_memory.held_bytes(with_key) - context_memory.held_bytes(without) == int(1.5 * one_key)
    assert context_memory.held_bytes(without) >= _seal_lower_bound(without)


# ------------------------------------------------------------------ 4. a context past the message limit


@pytest.mark.slow
def test_a_context_past_the_message_limit_is_one_line_that_names_the_galois_keys(spawn, connect):
    """An honest user's context with Galois keys is tens of MB (a depth-4 one 171 MB of the 256 MB default
    limit): past the worker's limit (here 16 MB), the send must fail before anything leaves with one line that
    says the Galois keys make it big and how to do without, not a dropped connection; the same connection then
    stores and computes on a ciphertext under a context without them."""
    from veil.exceptions import SerializationError

    from network_helpers import base_args

    wp = spawn("alice", base_args(["--max-message-mb", "16"]))
    alice = connect(wp)
    x = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    rotating = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60))
    with pytest.raises(SerializationError) as refused:
        ckks.encrypt(x, rotating).send(alice)
    text = _one_line(refused.value)
    assert "exceeds worker 'alice'" in text and "Galois keys" in text and "galois_keys=False" in text
    bare = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)
    doubled = (ckks.encrypt(x, bare).send(alice) * 2.0).get().decrypt(bare).double()
    assert torch.allclose(doubled, 2 * x, atol=1e-4)
