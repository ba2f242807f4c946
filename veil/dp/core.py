"""The one DP core: sanitize -> clip -> noise -> scale, and the vetted noise samplers.

Every gradient release in veil (local DP-SGD in :class:`veil.dp.DPOptimizer`,
owner-side federated DP in :class:`veil.dp.DPDataOwner`, the worker function
``veil.dp.sanitized_gradient``) goes through :func:`privatize`; every query
release (count, sum, mean, histogram, PATE's LNMax) draws its noise from
:func:`laplace_mechanism` / :func:`gaussian_mechanism`. A fix lands once.

Per-sample sanitization (why a requester cannot shape the release): the
requester chooses the model / plan, so a per-sample gradient may be NaN or
infinite for a chosen record (``w * sqrt(C - CRIM)``). Such a row is replaced
by zeros *before* clipping. The rule looks at that record's gradient only, so
it is one more per-record map whose output has norm <= C: the sensitivity, and
the proof, are unchanged, and the release is finite whatever the plan does.
How many rows were replaced is never released (Opacus-style sanitization).

Randomness. Query noise comes from OpenDP (floating-point-safe discretized
Laplace / Gaussian samplers over the OS CSPRNG; Mironov 2012 shows why the
textbook inverse-CDF Laplace on doubles is not DP). DP-SGD adds model-sized
Gaussian noise every step, where OpenDP's exact sampler costs ~90 us per
coordinate (9 s for 1e5 parameters), so :func:`gaussian_noise` draws it by
Box-Muller from a ChaCha20 keystream keyed with 256 fresh bits from
``os.urandom`` per call (a cryptographic source, ~10 ns per coordinate).
Box-Muller on doubles is not an exact sampler, and noise added on floats
leaks through the low bits of the result (Mironov 2012): so the noisy sum is
computed in float64, clamped to a public bound and snapped to a power-of-two
grid set by public values (:func:`snapped_gaussian`), before the division and
the cast to the parameter dtype (post-processing).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from veil.dp.errors import DPReleaseError, NoiseTooLowError, PrivacyParameterError
from veil.workers.user_caches import per_user_cache

#: The owner's log: what a failed release really failed on (never sent to the requester).
OWNER_LOG = logging.getLogger("veil.dp.owner")

#: Epsilons outside this range are refused: tiny ones overflow the noise scale
#: (epsilon = 5e-324 gives an infinite scale, i.e. an inf release at ~0 cost),
#: huge ones are no privacy at all.
MIN_EPSILON, MAX_EPSILON = 1e-6, 1e3


def make_generator(seed: Optional[int] = None, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from OS entropy (``secrets``) unless ``seed`` is given.

    Used for data shuffling and, when a caller passes one explicitly (tests),
    reproducible noise. Releases made without a generator use the
    cryptographic samplers of this module instead.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


# -- cryptographic randomness for big tensors -----------------------------------------------

def _keystream(nbytes: int) -> bytes:
    cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None).encryptor()
    return cipher.update(bytes(nbytes))


def secure_uniform(n: int) -> torch.Tensor:
    """``n`` float64 uniforms in (0, 1) (53 random bits each) from a fresh ChaCha20 key."""
    words = np.frombuffer(_keystream(8 * n), dtype=np.uint64)
    return torch.from_numpy(((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53)


def secure_exponential(n: int) -> torch.Tensor:
    """``n`` float64 Exp(1) samples, ``-ln u``, as finely spaced in the tail as near 0.

    ``u`` lies on a 2^-53 grid, so ``-ln u`` for tiny ``u`` takes few, widely spaced values (the
    tail of a Box-Muller radius is coarse). Below ``u = 2^-20`` the sample is ``20 ln 2`` plus a fresh
    one instead (the exponential is memoryless: the same distribution), so consecutive possible
    values are at most 2^-33 apart everywhere.
    """
    e = -torch.log(secure_uniform(n))
    tail = torch.nonzero(e > _TAIL_AT).reshape(-1)
    offset = _TAIL_AT
    while tail.numel():  # ~n * 2^-20 entries, fewer each pass
        fresh = -torch.log(secure_uniform(tail.numel()))
        e[tail] = offset + fresh
        keep = fresh > _TAIL_AT
        tail, offset = tail[keep], offset + _TAIL_AT
    return e


_TAIL_AT = 20 * math.log(2)


def secure_normal(n: int) -> torch.Tensor:
    """``n`` float64 standard normals (Box-Muller: radius ``sqrt(2 E)``, :func:`secure_exponential`)."""
    m = (n + 1) // 2
    radius = torch.sqrt(2.0 * secure_exponential(m))
    angle = (2.0 * math.pi) * secure_uniform(m)
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]


def gaussian_noise(shape: Sequence[int], std: float, dtype: torch.dtype = torch.float32, device=None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """N(0, std^2) noise; cryptographic unless a (test) ``generator`` is given."""
    if not dtype.is_floating_point:  # (complex: real noise would leave the imaginary part exact)
        raise PrivacyParameterError(f"Gaussian noise is for real floating-point values, not {dtype}")
    shape = torch.Size(shape)
    if std == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    if generator is not None:
        return torch.normal(0.0, std, shape, generator=generator, dtype=dtype, device=generator.device)\
            .to(device if device is not None else generator.device)
    return (secure_normal(shape.numel()) * std).reshape(shape).to(dtype=dtype, device=device)


def poisson_mask(n: int, sample_rate: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each of ``n`` records joins the lot independently with probability ``sample_rate``."""
    # A seeded (test / benchmark) generator keeps torch's float32 stream, so seeded runs reproduce.
    u = torch.rand(n, generator=generator) if generator is not None else secure_uniform(n)
    return u < sample_rate


