"""Measured escape rate of single-bit additive errors under the Z/2^64 SPDZ MACs.

veil's MACs live in Z/2^64 (not SPDZ2k's Z/2^(64+s)). For an additive error
``delta = 2^v * odd`` and any MAC adjustment the cheater picks, one check
misses it with probability exactly ``(k + 2) / 2^(k + 1)``, ``k = 64 - v``,
over the key ``alpha`` and the check coefficients (veil.mpc.mac, README).
These tests inject a single-bit error at bit ``v`` into a party's share of a
value, of a Beaver triple, of a truncation pair, or of an opened mask, run
the computation with a fresh key per trial and count the trials whose
``.get()`` does not raise: the rate must match the bound (4 sigma) where the
error reaches one check (a share, an opening), stay below it where several
checks see correlated errors (a triple, a truncation pair), and low bits
must never escape. The measured top-bit rate is ~0.75: far above 2^-40, which
needs SPDZ2k (not implemented; see the README).
"""

import math
import os

import pytest
import torch

from veil.mpc import mac
from veil.mpc.errors import MacCheckError
from veil.mpc.providers import LocalDealer
from veil.tensors.additive import share

PARTIES = ("a", "b")
X = torch.tensor([3, -4, 5])
Y = torch.tensor([7, 2, -1])


def bound(v: int) -> float:
    k = 64 - v
    return (k + 2) / 2 ** (k + 1)


def _bit(v: int) -> int:
    return -(2**63) if v == 63 else 1 << v


def _trial(place: str, v: int, seed: int) -> bool:
    """One run with a fresh key; True when the error escaped the MAC check."""
    dealer = LocalDealer(seed=seed)  # a new provider: key_for deals a fresh alpha
    delta = _bit(v)
    if place == "triple":
        real = dealer.authenticated_triples

        def bad(*args, **kwargs):
            t = real(*args, **kwargs)
            t["b"] = (t["b"][0] + delta,) + tuple(t["b"][1:])  # party b's share of a
            return t

        dealer.authenticated_triples = bad
    if place == "truncation":
        real_pairs = dealer.authenticated_truncation_pairs

        def bad_pairs(*args):
            p = real_pairs(*args)
            p["b"] = (p["b"][0] + delta,) + tuple(p["b"][1:])  # party b's share of r
            return p

        dealer.authenticated_truncation_pairs = bad_pairs
    x = share(X, PARTIES, dealer, active_security=True)
    if place == "share":
        x.child["b"] = x.child["b"] + delta
    if place == "opening":  # the value opened as a Beaver mask e = x - a is off by delta
        x.child["b"] = x.child["b"] + delta
        y = share(Y, PARTIES, dealer, active_security=True)
        out = x * y  # the cheater keeps its MAC share; check only the openings (not the output)
        try:
            mac.check(out.mac_key)
        except MacCheckError:
            return False
        return True
    if place == "triple":
        out = x * share(Y, PARTIES, dealer, active_security=True)
    elif place == "truncation":
        out = x // 4
    else:
        out = x
    try:
        out.get()
    except MacCheckError:
        return False
    return True


def _measure(place: str, v: int, trials: int) -> float:
    return sum(_trial(place, v, 1000 * v + t) for t in range(trials)) / trials


SINGLE_CHECK = ("share", "opening")  # the error reaches exactly one checked item


def _assert_rate(place: str, v: int, trials: int) -> None:
    p = bound(v)
    rate = _measure(place, v, trials)
    slack = 4 * math.sqrt(p * (1 - p) / trials) + 1e-9
    if place in SINGLE_CHECK:
        assert abs(rate - p) <= slack, (place, v, rate, p)
    else:
        assert rate <= p + slack, (place, v, rate, p)


@pytest.mark.parametrize("place", ["share", "triple", "truncation", "opening"])
def test_top_bit_errors_escape_at_the_stated_rate(place):
    _assert_rate(place, 63, 60)


@pytest.mark.parametrize("place", ["share", "triple", "truncation", "opening"])
def test_low_bit_errors_are_caught(place):
    for v in (0, 31, 47):
        assert _measure(place, v, 4) == 0.0, (place, v)


@pytest.mark.slow
@pytest.mark.parametrize("place", ["share", "triple", "truncation", "opening"])
def test_every_bit_position(place):
    trials = int(os.environ.get("VEIL_MAC_TRIALS", "30"))
    for v in range(64):
        _assert_rate(place, v, trials)


def test_new_session_draws_a_fresh_key():
    dealer = LocalDealer(seed=9)
    first = mac.key_for(dealer, PARTIES)
    assert mac.key_for(dealer, PARTIES) is first
    mac.new_session()
    second = mac.key_for(dealer, PARTIES)
    assert second is not first and second.key_id != first.key_id
    x = share(X, PARTIES, dealer, active_security=True)
    assert torch.equal((x * 2 + 1).get(), X * 2 + 1)
