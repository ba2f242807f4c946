"""Red team, second pass: the encrypted evaluation's checks and the CKKS wire after 9228cab, and what it left.

Attackers: the data owner (or a scientist) who holds a CKKS secret key and crafts every byte it sends: a public
context, a ciphertext, a batch for ``veil.he.evaluation.linear_scores``, an operand of ``veil.he.op``. Entry
points: ``ckks_wire.context_from_wire`` / ``tensor_from_wire`` (what a worker runs on every received HE object)
and the two places a ciphertext meets the owner's plaintext (``linear_scores``, the remote product).

Every test asserts the SAFE behaviour; a hole is ``xfail(strict=True)``.
"""

from __future__ import annotations

import re
import struct
import zlib

import pytest
import torch

import veil as sy
from veil.he import ckks, ckks_wire, evaluation as ev, flooding, seal_bytes
from veil.he.errors import CiphertextRefusedError, WireFormatError

from fl_helpers import uid
from test_redteam_he_crypto import _field, _varint, _with_field
from test_redteam_he_eval import _bigger_stored_scale, _zlib_bomb

ts = pytest.importorskip("tenseal")

D, M, B = 4, 2, 3
SIGMA = flooding.sigma(2.0**40, product=True)


@pytest.fixture(scope="module")
def ctx():
    return ev.default_context()


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"not a one-line error: {text!r}"
    return text


