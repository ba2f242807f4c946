"""The DP-SGD step as named stages: clip, add noise, scale, step.

Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1:
each sample's gradient (flattened across all parameters) is clipped to norm
at most ``max_grad_norm`` (C), the clipped gradients are summed, Gaussian
noise of standard deviation ``noise_multiplier * C`` is added to the sum,
and the result is divided by the *expected* batch size (with Poisson
sampling the real batch size is itself private, so it must not be used).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.optim import Optimizer

from veil.dp import core
from veil.dp.core import clip_factors, make_generator, per_sample_norms  # re-exported: the one implementation
from veil.dp.errors import PrivacyParameterError

__all__ = ["DPOptimizer", "clip_factors", "make_generator", "per_sample_norms"]


class DPOptimizer:
    """Wraps a torch optimizer so that ``step`` performs a DP-SGD step.

    The parameters must carry ``grad_sample`` (set by
    :class:`veil.dp.GradSampleModule`, the one per-sample engine, during backward). A parameter without
    one (an empty Poisson batch, an unused layer) contributes zero, but the
    noise is still added: skipping it would reveal the empty batch.

    Args:
        optimizer: the optimizer that applies the privatized gradient.
        noise_multiplier: sigma; noise std is ``noise_multiplier * max_grad_norm``.
        max_grad_norm: C, the per-sample clipping bound.
        expected_batch_size: divisor of the noisy sum (sample rate x dataset size).
        generator: a seeded noise source for tests only; by default the noise
            is cryptographic (:func:`veil.dp.core.gaussian_noise`).
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
        core.check_release_dtypes([p for group in optimizer.param_groups for p in group["params"]])
        self.original_optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.generator = generator
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
        """Stage 1: sanitizes and clips each sample's gradient to norm <= C, and sums them.

        Samples with a non-finite gradient contribute zero (see :mod:`veil.dp.core`).

        Returns:
            The per-sample norms before clipping ([B]; empty for an empty batch).
        """
        params = self.params
        samples = [getattr(p, "grad_sample", None) for p in params]
        sums, norms = core.clip_and_sum(samples, self.max_grad_norm, params)
        for p, s in zip(params, sums):
            p.summed_grad = s
        return norms

    def add_noise(self) -> None:
        """Stage 2: ``grad = summed clipped gradient + N(0, (sigma*C)^2)``, snapped to a public grid
        (:func:`veil.dp.core.snapped_gaussian`: noise added on floats leaks through low bits)."""
        std = self.noise_multiplier * self.max_grad_norm
        bound = core.noise_bound(self.max_grad_norm, std, self.expected_batch_size)
        params = self.params
        if self.generator is not None or len({(p.dtype, p.device) for p in params}) != 1:
            for p in params:
                p.grad = core.snapped_gaussian(p.summed_grad, std, bound, self.generator).to(p.dtype).detach()
            return
        # One keystream for the whole model per step (the per-call setup dominates for small tensors).
        flat = torch.cat([p.summed_grad.reshape(-1) for p in params])
        noisy = core.snapped_gaussian(flat, std, bound).to(params[0].dtype)
        offset = 0
        for p in params:
            p.grad = noisy[offset:offset + p.numel()].view_as(p).detach()
            offset += p.numel()

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
