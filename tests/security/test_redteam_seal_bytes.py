"""Red team, third pass: veil.he.seal_bytes itself, the hand-written reader of the CKKS bytes a worker receives.

Attackers: anyone who sends a worker an encrypted object (a scientist, a serving client, a peer), crafting every
byte of a TenSEAL context or vector. The reader is an attack surface of its own: where it and TenSEAL's protobuf or
SEAL read the same bytes differently, the bound holds on one thing while another is loaded; its own walk must cost
bounded memory and time; and what it lets through must not crash TenSEAL (a segfault takes the worker down).

Every test asserts the SAFE behaviour; a hole is ``xfail(strict=True)``.
"""

from __future__ import annotations

import os
import struct
import time
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from veil.he import ckks, ckks_wire, evaluation as ev, seal_bytes
from veil.he.errors import WireFormatError

from test_redteam_he_crypto import _field, _varint
from test_redteam_he_eval import _zlib_bomb
from test_redteam_he_eval_second import _one_line, _peak_mb_during  # noqa: F401

ts = pytest.importorskip("tenseal")


@pytest.fixture(scope="module")
def ctx():
    return ev.default_context()


def _message(number: int, value: bytes, key: bytes | None = None) -> bytes:
    return (key if key is not None else _varint(number << 3 | 2)) + _varint(len(value)) + value


def _seal(mode: int, body: bytes) -> bytes:
    return struct.pack("<HB2sBHQ", 0xA15E, 16, b"\x04\x01", mode, 0, 16 + len(body)) + body


def _vector_wire(ctx, segment_bytes: bytes) -> dict:
    wire = ckks_wire.tensor_to_wire(ckks.encrypt(torch.ones(1, dtype=torch.float64), ctx))
    wire["segments"] = [segment_bytes]
    return wire


# ------------------------------------------------------------------ 1. protobuf: reader and TenSEAL disagree

#: the key of field 2, length-delimited (0x12), as a 5-byte varint whose bit 32 is set: protobuf reads a key as
#: 32 bits and drops it (field 2), the reader read field 2**29 + 2 and skipped it
_HIDDEN_FIELD_2 = bytes([0x92, 0x80, 0x80, 0x80, 0x10])


def test_a_key_past_32_bits_hides_no_ciphertext_from_the_count(ctx):
    """Attack (the bound checked on one thing, another loaded): one honest ciphertext and 200 zlib bombs in one
    segment, the bombs under a field key whose varint sets bit 32. TenSEAL's protobuf truncates the key to field 2
    and loads all 201 ciphertexts (a peak of ~80 MB from 100 kB); the reader saw one. Must hold: refused in one
    line before TenSEAL loads it, the peak memory growing by far less."""
    honest = ts.ckks_vector(ctx.raw, [1.0])
    hidden = _message(2, _field(_zlib_bomb(ctx, honest), 2), key=_HIDDEN_FIELD_2)
    assert len(ts.ckks_vector_from(ctx.raw, honest.serialize() + hidden).ciphertext()) == 2, \
        "harness: TenSEAL does not read the overlong key as field 2"
    crafted = honest.serialize() + hidden * 200
    with pytest.raises(WireFormatError) as early:
        seal_bytes.check_vector_bytes(crafted)
    _one_line(early.value)
    refused = []

    def load():
        with pytest.raises(WireFormatError) as caught:
            ckks_wire.tensor_from_wire(_vector_wire(ctx, crafted), ctx)
        refused.append(caught.value)

    grew = _peak_mb_during(load)
    _one_line(refused[0])
    assert grew < 24, f"loading one segment held {grew:.0f} MB more"


def test_a_key_past_32_bits_hides_no_encryption_parameters(ctx, tmp_path):
    """Attack (the same disagreement, on a context): encryption parameters declaring a 32768 ring of 32 primes
    (1.1 GB of SEAL tables, built before any key is checked) under field 1's key with bit 32 set: protobuf keeps
    them as the last copy of field 1, the reader saw an unknown field and checked the honest copy only. Must hold:
    refused in one line by the reader (this test does not let TenSEAL build the tables)."""
    from test_redteam_he_eval_second import _parameters_bytes

    hidden = _message(1, _parameters_bytes(32768, [27] * 32, tmp_path), key=bytes([0x8A, 0x80, 0x80, 0x80, 0x10]))
    with pytest.raises(WireFormatError) as refused:
        seal_bytes.check_context_bytes(ctx.serialize() + hidden)
    _one_line(refused.value)


