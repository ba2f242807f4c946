"""Red team (session 66): the Python-number and list overloads of the share ops' packets on the worker allowlist.

Target: ``veil/mpc/wire_ops.py`` allowlists every overload of the aten packets a worker runs on shares (``mul``,
``add``, ``sub``, ``sum``...). That took in overloads that compute on no tensor at all: ``aten.mul.left_t`` /
``aten.mul.right_`` (a Python list repeated ``n`` times, ``n`` the requester's), ``aten.add.str``,
``aten.sum.int``, ``aten.mul.int`` and 33 more. The lead: a list of any length built on a handler thread (the inline
lane sends these ops there, ``inline_work_rules.NEVER``), memory exhaustion of the worker.

What was tried: ``left_t`` / ``right_`` with lists of ints, floats, bools, strings, tensors, nested lists, None,
tuples, stored objects, and the empty list with ``n = 10^9``. torch 2.13's Python binding cannot convert any element
to the schema's type variable ``t`` ("toIValue() cannot handle converting to type: t"), and the empty list stays
empty: no list was built, so no exhaustion with this torch. The other overloads return a Python number or string
that the handler drops ("returned 0 tensors"); none read a hidden value (a stored tensor converted to an int is an
``.item()``, which the oblivious guard refuses). Hardened anyway at the allowlist, the depth where the class ends:
only overloads that take and return tensors are ops on ring elements, so no requester-sized list op (today's or one
a later torch makes callable) reaches a worker. Each such request is now one line ("not in the worker's
allowlist"), and nothing runs.

Harness: a ``WebsocketServerWorker`` in process, requests through ``serve_bytes``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.mpc.wire_ops import REGISTERED
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import uid  # noqa: E402
from server_sessions import open_session, request, send_tensor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

SCI = "rt66s-scientist-token-0123456789abcdef0123"


@pytest.fixture
def worker(hook):
    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    srv = WebsocketServerWorker(hook, id=uid("rt66s"), port=0, tokens=tokens)
    return srv, open_session(srv, SCI)


def _is_op_on_tensors(func) -> bool:
    schema = func._schema
    return any("Tensor" in str(a.type) for a in schema.arguments) and \
        any("Tensor" in str(r.type) for r in schema.returns)


def test_every_allowlisted_aten_overload_takes_and_returns_tensors():
    """The class: no allowlisted aten overload computes on Python numbers, strings or lists alone (a share op
    is an op on ring elements), so none builds what a requester's count says."""
    for name in REGISTERED:
        _, packet, overload = name.split(".")
        assert _is_op_on_tensors(getattr(getattr(torch.ops.aten, packet), overload)), name
    for op in ALLOWLIST._by_name.values():
        if isinstance(op.func, torch._ops.OpOverload):
            assert _is_op_on_tensors(op.func), op.name
    assert "aten.mul.Tensor" in REGISTERED and "aten.sum.default" in REGISTERED and "aten.add.Scalar" in REGISTERED


@pytest.mark.parametrize("op,args", [
    ("aten.mul.left_t", ([], 10**9)),
    ("aten.mul.left_t", ([1], 10**9)),
    ("aten.mul.right_", (10**9, [1.0])),
    ("aten.add.t", ([1], [2])),
    ("aten.add.str", ("a" * 1000, "b")),
    ("aten.sum.int", ([1, 2, 3],)),
    ("aten.mul.int", (10**18, 10**18)),
    ("aten.add.default", (1, 2)),
])
def test_a_list_or_number_overload_is_refused_in_one_line_and_the_worker_serves(worker, op, args):
    """Attack: a list repeated 10^9 times (``left_t`` / ``right_``) and the other number, string and list
    overloads, as a command with and without a result id. Must hold: one line naming the op as not allowlisted,
    nothing stored; a share op (``aten.mul.Tensor``) on a stored int64 tensor still gives torch's value."""
    srv, s = worker
    for ids in ([], [new_id()]):
        reply = request(srv, s, m.CommandMessage(op, args, {}, ids, False))
        assert type(reply) is m.ErrorReply and reply.error == "OperationNotAllowedError", reply
        assert "not in the worker's allowlist" in reply.message and "\n" not in reply.message, reply
        for oid in ids:
            assert type(request(srv, s, m.GetObjectsMessage([oid], False, None))) is m.ErrorReply
    x = torch.tensor([3, -4, 2**40])
    xid = send_tensor(srv, s, x)
    rid = new_id()
    reply = request(srv, s, m.CommandMessage("aten.mul.Tensor", (m.ObjectRef(xid), 7), {}, [rid], False))
    assert type(reply) is m.OkReply, reply
    assert torch.equal(request(srv, s, m.GetObjectsMessage([rid], False, None)).objects[0], x * 7)
