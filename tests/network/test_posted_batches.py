"""Full batches of deferred commands are posted to a network worker without waiting (issue 19).

The client builds the next batch while the worker runs the posted one; at most one batch is in
flight per worker, and its reply is read (its failure raised, naming the op) before anything else
goes there. Results must be exactly those of plain PyTorch, and a failure must surface at the
next synchronization with the ids it never stored remembered as lost.
"""

import pytest
import torch

from veil.exceptions import ObjectNotFoundError
from veil.workers import outbox

from network_helpers import base_args


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(outbox, "PRELUDE_LIMIT", 8)  # a batch is posted every 8 deferred commands


def test_posted_batches_give_plain_pytorch_results(plain_worker, connect, small_batches):
    wp = plain_worker
    alice = connect(wp)
    me = alice.hook.local_worker
    x = torch.randn(4, 3)
    p, acc = x.send(alice), x.clone()
    for i in range(50):  # several posted batches, each depending on the one before
        p = p * 1.01 + i
        acc = acc * 1.01 + i
    assert id(alice) in me._in_flight  # a batch is still on its way
    assert torch.allclose(p.get(), acc)
    assert not me._in_flight


def test_a_posted_batch_failure_surfaces_at_the_next_request_and_its_results_are_lost(plain_worker, connect, small_batches):
    wp = plain_worker
    alice = connect(wp)
    me = alice.hook.local_worker
    a, b = torch.ones(2, 3).send(alice), torch.ones(5, 7).send(alice)
    alice.flush()
    bad = torch.ones(2, 3).send(alice)
    alice.flush()
    bad.__dict__["_meta"] = ((5, 7), torch.float32, False)  # the client believes a shape the worker does not have
    ok = [a + 1 for _ in range(3)]
    broken = b @ bad.t()  # shapes agree here, not on the worker: fails there
    after = [broken + 1 for _ in range(8)]  # fills the batch: posted, nothing raised yet
    assert id(alice) in me._in_flight
    with pytest.raises(Exception) as raised:
        alice.flush()
    assert "deferred command" in str(raised.value)
    assert not me._in_flight
    assert torch.equal(ok[0].get(), torch.full((2, 3), 2.0))  # commands before the failure ran
    with pytest.raises(ObjectNotFoundError, match="never created"):
        after[-1].get()


def test_the_connection_stays_usable_after_posted_batches(plain_worker, connect, small_batches):
    wp = plain_worker
    alice = connect(wp)
    p = torch.zeros(3).send(alice)
    for _ in range(20):
        p = p + 1
    alice._keepalive()  # the keepalive thread reads the posted reply instead of dropping it
    assert alice.connected
    assert torch.equal(p.get(), torch.full((3,), 20.0))


def test_a_worker_gone_with_a_batch_in_flight_is_a_lost_connection_and_lost_results(spawn, connect, small_batches):
    from veil.exceptions import ConnectionLostError

    wp = spawn("alice", base_args())
    alice = connect(wp)
    me = alice.hook.local_worker
    p = torch.zeros(3).send(alice)
    alice.flush()
    wp.kill()
    outs = []
    with pytest.raises(ConnectionLostError, match="alice"):
        for i in range(8):  # a full batch: posted (the write itself may fail already, or succeed)
            outs.append(p + i)
        alice.flush()  # its reply never comes
    assert not me._in_flight
    with pytest.raises((ObjectNotFoundError, ConnectionLostError)):
        outs[0].get()
    for q in (p, *outs):
        q.mark_freed()
