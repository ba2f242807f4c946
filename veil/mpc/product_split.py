"""Products whose dealt item would cost more than a provider deals in one item, split into items that do not.

A crypto provider refuses one product item above :data:`veil.mpc.material.MAX_PRODUCT_WORK` multiply-adds
(the item would hold the dealing slot for seconds). An honest product that large (a (4096 x 1024) @ (1024 x
1024) matmul, a big batch's convolution) is therefore computed here as several Beaver products of slices of
its operands, each dealt its own triple within the bound, whose masked operands all open in the same single
round (``beaver_masks``), and whose results are joined at each party:

* along the **contracted dimension** (a matmul's ``K``, a convolution's input channels per group): the
  slices partition both operands, so the opened bytes are the unsplit product's, and the pieces' results
  are summed (``x @ y = sum_j x[:, K_j] @ y[K_j, :]``);
* along the output's **first dimension** (an elementwise product's, or where one output row alone would
  pass the bound): each block is an independent product, the results concatenated; an operand without
  that dimension (a matmul's right factor, a convolution's kernel) is opened once per block.

The bound used for splitting is :func:`split_bound` (``SPLIT_WORK``, else the provider's bound at call time):
tests lower it to split small products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from veil.mpc.material import product_shape, product_work
from veil.messaging.allowlist import register_worker_function
from veil.mpc.party import PARTY_FUNCTIONS, WIRE_PREFIX, party_function, run_party
from veil.mpc.ring import op_arguments

#: the multiply-adds one piece may cost (None: the provider's ``material.MAX_PRODUCT_WORK`` when split)
SPLIT_WORK: int | None = None
#: most pieces one product is split into (each is a dealt item and a request: a product needing more is
#: refused here, in one line, rather than sent as thousands of requests)
MAX_PIECES = 4096

_MATMULS = ("mm", "matmul", "bmm")


def split_bound() -> int:
    """The multiply-adds one piece may cost."""
    from veil.mpc import material

    return int(SPLIT_WORK if SPLIT_WORK is not None else material.MAX_PRODUCT_WORK)


#: a slice of an operand: (dimension, start, length, groups); with groups > 1 the dimension is read as
#: (groups, size / groups) and the inner part sliced in every group (a grouped convolution's channels)
Slice = tuple


@dataclass(frozen=True)
class Piece:
    """One piece: the slices of ``x`` and ``y`` it multiplies, and the output block it is summed into."""

    x_slices: tuple
    y_slices: tuple
    block: int


@dataclass(frozen=True)
class SplitPlan:
    """The pieces of a product (ordered by block) and the per-block piece counts."""

    pieces: tuple
    block_sizes: tuple


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    size = max(1, min(size, total))
    return [(s, min(size, total - s)) for s in range(0, total, size)]


def _contracted(op: str, shape_x: tuple, shape_y: tuple, op_kwargs: dict):
    """(units along the contracted dimension, x's slice for [start, start+len), y's, work per unit per output
    entry); None where the op has none to split (an elementwise product)."""
    if op in _MATMULS and shape_x and shape_y:
        x_dim, y_dim = len(shape_x) - 1, (0 if len(shape_y) == 1 else len(shape_y) - 2)
        return shape_x[-1], lambda s, n: ((x_dim, s, n, 1),), lambda s, n: ((y_dim, s, n, 1),), 1
    if op == "conv2d" and len(shape_x) == 4 and len(shape_y) == 4:
        groups = int(op_kwargs.get("groups", 1))
        per_unit = shape_y[2] * shape_y[3]
        return shape_y[1], lambda s, n: ((1, s, n, groups),), lambda s, n: ((1, s, n, 1),), per_unit
    return None


def _blocks(op: str, shape_x: tuple, shape_y: tuple, shape_c: tuple, rows: int) -> list[tuple[tuple, tuple]] | None:
    """The output's first dimension in blocks of ``rows``: per block (x's slices, y's slices); None where
    that dimension is no operand's own (a block would not be an independent product)."""
    owners = _first_dim_owners(op, shape_x, shape_y, shape_c)
    if owners is None or not any(owners):
        return None
    return [tuple(((0, start, n, 1),) if holds else () for holds in owners) for start, n in _chunks(shape_c[0], rows)]


