"""Red team, second pass on the HE leftovers (29e4b6c): the conjugation that keeps CKKS scores' real parts, and
the quota's charge for a stored CKKS context.

Attackers: the data owner / scientist who holds the CKKS secret key and crafts its public context (a conjugation
key of its own making, no Galois keys at all) and its ciphertexts (complex slots, one-value segments); a session
storing public contexts on a worker under ``--max-session-mb``.

Holes found and fixed (each test failed on 29e4b6c): a reduction on the owner's data under a context without
the conjugation key (one-value segments need no rotation) gave ``y . w`` in the imaginary part; a Galois key of
fewer parts than data primes aborted the process at the key switch; the quota counted one key per index. Held
(regression guards): a crafted conjugation key (shifted by P, or a rotation's key in its place) gives the key
holder uniform noise, because the model owner's fresh zero is in the c1 it conjugates (without it, the noise
repeated exactly: a function of the key holder's c1 and W).

Every test asserts the SAFE behaviour; a hole is ``xfail(strict=True)``.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

import veil as sy
from veil.he import ckks, ckks_wire, conjugation, evaluation as ev, flooding
from veil.he.errors import ConjugationKeyRequiredError, WireFormatError

from fl_helpers import uid
from test_redteam_he_crypto import _field, _seal_ciphertext
from test_redteam_he_eval_second import _context_wire, _keys_of_zeros, _message, _seal, _zstd
from test_redteam_he_leftovers import _complex_slots, _with_imaginary

ts = pytest.importorskip("tenseal")
sealapi = pytest.importorskip("tenseal.sealapi")

D, M, B = 4, 2, 3
SIGMA = flooding.sigma(2.0**40, product=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"not a one-line error: {text!r}"
    return text


@pytest.fixture(scope="module")
def ctx():
    return ev.default_context()


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(12)
    return torch.randn(D, M, generator=g, dtype=torch.float64), torch.randn(M, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------ 1. a conjugation key the key holder crafted


def _key_parts(keys) -> list[np.ndarray]:
    """The RNS words (NTT form, poly-major: b then a, each prime after prime) of each part of one Galois key."""
    arrays = [part.data().dyn_array() for part in keys]
    return [np.array([words[i] for i in range(words.size())], dtype=np.uint64) for words in arrays]


def _galois_keys_bytes(ctx, index: int, parts: list[np.ndarray]) -> bytes:
    """SEAL's serialization (uncompressed) of Galois keys holding ``parts`` at ``index`` only (element 2n - 1,
    conjugation, is index n - 1)."""
    version = _field(ctx.serialize(), 1)[3:5]
    data = ctx.raw.seal_context().data
    parms_id, parms = tuple(data.key_parms_id()), data.key_context_data().parms()
    n, k = parms.poly_modulus_degree(), len(parms.coeff_modulus())
    entries = [struct.pack("<Q", 0)] * n
    entries[index] = struct.pack("<Q", len(parts)) + b"".join(
        _seal_ciphertext(version, parms_id, 1.0, part.tolist(), k) for part in parts)
    return _seal(version, 0, struct.pack("<4Q", *parms_id) + struct.pack("<Q", n) + b"".join(entries))


def _shifted_conjugation_key(ctx) -> bytes:
    """The honest conjugation key with the special prime P added to its part j's b in prime j (NTT words of the
    constant P): a key switch with it gives c1' * (s(X^-1) + 1), so the 'conjugate' decrypts to
    ``conj(m) + c1'``, the second polynomial of what the model owner conjugated, in plain."""
    data = ctx.raw.seal_context().data
    primes = [q.value() for q in data.key_context_data().parms().coeff_modulus()]
    n, special = ctx.slots * 2, primes[-1]
    parts = _key_parts(conjugation.keys(ctx).key(conjugation.element(ctx)))
    for j, part in enumerate(parts):
        part[j * n:(j + 1) * n] = (part[j * n:(j + 1) * n] + np.uint64(special % primes[j])) % np.uint64(primes[j])
    return _galois_keys_bytes(ctx, n - 1, parts)


