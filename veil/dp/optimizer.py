"""The DP-SGD step as named stages: clip, add noise, scale, step.

Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1:
each sample's gradient (flattened across all parameters) is clipped to norm
at most ``max_grad_norm`` (C), the clipped gradients are summed, Gaussian
noise of standard deviation ``noise_multiplier * C`` is added to the sum,
and the result is divided by the *expected* batch size (with Poisson
sampling the real batch size is itself private, so it must not be used).
"""

from __future__ import annotations

import secrets
from typing import Callable, Optional

import torch
from torch.optim import Optimizer

from veil.dp.errors import PrivacyParameterError


def make_generator(seed: Optional[int] = None, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from OS entropy (``secrets``) unless ``seed`` is given.

    Pass a seed only in tests: a known seed makes the noise predictable and
    removes the privacy guarantee.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


def per_sample_norms(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """Norm of each sample's gradient flattened across all parameters ([B])."""
    per_param = torch.stack([g.reshape(g.shape[0], -1).norm(2, dim=1) for g in grad_samples], dim=1)
    return per_param.norm(2, dim=1)


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-sample multipliers ``min(1, C / norm)`` that bring every norm to at most C."""
    # The tiny epsilon avoids 0/0 for an all-zero gradient (factor is then 1).
    return (max_grad_norm / (norms + 1e-12)).clamp(max=1.0)


class DPOptimizer:
    """Wraps a torch optimizer so that ``step`` performs a DP-SGD step.

    The parameters must carry ``grad_sample`` (set by
    :class:`veil.dp.GradSampleModule` during backward). A parameter without
    one (an empty Poisson batch, an unused layer) contributes zero, but the
    noise is still added: skipping it would reveal the empty batch.

    Args:
        optimizer: the optimizer that applies the privatized gradient.
        noise_multiplier: sigma; noise std is ``noise_multiplier * max_grad_norm``.
        max_grad_norm: C, the per-sample clipping bound.
        expected_batch_size: divisor of the noisy sum (sample rate x dataset size).
        generator: noise source; defaults to :func:`make_generator` (OS entropy).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if noise_multiplier < 0:
            raise PrivacyParameterError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not max_grad_norm > 0:
            raise PrivacyParameterError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if not expected_batch_size > 0:
            raise PrivacyParameterError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.original_optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.generator = generator if generator is not None else make_generator()
        # Called after every completed step (the engine's accountant listens here).
        self.step_hooks: list[Callable[["DPOptimizer"], None]] = []

    # -- torch.optim.Optimizer look-alike -------------------------------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """Trainable parameters handled by the wrapped optimizer."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears ``grad`` and ``grad_sample`` of every parameter."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.params:
            p.grad_sample = None
            p.summed_grad = None

    def state_dict(self) -> dict:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.original_optimizer.load_state_dict(state)

    # -- the stages ------------------------------------------------------------------------
    def clip_and_accumulate(self) -> torch.Tensor:
        """Stage 1: clips each sample's gradient to norm <= C and sums them.

        Returns:
            The per-sample norms before clipping ([B]; empty for an empty batch).
        """
        params = self.params
        with_samples = [p for p in params if getattr(p, "grad_sample", None) is not None]
        if not with_samples or with_samples[0].grad_sample.shape[0] == 0:
            for p in params:
                p.summed_grad = torch.zeros_like(p)
            return torch.zeros(0)
        norms = per_sample_norms([p.grad_sample for p in with_samples])
        factors = clip_factors(norms, self.max_grad_norm)
        for p in params:
            gs = getattr(p, "grad_sample", None)
            p.summed_grad = torch.zeros_like(p) if gs is None else torch.einsum("b,b...->...", factors.to(gs.dtype), gs)
        return norms

    def add_noise(self) -> None:
        """Stage 2: ``grad = summed clipped gradient + N(0, (sigma*C)^2)``."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            noise = torch.normal(0.0, std, p.shape, generator=self.generator, device=p.device, dtype=p.dtype) if std > 0 else 0.0
            p.grad = (p.summed_grad + noise).detach()

    def scale_grad(self) -> None:
        """Stage 3: divides by the expected batch size (not the realised one)."""
        for p in self.params:
            p.grad.div_(self.expected_batch_size)

    def pre_step(self) -> None:
        """Runs stages 1-3, leaving the privatized gradient in ``p.grad``."""
        self.clip_and_accumulate()
        self.add_noise()
        self.scale_grad()
        for p in self.params:
            p.grad_sample = None
            p.summed_grad = None

    def step(self, closure: Optional[Callable] = None):
        """Stage 4: privatizes the gradient, then lets the wrapped optimizer step."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.pre_step()
        result = self.original_optimizer.step()
        for hook in self.step_hooks:
            hook(self)
        return result
