"""Record the work a computation does: every ATen op it runs, with the shapes of its tensor outputs.

The DP timing red teams compare these records between datasets of different sizes (a release whose work
follows the record count tells the count, whatever the clock's noise)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class ShapeTrace(TorchDispatchMode):
    """``with ShapeTrace() as t: ...`` then ``t.ops``: ``(op name, output shapes)`` in the order they ran."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


def clipped_gradient_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float = 1.0) -> list:
    """Plain PyTorch, one record at a time: the sum of the records' MSE gradients, each clipped to ``clip``."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x[i:i + 1]), y[i:i + 1]).backward()
        g = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        for acc, t in zip(total, g):
            acc += t * min(1.0, clip / norm.item())
    return total
