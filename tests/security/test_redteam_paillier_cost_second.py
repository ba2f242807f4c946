"""Red team, second pass on the Paillier cost fixes (a7f652a, 9e3fea8): pieces, turn, keygen.

The attacker is a scientist sending a Paillier tensor under a modulus of its own making (so it knows the
modulus's primes), or code that reaches ``cancellation.outside_turn`` twice on one request thread.

Holes found (strict xfails first, then fixed in ``he/paillier_wire.py``, ``he/remote.py`` and
``workers/cancellation.py``):

- decoding checked the tensor's ciphertexts for units with one gcd of their product, and only when it failed
  looked for the one to name, with one gcd per ciphertext and no checkpoint: a frame whose LAST ciphertext is a
  prime of the attacker's modulus decoded in pieces under the deadline, then spent ~33 us per ciphertext at 2048
  bits (2**19 of them in a 256 MB frame: ~17 s) holding the worker's turn past its deadline. Each piece's
  product is now checked with its own gcd, so the scan for the name covers one piece;
- the checkpoint ran between a tensor's pieces, never before its first: a frame of many tensors of one piece
  each (or of thousands of one-ciphertext tensors, ~72 us each) decoded whole with no check, the pieces fix's
  bypass. Every piece, a tensor's first too, now takes the checkpoint;
- ``remote.ciphertext_bytes`` counted a ciphertext's bytes, not gmpy2's whole 64-bit limbs nor the spare one a
  reduction's result keeps: under a modulus of no multiple of 32 bits (2047, 8191) a tensor held a little more
  than it was charged (568 vs 567 bytes a ciphertext). Now limbs, rounded up, and one spare (unchanged at
  multiples of 32 bits);
- ``outside_turn`` nested in ``outside_turn`` released the turn a second time (the inner block's thread no longer
  held it: another request's turn was handed to a waiter, two ran at once) and, leaving, took it twice (the
  outer exit waited for a lock its own thread held: the worker hung for good). The block now marks the thread as
  holding no turn, so an inner one is a no-op.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from pathlib import Path

import gmpy2
import pytest
import torch

from veil.exceptions import CommandTimeoutError
from veil.he import paillier, paillier_wire
from veil.messaging import messages as m
from veil.messaging.serde import deserialize
from veil.workers import cancellation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_redteam_paillier_cost import N256, _crafted, _frame, _one_line_error  # noqa: E402
from server_sessions import send_tensor  # noqa: E402
from turn_waiters import TurnTakenAndAwaited  # noqa: E402
from test_redteam_paillier_oracles import Review  # noqa: E402  (an owner tensor under review, a scientist)


def _primes(bits: int) -> tuple[int, int]:
    top = gmpy2.mpz(1) << (bits - 1)
    return tuple(int(gmpy2.next_prime(top | secrets.randbits(bits - 1))) for _ in range(2))


def _wire(n: int, numel: int, last: int | None = None) -> dict:
    """A tensor dict of ``numel`` random full-width units modulo ``n**2`` (top byte clear), the last ``last``."""
    width = ((n * n).bit_length() + 7) // 8
    raw = bytearray(secrets.token_bytes(numel * width))
    raw[0::width] = bytes(numel)
    if last is not None:
        raw[-width:] = last.to_bytes(width, "big")
    return {"he": "paillier", "kind": "tensor", "v": 1, "n": n.to_bytes((n.bit_length() + 7) // 8, "big"),
            "shape": [numel], "dtype": "float32", "exponent": 0, "ct": bytes(raw)}


def _longest_stretch_without_a_check(d: dict) -> tuple[float, Exception | None]:
    """Decodes ``d`` under a checkpoint, returning the longest time between two checks (or the start or the
    end), in this process's CPU seconds (a loaded machine descheduling the decode adds wall time it did not
    compute), and what the decode raised."""
    marks = [time.process_time()]
    raised = None
    with paillier.checkpoints(lambda: marks.append(time.process_time())):
        try:
            paillier_wire.tensor_from_wire(d)
        except Exception as e:  # noqa: BLE001 - compared below
            raised = e
    marks.append(time.process_time())
    return max(b - a for a, b in zip(marks, marks[1:])), raised


# ------------------------------------------------------------------------------------------------ holes


def test_a_non_unit_at_the_end_is_found_between_checkpoints():
    """The last of 2**15 ciphertexts under a 2048-bit modulus is one of its primes: naming it scanned every
    ciphertext with a gcd after the last checkpoint (~1.5 s here, ~17 s for a 256 MB frame). Now the piece that
    holds it is found by its own product's gcd, and only that piece is scanned."""
    p, q = _primes(1024)
    numel = 2**15
    stretch, raised = _longest_stretch_without_a_check(_wire(p * q, numel, last=p))
    assert isinstance(raised, paillier_wire.WireFormatError), raised
    assert f"ciphertext {numel - 1} " in str(raised), raised
    assert stretch < 0.4, f"{stretch:.2f} s without a checkpoint"


