"""Exact matrix products in Z/2^64 through float64 BLAS (22-bit limbs).

torch multiplies int64 matrices with a generic loop: on CPUs without 64-bit vector multiplies (AVX2, no
AVX-512) a 256^3 int64 GEMM takes ~40 ms on the 2-core AMD EPYC box, against ~0.8 ms for a float64 GEMM
(MKL) of the same size. A ring product can be had from float64 GEMMs exactly: split every entry into three
signed 22-bit limbs, ``x = x0 + 2^22 x1 + 2^44 x2 (mod 2^64)`` with ``|x_k| <= 2^21``; a product of two
limbs is at most 2^42 in size, so a sum of up to :data:`MAX_TERMS` = 2^11 of them stays within 2^53,
where float64 holds every integer: the GEMM is exact whatever order it adds in. Limb pairs whose weight
``2^(22 (i + j))`` is a multiple of 2^64 vanish mod 2^64, which leaves six limb products, one per pair
with ``i + j <= 2``; the three of one weight are one GEMM over the limbs laid side by side
(``[x0 | x1 | x2] @ [y2; y1; y0]`` and its prefixes), so a product costs three float64 GEMMs of 1, 2
and 3 times the reduction length, then three conversions back to int64 and two shifted adds (the
weights' wrap-around is int64's own). The limb split of the Ozaki scheme and of CrypTen's CUDA products
(float64 blocks of 16 bits) is the same idea.

On hosts whose int64 GEMM is fast (AVX-512's 64-bit multiplies) the limbs lose: :func:`limbs_pay`
times both once per process on a small product and the faster one serves (``VEIL_RING_GEMM=limbs`` or
``int64`` pins it). Both give the identical ring result, so the choice never changes a value.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

LIMB_BITS = 22
_HALF = 1 << (LIMB_BITS - 1)
_MASK = (1 << LIMB_BITS) - 1
#: the most limb products one float64 sum may hold and stay exact: (2^21)^2 * 2^11 = 2^53
MAX_TERMS = 1 << 11
#: below this many multiply-adds the limbs' extra passes cost more than the int64 loop saves (on the 2-core
#: AVX2 box the two break even near a 96^3 product: 64^3 0.5 ms int64 against 1.0 ms, 128^3 14 against 3 ms)
MIN_WORK = 1 << 20
#: a convolution summing fewer taps (in channels x kernel area) keeps torch's int64 kernel: the float64
#: convolutions of few channels are slow (1 channel, 3x3, batch 64: 18 ms int64 against 71 ms in limbs)
MIN_CONV_TAPS = 32
#: a product through the limbs has an output of at least MIN_OUTPUT entries (each piece of a long reduction
#: pays ~20 torch calls) and ``rows * cols >= MIN_REUSE * (rows + cols)``: splitting an operand costs ~15
#: passes over it, repaid only by reusing each limb across the other side's rows or columns. Narrower ones
#: keep torch's int64 loop: (1 x 2^20) @ (2^20 x 1) took 1 s in limbs against 30 ms, a dealing of such a
#: product held the provider a minute; within the rule limbs cost at most ~1.5x (64 x 8 outputs) here
MIN_OUTPUT = 512
MIN_REUSE = 4
#: the most elements of any one buffer of the limbs' scratch (float64 limbs, float64 products and their
#: int64 images): products go in tiles or chunks within it, whatever a requester's shapes (a Beaver combine
#: is not sized before it runs: its result is charged, as the dealt c was, not the limbs beside it)
SCRATCH_ELEMENTS = 1 << 20


def split_into(x: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
    """Writes the three signed 22-bit limbs of int64 ``x`` (low first) into the float64 tensors ``outs``
    (views of ``x``'s shape, e.g. slices of one wider buffer): ``x = o0 + 2^22 o1 + 2^44 o2 mod 2^64``."""
    u = x + _HALF  # balanced limbs: the low 22 bits of u, less 2^21, are in [-2^21, 2^21)
    scratch = torch.empty_like(u)
    for out in outs[:2]:
        torch.sub(torch.bitwise_and(u, _MASK, out=scratch), _HALF, out=out)
        u.bitwise_right_shift_(LIMB_BITS).add_(_HALF)  # (x - limb) / 2^22, arithmetic shift: exact
    outs[2].copy_(u.sub_(_HALF))  # the top limb: |u| < 2^20


def _limbs_side_by_side(blocks: Sequence[torch.Tensor], reversed_limbs: bool, rows: bool) -> torch.Tensor:
    """One float64 buffer holding the limbs of ``blocks`` concatenated along the reduction axis.

    Left operands (``rows=False``: blocks ``M x K_b``) give ``[l0 | l1 | l2]``, each ``l_k`` the blocks'
    k-th limbs side by side (``M x 3K``); right operands (``rows=True``: blocks ``K_b x N``) give
    ``[l2; l1; l0]`` (``3K x N``), so that a prefix of the left's columns meets a suffix of the right's rows.
    """
    total = sum(b.shape[0 if rows else 1] for b in blocks)
    other = blocks[0].shape[1 if rows else 0]
    buf = torch.empty((3 * total, other) if rows else (other, 3 * total), dtype=torch.float64)
    at = 0
    for b in blocks:
        k = b.shape[0 if rows else 1]
        outs = []
        for limb in range(3):
            slot = (2 - limb if reversed_limbs else limb) * total + at
            outs.append(buf[slot:slot + k] if rows else buf[:, slot:slot + k])
        split_into(b, outs)
        at += k
    return buf


def sum_of_products(c: Optional[torch.Tensor], pairs: Sequence[tuple]) -> torch.Tensor:
    """``c + sum_i x_i @ y_i`` in Z/2^64 through the limbs (2-D int64 matrices of matching shapes; ``c``
    may be None), a new tensor. Reductions longer than ``MAX_TERMS // 3`` in all go in pieces."""
    shape = (pairs[0][0].shape[0], pairs[0][1].shape[1])
    out = torch.zeros(shape, dtype=torch.int64) if c is None else torch.empty(shape, dtype=torch.int64).copy_(c)
    for piece in _pieces(pairs, MAX_TERMS // 3):
        _add_grouped(out, piece)
    return out


def _pieces(pairs: Sequence[tuple], most: int) -> list:
    """``pairs`` cut along the reduction axis into groups whose summed length is at most ``most``."""
    groups, group, room = [], [], most
    for x, y in pairs:
        at, k = 0, x.shape[1]
        while at < k:
            take = min(room, k - at)
            group.append((x[:, at:at + take], y[at:at + take]))
            at, room = at + take, room - take
            if room == 0:
                groups.append(group)
                group, room = [], most
    if group:
        groups.append(group)
    return groups


def _add_grouped(out: torch.Tensor, pairs: Sequence[tuple]) -> None:
    """``out += sum_i x_i @ y_i`` for a summed reduction length of at most ``MAX_TERMS // 3``, tile by
    tile: every limb buffer and float64 product within :data:`SCRATCH_ELEMENTS` (a tile's left limbs are
    split again for each column block, rare: a block is at least 512 columns wide)."""
    total = sum(x.shape[1] for x, _ in pairs)
    rows, cols = out.shape
    width = max(1, min(cols, SCRATCH_ELEMENTS // (3 * total)))
    height = max(1, min(rows, SCRATCH_ELEMENTS // max(3 * total, width)))
    product = torch.empty(height * width, dtype=torch.float64)
    image = torch.empty(height * width, dtype=torch.int64)
    for c0 in range(0, cols, width):
        right = _limbs_side_by_side([y[:, c0:c0 + width] for _, y in pairs], reversed_limbs=True, rows=True)
        for r0 in range(0, rows, height):
            left = _limbs_side_by_side([x[r0:r0 + height] for x, _ in pairs], reversed_limbs=False, rows=False)
            tile = out[r0:r0 + height, c0:c0 + width]
            f = product[:tile.numel()].view(tile.shape)
            i = image[:tile.numel()].view(tile.shape)
            # weight 1: x0 y0; weight 2^22: x0 y1 + x1 y0; weight 2^44: x0 y2 + x1 y1 + x2 y0
            for shift, skip in ((0, 2 * total), (LIMB_BITS, total), (2 * LIMB_BITS, 0)):
                torch.mm(left[:, :3 * total - skip], right[skip:], out=f)
                tile.add_(i.copy_(f), alpha=1 << shift)  # (float64 -> int64 exact: |f| <= 2^53)


def products(c: Optional[torch.Tensor], pairs: Sequence[tuple]) -> Optional[torch.Tensor]:
    """``c + sum_i x_i @ y_i`` in Z/2^64 through the limbs where they apply (2-D int64 CPU matrices of
    matching shapes, enough work, limbs faster on this host), else None (the caller uses torch)."""
    if not pairs or (c is not None and not is_plain(c)):
        return None
    if not all(is_plain(x) and is_plain(y) and x.dim() == 2 and y.dim() == 2 for x, y in pairs):
        return None
    rows, cols, work = pairs[0][0].shape[0], pairs[0][1].shape[1], 0
    for x, y in pairs:
        if not (x.shape[0] == rows and y.shape[1] == cols and x.shape[1] == y.shape[0]):
            return None
        work += x.numel() * cols
    if (c is not None and tuple(c.shape) != (rows, cols)) or work < MIN_WORK or not _wide(rows, cols):
        return None
    if not limbs_pay():
        return None
    return sum_of_products(c, pairs)


#: the six limb products of a ring product: (weight's shift, left limb, right limb)
_LIMB_TERMS = ((0, 0, 0), (LIMB_BITS, 0, 1), (LIMB_BITS, 1, 0),
               (2 * LIMB_BITS, 0, 2), (2 * LIMB_BITS, 1, 1), (2 * LIMB_BITS, 2, 0))


def limb_bilinear(fn: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  into: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """``fn(x, y)`` in Z/2^64 for a bilinear float op ``fn`` (a batched matmul, a convolution) whose
    sums hold at most :data:`MAX_TERMS` products: six limb products, summed with their weights in int64
    (written into ``into`` where given: a chunk of a larger result, :func:`_in_chunks`)."""
    xs = [torch.empty(x.shape, dtype=torch.float64) for _ in range(3)]
    ys = [torch.empty(y.shape, dtype=torch.float64) for _ in range(3)]
    split_into(x, xs)
    split_into(y, ys)
    ints = None
    for shift, i, j in _LIMB_TERMS:
        image = fn(xs[i], ys[j], **kwargs)
        if ints is None:
            ints = torch.empty(image.shape, dtype=torch.int64)
            into = torch.zeros(image.shape, dtype=torch.int64) if into is None else into.zero_()
        into.add_(ints.copy_(image), alpha=1 << shift)
        del image
    return into


def _in_chunks(fn: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor, y_batched: bool,
               **kwargs) -> Optional[torch.Tensor]:
    """``fn(x, y)`` through the limbs in chunks along the first dimension (``x``'s, and ``y``'s where
    ``y_batched``; otherwise all of ``y`` meets each chunk), each chunk's limbs and float64 products
    within :data:`SCRATCH_ELEMENTS`; None where even one sample's would not fit (torch's int64 op then)."""
    n = x.shape[0]
    if n == 0:
        return None
    y_one = y[:1] if y_batched else y
    one = fn(torch.empty((1, *x.shape[1:]), dtype=torch.float64, device="meta"),
             torch.empty(y_one.shape, dtype=torch.float64, device="meta"), **kwargs)
    per_sample = 3 * x[0].numel() + (3 * y[0].numel() if y_batched else 0) + 2 * one.numel()
    room = SCRATCH_ELEMENTS - (0 if y_batched else 3 * y.numel())
    step = min(n, room // per_sample if per_sample else n)
    if step < 1:
        return None
    out = torch.empty((n, *one.shape[1:]), dtype=torch.int64)
    for at in range(0, n, step):
        limb_bilinear(fn, x[at:at + step], y[at:at + step] if y_batched else y, into=out[at:at + step], **kwargs)
    return out


def is_plain(t: torch.Tensor) -> bool:
    """A plain int64 CPU tensor (no subclass, no meta): what the limbs apply to."""
    return type(t) is torch.Tensor and t.dtype == torch.int64 and t.device.type == "cpu"


def fits(terms: int, work: int, grouped: bool = True) -> bool:
    """Whether a product whose sums hold ``terms`` products (``3 *`` that when grouped) and that does
    ``work`` multiply-adds goes through the limbs here."""
    return 0 < terms * (3 if grouped else 1) <= MAX_TERMS and work >= MIN_WORK and limbs_pay()


def mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``torch.mm(x, y)`` in Z/2^64."""
    out = products(None, [(x, y)])
    return torch.mm(x, y) if out is None else out


def addmm(c: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``torch.addmm(c, x, y)`` in Z/2^64 (a new tensor)."""
    out = products(c, [(x, y)])
    return torch.addmm(c, x, y) if out is None else out


def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(x, y)`` in Z/2^64 (through the limbs for batches of matrices whose first dimension
    chunks: ``x`` batched against a matrix or a batch of the same or a single one; vectors stay torch's)."""
    if x.dim() == 2 and y.dim() == 2:
        return mm(x, y)
    out = None
    if is_plain(x) and is_plain(y) and x.dim() >= 3 and y.dim() >= 2 and _wide(x.shape[-2], y.shape[-1], True) and fits(
            x.shape[-1], x.numel() * y.shape[-1], grouped=False):
        if y.dim() == 2 or (y.dim() == x.dim() and y.shape[0] == 1):
            out = _in_chunks(torch.matmul, x, y, y_batched=False)
        elif y.dim() == x.dim() and y.shape[0] == x.shape[0]:
            out = _in_chunks(torch.matmul, x, y, y_batched=True)
    return torch.matmul(x, y) if out is None else out


def bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(x, y)`` in Z/2^64."""
    out = None
    if is_plain(x) and is_plain(y) and x.dim() == 3 and y.dim() == 3 and _wide(x.shape[1], y.shape[2], True) and fits(
            x.shape[2], x.numel() * y.shape[2], grouped=False):
        out = _in_chunks(torch.bmm, x, y, y_batched=True)
    return torch.bmm(x, y) if out is None else out


def _wide(rows: int, cols: int, batched: bool = False) -> bool:
    """Whether a product's ``rows x cols`` output (of each matrix of a batch, whose chunks pay the per-call
    costs once for many: no :data:`MIN_OUTPUT` there) is wide enough for the limbs."""
    return (batched or rows * cols >= MIN_OUTPUT) and rows * cols >= MIN_REUSE * (rows + cols)


def conv2d(x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, dilation=1, groups=1) -> Optional[torch.Tensor]:
    """``F.conv2d`` in Z/2^64 through the limbs, or None where the limbs do not apply here."""
    if not (is_plain(x) and is_plain(w) and x.dim() == 4 and w.dim() == 4) or isinstance(padding, str):
        return None
    taps = w.shape[1] * w.shape[2] * w.shape[3]
    if taps < MIN_CONV_TAPS or not fits(taps, x.shape[0] * x.shape[2] * x.shape[3] * w.shape[0] * taps, grouped=False):
        return None
    return _in_chunks(F.conv2d, x, w, y_batched=False, bias=None, stride=stride, padding=padding, dilation=dilation,
                      groups=groups)


_choice: Optional[bool] = None
_choice_lock = threading.Lock()


def _new_lock_in_child() -> None:
    """A child forked while a thread of its parent was timing has that lock held by no thread of its
    own: its first product would wait forever. The child times (or reads the pin) itself."""
    global _choice_lock
    _choice_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_new_lock_in_child)


def limbs_pay() -> bool:
    """Whether float64 limbs beat torch's int64 GEMM on this host (timed once per process, ~5-20 ms)."""
    global _choice
    if _choice is None:
        with _choice_lock:
            if _choice is None:
                pinned = os.environ.get("VEIL_RING_GEMM", "").strip().lower()
                if pinned in ("limbs", "int64"):
                    _choice = pinned == "limbs"
                else:
                    try:
                        _choice = _time_both()
                    except Exception:  # noqa: BLE001  (MemoryError...: a protocol step gets torch's int64 ops)
                        _choice = False
    return _choice


def _time_both(n: int = 96) -> bool:
    g = torch.Generator().manual_seed(0)  # timing data only: no secret is involved
    x = torch.empty((n, n), dtype=torch.int64).random_(-(1 << 63), None, generator=g)

    def best(f) -> float:
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            f()
            runs.append(time.perf_counter() - start)
        return min(runs)

    return best(lambda: sum_of_products(None, [(x, x)])) < best(lambda: torch.mm(x, x))