def _rotation_key_as_conjugation(ctx) -> bytes:
    """A key for another Galois element (3: a rotation by one slot) stored where the conjugation key goes."""
    data = ctx.raw.seal_context().data
    made = sealapi.GaloisKeys()
    sealapi.KeyGenerator(data, ctx.raw.secret_key().data).create_galois_keys([3], made)
    return _galois_keys_bytes(ctx, ctx.slots * 2 - 1, _key_parts(made.key(3)))


def _public_with_key(ctx, key: bytes) -> ckks.CKKSContext:
    """``ctx``'s public context as the model owner loads it from the wire, with ``key`` as its Galois keys."""
    data = ctx.raw.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                             save_relin_keys=True)
    return ckks_wire.context_from_wire(_context_wire(data + _message(2, _message(5, key))))


@pytest.mark.parametrize("craft", [_shifted_conjugation_key, _rotation_key_as_conjugation])
def test_a_crafted_conjugation_key_gives_the_data_owner_noise_not_the_weights(ctx, model, tmp_path, craft):
    """Attack: the data owner (who makes the conjugation key) crafts it: the honest key plus P (a key switch then
    adds c1', the conjugated ciphertext's second polynomial, to what it decrypts), or the key of a rotation
    stored as the conjugation key. If c1' were the data owner's own c1 times the weights (no randomness of the
    model owner's in it), the scores would carry a linear function of W in plain, beside a batch of
    ``x + i*y``. Must hold: the model owner computes as ever; what comes back is neither ``x @ W + b`` nor
    ``y @ W`` in any part, and changes from one evaluation of the same batch to the next by far more than the
    flooding (c1' carries the model owner's fresh zeros: uniform, no function of W); the model owner then
    scores an honest batch."""
    w, b = model
    g = torch.Generator().manual_seed(13)
    x, y = (torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(2))
    public = _public_with_key(ctx, craft(ctx))
    assert conjugation.keys(public) is not None and not public.has_secret_key
    honest = ev.encrypt_batch(x, ctx, M)
    crafted = [_with_imaginary(seg, y[:, j].repeat(M).tolist(), tmp_path) for j, seg in enumerate(honest.segments)]
    received = ckks_wire.tensor_from_wire(ckks_wire.tensor_to_wire(ckks.CKKSTensor(ctx, crafted, honest.shape,
                                                                                   torch.float32)), public)
    runs = [_complex_slots(ev.linear_scores(received, w, b).segments[0], ctx, M * B).reshape(M, B).T
            for _ in range(2)]
    for scores in runs:
        assert (scores.real - (x @ w + b)).abs().max() > 1.0, "the scores survived a crafted key"
        assert (scores.imag - y @ w).abs().max() > 1.0, "the imaginary parts gave y @ W"
    assert (runs[0] - runs[1]).abs().max() > 1e3 * SIGMA, "what the crafted key showed is no fresh noise"
    ok = ev.linear_scores(ev.encrypt_batch(x, ctx, M), w, b).decrypt(ctx).T.double()
    assert torch.allclose(ok, x @ w + b, atol=8 * SIGMA + 1e-5)


