"""Per-sample gradients through forward and backward hooks.

:class:`GradSampleModule` wraps a model. For every layer with a rule in
:data:`veil.dp.layers.RULES` it records the layer's inputs in a forward hook
and, once the backward pass has produced the gradients of the layer's
outputs (``torch.autograd.graph.register_multi_grad_hook``), computes each
parameter's per-sample gradient into ``param.grad_sample`` ([B, *shape]).
The ordinary ``.grad`` is still computed by autograd and left untouched.

Layers that mix samples (BatchNorm) or have no rule are refused up front,
because a silently wrong per-sample gradient would void the privacy proof.
"""

from __future__ import annotations

import threading
from typing import Iterator

import torch
import torch.nn as nn
from torch.autograd.graph import register_multi_grad_hook

from veil.dp import layers
from veil.dp.errors import BatchNormNotPrivateError, UnsupportedModuleError

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Recurrent rules re-run their layer; the hooks must not record those calls.
_state = threading.local()


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def validate(module: nn.Module) -> None:
    """Raises if the model cannot be trained with per-sample gradients.

    Raises:
        BatchNormNotPrivateError: the model contains BatchNorm.
        UnsupportedModuleError: a layer with trainable parameters has no rule.
    """
    for name, sub in module.named_modules():
        if isinstance(sub, _BATCHNORMS):
            raise BatchNormNotPrivateError(
                f"layer {name or type(sub).__name__!r} is {type(sub).__name__}, which mixes the samples of a "
                "batch, so per-sample gradients (and DP-SGD's guarantee) do not exist. Replace it with "
                "GroupNorm: `model = veil.dp.fix_module(model)`."
            )
        if _trainable(sub) and type(sub) not in layers.RULES:
            raise UnsupportedModuleError(
                f"layer {name!r} ({type(sub).__name__}) has trainable parameters but no per-sample gradient "
                f"rule; supported: {sorted(t.__name__ for t in layers.RULES)}. Freeze it "
                "(requires_grad_(False)) or add a rule with veil.dp.layers.register_rule."
            )


def fix_module(module: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replaces every BatchNorm with a GroupNorm over the same channels, in place.

    The number of groups is the largest divisor of the channel count that is
    at most ``max_groups`` (GroupNorm needs it to divide the channels).

    Returns:
        The same module (for chaining).
    """
    for name, child in list(module.named_children()):
        if isinstance(child, _BATCHNORMS):
            c = child.num_features
            groups = max(d for d in range(1, min(c, max_groups) + 1) if c % d == 0)
            setattr(module, name, nn.GroupNorm(groups, c, eps=child.eps, affine=child.affine))
        else:
            fix_module(child, max_groups)
    return module


class GradSampleModule(nn.Module):
    """A model wrapper whose backward pass also yields per-sample gradients.

    Args:
        module: the model; validated with :func:`validate`.
        loss_reduction: ``"mean"`` if the loss averages over the batch (the
            per-sample gradients are then rescaled by the batch size so that
            each is the gradient of that sample's own loss) or ``"sum"``.
            Inputs are batch-first, except recurrent layers, which follow
            their own ``batch_first``.
    """

    def __init__(self, module: nn.Module, loss_reduction: str = "mean") -> None:
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        validate(module)
        self._module = module
        self.loss_reduction = loss_reduction
        self._handles = [
            sub.register_forward_hook(self._forward_hook)
            for sub in module.modules()
            if type(sub) in layers.RULES and _trainable(sub)
        ]

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    @property
    def module(self) -> nn.Module:
        """The wrapped model."""
        return self._module

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that receive per-sample gradients."""
        return (p for p in self._module.parameters() if p.requires_grad)

    def zero_grad_sample(self) -> None:
        """Forgets per-sample gradients (call between steps)."""
        for p in self._module.parameters():
            p.grad_sample = None

    def remove_hooks(self) -> None:
        """Detaches the hooks; the wrapped model is then an ordinary model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, layer: nn.Module, args: tuple, output) -> None:
        if getattr(_state, "replaying", False) or not torch.is_grad_enabled():
            return
        outs = layers._flatten(output) if type(layer) in layers.MULTI_OUTPUT else [output]
        outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        if not outs:
            return
        inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

        def on_grads(grads) -> None:
            self._accumulate(layer, inputs, grads)

        register_multi_grad_hook(outs, on_grads, mode="all")

    def _accumulate(self, layer: nn.Module, inputs: tuple, grads) -> None:
        grads = [None if g is None else g.detach() for g in grads]
        if type(layer) not in layers.MULTI_OUTPUT and grads[0] is None:
            return
        if isinstance(inputs[0], torch.Tensor) and inputs[0].numel() == 0:
            # Empty Poisson batch: no samples, so no per-sample gradients.
            for p in _trainable(layer):
                p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
            return
        _state.replaying = True
        try:
            per_sample = layers.RULES[type(layer)](layer, inputs, grads)
        finally:
            _state.replaying = False
        for name, gs in per_sample.items():
            param = getattr(layer, name)
            if not param.requires_grad:
                continue
            if self.loss_reduction == "mean":
                gs.mul_(gs.shape[0])  # rules return fresh tensors
            # A layer called several times in one pass (shared weights)
            # contributes the sum of its calls, as autograd does for .grad.
            prev = getattr(param, "grad_sample", None)
            param.grad_sample = gs if prev is None else prev + gs
