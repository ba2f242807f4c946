"""What the autograd-quota red teams share: an in-process worker with a 1 MiB session quota, the attacking session
and a second one beside it, grad-tracked commands sent through the request path, the quota's one-line refusal,
and the bytes an autograd graph saves (test_redteam_grad_charges.py and its second pass)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.serde import deserialize, serialize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
from network_helpers import TOKEN, get_as, in_process_server  # noqa: E402

R = m.ObjectRef
SUM, MUL = (ALLOWLIST.by_func(f).name for f in (torch.Tensor.sum, torch.mul))
QUOTA = 2**20


def send(server, session, op, args, ids, kwargs=None):
    """The reply to ``op(*args, **kwargs)`` run with grad tracking, its results stored under ``ids``."""
    msg = m.CommandMessage(op, args, kwargs or {}, ids, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's own warning of create_graph's reference cycle)
        return deserialize(server.serve_bytes(serialize(msg, sender="f"), session))[0]


def ok(server, session, op, args, ids, kwargs=None):
    """As :func:`send`, which must succeed."""
    reply = send(server, session, op, args, ids, kwargs)
    assert reply == m.OkReply(), reply
    return reply


def quota_refusal(reply) -> None:
    """The quota's refusal, in one line."""
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert "\n" not in reply.message


def delete(server, session, ids) -> None:
    assert deserialize(server.serve_bytes(serialize(m.DeleteMessage(ids), sender="f"), session))[0] == m.OkReply()


def quota_server(hook, name, quota=QUOTA):
    """A worker with a ``quota``-byte session quota, the attacking session, and a second session beside it."""
    from veil.workers.websocket_auth import authenticate

    server, tokens, session = in_process_server(hook, name)
    server.monitor.max_session_bytes = quota
    other = authenticate(tokens, [TOKEN])
    server.sessions[other.id] = other
    return server, session, other


def still_serves(server, other) -> None:
    """Another session computes and gets its values as torch gives them."""
    ok(server, other, "torch.ones", (4,), [9001])
    ok(server, other, MUL, (R(9001), 3.0), [9002])
    assert torch.equal(get_as(server, other, 9002), torch.full((4,), 3.0))


def saved_bytes(*tensors) -> int:
    """Bytes of the distinct storages the autograd graphs of ``tensors`` save (walked node by node)."""
    storages, seen = {}, set()
    todo = [t.grad_fn for t in tensors if t is not None and t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                if isinstance(value, torch.Tensor) and value.layout is torch.strided:
                    storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        todo += [child for child, _ in node.next_functions]
    return sum(storages.values())


def tracked(server, s, oid: int, n: int) -> torch.Tensor:
    """A tracked (non-leaf) ``n``-element tensor under ``oid``: ``x.expand(n) * 1`` of a 1-element leaf."""
    ok(server, s, "torch.zeros", (1,), [oid + 1])
    ok(server, s, "Tensor.requires_grad_", (R(oid + 1),), [0])
    ok(server, s, "Tensor.expand", (R(oid + 1), [n]), [oid + 2])
    ok(server, s, MUL, (R(oid + 2), 1.0), [oid])
    return server.monitor.owner_objects()[oid]
