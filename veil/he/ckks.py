"""CKKS tensors on top of TenSEAL.

A :class:`CKKSTensor` is a torch-shaped view over a list of TenSEAL
``CKKSVector`` *segments*. Encryption packs each row (the last dimension; a
1-d tensor is one row) into as few segments as the slot count allows, and a
segment never spans two rows, so ``dot``/``mm`` work row by row. Elementwise
operations apply segment by segment, which requires both operands to share
the same segmentation (ciphertexts made by :func:`encrypt` from tensors of the
same shape always do).

Precision: CKKS is approximate. With the default parameters (scale ``2**40``)
fresh ciphertexts decrypt to within about ``1e-6`` of the input for values
of order 1; each multiplication consumes one level of the modulus chain
(``len(coeff_mod_bit_sizes) - 2`` levels in all: 2 by default). ``context(depth=n)``
makes a context of ``n`` levels at the same scale (the smallest ring that holds them).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence

import numpy as np
import tenseal as ts
import torch

from veil.he import conjugation, flooding
from veil.he.errors import (
    CiphertextRefusedError,
    CKKSOperationError,
    DepthExhaustedError,
    HEError,
    KeyMismatchError,
    MissingSecretKeyError,
    ShapeMismatchError,
    WrongKeyError,
)

# Substrings of SEAL/TenSEAL messages that mean "no levels or scale left".
_DEPTH_MESSAGES = ("scale out of bounds", "end of modulus switching chain", "modulus switching")


@contextlib.contextmanager
def _tenseal_errors(op: str):
    """Re-raise TenSEAL's terse errors as veil errors that say what happened."""
    try:
        yield
    except HEError:
        raise  # already says what happened (a check inside the block)
    except (ValueError, RuntimeError) as exc:
        msg = str(exc)
        if any(s in msg for s in _DEPTH_MESSAGES):
            raise DepthExhaustedError(
                f"CKKS {op}: the ciphertext has no multiplicative depth (or scale) left; "
                "use a context with more levels (veil.he.ckks.context(depth=n)), or decrypt and re-encrypt"
            ) from exc
        raise CKKSOperationError(f"CKKS {op} failed: {msg}") from exc


class CKKSContext:
    """A TenSEAL CKKS context plus a stable identifier of its key pair.

    Attributes:
        raw: the ``tenseal.Context``.
        key_id: SHA-256 of the serialized public parameters and public key; two
            contexts with the same ``key_id`` encrypt under the same keys.
        slots: values per ciphertext (``poly_modulus_degree / 2``).
    """

    def __init__(self, raw: ts.Context):
        self.raw = raw
        public_bytes = raw.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
        self.key_id = hashlib.sha256(public_bytes).digest()
        degree = raw.seal_context().data.key_context_data().parms().poly_modulus_degree()
        self.slots = degree // 2

    @property
    def has_secret_key(self) -> bool:
        return self.raw.has_secret_key()

    @property
    def global_scale(self) -> float:
        return self.raw.global_scale

    def public(self) -> CKKSContext:
        """A copy without the secret key: it can encrypt and compute, not decrypt (with the conjugation key made
        for this context, :mod:`veil.he.conjugation`)."""
        with_key = conjugation.public_bytes_with_key(self)
        if with_key is not None:
            return CKKSContext.from_bytes(with_key)
        if not self.raw.is_private():
            return CKKSContext(self.raw.copy())
        # (from its own bytes, not TenSEAL's copy: a copy of a context holding its secret key makes new
        # relinearization keys, so each public copy, each send, carried other keys: ckks_wire holds one set a key)
        return CKKSContext.from_bytes(self.raw.serialize(save_secret_key=False))

    def serialize(self, secret_key: bool = False) -> bytes:
        """TenSEAL bytes of this context (public parts only, with a conjugation key made for it, unless
        ``secret_key``)."""
        with_key = None if secret_key else conjugation.public_bytes_with_key(self)
        if with_key is not None:
            return with_key
        return self.raw.serialize(save_secret_key=secret_key and self.raw.has_secret_key())

    @classmethod
    def from_bytes(cls, data: bytes) -> CKKSContext:
        """Load a context serialized by :meth:`serialize` (TenSEAL validates the bytes)."""
        with _tenseal_errors("context deserialization"):
            raw = ts.context_from(data)
        return cls(raw)

    def __repr__(self) -> str:
        kind = "private" if self.has_secret_key else "public"
        return f"CKKSContext({kind}, slots={self.slots}, key_id={self.key_id.hex()[:12]})"


