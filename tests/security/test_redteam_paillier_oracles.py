"""Red team: Paillier structural oracles, what anything a worker or a peer returns says about a plaintext it
cannot decrypt (error or success, work done, exponent, size), and what bounds a received tensor.

The attacker holds ciphertexts and chooses keys (any odd modulus passes as one), never the owner's plaintexts:
a scientist runs ``veil.he.op`` on the owner's review data through a real worker's request path
(``serve_bytes``), and a peer hands the key holder crafted ciphertexts to decrypt.

Holes found (strict xfails first, then fixed in ``he/value_free.py``, ``he/paillier.py``,
``he/_paillier_encoding.py`` and ``he/_oblivious_power.py``):

- ``value_free.largest`` took ``iinfo.max`` as a signed dtype's largest magnitude, but ``iinfo.min`` is one
  further: under a key whose plaintext bound is exactly ``127 * 16**64``, ``add`` of an int8 owner tensor
  failed iff it held -128 (the room check passed, the encoding overflowed);
- a product with the owner's plaintext raised each ciphertext to the encoded value (``gmpy2.powmod``), whose
  time grows with the value's bit length (0: nothing; 2**60: ~3x of 1) and whose sign took an inversion: the
  command's duration told the magnitudes and signs of the owner's weights (2000 products under a 2048-bit
  key: 4 ms for zeros, 0.37 s for ones, 0.93 s for 2**60). Now every such power uses one exponent width fixed
  by the dtype (``gmpy2.powmod_sec``, time set by operand sizes alone);
- the encoder took a fast int64 path unless a scaled value passed 2**62: its time said whether the owner's
  largest value passed ~2**30 (in ``veil.he.op`` and in ``encrypt``, which ``veil.fl.encrypt_state`` runs);
- ``x - w`` negated the plaintext tensor first, and torch's negation keeps a signed dtype's minimum (int8
  -128 stays -128): ``x - int8(-128)`` gave ``x - 128`` (now the encoded integers are negated).
"""

from __future__ import annotations

import sys
from pathlib import Path

import gmpy2
import phe
import pytest
import torch

import veil as sy
from veil.he import paillier, paillier_wire
from veil.he.errors import WireFormatError, WrongKeyError
from veil.he.paillier import PaillierTensor, _obj_array, value_free_encoding
from veil.ids import new_id
from veil.messaging import messages as m
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, request, run_command, send_tensor  # noqa: E402

SCI, ADM = "rt-po-sci-token", "rt-po-adm-token"


@pytest.fixture(scope="module")
def keys():
    return paillier.keygen(512)


class Review:
    """A worker holding one owner tensor under review, and a scientist's session."""

    def __init__(self, hook, data: torch.Tensor, seconds=None):
        tokens = sy.TokenTable()
        tokens.add(SCI, "sci", "scientist")
        tokens.add(ADM, "owner", "admin")
        self.srv = WebsocketServerWorker(hook, id=f"rt-po-{new_id() % 10**6}", port=0, tokens=tokens,
                                         max_command_seconds=seconds)
        self.data = data.clone()
        self.d = self.srv.load(data, tags=("#d",), policy="review")
        self.sci = open_session(self.srv, SCI)

    def he_op(self, name, a, b):
        out = new_id()
        reply, _ = run_command(self.srv, self.sci, "veil.he.op", name, m.ObjectRef(a), b, out, n=0)
        return reply, out

    def stored(self, oid):
        """The scientist's object ``oid`` as the worker holds it (None: not stored)."""
        return next((e.obj for i, e in self.srv.monitor.owned_entries(self.srv.principal_of(self.sci)) if i == oid),
                    None)

    def healthy(self):
        """The owner's tensor is unchanged and the worker still serves the scientist."""
        owner = self.srv.monitor.owner_objects()
        assert torch.equal(owner[self.d], self.data)
        x = send_tensor(self.srv, self.sci, torch.tensor([1.0, 2.0]))
        reply = request(self.srv, self.sci, m.GetObjectsMessage([x]))
        assert type(reply) is m.ObjectsReply and torch.equal(reply.objects[0], torch.tensor([1.0, 2.0])), reply


def _crafted(n: int, values, exponent: int, dtype=torch.float32) -> PaillierTensor:
    return PaillierTensor(phe.PaillierPublicKey(n), _obj_array([gmpy2.mpz(v) for v in values], (len(values),)),
                          exponent, dtype)


# ------------------------------------------------------------------------------------------------ holes


