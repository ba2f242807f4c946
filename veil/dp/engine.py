"""PrivacyEngine: turns a model, optimizer and data loader into DP-SGD ones.

Example:
    >>> engine = PrivacyEngine(accountant="pld")
    >>> model, optimizer, loader = engine.make_private(
    ...     module=model, optimizer=optimizer, data_loader=loader,
    ...     noise_multiplier=1.1, max_grad_norm=1.0)
    >>> ...  # train as usual
    >>> engine.get_epsilon(delta=1e-5)
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from veil.dp.accountant import Accountant, find_noise_multiplier
from veil.dp.optimizer import DPOptimizer, make_generator
from veil.dp.per_sample import GradSampleModule
from veil.dp.sampling import DPDataLoader


class PrivacyEngine:
    """Makes training differentially private and tracks the privacy spent.

    Args:
        accountant: ``"pld"`` (default) or ``"rdp"``; see :class:`veil.dp.Accountant`.
        seed: fixes the noise and sampling randomness. For tests only: a known
            seed voids the guarantee. ``None`` seeds from OS entropy.
    """

    def __init__(self, accountant: str = "pld", seed: Optional[int] = None) -> None:
        self.accountant = Accountant(accountant)
        self.seed = seed

    def _generator(self, offset: int) -> Optional[torch.Generator]:
        # None: sampling and noise use veil.dp.core's cryptographic samplers.
        return None if self.seed is None else make_generator(self.seed + offset)

    def make_private(
        self,
        *,
        module: torch.nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        poisson_sampling: bool = True,
        loss_reduction: str = "mean",
        criterion: Optional[Callable] = None,
    ) -> tuple:
        """Wraps the three training objects for DP-SGD.

        Args:
            module: the model (no BatchNorm; see :func:`veil.dp.fix_module`).
            optimizer: an optimizer over ``module``'s parameters.
            data_loader: its batch size fixes the sample rate q = 1 / len(loader).
            noise_multiplier: sigma (noise std / max_grad_norm).
            max_grad_norm: per-sample clipping bound C.
            poisson_sampling: replace the loader by a Poisson one. Without it
                the accountant's subsampling assumption does not hold exactly.
            loss_reduction: ``"mean"`` or ``"sum"``, how the loss reduces the batch.
            criterion: optional per-batch loss (``nn.CrossEntropyLoss()``, ...)
                to fuse with the per-record gradients (one ``vmap(grad_and_value)``
                instead of a forward pass plus a per-record backward; see
                :class:`veil.dp.per_sample.DPLoss`). Then ``model(x)`` returns a
                pending output that only the returned criterion consumes.

        Returns:
            ``(GradSampleModule, DPOptimizer, data loader)``, or with ``criterion``
            ``(GradSampleModule, DPOptimizer, DPLoss, data loader)`` (Opacus's
            order); every optimizer step is recorded by this engine's accountant.
        """
        sample_rate = 1 / len(data_loader)
        expected_batch_size = sample_rate * len(data_loader.dataset)
        if poisson_sampling:
            data_loader = DPDataLoader.from_data_loader(data_loader, generator=self._generator(1))
        else:
            warnings.warn("poisson_sampling=False: the reported epsilon assumes Poisson sampling", stacklevel=2)
        gsm = module if isinstance(module, GradSampleModule) else \
            GradSampleModule(module, loss_reduction, criterion=criterion)
        # Unseeded engines draw the noise from the cryptographic sampler (generator None).
        dp_opt = DPOptimizer(optimizer, noise_multiplier, max_grad_norm, expected_batch_size, self._generator(0))

        def record(opt: DPOptimizer) -> None:
            if opt.noise_multiplier > 0:
                self.accountant.step(opt.noise_multiplier, sample_rate)

        dp_opt.step_hooks.append(record)
        if criterion is not None:
            return gsm, dp_opt, gsm.dp_loss, data_loader
        return gsm, dp_opt, data_loader

    def make_private_with_epsilon(
        self,
        *,
        module: torch.nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float,
        poisson_sampling: bool = True,
        loss_reduction: str = "mean",
        criterion: Optional[Callable] = None,
    ) -> tuple:
        """Like :meth:`make_private`, with the smallest noise that meets the target.

        The noise multiplier is searched with this engine's accountant so that
        ``epochs * len(data_loader)`` steps spend at most ``target_epsilon``.
        """
        sigma = find_noise_multiplier(
            target_epsilon, target_delta, 1 / len(data_loader), epochs * len(data_loader), self.accountant.mechanism
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            poisson_sampling=poisson_sampling,
            loss_reduction=loss_reduction,
            criterion=criterion,
        )

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far by every private step, at ``delta``."""
        return self.accountant.get_epsilon(delta)
