"""Red team (session 66): requests that make a tensor per piece, as many as a shape or an argument says.

Found while fuzzing the party functions (lead 3): a command's results are counted only once the op ran ("returned
N tensors but the caller expected 1"), and the quota sizes bytes, which an empty tensor has none of. Every result
tensor costs the worker ~600 bytes of host memory and ~1.5 us whatever it holds. Measured (one in-process worker,
1 MiB session quota):

* ``Tensor.split(1)`` / ``Tensor.unbind()`` of a (2*10^6, 0) tensor (sent in a few bytes): 2*10^6 tensors, 1.2 GB
  and 9 s before the id-count error; ``torch.chunk(empty, n)`` returns ``n`` tensors whatever ``n``. Linear in a
  number the requester writes: 10^9 kills the worker for everyone, quota or not.
* ``veil.mpc.macc_unstack`` of limbs of shape (2*10^6, 0): 8*10^6 tensors, 4.6 GB, 19 s.
* ``veil.mpc.expand_material`` of 10^6 items of empty fields: 3*10^6 tensors, 1.2 GB, 34 s under the 1 MiB quota
  (its room check charged 8 bytes per element: 0 for an empty field).
* ``veil.mpc.product_pieces`` with 10^6 empty slices: 10^6 tensors (message-sized); ``veil.mpc.fss_chunks`` with
  chunk size 1: a tensor per 8-byte entry.

Fixed where the class lives: ``output_bounds.check_pieces`` counts split/chunk/unbind results from shapes and public
arguments before the op runs and refuses more than the command's return ids (a plan op's result slots; 65536 when
the worker names the results), and under a quota charges each piece what the store charges a tensor; the dealing
room check charges every field at least that (``fss_dealing.field_bytes``); ``macc_unstack`` / ``macc_stack`` take at
most 16 values, ``product_pieces`` at most 4096 slices of each operand, ``fss_chunks`` at most 8192 chunks of each of
at most 17 values (the honest protocols' bounds). Each refusal is one line, before anything is made; the worker
still serves.

Harness: ``WebsocketServerWorker`` in process (requests through ``serve_bytes``). The attack sizes are kept small
(2*10^5 pieces, ~150 MB if it ran) so that the file is safe on the code before the fix, where it fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.prg import SEED_BYTES
from veil.plans.ops import PlanOp, PlanSpec, SlotRef
from veil.workers import output_bounds
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import uid  # noqa: E402
from server_sessions import open_session, request, send_tensor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

SCI = "rt66p-scientist-token-0123456789abcdef0123"
N = 200_000  # pieces an attack asks for (the fix refuses them before any is made)


def _worker(hook, quota: int | None):
    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    srv = WebsocketServerWorker(hook, id=uid("rt66p"), port=0, tokens=tokens)
    srv.monitor.max_session_bytes = quota
    return srv, open_session(srv, SCI)


@pytest.fixture(params=[None, 1 << 20], ids=["no-quota", "quota"])
def worker(hook, request):
    return _worker(hook, request.param)


def _cmd(srv, s, op, *args, ids=None, **kwargs):
    ids = [new_id()] if ids is None else ids
    return request(srv, s, m.CommandMessage(op, args, kwargs, ids, False)), ids


def _get(srv, s, ids):
    got = request(srv, s, m.GetObjectsMessage(ids, False, None))
    assert type(got) is m.ObjectsReply, got
    return got.objects


def _still_serves(srv, s) -> None:
    x = torch.tensor([[1.5, -2.0], [3.0, 4.0]])
    xid = send_tensor(srv, s, x)
    reply, ids = _cmd(srv, s, "Tensor.unbind", m.ObjectRef(xid), ids=[new_id(), new_id()])
    assert type(reply) is m.OkReply, reply
    for got, want in zip(_get(srv, s, ids), torch.unbind(x)):
        assert torch.equal(got, want)


def _refused_in_one_line(reply, *words) -> None:
    assert type(reply) is m.ErrorReply, reply
    assert "\n" not in reply.message and all(w in reply.message for w in words), reply.message


# ------------------------------------------------------------------ torch ops: a tensor per piece

EMPTY = torch.zeros(N, 0)


@pytest.mark.parametrize("op,args,kwargs", [
    ("Tensor.unbind", (EMPTY,), {}),
    ("torch.unbind", (EMPTY, 0), {}),
    ("aten.unbind.int", (EMPTY, 0), {}),
    ("Tensor.split", (EMPTY, 1), {}),
    ("torch.split", (EMPTY,), {"split_size_or_sections": 1}),
    ("aten.split.Tensor", (EMPTY, 1), {}),
    ("torch.chunk", (torch.zeros(0), N), {}),
    ("Tensor.chunk", (torch.zeros(3, 0), N), {"dim": 1}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_piece_op_never_makes_more_tensors_than_its_command_names(worker, op, args, kwargs):
    """Attack: N = 2*10^5 pieces of a tensor holding no byte (sent in a few bytes), with one return id, with none
    (results dropped) and with ids None (the worker names them: N > 65536). Before: every piece made (the
    count checked after; 10^9 kills the worker). Must hold: refused before it runs, one line naming the op and
    the count; nothing stored; the worker still serves (an honest unbind gives torch's pieces)."""
    srv, s = worker
    for ids in ([new_id()], [], None):
        msg = m.CommandMessage(op, args, kwargs, ids, False)
        reply = request(srv, s, msg)
        _refused_in_one_line(reply, op, f"would return {N} tensors", "refused before it runs")
        for oid in ids or ():
            assert type(request(srv, s, m.GetObjectsMessage([oid], False, None))) is m.ErrorReply
    _still_serves(srv, s)


def test_a_plan_op_never_makes_more_tensors_than_its_result_slots(worker):
    """Attack: a plan whose one op unbinds its input into one result slot, run on a (2*10^5, 0) tensor. Must hold:
    refused before the op runs (one line); the same plan on a (1, 3) input gives torch's row."""
    srv, s = worker
    spec = PlanSpec("rt66-unbind", 1, 0, 2, [PlanOp("Tensor.unbind", (SlotRef(0),), {}, [1], False)], SlotRef(1))
    pid = new_id()
    assert type(request(srv, s, m.ObjectMessage([m.StoredObject(pid, spec)]))) is m.OkReply
    bad = send_tensor(srv, s, EMPTY)
    reply, _ = _cmd(srv, s, "veil.plan.run", m.ObjectRef(pid), [m.ObjectRef(bad)], [])
    _refused_in_one_line(reply, "in a plan", f"would return {N} tensors")
    good = send_tensor(srv, s, torch.tensor([[1.0, 2.0, 3.0]]))
    reply, (rid,) = _cmd(srv, s, "veil.plan.run", m.ObjectRef(pid), [m.ObjectRef(good)], [])
    assert type(reply) is m.OkReply, reply
    assert torch.equal(_get(srv, s, [rid])[0], torch.tensor([1.0, 2.0, 3.0]))
    _still_serves(srv, s)


def test_honest_pieces_are_torchs_and_each_is_charged_under_a_quota(hook):
    """The honest uses: unbind, split by a size and by sections, chunk, each with one return id per piece, equal to
    torch's; under a 1 MiB quota, 5000 pieces of nothing (each charged 256 bytes, as the store charges a tensor)
    are refused before they are made, and 100 fit."""
    srv, s = _worker(hook, 1 << 20)
    x = torch.arange(14.0).reshape(7, 2)
    xid = m.ObjectRef(send_tensor(srv, s, x))
    for op, args, want in (("Tensor.unbind", (xid,), torch.unbind(x)),
                           ("Tensor.split", (xid, 3), torch.split(x, 3)),
                           ("torch.split", (xid, [2, 5]), torch.split(x, [2, 5])),
                           ("Tensor.chunk", (xid, 3), torch.chunk(x, 3))):
        reply, ids = _cmd(srv, s, op, *args, ids=[new_id() for _ in want])
        assert type(reply) is m.OkReply, (op, reply)
        assert all(torch.equal(g, w) for g, w in zip(_get(srv, s, ids), want)), op
    many = m.ObjectRef(send_tensor(srv, s, torch.zeros(5000, 0)))
    reply, _ = _cmd(srv, s, "Tensor.unbind", many, ids=[new_id() for _ in range(5000)])
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    few = m.ObjectRef(send_tensor(srv, s, torch.zeros(100, 0)))
    reply, ids = _cmd(srv, s, "Tensor.unbind", few, ids=[new_id() for _ in range(100)])
    assert type(reply) is m.OkReply, reply
    assert output_bounds.pieces("Tensor.unbind", (torch.zeros(100, 0),), {}) == 100


# ------------------------------------------------------------------ protocol steps

def test_macc_unstack_and_stack_take_at_most_the_protocols_values(worker):
    """Attack: ``macc_unstack`` of 4 limbs of shape (2*10^5, 0) (4 tensors per row); ``macc_stack`` of 17 values.
    Must hold: refused before anything is made, one line; the honest unstack of 2 stacked values gives each row's
    limbs as torch indexes them."""
    srv, s = worker
    z = torch.zeros(N, 0, dtype=torch.int64)
    reply, _ = _cmd(srv, s, "veil.mpc.macc_unstack", [z, z, z, z])
    _refused_in_one_line(reply, "1 to 16 values")
    v = [torch.zeros(3, dtype=torch.int64)] * 4
    reply, _ = _cmd(srv, s, "veil.mpc.macc_stack", [v] * 17, ids=[new_id() for _ in range(4)])
    _refused_in_one_line(reply, "1 to 16 values")
    limbs = [torch.arange(6, dtype=torch.int64).reshape(2, 3) + 10 * k for k in range(4)]
    reply, ids = _cmd(srv, s, "veil.mpc.macc_unstack", limbs, ids=[new_id() for _ in range(8)])
    assert type(reply) is m.OkReply, reply
    got = _get(srv, s, ids)
    assert all(torch.equal(got[4 * j + k], limbs[k][j]) for j in range(2) for k in range(4))
    _still_serves(srv, s)


def test_fss_chunks_and_product_pieces_are_bounded_by_the_protocols_counts(worker):
    """Attack: ``fss_chunks`` of 10^4 entries in chunks of 1 entry, and of 18 values; ``product_pieces`` with 4097
    empty slices. Must hold: refused in one line before anything is cut; honest chunks equal torch's split."""
    srv, s = worker
    big = m.ObjectRef(send_tensor(srv, s, torch.zeros(10_000, dtype=torch.int64)))
    reply, _ = _cmd(srv, s, "veil.mpc.fss_chunks", [big], 1)
    _refused_in_one_line(reply, "at most 8192 chunks")
    small = m.ObjectRef(send_tensor(srv, s, torch.zeros(2, dtype=torch.int64)))
    reply, _ = _cmd(srv, s, "veil.mpc.fss_chunks", [small] * 18, 1)
    _refused_in_one_line(reply, "1 to 17 tensors")
    reply, _ = _cmd(srv, s, "veil.mpc.product_pieces", big, None, [[[0, 0, 0, 1]]] * 4097, [])
    _refused_in_one_line(reply, "at most 4096 slices")
    x = torch.arange(7, dtype=torch.int64)
    reply, ids = _cmd(srv, s, "veil.mpc.fss_chunks", [m.ObjectRef(send_tensor(srv, s, x))], 3,
                      ids=[new_id() for _ in range(3)])
    assert type(reply) is m.OkReply, reply
    assert all(torch.equal(g, w) for g, w in zip(_get(srv, s, ids), x.split(3)))
    _still_serves(srv, s)


def test_a_dealing_of_empty_fields_is_charged_per_field_before_it_is_expanded(hook):
    """Attack: ``expand_material`` of 10^5 truncation items of shape (0,) (3 * 10^5 empty tensors) under a 1 MiB quota.
    Before: charged 8 bytes per element, 0 here: every tensor made (~1.2 GB at 10^6 items). Must hold: refused by
    the quota before anything is expanded (each field charged 256 bytes, what the store charges a tensor); an
    honest dealing of 2 items within the room is stored."""
    from veil.mpc.providers.fss_dealing import MIN_FIELD_BYTES
    from veil.workers.quota import MIN_TENSOR_BYTES

    assert MIN_FIELD_BYTES == MIN_TENSOR_BYTES
    srv, s = _worker(hook, 1 << 20)
    seed_t = torch.arange(SEED_BYTES, dtype=torch.uint8)
    reply, _ = _cmd(srv, s, "veil.mpc.expand_material", seed_t, "truncation", [[0], 65536], 100_000, [])
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert "\n" not in reply.message
    reply, ids = _cmd(srv, s, "veil.mpc.expand_material", seed_t, "truncation", [[4], 65536], 2, [],
                      ids=[new_id() for _ in range(6)])
    assert type(reply) is m.OkReply, reply
    _still_serves(srv, s)
