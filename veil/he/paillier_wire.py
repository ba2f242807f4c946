"""Wire format of Paillier public keys and tensors (msgpack-native dicts, no pickle).

Tensor layout::

    {"he": "paillier", "kind": "tensor", "v": 1,
     "n": <public modulus, big-endian bytes>, "shape": [...], "dtype": "float32",
     "exponent": <int>, "ct": <numel fixed-width big-endian ciphertexts>}

Each ciphertext takes exactly the byte length of ``n**2``, so the whole
tensor is one ``bytes`` value that msgpack copies without per-element framing.
"""

from __future__ import annotations

from itertools import repeat

import gmpy2
import numpy as np
import phe

from veil.he import _wire_checks as chk
from veil.he.errors import KeyMismatchError, WireFormatError
from veil.he.paillier import PaillierTensor, _obj_array, running_check

BACKEND = "paillier"
MIN_N_BITS = 256  # tests use small keys; anything smaller is not a Paillier key we accept
MAX_N_BITS = 16384
MAX_EXPONENT = 4096  # |exponent|; real tensors stay within tens
#: the most ciphertexts one received tensor may hold (~1 us each to decode at least; a 256-bit modulus packs 4M
#: into a 256 MB frame, a 2048-bit one 2**19): the frame's tensors share its command's deadline besides
MAX_CIPHERTEXTS = 2**20
#: ciphertext bytes decoded between two checkpoints of the running command (~1-5 ms of CPU whatever the key)
DECODE_PIECE_BYTES = 2**18


def _int_bytes(v: int) -> bytes:
    return int(v).to_bytes((int(v).bit_length() + 7) // 8 or 1, "big")


def public_key_to_wire(key: phe.PaillierPublicKey) -> dict:
    return {"he": BACKEND, "kind": "public_key", "v": chk.WIRE_VERSION, "n": _int_bytes(key.n)}


def _modulus(d: dict) -> int:
    n = int.from_bytes(chk.field(d, "n", bytes), "big")
    if not (MIN_N_BITS <= n.bit_length() <= MAX_N_BITS) or n % 2 == 0:
        raise WireFormatError(f"Paillier modulus must be odd with {MIN_N_BITS}..{MAX_N_BITS} bits")
    return n


def public_key_from_wire(d: dict) -> phe.PaillierPublicKey:
    chk.header(d, BACKEND, "public_key")
    return phe.PaillierPublicKey(_modulus(d))


def tensor_to_wire(t: PaillierTensor) -> dict:
    n = t.public_key.n
    width = ((n * n).bit_length() + 7) // 8
    ct = b"".join(int(c).to_bytes(width, "big") for c in t._ct.ravel())  # noqa: SLF001 - same package
    return {
        "he": BACKEND,
        "kind": "tensor",
        "v": chk.WIRE_VERSION,
        "n": _int_bytes(n),
        "shape": list(t.shape),
        "dtype": chk.dtype_name(t.dtype),
        "exponent": t.exponent,
        "ct": ct,
    }


def tensor_from_wire(d: dict, public_key: phe.PaillierPublicKey | None = None) -> PaillierTensor:
    """Rebuild a :class:`PaillierTensor`, checking every field.

    Args:
        d: the wire dict.
        public_key: if given, the tensor must be under this key.

    Raises:
        WireFormatError: malformed dict or ciphertexts outside ``Z*_{n^2}``.
        KeyMismatchError: ``public_key`` differs from the tensor's key.
    """
    chk.header(d, BACKEND, "tensor")
    n = _modulus(d)
    if public_key is not None and public_key.n != n:
        raise KeyMismatchError("the received Paillier tensor is under a different public key")
    shape, dtype = chk.shape(d), chk.dtype(d)
    exponent = chk.field(d, "exponent", int)
    if abs(exponent) > MAX_EXPONENT:
        raise WireFormatError("Paillier exponent out of range")
    raw = chk.field(d, "ct", bytes)
    nsq = gmpy2.mpz(n) ** 2
    width = (int(nsq).bit_length() + 7) // 8
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if numel > MAX_CIPHERTEXTS:
        raise WireFormatError(f"a Paillier tensor of {numel} ciphertexts is past the {MAX_CIPHERTEXTS} one may hold")
    if len(raw) != numel * width:
        raise WireFormatError(f"Paillier ciphertext bytes: expected {numel * width}, got {len(raw)}")
    n_ = gmpy2.mpz(n)
    cts = []
    # In pieces of DECODE_PIECE_BYTES with the running command's checkpoint between them: a worker decodes a
    # request inside its turn and deadline (a 256 MB frame of ciphertexts is seconds of CPU), and others run.
    check = running_check()
    step = max(1, DECODE_PIECE_BYTES // width) if check is not None else max(1, numel)
    view = memoryview(raw)
    for at in range(0, numel, step):
        if check is not None:  # (a tensor's first piece too: a frame of many one-piece tensors checked none)
            check()
        starts = range(at * width, min(numel, at + step) * width, width)
        piece = list(map(gmpy2.mpz, map(int.from_bytes, (view[i : i + width] for i in starts), repeat("big"))))
        if min(piece) <= 0 or max(piece) >= nsq:
            i = next(i for i, c in enumerate(piece) if not 0 < c < nsq)
            raise WireFormatError(f"Paillier ciphertext {at + i} is not a valid element of Z*_(n^2)")
        # A valid ciphertext is a unit modulo n**2: one gcd per piece, of its product mod n (a prime of n divides
        # it iff it divides one of them; one gcd each cost ~33 us at 2048 bits), then, only for a piece that
        # fails, the one to name: the scan stays within the piece (over the whole tensor, after the last
        # checkpoint, a non-unit placed last by the modulus's maker held the worker ~17 s for a 256 MB frame).
        product = gmpy2.mpz(1)
        for c in piece:
            product = product * c % n_
        if gmpy2.gcd(product, n_) != 1:
            i = next(i for i, c in enumerate(piece) if gmpy2.gcd(c, n_) != 1)
            raise WireFormatError(f"Paillier ciphertext {at + i} is not a valid element of Z*_(n^2)")
        cts += piece
    key = public_key if public_key is not None else phe.PaillierPublicKey(n)
    return PaillierTensor(key, _obj_array(cts, shape), exponent, dtype)