def poisson_indices(n: int, sample_rate: float) -> torch.Tensor:
    """The sorted indices of a Poisson lot of ``n`` records (each joins with probability ``sample_rate``),
    drawn in time proportional to the lot, not to ``n``: the gaps between members are Geometric(q),
    ``1 + floor(ln u / ln(1 - q))`` (a mask's uniform per record took time in proportion to ``n``, which
    measured a hidden record count at a tiny, almost free, sample rate)."""
    if sample_rate >= 1:
        return torch.arange(n)
    log_keep = math.log1p(-sample_rate)
    batch = int(sample_rate * n * 1.1) + 16
    parts, last = [], -1.0
    while True:
        at = last + torch.cumsum(torch.floor(torch.log(secure_uniform(batch)) / log_keep) + 1, 0)
        inside = at[at < n]
        parts.append(inside)
        if inside.numel() < batch:
            return torch.cat(parts).to(torch.int64)
        last = float(at[-1])


# -- the gradient path ------------------------------------------------------------------------

def per_sample_norms(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """Norm of each sample's gradient flattened across all parameters ([B])."""
    per_param = torch.stack([g.reshape(g.shape[0], -1).norm(2, dim=1) for g in grad_samples], dim=1)
    return per_param.norm(2, dim=1)


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-sample multipliers ``min(1, C / norm)``; 0 for a non-finite norm (a sanitized row)."""
    # The tiny epsilon avoids 0/0 for an all-zero gradient (factor is then 1).
    factors = (max_grad_norm / (norms + 1e-12)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))


def clip_and_sum(grad_samples: list[Optional[torch.Tensor]], max_grad_norm: float,
                 like: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sanitizes and clips each sample's whole gradient to norm <= C, then sums over samples.

    Args:
        grad_samples: per parameter, ``[B, *shape]`` or ``None`` (no samples
            reached it). Sanitized *in place* (they are per-step scratch).
        like: the parameters (shapes / dtypes of the sums).

    Returns:
        The clipped sums, and the per-sample norms before clipping ([B]).

    A sample whose gradient has a NaN or infinite entry (or whose norm
    overflows) contributes exactly zero: its factor is 0 (``torch.where``) and
    its entries are zeroed first, since ``0 * nan`` is still NaN. Every row
    goes through the same ops whatever its values: no branch, no host sync on
    the data, so a poisoned lot costs what a clean one costs (a requester who
    times a worker release learns nothing from it).
    """
    present = [g for g in grad_samples if g is not None]
    if not present or present[0].shape[0] == 0:
        return [torch.zeros_like(p) for p in like], torch.zeros(0)
    norms = per_sample_norms(present)
    factors = clip_factors(norms, max_grad_norm)
    out = []
    for g, p in zip(grad_samples, like):
        if g is None:
            out.append(torch.zeros_like(p))
            continue
        g = torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        out.append(torch.einsum("b,b...->...", factors.to(g.dtype), g))
    return out, norms


def clipped_sum(grad_samples: list[Optional[torch.Tensor]], max_grad_norm: float,
                like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The clipped, sanitized sum of :func:`clip_and_sum` ."""
    return clip_and_sum(grad_samples, max_grad_norm, like)[0]


#: what a DP-SGD release's parameters may be: real, with room for any lot's clipped sum (a float16 sum
#: overflows to inf at 65504: finite or not by the record count; complex ones would get real noise only)
RELEASE_DTYPES = (torch.float32, torch.float64)


def check_release_dtypes(params: Sequence[torch.Tensor]) -> None:
    """Refuses parameters a DP-SGD release cannot noise soundly (before any charge)."""
    bad = sorted({str(p.dtype) for p in params if p.dtype not in RELEASE_DTYPES})
    if bad:
        raise PrivacyParameterError(f"DP-SGD needs float32 or float64 parameters, not {', '.join(bad)}")


def check_noise(requested: Optional[float], minimum: float, where: str) -> float:
    """The sigma to use: the owner's minimum unless more was requested; less is refused."""
    if requested is None:
        return float(minimum)
    if type(requested) not in (int, float) or not math.isfinite(requested):
        raise PrivacyParameterError(f"noise_multiplier must be a finite number, got {requested!r}")
    if requested < minimum:
        raise NoiseTooLowError(
            f"requested noise_multiplier {requested} is below the minimum {minimum} set by {where}; "
            "ask for at least that (or leave it unset)")
    return float(requested)


def privatize(grad_samples: list[Optional[torch.Tensor]], like: Sequence[torch.Tensor], max_grad_norm: float,
              noise_multiplier: float, divisor: float, charge: Optional[Callable[[], None]] = None,
              generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """The DP-SGD release: ``(sum_i clip_C(sanitize(g_i)) + N(0, (sigma C)^2)) / divisor``.

    ``divisor`` is the *expected* lot size (q n), never the realised one. The
    noise is added even to an empty lot (skipping it would reveal the empty
    lot). ``charge`` runs after the value is computed and before it is
    returned: if it raises (budget spent), nothing is released.
    """
    out = noisy_mean(clipped_sum(grad_samples, max_grad_norm, like), max_grad_norm, noise_multiplier, divisor,
                     generator)
    if charge is not None:
        charge()
    return out


def noisy_mean(sums: Sequence[torch.Tensor], max_grad_norm: float, noise_multiplier: float, divisor: float,
               generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """``(sum + N(0, (sigma C)^2)) / divisor`` of clipped sums (:func:`privatize`'s last step; a lot summed
    in chunks, :func:`clipped_sum` per chunk, ends here too), the noisy sum snapped
    (:func:`snapped_gaussian`) to a grid set by public values only."""
    std = noise_multiplier * max_grad_norm
    bound = noise_bound(max_grad_norm, std, divisor)
    return [(snapped_gaussian(s, std, bound, generator) / divisor).to(s.dtype).detach() for s in sums]


def noise_bound(max_grad_norm: float, std: float, expected_lot: float) -> float:
    """The public clamp of a noisy clipped sum: 4x the expected lot's largest sum and 64 sigma (beyond
    it only a lot far above its expected size, or a ~64-sigma draw, is clamped)."""
    return max_grad_norm * (4 * max(float(expected_lot), 1.0) + 64) + 64 * std


def snap_grid(std: float, bound: float) -> float:
    """The power of two a noisy value in ``[-bound, bound]`` is rounded to: at least ``std / 256`` (the
    Gaussian's density is near constant over a cell) and ``bound * 2^-40`` (>= 2^12 float64 values per
    cell, so the float rounding of ``s + n`` moves a cell's probability by < 2^-12 of itself)."""
    return math.ldexp(1.0, math.ceil(math.log2(max(std * 2.0 ** -8, bound * 2.0 ** -40))))


def snapped_gaussian(s: torch.Tensor, std: float, bound: float,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``s + N(0, std^2)`` in float64, clamped to ``+-bound`` and rounded to :func:`snap_grid`'s power of two.

    Added on floats and rounded to the sum's type, the noise leaves low bits that depend on ``s``: near a
    value, the outputs ``s + n`` can take sit on ``s``'s grid, so one release of a sum told 0 from 2^-6
    (Mironov 2012). Here every output is a multiple of a grid set by public values alone, far coarser
    than the float64 spacing of anything in range: which outputs are possible no longer depends on ``s``,
    and each one's probability is the exact Gaussian's over its cell to within 2^-12 of itself (rounding
    and clamping are post-processing; the rounding moves a value by at most half a cell, ``std / 512``
    unless the public bound is 2^32 times sigma or more). Mironov's snapping
    mechanism, for the Gaussian. ``s`` is clamped to ``+-2 bound`` first (one record still moves it by
    at most C) so that the float64 sum is as exact as the grid needs.
    """
    if not s.dtype.is_floating_point:
        raise PrivacyParameterError(f"Gaussian noise is for real floating-point values, not {s.dtype}")
    if std == 0:  # (no noise, no privacy to protect: the exact sum, as before)
        return s.detach().to(torch.float64)
    grid = snap_grid(std, bound)
    bound = grid * math.ceil(bound / grid)
    v = s.detach().to(torch.float64).clamp(-2 * bound, 2 * bound)
    v = v + _standard_normal(v.shape, v.device, generator).mul_(std)
    return torch.round(v.clamp_(-bound, bound).div_(grid)).mul_(grid)


def _standard_normal(shape: torch.Size, device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """float64 N(0, 1): cryptographic unless a (test) ``generator`` is given."""
    if generator is not None:
        return torch.normal(0.0, 1.0, shape, generator=generator, dtype=torch.float64,
                            device=generator.device).to(device)
    return secure_normal(shape.numel()).reshape(shape).to(device)


# -- query mechanisms (OpenDP) ------------------------------------------------------------------

def check_epsilon(epsilon: object) -> float:
    """Refuses NaN, infinite and degenerate epsilons (see :data:`MIN_EPSILON`)."""
    if type(epsilon) not in (int, float) or not MIN_EPSILON <= epsilon <= MAX_EPSILON:
        raise PrivacyParameterError(
            f"epsilon must be a number in [{MIN_EPSILON}, {MAX_EPSILON}], got {epsilon!r}")
    return float(epsilon)


def _opendp():
    import opendp.prelude as dp

    dp.enable_features("contrib")  # the float samplers are vetted; "contrib" marks non-proof-reviewed constructors
    return dp


@per_user_cache(per_user=64, total=1024)  # (per user: a shared one's hit said another user released at that scale)
def _measurement(kind: str, integer: bool, scale: float):
    """An OpenDP vector measurement (built once per user, kind and scale: construction costs milliseconds)."""
    dp = _opendp()
    # i64, not int: OpenDP maps Python's int to i32, which refused a count >= 2^31 after the charge
    T = "i64" if integer else float
    atom = dp.atom_domain(T=T) if integer else dp.atom_domain(T=float, nan=False)
    metric = dp.l1_distance(T=T) if kind == "laplace" else dp.l2_distance(T=T)
    space = dp.vector_domain(atom), metric
    return space >> (dp.m.then_laplace(scale=scale) if kind == "laplace" else dp.m.then_gaussian(scale=scale))


def _release(values: torch.Tensor, scale: float, kind: str, integer: bool) -> torch.Tensor:
    if not (math.isfinite(scale) and scale > 0):
        raise PrivacyParameterError(f"noise scale must be finite and > 0, got {scale}")
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        return values.detach().to(torch.float64)
    if flat.dtype.is_floating_point and not bool(torch.isfinite(flat).all()):
        raise PrivacyParameterError("a DP release needs finite values before noise (clip to bounds first)")
    if integer:  # exact integers (an int64 count is never rounded), clamped into i64 whatever their value
        ints = flat.round() if flat.dtype.is_floating_point else flat
        data = [min(max(int(v), _I64_MIN), _I64_MAX) for v in ints.tolist()]
    else:
        data = flat.to(torch.float64).tolist()
    noisy = torch.tensor(_measurement(kind, integer, float(scale))(data), dtype=torch.float64)
    return noisy.reshape(values.shape)


_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def laplace_mechanism(values: torch.Tensor, scale: float, integer: bool = False) -> torch.Tensor:
    """``values + Lap(scale)`` per coordinate with OpenDP's exact sampler.

    ``integer=True`` (counts): the discrete Laplace (two-sided geometric) on
    integers, epsilon = L1 / scale as for the continuous one. Pass counts as
    an integer tensor: a float one is rounded, and float32 holds only 2^24.
    """
    return _release(values, scale, "laplace", integer)


def gaussian_mechanism(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """``values + N(0, sigma^2)`` per coordinate with OpenDP's floating-point-safe sampler."""
    return _release(values, sigma, "gaussian", False)


def generic_failure(where: str, error: BaseException) -> DPReleaseError:
    """Logs what really failed for the owner; returns the requester's value-free error."""
    OWNER_LOG.warning("DP release %s failed on protected data: %s: %s", where, type(error).__name__, error)
    return DPReleaseError(
        f"{where} failed while computing on protected data; the request was charged as if it had succeeded "
        "and nothing was released (the data owner's log has the detail)")