#: the largest modulus chain (bits) SEAL accepts per ring dimension at 128-bit security
_MAX_CHAIN_BITS = {8192: 218, 16384: 438, 32768: 881}


def depth_parameters(depth: int) -> tuple[int, tuple[int, ...]]:
    """``(poly_modulus_degree, coeff_mod_bit_sizes)`` of ``depth`` multiplicative levels at scale ``2**40``:
    the smallest ring whose modulus chain holds them at 128-bit security."""
    if type(depth) is not int or depth < 1:
        raise ValueError(f"depth must be a positive number of multiplicative levels, got {depth!r}")
    bits = (60, *([40] * depth), 60)
    for degree, most in _MAX_CHAIN_BITS.items():
        if sum(bits) <= most:
            return degree, bits
    raise ValueError(f"{depth} levels at scale 2**40 exceed the largest ring (32768: "
                     f"{(_MAX_CHAIN_BITS[32768] - 120) // 40} levels); decrypt and re-encrypt between layers")


def context(
    poly_modulus_degree: int = 8192,
    coeff_mod_bit_sizes: Sequence[int] = (60, 40, 40, 60),
    global_scale: float = 2**40,
    galois_keys: bool = True,
    depth: int | None = None,
) -> CKKSContext:
    """Create a CKKS context holding a fresh key pair.

    Args:
        poly_modulus_degree: ring dimension; slots per ciphertext are half of it.
        coeff_mod_bit_sizes: bit sizes of the modulus chain; the inner entries
            are the rescaling primes (one per multiplication level).
        global_scale: encoding scale; usually ``2**`` the inner bit size.
        galois_keys: generate rotation keys (needed by ``dot``, ``mm`` and
            ``sum``; they make the public context tens of MB, ~180 MB at 16384).
        depth: multiplicative levels wanted; sets ``poly_modulus_degree`` and
            ``coeff_mod_bit_sizes`` (:func:`depth_parameters`). The default chain
            has 2: two plaintext layers on your own ciphertext, or one on a worker's
            owner data (whose result is sealed, one more level); two layers on owner
            data need ``depth=4`` (ring 16384).
    """
    if depth is not None:
        poly_modulus_degree, coeff_mod_bit_sizes = depth_parameters(depth)
    with _tenseal_errors("context creation"):
        raw = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=poly_modulus_degree,
            coeff_mod_bit_sizes=list(coeff_mod_bit_sizes),
        )
    raw.global_scale = global_scale
    if galois_keys:
        raw.generate_galois_keys()
    return CKKSContext(raw)


