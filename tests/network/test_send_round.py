"""A round to several network workers sent from one thread (``Outbox.send_round``, used by ``one_round``).

Every request of the round is written before any reply is read, each with its destination's queued
prelude; a failure at one destination is that request's error while the others' replies still come
back in order, and the connections serve the next request.
"""

from __future__ import annotations

import pytest
import torch

import veil as sy
from veil.exceptions import ConnectionLostError, ObjectNotFoundError
from veil.messaging import messages as m
from veil.tensors.mpc_glue import runtime
from veil.workers.websocket_launcher import free_port
from tests.mpc.peer_fixtures import parties  # noqa: F401  (2 and 3 network parties, peer openings on)


@pytest.fixture
def net(connect_websocket):
    return connect_websocket("alice"), connect_websocket("bob"), connect_websocket("dave")


def _no_pool(monkeypatch):
    def refuse():
        raise AssertionError("a round to network workers went through the thread pool")

    monkeypatch.setattr(runtime, "_pool", refuse)


def test_shared_arithmetic_over_network_workers_sends_each_round_from_one_thread(net, hook, monkeypatch):
    alice, bob, cp = net
    _no_pool(monkeypatch)
    me = hook.local_worker
    rounds = []
    real = me.send_round
    monkeypatch.setattr(me, "send_round", lambda requests, post=None: rounds.append(len(requests)) or real(requests, post))
    x, y = torch.randn(6, 5), torch.randn(5, 3)
    sx = x.fix_precision().share(alice, bob, crypto_provider=cp)
    sy_ = y.fix_precision().share(alice, bob, crypto_provider=cp)
    prod = (sx @ sy_).get().float_precision()
    relu = torch.relu(sx).get().float_precision()
    assert torch.allclose(prod, x @ y, atol=1e-2)
    assert torch.allclose(relu, torch.relu(x), atol=1e-3)
    assert rounds and set(rounds) == {2}  # every opening: both parties' requests in one send_round


def test_one_failed_request_is_its_own_error_and_the_other_reply_comes_back(net, hook):
    alice, bob, _ = net
    me = hook.local_worker
    x = torch.arange(4.0).send(alice)
    replies, errors = me.send_round([(m.GetObjectsMessage([x.id_at_location], delete=False), alice),
                                     (m.GetObjectsMessage([987654321], delete=False), bob)])
    assert torch.equal(replies[0].objects[0], torch.arange(4.0)) and replies[1] is None
    assert [k for k, _ in errors] == [1] and isinstance(errors[0][1], ObjectNotFoundError)
    # both connections serve the next requests, in either order
    replies, errors = me.send_round([(m.GetObjectsMessage([x.id_at_location], delete=False), alice),
                                     (m.SearchMessage(["nothing-tagged-so"]), bob)])
    assert errors == [] and torch.equal(replies[0].objects[0], torch.arange(4.0))
    assert torch.equal(x.get(), torch.arange(4.0))


def test_a_failed_deferred_command_fails_its_request_only_and_its_results_are_lost(net, hook):
    alice, bob, _ = net
    me = hook.local_worker
    a, b = torch.ones(3).send(alice), torch.ones(3).send(bob)
    me.defer_command(alice, m.CommandMessage("torch.add", (m.ObjectRef(123456789),), {}, [555000111], True))
    me.defer_command(bob, m.CommandMessage("torch.add", (m.ObjectRef(b.id_at_location), 1.0), {}, [555000222], True))
    replies, errors = me.send_round([(m.GetObjectsMessage([a.id_at_location], delete=False), alice),
                                     (m.GetObjectsMessage([555000222], delete=False), bob)])
    assert [k for k, _ in errors] == [0] and isinstance(errors[0][1], ObjectNotFoundError)
    assert "deferred command 'torch.add'" in str(errors[0][1])
    assert torch.equal(replies[1].objects[0], torch.full((3,), 2.0))  # bob's deferred add ran before its read
    with pytest.raises(ObjectNotFoundError, match="never created"):
        me.check_lost(alice, [555000111])
    assert torch.equal(a.get(), torch.ones(3))  # alice still serves this session


