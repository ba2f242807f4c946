"""What received TenSEAL bytes will inflate to, read before TenSEAL loads them.

TenSEAL wraps SEAL objects (keys, ciphertexts, parameters) in protobuf messages, and SEAL inflates each one it
loads (zstd or zlib, as the sender chose) before reading it: a few kB of compressed zeros hold a ciphertext, or a
context's Galois keys, of hundreds of MB, and the session quota charges what the bytes took on the wire. This
module walks the protobuf fields and each SEAL object's compressed stream (zstd frame and block headers; zlib is
inflated here in bounded chunks and thrown away) and bounds what SEAL would allocate, without allocating it.
Nothing here is a value: only lengths, headers and the ciphertext's stored scale. Where this walk and protobuf
could read the same bytes differently (a key past 32 bits), and what TenSEAL cannot load safely (a context without
its public key segfaults it), the bytes are refused; the walk's own memory and steps are bounded by its input.
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
_ZLIB_CHUNK, _ZLIB_INPUT = 1 << 20, 1 << 16
#: fields of one protobuf message (TenSEAL writes at most 5; merged copies of a member count one each)
MAX_FIELDS = 64
#: zstd blocks and frames the walk reads per byte its bound allows (an honest block decodes to up to 128 KiB;
#: blocks or frames that decode to nothing would otherwise make millions of Python steps)
_ZSTD_STEP_BYTES = 4096


def _varint(data, i: int) -> tuple[int, int]:
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


def proto_fields(data) -> list[tuple[int, int, object]]:
    """``(field number, wire type, value)`` of a protobuf message: memoryviews of ``data`` for length-delimited
    and fixed-width fields (no copies), an int for varints. Refused: groups (TenSEAL's messages have none), a key
    past 32 bits (protobuf drops the high bits: 5 bytes whose bit 32 is set read as field 2, the count here as
    another) and more than :data:`MAX_FIELDS` fields (the walk's own memory and time; TenSEAL writes a few)."""
    data = memoryview(data)
    fields, i = [], 0
    while i < len(data):
        if len(fields) == MAX_FIELDS:
            raise WireFormatError(f"CKKS bytes hold more than {MAX_FIELDS} protobuf fields in one message")
        key, i = _varint(data, i)
        number, kind = key >> 3, key & 7
        if not 0 < key < 1 << 32 or number == 0:
            raise WireFormatError("invalid protobuf field key in CKKS bytes")
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


def _zstd_bound(data, limit: int) -> int:
    """The most the zstd frames in ``data`` decode to, counted until past ``limit``: raw and RLE blocks say their
    size, a compressed block decodes to 128 KiB at most (whatever window or content size the frame declares: the
    bound does not rest on the decoder checking them); every frame counts (SEAL reads the first), skippable ones
    count nothing. Blocks and frames are bounded in number by ``limit`` (one per :data:`_ZSTD_STEP_BYTES`): units
    that decode to nothing cost zstd's C loop nothing, and this walk a Python step each."""
    total, i, steps = 0, 0, limit // _ZSTD_STEP_BYTES + 64
    while i < len(data) and total <= limit:
        steps -= 1
        if i + 4 > len(data):
            raise WireFormatError("truncated zstd frame in CKKS bytes")
        magic = struct.unpack_from("<I", data, i)[0]
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame decodes to nothing
            i += 8 + struct.unpack_from("<I", data, i + 4)[0] if i + 8 <= len(data) else len(data)
        elif magic != _ZSTD_MAGIC:
            raise WireFormatError("CKKS bytes declare zstd but hold something else")
        else:
            flags = data[i + 4]
            single, checksum, dict_flag, fcs_flag = flags >> 5 & 1, flags >> 2 & 1, flags & 3, flags >> 6
            i += 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + (1 if single else 0, 2, 4, 8)[fcs_flag]
            last = False
            while not last and total <= limit and steps >= 0:
                steps -= 1
                if i + 3 > len(data):
                    raise WireFormatError("truncated zstd block in CKKS bytes")
                header = int.from_bytes(data[i:i + 3], "little")
                last, kind, size = bool(header & 1), header >> 1 & 3, header >> 3
                i += 3
                if kind == 3 or size > _ZSTD_BLOCK_MAX:
                    raise WireFormatError("invalid zstd block in CKKS bytes")
                total += _ZSTD_BLOCK_MAX if kind == 2 else size
                i += 1 if kind == 1 else size
            i += 4 if checksum else 0
        if steps < 0:
            raise WireFormatError("zstd data in CKKS bytes holds more blocks and frames than it decodes to "
                                  "(empty blocks or skippable frames)")
    return total


def _zlib_size(data, limit: int) -> int:
    """Bytes ``data`` inflates to, counted until past ``limit``; zlib gets the input 64 KiB at a time (handed
    the whole input, it gave back an unconsumed tail, a copy of the rest, after each chunk of output: quadratic
    on a stream that inflates 1:1). Data after the stream's end is not inflated (SEAL stops there too)."""
    inflater, total = zlib.decompressobj(), 0
    try:
        for start in range(0, len(data), _ZLIB_INPUT):
            piece = data[start:start + _ZLIB_INPUT]
            while piece and total <= limit:
                total += len(inflater.decompress(piece, _ZLIB_CHUNK))
                piece = inflater.unconsumed_tail
            if inflater.eof or total > limit:
                break
    except zlib.error as exc:
        raise WireFormatError(f"invalid zlib data in CKKS bytes: {exc}") from None
    return total


def inflated_size(blob: bytes, limit: int) -> int:
    """The most SEAL allocates to load the SEAL object ``blob`` (its header's compression mode decides how it is
    read); past ``limit`` the count may stop early."""
    blob = memoryview(blob)
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
            return _zstd_bound(body, limit)
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
        except Exception as exc:  # (pybind11 maps SEAL's exceptions to several Python types)
            raise WireFormatError(f"invalid CKKS encryption parameters: {exc}") from None
    if parms.scheme() != sealapi.SCHEME_TYPE.CKKS:  # (SEAL takes the scheme from the bytes)
        raise WireFormatError(f"a CKKS context must declare the CKKS scheme, not {parms.scheme().name}")
    return parms.poly_modulus_degree(), len(parms.coeff_modulus())


def check_context_bytes(data) -> None:
    """Refuses a TenSEAL context that is not public: a public-key (asymmetric) context with its public key and no
    private member (without a public key TenSEAL segfaults when the key is serialized, as veil does for its key
    id; a secret key with 'keys generated' flags makes TenSEAL generate Galois keys, 80 MB from 260 kB; veil never
    sends either). And one whose SEAL objects (parameters, public, relinearization and Galois keys) would inflate
    past :func:`bound` of its size, or whose ring and primes make SEAL build tables of more than
    :data:`TABLES_PER_WIRE_BYTE` times its size. Every copy of a field counts: protobuf keeps the last one, and
    merges repeated sub-messages, but TenSEAL parses each."""
    fields = proto_fields(data)
    kinds = [value for number, kind, value in fields if number == 4 and kind == 0]
    if kinds and kinds[-1] & 0xFFFFFFFF:  # (protobuf keeps the last copy, as 32 bits)
        raise WireFormatError("a CKKS context on the wire must be a public-key (asymmetric) context")
    parameters, blobs, public_keys = [], [], []
    for number, kind, value in fields:
        if kind != 2:
            continue
        if number == 1:  # encryption parameters
            parameters.append(value)
        elif number == 2:  # public members: public key (1), relinearization (4) and Galois keys (5)
            for n, k, v in proto_fields(value):
                if k == 2 and n in (1, 4, 5):
                    public_keys += [v] if n == 1 else []
                    blobs += [v] if len(v) else []
        elif number == 3:  # private members
            raise WireFormatError("a CKKS context on the wire must not carry a secret key or private members")
    if not public_keys or not len(public_keys[-1]):
        raise WireFormatError("a CKKS context on the wire must carry its public key")
    _check_inflation(parameters + blobs, len(data), "context")
    most = max(TABLES_FLOOR, TABLES_PER_WIRE_BYTE * len(data))
    for blob in parameters:
        degree, primes = _declared_ring(blob)
        if TABLE_BYTES_PER_N_K2 * degree * primes * primes > most:
            raise WireFormatError(f"a CKKS context of {len(data)} bytes declares a ring of {degree} with {primes} "
                                  f"primes, whose tables take more than {most} bytes (send it with its keys)")


def _count_sizes(fields) -> int:
    """How many ``sizes`` entries (field 1: packed or not; protobuf appends every copy) a CKKS vector holds,
    counted up to 2."""
    count = 0
    for number, kind, value in fields:
        if number == 1 and kind == 0:
            count += 1
        elif number == 1 and kind == 2:
            i = 0
            while i < len(value) and count < 2:
                _, i = _varint(value, i)
                count += 1
    return count


def check_vector_bytes(data) -> float:
    """Refuses a TenSEAL CKKS vector that is not one SEAL ciphertext with one size (TenSEAL loads every
    ``ciphertexts`` entry before anyone can count them, and sums every size: sizes [1, 1] beside one ciphertext
    made a vector of 2 that decrypted to 1 value) or whose ciphertext would inflate past :func:`bound` of its
    size. Returns the vector's stored scale (the one TenSEAL encodes a plaintext operand at)."""
    fields = proto_fields(data)
    ciphertexts = [v for n, k, v in fields if n == 2 and k == 2]
    if len(ciphertexts) != 1:
        raise WireFormatError(f"a CKKS vector must hold one ciphertext, this one holds {len(ciphertexts)}")
    if _count_sizes(fields) != 1:
        raise WireFormatError("a CKKS vector must hold one size, beside its one ciphertext")
    scales = [v for n, k, v in fields if n == 3 and k == 1]
    _check_inflation(ciphertexts, len(data), "ciphertext")
    return struct.unpack("<d", scales[-1])[0] if scales else 0.0
