"""Division of secret-shared values by a public integer (truncation).

Fixed-point products carry scale ``s^2`` and must be divided by ``s``.

**Dealt pairs with a known-zero top bit** (any number of parties, 1 round).
The provider deals shares of a uniform ``r`` in Z/2^64 (read as an unsigned
integer in ``[0, 2^64)``), of ``q = floor(r / d)`` and of
``g = h (q + floor((2^64 - r) / d) + 1)`` where ``h`` is the top bit of ``r``.
For ``|x| <= 2^62 - d`` (:data:`TRUNCATION_BOUND`) the parties shift ``x``
by the public multiple of ``d`` ``K = d * floor(2^62 / d)``, so that
``x' = x + K`` lies in ``[0, 2^63)``: its top bit is known to be 0. They open
``c = x' + r mod 2^64`` (uniform: it reveals nothing); with ``w`` the wrap
of that sum, ``x' = c - r`` if ``w = 0`` and ``x' = c + (2^64 - r)`` if
``w = 1``. Because the top bit of ``x'`` is 0, the wrap is a *linear*
function of the shared ``h`` and the public top bit ``c_hi`` of ``c``:
``w = (1 - c_hi) h`` (check the four cases; the "MSB known to be zero"
trick of the ring-MPC literature, e.g. Escudero et al., Crypto 2020). So
every party computes locally

    z = floor(c / d) - q + (1 - c_hi) g - K / d

(party 0 adds the public terms): for ``w = 0`` this is ``floor(c/d) -
floor(r/d)``, for ``w = 1`` ``floor(c/d) + floor((2^64 - r)/d) + 1``, and
either way ``z - floor(x / d)`` is 0 or 1 (the borrow or carry of the
remainders is not corrected: at most one ulp, like rounding). There is **no
failure probability**: this holds for every input in range and every mask.
Outside the range the result is garbage: the encoder keeps encoded values
and products inside it (:mod:`veil.mpc.encoding`).

Only party 0 needs ``c`` itself (for ``floor(c / d)``); every other party
needs only ``c_hi``, so the orchestrator sends them the top bits packed 8 to
a byte (:func:`pack_top_bits`; ``trunc_finish_bits``): 1/64 of the bytes of
``c`` (1e6 entries: 125 kB instead of 8 MB per party), and a party learns a
function of what it was shown before, nothing more. A party in the
orchestrator's process (:meth:`~veil.mpc.runtime.PartyRuntime.in_process`)
gets ``c`` itself: its bytes cost nothing there, while packing them costs the
orchestrator a pass (``c`` is uniform to it as to party 0: ``r`` masks it).

With peer openings (network parties that open among themselves,
:func:`~veil.mpc.party.open_top_bits_at_parties`) the same split happens without the
orchestrator: parties 1.. send their shares of ``c`` to party 0 only, which reconstructs ``c``
(a masked value, as the orchestrator sees it in the star) and sends each of them the packed top
bits: per product ``8 + 1/8`` bytes per entry and other party instead of 16 when every party
reconstructed ``c``, and no party but party 0 learns more than ``c_hi``. That is two exchanges one
after the other; parties on one host (:meth:`~veil.mpc.runtime.PartyRuntime.one_host`, where bytes
are a memory copy) open values of fewer than :data:`TOP_BITS_MIN_ELEMENTS` entries to every party
in one exchange instead: ``c`` is masked by the dealt ``r``, which no party knows, so it is as
uniform to party 1 as to party 0 (the usual "open ``x + r`` to all" of the truncation literature).

Cost: one round, one ring element per entry per party to each other party
(for 2 parties this is one round more than SecureML's local truncation,
kept below as :func:`truncate_secureml` but not used by default: it fails
with probability ``|x| / 2^64`` per entry, i.e. 6% at ``|x| = 2^60``).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Hashable, Mapping

import numpy as np
import torch

from veil.mpc import ring_numpy
from veil.mpc.output_buffers import output_buffer
from veil.mpc.party import open_at_parties, open_parties, open_top_bits_at_parties, party_function, run_party
from veil.mpc.providers.base import Provider
from veil.mpc.ring import meta_result, wrap_int
from veil.mpc.runtime import runtime_of

Shares = Mapping[Hashable, torch.Tensor]

#: truncation is exact (to one ulp) for ``|x| <= TRUNCATION_BOUND - divisor``
TRUNCATION_BOUND = 1 << 62
#: entries from which parties on one host open ``c`` in two exchanges (shares to party 0, its packed top bits
#: back) rather than one (every party reconstructs ``c``): below it the second exchange's wake-ups cost
#: more than the other parties' 8 bytes per entry, which on one host are a memory copy (bench/RESULTS.md,
#: "Fortieth landing"). Across hosts the top bits are always used: there the bytes are the cost. The
#: environment variable is for benchmarks.
TOP_BITS_MIN_ELEMENTS = int(os.environ.get("VEIL_TOP_BITS_MIN_ELEMENTS", str(1 << 18)))


def _one_host(shares: Shares) -> bool:
    """True when the parties holding ``shares`` run on one host (:meth:`PartyRuntime.one_host`)."""
    rt = runtime_of(next(iter(shares.values())))
    return rt is not None and rt.one_host([rt.location(s) for s in shares.values()])


def shift_for(divisor: int) -> int:
    """``K``: the multiple of ``divisor`` added so that ``x + K`` has top bit 0."""
    return divisor * (TRUNCATION_BOUND // divisor)


def floor_div_unsigned(v: torch.Tensor, divisor: int) -> torch.Tensor:
    """``floor(v / d)`` with ``v`` read as an unsigned 64-bit integer (result mod 2^64).

    Through numpy (:func:`_floor_div_into`) where it can view ``v``; else (a meta tensor) with torch's ops:
    for negative (top bit set) ``v``, ``v + 2^64 = (v + s_M) + q_M d`` with ``2^64 = q_M d + s_M``, and
    ``v + s_M`` cannot overflow.

    Raises:
        ValueError: ``divisor`` outside ``[1, 2^64)`` (a shift by 64 or more would wrap its count in numpy).
    """
    if type(divisor) is not int or not 0 < divisor < 1 << 64:
        raise ValueError(f"an unsigned 64-bit division needs an integer divisor in [1, 2^64), got {divisor!r}")
    a = ring_numpy.array_of(v.contiguous())
    if a is not None:
        out = torch.empty(v.shape, dtype=v.dtype)
        _floor_div_into(out.numpy(), a, divisor)
        return out
    k = (divisor & -divisor).bit_length() - 1  # d = 2^k m, m odd
    if k:  # a logical shift (one pass, in place on its fresh result), then m divides a non-negative value:
        shifted = (v >> k).bitwise_and_((1 << (64 - k)) - 1)  # floor(floor(v / 2^k) / m) = floor(v / d)
        odd = divisor >> k
        return shifted if odd == 1 else torch.div(shifted, odd, rounding_mode="trunc")
    q_m, s_m = divmod(1 << 64, divisor)
    neg = (v < 0).to(v.dtype)
    return torch.div(v + neg * s_m, divisor, rounding_mode="floor") + neg * wrap_int(q_m)


def _floor_div_into(out: np.ndarray, v: np.ndarray, divisor: int) -> None:
    """``out = floor(v / d)``, int64 arrays read as unsigned: numpy divides uint64 as unsigned, so for
    ``d = 2^k m`` (m odd) a logical shift and, if ``m > 1``, a division, one pass each with no fix-ups
    (torch has no uint64 arithmetic: a shift and a mask, and for an odd part several passes; an SGD
    step's ``d = s / lr`` at 1.2e5 entries: 0.27 -> 0.07 ms)."""
    k = (divisor & -divisor).bit_length() - 1
    q = out.view(np.uint64)
    np.right_shift(v.view(np.uint64), np.uint64(k), out=q)
    if divisor >> k != 1:
        np.floor_divide(q, np.uint64(divisor >> k), out=q)


def top_bit(v: torch.Tensor) -> torch.Tensor:
    """0/1 top (sign) bit of int64 values."""
    return (v < 0).to(v.dtype)


@party_function("trunc_local")
def _trunc_local(x_i: torch.Tensor, divisor: int, negate: bool) -> torch.Tensor:
    """``floor(x_i / d)``, or ``-floor(-x_i / d)`` for the second party."""
    if x_i.is_meta:
        return torch.empty_like(x_i)
    if negate:
        return -torch.div(-x_i, divisor, rounding_mode="floor")
    return torch.div(x_i, divisor, rounding_mode="floor")


@party_function("trunc_mask", openable=True, light=True, borrows=True)
def _trunc_mask(x_i: torch.Tensor, r_i: torch.Tensor, shift: int = 0) -> tuple:
    """A party's share of ``c = x + K + r`` (uniformly masked; party 0 adds ``K``)."""
    if type(shift) is not int:
        raise ValueError("trunc_mask needs an integer shift")
    if x_i.is_meta or r_i.is_meta:  # shape inference: no meta arithmetic (see ring.meta_result)
        return (meta_result(r_i, x_i),)
    out = output_buffer(0, r_i.shape, r_i.dtype) if x_i.shape == r_i.shape and x_i.dtype == r_i.dtype else None
    # laid out as the dealt r (contiguous) where x is a strided view: the result is sent (or computed where
    # the runner will send it from: veil.mpc.output_buffers)
    masked = torch.add(r_i, x_i, out=out) if out is not None else r_i + x_i
    return (masked.add_(shift) if shift else masked,)


def wrap_correction(r: torch.Tensor, divisor: int) -> torch.Tensor:
    """The dealer's ``g = h (floor(r/d) + floor((2^64 - r)/d) + 1)``, ``h`` the top bit of ``r``.

    For ``d = 2^k`` and ``r = a d + b`` (``0 <= b < d``, ``r != 0``) the sum is ``2^(64-k) + [b = 0]``
    (``floor((2^64 - r)/d)`` is ``2^(64-k) - a`` if ``b = 0``, else one less): 4 passes instead of 12.
    """
    if divisor > 1 and divisor & (divisor - 1) == 0:
        g = (r & (divisor - 1)).eq_(0)  # [b = 0], int64
        g += wrap_int(1 << (64 - (divisor.bit_length() - 1)))
        # times h: r >> 63 (arithmetic) is all ones where r < 0, else 0 (masked_fill_ with r >= 0 took 3x as long:
        # 6.3 -> 1.9 ms at 1e6 entries, a mul 1e6's dealing)
        return g.bitwise_and_(r >> 63)
    h = top_bit(r)
    return h * (floor_div_unsigned(r, divisor) + floor_div_unsigned(-r, divisor) + 1)


@party_function("trunc_finish", light=True, borrows=True)
def _trunc_finish(c: torch.Tensor, q_i: torch.Tensor, g_i: torch.Tensor, divisor: int, first: bool) -> torch.Tensor:
    """``z_i = (1 - c_hi) g_i - q_i`` (+ ``floor(c/d) - K/d`` for party 0)."""
    if type(divisor) is not int or not 1 < divisor <= TRUNCATION_BOUND or not isinstance(first, bool):
        # (past 2^62 numpy's shift by k >= 64 would wrap the shift count: garbage, not an error)
        raise ValueError("trunc_finish needs an integer divisor in [2, 2^62] and a boolean first")
    if q_i.is_meta:  # run_party's shape inference: q's shape (meta division costs ~1 ms)
        return torch.empty_like(q_i)
    if c.shape != q_i.shape or g_i.shape != q_i.shape:  # (the pieces below would not broadcast as ops do)
        raise ValueError("trunc_finish: the opened value and the q and g shares differ in shape")
    c = c.contiguous()  # (a local share of a transposed value opens with its strides: z must be flat-viewable)
    if not first:
        z = c >> 63  # all ones where the top bit is set
        return z.bitwise_not_().bitwise_and_(g_i).sub_(q_i)  # (1 - c_hi) g - q, in place on one fresh tensor
    z = _first_finish_in_numpy(c, q_i, g_i, divisor)
    return z if z is not None else _first_finish_in_torch(c, q_i, g_i, divisor)


def _first_finish_in_torch(c: torch.Tensor, q_i: torch.Tensor, g_i: torch.Tensor, divisor: int) -> torch.Tensor:
    """Party 0's finish, ``floor(c/d) - K/d - q + (1 - c_hi) g``, with torch's ops (operands numpy cannot view).

    ``floor(c/d) - K/d - q`` goes into the one fresh (result) tensor, then ``(1 - c_hi) g`` is added piece by
    piece through one small scratch buffer: a second tensor of the product's size alive beside the result
    makes glibc trim and re-fault both (1e6 entries: ~3.8k page faults, 2.5x the arithmetic)."""
    z = floor_div_unsigned(c, divisor).sub_(q_i).sub_(shift_for(divisor) // divisor)
    flat_z, flat_c, flat_g = z.view(-1), c.reshape(-1), g_i.reshape(-1)
    n = flat_z.numel()
    scratch = torch.empty(min(_FINISH_PIECE, n), dtype=z.dtype)
    for at in range(0, n, _FINISH_PIECE):
        end = min(at + _FINISH_PIECE, n)
        sel = scratch[: end - at]
        torch.bitwise_right_shift(flat_c[at:end], 63, out=sel)  # all ones where the top bit is set
        ring_numpy.add_(flat_z[at:end], sel.bitwise_not_().bitwise_and_(flat_g[at:end]))
    return z


#: entries per piece of party 0's truncation finish (512 KiB of int64 scratch)
_FINISH_PIECE = 1 << 16


def _first_finish_in_numpy(c: torch.Tensor, q_i: torch.Tensor, g_i: torch.Tensor, divisor: int):
    """Party 0's finish through numpy's ufuncs, piece by cache-sized piece; None where an operand is not a
    plain int64 CPU tensor (:func:`_first_finish_in_torch` then gives the same values).

    numpy divides uint64 as unsigned (:func:`_floor_div_into`), its int64 adds do not multiply by ``alpha``
    (:mod:`veil.mpc.ring_numpy`), and a piece's later passes find it in cache. Held in cache, ``d = 2^16``:
    16 entries 29 -> 17 us, 2^16 155 -> 96 us, 1e6 2.8 -> 2.0 ms (an SGD step's ``d = 2^17 * 5``: 2^16
    entries 290 -> 120 us). The other parties' finish (four passes, no division) gained only from 2^16
    entries and stays torch's.
    """
    arrays = [ring_numpy.array_of(t) for t in (c, q_i.contiguous(), g_i.contiguous())]
    if any(a is None for a in arrays):
        return None
    z = torch.empty(q_i.shape, dtype=q_i.dtype)
    zn, cn, qn, gn = (a.reshape(-1) for a in [z.numpy(), *arrays])
    k_over_d = shift_for(divisor) // divisor
    n = zn.size
    scratch = np.empty(min(_FINISH_PIECE, n), dtype=np.int64)
    for at in range(0, n, _FINISH_PIECE):  # floor(c/d) - q - K/d + (1 - c_hi) g
        end = min(at + _FINISH_PIECE, n)
        zp, cp, qp, gp = (zn, cn, qn, gn) if end - at == n else (zn[at:end], cn[at:end], qn[at:end], gn[at:end])
        _floor_div_into(zp, cp, divisor)
        np.subtract(zp, qp, out=zp)
        np.subtract(zp, k_over_d, out=zp)
        sel = scratch[: end - at]
        np.right_shift(cp, 63, out=sel)  # all ones where the top bit is set
        np.invert(sel, out=sel)
        np.bitwise_and(sel, gp, out=sel)
        np.add(zp, sel, out=zp)
    return z


#: bit k of packed byte j is entry 8j + k (little-endian bit order, as numpy's packbits(bitorder="little"))
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
#: x * _GATHER >> 56 moves the lowest bit of byte k of x to bit k of the top byte (the 64 partial products
#: land on distinct bit positions, so nothing carries); _SPREAD copies a byte to all eight, _PICK keeps bit k in byte k
_GATHER = 0x0102040810204080
_SPREAD = 0x0101010101010101
_PICK = wrap_int(0x8040201008040201)
_SEVEN_F = 0x7F7F7F7F7F7F7F7F
_LITTLE = sys.byteorder == "little"  # the word tricks read 8 bytes as one little-endian int64


def pack_top_bits(c: torch.Tensor) -> torch.Tensor:
    """The top bits of ``c`` (flattened), 8 to a uint8 (the last byte padded with zeros)."""
    return pack_bits((c.reshape(-1) < 0).view(torch.uint8))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 entries of ``bits`` (flattened; uint8, or int64 holding only 0 or 1), 8 to a uint8 (the last
    byte padded with zeros); :func:`unpack_top_bits` reads them back. Bitwise: packing commutes with XOR."""
    bits = bits.reshape(-1)
    if bits.dtype != torch.uint8:
        bits = bits.to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    if _LITTLE:  # 8 entries per int64 word: three passes over n/8 words
        return ((bits.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)
    bits = bits.view(-1, 8)
    packed = bits[:, 0].clone()
    for k in range(1, 8):
        packed |= bits[:, k] << k
    return packed


def unpack_top_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` bits of :func:`pack_top_bits`'s (or :func:`pack_bits`') output, as 0/1 uint8 (flat)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed top bits must be a flat uint8 tensor of {(numel + 7) // 8} bytes")
    if _LITTLE:  # word j, byte k: entry 8j + k's bit, kept in place k (2^k or 0), then moved to the byte's
        words = (packed.to(torch.int64) * _SPREAD).bitwise_and_(_PICK)  # top bit by adding 0x7f (no byte
        words.add_(_SEVEN_F).bitwise_right_shift_(7).bitwise_and_(_SPREAD)  # carries: 0x80 + 0x7f = 0xff)
        return words.view(torch.uint8)[:numel]
    return ((packed.unsqueeze(1) >> _BIT_SHIFTS) & 1).view(-1)[:numel]


@party_function("trunc_finish_bits", light=True, borrows=True)
def _trunc_finish_bits(c_hi: torch.Tensor, q_i: torch.Tensor, g_i: torch.Tensor) -> torch.Tensor:
    """``z_i = (1 - c_hi) g_i - q_i`` for a party other than party 0, from the packed top bits of ``c``."""
    if q_i.is_meta:
        return torch.empty_like(q_i)
    if g_i.shape != q_i.shape:
        raise ValueError("trunc_finish_bits: q and g shares differ in shape")
    # bit 1 -> 0, bit 0 -> all ones (-1) on the unpacked bytes (an eighth of the words' memory), widened
    # with its sign, then & g: one pass over the int64 words fewer than widening 0/1 and subtracting 1
    keep = unpack_top_bits(c_hi, q_i.numel()).view(torch.int8).sub_(1)
    z = keep.to(q_i.dtype).view(q_i.shape)
    z.bitwise_and_(g_i).sub_(q_i)
    return z


def truncate_secureml(shares: Shares, divisor: int) -> dict:
    """SecureML local truncation for exactly two parties (no communication).

    Not used by default: it fails (error ~2^64/d) with probability ``|x| /
    2^64`` per entry [Mohassel & Zhang 2017, Thm. 1].
    """
    parties = list(shares.keys())
    if len(parties) != 2:
        raise ValueError(f"SecureML local truncation needs exactly 2 parties, got {len(parties)}")
    return {p: run_party("trunc_local", shares[p], divisor=divisor, negate=(i == 1)) for i, p in enumerate(parties)}


def truncate_with_pairs(shares: Shares, divisor: int, provider: Provider) -> dict:
    """Truncation with dealt ``(r, floor(r/d), g)``; any number of parties."""
    parties = list(shares.keys())
    shape = tuple(shares[parties[0]].shape)
    pairs = provider.truncation_pairs(shape, divisor, parties)
    shift = shift_for(divisor)
    per_party = {p: (shares[p], pairs[p][0], shift if i == 0 else 0) for i, p in enumerate(parties)}
    if math.prod(shape) < TOP_BITS_MIN_ELEMENTS and _one_host(shares):
        opened = open_at_parties("trunc_mask", per_party)  # every party reconstructs c: one exchange
        if opened is not None:
            return {p: run_party("trunc_finish", opened[p][0], pairs[p][1], pairs[p][2], divisor=divisor, first=i == 0)
                    for i, p in enumerate(parties)}
    opened = open_top_bits_at_parties("trunc_mask", per_party)
    if opened is not None:  # a peer opening: party 0 holds c, the others its packed top bits
        return {p: run_party("trunc_finish", opened[p][0], pairs[p][1], pairs[p][2], divisor=divisor, first=True)
                if i == 0 else run_party("trunc_finish_bits", opened[p][0], pairs[p][1], pairs[p][2])
                for i, p in enumerate(parties)}
    (c,) = open_parties("trunc_mask", per_party)
    return finish_truncation(c, pairs, divisor)


def finish_truncation(c: torch.Tensor, pairs: Mapping, divisor: int) -> dict:
    """The parties' shares of ``x / divisor`` from the opened ``c = x + K + r`` (local steps).

    Args:
        c: The opened ``x + shift_for(divisor) + r`` (K added by a party or, the same mod 2^64, after opening).
        pairs: party -> its ``(r, q, g)`` shares, parties in order (party 0 adds the public terms).
    """
    parties = list(pairs.keys())
    whole = [i == 0 or _in_process(pairs[p][1]) for i, p in enumerate(parties)]  # who gets c itself
    c_hi = None if all(whole) else pack_top_bits(c)  # all that remote parties 1.. need of c
    return {
        p: run_party("trunc_finish", c, pairs[p][1], pairs[p][2], divisor=divisor, first=i == 0) if whole[i]
        else run_party("trunc_finish_bits", c_hi, pairs[p][1], pairs[p][2])
        for i, p in enumerate(parties)
    }


def _in_process(share: torch.Tensor) -> bool:
    """True for a share held by a party in this process (:meth:`PartyRuntime.in_process`; local shares, the
    protocol's own tests, take the packed bits as remote parties do)."""
    rt = runtime_of(share)
    return rt is not None and rt.in_process(share)


def truncate_shares(shares: Shares, divisor: int, provider: Provider) -> dict:
    """Shares of ``x / divisor`` (exact to one ulp for ``|x| <= 2^62 - divisor``).

    Args:
        shares: party -> share of ``x``.
        divisor: Public positive integer.
        provider: Deals the truncation pairs.
    """
    if int(divisor) != divisor or divisor <= 0:
        raise ValueError(f"divisor must be a positive integer, got {divisor!r}")
    divisor = int(divisor)
    if divisor == 1:  # fresh share objects: opening the result must not free the operand's
        return {p: torch.ops.aten.clone.default(s) for p, s in shares.items()}
    if divisor > TRUNCATION_BOUND:
        raise ValueError(f"divisor must be at most 2^62, got {divisor}")
    return truncate_with_pairs(shares, divisor, provider)