def _first_dim_owners(op: str, shape_x: tuple, shape_y: tuple, shape_c: tuple) -> tuple | None:
    """Per operand, whether its first dimension is the output's (sliced with each block) or not (whole in
    every block: broadcast, or a kernel); None where the output's first dimension is a contracted or
    column one (no block split)."""
    if not shape_c:
        return None
    if op == "mul":
        return tuple(len(s) == len(shape_c) and s[0] != 1 for s in (shape_x, shape_y))
    if op in ("conv2d", "mm"):
        return True, False  # the batch / the rows are x's; the kernel / right factor is whole in every block
    # matmul, bmm: the output's batch dimensions, then x's rows (x 2-D or more), then y's columns (y 2-D or more)
    batch = len(shape_c) - (len(shape_x) >= 2) - (len(shape_y) >= 2)
    if batch >= 1:  # an operand with every batch dimension holds the first (unless it broadcasts it)
        return tuple(max(0, len(s) - 2) == batch and s[0] != 1 for s in (shape_x, shape_y))
    return (True, False) if len(shape_x) >= 2 else None


def plan_split(op: str, shape_x, shape_y, op_kwargs: dict | None = None, bound: int | None = None) -> SplitPlan | None:
    """How to compute ``op(x, y)`` as products of at most ``bound`` multiply-adds each; None when one item
    is within it (or no split applies: the provider then refuses the one item, as before)."""
    op_kwargs = op_arguments(op, dict(op_kwargs or {}))
    shape_x, shape_y = tuple(int(v) for v in shape_x), tuple(int(v) for v in shape_y)
    bound = split_bound() if bound is None else int(bound)
    shape_c = product_shape(op, shape_x, shape_y, op_kwargs)
    work = product_work(op, shape_x, shape_y, shape_c)
    if work <= bound:
        return None
    contracted = _contracted(op, shape_x, shape_y, op_kwargs)
    out_entries = math.prod(shape_c)
    pieces: list[Piece] = []
    sizes: list[int] = []
    if contracted is not None and out_entries * contracted[3] <= bound:
        units, x_slice, y_slice, per_unit = contracted  # one block: the contracted dimension in chunks
        for start, n in _chunks(units, bound // (out_entries * per_unit)):
            pieces.append(Piece(x_slice(start, n), y_slice(start, n), 0))
        sizes.append(len(pieces))
    else:
        per_row = out_entries // shape_c[0] if shape_c and shape_c[0] else 0
        min_unit = contracted[3] if contracted is not None else 1
        rows = max(1, bound // max(1, per_row * min_unit))
        blocks = _blocks(op, shape_x, shape_y, shape_c, rows)
        if blocks is None or len(blocks) < 2:
            return None
        # every block's contracted dimension in the same chunks (so that y's chunks are cut once, not per block)
        chunks = [None]
        if contracted is not None:
            units, x_slice, y_slice, per_unit = contracted
            size = max(1, bound // max(1, rows * per_row * per_unit))
            chunks = _chunks(units, size) if size < units else [None]
        for b, (xs, ys) in enumerate(blocks):
            for chunk in chunks:
                extra_x, extra_y = ((), ()) if chunk is None else (x_slice(*chunk), y_slice(*chunk))
                pieces.append(Piece(xs + extra_x, ys + extra_y, b))
            sizes.append(len(chunks))
    if len(pieces) > MAX_PIECES:
        from veil.mpc.errors import MPCError

        raise MPCError(f"a {op} of shapes {shape_x} and {shape_y} would take {len(pieces)} dealt items of at "
                       f"most {bound} multiply-adds each, more than {MAX_PIECES}")
    return SplitPlan(tuple(pieces), tuple(sizes))


def plan_left_blocks(op: str, shape_x, shape_y, op_kwargs: dict | None = None,
                     bound: int | None = None) -> list[tuple] | None:
    """x's slices along the output's first dimension such that each block's product with the whole ``y``
    costs at most ``bound``: the split of a product whose right operand is one fixed mask
    (:mod:`veil.mpc.fixed_operand`); None when one item is within it or no such split applies."""
    op_kwargs = op_arguments(op, dict(op_kwargs or {}))
    shape_x, shape_y = tuple(int(v) for v in shape_x), tuple(int(v) for v in shape_y)
    bound = split_bound() if bound is None else int(bound)
    shape_c = product_shape(op, shape_x, shape_y, op_kwargs)
    work = product_work(op, shape_x, shape_y, shape_c)
    if work <= bound or _first_dim_owners(op, shape_x, shape_y, shape_c) != (True, False):
        return None
    rows = max(1, bound // max(1, work // shape_c[0]))
    blocks = [((0, start, n, 1),) for start, n in _chunks(shape_c[0], rows)]
    if len(blocks) > MAX_PIECES:
        from veil.mpc.errors import MPCError

        raise MPCError(f"a {op} of shapes {shape_x} and {shape_y} would take {len(blocks)} dealt items of at "
                       f"most {bound} multiply-adds each, more than {MAX_PIECES}")
    return blocks if len(blocks) > 1 else None


def _sliced_shape(shape: tuple, slices: tuple) -> tuple:
    shape = list(shape)
    for dim, _, n, groups in slices:
        shape[dim] = n * groups
    return tuple(shape)


def _view(t: torch.Tensor, slices) -> torch.Tensor:
    for dim, start, n, groups in slices:
        dim, start, n, groups = int(dim), int(start), int(n), int(groups)
        if groups == 1:
            t = t.narrow(dim, start, n)
        else:
            t = t.unflatten(dim, (groups, -1)).narrow(dim + 1, start, n).flatten(dim, dim + 1)
    return t


def take(t: torch.Tensor, slices) -> torch.Tensor:
    """The slice of ``t`` (a fresh contiguous tensor: it is stored as a new share)."""
    return _view(t, slices).clone(memory_format=torch.contiguous_format)


def _checked_slices(value) -> list:
    if type(value) is not list or not value or not all(
            type(s) in (list, tuple) and len(s) == 4 and all(type(v) is int and v >= 0 for v in s) for s in value):
        raise ValueError("product_pieces: a piece is a non-empty list of [dim, start, length, groups] of "
                         "non-negative ints")
    return value


@party_function("product_pieces")
def _pieces(x_i: torch.Tensor, y_i, x_slices: list, y_slices: list) -> tuple:
    """A party's shares of the distinct sliced operands of a split product: ``x``'s slices, then ``y``'s
    (``y`` may be None when it has none). An honest split partitions its operands, so the pieces hold
    at most as many entries as the operands: more is refused before anything is copied."""
    if type(x_slices) is not list or type(y_slices) is not list or not (x_slices or y_slices) or (
            y_slices and not isinstance(y_i, torch.Tensor)) or not isinstance(x_i, torch.Tensor):
        raise ValueError("product_pieces needs lists of slices of x and of y (some), and the operands they slice")
    if len(x_slices) > MAX_PIECES or len(y_slices) > MAX_PIECES:  # a tensor each, however few entries it holds
        raise ValueError(f"product_pieces: at most {MAX_PIECES} slices of each operand (a split's pieces)")
    views = [_view(x_i, _checked_slices(s)) for s in x_slices] + [_view(y_i, _checked_slices(s)) for s in y_slices]
    room = x_i.numel() + (y_i.numel() if isinstance(y_i, torch.Tensor) else 0)
    if sum(v.numel() for v in views) > room:
        raise ValueError("product_pieces: the pieces would hold more entries than the operands they slice")
    return tuple(v.clone(memory_format=torch.contiguous_format) for v in views)


def sliced_operands(x: dict, y: dict, plan: SplitPlan) -> tuple[list[dict], list[dict]]:
    """Per piece of ``plan``, party -> its share of the piece's x and of its y: the distinct slices cut at each
    party in one step (``product_pieces``), an operand a piece takes whole passed as it is."""
    parties = list(x)
    ux = list(dict.fromkeys(piece.x_slices for piece in plan.pieces if piece.x_slices))
    uy = list(dict.fromkeys(piece.y_slices for piece in plan.pieces if piece.y_slices))
    cut = {p: run_party("product_pieces", x[p], y[p] if uy else None, [wire_slices(s) for s in ux],
                        [wire_slices(s) for s in uy]) for p in parties} if ux or uy else {}
    at_x, at_y = {s: j for j, s in enumerate(ux)}, {s: len(ux) + j for j, s in enumerate(uy)}
    xs = [{p: cut[p][at_x[piece.x_slices]] if piece.x_slices else x[p] for p in parties} for piece in plan.pieces]
    ys = [{p: cut[p][at_y[piece.y_slices]] if piece.y_slices else y[p] for p in parties} for piece in plan.pieces]
    return xs, ys


def check_join(zs: list, block_sizes: list, name: str) -> None:
    """A join's pieces and block sizes as a split makes them: at most :data:`MAX_PIECES` pieces (the requester
    writes both lists: empty shares cost the quota nothing, and a join over a million of them, a loop step each,
    held the party for minutes; red team, session 67), positive block sizes adding up to them."""
    if type(zs) is not list or type(block_sizes) is not list or not 0 < len(zs) <= MAX_PIECES or any(
            type(n) is not int or n < 1 for n in block_sizes) or sum(block_sizes) != len(zs):
        raise ValueError(f"{name} needs the pieces' shares (at most {MAX_PIECES}) and positive block sizes that "
                         "add up to them")


@party_function("product_join")
def _join(zs: list, block_sizes: list) -> torch.Tensor:
    """A party's share of the product from its pieces' shares: each block's pieces summed, the blocks
    concatenated along the first dimension."""
    check_join(zs, block_sizes, "product_join")
    blocks, k = [], 0
    for n in block_sizes:
        total = zs[k].clone() if not zs[k].is_meta else torch.empty_like(zs[k])
        for z in zs[k + 1:k + n]:
            if total.is_meta:
                break
            total += z
        blocks.append(total)
        k += n
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _placeholder(like: torch.Tensor, shape: list) -> torch.Tensor:
    """Zeros of a pending split product's shape (its shares until the pieces open)."""
    _check_placeholder(shape)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _check_placeholder(shape: list) -> None:
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape) or math.prod(shape) > 1 << 31:
        raise ValueError("product_placeholder needs a shape of at most 2^31 entries")


def _placeholder_at(worker, like: torch.Tensor, shape: list) -> torch.Tensor:
    """:func:`_placeholder` at a worker: the requester names the shape and a worker function is not sized before it
    runs, so the zeros are refused by the session's quota before they are made (2^31 entries were 16 GiB made,
    then refused at the store; red team: test_redteam_review_peer_second.py), as ``veil.mpc.prg_share`` does."""
    from veil.compat.encoding_guards import check_room

    _check_placeholder(shape)
    if isinstance(like, torch.Tensor):
        check_room(worker, math.prod(shape), like.element_size(), PLACEHOLDER)
    return _placeholder(like, shape)


PLACEHOLDER = WIRE_PREFIX + "product_placeholder"
PARTY_FUNCTIONS["product_placeholder"] = _placeholder  # (in process: run as it is; at a worker: _placeholder_at)
register_worker_function(PLACEHOLDER, _placeholder_at)


def wire_slices(slices: tuple) -> list:
    return [list(s) for s in slices]
