"""Paillier tensors on top of python-paillier (``phe``) and gmpy2.

Keys are ``phe``'s own ``PaillierPublicKey`` / ``PaillierPrivateKey`` so that
users can mix this module with ``phe`` code; ciphertexts use ``phe``'s integer
layout (``g = n + 1``, negatives as ``n + m``, base-16 exponents), but a tensor
keeps its ciphertexts as gmpy2 integers in a numpy object array with one
shared exponent, so elementwise operations run as numpy loops over gmpy2
arithmetic instead of one ``EncryptedNumber`` object per value.

Paillier is additively homomorphic: ciphertext + ciphertext, ciphertext +
plaintext and ciphertext x plaintext work; ciphertext x ciphertext does not.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import gmpy2
import numpy as np
import phe
import torch

from veil.he import _oblivious_power as op
from veil.he import _paillier_encoding as enc
from veil.he import _paillier_keygen
from veil.he._parallel import powmod_list
from veil.he.errors import (
    EncodingOverflowError,
    KeyMismatchError,
    ShapeMismatchError,
    UnsupportedOperationError,
    WrongKeyError,
)
from veil.workers import cancellation
from veil.workers.user_caches import per_user_cache

PublicKey = phe.PaillierPublicKey
PrivateKey = phe.PaillierPrivateKey


def keygen(n_length: int = 2048, deadline: float | None = None) -> tuple[PublicKey, PrivateKey]:
    """Generate a Paillier key pair.

    Args:
        n_length: bit length of the modulus ``n``; 2048 or more for real use,
            smaller only in tests.
        deadline: a ``time.monotonic()`` instant to stop at (seconds to minutes at 4096-16384 bits); a worker
            command's own deadline and cancellation are checked too.

    Returns:
        ``(public_key, private_key)`` as ``phe`` objects.

    Raises:
        CommandTimeoutError: past the deadline.
    """
    return _paillier_keygen.keygen(n_length, deadline)


@dataclass(frozen=True)
class _KeyParams:
    n: gmpy2.mpz
    nsq: gmpy2.mpz
    max_int: gmpy2.mpz


@per_user_cache(per_user=16, total=1024)  # (per user: a shared one's hit said who used this key)
def _params(n: int) -> _KeyParams:
    n_ = gmpy2.mpz(n)
    # phe's bound: values in (max_int, n - max_int) are treated as overflow.
    return _KeyParams(n_, n_ * n_, n_ // 3 - 1)


def _obfuscators(count: int, kp: _KeyParams) -> list:
    """``count`` fresh values ``r**n mod n**2`` with ``r`` uniform in [1, n)."""
    # 8 extra bytes make the modular reduction's bias negligible (< 2**-64).
    width = (int(kp.n).bit_length() + 7) // 8 + 8
    buf = os.urandom(count * width)
    rs = []
    for i in range(count):
        r = gmpy2.mpz(int.from_bytes(buf[i * width : (i + 1) * width], "big")) % kp.n
        rs.append(r if r else gmpy2.mpz(secrets.randbelow(int(kp.n) - 1) + 1))
    return powmod_list(rs, kp.n, kp.nsq)


#: set while an operation's plaintext comes from the owner's data (``veil.he.remote``): its exponent is then the
#: dtype's default, never one read from its values (a result's exponent is visible in what the op allows next)
_FIXED_PLAIN_EXPONENT: ContextVar[bool] = ContextVar("veil_he_fixed_plain_exponent", default=False)


@contextmanager
def checkpoints(check: Callable[[], None]) -> Iterator[None]:
    """``check`` runs between pieces of this block's long operations (a worker's command deadline and
    cancellation: one gmpy2 call on a hostile key can take seconds, and a tensor holds many)."""
    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)


#: the running command's checkpoint (:func:`checkpoints`), called between pieces of _CHECK_EVERY ciphertexts
#: under a 2048-bit key (fewer under a larger one: a modular power costs ~ the cube of the key's size)
_CHECK: ContextVar[Optional[Callable[[], None]]] = ContextVar("veil_he_checkpoint", default=None)
_CHECK_EVERY = 256


#: how many multiplications, and how many inversions, mod n**2 cost about one of the powers _CHECK_EVERY counts
#: (under a 16384-bit modulus ~0.15 ms and ~1 ms: a `neg` of 62k ciphertexts, one 256 MB frame, ran ~60 s
#: past the deadline when only powers checked it)
_MULS_PER_POWER, _INVERSIONS_PER_POWER = 64, 16


def _full_width(n_bits: int) -> int:
    """The cost of one ``r**n`` (an n-bit exponent) in usual powers (a 128-bit exponent: an owner's float32)."""
    return max(1, n_bits // 128)


def running_check() -> Optional[Callable[[], None]]:
    """The checkpoint of the command running on this thread (:func:`checkpoints`, else a worker command's
    deadline and turn), or None outside any."""
    check = _CHECK.get()
    if check is None and cancellation.current_token() is not None:
        check = cancellation.checkpoint  # (a worker's command outside veil.he.op: veil.fl.encrypt_state had none)
    return check


def _pieces(values: list, n_bits: int, cost: int = 1, per_power: int = 1) -> Iterator[list]:
    """``values`` in pieces, the running command's checkpoint before each (``cost``: how many times the usual
    work each value takes; ``per_power``: how many values take the usual work of one)."""
    check = running_check()
    if check is None:  # (no command: one piece, every core busy in powmod_list)
        yield values
        return
    step = max(1, int(_CHECK_EVERY * per_power * (2048 / max(n_bits, 2048)) ** 3) // max(1, cost))
    for at in range(0, len(values), step):
        check()
        yield values[at: at + step]


@contextmanager
def value_free_encoding() -> Iterator[None]:
    """Plaintexts in this block are encoded at their dtype's default exponent, whatever their values."""
    token = _FIXED_PLAIN_EXPONENT.set(True)
    try:
        yield
    finally:
        _FIXED_PLAIN_EXPONENT.reset(token)


def _plain_exponent(t: torch.Tensor) -> int:
    """Largest exponent (<= 0, >= default) that represents the plaintext ``t`` exactly (the default in a
    :func:`value_free_encoding` block)."""
    if not t.is_floating_point():
        return 0
    if _FIXED_PLAIN_EXPONENT.get():
        return enc.DEFAULT_FLOAT_EXPONENT
    x = t.to(torch.float64).numpy()
    for e in range(0, enc.DEFAULT_FLOAT_EXPONENT, -1):
        scaled = np.ldexp(x, -enc.LOG2_BASE * e)
        if np.array_equal(scaled, np.rint(scaled)):
            return e
    return enc.DEFAULT_FLOAT_EXPONENT


class PaillierTensor:
    """A tensor of Paillier ciphertexts with a torch-like shape.

    Attributes:
        public_key: the ``phe.PaillierPublicKey`` the values are encrypted under.
        exponent: shared base-16 exponent of the encoded plaintexts.
        dtype: torch dtype that :meth:`decrypt` returns.
    """

    __array_priority__ = 1000  # make numpy defer to our reflected operators

    def __init__(self, public_key: PublicKey, ciphertexts: np.ndarray, exponent: int, dtype: torch.dtype):
        self.public_key = public_key
        self._kp = _params(public_key.n)
        self._ct = ciphertexts
        self.exponent = int(exponent)
        self.dtype = dtype

    # ------------------------------------------------------------------ shape
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._ct.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self) -> int:
        return self._ct.ndim

    def dim(self) -> int:
        return self._ct.ndim

    def numel(self) -> int:
        return int(self._ct.size)

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d encrypted tensor")
        return self._ct.shape[0]

    def _like(self, ct: np.ndarray, exponent: int | None = None, dtype: torch.dtype | None = None):
        ct = np.asarray(ct, dtype=object) if not isinstance(ct, np.ndarray) else ct
        return PaillierTensor(self.public_key, ct, self.exponent if exponent is None else exponent,
                              self.dtype if dtype is None else dtype)

    def reshape(self, *shape) -> PaillierTensor:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return self._like(self._ct.reshape(shape))

    view = reshape

    def flatten(self) -> PaillierTensor:
        return self._like(self._ct.reshape(-1))

    def unsqueeze(self, dim: int) -> PaillierTensor:
        return self._like(np.expand_dims(self._ct, dim))

    def transpose(self, dim0: int, dim1: int) -> PaillierTensor:
        return self._like(np.swapaxes(self._ct, dim0, dim1))

    def t(self) -> PaillierTensor:
        if self.ndim > 2:
            raise ShapeMismatchError("t() expects a tensor with at most 2 dimensions")
        return self._like(self._ct.T)

    @property
    def T(self) -> PaillierTensor:  # noqa: N802 - torch's name
        return self._like(self._ct.T)

    def __getitem__(self, index) -> PaillierTensor:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        elif isinstance(index, tuple):
            index = tuple(i.numpy() if isinstance(i, torch.Tensor) else i for i in index)
        out = self._ct[index]
        if not isinstance(out, np.ndarray):  # a single element: keep it 0-d
            out = np.array(out, dtype=object).reshape(())
        return self._like(out)

    def __repr__(self) -> str:
        bits = int(self._kp.n).bit_length()
        return f"PaillierTensor(shape={tuple(self.shape)}, dtype={self.dtype}, n_bits={bits}, exponent={self.exponent})"

    # --------------------------------------------------------------- helpers
    def _check_same_key(self, other: PaillierTensor) -> None:
        if other._kp.n != self._kp.n:
            raise KeyMismatchError("cannot combine Paillier ciphertexts encrypted under different public keys")

    def _lowered(self, exponent: int) -> np.ndarray:
        """Ciphertexts re-encoded at a lower ``exponent`` (multiply plaintexts by 16**k)."""
        if exponent == self.exponent:
            return self._ct
        if exponent > self.exponent:
            raise ValueError("can only lower an exponent")
        factor = enc.BASE ** (self.exponent - exponent)
        flat = [c for piece in _pieces(list(self._ct.ravel()), self._kp.n.bit_length())
                for c in powmod_list(piece, factor, self._kp.nsq)]
        return _obj_array(flat, self._ct.shape)

    def _result_dtype(self, other) -> torch.dtype:
        if isinstance(other, PaillierTensor):
            return torch.promote_types(self.dtype, other.dtype)
        probe = torch.empty(self.shape, dtype=self.dtype, device="meta")
        return torch.result_type(probe, other)

    # ------------------------------------------------------------ arithmetic
    def __add__(self, other) -> PaillierTensor:
        nsq = self._kp.nsq
        if isinstance(other, PaillierTensor):
            self._check_same_key(other)
            e = min(self.exponent, other.exponent)
            out = _mulmod(self._lowered(e), other._lowered(e), nsq, self._kp.n.bit_length())
            return self._like(out, e, self._result_dtype(other))
        return self._add_plain(other, negate=False)

    __radd__ = __add__

    def _add_plain(self, other, negate: bool) -> PaillierTensor:
        """``self + other`` (``self - other`` if ``negate``: the encoded integers are negated, where torch's
        negation of a signed integer tensor turns its minimum into itself)."""
        plain = enc.as_tensor(other)
        dtype = self._result_dtype(other)
        e = min(self.exponent, _plain_exponent(plain))
        m = self._encode_plain(plain, e)
        if negate:
            m = -m
        n, nsq = self._kp.n, self._kp.nsq
        # g**m = 1 + n*m (mod n**2) for g = n + 1: no exponentiation needed. From the owner's data, m mod n
        # plus a multiple of n of one width: the multiplication's operands then have one size whatever m is.
        wide = (lambda v: op.fixed_width(v, n)) if _FIXED_PLAIN_EXPONENT.get() else (lambda v: v % n)
        n_bits = n.bit_length()
        g_m = _obj_array([wide(v) * n + 1 for piece in _pieces(list(m.ravel()), n_bits, per_power=_MULS_PER_POWER)
                          for v in piece], m.shape)
        return self._like(_mulmod(self._lowered(e), g_m, nsq, n_bits), e, dtype)

    def __neg__(self) -> PaillierTensor:
        nsq = self._kp.nsq
        pieces = _pieces(list(self._ct.ravel()), self._kp.n.bit_length(), per_power=_INVERSIONS_PER_POWER)
        return self._like(_obj_array([gmpy2.invert(c, nsq) for piece in pieces for c in piece], self._ct.shape))

    def __sub__(self, other) -> PaillierTensor:
        if isinstance(other, PaillierTensor):
            return self + (-other)
        return self._add_plain(other, negate=True)

    def __rsub__(self, other) -> PaillierTensor:
        return (-self) + other

    def __mul__(self, other) -> PaillierTensor:
        if isinstance(other, PaillierTensor):
            raise UnsupportedOperationError(
                "Paillier cannot multiply two ciphertexts; multiply by a plaintext instead "
                "(or use the CKKS backend)"
            )
        plain = enc.as_tensor(other)
        dtype = self._result_dtype(other)
        ep = _plain_exponent(plain)
        m = self._encode_plain(plain, ep)
        nsq = self._kp.nsq
        cb, mb = np.broadcast_arrays(self._ct, m)
        pairs, n_bits = list(zip(cb.ravel(), mb.ravel())), self._kp.n.bit_length()
        if _FIXED_PLAIN_EXPONENT.get():  # the owner's plaintext: one exponent width, whatever its values
            bits, cache = op.exponent_bits(plain.dtype, ep), {}
            # (two constant-time powers of bits + 1 bits per value: float64's ~1058 cost ~8 usual ones)
            pieces = _pieces(pairs, n_bits, cost=(2 * bits) // 256)
            flat = [c for piece in pieces for c in op.powers(piece, bits, nsq, cache)]
        else:  # (gmpy2.powmod inverts the base itself for a negative exponent)
            flat = [gmpy2.powmod(c, k, nsq) for piece in _pieces(pairs, n_bits) for c, k in piece]
        return self._like(_obj_array(flat, cb.shape), self.exponent + ep, dtype)

    __rmul__ = __mul__

    def __truediv__(self, other) -> PaillierTensor:
        if isinstance(other, PaillierTensor):
            raise UnsupportedOperationError("Paillier cannot divide by a ciphertext")
        plain = enc.as_tensor(other)
        out = self * (1.0 / plain.to(torch.float64))
        # True division follows torch: float stays float, integers become the default float.
        dtype = self._result_dtype(other)
        out.dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
        return out

    def _encode_plain(self, plain: torch.Tensor, exponent: int) -> np.ndarray:
        m = enc.encode(plain, exponent, uniform=_FIXED_PLAIN_EXPONENT.get())
        self._check_range(m)
        return m

    def _check_range(self, m: np.ndarray) -> None:
        if m.size and max(abs(int(v)) for v in m.ravel()) > self._kp.max_int:
            raise EncodingOverflowError("a value is too large for this Paillier key's plaintext space")

    def sum(self, dim: int | None = None, keepdim: bool = False) -> PaillierTensor:
        """Homomorphic sum of all elements, or along ``dim``."""
        arr = self._ct.reshape(-1) if dim is None else self._ct
        axis = 0 if dim is None else dim % max(self.ndim, 1)
        out = _mulmod_reduce(arr, axis, self._kp.nsq, self._kp.n.bit_length())
        if keepdim and dim is not None:
            out = np.expand_dims(out, axis)
        dtype = self.dtype if self.dtype.is_floating_point else torch.int64
        return self._like(out, dtype=dtype)

    def matmul(self, other) -> PaillierTensor:
        """``self @ plain`` for a plaintext vector or matrix."""
        if isinstance(other, PaillierTensor):
            raise UnsupportedOperationError("Paillier cannot multiply two ciphertexts (matmul)")
        w = enc.as_tensor(other)
        # (a plaintext of more dimensions would broadcast, not batch as torch.matmul does: K*K*M products
        # for a (1, K) @ (K, K, M), counted as K by a worker's quota, and not torch's result)
        if self.ndim == 0 or not 1 <= w.ndim <= 2 or w.shape[0] != self.shape[-1]:
            raise ShapeMismatchError(f"cannot matmul encrypted {tuple(self.shape)} with plain {tuple(w.shape)}")
        if w.ndim == 1:
            return (self * w).sum(-1)
        return (self.unsqueeze(-1) * w).sum(-2)

    mm = matmul
    __matmul__ = matmul

    def dot(self, other) -> PaillierTensor:
        return self.flatten().matmul(enc.as_tensor(other).reshape(-1))

    def obfuscate(self) -> PaillierTensor:
        """Re-randomize every ciphertext (times a fresh ``r**n``) so it cannot be linked to its inputs: a product
        ``c**w`` keeps ``w`` in its randomness (``r**w``), whatever its plaintext says."""
        nsq = self._kp.nsq
        n_bits = self._kp.n.bit_length()
        flat = [c * o % nsq for piece in _pieces(list(self._ct.ravel()), n_bits, cost=_full_width(n_bits))
                for c, o in zip(piece, _obfuscators(len(piece), self._kp))]
        return self._like(_obj_array(flat, self._ct.shape))

    def ciphertexts(self) -> list[int]:
        """The raw ciphertexts, flat, as Python ints (for interop and the wire format)."""
        return [int(c) for c in self._ct.ravel()]

    # ------------------------------------------------------------- decryption
    def send(self, worker):
        """Stores this ciphertext on ``worker`` and returns an HEPointer (see veil.he.remote)."""
        from veil.he.remote import send_encrypted

        return send_encrypted(self, worker)

    def decrypt(self, private_key: PrivateKey | None = None) -> torch.Tensor:
        """Decrypt into a torch tensor of :attr:`dtype` and this tensor's shape.

        Raises:
            WrongKeyError: ``private_key`` belongs to another key pair.
            TypeError: no private key was given.
        """
        if not isinstance(private_key, phe.PaillierPrivateKey):
            raise TypeError("decrypt() needs the phe.PaillierPrivateKey of this tensor's key pair")
        if private_key.public_key.n != int(self._kp.n):
            raise WrongKeyError("this private key does not belong to the key that encrypted the tensor")
        values = _crt_decrypt(list(self._ct.ravel()), private_key)
        n, max_int = self._kp.n, self._kp.max_int
        signed = []
        for m in values:
            if m <= max_int:
                signed.append(m)
            elif m >= n - max_int:
                signed.append(m - n)
            else:
                raise EncodingOverflowError("a decrypted value overflowed the plaintext space (too many operations?)")
        return enc.decode(signed, self.exponent, tuple(self.shape), self.dtype)


def encrypt(
    x, public_key: PublicKey, *, precision: float | None = None, exponent: int | None = None
) -> PaillierTensor:
    """Encrypt a tensor (any shape, int or float) under ``public_key``.

    Args:
        x: tensor, array or number.
        public_key: ``phe.PaillierPublicKey``.
        precision: for floats, the largest acceptable rounding step (default ``2**-32``).
        exponent: explicit base-16 exponent (overrides ``precision``).

    Returns:
        A :class:`PaillierTensor`.
    """
    if not isinstance(public_key, phe.PaillierPublicKey):
        raise TypeError("paillier encryption needs public_key=<phe.PaillierPublicKey>")
    t = enc.as_tensor(x)
    if exponent is None:
        exponent = enc.exponent_for_precision(precision) if precision and t.is_floating_point() else enc.default_exponent(t)
    kp = _params(public_key.n)
    # One encoding path and operands of one size whatever the values (a worker encrypts the owner's state,
    # veil.fl.encrypt_state): its work depends on how many values there are, not on what they are.
    m = enc.encode(t, exponent, uniform=True)
    flat = list(m.ravel())
    if flat and max(abs(v) for v in flat) > kp.max_int:
        raise EncodingOverflowError("a value is too large for this Paillier key's plaintext space")
    n, nsq = kp.n, kp.nsq
    # (in pieces, the running command's checkpoint between them: r**n under a 16384-bit key takes seconds)
    pieces = _pieces(flat, n.bit_length(), cost=_full_width(n.bit_length()))
    cts = [(op.fixed_width(v, n) * n + 1) * o % nsq for piece in pieces
           for v, o in zip(piece, _obfuscators(len(piece), kp))]
    return PaillierTensor(public_key, _obj_array(cts, tuple(t.shape)), exponent, t.dtype)


def _crt_decrypt(cts: list, priv: PrivateKey) -> list:
    """Paillier decryption with the CRT (as in ``phe``), vectorised and multi-core."""
    p, q = gmpy2.mpz(priv.p), gmpy2.mpz(priv.q)
    hp, hq, p_inv = gmpy2.mpz(priv.hp), gmpy2.mpz(priv.hq), gmpy2.mpz(priv.p_inverse)
    xp = powmod_list(cts, p - 1, gmpy2.mpz(priv.psquare))
    xq = powmod_list(cts, q - 1, gmpy2.mpz(priv.qsquare))
    out = []
    for a, b in zip(xp, xq):
        mp = (a - 1) // p * hp % p
        mq = (b - 1) // q * hq % q
        out.append(mp + (mq - mp) * p_inv % q * p)
    return out


def _obj_array(values: list, shape) -> np.ndarray:
    # (fromiter: a slice assignment probes each gmpy2 value as a sequence, ~1.7 us each: 2**20 of them took
    # longer than decoding their bytes)
    return np.fromiter(values, dtype=object, count=len(values)).reshape(shape)


def _as_obj(x) -> np.ndarray:
    """numpy turns 0-d object results into bare scalars; put them back in an array."""
    if isinstance(x, np.ndarray):
        return x
    return np.array(x, dtype=object).reshape(())


def _mulmod(x: np.ndarray, y: np.ndarray, nsq, n_bits: int) -> np.ndarray:
    """``x * y % nsq`` elementwise, broadcast, with the running command's checkpoint between pieces."""
    xb, yb = np.broadcast_arrays(_as_obj(x), _as_obj(y))
    pairs = list(zip(xb.ravel(), yb.ravel()))
    return _obj_array([a * b % nsq for piece in _pieces(pairs, n_bits, per_power=_MULS_PER_POWER) for a, b in piece],
                      xb.shape)


def _mulmod_reduce(arr: np.ndarray, axis: int, nsq, n_bits: int) -> np.ndarray:
    """Product of ``arr`` along ``axis`` modulo ``nsq`` (a homomorphic sum), as a tree."""
    arr = np.moveaxis(arr, axis, 0)
    if arr.shape[0] == 0:
        # Empty sum: 1 is the (deterministic) encryption of zero.
        return _obj_array([gmpy2.mpz(1)] * int(np.prod(arr.shape[1:], dtype=np.int64)), arr.shape[1:])
    while arr.shape[0] > 1:
        half = arr.shape[0] // 2
        prod = _mulmod(arr[:half], arr[half : 2 * half], nsq, n_bits)
        if arr.shape[0] % 2:
            prod = np.concatenate([prod, arr[2 * half :]], axis=0)
        arr = prod
    return _as_obj(arr[0]) if arr.ndim > 1 else _as_obj(arr[0])