def test_an_unreachable_worker_fails_its_request_only(net, hook):
    alice, _, _ = net
    me = hook.local_worker
    gone = sy.WebsocketClientWorker(hook, id="gone", host="127.0.0.1", port=free_port(), token="t", timeout=5,
                                    lazy=True)  # (connects at its first request: refused there)
    x = torch.arange(3.0).send(alice)
    try:
        replies, errors = me.send_round([(m.GetObjectsMessage([x.id_at_location], delete=False), alice),
                                         (m.SearchMessage([]), gone)])
    finally:
        gone.close()
    assert torch.equal(replies[0].objects[0], torch.arange(3.0))
    assert [k for k, _ in errors] == [1] and isinstance(errors[0][1], (ConnectionLostError, OSError))
    assert torch.equal(x.get(), torch.arange(3.0))


def test_large_replies_of_every_alignment_come_back_on_either_path(net, hook):
    """A large reply is read into a buffer of its own (a view of an OwnedBuffer: its tensor bytes
    padded to a 16-byte boundary): one trailing size-1 dimension more makes the reply's header a byte
    longer, so 16 shapes give every padding, 0 included (whose reply came back as the OwnedFrame itself, which
    the synchronous path took for a text frame: 4033a3a to this fix)."""
    alice, bob, _ = net
    me = hook.local_worker
    for d in range(16):
        t = torch.randn(300000, *([1] * d))  # (1.2 MB: fragmented, so always read into a buffer of its own)
        p, q = t.send(alice), (t + 1).send(bob)
        assert torch.equal(p.copy().get(), t)  # send_msg: the synchronous path
        replies, errors = me.send_round([(m.GetObjectsMessage([p.id_at_location]), alice),
                                         (m.GetObjectsMessage([q.id_at_location]), bob)])
        p.mark_freed(), q.mark_freed()
        assert errors == [] and torch.equal(replies[0].objects[0], t) and torch.equal(replies[1].objects[0], t + 1)


def test_a_queue_longer_than_one_frame_takes_goes_ahead_in_parts_and_the_round_still_runs(net, hook, monkeypatch):
    """More deferred commands than a worker takes in front of one request: the excess goes first in
    requests of its own (as send_msg does), then the round's request with the rest; both parties answer."""
    from veil.workers import outbox

    alice, bob, _ = net
    me = hook.local_worker
    monkeypatch.setattr(outbox, "MAX_PRELUDE_ITEMS", 2)
    a, b = torch.ones(3).send(alice), torch.ones(3).send(bob)
    ids = [555100000 + k for k in range(5)]
    for k, oid in enumerate(ids):
        me.defer_command(alice, m.CommandMessage("torch.add", (m.ObjectRef(a.id_at_location), float(k)), {}, [oid],
                                                 True))
    replies, errors = me.send_round([(m.GetObjectsMessage(ids, delete=False), alice),
                                     (m.GetObjectsMessage([b.id_at_location], delete=False), bob)])
    assert errors == []
    assert [t.tolist() for t in replies[0].objects] == [[1.0 + k] * 3 for k in range(5)]
    assert torch.equal(replies[1].objects[0], torch.ones(3))


def test_a_split_queue_does_not_hold_a_peer_round(parties, connect_websocket, monkeypatch):  # noqa: F811
    """A party whose queue is split sends its excess first (a request of its own, answered at once), not
    the round's request synchronously: that waited for the other parties' shares before their requests
    were even sent (a peer round stalled for the parties' whole wait)."""
    from veil.workers import outbox

    monkeypatch.setattr(outbox, "MAX_PRELUDE_ITEMS", 1)  # every queue of two items or more is split
    x, y = torch.randn(5, 4), torch.randn(4, 3)
    cp = connect_websocket("dave")
    sx = x.fix_precision().share(*parties, crypto_provider=cp)
    sy_ = y.fix_precision().share(*parties, crypto_provider=cp)
    assert torch.allclose((sx @ sy_).get().float_precision(), x @ y, atol=1e-2)
    assert torch.allclose(torch.relu(sx).get().float_precision(), torch.relu(x), atol=1e-3)