def test_keys_protobuf_reads_alike_still_load(ctx):
    """Guard: an overlong key that protobuf reads as the same field (5 bytes, high bits zero) is read alike, and
    keys or values longer than protobuf reads are refused in one line, never loaded as something else."""
    honest = ts.ckks_vector(ctx.raw, [1.5]).serialize()
    padded = _message(1, _field(honest, 1)) + _message(2, _field(honest, 2), key=bytes([0x92, 0x80, 0x80, 0x80, 0x00]))
    assert honest[-9] == 0x19, "harness: the scale (field 3, fixed64) is not last"
    padded += honest[-9:]
    assert seal_bytes.check_vector_bytes(padded) == ctx.global_scale
    loaded = ckks_wire.tensor_from_wire(_vector_wire(ctx, padded), ctx)
    assert abs(loaded.decrypt(ctx).double()[0].item() - 1.5) < 1e-4
    for broken in (honest + bytes([0x92] + [0x80] * 9 + [0x00]),  # an 11-byte varint
                   honest + bytes([0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]),  # a length past the message
                   honest + bytes([0x0B])):  # a group (wire type 3)
        with pytest.raises(WireFormatError) as refused:
            seal_bytes.check_vector_bytes(broken)
        _one_line(refused.value)


@pytest.mark.parametrize("sizes", [bytes([0x0A, 0x02, 0x01, 0x01]), bytes([0x08, 0x01, 0x08, 0x01]), b""],
                         ids=["packed-two", "repeated-two", "none"])
def test_a_vector_must_hold_one_size_beside_its_one_ciphertext(ctx, sizes):
    """Attack (nested and duplicated fields): TenSEAL appends every ``sizes`` entry (packed or not) and sums them
    as the vector's size: sizes [1, 1] beside one ciphertext passed the shape check as a tensor of 2 and
    decrypted to 1 value (a bare RuntimeError at the key owner). Must hold: refused in one line at the wire."""
    honest = ts.ckks_vector(ctx.raw, [1.0, 2.0]).serialize()
    crafted = sizes + _message(2, _field(honest, 2)) + honest[-9:]
    wire = _vector_wire(ctx, crafted)
    wire["shape"] = [2]
    with pytest.raises(WireFormatError) as refused:
        ckks_wire.tensor_from_wire(wire, ctx)
    _one_line(refused.value)


# ------------------------------------------------------------------ 2. contexts TenSEAL cannot hold safely


def _small_context(**options):
    raw = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60], **options)
    raw.global_scale = 2**40
    return raw


def _without_public_key():
    return _small_context().serialize(save_secret_key=False, save_public_key=False, save_galois_keys=False,
                                      save_relin_keys=False)


def _secret_without_public_key():
    return _small_context().serialize(save_secret_key=True, save_public_key=False, save_galois_keys=False,
                                      save_relin_keys=False)


def _public_key_emptied_by_a_later_copy():
    """protobuf merges a second public member into the first: its empty public key replaces the real one."""
    return _small_context().serialize(save_secret_key=False, save_galois_keys=False) + _message(2, _message(1, b""))


def _secret_asking_for_galois_keys():
    """A secret key whose private member says 'Galois keys generated': TenSEAL generates them on load (80 MB and
    0.5 s of CPU from 260 kB under an 8192 ring; 170 MB under 16384)."""
    data = _small_context().serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    return data + _message(3, bytes([0x18, 0x01]))


def _symmetric_with_secret_key():
    return _small_context(encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC).serialize(save_secret_key=True,
                                                                                  save_galois_keys=False)


def _bfv_context():
    """A BFV context (SEAL takes the scheme from the parameters' bytes): veil held it as a CKKS context."""
    return ts.context(ts.SCHEME_TYPE.BFV, 8192, plain_modulus=1032193).serialize(save_secret_key=False,
                                                                                save_galois_keys=False)


@pytest.mark.parametrize("craft", [_without_public_key, _bfv_context, _public_key_emptied_by_a_later_copy, _secret_without_public_key,
                                   _secret_asking_for_galois_keys, _symmetric_with_secret_key], ids=lambda f: f.__name__.strip("_"))
