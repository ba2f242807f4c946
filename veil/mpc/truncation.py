"""Division of secret-shared values by a public integer (truncation).

Fixed-point products carry scale ``s^2`` and must be divided by ``s``. Two
methods, each a standard one:

* **2 parties: SecureML local truncation** [Mohassel & Zhang 2017, Thm. 1].
  No communication: party 0 computes ``floor(x_0 / d)``, party 1 computes
  ``-floor(-x_1 / d)``. With shares in signed form, whenever ``x_0 + x_1``
  does not overflow the signed range the result is ``x/d`` up to an error of
  at most 1 (one ulp after a fixed-point product). It fails (an error of about
  ``2^64 / d``) exactly when the sum of the signed shares wraps, which for a
  uniform share happens with probability ``|x| / 2^64`` per entry: about
  ``2^-24`` for ``|x| < 2^40`` (e.g. ``|x*y| < 2^8`` at 16 fractional bits).

* **Any number of parties: dealt truncation pairs** (as ABY3's
  ``(r, r/2^d)`` pairs). The provider deals shares of uniform ``r`` and of
  ``q = floor(r / d)``. The parties open ``c = x + r`` (uniformly masked),
  and set ``z = floor(c / d) - q`` (party 0 adds the public term). If
  ``x + r`` does not overflow, ``z`` is ``floor(x/d)`` or ``floor(x/d) + 1``:
  error below 1. The failure probability is again ``|x| / 2^64``. Cost: one
  round, one ring element per entry per party to each other party.

Local truncation is wrong for three or more parties (the share sum wraps
with constant probability), hence the switch. With active security
(:func:`veil.mpc.mac.truncate`) the dealt-pair method runs for any number of
parties, with authenticated pairs: local truncation cannot carry MACs.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch

from veil.mpc.party import open_parties, party_function, run_party
from veil.mpc.providers.base import Provider

Shares = Mapping[Hashable, torch.Tensor]


@party_function("trunc_local")
def _trunc_local(x_i: torch.Tensor, divisor: int, negate: bool) -> torch.Tensor:
    """``floor(x_i / d)``, or ``-floor(-x_i / d)`` for the second party."""
    if negate:
        return -torch.div(-x_i, divisor, rounding_mode="floor")
    return torch.div(x_i, divisor, rounding_mode="floor")


@party_function("trunc_mask", openable=True)
def _trunc_mask(x_i: torch.Tensor, r_i: torch.Tensor) -> tuple:
    """A party's share of ``c = x + r`` (uniformly masked)."""
    return (x_i + r_i,)


@party_function("trunc_finish")
def _trunc_finish(c: torch.Tensor, q_i: torch.Tensor, divisor: int, first: bool) -> torch.Tensor:
    z = -q_i
    return z + torch.div(c, divisor, rounding_mode="floor") if first else z


def truncate_secureml(shares: Shares, divisor: int) -> dict:
    """SecureML local truncation for exactly two parties (no communication)."""
    parties = list(shares.keys())
    if len(parties) != 2:
        raise ValueError(f"SecureML local truncation needs exactly 2 parties, got {len(parties)}")
    return {p: run_party("trunc_local", shares[p], divisor=divisor, negate=(i == 1)) for i, p in enumerate(parties)}


def truncate_with_pairs(shares: Shares, divisor: int, provider: Provider) -> dict:
    """Truncation with dealt ``(r, floor(r/d))`` pairs; any number of parties."""
    parties = list(shares.keys())
    shape = tuple(shares[parties[0]].shape)
    pairs = provider.truncation_pairs(shape, divisor, parties)
    (c,) = open_parties("trunc_mask", {p: (shares[p], pairs[p][0]) for p in parties})
    return {
        p: run_party("trunc_finish", c, pairs[p][1], divisor=divisor, first=(i == 0)) for i, p in enumerate(parties)
    }


def truncate_shares(shares: Shares, divisor: int, provider: Provider) -> dict:
    """Shares of ``x / divisor`` (error < 1, see module docstring).

    Args:
        shares: party -> share of ``x``.
        divisor: Public positive integer.
        provider: Deals truncation pairs when more than two parties hold ``x``.
    """
    if int(divisor) != divisor or divisor <= 0:
        raise ValueError(f"divisor must be a positive integer, got {divisor!r}")
    divisor = int(divisor)
    if divisor == 1:
        return dict(shares)
    if len(shares) == 2:
        return truncate_secureml(shares, divisor)
    return truncate_with_pairs(shares, divisor, provider)
