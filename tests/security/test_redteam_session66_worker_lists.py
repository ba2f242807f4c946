"""Red team (session 66): worker functions given one object many times in their argument lists.

Target: the per-entry work a worker function's arguments cost before and while it runs, with one object named many
times (``--max-command-seconds`` 1 s, no session quota: the deadline is what bounds a command there).

Holes found:
* The handler gives a worker function copies of the owner's tensors, one per *occurrence*: the owner's 1 MB dataset
  named 2000 times in ``veil.plan.load_state``'s ``values`` was cloned 2000 times (2 GB) before the function ran
  (~12 s holding the worker's turn, past the 1 s deadline; nothing checkpoints there), and under a quota the copies
  were charged per occurrence (an honest ``load_state([a, b], [owner, owner])`` refused). Fixed in
  ``owner_guard.copy_protected_args``: each distinct tensor is copied, and charged, once per request.
* ``veil.plan.load_state`` copied value into state once per entry, without a checkpoint: one 4 MB tensor named
  20000 times held the turn ~80 s past the 1 s deadline. Fixed: each state storage is named once (the work is then
  at most what the session's own tensors hold) and each copy is preceded by a checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.messaging import messages as m
from veil.workers import owner_guard
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import uid  # noqa: E402
from server_sessions import answers_next_command, open_session, request, send_tensor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

SCI = "rt66-lists-scientist-token-0123456789abcdef"
N = 250_000  # a 1 MB float32 tensor


def _worker(hook, quota=None):
    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    srv = WebsocketServerWorker(hook, id=uid("rt66-lists"), port=0, tokens=tokens, max_command_seconds=1.0)
    srv.monitor.max_session_bytes = quota
    return srv, open_session(srv, SCI)


def _load_state(srv, s, state, values):
    return request(srv, s, m.CommandMessage("veil.plan.load_state", ([m.ObjectRef(i) for i in state],
                                                                      [m.ObjectRef(i) for i in values]), {}, [], False))


def test_owner_data_named_many_times_is_copied_once(hook):
    """Attack: the owner's dataset named 2000 times in one argument list (2 GB of copies, ~12 s, past the 1 s
    deadline). Must hold: one copy is made (counted by the copies the handler hands the function); the command
    answers its own one-line error (2000 values for 1 state tensor) and the worker serves the next command."""
    srv, s = _worker(hook)
    data = srv.load(torch.arange(N, dtype=torch.float32), tags=("#rt66",))
    mine = send_tensor(srv, s, torch.zeros(N))
    made_counts = []
    real = owner_guard.copy_protected_args

    def counting(value, protected, made=None, memo=None):
        out = real(value, protected, made, memo)
        made_counts.append(len(made) if made is not None else None)
        return out

    owner_guard.copy_protected_args = counting
    try:
        reply = _load_state(srv, s, [mine], [data] * 2000)
    finally:
        owner_guard.copy_protected_args = real
    assert type(reply) is m.ErrorReply and "\n" not in reply.message, reply
    assert made_counts and max(made_counts) == 1, made_counts
    answers_next_command(srv, s)


def test_owner_data_named_twice_is_charged_once_under_a_quota(hook):
    """The honest side of the same fix: ``load_state([a, b], [owner, owner])`` in a session holding 2 MB under a
    3.5 MB quota needs one 1 MB copy (it was charged two and refused). Must hold: it runs, and both state tensors
    hold torch's values of the owner's data."""
    srv, s = _worker(hook, quota=3_500_000)
    values = torch.arange(N, dtype=torch.float32)
    data = srv.load(values.clone(), tags=("#rt66",))
    a, b = send_tensor(srv, s, torch.zeros(N)), send_tensor(srv, s, torch.zeros(N))
    reply = _load_state(srv, s, [a, b], [data, data])
    assert type(reply) is m.OkReply, reply
    got = request(srv, s, m.GetObjectsMessage([a, b], False, None)).objects
    assert all(torch.equal(g, values) for g in got)


def test_load_state_names_each_state_tensor_once(hook):
    """Attack: one 4 MB tensor named 20000 times as state (value copied per entry, no checkpoint: ~80 s past a
    1 s deadline), and the same through two views of its storage. Must hold: refused in one line before any copy;
    the worker serves the next command; an honest load (distinct tensors) loads torch's values."""
    srv, s = _worker(hook)
    big, src = send_tensor(srv, s, torch.zeros(10**6)), send_tensor(srv, s, torch.ones(10**6))
    reply = _load_state(srv, s, [big] * 20000, [src] * 20000)
    assert type(reply) is m.ErrorReply and "named twice" in reply.message and "\n" not in reply.message, reply
    view = request(srv, s, m.CommandMessage("Tensor.view", (m.ObjectRef(big), [-1]), {}, [7_660_001], False))
    assert type(view) is m.OkReply, view
    reply = _load_state(srv, s, [big, 7_660_001], [src, src])
    assert type(reply) is m.ErrorReply and "named twice" in reply.message, reply
    assert torch.equal(request(srv, s, m.GetObjectsMessage([big], False, None)).objects[0], torch.zeros(10**6))
    answers_next_command(srv, s)
    x, y = send_tensor(srv, s, torch.zeros(3)), send_tensor(srv, s, torch.zeros(2))
    vx, vy = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])
    reply = _load_state(srv, s, [x, y], [send_tensor(srv, s, vx), send_tensor(srv, s, vy)])
    assert type(reply) is m.OkReply, reply
    got = request(srv, s, m.GetObjectsMessage([x, y], False, None)).objects
    assert torch.equal(got[0], vx) and torch.equal(got[1], vy)
