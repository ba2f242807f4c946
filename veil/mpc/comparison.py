"""Private comparison: shares of ``[d > 0]`` and of ``d * [d > 0]`` (ReLU).

Protocol (dealer-assisted, multiplicatively blinded sign; one protocol per
file, selected in :data:`COMPARISON_PROTOCOLS`). The dealer deals, per entry,
a uniform mask ``a``, a blinding factor ``m = t * r`` (``t`` a uniform sign,
``r >= 1`` log-uniform below ``2^COMPARISON_BLIND_BITS``), ``u = (1 + t)/2``
and shares of ``a*m`` and ``a*u`` (see :mod:`veil.mpc.material`):

1. **Round 1.** Open ``e = d - a`` (uniform: reveals nothing). Every party
   now holds shares of ``w*m`` with ``w = 2d - 1`` (odd, so never 0) as
   ``2(e*m_i + (a*m)_i) - m_i``, and of ``d*u`` as ``e*u_i + (a*u)_i``.
2. **Round 2.** Open ``z = w*m``. ``sign(z) = sign(d) * t`` is a uniform sign
   to everyone but the dealer, who sees no opening.
3. Locally: if ``z > 0`` then ``[d > 0] = u`` and ``d*[d > 0] = d*u``, else
   ``[d > 0] = 1 - u`` and ``d*[d > 0] = d - d*u``.

Cost per compared entry: **2 rounds**, 2 ring elements sent per party to
each other party (16 bytes), plus ``1 + k`` more for ``k`` extra products by
the same bit (used by argmax); the dealer sends ``5 + 2k`` ring elements per
party per entry (fewer when seeded). So ReLU and ``> < >= <= ==`` take 2
rounds, ``max`` over ``n`` entries ``2 * ceil(log2 n)`` rounds.

Security (read before use): the sign of ``d`` is hidden, but the opened
``|z| = |2d - 1| * r`` reveals ``log2 |d|`` up to a uniform offset in
``[0, COMPARISON_BLIND_BITS)``: a *blurred magnitude* leak, which is weaker
than the simulation security of function secret sharing (AriaNN, Ryffel et
al. 2020, 1 round) or of bitwise protocols (CrypTen, ~log2(64) rounds).
Correctness needs ``|2d - 1| * r < 2^63``, i.e. ``|d| < 2^(62 - 20)`` in the
ring: ``|x| < 2^26`` at 16 fractional bits; larger differences silently give
wrong bits. Both are documented limits of this protocol, not of the API.
"""

from __future__ import annotations

from typing import Callable, Hashable, Mapping, Sequence

import torch

from veil.mpc.party import open_parties, party_function, run_party
from veil.mpc.providers.base import Provider

Shares = Mapping[Hashable, torch.Tensor]


@party_function("cmp_mask", openable=True)
def _cmp_mask(values: list, masks: list) -> tuple:
    """Shares of ``v_j - a_j`` (uniformly masked)."""
    return tuple(v - a for v, a in zip(values, masks))


@party_function("cmp_blind", openable=True)
def _cmp_blind(e0: torch.Tensor, m_i: torch.Tensor, am_i: torch.Tensor) -> tuple:
    """A share of ``z = (2d - 1) * m`` from the opened ``e0 = d - a_0``."""
    return (2 * (e0 * m_i + am_i) - m_i,)


@party_function("cmp_select")
def _cmp_select(positive, es: list, u_i, aus: list, values: list, first: bool) -> tuple:
    """Shares of the bit ``[d > 0]`` and of ``v_j * [d > 0]`` for each ``v_j``."""
    bit = torch.where(positive, u_i, (1 if first else 0) - u_i)
    prods = [e * u_i + au for e, au in zip(es, aus)]  # shares of v_j * u
    return (bit, *[torch.where(positive, y, v - y) for y, v in zip(prods, values)])


def sign_select(d: Shares, extras: Sequence[Shares], provider: Provider) -> tuple[dict, list[dict]]:
    """Shares of ``[d > 0]`` and of ``v * [d > 0]`` for ``v`` in ``(d, *extras)``.

    Args:
        d: party -> share of the (integer ring) values compared with 0.
        extras: More shared tensors of ``d``'s shape to multiply by the bit.
        provider: Deals the comparison material.

    Returns:
        ``(bits, products)``: party -> bit share, and one party -> share map
        per value in ``(d, *extras)``.
    """
    parties = list(d.keys())
    k = len(extras)
    shape = tuple(d[parties[0]].shape)
    material = provider.comparison_masks(shape, k, parties)
    values = {p: [d[p]] + [w[p] for w in extras] for p in parties}
    parts = {p: (mat[: k + 1], mat[k + 1], mat[k + 2], mat[k + 3], list(mat[k + 4 :])) for p, mat in material.items()}
    es = open_parties("cmp_mask", {p: (values[p], list(parts[p][0])) for p in parties})
    (z,) = open_parties("cmp_blind", {p: (es[0], parts[p][1], parts[p][2]) for p in parties})
    positive = z > 0
    outs = {
        p: run_party("cmp_select", positive, es, parts[p][3], parts[p][4], values[p], first=(i == 0))
        for i, p in enumerate(parties)
    }
    bits = {p: outs[p][0] for p in parties}
    products = [{p: outs[p][1 + j] for p in parties} for j in range(k + 1)]
    return bits, products


#: name -> sign_select implementation (one protocol per file)
COMPARISON_PROTOCOLS: dict[str, Callable] = {"blinded_sign": sign_select}