def test_a_context_tenseal_cannot_hold_safely_is_refused_before_it_loads(ctx, craft):
    """Attack (crash, resources): a context with no public key passed every bound and TenSEAL segfaulted when
    veil took its key id (a 100-byte context killed the worker); a secret key with the 'Galois keys generated'
    flag makes TenSEAL generate them on load; a symmetric one with a secret key raised a bare ValueError; a BFV
    one was held as a CKKS context. A context on the wire is public and CKKS. Must hold: the reader refuses each in one line (so TenSEAL never loads it),
    and an honest public context still loads."""
    data = craft()
    with pytest.raises(WireFormatError) as early:
        seal_bytes.check_context_bytes(data)
    _one_line(early.value)
    with pytest.raises(WireFormatError) as refused:
        ckks_wire.context_from_wire({"he": "ckks", "kind": "context", "v": 1, "data": data})
    _one_line(refused.value)
    assert ckks_wire.context_from_wire(ckks_wire.context_to_wire(ctx)).key_id == ctx.key_id
    merged = ckks_wire.context_to_wire(ctx)
    merged["data"] += _message(2, b"")  # an empty second public member keeps the key: still loads
    assert ckks_wire.context_from_wire(merged).key_id == ctx.key_id


def test_a_worker_refuses_a_context_without_a_public_key_and_still_serves(hook, ctx):
    """The crash as a stored object sent to a worker (what a scientist's ObjectMessage carries): 100 bytes of
    context without a public key took the worker process down (segfault). Must hold: refused in one line, and the
    worker then stores and computes on an honest ciphertext with its context."""
    import veil as sy
    from veil.ids import new_id
    from veil.messaging.messages import ObjectMessage, StoredObject

    from fl_helpers import uid

    class CraftedContext(ckks.CKKSContext):
        def __init__(self, data: bytes):
            self._data = data

        def serialize(self, secret_key: bool = False) -> bytes:
            return self._data

    owner = sy.VirtualWorker(hook, id=uid("seal-no-pk"))
    with pytest.raises(Exception) as refused:
        hook.local_worker.send_msg(ObjectMessage([StoredObject(new_id(), CraftedContext(_without_public_key()))]),
                                   owner)
    assert "public key" in _one_line(refused.value)
    x = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    doubled = (ckks.encrypt(x, ctx).send(owner) * 2.0).get().decrypt(ctx).double()
    assert torch.allclose(doubled, 2 * x, atol=1e-4)


# ------------------------------------------------------------------ 3. the walk's own cost


def test_a_message_of_many_small_fields_is_walked_in_bounded_memory(ctx):
    """Attack (resources, the reader itself): 6 MB of unknown one-byte varint fields after an honest vector. The
    reader listed every field as a tuple (3M of them: ~250 MB and seconds of CPU from 6 MB; a 256 MB message,
    10 GB). Must hold: refused in one line, the peak memory growing by a few MB."""
    crafted = ts.ckks_vector(ctx.raw, [1.0]).serialize() + bytes([0x78, 0x00]) * (3 << 20)
    refused = []

    def walk():
        with pytest.raises(WireFormatError) as caught:
            seal_bytes.check_vector_bytes(crafted)
        refused.append(caught.value)

    grew = _peak_mb_during(walk)
    _one_line(refused[0])
    assert grew < 16, f"walking the fields held {grew:.0f} MB more"


def test_the_zlib_walk_reads_its_input_once(monkeypatch):
    """Attack (CPU, quadratic): a zlib stream of stored blocks inflates 1:1, so the walk hands zlib back the
    unconsumed tail after each 1 MiB of output: a copy of the rest of the input every time (8 MB: 36 MB copied;
    256 MB: 32 GB). Must hold: the bytes given to zlib add up to about the stream's size."""
    body = zlib.compress(os.urandom(8 << 20), 0)
    fed = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self):
            self.inner = real()

        def decompress(self, data, max_length=0):
            fed.append(len(data))
            return self.inner.decompress(data, max_length)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(seal_bytes.zlib, "decompressobj", Counting)
    assert seal_bytes.inflated_size(_seal(1, body), 1 << 30) == 8 << 20
    assert sum(fed) < 2 * len(body), f"zlib was fed {sum(fed) >> 20} MB for a {len(body) >> 20} MB stream"


@pytest.mark.parametrize("unit", [(0).to_bytes(3, "little"),  # an empty raw block, not the last
                                  struct.pack("<II", 0x184D2A50, 0)],  # an empty skippable frame
                         ids=["empty-blocks", "skippable-frames"])
