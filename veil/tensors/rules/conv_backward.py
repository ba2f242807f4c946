"""A 2-D convolution's backward pass as forward convolutions and structural ops.

Autograd differentiates ``conv2d`` with the fused ``aten.convolution_backward``, which has no
decomposition in torch and no kernel for shared or fixed-precision tensors. Both of its products are
ordinary convolutions of rearranged operands, so this module writes them with ops every tensor type
of veil already supports (``aten.convolution`` forward, transpose, flip, zero padding, narrowing,
sums); on shared tensors each product is then one Beaver convolution, and inside a backward pass
the two of them open in one round (``veil.tensors.pending_products``).

For ``y = conv2d(x, w, stride s, padding p, dilation d)`` and the gradient ``g`` of ``y``:

* ``dx``: ``g`` with ``s - 1`` zeros between its entries (the transpose of striding), convolved
  with ``w`` flipped in space and with its in/out channels swapped, padded by ``d (k - 1) - p``
  (negative padding crops), plus the rows and columns that the forward stride skipped at the end;
* ``dw``: ``x`` and ``g`` with batch and channels swapped, convolved with stride ``d`` and
  dilation ``s`` (the roles of the two swap), cut to the kernel's size;
* ``db``: ``g`` summed over batch and space.

Groups other than 1 are refused (a clear error), as are transposed convolutions (no forward rule).
"""

from __future__ import annotations

from typing import Any

import torch

from veil.mpc.errors import UnsupportedOperationError
from veil.mpc.ring import pair

aten = torch.ops.aten


def convolution_backward(grad: Any, x: Any, w: Any, bias_sizes: Any, stride: Any, padding: Any, dilation: Any,
                         transposed: bool, output_padding: Any, groups: int, output_mask: Any) -> tuple:
    """``aten.convolution_backward``'s ``(grad_input, grad_weight, grad_bias)`` (None where
    ``output_mask`` does not ask for one), with aten ops on whatever tensor type the arguments are."""
    if transposed or groups != 1 or x.dim() != 4 or w.dim() != 4:
        raise UnsupportedOperationError(
            "the backward pass of a convolution is implemented for 2-D, non-transposed convolutions with groups=1")
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    want_x, want_w, want_b = output_mask
    dx = _grad_input(grad, x.shape, w, stride, padding, dilation) if want_x else None
    dw = _grad_weight(grad, x, w.shape, stride, padding, dilation) if want_w else None
    db = aten.sum.dim_IntList(grad, [0, 2, 3]) if want_b and bias_sizes is not None else None
    return dx, dw, db


def _conv(a: Any, b: Any, stride: tuple, dilation: tuple) -> Any:
    return aten.convolution.default(a, b, None, list(stride), [0, 0], list(dilation), False, [0, 0], 1)


def _grad_input(grad: Any, x_shape: torch.Size, w: Any, stride: tuple, padding: tuple, dilation: tuple) -> Any:
    spread_ = spread(grad, stride)
    kernel = aten.transpose.int(aten.flip.default(w, [2, 3]), 0, 1)  # (C_in, C_out, kh, kw)
    pads = []
    for axis in (1, 0):  # constant_pad_nd lists the last dimension first
        k, p, d = w.shape[2 + axis], padding[axis], dilation[axis]
        # the end also gets the rows or columns the forward stride left out: x's size is reached again
        pads += [d * (k - 1) - p, x_shape[2 + axis] - spread_.shape[2 + axis] + p]
    return _conv(aten.constant_pad_nd.default(spread_, pads, 0), kernel, (1, 1), dilation)


def _grad_weight(grad: Any, x: Any, w_shape: torch.Size, stride: tuple, padding: tuple, dilation: tuple) -> Any:
    xs = aten.transpose.int(x, 0, 1)  # (C_in, N, H, W): the channels as the batch
    gs = aten.transpose.int(grad, 0, 1)  # (C_out, N, H_out, W_out): the gradient as the kernel
    if padding != (0, 0):
        xs = aten.constant_pad_nd.default(xs, [padding[1], padding[1], padding[0], padding[0]], 0)
    out = _conv(xs, gs, dilation, stride)  # (C_in, C_out, >= kh, >= kw)
    out = aten.slice.Tensor(aten.slice.Tensor(out, 2, 0, w_shape[2]), 3, 0, w_shape[3])
    # laid out as the weight: autograd copies a gradient of other strides into a plain tensor of the weight's
    return aten.clone.default(aten.transpose.int(out, 0, 1), memory_format=torch.contiguous_format)


def spread(grad: Any, stride: tuple) -> Any:
    """``grad`` with ``s - 1`` zeros between neighbouring entries along each spatial axis (stride ``s``): the
    transpose of striding (also average pooling's backward, ``fixed_precision._avg_pool2d_backward``)."""
    for axis, s in ((2, stride[0]), (3, stride[1])):
        if s == 1:
            continue
        n = grad.shape[axis]
        grad = aten.unsqueeze.default(grad, axis + 1)  # (..., n, 1, ...)
        pad = [0, 0] * (grad.dim() - axis - 2) + [0, s - 1]  # zeros after each entry, on the new axis
        grad = aten.constant_pad_nd.default(grad, pad, 0)  # (..., n, s, ...)
        shape = list(grad.shape)
        grad = aten.reshape.default(grad, shape[:axis] + [n * s] + shape[axis + 2:])
        grad = aten.slice.Tensor(grad, axis, 0, (n - 1) * s + 1)
    return grad
