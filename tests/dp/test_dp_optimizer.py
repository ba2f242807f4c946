"""DP-SGD stages checked against plain torch: clipping, noise scale, scaling, empty batches."""

import pytest
import torch
import torch.nn as nn

from veil.dp import DPOptimizer, GradSampleModule, make_generator
from veil.dp.optimizer import clip_factors, per_sample_norms


def _setup(sigma=0.0, C=1.0, seed=0, expected=4.0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    gsm = GradSampleModule(net, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), sigma, C, expected, make_generator(123))
    return net, gsm, opt


def test_each_clipped_per_sample_gradient_has_norm_at_most_C():
    net, gsm, opt = _setup(C=0.5)
    x = torch.randn(8, 6) * 10  # large inputs: every sample needs clipping
    gsm(x).pow(2).sum().backward()
    params = opt.params
    samples = [p.grad_sample.clone() for p in params]
    norms = per_sample_norms(samples)
    assert (norms > 0.5).all()
    factors = clip_factors(norms, 0.5)
    clipped_norms = per_sample_norms([g * factors.view(-1, *[1] * (g.dim() - 1)) for g in samples])
    assert (clipped_norms <= 0.5 + 1e-5).all()
    torch.testing.assert_close(clipped_norms, torch.full_like(clipped_norms, 0.5))
    opt.clip_and_accumulate()
    for p, g in zip(params, samples):
        torch.testing.assert_close(p.summed_grad, (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0))


def test_small_gradients_are_not_clipped_and_step_matches_plain_sgd():
    net, gsm, opt = _setup(C=1e6, expected=8.0)
    x = torch.randn(8, 6)
    before = [p.detach().clone() for p in net.parameters()]
    gsm(x).sum().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    opt.step()
    for b, p, g in zip(before, net.parameters(), plain):
        torch.testing.assert_close(p.detach(), b - g / 8.0)


def test_noise_std_is_sigma_times_C_over_expected_batch():
    sigma, C, expected = 1.3, 0.7, 5.0
    net, gsm, opt = _setup(sigma=sigma, C=C, expected=expected)
    draws = []
    for _ in range(400):
        opt.zero_grad()
        # Zero-gradient step: what is left in .grad is pure noise.
        for p in opt.params:
            p.grad_sample = torch.zeros(3, *p.shape)
        opt.pre_step()
        draws.append(torch.cat([p.grad.flatten() for p in opt.params]))
    draws = torch.stack(draws)
    target = sigma * C / expected
    assert abs(draws.std().item() / target - 1) < 0.02
    assert abs(draws.mean().item()) < 0.01 * target * 10


def test_empty_batch_still_adds_noise_and_steps():
    net, gsm, opt = _setup(sigma=1.0)
    out = gsm(torch.randn(0, 6))
    out.sum().backward()  # batch of zero rows
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, net.parameters()))
    assert moved  # noise was applied
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_missing_backward_counts_as_zero_gradient():
    net, gsm, opt = _setup(sigma=0.0)
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()  # no backward at all
    for b, p in zip(before, net.parameters()):
        torch.testing.assert_close(b, p.detach())


def test_os_seeded_generators_differ_and_seeded_ones_repeat():
    a, b = make_generator(), make_generator()
    assert not torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    c, d = make_generator(7), make_generator(7)
    assert torch.equal(torch.randn(4, generator=c), torch.randn(4, generator=d))


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPOptimizer(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1), 1.0, 0.0, 1.0)
