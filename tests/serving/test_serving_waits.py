"""Waiting ``pending``/``fetch`` actions (a party answers when a submit or a result arrives, not when polled):
a hostile client's waits never return another client's result, cannot make the service wait on them, and
malformed waits are refused. Each test ends with an honest client getting the plaintext model's answer.
"""

from __future__ import annotations

import threading

import pytest
import torch

from veil.exceptions import PermissionDeniedError
from veil.ids import new_id
from veil.serving import ServingError, protocol
from veil.serving.service import service_of

from serving_helpers import assert_query_ok, client_for, cluster, served_small_model  # noqa: F401  (fixtures)


class _Waiter(threading.Thread):
    """A hostile client that keeps a waiting fetch open on one party, for ``rids()``, until stopped."""

    def __init__(self, client, party_index, name, rids):
        super().__init__(daemon=True)
        self.client, self.party, self.name, self.rids = client, client.parties[party_index], name, rids
        self.replies, self.errors, self.stop = [], [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            for rid in self.rids():
                try:
                    self.replies += protocol.call(self.client.hook.local_worker, self.party, "fetch", self.name,
                                                  rid, protocol.MAX_WAIT)
                except Exception as e:  # noqa: BLE001 (the test asserts on what came back)
                    self.errors.append(e)
                    return


def test_a_waiting_fetch_never_returns_another_clients_result(cluster, client_for):
    model, expected = served_small_model(cluster, "wait-steal")
    try:
        victim = client_for(cluster, (1, 4), (1, 2), name="wait-steal")
        thief = client_for(cluster, (1, 4), (1, 2), name="wait-steal")  # same client user, its own session
        submitted: list[int] = []
        waiters = [_Waiter(thief, i, "wait-steal", lambda: list(submitted[-1:]) or [new_id()]) for i in (0, 1)]
        for w in waiters:
            w.start()
        for _ in range(4):  # the thief waits on each of the victim's request ids while they are computed
            rid = victim.submit(torch.ones(1, 4))
            submitted.append(rid)
            assert torch.allclose(victim.result(rid), expected, atol=1e-2)
        for w in waiters:
            w.stop.set()
            w.join(timeout=30)
        assert all(not w.replies and not w.errors for w in waiters)  # nothing leaked, nothing failed
        assert_query_ok(victim, expected)
    finally:
        model.stop()


@pytest.mark.parametrize("wait", [-1, protocol.MAX_WAIT * 2, True, "0.5", float("nan"), [0.5]])
def test_malformed_waits_are_refused_and_the_service_goes_on(cluster, client_for, wait):
    model, expected = served_small_model(cluster, "wait-bad")
    try:
        client = client_for(cluster, (1, 4), (1, 2), name="wait-bad")
        local, party = client.hook.local_worker, client.parties[0]
        with pytest.raises(ServingError, match="wait is a number of seconds"):
            protocol.call(local, party, "fetch", "wait-bad", new_id(), wait)
        with pytest.raises(PermissionDeniedError, match="client token may only submit"):
            protocol.call(local, party, "pending", "wait-bad", 0.5)  # waiting for submits is the owner's
        service = service_of(model)
        with pytest.raises(ServingError, match="wait is a number of seconds"):
            service._call(service.parties[0], "pending", wait)
        assert_query_ok(client, expected)
    finally:
        model.stop()


def test_waiting_clients_cannot_starve_the_service_even_when_they_hang_up(cluster, client_for):
    model, expected = served_small_model(cluster, "wait-flood")
    try:
        hostile = [client_for(cluster, (1, 4), (1, 2), name="wait-flood") for _ in range(3)]
        waiters = [_Waiter(c, i, "wait-flood", lambda: [new_id()]) for c in hostile for i in (0, 1)]
        for w in waiters:
            w.start()
        honest = client_for(cluster, (1, 4), (1, 2), name="wait-flood")
        for _ in range(3):  # every party holds six waiting fetches meanwhile
            assert_query_ok(honest, expected)
        for c in hostile[:2]:
            c.close()  # hang up mid-wait: the parties drop those sessions
        for _ in range(2):
            assert_query_ok(honest, expected)
        for w in waiters:
            w.stop.set()
            w.join(timeout=30)
        assert not any(w.replies for w in waiters)
        assert_query_ok(client_for(cluster, (1, 4), (1, 2), name="wait-flood"), expected)
    finally:
        model.stop()


def test_in_process_waits_answer_at_once(hook):
    """A VirtualWorker's caller is its only thread: a wait there must not block (it is ignored)."""
    import veil as sy

    party = sy.VirtualWorker(hook, id="wait_party")
    owner = sy.VirtualWorker(hook, id="wait_owner")
    client = sy.VirtualWorker(hook, id="wait_client")
    protocol.call(owner, party, "open", "svc", ["wait_client"], {"input_shape": [1, 3]})
    assert protocol.call(owner, party, "pending", "svc", protocol.MAX_WAIT) == []
    assert protocol.call(client, party, "fetch", "svc", 7, protocol.MAX_WAIT) == []
    protocol.call(client, party, "submit", "svc", 7, torch.zeros(1, 3, dtype=torch.int64))
    assert [r[:2] for r in protocol.call(owner, party, "pending", "svc", protocol.MAX_WAIT)] == [[7, 1]]