def test_a_zstd_stream_of_empty_units_is_walked_in_bounded_time(unit):
    """Attack (CPU, the reader itself): 24 MB of zstd units that decode to nothing (empty raw blocks of 3 bytes,
    empty skippable frames of 8): a Python loop of millions of steps per segment (~5 s), where zstd's C loop
    takes milliseconds. Must hold: refused in one line, in well under a second."""
    if unit.startswith(b"\x50"):
        body = unit * (3 << 20)
    else:
        body = struct.pack("<I", 0xFD2FB528) + bytes([0x00, 0x38]) + unit * (8 << 20) + (1).to_bytes(3, "little")
    blob = _seal(2, body)
    started = time.process_time()
    with pytest.raises(WireFormatError) as refused:
        seal_bytes.inflated_size(blob, 1 << 20)
    took = time.process_time() - started
    _one_line(refused.value)
    assert took < 0.5, f"the walk took {took:.1f} s of CPU"


# ------------------------------------------------------------------ 4. bounds that hold (guards)


def test_what_the_walk_counts_is_at_least_what_seal_reads():
    """Guard: zstd frames are summed (SEAL reads the first; the walk counts every one), a lying content size does
    not lower the count, a zlib stream is counted to its end and trailing data or a second stream is not
    inflated, and a stream inflating to exactly the bound passes where one more byte is refused."""
    raw = struct.pack("<I", 0xFD2FB528) + bytes([0x20, 0x01])  # single segment, content size 1 (a lie)
    frame = raw + ((1 << 17) << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"\x00"  # the last block: RLE, 128 KiB
    assert seal_bytes.inflated_size(_seal(2, frame * 3), 1 << 30) == 3 << 17
    bound = seal_bytes.INFLATION_FLOOR
    exact = zlib.compress(b"\x00" * bound, 9)
    assert seal_bytes.inflated_size(_seal(1, exact + exact), bound) == bound
    assert seal_bytes.inflated_size(_seal(1, exact + b"trailing"), bound) == bound
    with pytest.raises(WireFormatError):
        seal_bytes._check_inflation([_seal(1, zlib.compress(b"\x00" * (bound + 1), 9))], 10, "ciphertext")
    seal_bytes._check_inflation([_seal(1, exact)], 10, "ciphertext")


# ------------------------------------------------------------------ 5. random and mutated bytes


def _mutated(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for at, kind, byte in edits:
        at %= max(len(out), 1)
        if kind == 0:
            out[at] = byte
        elif kind == 1:
            out.insert(at, byte)
        elif kind == 2 and len(out) > 1:
            del out[at]
    return bytes(out)


_EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 2), st.integers(0, 255)), min_size=1,
                  max_size=4)


@pytest.fixture(scope="module")
def honest_bytes(ctx):
    vector = ts.ckks_vector(ctx.raw, [0.25, -1.0])
    head = vector.serialize()
    return ctx, head


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=_EDITS, cut=st.integers(0, 64))
def test_mutated_vector_bytes_are_refused_in_one_line_or_load_as_tenseal_reads_them(honest_bytes, edits, cut):
    """Property: honest vector bytes with a few bytes changed, inserted or deleted near the protobuf and SEAL
    headers (where the reader decides), or cut short, give a one-line WireFormatError or a tensor that TenSEAL
    reads the same way (same size, same stored scale); never another exception."""
    ctx, data = honest_bytes
    edits = [(at % 96 if i % 2 else at, kind, byte) for i, (at, kind, byte) in enumerate(edits)]
    crafted = _mutated(data, edits)[:len(data) - cut] if cut else _mutated(data, edits)
    try:
        loaded = ckks_wire.tensor_from_wire(_vector_wire(ctx, crafted), ctx)
    except WireFormatError as exc:
        _one_line(exc)
        return
    direct = ts.ckks_vector_from(ctx.raw, crafted)
    assert loaded.segments[0].size() == direct.size() and direct.scale() == ctx.global_scale


@settings(max_examples=80, deadline=None)
@given(data=st.binary(max_size=96), prefix=st.sampled_from([b"", b"\x0a\x00\x12", b"\x12\x20\x5e\xa1\x10\x04\x01"]))
def test_random_bytes_are_refused_by_the_walk_in_one_line(data, prefix):
    """Property: random bytes (after a prefix that starts the fields the reader follows) give a one-line
    WireFormatError or pass, never another exception, from both checks."""
    for check in (seal_bytes.check_vector_bytes, seal_bytes.check_context_bytes):
        try:
            check(prefix + data)
        except WireFormatError as exc:
            _one_line(exc)