def test_a_signed_dtypes_minimum_is_no_overflow_oracle(hook):
    """``add`` lowers the owner's int8 plaintext to the ciphertext's exponent (-64: 16**64 per unit). Under a
    modulus whose plaintext bound is exactly 127 * 16**64 the room check passed (127 fits) and -128 overflowed:
    success or failure said whether the owner's data held the dtype's minimum."""
    n = 3 * (127 * 16**64 + 1)  # odd; max_int = n // 3 - 1 = 127 * 16**64
    assert phe.PaillierPublicKey(n).max_int == 127 * 16**64
    replies = []
    for data in ([-128, 5, 2], [-127, 5, 2]):
        w = Review(hook, torch.tensor(data, dtype=torch.int8))
        a = send_tensor(w.srv, w.sci, _crafted(n, [2, 2, 2], -64))
        reply, _ = w.he_op("add", a, m.ObjectRef(w.d))
        replies.append((type(reply).__name__, getattr(reply, "message", "").replace(w.srv.id, "<worker>")))
        w.healthy()
    assert replies[0] == replies[1], f"the outcome depends on whether the owner's data holds -128: {replies}"
    assert replies[0][0] == "ErrorReply", replies  # refused, from the dtype and the key alone


@pytest.fixture
def powers(monkeypatch):
    """Records the bit length and sign of every exponent of a modular power gmpy2 computes."""
    seen: list = []
    for name in ("powmod", "powmod_sec", "powmod_base_list"):
        real = getattr(gmpy2, name)

        def spy(base, exponent, modulus, _real=real):
            seen.append((int(exponent) < 0, int(exponent).bit_length()))
            return _real(base, exponent, modulus)

        monkeypatch.setattr(gmpy2, name, spy)
    return seen


@pytest.mark.parametrize("op", ["mul", "dot"])
def test_products_with_the_owners_plaintext_do_the_same_work_whatever_its_values(hook, keys, powers, op):
    """A product ``c**k`` with the owner's encoded value ``k`` took time growing with k's bit length, and an
    inversion for k < 0: the command's duration gave the magnitudes and signs of the owner's values."""
    pub, _ = keys
    profiles = []
    for data in ([0.0, 0.0, 0.0], [2.0**20, -3.5, 1e6], [-1.0, 1.0, 3e38]):
        w = Review(hook, torch.tensor(data))
        a = send_tensor(w.srv, w.sci, paillier.encrypt(torch.ones(3), pub))
        powers.clear()
        reply, _ = w.he_op(op, a, m.ObjectRef(w.d))
        assert type(reply) is m.OkReply, reply
        profiles.append(sorted(powers))
        w.healthy()
    assert profiles[0] == profiles[1] == profiles[2], "the modular powers depend on the owner's values"


def test_encoding_the_owners_plaintext_takes_one_path_whatever_its_values(hook, keys, monkeypatch):
    """The encoder converted through int64 when every scaled value was below 2**62 and one Python int at a time
    otherwise (~30x slower per value): for a plaintext from the owner's data, the time said whether its largest
    value passed ~2**30 (cheap to amplify with ``add``: no modular power at all)."""
    from veil.he import _paillier_encoding as enc

    pub, _ = keys
    calls = []
    real = enc._exact_ints
    monkeypatch.setattr(enc, "_exact_ints", lambda scaled: calls.append(scaled.size) or real(scaled))
    paths = []
    for data in ([1.0, 2.0, 3.0], [2.0**40, 2.0, 3.0]):
        w = Review(hook, torch.tensor(data))
        a = send_tensor(w.srv, w.sci, paillier.encrypt(torch.ones(3), pub))
        for name in ("add", "mul"):
            calls.clear()
            reply, _ = w.he_op(name, a, m.ObjectRef(w.d))
            assert type(reply) is m.OkReply, reply
            paths.append((name, list(calls)))
    assert paths[:2] == paths[2:], paths


def test_encryption_takes_one_encoding_path_whatever_the_values(keys, monkeypatch):
    """``encrypt`` (what ``veil.fl.encrypt_state`` runs on the owner's state, at a weight the coordinator
    picks) took the fast int64 path unless a scaled value passed 2**62: its time said whether the weighted
    state's largest value passed ~2**30."""
    from veil.he import _paillier_encoding as enc

    pub, priv = keys
    calls = []
    real = enc._exact_ints
    monkeypatch.setattr(enc, "_exact_ints", lambda scaled: calls.append(scaled.size) or real(scaled))
    paths = []
    for data in ([1.0, -2.0, 3.0], [2.0**40, -2.0, 3.0]):
        calls.clear()
        t = paillier.encrypt(torch.tensor(data, dtype=torch.float64), pub, exponent=-8)
        assert torch.equal(t.decrypt(priv), torch.tensor(data, dtype=torch.float64))
        paths.append(list(calls))
    assert paths[0] == paths[1], paths


