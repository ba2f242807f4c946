"""Concurrent protocol rounds (veil.tensors.mpc_glue.runtime): every party's request in flight at once.

The parties here are in-process workers flagged ``concurrent_requests`` so the
runtime sends to them from its thread pool exactly as it does to network
workers; a barrier proves that a round's requests are really concurrent.
"""

from __future__ import annotations

import threading

import pytest
import torch

import veil as sy
from veil.exceptions import ConnectionLostError
from veil.messaging.serde import deserialize
from veil.mpc.errors import MPCError, PartyFailedError, PartyUnreachableError
from veil.mpc.party import OpenMessage
from veil.tensors.mpc_glue.runtime import one_round

from party_faults import is_open, lose_first_opening


class ConcurrentWorker(sy.VirtualWorker):
    concurrent_requests = True


@pytest.fixture
def parties(hook):
    alice, bob = ConcurrentWorker(hook, id="alice"), ConcurrentWorker(hook, id="bob")
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    return alice, bob, cp


def _shared(x, alice, bob, cp):
    return x.fix_precision().share(alice, bob, crypto_provider=cp)


def test_a_round_sends_to_every_party_at_once(parties, monkeypatch):
    alice, bob, cp = parties
    barrier = threading.Barrier(2, timeout=10)  # breaks unless both parties' openings are in flight together
    met = []
    for w in (alice, bob):
        real = w._recv_msg

        def recv(data, real=real):
            if is_open(data):
                barrier.wait()
                met.append(1)
            return real(data)

        monkeypatch.setattr(w, "_recv_msg", recv)
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    z = (_shared(x, alice, bob, cp) * _shared(y, alice, bob, cp)).get().float_precision()
    assert torch.allclose(z, x * y, atol=1e-3)
    assert len(met) >= 4  # beaver + truncation openings, each met by both parties


def test_a_lost_party_raises_a_clear_mpc_error_and_the_next_query_works(parties, monkeypatch):
    alice, bob, cp = parties
    x, y = torch.randn(5, 4), torch.randn(4, 2)
    sx, sy_ = _shared(x, alice, bob, cp), _shared(y, alice, bob, cp)
    lose_first_opening(monkeypatch, bob)
    with pytest.raises(MPCError, match="party 'bob' was lost during opening") as info:
        sx @ sy_
    assert isinstance(info.value, PartyUnreachableError) and isinstance(info.value, ConnectionLostError)
    # nothing half-done breaks the next computation on the same shares
    out = (sx @ sy_).get().float_precision()
    assert torch.allclose(out, x @ y, atol=1e-2)
    assert torch.allclose(torch.relu(sx - 0.1).get().float_precision(), torch.relu(x - 0.1), atol=1e-3)


def test_a_party_error_mid_round_is_its_own_error_and_the_next_query_works(parties, monkeypatch):
    alice, bob, cp = parties
    x = torch.randn(6)
    sx = _shared(x, alice, bob, cp)
    real = alice._recv_msg
    fail = {"open": True}

    def refusing(data):
        if fail["open"] and is_open(data):
            fail["open"] = False
            msg, sender, prelude = deserialize(data)
            bad = OpenMessage("not_a_step", msg.args, msg.kwargs)  # the party refuses this step
            from veil.messaging.serde import serialize

            return real(serialize(bad, sender=sender, prelude=prelude))
        return real(data)

    monkeypatch.setattr(alice, "_recv_msg", refusing)
    with pytest.raises(MPCError, match="not an openable protocol step"):
        sx * sx
    assert torch.allclose((sx * sx).get().float_precision(), x * x, atol=1e-3)


def test_unexpected_local_failures_become_party_failed_errors(parties):
    alice, bob, _ = parties

    class Broken:
        id = "carol"
        concurrent_requests = True

    owner = alice.hook.local_worker
    with pytest.raises(PartyFailedError, match="party 'carol' failed during a test round"):
        one_round([(owner, sy.messaging.messages.DeleteMessage([]), alice),
                   (owner, sy.messaging.messages.DeleteMessage([]), Broken())], "a test round")
    replies = one_round([(owner, sy.messaging.messages.DeleteMessage([]), bob),
                         (owner, sy.messaging.messages.DeleteMessage([]), Broken())], "a test round",
                        return_errors=True)
    assert isinstance(replies[1], Exception) and not isinstance(replies[0], Exception)


def test_three_parties_over_concurrent_rounds_match_torch(hook):
    a, b, c = (ConcurrentWorker(hook, id=n) for n in ("alice", "bob", "charlie"))
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    x, w = torch.randn(3, 8), torch.randn(8, 4)
    sx = x.fix_precision().share(a, b, c, crypto_provider=cp)
    sw = w.fix_precision().share(a, b, c, crypto_provider=cp)
    out = torch.relu(sx @ sw).get().float_precision()
    assert torch.allclose(out, torch.relu(x @ w), atol=1e-2)


def test_deliver_sends_a_dealers_messages_in_one_round(parties, monkeypatch):
    from veil.messaging import messages as m
    from veil.mpc.runtime import deliver
    from veil.workers.monitor import DEALER_TAG

    alice, bob, cp = parties
    barrier = threading.Barrier(2, timeout=10)
    for w in (alice, bob):
        real = w._recv_msg

        def recv(data, real=real):
            if type(deserialize(data)[0]) is m.ObjectMessage:
                barrier.wait()
            return real(data)

        monkeypatch.setattr(w, "_recv_msg", recv)
    pieces = [torch.arange(3), torch.arange(3) * 2]
    deliver([(cp, m.ObjectMessage([m.StoredObject(10 + k, t, (DEALER_TAG,))]), w)
             for k, (w, t) in enumerate(zip((alice, bob), pieces))])
    assert len(alice.monitor) == 1 and len(bob.monitor) == 1


def test_deferred_steps_are_sent_before_a_message_grows_past_the_byte_cap(parties, monkeypatch):
    import veil.workers.outbox as outbox

    alice, bob, cp = parties
    monkeypatch.setattr(outbox, "PRELUDE_BYTES_LIMIT", 20_000)
    sizes = []
    real = alice._recv_msg
    monkeypatch.setattr(alice, "_recv_msg", lambda data: (sizes.append(len(data)), real(data))[1])
    x, c = torch.randn(1000), torch.randn(1000)  # each public addend: 8 kB on the wire
    s = _shared(x, alice, bob, cp)
    for _ in range(10):  # ten deferred share-local adds, no opening in between
        s = s + c
    assert torch.allclose(s.get().float_precision(), x + 10 * c, atol=1e-3)
    assert max(sizes) < 40_000  # without the cap one message would carry all ten (> 80 kB)