def _peak_mb_during(fn) -> float:
    """The growth of this process's peak resident memory while ``fn`` runs (Linux: the peak is reset first)."""
    def status(name):
        return int(re.search(rf"{name}:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak resident memory here")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


# ------------------------------------------------------------------ crafted SEAL bytes


def _message(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _seal(version: bytes, mode: int, body: bytes) -> bytes:
    return struct.pack("<HB2sBHQ", 0xA15E, 16, version, mode, 0, 16 + len(body)) + body


def _zstd(parts: list) -> bytes:
    """One zstd frame: raw blocks for bytes, RLE blocks for an int (that many zero bytes; 4 bytes per 128 KiB)."""
    blocks = []
    for part in parts:
        if isinstance(part, int):
            for at in range(0, part, 1 << 17):
                blocks.append((1, min(1 << 17, part - at), b"\x00"))
        else:
            blocks.extend((0, len(part[at:at + (1 << 17)]), part[at:at + (1 << 17)])
                          for at in range(0, len(part), 1 << 17))
    out = struct.pack("<I", 0xFD2FB528) + bytes([0x00, 0x38])  # no content size, a 128 KiB window
    for i, (kind, size, content) in enumerate(blocks):
        out += (size << 3 | kind << 1 | (i == len(blocks) - 1)).to_bytes(3, "little") + content
    return out


def _galois_keys_of_zeros(ctx, n_indexes: int) -> list:
    """SEAL's serialization of Galois keys (KSwitchKeys) at ``n_indexes`` rotation indexes, every key a valid
    ciphertext of zeros at the key level: bytes for the headers, ints for the runs of zeros."""
    return _keys_of_zeros(ctx, n_indexes=n_indexes)


def _keys_of_zeros(ctx, layout: dict | None = None, n_indexes: int = 0) -> tuple:
    """SEAL's serialization of KSwitchKeys with ``layout[index]`` parts of zeros at each index (by default one
    honest key, ``k - 1`` parts, at each of ``n_indexes`` indexes): the parts (bytes for the headers, ints for
    the runs of zeros) and SEAL's version bytes."""
    version = _field(ctx.serialize(), 1)[3:5]
    data = ctx.raw.seal_context().data
    parms_id, parms = tuple(data.key_parms_id()), data.key_context_data().parms()
    n, k = parms.poly_modulus_degree(), len(parms.coeff_modulus())
    if layout is None:
        layout = {index: k - 1 for index in range(n_indexes)}
    words = 2 * k * n
    array = struct.pack("<HB2sBHQ", 0xA15E, 16, version, 0, 0, 24 + 8 * words) + struct.pack("<Q", words)
    members = struct.pack("<4Q", *parms_id) + b"\x01" + struct.pack("<QQQdQ", 2, n, k, 1.0, 1) + array
    key_head = struct.pack("<HB2sBHQ", 0xA15E, 16, version, 0, 0, 16 + len(members) + 8 * words) + members
    count = max(layout) + 1 if layout else 0
    parts = [struct.pack("<4Q", *parms_id) + struct.pack("<Q", count)]
    for index in range(count):
        parts[-1] += struct.pack("<Q", layout.get(index, 0))
        for _ in range(layout.get(index, 0)):
            parts[-1] += key_head
            parts += [8 * words, b""]
    return [p for p in parts if p != b""], version


def _context_bomb(ctx, n_indexes: int, compression: str) -> bytes:
    """``ctx``'s public context bytes with a second public member holding Galois keys of zeros (protobuf merges
    it: TenSEAL loads them), SEAL-compressed with zstd (RLE blocks) or zlib."""
    parts, version = _galois_keys_of_zeros(ctx, n_indexes)
    if compression == "zstd":
        blob = _seal(version, 2, _zstd(parts))
    else:
        blob = _seal(version, 1, zlib.compress(b"".join(bytes(p) if isinstance(p, int) else p for p in parts), 9))
    return ctx.serialize() + _message(2, _message(5, blob))


def _crafted_conjugation_key(ctx) -> bytes:
    """SEAL's serialization (uncompressed) of Galois keys holding only the conjugation key (element 2n - 1, index
    n - 1), each of its parts the ciphertext (0, 16): a key switch with it adds to c1 only phi(c1)'s digits
    over 2**56 (an all-zero one makes the conjugate transparent, which SEAL refuses)."""
    version = _field(ctx.serialize(), 1)[3:5]
    data = ctx.raw.seal_context().data
    parms_id, parms = tuple(data.key_parms_id()), data.key_context_data().parms()
    n, k = parms.poly_modulus_degree(), len(parms.coeff_modulus())
    polys = struct.pack(f"<{k * n}Q", *[0] * (k * n)) + struct.pack(f"<{k * n}Q", *[1 << 4] * (k * n))
    array = struct.pack("<HB2sBHQ", 0xA15E, 16, version, 0, 0, 24 + len(polys)) + struct.pack("<Q", 2 * k * n)
    members = struct.pack("<4Q", *parms_id) + b"\x01" + struct.pack("<QQQdQ", 2, n, k, 1.0, 1) + array + polys
    key = struct.pack("<HB2sBHQ", 0xA15E, 16, version, 0, 0, 16 + len(members)) + members
    body = struct.pack("<4Q", *parms_id) + struct.pack("<Q", n) + struct.pack("<Q", 0) * (n - 1) \
        + struct.pack("<Q", k - 1) + key * (k - 1)
    return _seal(version, 0, body)


def _context_wire(data: bytes) -> dict:
    return {"he": "ckks", "kind": "context", "v": 1, "data": data}


# ------------------------------------------------------------------ 2. contexts: compression bombs


@pytest.mark.parametrize("compression,n_indexes", [("zstd", 100), ("zlib", 16)])
def test_a_context_whose_galois_keys_inflate_is_refused_before_tenseal_loads_it(ctx, compression, n_indexes):
    """Attack (resources): a public context whose Galois keys are valid keys of zeros at 100 rotation indexes,
    zstd-compressed: 40 kB on the wire that TenSEAL loaded as 160 MB of keys (8192 indexes: 13 GB from 3 MB;
    the session quota charges a context what it took on the wire). zlib does the same at ~1000:1.
    Must hold: refused in one line, before SEAL inflates it (the peak memory grows by far less than the keys),
    and an honest context still loads."""
    bomb = _context_bomb(ctx, n_indexes, compression)
    assert len(bomb) < len(ctx.serialize()) + 200_000, "harness: the crafted keys are not compressed"
    refused = []

    def load():
        with pytest.raises(WireFormatError) as caught:
            ckks_wire.context_from_wire(_context_wire(bomb))
        refused.append(caught.value)

    grew = _peak_mb_during(load)
    if compression == "zstd":  # (160 MB of keys; the zlib harness itself holds its 25 MB of zeros)
        assert grew < 48, f"loading the context held {grew:.0f} MB more"
    assert "compression bomb" in _one_line(refused[0])
    honest = ckks_wire.context_from_wire(ckks_wire.context_to_wire(ctx))
    assert honest.key_id == ctx.key_id


def _parameters_bytes(degree: int, bits: list, tmp_path) -> bytes:
    """SEAL's serialization of CKKS encryption parameters (sealapi writes them to a file only)."""
    sa = pytest.importorskip("tenseal.sealapi")
    parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(degree)
    parms.set_coeff_modulus(sa.CoeffModulus.Create(degree, bits))
    path = str(tmp_path / "parameters")
    parms.save(path)
    return open(path, "rb").read()


def test_a_context_declaring_a_big_ring_of_many_primes_is_refused_before_seal_builds_it(ctx, tmp_path):
    """Attack (resources): a context whose encryption parameters (a few hundred bytes; protobuf keeps the last
    copy) declare a 32768 ring of 32 primes of 27 bits (864 bits, within 128-bit security): SEAL builds NTT and RNS
    tables at every level of the chain, 1.1 GB and 2 s of CPU, before TenSEAL finds that the keys do not match.
    Must hold: refused in one line, the peak memory growing by far less, and an honest context still loads."""
    bomb = ctx.serialize() + _message(1, _parameters_bytes(32768, [27] * 32, tmp_path))
    refused = []

    def load():
        with pytest.raises(WireFormatError) as caught:
            ckks_wire.context_from_wire(_context_wire(bomb))
        refused.append(caught.value)

    grew = _peak_mb_during(load)
    assert grew < 64, f"loading the context held {grew:.0f} MB more"
    assert "primes" in _one_line(refused[0])
    assert ckks_wire.context_from_wire(ckks_wire.context_to_wire(ctx)).key_id == ctx.key_id


def test_an_honest_context_and_its_ciphertexts_of_other_parameters_still_load():
    """The bounds refuse no honest context or ciphertext a README user would make: a 16384 ring of four levels
    (context(depth=4)) and its fresh, multiplied and reduced ciphertexts load over the wire and decrypt to
    torch's values."""
    big = ckks.context(depth=4, galois_keys=False)
    public = ckks_wire.context_from_wire(ckks_wire.context_to_wire(big))
    x = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
    enc = ckks.encrypt(x, big)
    for computed, expected in ((enc, x), (enc * enc, x * x), (enc * torch.tensor([2.0, 3.0, -1.0]),
                                                              x * torch.tensor([2.0, 3.0, -1.0]).double())):
        back = ckks_wire.tensor_from_wire(ckks_wire.tensor_to_wire(computed), public)
        assert torch.allclose(ckks_wire.tensor_from_wire(ckks_wire.tensor_to_wire(back), big).decrypt().double(),
                              expected, atol=1e-4)


# ------------------------------------------------------------------ 1. around the ciphertext bound


def test_a_vector_of_many_ciphertexts_is_refused_before_they_are_loaded(ctx):
    """Attack (resources, around _check_loaded): TenSEAL's CKKSVector holds a repeated ``ciphertexts`` field and
    loads every entry before anyone can count them; 9228cab's count and entropy checks ran after the load. One
    segment of 200 zlib bombs of ~500 bytes held 200 valid ciphertexts of 393 kB (a peak of 128 MB from 100 kB).
    Must hold: refused in one line, the peak memory growing by far less than that."""
    honest = ts.ckks_vector(ctx.raw, [1.0])
    one = _field(_zlib_bomb(ctx, honest), 2)
    crafted = honest.serialize() + _message(2, one) * 200
    wire = ckks_wire.tensor_to_wire(ckks.CKKSTensor(ctx, [honest], (1,), torch.float32))
    wire["segments"] = [crafted]
    refused = []

    def load():
        with pytest.raises(WireFormatError) as caught:
            ckks_wire.tensor_from_wire(wire, ctx)
        refused.append(caught.value)

    grew = _peak_mb_during(load)
    _one_line(refused[0])
    assert grew < 24, f"loading one segment held {grew:.0f} MB more"


def test_a_lone_odd_scale_is_no_oracle_on_which_weight_rows_are_zero(ctx):
    """Attack (error oracle in 9228cab's check): the scale check ran on each product with a weight row, and a
    zero row is skipped. A batch whose feature j alone stores scale 2**55 was refused when W[j] != 0 and
    evaluated when W[j] == 0: d queries gave which features the model ignores. Must hold: refused either way,
    with the same message."""
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    honest = ev.encrypt_batch(x, ctx, M)
    crafted = list(honest.segments)
    crafted[1] = _bigger_stored_scale(ctx, crafted[1])
    batch = ckks.CKKSTensor(ctx, crafted, (D, M * B), torch.float32)
    w = torch.randn(D, M, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    b = torch.zeros(M, dtype=torch.float64)
    messages = []
    for row in (w[1].clone(), torch.zeros(M, dtype=torch.float64)):
        w[1] = row
        with pytest.raises(CiphertextRefusedError) as refused:
            ev.linear_scores(batch, w, b)
        messages.append(_one_line(refused.value))
    assert messages[0] == messages[1]
    scores = ev.linear_scores(honest, w, b).decrypt().T.double()
    assert torch.allclose(scores, x @ w + b, atol=8 * SIGMA + 1e-5)


# ------------------------------------------------------------------ 3. the remote product's scale


def test_a_remote_product_with_the_owners_values_at_a_crafted_stored_scale_is_refused(hook, ctx):
    """Attack: the scientist sends a ciphertext whose stored scale (TenSEAL's, where it encodes a plaintext
    operand) is 2**55, not its context's 2**40, and multiplies it by the owner's data with veil.he.op: TenSEAL
    encodes every owner value with 15 more bits than the context agreed (and ``mul`` is not sealed). On 9228cab it
    was refused by accident only (the add of _at_product_level failed on the scales), as "failed on protected
    data". Must hold: refused in one line that says why (at the wire, and at the op for a tensor that did not
    come over it), and an honest product still computes."""
    from veil.he import remote

    owner = sy.VirtualWorker(hook, id=uid("he-scale"))
    weights = torch.tensor([3.0, -1.5, 7.25], dtype=torch.float64) / 7
    owner.load(weights.clone(), tags=("#w",), policy="open")
    w = owner.search(["#w"])[0]
    honest = ckks.encrypt(torch.ones(3, dtype=torch.float64), ctx)
    crafted = ckks.CKKSTensor(ctx, [_bigger_stored_scale(ctx, honest.segments[0])], (3,), torch.float64)
    with pytest.raises(Exception) as refused:
        (crafted.send(owner) * w).get()
    assert "scale" in _one_line(refused.value)
    with pytest.raises(CiphertextRefusedError) as at_op:  # (the op's own check, on a tensor not from the wire)
        remote._check_product_scale("mul", crafted * weights, crafted)
    _one_line(at_op.value)
    product = (honest.send(owner) * w).get().decrypt(ctx).double()
    assert torch.allclose(product, weights, atol=1e-4)


def test_the_seal_walk_bounds_what_it_cannot_read_exactly():
    """The bound is an upper bound: a zstd frame of compressed blocks counts 128 KiB each (whatever window or
    content size it declares), raw and RLE blocks their size; unknown compression modes and broken headers are
    refused in one line."""
    version = b"\x04\x01"
    compressed = struct.pack("<I", 0xFD2FB528) + bytes([0x20, 0x01]) + (2 << 1 | 1 | 5 << 3).to_bytes(3, "little") \
        + b"\x00" * 5  # single segment, content size 1, one 5-byte compressed block
    assert seal_bytes.inflated_size(_seal(version, 2, compressed), 1 << 30) == 1 << 17
    assert seal_bytes.inflated_size(_seal(version, 2, _zstd([b"abc", 1 << 20])), 1 << 30) == 3 + (1 << 20)
    for broken in (_seal(version, 7, b""), b"\x5e\xa1" + b"\x00" * 14, _seal(version, 2, b"\x28\xb5\x2f")):
        with pytest.raises(WireFormatError) as refused:
            seal_bytes.inflated_size(broken, 1 << 30)
        _one_line(refused.value)


def test_a_worker_refuses_a_context_bomb_in_one_line_and_still_serves(hook, ctx):
    """The same Galois-key bomb as a stored object sent to a worker (what a scientist's ObjectMessage carries):
    refused in one line, and the worker then stores and computes on an honest ciphertext with its context."""
    from veil.ids import new_id
    from veil.messaging.messages import ObjectMessage, StoredObject

    class CraftedContext(ckks.CKKSContext):
        def __init__(self, data: bytes):
            self._data = data

        def serialize(self, secret_key: bool = False) -> bytes:
            return self._data

    owner = sy.VirtualWorker(hook, id=uid("he-ctx-bomb"))
    with pytest.raises(Exception) as refused:
        hook.local_worker.send_msg(ObjectMessage([StoredObject(new_id(), CraftedContext(
            _context_bomb(ctx, 100, "zstd")))]), owner)
    assert "compression bomb" in _one_line(refused.value)
    x = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    doubled = (ckks.encrypt(x, ctx).send(owner) * 2.0).get().decrypt(ctx).double()
    assert torch.allclose(doubled, 2 * x, atol=1e-4)


# ------------------------------------------------------------------ 1. the sealing's fresh zero


def _key_of_constant(ctx, value: int, tmp_path):
    """A SEAL secret key, at ``ctx``'s key level, of the constant polynomial ``value`` (NTT words all ``value``):
    decrypting with value 2 and value 1 and subtracting gives a ciphertext's c1 alone, decoded."""
    sa = pytest.importorskip("tenseal.sealapi")
    data = ctx.raw.seal_context().data
    version = _field(ctx.serialize(), 1)[3:5]
    words = [value] * (len(data.key_context_data().parms().coeff_modulus()) * ctx.slots * 2)
    array = struct.pack("<HB2sBHQ", 0xA15E, 16, version, 0, 0, 24 + 8 * len(words)) + struct.pack("<Q", len(words))
    members = struct.pack("<4Q", *data.key_parms_id()) + struct.pack("<Qd", len(words), 1.0) + array \
        + struct.pack(f"<{len(words)}Q", *words)
    path = str(tmp_path / f"key{value}")
    with open(path, "wb") as f:
        f.write(struct.pack("<HB2sBHQ", 0xA15E, 16, version, 0, 0, 16 + len(members)) + members)
    key = sa.SecretKey()
    key.load(data, path)
    return key


def _c1_decoded(ctx, segment, tmp_path) -> torch.Tensor:
    sa = pytest.importorskip("tenseal.sealapi")
    data = ctx.raw.seal_context().data
    values = []
    for constant in (1, 2):
        plain = sa.Plaintext()
        sa.Decryptor(data, _key_of_constant(ctx, constant, tmp_path)).decrypt(segment.ciphertext()[0], plain)
        values.append(torch.tensor(sa.CKKSEncoder(data).decode_double(plain), dtype=torch.float64))
    return values[1] - values[0]


@pytest.mark.xfail(strict=True, reason="LIMIT: the fresh encryptions of zero that rerandomize and seal a result are "
                                       "made with the requester's public key, which nothing checks is an RLWE "
                                       "sample: pk = (0, p) gives (0, u) with u ternary, so c1 carries the scores "
                                       "unflooded (a = b/t for small b, t does the same and looks uniform; its own "
                                       "conjugation key (0, 16) keeps the real part's c + conj(c) from mixing it). Needs a "
                                       "public key whose a is expanded from a hashed seed, or a proof that it is "
                                       "well formed. Re-checked (he_keys): a pinned a suffices for this hole (u*a + e1 "
                                       "masks c1; a crafted b = -R*a reads only c0 + R*c1, what an input R times "
                                       "larger gives: the range LIMIT); the key holder sets b = b' + (a' - a)*s. Not "
                                       "done: sealapi reads key words one call each (0.2 s a received ring-8192 "
                                       "context, 0.5 s a created one, seconds at 32768)")
def test_a_crafted_public_key_leaves_the_scores_c1_unreadable(ctx, tmp_path):
    """Attack (the sealing, second pass): the data owner sends a public context whose public key is (0, p), p the
    special prime as a constant polynomial (SEAL loads it: every word is below its prime). Encrypting zero under
    it gives round((p*u + e)/p) = (0, u): no randomness beyond a ternary u. Its batch is (0, encode(x_j)), so the
    scores' c1 is x @ W times the encoding, plus the layer's rounding: decrypting with two constant keys (1, 2)
    and subtracting reads it. Must hold: c1 gives x @ W no finer than the flooding (SIGMA / 4); with an honest
    public key it is noise of ~1e7."""
    from test_redteam_he_crypto import _Encoder, _seal_ciphertext

    data = ctx.raw.seal_context().data
    version = _field(ctx.serialize(), 1)[3:5]
    primes = [m.value() for m in data.key_context_data().parms().coeff_modulus()]
    pk1 = [word for q in primes for word in [primes[-1] % q] * ctx.slots * 2]
    crafted_key = _seal_ciphertext(version, tuple(data.key_parms_id()), 1.0, [0] * len(pk1) + pk1, len(primes))
    # (and its own conjugation key: the real part that linear_scores keeps, c + conj(c), then adds ~nothing to c1)
    public = ckks_wire.context_from_wire(_context_wire(ctx.serialize() + _message(2, _message(1, crafted_key))
                                                       + _message(2, _message(5, _crafted_conjugation_key(ctx)))))
    g = torch.Generator().manual_seed(21)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, M, generator=g, dtype=torch.float64) / 7
    encoder, segments = _Encoder(), []
    for j in range(D):
        honest = ts.ckks_vector(public.raw, x[:, j].repeat(M).tolist())
        raw = honest.ciphertext()[0]
        k = raw.coeff_modulus_size()
        c1 = encoder.ntt(x[:, j].repeat(M).tolist(), raw.scale, k)
        blob = _seal_ciphertext(version, raw.parms_id(), raw.scale, [0] * (k * ctx.slots * 2) + c1, k)
        segments.append(ts.ckks_vector_from(public.raw, _with_field(honest.serialize(), 2, blob)))
    scores = ev.linear_scores(ckks.CKKSTensor(public, segments, (D, M * B), torch.float32), w, torch.zeros(M))
    # (the sealing's mask is 1/2 where it keeps the real part, c + conj(c): the crafted key adds ~0 to c1)
    read = 2 * _c1_decoded(ctx, scores.segments[0], tmp_path)[:M * B].reshape(M, B).T
    assert (read - x @ w).abs().max() > SIGMA / 4, "the scores' c1 gave x @ W finer than the flooding"