@pytest.mark.parametrize("tensors,each", [(64, 2**12), (2**12, 1)])
def test_a_frame_of_one_piece_tensors_is_decoded_under_the_deadline(hook, tensors, each):
    """The checkpoint ran between a tensor's pieces, never before its first: a frame split into tensors of one
    piece each (64 of 4096 256-bit ciphertexts, 16 MB; or 4096 tensors of one) decoded whole with no check,
    the pieces fix's bypass (a 256 MB frame of 1024 such tensors: seconds holding the turn past the deadline).
    Each piece, a tensor's first too, now takes the command's checkpoint."""
    review = Review(hook, torch.zeros(2), seconds=0.02)
    frame, ids = _frame(*[_crafted(N256, each)] * tensors)
    reply = deserialize(review.srv.serve_bytes(frame, review.sci))[0]
    _one_line_error(reply, "CommandTimeoutError")
    assert all(review.stored(i) is None for i in ids), "a refused tensor was stored"
    review.healthy()


def test_nested_outside_turn_neither_hands_over_a_turn_it_lacks_nor_hangs():
    """A second ``outside_turn`` inside the first released the lock again (another request's, which a waiter then
    got too) and, leaving, acquired it twice: the thread waited for itself for ever."""
    lock = cancellation.FairLock()
    others, left = TurnTakenAndAwaited(lock), threading.Event()

    def ours():
        lock.acquire()
        with cancellation.running(cancellation.CancelToken(), lock.yield_turn, lock):
            with cancellation.outside_turn():
                others.start()
                with cancellation.outside_turn():
                    pass
                both = others.waiter_entered(0.3)  # the waiter entered while the holder still held the lock
                others.release()
        lock.release()
        left.set()
        results["both"] = both

    results: dict = {}
    threading.Thread(target=ours, daemon=True).start()
    returned = left.wait(5)
    others.release()
    assert returned, "the request thread never got its turn back"
    assert not results["both"], "a waiter got the turn while another request held it"
    assert others.waiter_entered(5) and not lock._held, "the lock was not free at the end"


# ----------------------------------------------------------------------- attacks that hold (regression guards)


