"""A key of the whole computation behind a derived value, for matching a release request to what is released.

A request matches a later object only while its bytes and its computation are as filed
(:func:`veil.governance.release.decide`); the computation was compared as the owner reads it, and that text
leaves values out: a scientist's tensor shows as its shape, a long list or string is cut, a plan's constants
show as ``tensor[shape]``. Recomputing ``d > t`` under the same id with another ``t`` read as the same
computation, so the answer (the same pending request, or a new one) told whether the new bytes equalled the
filed ones: an equality oracle on data under review, no approval needed. Each node now carries a key: a hash of
its op, its full arguments (tensors by their bytes) and its inputs' keys (a scientist's tensor by its bytes, a
dataset by its tags, description, shape and dtype, a received object by its bytes), so two computations that
differ anywhere differ in the root's key, and the same computation redone (after a restart too) has the same one.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

#: characters of a key (hex of SHA-256, cut: collisions need 2^64 tries)
KEY_CHARS = 32


def _hash(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()[:KEY_CHARS]


def content_key(obj: Any) -> str:
    """A stored value by its bytes (the request digest: tensors as released, other objects as encoded)."""
    from veil.governance.requests import digest

    return digest(obj)[:KEY_CHARS]


def args_key(args: tuple, kwargs: dict, positions: dict) -> str:
    """The command's arguments in full: a stored input by its position (its key comes with the input), a tensor
    written in the command by its bytes, anything else by its repr (never cut)."""
    def one(v: Any) -> str:
        if id(v) in positions:
            return f"<input {positions[id(v)]}>"
        if isinstance(v, torch.Tensor):
            return f"<tensor {content_key(v)}>"
        if isinstance(v, (list, tuple)):
            return ("[" if isinstance(v, list) else "(") + ", ".join(one(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k!r}: {one(x)}" for k, x in v.items()) + "}"
        return f"{type(v).__name__}:{v!r}"

    return _hash(one(tuple(args)), one(dict(kwargs)))


def node_key(node: dict, graph: dict) -> str:
    """A node's key from its own op, arguments and content, and its inputs' keys (a Merkle hash of the graph)."""
    inputs = [str(graph.get(i, {}).get("key")) for i in node.get("inputs", [])]
    # a dataset by what the owner loaded it as (tags, description, shape, dtype), not by its id: a worker that
    # loads the same files after a restart gives them new ids, and an approval must outlive the restart (other
    # data under the same name releases nothing unless its result has the approved bytes too)
    origin = (f"{node.get('label')}|{node.get('shape')}|{node.get('dtype')}" if node.get("op") == "dataset"
              else str(node.get("source", "")))
    return _hash(str(node.get("op")), str(node.get("args_key", node.get("args", ""))), str(node.get("content", "")),
                 origin, *inputs)