def test_a_remote_dot_under_a_crafted_conjugation_key_gives_noise_not_the_weights(hook, tmp_path):
    """Attack (remote): the scientist's context carries only a conjugation key of its making (the honest one plus
    P: the conjugate decrypts to ``conj(m) + c1'``) and its vector is one-value segments (no rotation needed), so
    the owner's sealing conjugates ``c1 = c1_x * w_i`` summed: a function of the scientist's own c1 and every
    owner value. Must hold: the released number is neither ``x . w`` nor anything that repeats from one approved
    evaluation to the next (c1' carries the worker's fresh zeros)."""
    from veil.exceptions import ReviewPendingError

    weights = torch.tensor([3.0, -1.5, 7.25, 2.0], dtype=torch.float64)
    x = torch.tensor([0.5, 1.0, -1.0, 2.0], dtype=torch.float64)
    owner = sy.VirtualWorker(hook, id=uid("he-craftedconj"))
    owner.load(weights.clone(), tags=("#weights",), policy="review")
    bare = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)
    conjugation.add_conjugation_key(bare)
    public = _public_with_key(bare, _shifted_conjugation_key(bare))  # (sent as is: it holds no secret key)
    enc = ckks.CKKSTensor(public, [ts.ckks_vector(public.raw, [float(v)]) for v in x], (4,), torch.float64)
    sent, released = enc.send(owner), []
    for _ in range(2):
        result = sent.dot(owner.search(["#weights"])[0])
        with pytest.raises(ReviewPendingError) as pending:
            result.get()
        owner.release_requests.approve(pending.value.request_id)
        released.append(_complex_slots(result.get().segments[0], bare, 1)[0])
    assert all(abs(r.real - float(x @ weights)) > 1.0 for r in released), "the dot survived a crafted key"
    assert abs(released[0] - released[1]) > 1e3 * SIGMA, "what the crafted key showed is no fresh noise"


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_a_conjugation_key_of_other_than_one_part_per_prime_is_refused_on_arrival(ctx, hook, parts):
    """Attack: SEAL loads a Galois key of any number of parts (one per data prime is honest: 3 here), and a key
    switch at a level of more primes than the key has parts aborted the process (std::terminate, 'unsigned
    overflow', checked in a subprocess: a worker sealing a reduction, or a model owner, killed by one crafted
    conjugation key); more parts only cost memory. Must hold: such a context is refused on arrival in one line,
    and the worker it was sent to goes on storing and computing."""
    from veil.exceptions import SerializationError

    honest = _key_parts(conjugation.keys(ctx).key(conjugation.element(ctx)))
    crafted = _galois_keys_bytes(ctx, ctx.slots * 2 - 1, (honest * 2)[:parts])
    with pytest.raises(WireFormatError) as refused:
        _public_with_key(ctx, crafted)
    assert "3 parts" in _one_line(refused.value)
    owner = sy.VirtualWorker(hook, id=uid("he-keyparts"))
    public = _public_with_key(ctx, _galois_keys_bytes(ctx, ctx.slots * 2 - 1, honest))
    data = public.raw.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                                save_relin_keys=True) + _message(2, _message(5, crafted))
    hostile = ckks.CKKSContext.from_bytes(data)  # (as the scientist holds it: sent as is)
    with pytest.raises(SerializationError) as at_send:
        ckks.CKKSTensor(hostile, [ts.ckks_vector(hostile.raw, [1.0])], (1,), torch.float64).send(owner)
    _one_line(at_send.value)
    doubled = (ckks.encrypt(torch.tensor([0.5, -2.0]), ctx).send(owner) * 2.0).get().decrypt(ctx).double()
    assert torch.allclose(doubled, torch.tensor([1.0, -4.0], dtype=torch.float64), atol=1e-4)


# ------------------------------------------------------------------ 2. no Galois keys: one-value segments


