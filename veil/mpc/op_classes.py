"""One classification of aten ops by what they do to additive shares.

Every place that must know how an op behaves under secret sharing derives
its list from :data:`OP_CLASSES` instead of keeping its own:

* the local rules of shared and fixed-precision tensors
  (:data:`veil.tensors.rules.common.STRUCTURAL_OPS`),
* which ops keep SPDZ MACs and how (:mod:`veil.mpc.mac`),
* the ops a worker runs on shares it holds (:data:`veil.mpc.wire_ops.SHARE_OPS`).

Ops in no class go through torch's decomposition table (``addmm`` ->
``mm`` + ``add``, ``rsub`` -> ``sub``, ...; :func:`veil.tensors._dispatch.dispatch`)
or are refused. Entries are ``"packet"`` (every overload) or
``"packet.overload"``; the table imports only torch.
"""

from __future__ import annotations

import enum

import torch


class OpClass(enum.Enum):
    """What an op does to additive shares ``x = sum_i x_i``."""

    #: moves, selects or copies entries: each party applies it to its share
    STRUCTURAL = "structural"
    #: linear in the shares with no public term (sums, negation, zeros)
    LINEAR = "linear"
    #: linear plus a public term (``x + c``): party 0 adds the public part
    AFFINE = "affine"
    #: bilinear: local with one public operand, Beaver triple with two shared
    BILINEAR = "bilinear"
    #: division by a public integer: a truncation protocol
    TRUNCATING = "truncating"
    #: a public constant of the operand's shape (party 0 holds it)
    PUBLIC_CONSTANT = "public_constant"
    #: order-dependent: a comparison protocol (veil.mpc.comparison; with MACs veil.mpc.mac_comparison)
    COMPARISON = "comparison"


_TABLE = {
    OpClass.STRUCTURAL: """
        view.default _unsafe_view.default reshape.default transpose.int t.default permute.default
        expand.default squeeze unsqueeze.default select.int slice.Tensor index.Tensor index_select.default
        gather.default unbind.int split.Tensor split_with_sizes.default narrow.default flip.default
        roll.default repeat.default unfold.default diagonal.default clone.default detach.default
        alias.default movedim expand_as contiguous
    """,
    OpClass.LINEAR: "sum cumsum.default neg.default zeros_like.default new_zeros.default",
    OpClass.AFFINE: "add sub rsub cat.default stack.default constant_pad_nd.default",
    OpClass.BILINEAR: "mul mm.default bmm.default mv.default dot.default matmul convolution.default",
    OpClass.TRUNCATING: "div floor_divide mean avg_pool2d.default",
    OpClass.PUBLIC_CONSTANT: "ones_like.default full_like.default new_ones.default new_full.default",
    OpClass.COMPARISON: """
        gt lt ge le eq ne relu.default max argmax.default max_pool2d.default
        max_pool2d_with_indices.default threshold_backward.default
    """,
}

#: entry ("packet" or "packet.overload") -> class
OP_CLASSES: dict[str, OpClass] = {name: cls for cls, names in _TABLE.items() for name in names.split()}

#: bilinear packet -> the ring op its Beaver triple is dealt for (veil.mpc.ring.BILINEAR_OPS)
BILINEAR_RING_OP = {"mul": "mul", "mm": "mm", "bmm": "bmm", "mv": "matmul", "dot": "matmul",
                    "matmul": "matmul", "convolution": "conv2d"}

#: classes whose ops a worker may run on a share it holds (no protocol, no division)
WORKER_CLASSES = (OpClass.STRUCTURAL, OpClass.LINEAR, OpClass.AFFINE, OpClass.BILINEAR)


def resolve(entry: str):
    """The aten ``OpOverload`` (``"packet.overload"``) or ``OpOverloadPacket`` (``"packet"``)."""
    packet, _, overload = entry.partition(".")
    obj = getattr(torch.ops.aten, packet)
    return getattr(obj, overload) if overload else obj


def ops_of(*classes: OpClass) -> tuple:
    """The aten ops (overloads or packets) of the given classes, in table order."""
    return tuple(resolve(name) for name, cls in OP_CLASSES.items() if cls in classes)


def packets_of(*classes: OpClass) -> list[str]:
    """The packet names of the given classes (for the worker allowlist)."""
    return list(dict.fromkeys(name.partition(".")[0] for name, cls in OP_CLASSES.items() if cls in classes))


def classify(func) -> OpClass | None:
    """The class of an aten overload: its exact entry, else its packet's."""
    name = func.overloadpacket.__name__
    overload = func._overloadname
    return OP_CLASSES.get(f"{name}.{overload}") or OP_CLASSES.get(name)
