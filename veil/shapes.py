"""Shape arithmetic without torch's per-call cost: a shape's element count, and broadcast shapes.

``torch.broadcast_shapes`` takes 10-20 us a call (it goes through torch's Python references), and veil asks
for one on hot paths whose operands almost always have equal shapes already: each Beaver combine's shape
check on a party, each dealt product's shape on the orchestrator (an MLP SGD step asked 40 times, ~1 ms).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def broadcast_shape(*shapes: Sequence[int]) -> torch.Size:
    """``torch.broadcast_shapes(*shapes)``: the same result (a ``torch.Size``) and the same errors, equal
    shapes answered at once."""
    first = shapes[0] if shapes else None
    if isinstance(first, (tuple, list)) and all(type(d) is int and d >= 0 for d in first):
        key = tuple(first)
        for other in shapes[1:]:
            if not isinstance(other, (tuple, list)) or tuple(other) != key:
                break
        else:
            return torch.Size(key)
    return torch.broadcast_shapes(*shapes)


def numel(shape: Sequence[int]) -> int:
    """The number of elements of a tensor of ``shape`` (each dimension read as an int)."""
    return math.prod(int(d) for d in shape)


def extent(shape: Sequence[int]) -> int:
    """Elements a tensor of ``shape`` stands for, each dimension counted as at least 1 (a (10^9, 0) tensor's
    ``sum(1)`` still makes 10^9 values: how work is sized, not storage)."""
    n = 1
    for d in shape:
        if d > 1:
            n *= d
    return n
