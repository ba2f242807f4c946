"""The ring Z/2^64, stored as ``torch.int64``.

torch's int64 arithmetic wraps around on overflow (two's complement), which
is exactly arithmetic modulo 2^64 with the signed representatives
``[-2^63, 2^63)``. Every secret share and every fixed-point value lives here.

All helpers below use ordinary torch operations only, so that they also run
unchanged on remote tensors (pointers) that forward torch ops to a worker.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from veil.mpc import ring_gemm
from veil.shapes import broadcast_shape

RING_BITS = 64
RING_SIZE = 1 << RING_BITS
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
DTYPE = torch.int64


def random_ring(shape: Sequence[int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Samples a tensor uniformly from Z/2^64.

    Args:
        shape: Output shape.
        generator: If given, a seeded ``torch.Generator`` (reproducible, but
            Mersenne Twister is not a cryptographic PRG: tests only). If None,
            the bytes come from ``os.urandom``, the operating system's CSPRNG.

    Returns:
        An int64 tensor whose entries are uniform over all 2^64 values.
    """
    shape = tuple(int(s) for s in shape)
    if generator is not None:
        # from=INT64_MIN with to=None selects torch's full 64-bit range sampler.
        return torch.empty(shape, dtype=DTYPE).random_(INT64_MIN, None, generator=generator)
    numel = 1
    for s in shape:
        numel *= s
    if numel == 0:
        return torch.empty(shape, dtype=DTYPE)
    raw = bytearray(os.urandom(8 * numel))
    return torch.frombuffer(raw, dtype=DTYPE).reshape(shape)


def wrap_int(value: int) -> int:
    """Maps a Python integer to its signed representative in Z/2^64."""
    return (int(value) - INT64_MIN) % RING_SIZE + INT64_MIN


