"""Exceptions raised by veil's secure-computation layers.

Each exception names *what* is wrong so that a user mixing incompatible
tensors gets an actionable message instead of a silent wrong answer.
Every class derives from :class:`veil.exceptions.VeilError` and is registered to
cross the wire, so a remote party's refusal arrives as the same class.
"""

from veil.exceptions import ConnectionLostError, VeilError, register_remote_error


class MPCError(VeilError):
    """Base class for errors raised by :mod:`veil.mpc` and the tensor chain."""


class EncodingOverflowError(MPCError, OverflowError):
    """A value (or an intermediate product) does not fit the Z/2^64 ring.

    Raised by encoding and by plaintext fixed-precision arithmetic, where the
    magnitudes are visible. On secret-shared values the magnitudes are hidden,
    so only the documented safe ranges protect the computation.
    """


class ShareMismatchError(MPCError, ValueError):
    """Two shared tensors are split among different parties or providers."""


class NotEncodedError(MPCError, ValueError):
    """A floating-point value was used where a ring (integer) value is needed.

    Secret sharing works over the integers mod 2^64; floats must first be
    encoded with ``fix_precision``. (A ValueError, not a TypeError: torch's
    binary operators turn a TypeError into ``NotImplemented`` and the message
    would be lost.)
    """


class PrecisionMismatchError(MPCError, ValueError):
    """Two fixed-precision tensors use different bases or fractional precisions."""


class UnsupportedOperationError(MPCError, NotImplementedError):
    """No rule says how to run this torch operation on this tensor type."""


class ProviderError(MPCError, ValueError):
    """A crypto provider was asked for material it cannot produce."""


class MacCheckError(MPCError, RuntimeError):
    """A SPDZ MAC check failed: some party's shares were tampered with (active security)."""


# HE has classes of the same names: the MPC ones travel under an "MPC" prefix.
EncodingOverflowError.wire_name = "MPCEncodingOverflowError"
UnsupportedOperationError.wire_name = "MPCUnsupportedOperationError"
for _cls in (MPCError, EncodingOverflowError, ShareMismatchError, NotEncodedError, PrecisionMismatchError,
             UnsupportedOperationError, ProviderError, MacCheckError):
    register_remote_error(_cls)


class PartyFailedError(MPCError, RuntimeError):
    """A party failed during a protocol round (the orchestrator's view; names the party and the step)."""


class PartyUnreachableError(PartyFailedError, ConnectionLostError):
    """A party's connection was lost during a protocol round (also a ConnectionLostError)."""


for _cls in (PartyFailedError, PartyUnreachableError):
    register_remote_error(_cls)


def party_error(error: BaseException, party: str, what: str) -> BaseException:
    """What a round reports for ``party``'s failure ``error`` during ``what``: a party's own refusal or protocol
    error (a VeilError) as itself, a lost connection as :class:`PartyUnreachableError`, anything else as
    :class:`PartyFailedError` (both caused by ``error``; one already said is not wrapped twice)."""
    if isinstance(error, PartyFailedError) or (isinstance(error, VeilError)
                                               and not isinstance(error, ConnectionLostError)):
        return error
    if isinstance(error, ConnectionLostError):
        wrapped: BaseException = PartyUnreachableError(f"party {party!r} was lost during {what}: {error}")
    else:
        wrapped = PartyFailedError(f"party {party!r} failed during {what}: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped
