"""Exceptions raised by the homomorphic-encryption layer.

Every class derives from :class:`HEError`; the ones about bad input also derive
from :class:`ValueError` (or :class:`TypeError`) so that generic callers, such
as the core's deserializer, can catch them without importing this module.
Messages name what is wrong but never include key material or plaintexts.
"""

from __future__ import annotations


from veil.exceptions import VeilError, register_remote_error


class HEError(VeilError):
    """Base class of every error raised by ``veil.he``."""


class WrongKeyError(HEError, ValueError):
    """A ciphertext was decrypted with a key (or context) it was not made under."""


class KeyMismatchError(HEError, ValueError):
    """Two ciphertexts under different keys or contexts were combined."""


class MissingSecretKeyError(HEError, ValueError):
    """Decryption was asked of a party that holds no secret key."""


class UnsupportedOperationError(HEError, TypeError):
    """The scheme cannot compute this operation (e.g. Paillier ciphertext x ciphertext)."""


class DepthExhaustedError(HEError, ArithmeticError):
    """A CKKS ciphertext has no multiplicative levels (or scale) left for this operation."""


class DepthRequiredError(DepthExhaustedError):
    """An operation refused before it ran: the CKKS ciphertext has fewer levels left than it needs. Value-free
    (the levels follow from the ops that made the ciphertext), so the text reaches the requester even when
    the operand was the owner's data."""

    value_free = True


class EncodingOverflowError(HEError, OverflowError):
    """A value does not fit in the plaintext space (too large for the key or the dtype)."""


class ShapeMismatchError(HEError, ValueError):
    """Operands have shapes or ciphertext layouts that cannot be combined."""


class WireFormatError(HEError, ValueError):
    """A wire dictionary is malformed, of an unknown kind, or fails validation."""


class CKKSOperationError(HEError, RuntimeError):
    """TenSEAL refused a CKKS operation for a reason other than exhausted depth."""


class CiphertextRefusedError(HEError, ValueError):
    """A ciphertext someone else made is not what the computation agreed to take (parameters, level, scale,
    polynomial count): refused before any work on it."""


class ConjugationKeyRequiredError(CiphertextRefusedError):
    """A reduction on the owner's data refused before it ran: the ciphertext's context has no conjugation key, so
    its result could not keep only its real parts. Value-free (the context's keys are the requester's own)."""

    value_free = True


# MPC has classes of the same names: the HE ones travel under an "HE" prefix.
EncodingOverflowError.wire_name = "HEEncodingOverflowError"
UnsupportedOperationError.wire_name = "HEUnsupportedOperationError"
for _cls in (HEError, WrongKeyError, KeyMismatchError, MissingSecretKeyError, UnsupportedOperationError,
             DepthExhaustedError, DepthRequiredError, EncodingOverflowError, ShapeMismatchError, WireFormatError,
             CKKSOperationError, CiphertextRefusedError, ConjugationKeyRequiredError):
    register_remote_error(_cls)