def _row_segments(numel: int, row: int, slots: int) -> list[int]:
    """Segment sizes: each row split into chunks of at most ``slots`` values."""
    if numel == 0:
        return []
    per_row = [min(slots, row - off) for off in range(0, row, slots)]
    return per_row * (numel // row)


class CKKSTensor:
    """CKKS-encrypted tensor (see the module docstring for the layout)."""

    def __init__(self, ctx: CKKSContext, segments: list, shape: Sequence[int], dtype: torch.dtype):
        self.context = ctx
        self.segments = segments
        self.shape = torch.Size(shape)
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def segment_sizes(self) -> list[int]:
        return [s.size() for s in self.segments]

    def levels_left(self) -> int:
        """Multiplications (each rescales away one prime) this ciphertext can still take: the fewest of its
        segments'. Follows from the ops that made it, never from the values."""
        if not self.segments:
            return 0
        return min(s.ciphertext()[0].coeff_modulus_size() for s in self.segments) - 1

    def __repr__(self) -> str:
        return f"CKKSTensor(shape={tuple(self.shape)}, segments={len(self.segments)}, {self.context!r})"

    def _like(self, segments: list, shape: Sequence[int] | None = None) -> CKKSTensor:
        return CKKSTensor(self.context, segments, self.shape if shape is None else shape, self.dtype)

    def reshape(self, *shape) -> CKKSTensor:
        """Reshape (metadata only). ``dot``/``mm`` later check that rows still align with segments."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        new = torch.empty(self.shape, device="meta").reshape(shape).shape
        return self._like(self.segments, new)

    view = reshape

    # ------------------------------------------------------------ arithmetic
    def _check_enc(self, other: CKKSTensor) -> None:
        if other.context.key_id != self.context.key_id:
            raise KeyMismatchError("cannot combine CKKS ciphertexts from different contexts (key pairs)")
        if other.shape != self.shape or other.segment_sizes() != self.segment_sizes():
            raise ShapeMismatchError(
                f"encrypted operands must have the same shape and layout: {tuple(self.shape)} vs {tuple(other.shape)}"
            )

    def _plain_parts(self, other) -> list:
        """Split a plaintext operand to match the segments (a scalar stays a scalar)."""
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return [float(other)] * len(self.segments)
        t = torch.as_tensor(other).detach().cpu().to(torch.float64)
        if t.numel() == 1:
            return [float(t.reshape(()))] * len(self.segments)
        try:
            t = torch.broadcast_to(t, self.shape)
        except RuntimeError as exc:
            raise ShapeMismatchError(
                f"plaintext of shape {tuple(t.shape)} does not broadcast to encrypted {tuple(self.shape)}"
            ) from exc
        flat = t.reshape(-1).numpy()
        parts, off = [], 0
        for size in self.segment_sizes():
            parts.append(flat[off : off + size].tolist())
            off += size
        return parts

    def _elementwise(self, other, op: str) -> CKKSTensor:
        if isinstance(other, CKKSTensor):
            self._check_enc(other)
            rhs = other.segments
        else:
            rhs = self._plain_parts(other)
        with _tenseal_errors(op):
            out = [getattr(a, op)(b) for a, b in zip(self.segments, rhs)]
        return self._like(out)

    def __add__(self, other) -> CKKSTensor:
        return self._elementwise(other, "add")

    __radd__ = __add__

    def __sub__(self, other) -> CKKSTensor:
        return self._elementwise(other, "sub")

    def __rsub__(self, other) -> CKKSTensor:
        return (-self) + other

    def __mul__(self, other) -> CKKSTensor:
        return self._elementwise(other, "mul")

    __rmul__ = __mul__

    def __neg__(self) -> CKKSTensor:
        return self._like([s.neg() for s in self.segments])

    def square(self) -> CKKSTensor:
        with _tenseal_errors("square"):
            return self._like([s.square() for s in self.segments])

    def polyval(self, coefficients: Sequence[float]) -> CKKSTensor:
        """Evaluate ``sum(c_i * x**i)`` elementwise (e.g. a sigmoid approximation)."""
        with _tenseal_errors("polyval"):
            return self._like([s.polyval(list(coefficients)) for s in self.segments])

    def sum(self) -> CKKSTensor:
        """Sum of all elements (uses rotations: needs Galois keys)."""
        with _tenseal_errors("sum"):
            parts = [s.sum() if s.size() > 1 else s for s in self.segments]
            total = parts[0]
            for p in parts[1:]:
                total = total + p
        return self._like([total], ())

    def _rows(self) -> list[list[tuple[int, object]]]:
        """Group segments by row as ``(offset_in_row, segment)``; check alignment."""
        row = self.shape[-1] if self.ndim else 1
        rows, cur, off = [], [], 0
        for seg in self.segments:
            cur.append((off, seg))
            off += seg.size()
            if off == row:
                rows.append(cur)
                cur, off = [], 0
            elif off > row:
                raise ShapeMismatchError("ciphertext segments straddle rows; re-encrypt with this shape first")
        return rows

    def dot(self, vector) -> CKKSTensor:
        """Dot product of each row with a plaintext vector: shape ``self.shape[:-1]``."""
        w = torch.as_tensor(vector).detach().cpu().to(torch.float64).reshape(-1)
        if self.ndim == 0 or w.numel() != self.shape[-1]:
            raise ShapeMismatchError(f"cannot dot encrypted {tuple(self.shape)} with plain vector of {w.numel()}")
        out = []
        with _tenseal_errors("dot"):
            for row in self._rows():
                out.append(_dot_row(row, w.numpy()))
        return self._like(out, self.shape[:-1])

    def mm(self, matrix) -> CKKSTensor:
        """``self @ matrix`` for a plaintext matrix ``[k, m]`` and ``self`` of shape ``[k]`` or ``[B, k]``.

        Each output is one dot product (a multiply and a log-depth rotation
        sum), which for a handful of output columns is far faster than
        TenSEAL's vector-matrix product (one rotation per input value). The
        result holds one single-value ciphertext per output element.
        """
        w = torch.as_tensor(matrix).detach().cpu().to(torch.float64)
        if w.ndim != 2 or self.ndim not in (1, 2) or w.shape[0] != self.shape[-1]:
            raise ShapeMismatchError(f"cannot mm encrypted {tuple(self.shape)} with plain {tuple(w.shape)}")
        cols = [w[:, j].numpy() for j in range(w.shape[1])]
        out = []
        with _tenseal_errors("mm"):
            for row in self._rows():
                out.extend(_dot_row(row, c) for c in cols)
        return self._like(out, (*self.shape[:-1], w.shape[1]))

    matmul = mm
    __matmul__ = mm

    def sealed(self) -> CKKSTensor:
        """This tensor as a worker hands out what it computed with the owner's plaintext: each segment's slots
        past its values zeroed (a dot's or sum's rotate-and-add leaves partial sums there: every weight, not the
        one number asked for), a fresh encryption of zero added (new randomness), only the real parts kept with
        the context's conjugation key (:mod:`veil.he.conjugation`: a complex input's imaginary parts were a second
        result, and the real flooding left their noise) and flooding noise added (the computation's own noise
        drowned, :mod:`veil.he.flooding`). Costs one multiplicative level.

        The fresh zero comes before the conjugation: the key holder made that key, and a crafted one adds
        ``c1 * delta`` to what it decrypts (``c1`` the ciphertext's second polynomial); with the fresh zero that
        ``c1`` is uniform, not a product of the key holder's own ``c1`` and the owner's values.

        Raises:
            CiphertextRefusedError: the context has no conjugation key (callers refuse such a context first).
        """
        std = flooding.sigma(self.context.global_scale, product=True)
        galois = conjugation.keys(self.context)
        if galois is None:
            raise CiphertextRefusedError("a result computed with the owner's values is released only under a "
                                         "context with the conjugation key (veil.he.conjugation)")
        out = []
        with _tenseal_errors("release"):
            for seg in self.segments:
                size = seg.size()
                # plaintexts of `size` values are zero in every other slot (a fresh encryption repeats its
                # values across the slots instead: only its zeros are added, or the noise could be read back);
                # the mask's one is halved: c + conj(c) is twice the real part
                kept = seg.mul([0.5] * size).add(ts.ckks_vector(self.context.raw, [0.0] * size))
                kept = conjugation.real_part_doubled(kept, galois)
                out.append(kept.add(flooding.gaussian(size, std).tolist()))
        return self._like(out)

    # ------------------------------------------------------------- decryption
    def send(self, worker):
        """Stores this ciphertext on ``worker`` and returns an HEPointer (see veil.he.remote)."""
        from veil.he.remote import send_encrypted

        return send_encrypted(self, worker)

    def decrypt(self, key: CKKSContext | None = None) -> torch.Tensor:
        """Decrypt to a torch tensor of this shape.

        Args:
            key: a context holding the secret key; defaults to the tensor's own.

        Raises:
            WrongKeyError: ``key`` is a context of another key pair.
            MissingSecretKeyError: no secret key is available.
        """
        ctx = self.context if key is None else key
        if not isinstance(ctx, CKKSContext):
            raise TypeError("decrypt() takes a veil CKKSContext holding the secret key")
        if ctx.key_id != self.context.key_id:
            raise WrongKeyError("this CKKS context's keys did not encrypt the tensor")
        if not ctx.has_secret_key:
            raise MissingSecretKeyError("this CKKS context is public (no secret key); it cannot decrypt")
        sk = ctx.raw.secret_key()
        with _tenseal_errors("decrypt"):
            values = [v for s in self.segments for v in s.decrypt(sk)]
        return torch.tensor(values, dtype=torch.float64).to(self.dtype).reshape(self.shape)


def _dot_row(row: list, w: np.ndarray):
    total = None
    for off, seg in row:
        part = w[off : off + seg.size()].tolist()
        # A one-value segment (an earlier mm's output) needs no rotation sum.
        r = seg.mul(part[0]) if seg.size() == 1 else seg.dot(part)
        total = r if total is None else total + r
    return total


def encrypt(x, context: CKKSContext) -> CKKSTensor:
    """Encrypt a tensor (any shape) under a CKKS ``context`` (public or private).

    Returns:
        A :class:`CKKSTensor`; it decrypts to the input's dtype when floating,
        else to torch's default float dtype.
    """
    if not isinstance(context, CKKSContext):
        raise TypeError("ckks encryption needs context=<veil.he.ckks.CKKSContext> (see veil.he.ckks.context())")
    t = torch.as_tensor(x).detach().cpu()
    dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    flat = t.to(torch.float64).reshape(-1).numpy()
    if not np.isfinite(flat).all():
        raise ValueError("cannot encrypt NaN or infinite values with CKKS")
    row = t.shape[-1] if t.ndim >= 1 else 1
    segments, off = [], 0
    with _tenseal_errors("encrypt"):
        for size in _row_segments(flat.size, row, context.slots) if row else []:
            segments.append(ts.ckks_vector(context.raw, flat[off : off + size].tolist()))
            off += size
    return CKKSTensor(context, segments, t.shape, dtype)


def fresh_like(ctx: CKKSContext) -> CKKSContext:
    """A context of ``ctx``'s ring, modulus chain and scale under a new key pair (no Galois keys): what one
    encrypted-aggregation round uses, so that no ciphertext of another round is under its key."""
    data = ctx.raw.seal_context().data
    totals, level = [], data.first_context_data()
    while level is not None:  # each level drops the chain's last data prime
        totals.append(level.total_coeff_modulus_bit_count())
        level = level.next_context_data()
    rising = totals[::-1]
    special = data.key_context_data().total_coeff_modulus_bit_count() - totals[0]
    bits = [rising[0], *(b - a for a, b in zip(rising, rising[1:])), special]
    degree = data.key_context_data().parms().poly_modulus_degree()
    fresh = context(degree, bits, ctx.global_scale, galois_keys=False)
    if fresh.raw.seal_context().data.key_context_data().total_coeff_modulus_bit_count() != totals[0] + special:
        raise ValueError("could not rebuild the CKKS context's modulus chain for a fresh key pair")
    return fresh