def test_value_free_products_still_stop_at_the_command_deadline(hook):
    """A value-free power costs the dtype's full width (float64: two ~1058-bit constant-time powers, ~20 ms
    under an 1100-bit modulus here), so the 256 values between deadline checks ran ~5 s past a 0.5 s
    deadline; the pieces now shrink with the width."""
    import time

    torch.broadcast_shapes((1,), (1,))  # (its first call imports sympy: seconds, before the work starts)
    n = (1 << 1099) | 12345  # any odd number of 1100 bits passes as a modulus (and has room for float64)
    w = Review(hook, torch.linspace(-3.0, 3.0, 300, dtype=torch.float64), seconds=0.5)
    a = send_tensor(w.srv, w.sci, _crafted(n, [n + 2] * 300, 0))
    # (CPU of this process, the HE pool's threads too: at most the 0.5 s deadline's worth on each core and one
    # piece past it, however loaded the machine; wall time also counted a loaded machine descheduling it)
    t0 = time.process_time()
    reply, _ = w.he_op("mul", a, m.ObjectRef(w.d))
    took = time.process_time() - t0
    assert type(reply) is m.ErrorReply and "CommandTimeoutError" in (reply.error + reply.message), reply
    assert took < 2.0, took  # (256 values between checks: ~4 s here; 32 now: ~1 s)
    w.healthy()


