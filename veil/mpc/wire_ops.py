"""What workers must accept so that shares can live on them.

Shared and fixed-precision tensors reach a share with direct ``aten`` calls
(``torch.ops.aten.add.Tensor(share, ...)``); for a remote share these arrive
at ``PointerTensor.__torch_function__`` as ``OpOverload`` objects, so the
overloads below are allowlisted under their aten names ("aten.add.Tensor").
The list is derived from :mod:`veil.mpc.op_classes`: structural, linear,
affine and bilinear ops only (what :mod:`veil.tensors.rules` applies share
by share); ``out=`` variants are excluded. Protocol steps are allowlisted separately as party functions
(:mod:`veil.mpc.party`).

It also registers how opening fetches remote shares: one
``GetObjectsMessage`` per worker for all shares opened together.
"""

from __future__ import annotations

import torch

from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.messages import GetObjectsMessage
from veil.mpc.op_classes import WORKER_CLASSES, classify, packets_of
from veil.mpc.opening import register_batch_fetcher
from veil.tensors.pointer import PointerTensor

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
            if classify(op) not in WORKER_CLASSES:  # e.g. view.dtype: not an op on ring elements
                continue
            name = f"aten.{packet_name}.{overload}"
            ALLOWLIST.add(name, op)
            names.append(name)
    return names


REGISTERED = _register_share_ops()


def _fetch_pointers(ptrs: list) -> list[torch.Tensor]:
    """One GetObjectsMessage per (owner, location) for all shares opened together."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, p in enumerate(ptrs):
        groups.setdefault((id(p.owner), id(p.location)), []).append(k)
    out: list = [None] * len(ptrs)
    for idx in groups.values():
        first = ptrs[idx[0]]
        reply = first.owner.send_msg(GetObjectsMessage([ptrs[k].id_at_location for k in idx]), first.location)
        for k, value in zip(idx, reply.objects):
            ptrs[k].mark_freed()
            out[k] = value
    return out


register_batch_fetcher(PointerTensor, _fetch_pointers)
