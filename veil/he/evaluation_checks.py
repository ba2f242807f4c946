"""What the model owner checks in an encrypted batch before computing on it with its plaintext weights.

The data owner holds the secret key, so it can craft every ciphertext it sends: a ring or modulus chain other
than the agreed one (bigger, slower), a ciphertext of three polynomials (the third, times a weight row, comes back
beside the rerandomized two), one mod-switched below the top level, a scale that encodes the weights with more
bits than agreed (TenSEAL encodes a plaintext operand at the vector's own stored scale), or a transparent one.
Everything here is read from the ciphertexts' metadata, never from their values, and refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import tenseal.sealapi as sealapi

from veil.he import conjugation
from veil.he.ckks import CKKSContext, CKKSTensor
from veil.he.errors import CiphertextRefusedError, ShapeMismatchError
from veil.workers.user_caches import per_user_cache


@dataclass(frozen=True)
class EvaluationParameters:
    """The CKKS parameters an encrypted evaluation agreed to take (the data owner's key, these parameters)."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    global_scale: float

    def __post_init__(self):
        # one level for the weights, one to zero the unused slots before release (CKKSTensor.sealed)
        if len(self.coeff_mod_bit_sizes) < 4:
            raise ValueError("an encrypted evaluation needs a modulus chain of two levels (4 primes) at least")


#: what :func:`veil.he.evaluation.default_context` makes
DEFAULT_PARAMETERS = EvaluationParameters(8192, (60, 40, 40, 60), 2.0**40)


def parameters_of(ctx: CKKSContext) -> EvaluationParameters:
    """The parameters of a context this party made itself (trusted: e.g. local ``encrypted_predict``)."""
    data = ctx.raw.seal_context().data.key_context_data().parms()
    bits = tuple(m.bit_count() for m in data.coeff_modulus())
    return EvaluationParameters(data.poly_modulus_degree(), bits, float(ctx.global_scale))


@per_user_cache(per_user=8, total=512)  # (per user: a shared one's hit said who sent batches of these)
def _key_parms_id(params: EvaluationParameters) -> tuple[int, ...]:
    """SEAL's hash of the ring and primes these parameters make (an attacker's primes of the same bit sizes
    differ)."""
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
    return tuple(sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128).key_parms_id())


def check_batch(enc_x: CKKSTensor, n_features: int, width: int, params: EvaluationParameters) -> None:
    """Refuses a batch that is not ``n_features`` fresh ciphertexts of ``width`` values under ``params``.

    Raises:
        CiphertextRefusedError: other parameters, scale, level or polynomial count, a transparent ciphertext, or
            a context without the conjugation key.
        ShapeMismatchError: not one ciphertext of ``width`` values per feature.
    """
    ctx = enc_x.context
    if not isinstance(ctx, CKKSContext):
        raise CiphertextRefusedError("the encrypted batch has no veil CKKS context")
    data = ctx.raw.seal_context().data
    if tuple(data.key_parms_id()) != _key_parms_id(params) or float(ctx.global_scale) != params.global_scale:
        raise CiphertextRefusedError(
            f"the encrypted batch is not under the agreed CKKS parameters (ring {params.poly_modulus_degree}, "
            f"primes {list(params.coeff_mod_bit_sizes)}, scale {params.global_scale:g})")
    if conjugation.keys(ctx) is None:
        raise CiphertextRefusedError(
            "the encrypted batch's context has no conjugation key (the scores' imaginary parts would be a second "
            "answer); make the context with veil.he.evaluation.default_context()")
    if len(enc_x.segments) != n_features:
        raise ShapeMismatchError(f"expected one ciphertext per feature ({n_features}), got {len(enc_x.segments)}")
    top = tuple(data.first_parms_id())
    for j, seg in enumerate(enc_x.segments):
        raws = seg.ciphertext()
        if seg.size() != width or len(raws) != 1:
            raise ShapeMismatchError(f"feature {j}'s ciphertext holds {seg.size()} values, expected {width}")
        raw = raws[0]
        if raw.size() != 2 or tuple(raw.parms_id()) != top or raw.scale != params.global_scale \
                or raw.is_transparent():
            raise CiphertextRefusedError(
                f"feature {j}'s ciphertext is not a fresh encryption (2 polynomials, top level, the agreed "
                "scale); encrypt the batch with veil.he.evaluation.encrypt_batch")


def check_product(term, params: EvaluationParameters) -> None:
    """Refuses a product whose scale is not the agreed one: TenSEAL encoded the weights at the vector's own
    stored scale (not part of the ciphertext's metadata that :func:`check_batch` reads) and rescales the product
    back to it."""
    if term.ciphertext()[0].scale != params.global_scale:
        raise CiphertextRefusedError("a ciphertext of the batch carries a scale other than the agreed one; "
                                     "encrypt the batch with veil.he.evaluation.encrypt_batch")