# ------------------------------------------------------------------------------------------ what holds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int8])
def test_value_free_products_and_sums_compute_what_torch_does(keys, dtype):
    """The fixed-width powers and additions give the same plaintexts as before: compared with torch."""
    pub, priv = keys
    x = torch.tensor([[1.5, -2.0, 0.0], [3.0, 0.25, -7.0]], dtype=torch.float64)
    if dtype.is_floating_point:
        w = torch.tensor([0.0, -1.25, 2.0 ** 20], dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        w = torch.tensor([info.min if dtype == torch.int8 else -(2**40), 0, 7], dtype=dtype)
    enc = paillier.encrypt(x, pub)
    with value_free_encoding():
        got = {"mul": (enc * w).decrypt(priv), "dot": enc[0].dot(w).decrypt(priv),
               "mm": enc.mm(w.reshape(3, 1)).decrypt(priv), "add": (enc + w).decrypt(priv),
               "sub": (enc - w).decrypt(priv)}
    wf = w.to(torch.float64)
    want = {"mul": x * wf, "dot": x[0] @ wf, "mm": x @ wf.reshape(3, 1), "add": x + wf, "sub": x - wf}
    for name, value in want.items():
        assert torch.allclose(got[name].to(torch.float64), value, rtol=1e-9, atol=1e-6), (name, got[name], value)


def test_the_product_has_one_exponent_dtype_and_size_whatever_the_owners_values(hook, keys):
    """What the scientist sees of a result before any approval (its exponent, dtype and wire size) must not
    follow the owner's values: a plaintext exponent picked from the values (integers take 0, 0.1 needs -8)
    would say which of them are whole numbers."""
    pub, _ = keys
    seen = []
    for data in ([1.0, 2.0, 3.0], [0.1, -0.5, 1e-9]):
        w = Review(hook, torch.tensor(data))
        a = send_tensor(w.srv, w.sci, paillier.encrypt(torch.ones(3), pub))
        reply, out = w.he_op("mul", a, m.ObjectRef(w.d))
        assert type(reply) is m.OkReply, reply
        r = w.stored(out)
        seen.append((r.exponent, r.dtype, len(paillier_wire.tensor_to_wire(r)["ct"])))
    assert seen[0] == seen[1], seen


@pytest.mark.parametrize("which", ["p", "q", "n", "zero", "nsq", "p*r"])
def test_non_units_never_reach_the_key_holders_decryption(keys, which, monkeypatch):
    """A peer handing the key holder a multiple of a key's prime (or 0, n, n**2) for decryption would read
    the factor back from the decryption (its value mod p is fixed by the key); the wire refuses them first."""
    pub, priv = keys
    n = pub.n
    value = {"p": priv.p, "q": priv.q, "n": n, "zero": 0, "nsq": n * n, "p*r": priv.p * 12345}[which]
    honest = paillier_wire.tensor_to_wire(paillier.encrypt(torch.tensor([1.0, 2.0]), pub))
    width = len(honest["ct"]) // 2
    crafted = dict(honest, ct=honest["ct"][:width] + int(value).to_bytes(width, "big"))
    monkeypatch.setattr(paillier, "_crt_decrypt", lambda *a: pytest.fail("decrypted a non-unit"))
    with pytest.raises(WireFormatError) as e:
        paillier_wire.tensor_from_wire(crafted, public_key=pub).decrypt(priv)
    assert "\n" not in str(e.value) and str(priv.p) not in str(e.value)


def test_a_tensor_under_another_modulus_is_refused_before_decryption(keys, monkeypatch):
    """A peer's tensor under a modulus of its choosing: WrongKeyError before any decryption, whatever its
    ciphertexts, and nothing of the key in the text."""
    pub, priv = keys
    monkeypatch.setattr(paillier, "_crt_decrypt", lambda *a: pytest.fail("decrypted under a foreign modulus"))
    for n in (pub.n + 2, pub.n * 3, priv.p * priv.p):
        t = _crafted(n, [2, 3], 0)
        with pytest.raises(WrongKeyError) as e:
            t.decrypt(priv)
        assert str(priv.p) not in str(e.value) and str(pub.n) not in str(e.value)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_weight_does_not_switch_off_the_decryption_bound(keys, weight):
    """An aggregate's weight came from the wire unchecked: NaN made ``sum > bound * weight`` false, so a
    crafted sum the bound exists to refuse was decrypted and returned (as NaN, or scaled by 1/inf)."""
    from veil.he.aggregation import EncryptedUpdate, decrypt_update, encrypt_update, update_from_wire, update_to_wire
    from veil.he.errors import EncodingOverflowError

    pub, priv = keys
    u = encrypt_update({"w": torch.tensor([1.0, 2.0])}, protocol="paillier", public_key=pub)
    with pytest.raises(EncodingOverflowError):  # (the bound refuses this sum at its honest weight)
        decrypt_update(u, priv, bound=0.5, max_weight=1)
    crafted = dict(update_to_wire(u), weight=weight)
    with pytest.raises(WireFormatError):
        update_from_wire(crafted)
    with pytest.raises(ValueError, match="not finite"):
        decrypt_update(EncryptedUpdate(u.tensors, u.shapes, u.dtypes, weight), priv, bound=0.5)


def test_a_plaintext_past_float64_decrypts_to_inf_not_a_bare_overflow_error():
    """Under a key over 1024 bits, a decrypted value past float64's range raised ``OverflowError: math range
    error`` (a bare error for some plaintexts only), where a large exponent gave inf: now inf, as torch does."""
    p, q = (gmpy2.next_prime((gmpy2.mpz(1) << 560) + k) for k in (12345, 987654))
    pub = phe.PaillierPublicKey(int(p * q))
    priv = phe.PaillierPrivateKey(pub, int(p), int(q))
    n = gmpy2.mpz(pub.n)
    values = [2**1100, -(2**1100), 2**1000, -3]
    t = PaillierTensor(pub, _obj_array([(1 + (v % n) * n) % (n * n) for v in values], (4,)), 0, torch.float64)
    got = t.decrypt(priv)
    assert torch.equal(got, torch.tensor([float("inf"), float("-inf"), 2.0**1000, -3.0], dtype=torch.float64))


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _varint(x: int) -> bytes:
    out = b""
    while True:
        low, x = x & 0x7F, x >> 7
        out += bytes([low | (0x80 if x else 0)])
        if not x:
            return out


@pytest.fixture(scope="module")
def small_ckks_ctx():
    from veil.he import ckks

    return ckks.context(galois_keys=False)


def test_a_compressed_ckks_ciphertext_cannot_inflate_past_its_context(small_ckks_ctx):
    """SEAL ciphertexts travel zstd-compressed: 32 kB of run-length blocks claim 1 GiB. TenSEAL loads the
    ciphertext as it inflates and stops at the first field its context refuses, so what a received CKKS tensor
    costs stays bounded by the context (size <= 16 polynomials of its ring), not by the compression ratio."""
    from veil.he import ckks, ckks_wire

    honest = ckks_wire.tensor_to_wire(ckks.encrypt(torch.ones(4), small_ckks_ctx))
    blob = honest["segments"][0]
    head = 2 + blob[1]  # (TenSEAL's message: field 1, its size; field 2, its SEAL ciphertext)
    assert blob[0] == 0x0A and blob[head] == 0x12
    length, at, shift = 0, head + 1, 0
    while True:
        byte = blob[at]
        length, at, shift = length | (byte & 0x7F) << shift, at + 1, shift + 7
        if not byte & 0x80:
            break
    assert blob[at:at + 2] == bytes.fromhex("5ea1") and blob[at + 5] == 2  # SEAL magic, zstd
    blocks = 8192  # run-length blocks of 128 kB: 1 GiB inflated
    frame = bytes.fromhex("28b52ffd0038") + b"".join(
        ((131072 << 3) | 2 | (i == blocks - 1)).to_bytes(3, "little") + b"\x00" for i in range(blocks))
    seal = blob[at:at + 8] + (16 + len(frame)).to_bytes(8, "little") + frame
    crafted = dict(honest, segments=[blob[:head + 1] + _varint(len(seal)) + seal + blob[at + length:]])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # (resets the peak below)
    except OSError:
        pytest.skip("cannot reset this process's peak memory")
    before = _peak_mb()
    with pytest.raises(WireFormatError) as e:
        ckks_wire.tensor_from_wire(crafted, context=small_ckks_ctx)
    assert _peak_mb() < before + 256 and "\n" not in str(e.value)
