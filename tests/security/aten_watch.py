"""Dispatch modes red-team tests use to see what a request ran or made before it was refused (counts, never time)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AtenOps(TorchDispatchMode):
    """Counts the ATen ops run while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class TensorsMade(TorchDispatchMode):
    """Counts the tensors ATen ops made while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += sum(isinstance(t, torch.Tensor) for t in (out if isinstance(out, (tuple, list)) else (out,)))
        return out


class LargestMade(TorchDispatchMode):
    """The most elements any ATen op produced while active (what a step allocated, whatever its storage)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.most = max(self.most, t.untyped_storage().nbytes() // max(1, t.element_size()))
        return out
