"""What workers must accept so that shares can live on them.

Shared and fixed-precision tensors reach a share with direct ``aten`` calls
(``torch.ops.aten.add.Tensor(share, ...)``); for a remote share these arrive
at ``PointerTensor.__torch_function__`` as ``OpOverload`` objects, so the
overloads below are allowlisted under their aten names ("aten.add.Tensor").
The list is derived from :mod:`veil.mpc.op_classes`: structural, linear,
affine and bilinear ops only (what :mod:`veil.tensors.rules` applies share
by share); ``out=`` variants are excluded. Protocol steps are allowlisted separately as party functions
(:mod:`veil.mpc.party`).

How openings fetch remote shares is the party runtime's job
(:mod:`veil.mpc.runtime`, registered by :mod:`veil.tensors.mpc_glue.runtime`).
"""

from __future__ import annotations

import torch

from veil.messaging.allowlist import ALLOWLIST
from veil.mpc.op_classes import WORKER_CLASSES, classify, packets_of

#: aten packets whose (non-``out``) overloads a worker runs on shares: derived
#: from the one op table (structural, linear, affine and bilinear classes)
SHARE_OPS = " ".join(packets_of(*WORKER_CLASSES))


def _register_share_ops() -> list[str]:
    names = []
    for packet_name in SHARE_OPS.split():
        packet = getattr(torch.ops.aten, packet_name)
        for overload in packet.overloads():
            if "out" in overload.split("_") or overload.endswith("out"):
                continue
            op = getattr(packet, overload)
            if classify(op) not in WORKER_CLASSES or not _on_tensors(op):  # e.g. view.dtype, mul.int: not an op
                continue  # on ring elements
            name = f"aten.{packet_name}.{overload}"
            if op is torch.ops.aten.view.default:
                ALLOWLIST.add(name, _view_of_share, intercepted=op)
            else:
                ALLOWLIST.add(name, op)
            names.append(name)
    return names


def _on_tensors(op: torch._ops.OpOverload) -> bool:
    """Whether an overload takes a tensor and returns one. A packet's Python-number and list overloads
    (``mul.int``, ``add.str``, ``sum.int``, ``mul.left_t``: a list repeated ``n`` times) compute on no share: a
    worker never runs them for one (the orchestrator's calls on a remote share arrive with the share), and
    ``left_t``'s result is as long as a requester's ``n`` says (torch's Python binding cannot fill its generic
    list today; red team: test_redteam_session66_scalar_ops.py)."""
    schema = op._schema
    return any("Tensor" in str(a.type) for a in schema.arguments) and \
        any("Tensor" in str(r.type) for r in schema.returns)


def _view_of_share(share: torch.Tensor, size: list) -> torch.Tensor:
    """``view`` of a share as its holder stores it: a view where its strides allow one, else a copy.

    The orchestrator's wrapper of a remote share claims contiguous strides, while a party may hold the
    share transposed (autograd's ``t()`` of a weight gradient). torch accepted the view on the wrapper,
    so the party must not fail it; in-place ops on shares replace the wrapper's child and never write
    through a view, so the copy changes no result.
    """
    return share.reshape(size)


REGISTERED = _register_share_ops()

