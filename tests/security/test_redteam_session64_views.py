"""A stored view that stands for more entries than its storage holds (``Tensor.expand`` of one element to
N x N: charged its 256 bytes of storage) leaving the worker whole: a .get() encoded 64 MiB for a session
under a 1 MiB quota, a move sent it to the destination in full (red team, session 64; the same class as
the protocol steps in test_redteam_session64_mpc.py). Must hold: refused before it is encoded, in one line,
with nothing lost; a view within the room and a plain tensor still go; the worker still serves."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import answers_next_command, computed, open_session, quota_worker, request, send_tensor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

TOKEN = "rs64-views-token-0123456789abcdef"
QUOTA = 1 << 20


@pytest.fixture
def served(hook):
    srv = quota_worker(hook, f"rs64-views-{secrets.token_hex(3)}", TOKEN, QUOTA)
    s = open_session(srv, TOKEN)
    one = m.ObjectRef(send_tensor(srv, s, torch.ones(1, 1)))
    return srv, s, one


def _refused_over_quota(reply) -> None:
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert "\n" not in reply.message.strip()


def test_a_get_of_an_expanded_view_past_the_room_is_refused_before_it_is_encoded(served):
    srv, s, one = served
    big = computed(srv, s, "Tensor.expand", one, 1024, 1024)  # 4 MiB of float32 entries, 256 bytes charged
    held = srv.monitor.session_bytes(s.id)
    _refused_over_quota(request(srv, s, m.GetObjectsMessage([big.id], False, None)))
    assert srv.monitor.session_bytes(s.id) == held  # nothing lost: the view is still there
    small = computed(srv, s, "Tensor.expand", one, 64, 64)  # 16 KiB: within the room
    reply = request(srv, s, m.GetObjectsMessage([small.id, one.id], False, None))
    assert type(reply) is m.ObjectsReply, reply
    assert torch.equal(reply.objects[0], torch.ones(64, 64)) and torch.equal(reply.objects[1], torch.ones(1, 1))
    answers_next_command(srv, s)


def test_a_move_of_an_expanded_view_past_the_room_is_refused_before_it_is_sent(served):
    srv, s, one = served
    big = computed(srv, s, "Tensor.expand", one, 1024, 1024)
    _refused_over_quota(request(srv, s, m.MoveMessage([big.id], "elsewhere", [new_id()])))
    reply = request(srv, s, m.GetObjectsMessage([one.id], False, None))  # still stored, still served
    assert type(reply) is m.ObjectsReply and torch.equal(reply.objects[0], torch.ones(1, 1)), reply
    answers_next_command(srv, s)


def test_wrapped_and_sparse_tensors_are_left_to_their_own_sizing(hook):
    """``amplified_bytes`` reads the storage of dense tensors of their own data only: a pointer (a stored pointer
    chain, which refuses ``untyped_storage``: a get of one failed under a quota), a fixed-point or shared wrapper
    (its data is its children's) and a sparse tensor count nothing; plain tensors and parameters count as before."""
    import veil as sy
    from veil.workers.output_bounds import amplified_bytes

    bob = sy.VirtualWorker(hook, id=f"rs64-bob-{secrets.token_hex(3)}")
    pointer = torch.ones(3).send(bob)
    wrapped = torch.ones(4).fix_precision()
    assert amplified_bytes([pointer, torch.ones(2)]) == 0
    assert amplified_bytes([wrapped, wrapped]) == 0
    assert amplified_bytes([torch.ones(3).to_sparse()] * 2) == 0
    assert amplified_bytes([torch.ones(1, 1).expand(10, 10)]) == 100 * 4 - 4
    assert amplified_bytes([torch.nn.Parameter(torch.ones(3))] * 3) == 2 * 3 * 4
    col, row = torch.ones(8, 1), torch.ones(1, 8)
    assert amplified_bytes([col, row]) == 64 * 4 - 8 * 4
    x = torch.ones(6, 6)
    assert amplified_bytes([x[:3], x[3:], x.t()]) == 36 * 4  # slices of one storage; its transpose is named again