@pytest.mark.parametrize("bits", [512, 513])
def test_generated_primes_are_distinct_primes_of_the_asked_halves(bits):
    """Each prime passes 50 more Miller-Rabin rounds, both have their top two bits set (so n has exactly the
    asked length), they differ, gcd(n, phi) = 1, and a ciphertext decrypts as torch holds it."""
    for _ in range(3):
        pub, priv = paillier.keygen(bits)
        p, q = sorted((int(priv.p), int(priv.q)))
        assert p * q == pub.n and pub.n.bit_length() == bits and p != q
        assert gmpy2.is_prime(p, 50) and gmpy2.is_prime(q, 50)
        assert {p.bit_length(), q.bit_length()} == {(bits + 1) // 2, bits // 2}
        assert all(x >> (x.bit_length() - 2) == 3 for x in (p, q))
        assert gmpy2.gcd(pub.n, (p - 1) * (q - 1)) == 1
        assert q - p > 1 << (bits // 2 - 32)  # (far from Fermat's reach: |p - q| near sqrt(n), not n**(1/4))
    x = torch.tensor([1.5, -2.25, 0.0])
    assert torch.equal(paillier.encrypt(x, pub).decrypt(priv), x)


def test_a_keygen_past_its_deadline_leaves_nothing_and_the_next_one_works():
    """A keygen cut by its deadline raises the deadline's error; the next call, unhurried, makes a sound key."""
    with pytest.raises(CommandTimeoutError):
        paillier.keygen(4096, deadline=time.monotonic() - 1)
    pub, priv = paillier.keygen(256)
    assert int(priv.p) * int(priv.q) == pub.n


def test_a_peer_reply_decoded_outside_the_turn_checks_the_deadline_but_yields_nothing():
    """A tensor decoded inside ``outside_turn`` (a peer's reply) still stops at the command's deadline, and calls
    no turn hand-over (the thread holds no turn there)."""
    lock = cancellation.FairLock()
    yielded = []
    token = cancellation.CancelToken(seconds=60)
    token.start()
    p, q = _primes(160)
    d = _wire(p * q, 2**14)  # (1 MB: four pieces)
    lock.acquire()
    try:
        with cancellation.running(token, lambda: yielded.append(1), lock):
            with cancellation.outside_turn():
                paillier_wire.tensor_from_wire(d)
                token.deadline = time.monotonic() - 1
                with pytest.raises(CommandTimeoutError):
                    paillier_wire.tensor_from_wire(d)
    finally:
        lock.release()
    assert not yielded


@pytest.mark.parametrize("bits", [2047, 2048, 4096, 8191, 16384])
def test_a_large_key_tensor_holds_no_more_than_it_is_charged(bits):
    """The quota's held-bytes estimate (``remote.ciphertext_bytes``) against what gmpy2 allocates, measured, for a
    received tensor of full-size ciphertexts and what neg, add and mul make of it under moduli of 2047-16384
    bits (a modulus of no multiple of 64 bits holds whole 64-bit limbs, one past its square's length after a
    reduction: a 2047-bit one was charged 567 bytes a ciphertext where each held 568)."""
    from veil.he import remote

    n = (1 << (bits - 1)) | secrets.randbits(bits - 1) | 1
    values = [1 + (secrets.randbelow(n - 2) + 1) * n for _ in range(16)]  # (units mod n**2 whatever n's factors)
    width = ((n * n).bit_length() + 7) // 8
    d = dict(_wire(n, 16), ct=b"".join(v.to_bytes(width, "big") for v in values))
    t = paillier_wire.tensor_from_wire(d)
    for x in (t, -t, t + t, t * torch.arange(16.0)):
        held = sum(sys.getsizeof(c) + 8 for c in x._ct.ravel())  # (each value and its array slot)
        assert held <= remote._paillier_nbytes(x), (bits, held, remote._paillier_nbytes(x))


def test_a_batched_mm_is_counted_rows_times_inner_times_columns(hook):
    """A batched ``(64, 64, 1)`` ciphertext (4096 values) times a ``(1, 2048)`` plaintext makes 2**23 products
    (~2 GB at 256 bits): refused from its shapes before any power; a small batched one gives torch's product."""
    review = Review(hook, torch.zeros(2), seconds=5)
    a = send_tensor(review.srv, review.sci, _crafted(N256, 4096, (64, 64, 1)))
    t0 = time.process_time()  # (CPU of this process, the HE pool's too: not a loaded machine's descheduling)
    reply, out = review.he_op("mm", a, torch.ones(1, 2048))
    assert time.process_time() - t0 < 2.0
    _one_line_error(reply, "RemoteExecutionError")
    assert "ciphertexts" in reply.message and review.stored(out) is None, reply
    pub, priv = paillier.keygen(256)
    x, w = torch.arange(12.0).reshape(2, 3, 2), torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
    small = send_tensor(review.srv, review.sci, paillier.encrypt(x, pub))
    reply, out = review.he_op("mm", small, w)
    assert type(reply) is m.OkReply, reply
    assert torch.allclose(review.stored(out).decrypt(priv), x @ w, atol=1e-5)
    review.healthy()
