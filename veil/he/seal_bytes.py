"""What received TenSEAL bytes will inflate to, read before TenSEAL loads them.

TenSEAL wraps SEAL objects (keys, ciphertexts, parameters) in protobuf messages, and SEAL inflates each one it
loads (zstd or zlib, as the sender chose) before reading it: a few kB of compressed zeros hold a ciphertext, or a
context's Galois keys, of hundreds of MB, and the session quota charges what the bytes took on the wire. This
module walks the protobuf fields and each SEAL object's compressed stream (zstd frame and block headers; zlib is
inflated here in bounded chunks and thrown away) and bounds what SEAL would allocate, without allocating it.
Nothing here is a value: only lengths, headers and the ciphertext's stored scale.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

import tenseal.sealapi as sealapi

from veil.he.errors import WireFormatError

#: an honest SEAL object is random below its primes, so it inflates by less than 64 / 40 (measured, counting
#: each compressed zstd block at its largest: contexts 1.2 to 1.6, ciphertexts 1.4 to 1.8); 4 leaves room and
#: still bounds what SEAL holds to a few times what the quota charged
MAX_INFLATION = 4
#: the least a received object may inflate to whatever its wire size (a small ciphertext, parameters)
INFLATION_FLOOR = 1 << 20
#: what SEAL's tables for a ring of n and k primes take (NTT and RNS tables at every level of the chain),
#: measured: 33 to 37 bytes per n * k**2 (a 32768 ring of 32 primes: 1.1 GB and 2 s, from 300 bytes of
#: parameters). An honest context carries keys of about that size (k - 1 relinearization keys of 2 k n words)
TABLE_BYTES_PER_N_K2 = 40
#: a context's tables may take this many times its wire size (its keys: ~10 n k**2 bytes), or the floor
TABLES_PER_WIRE_BYTE, TABLES_FLOOR = 8, 16 << 20

_SEAL_MAGIC, _SEAL_HEADER = 0xA15E, 16
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_BLOCK_MAX = 128 * 1024
_ZLIB_CHUNK = 1 << 20


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise WireFormatError("truncated or overlong protobuf varint in CKKS bytes")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def proto_fields(data: bytes) -> list[tuple[int, int, object]]:
    """``(field number, wire type, value)`` of a protobuf message: bytes for length-delimited and fixed-width
    fields, an int for varints. Groups are refused (TenSEAL's messages have none)."""
    fields, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _varint(data, i)
        elif kind in (1, 5):
            width = 8 if kind == 1 else 4
            value, i = data[i:i + width], i + width
        elif kind == 2:
            length, i = _varint(data, i)
            value, i = data[i:i + length], i + length
        else:
            raise WireFormatError(f"unexpected protobuf wire type {kind} in CKKS bytes")
        if i > len(data):
            raise WireFormatError("truncated protobuf field in CKKS bytes")
        fields.append((number, kind, value))
    return fields


def _zstd_frame(data: bytes, i: int) -> tuple[int, int]:
    """``(most bytes the frame at ``i`` decodes to, where it ends)``: raw and RLE blocks say their size, a
    compressed block decodes to 128 KiB at most (whatever window or content size the frame declares: the bound
    does not rest on the decoder checking them)."""
    flags = data[i]
    single, checksum, dict_flag, fcs_flag = flags >> 5 & 1, flags >> 2 & 1, flags & 3, flags >> 6
    i += 1 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + (1 if single else 0, 2, 4, 8)[fcs_flag]
    total, last = 0, False
    while not last:
        if i + 3 > len(data):
            raise WireFormatError("truncated zstd block in CKKS bytes")
        header = int.from_bytes(data[i:i + 3], "little")
        last, kind, size = bool(header & 1), header >> 1 & 3, header >> 3
        i += 3
        if kind == 3 or size > _ZSTD_BLOCK_MAX:
            raise WireFormatError("invalid zstd block in CKKS bytes")
        total += _ZSTD_BLOCK_MAX if kind == 2 else size
        i += 1 if kind == 1 else size
    return total, i + (4 if checksum else 0)


def _zstd_bound(data: bytes) -> int:
    total, i = 0, 0
    while i < len(data):
        if i + 4 > len(data):
            raise WireFormatError("truncated zstd frame in CKKS bytes")
        magic = struct.unpack_from("<I", data, i)[0]
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame decodes to nothing
            i += 8 + struct.unpack_from("<I", data, i + 4)[0] if i + 8 <= len(data) else len(data)
            continue
        if magic != _ZSTD_MAGIC:
            raise WireFormatError("CKKS bytes declare zstd but hold something else")
        size, i = _zstd_frame(data, i + 4)
        total += size
    return total


def _zlib_size(data: bytes, limit: int) -> int:
    """Bytes ``data`` inflates to, counted in bounded chunks, up to ``limit + 1``."""
    inflater, total = zlib.decompressobj(), 0
    try:
        while data and total <= limit:
            total += len(inflater.decompress(data, _ZLIB_CHUNK))
            data = inflater.unconsumed_tail
    except zlib.error as exc:
        raise WireFormatError(f"invalid zlib data in CKKS bytes: {exc}") from None
    return total


def inflated_size(blob: bytes, limit: int) -> int:
    """The most SEAL allocates to load the SEAL object ``blob`` (its header's compression mode decides how it is
    read); past ``limit`` the count may stop early."""
    if len(blob) < _SEAL_HEADER:
        raise WireFormatError("CKKS bytes hold a SEAL object shorter than its header")
    magic, header_size, _major, _minor, mode, _reserved, size = struct.unpack_from("<HBBBBHQ", blob)
    if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER or not _SEAL_HEADER <= size <= len(blob):
        raise WireFormatError("CKKS bytes hold an invalid SEAL header")
    body = blob[_SEAL_HEADER:size]
    if mode == 0:
        return size
    try:
        if mode == 1:
            return _zlib_size(body, limit)
        if mode == 2:
            return _zstd_bound(body)
    except IndexError:
        raise WireFormatError("truncated zstd data in CKKS bytes") from None
    raise WireFormatError(f"unknown SEAL compression mode {mode} in CKKS bytes")


def bound(wire_bytes: int) -> int:
    """What ``wire_bytes`` on the wire may inflate to (see :data:`MAX_INFLATION`)."""
    return max(INFLATION_FLOOR, MAX_INFLATION * wire_bytes)


def _check_inflation(blobs: list[bytes], wire_bytes: int, what: str) -> None:
    limit, total = bound(wire_bytes), 0
    for blob in blobs:
        total += inflated_size(blob, limit - total)
        if total > limit:
            raise WireFormatError(f"a CKKS {what} of {wire_bytes} bytes inflates to more than {limit} bytes "
                                  "(a compression bomb)")


def _declared_ring(parameters: bytes) -> tuple[int, int]:
    """``(poly_modulus_degree, number of primes)`` of SEAL encryption parameters (inflation already bounded),
    read by SEAL without building a context (it loads parameters from a file only)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "parameters")
        with open(path, "wb") as f:
            f.write(parameters)
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        try:
            parms.load(path)
        except (ValueError, RuntimeError) as exc:
            raise WireFormatError(f"invalid CKKS encryption parameters: {exc}") from None
    return parms.poly_modulus_degree(), len(parms.coeff_modulus())


def check_context_bytes(data: bytes) -> None:
    """Refuses a TenSEAL context whose SEAL objects (parameters, public, relinearization, Galois and secret keys)
    would inflate past :func:`bound` of its size, or whose ring and primes make SEAL build tables of more than
    :data:`TABLES_PER_WIRE_BYTE` times its size. Every copy of a field counts: protobuf keeps the last one, and
    merges repeated sub-messages, but TenSEAL parses each."""
    parameters, blobs = [], []
    for number, kind, value in proto_fields(data):
        if kind != 2:
            continue
        if number == 1:  # encryption parameters
            parameters.append(value)
        elif number in (2, 3):  # public (keys in 1, 4, 5) and private (secret key in 1) members
            keys = (1, 4, 5) if number == 2 else (1,)
            blobs.extend(v for n, k, v in proto_fields(value) if k == 2 and n in keys and v)
    _check_inflation(parameters + blobs, len(data), "context")
    most = max(TABLES_FLOOR, TABLES_PER_WIRE_BYTE * len(data))
    for blob in parameters:
        degree, primes = _declared_ring(blob)
        if TABLE_BYTES_PER_N_K2 * degree * primes * primes > most:
            raise WireFormatError(f"a CKKS context of {len(data)} bytes declares a ring of {degree} with {primes} "
                                  f"primes, whose tables take more than {most} bytes (send it with its keys)")


def check_vector_bytes(data: bytes) -> float:
    """Refuses a TenSEAL CKKS vector that is not one SEAL ciphertext (TenSEAL loads every ``ciphertexts`` entry
    before anyone can count them) or whose ciphertext would inflate past :func:`bound` of its size. Returns the
    vector's stored scale (the one TenSEAL encodes a plaintext operand at)."""
    fields = proto_fields(data)
    ciphertexts = [v for n, k, v in fields if n == 2 and k == 2]
    if len(ciphertexts) != 1:
        raise WireFormatError(f"a CKKS vector must hold one ciphertext, this one holds {len(ciphertexts)}")
    scales = [v for n, k, v in fields if n == 3 and k == 1]
    _check_inflation(ciphertexts, len(data), "ciphertext")
    return struct.unpack("<d", scales[-1])[0] if scales else 0.0
