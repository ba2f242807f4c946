"""The DP-SGD noise sampler: Gaussian in distribution, on a public grid, exponential tails exact."""

import math

import pytest
import torch

from veil.dp import core


def test_secure_exponential_is_exp1_including_its_tail():
    n = 1 << 21
    e = core.secure_exponential(n)
    assert e.dtype == torch.float64 and bool((e > 0).all())
    # mean 1, sd 1/sqrt(n) ~ 7e-4: 8 sd bounds (false failure < 1e-14)
    assert abs(float(e.mean()) - 1.0) < 8 / math.sqrt(n)
    for t in (1.0, 5.0, 9.0):  # P(E > t) = e^-t: binomial, 8 sd bounds
        p = math.exp(-t)
        assert abs(float((e > t).double().mean()) - p) < 8 * math.sqrt(p / n) + 1 / n


def test_the_tail_past_2_to_the_minus_20_is_continued_not_cut():
    # Values above 20 ln 2 (u < 2^-20) come from a fresh draw shifted by 20 ln 2: some exist in 2^24
    # draws (expected 16; P(none) = e^-16) and they are not all the same few values.
    e = core.secure_exponential(1 << 24)
    tail = e[e > 20 * math.log(2)]
    assert tail.numel() > 0 and tail.unique().numel() == tail.numel()
    # -ln u alone would put every tail value at u = (k + 0.5) 2^-53 (to ~2^-15 in those units: exp/log
    # round-off); continued, u = 2^-20 u' lies off that grid (each value within 0.01 of it w.p. 0.02)
    u = torch.exp(-tail) * 2.0 ** 53 - 0.5
    off = (u - u.round()).abs() > 0.01
    assert bool(off.any()), u


def test_snapped_gaussian_has_the_stated_sd_and_lies_on_the_public_grid():
    n, std = 1 << 20, 0.75
    s = torch.full((n,), 0.3, dtype=torch.float32)
    bound = core.noise_bound(1.0, std, 16.0)
    out = core.snapped_gaussian(s, std, bound)
    grid = core.snap_grid(std, bound)
    assert std / 256 <= grid <= std / 128 and grid == 2.0 ** round(math.log2(grid))
    assert bool((torch.remainder(out, grid) == 0).all())  # every output a multiple of the grid
    z = (out - 0.3) / std
    # mean 0 (sd 1/sqrt(n) ~ 1e-3), variance 1 (+ grid^2/12, < 1e-5; sd sqrt(2/n) ~ 1.4e-3): 8 sd bounds
    assert abs(float(z.mean())) < 8 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < 8 * math.sqrt(2 / n)
    p3 = math.erfc(3 / math.sqrt(2))  # two-sided 3-sigma mass, 0.0027
    assert abs(float((z.abs() > 3).double().mean()) - p3) < 8 * math.sqrt(p3 / n)


def test_snapped_gaussian_clamps_to_the_public_bound_and_keeps_zero_noise_exact():
    out = core.snapped_gaussian(torch.tensor([1e30, -1e30, 0.0]), 1.0, 1000.0)
    grid = core.snap_grid(1.0, 1000.0)
    assert float(out[0]) == pytest.approx(1000.0, abs=grid) and float(out[1]) == pytest.approx(-1000.0, abs=grid)
    s = torch.tensor([0.1, -2.5], dtype=torch.float32)
    assert torch.equal(core.snapped_gaussian(s, 0.0, 10.0), s.double())


def test_poisson_indices_are_a_bernoulli_lot_in_time_of_the_lot():
    n, q = 200_000, 0.01
    idx = core.poisson_indices(n, q)
    assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all()) and int(idx.min()) >= 0
    assert int(idx.max()) < n
    # size ~ Binomial(n, q): mean 2000, sd ~44.5; 8 sd (false failure < 1e-14)
    assert abs(idx.numel() - n * q) < 8 * math.sqrt(n * q * (1 - q))
    # members spread evenly: each half holds ~half of them (sd ~31.6 per half)
    assert abs(int((idx < n // 2).sum()) - idx.numel() / 2) < 8 * math.sqrt(idx.numel() / 4)
    # every record can join: over many tiny lots of 3 records each index shows up (P(miss) ~ e^-300)
    seen = torch.cat([core.poisson_indices(3, 0.5) for _ in range(600)])
    assert set(seen.tolist()) == {0, 1, 2}
    assert torch.equal(core.poisson_indices(5, 1.0), torch.arange(5))
    # a tiny rate on a huge count draws a handful of uniforms, not one per record
    calls = []
    real = core.secure_uniform
    try:
        core.secure_uniform = lambda k: (calls.append(k), real(k))[1]
        core.poisson_indices(10**9, 1e-9)
    finally:
        core.secure_uniform = real
    assert sum(calls) < 100, calls
