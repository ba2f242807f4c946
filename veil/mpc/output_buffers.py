"""Buffers an opening step may write its outputs into, set by whoever runs the step for a while.

A network party publishes a peer opening's outputs through a share slot, memory its peer maps
(``veil.workers.share_slots``): computed straight into the slot, the outputs need no copy there when the
peer fetches them. The runner reserves the slot and sets its views here (:func:`outputs_into`, per thread);
a step that supports it asks :func:`output_buffer` for its ``k``-th output and writes there with ``out=``,
or computes a tensor of its own when there is no buffer of that shape and dtype. Nothing a requester sends
reaches this: it is not an argument of the step.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

_local = threading.local()


@contextmanager
def outputs_into(buffers: Sequence[torch.Tensor]) -> Iterator[None]:
    """Steps run in the block may write their outputs into ``buffers`` (output k into ``buffers[k]``)."""
    previous = getattr(_local, "buffers", None)
    _local.buffers = list(buffers)
    try:
        yield
    finally:
        _local.buffers = previous


def output_buffer(k: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
    """The buffer for output ``k`` when one of exactly this shape and dtype is set (else None: allocate)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None or k >= len(buffers):
        return None
    out = buffers[k]
    return out if tuple(out.shape) == tuple(shape) and out.dtype == dtype else None


def is_buffer(t: torch.Tensor, k: int) -> bool:
    """Whether ``t`` is exactly the runner's buffer for output ``k`` (the buffers are disjoint pieces of one
    memory: outputs written there share its storage without aliasing each other)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None or k >= len(buffers):
        return False
    b = buffers[k]
    return t.data_ptr() == b.data_ptr() and t.shape == b.shape and t.dtype == b.dtype and t.stride() == b.stride()