def _conv2d_unfold(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """int64 conv2d from padding, ``Tensor.unfold`` and one matmul (the ring result of ``F.conv2d``).

    Used where torch's own integer kernel is the slower one (:func:`_few_positions`) or missing
    (older releases); every op here exists for int64 on CPU.
    """
    stride, padding, dilation = (pair(v) for v in (stride, padding, dilation))
    n, c_in = x.shape[0], x.shape[1]
    c_out, c_per_group, kh, kw = w.shape
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    padded = n * c_in * (x.shape[2] + 2 * padding[0]) * (x.shape[3] + 2 * padding[1])
    out_h = (x.shape[2] + 2 * padding[0] - span_h) // stride[0] + 1
    out_w = (x.shape[3] + 2 * padding[1] - span_w) // stride[1] + 1
    if padded > x.numel() + n * c_in * max(out_h, 0) * max(out_w, 0) * kh * kw:
        # the padded input would be larger than the input and its patches: the taps gathered instead (a tiny x
        # padded by 4096 on each side, stride 4096, made 2^26 entries for 9 outputs: red team, session 67)
        patches = _gathered_patches(x, (kh, kw), stride, padding, dilation, (out_h, out_w))
    else:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        # patches: (n, c_in, out_h, out_w, span_h, span_w), then keep dilated taps.
        patches = x.unfold(2, span_h, stride[0]).unfold(3, span_w, stride[1])
        patches = patches[..., :: dilation[0], :: dilation[1]]
    out_h, out_w = patches.shape[2], patches.shape[3]
    if groups == 1:  # one 2-D product (n * positions, taps) @ (taps, c_out): torch's fastest int64 matmul
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n * out_h * out_w, c_in * kh * kw)
        out = ring_gemm.mm(patches, w.reshape(c_out, c_in * kh * kw).t())
        return out.reshape(n, out_h, out_w, c_out).permute(0, 3, 1, 2).contiguous()
    patches = patches.reshape(n, groups, c_per_group, out_h, out_w, kh * kw)
    patches = patches.permute(0, 1, 3, 4, 2, 5).reshape(n, groups, out_h * out_w, c_per_group * kh * kw)
    kernels = w.reshape(groups, c_out // groups, c_per_group * kh * kw).transpose(1, 2)
    out = ring_gemm.matmul(patches, kernels.unsqueeze(0))  # (n, groups, L, c_out/groups)
    return out.permute(0, 1, 3, 2).reshape(n, c_out, out_h, out_w)


def _gathered_patches(x: torch.Tensor, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple,
                      out: tuple) -> torch.Tensor:
    """``(n, c_in, out_h, out_w, kh, kw)`` taps of zero-padded ``x``, gathered from ``x`` itself (zero where a tap
    falls in the padding): as large as the patches, never the padded input."""
    if out[0] < 1 or out[1] < 1:
        raise RuntimeError("conv2d: the padded input is smaller than the dilated kernel (output size too small)")
    index, inside = [], []
    for size, k, s, p, d, o in zip(x.shape[2:], kernel, stride, padding, dilation, out):
        at = (torch.arange(o, device=x.device) * s).unsqueeze(1) + torch.arange(k, device=x.device) * d - p
        inside.append((at >= 0) & (at < size))
        index.append(at.clamp(0, max(size - 1, 0)))
    taps = x[:, :, index[0].view(out[0], kernel[0], 1, 1), index[1].view(1, 1, out[1], kernel[1])]
    taps = taps * (inside[0].view(out[0], kernel[0], 1, 1) & inside[1].view(1, 1, out[1], kernel[1]))
    return taps.permute(0, 1, 2, 4, 3, 5)


def _few_positions(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups) -> bool:
    """Whether the unfold + matmul form beats torch's int64 ``conv2d`` kernel: few output positions
    per image against many output channels (positions * 4 <= c_out), as in a CNN's last, deepest
    layers. Measured on the 2-core box (int64, one thread): 64 channels on 3x3 positions from 32,
    batch 64, 8.5 ms native against 1.7 ms; 2x2 positions 4-12x faster; at 10x10 positions and
    more the native kernel wins by up to 4x (bench/RESULTS.md, "int64 convolutions")."""
    if groups != 1 or x.dim() != 4 or w.dim() != 4 or isinstance(padding, str):  # ("same"/"valid": torch's)
        return False
    (sh, sw), (ph, pw), (dh, dw) = (pair(v) for v in (stride, padding, dilation))
    out_h = (x.shape[2] + 2 * ph - dh * (w.shape[2] - 1) - 1) // sh + 1
    out_w = (x.shape[3] + 2 * pw - dw * (w.shape[3] - 1) - 1) // sw + 1
    return 0 < out_h * out_w * 4 <= w.shape[0]


def pair(v) -> tuple:
    """An int or a 1- or 2-sequence as (h, w), as F.conv2d and the pools read them."""
    return (v, v) if isinstance(v, int) else tuple(v) * (2 if len(v) == 1 else 1)


def conv2d(x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """2-D convolution in Z/2^64 (no bias).

    Recent torch builds convolve int64 on CPU natively with wrap-around; an
    unfold+matmul form gives the identical ring result, used where it is the
    faster one (:func:`_few_positions`) and on builds without the kernel.
    """
    if _few_positions(x, w, stride, padding, dilation, groups):
        return _conv2d_unfold(x, w, stride, padding, dilation, groups)
    out = ring_gemm.conv2d(x, w, stride, padding, dilation, groups)  # float64 limbs where they pay here
    if out is not None:
        return out
    try:
        return F.conv2d(x, w, None, stride, padding, dilation, groups)
    except (RuntimeError, NotImplementedError) as exc:
        if "Long" not in str(exc) and "not implemented" not in str(exc):
            raise
        return _conv2d_unfold(x, w, stride, padding, dilation, groups)


def meta_result(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The meta tensor an elementwise ``x op y`` gives (broadcast shape, promoted dtype), made without
    arithmetic on meta tensors: torch runs that through its Python references, the first of which imports
    ``torch._dynamo`` (~1 s, once per process: the first shared product's shape inference paid it)."""
    return torch.empty(broadcast_shape(x.shape, y.shape), dtype=torch.promote_types(x.dtype, y.dtype),
                       device="meta")


# Bilinear ops op(a, b) usable with Beaver triples: op(a + a', b) = op(a, b) +
# op(a', b) and likewise in b. The names are the ``op`` argument of providers.
BILINEAR_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "mul": torch.mul,
    "matmul": ring_gemm.matmul,
    "mm": ring_gemm.mm,
    "bmm": ring_gemm.bmm,
    "conv2d": conv2d,
}


def _float_conv2d(x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    return F.conv2d(x, w, None, stride, padding, dilation, groups)


#: ring op -> the same op on float64 operands (exact where every sum stays below 2^53: ring128's digits)
FLOAT_TWINS: dict[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] = {
    ring_gemm.matmul: torch.matmul, ring_gemm.mm: torch.mm, ring_gemm.bmm: torch.bmm, conv2d: _float_conv2d,
}


#: the extra arguments each bilinear op takes from a request: a convolution's geometry, small ints only
#: (a tensor, ``out=`` or an unknown name never reaches the op: ``out=`` wrote a product into a buffer
#: the requester handed over, and a huge padding would make the op allocate without bound)
OP_KWARGS: dict[str, frozenset] = {"conv2d": frozenset({"stride", "padding", "dilation", "groups"})}
#: the largest value of such an argument (a stride, padding, dilation or group count)
OP_KWARG_MAX = 1 << 12


def op_arguments(op: str, kwargs: Any) -> dict:
    """``kwargs`` as the extra arguments of the bilinear ``op`` (a dict, or a sequence of name/value
    pairs as a dealing spec may carry them), checked: only the names :data:`OP_KWARGS` lists for ``op``,
    each an int or a sequence of one or two ints in ``[0, OP_KWARG_MAX]``. A fresh dict.

    Raises:
        ValueError: anything else.
    """
    if type(kwargs) is dict:
        items = list(kwargs.items())
    elif isinstance(kwargs, (list, tuple)) and all(isinstance(i, (list, tuple)) and len(i) == 2 for i in kwargs):
        items = [tuple(i) for i in kwargs]
    else:
        raise ValueError(f"the arguments of {op!r} must be a dict of names to small ints")
    allowed = OP_KWARGS.get(op, frozenset())
    out = {}
    for name, value in items:
        if type(name) is not str or name not in allowed:
            raise ValueError(f"{op!r} takes no argument {str(name)[:40]!r} here"
                             f"{' (only ' + ', '.join(sorted(allowed)) + ')' if allowed else ''}")
        values = value if isinstance(value, (list, tuple)) else (value,)
        if not 1 <= len(values) <= 2 or any(type(v) is not int or not 0 <= v <= OP_KWARG_MAX for v in values):
            raise ValueError(f"{op!r}'s {name} must be an int or a pair of ints in [0, {OP_KWARG_MAX}]")
        out[name] = value if type(value) is int else tuple(values)
    return out


def bilinear(op: str) -> Callable[..., torch.Tensor]:
    """Returns the ring implementation of a bilinear op by name."""
    try:
        return BILINEAR_OPS[op]
    except KeyError:
        raise KeyError(f"unknown bilinear op {op!r}; known: {sorted(BILINEAR_OPS)}") from None