def test_a_remote_dot_of_one_value_segments_without_galois_keys_gives_no_second_dot(hook, tmp_path):
    """Attack: the scientist's context has no Galois keys (so no conjugation key) and its vector is sent as
    one-value segments, each ``x_i + i*y_i``: ``dot`` with the owner's review data needs no rotation then (a sum of
    products), the sealing kept no real part (no key), and the one approved number's imaginary part was
    ``y . w`` (exact: -1.5 here), a second dot the owner never saw. Must hold: such a reduction is refused
    before any work, in one line that names the conjugation key; the same vector under the same key pair with
    the conjugation key added gives ``x . w`` and an imaginary part of ~0."""
    from veil.exceptions import ReviewPendingError

    weights = torch.tensor([3.0, -1.5, 7.25, 2.0], dtype=torch.float64)
    x = torch.tensor([0.5, 1.0, -1.0, 2.0], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # reads w[1]
    owner = sy.VirtualWorker(hook, id=uid("he-onevalue"))
    owner.load(weights.clone(), tags=("#weights",), policy="review")
    bare = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)

    def one_value_segments(context):
        segs = [_with_imaginary(ts.ckks_vector(context.raw, [float(v)]), [float(i)], tmp_path) for v, i in zip(x, y)]
        return ckks.CKKSTensor(context, segs, (4,), torch.float64)

    with pytest.raises(ConjugationKeyRequiredError) as refused:
        one_value_segments(bare).send(owner).dot(owner.search(["#weights"])[0]).get()
    assert "conjugation key" in _one_line(refused.value) and "add_conjugation_key" in str(refused.value)
    conjugation.add_conjugation_key(bare)
    result = one_value_segments(bare).send(owner).dot(owner.search(["#weights"])[0])
    with pytest.raises(ReviewPendingError) as pending:
        result.get()
    owner.release_requests.approve(pending.value.request_id)
    released = _complex_slots(result.get().segments[0], bare, 1)[0]
    assert abs(released.real - float(x @ weights)) < 1e-3
    assert abs(released.imag) < 1e-4, f"the imaginary part gave y . w = {released.imag}"


# ------------------------------------------------------------------ 3. the quota: every key part SEAL loads


def _zero_parts(ctx, layout: dict) -> bytes:
    """SEAL's zstd serialization of KSwitchKeys with ``layout[index]`` parts of zeros at each index (RLE blocks:
    a few bytes for each 0.5 MB part)."""
    parts, version = _keys_of_zeros(ctx, layout)
    return _seal(version, 2, _zstd(parts))


@pytest.mark.parametrize("member, layout, padding", [
    # Galois keys of zeros at 8 and 12 indexes (relinearization keys at more than one index, as these first were,
    # are now refused on arrival: test_redteam_he_keys)
    (5, {i: 3 for i in range(8)}, 3 << 20),
    (5, {i: 3 for i in range(12)}, 5 << 20),
])
def test_a_context_is_charged_every_key_part_seal_holds(hook, member, layout, padding):
    """Attack: the quota charged a stored context one relinearization key (``has_relin_keys``: one bit) and one
    key per Galois index, but SEAL loads relinearization keys at any number of indexes (and, before the wire
    refused it, any number of parts at one Galois index): zero parts (zstd: bytes each) beside padding that
    lifts the inflation bound (4 times the wire size) held 23 MB charged 15 (70 Galois parts: 49 for 15). Must
    hold: a context is charged at least every key part SEAL holds (8 bytes a word) and its tables; a quota below
    that refuses it in one line and the session stores on."""
    from veil.workers.monitor import Principal, QuotaExceededError

    bare = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)
    data = bare.raw.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                              save_relin_keys=False)
    data += _message(2, _message(member, _zero_parts(bare, layout))) + _message(9, bytes(padding))
    hostile = ckks_wire.context_from_wire(_context_wire(data))
    part = 2 * 4 * 8192 * 8
    held = (1 + sum(layout.values())) * part + 33 * 8192 * 4 * 4  # (keys and the public key; tables)
    session = Principal("hq2", "u", namespace="hq2", isolated=True)
    roomy = sy.VirtualWorker(hook, id=uid("he-parts-roomy"), max_session_bytes=256 * 2**20)
    charged = roomy.monitor.store(session, 1, hostile).nbytes
    assert charged >= held, f"charged {charged} bytes for a context SEAL holds {held}+ bytes of"
    tight = sy.VirtualWorker(hook, id=uid("he-parts-tight"), max_session_bytes=held)
    with pytest.raises(QuotaExceededError) as refused:
        tight.monitor.store(session, 1, hostile)
    _one_line(refused.value)
    assert tight.monitor.store(session, 2, torch.ones(3)).nbytes > 0
