"""Small rounds sent and read from one thread (veil.tensors.mpc_glue.runtime._split_round).

Parties here are in-process workers that split a request in two like the network client
(``_send_request`` / ``_receive_reply``), logging when each half runs: a small round must send
to every party before it reads any reply, a large one must not split, failures must leave no
party reserved, and the results must match plain torch.
"""

from __future__ import annotations

import threading

import pytest
import torch

import veil as sy
from veil.exceptions import ConnectionLostError
from veil.messaging.serde import deserialize
from veil.mpc.errors import MPCError, PartyUnreachableError
from veil.mpc.party import OpenMessage
from veil.tensors.mpc_glue import runtime
from veil.tensors.mpc_glue.runtime import one_round


class SplitWorker(sy.VirtualWorker):
    """Answers like a VirtualWorker, but in two halves, one request reserved at a time."""

    log: list

    def _send_request(self, data) -> None:
        if not self._conn_lock.acquire(timeout=10):
            raise AssertionError("a second request was sent before the first reply was read")
        try:
            if self.fail_next_send and type(deserialize(data)[0]) is OpenMessage:
                self.fail_next_send = False
                raise ConnectionLostError(f"connection to worker {self.id!r} was lost: test")
        except BaseException:
            self._conn_lock.release()
            raise
        self.log.append(("send", self.id))
        self._in_flight = data

    def _receive_reply(self) -> bytes:
        try:
            self.log.append(("read", self.id))
            data, self._in_flight = self._in_flight, None
            return self._recv_msg(data)
        finally:
            self._conn_lock.release()


@pytest.fixture
def parties(hook, monkeypatch):
    monkeypatch.setattr(runtime, "SMALL_ROUND_BYTES", 256 << 10)  # the split path is off by default
    log: list = []
    out = []
    for name in ("alice", "bob"):
        w = SplitWorker(hook, id=name)
        w.log, w._conn_lock, w.fail_next_send, w._in_flight = log, threading.Lock(), False, None
        out.append(w)
    return out[0], out[1], sy.VirtualWorker(hook, id="crypto_provider"), log


def _shared(x, alice, bob, cp):
    return x.fix_precision().share(alice, bob, crypto_provider=cp)


def test_a_small_round_sends_to_every_party_before_reading_any_reply(parties):
    alice, bob, cp, log = parties
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    sx, sy_ = _shared(x, alice, bob, cp), _shared(y, alice, bob, cp)
    log.clear()
    z = (sx * sy_).get().float_precision()
    assert torch.allclose(z, x * y, atol=1e-3)
    assert log, "small rounds must take the split path"
    rounds = [log[k: k + 4] for k in range(0, len(log), 4)]
    for r in rounds:  # each round: both sends, then both reads
        assert [kind for kind, _ in r] == ["send", "send", "read", "read"], log
        assert {w for _, w in r[:2]} == {"alice", "bob"}


def test_large_rounds_keep_whole_requests_on_pool_threads(parties, monkeypatch):
    alice, bob, cp, log = parties
    monkeypatch.setattr(runtime, "SMALL_ROUND_BYTES", 64)  # every round of 100 entries is "large" now
    x = torch.randn(100)
    sx = _shared(x, alice, bob, cp)
    log.clear()
    out = (sx * sx).get().float_precision()
    assert torch.allclose(out, x * x, atol=1e-3)
    assert log == []  # whole requests (send_msg), never the two halves


def test_a_party_lost_while_sending_raises_and_the_next_query_works(parties):
    alice, bob, cp, log = parties
    x, w = torch.randn(3, 5), torch.randn(5, 2)
    sx, sw = _shared(x, alice, bob, cp), _shared(w, alice, bob, cp)
    bob.fail_next_send = True
    with pytest.raises(MPCError, match="party 'bob' was lost during opening") as info:
        sx @ sw
    assert isinstance(info.value, PartyUnreachableError)
    # alice's reply was read (her connection is free again) and nothing half-done breaks the next query
    assert torch.allclose((sx @ sw).get().float_precision(), x @ w, atol=1e-2)
    assert torch.allclose(torch.relu(sx).get().float_precision(), torch.relu(x), atol=1e-3)


def test_two_threads_running_rounds_on_the_same_parties_do_not_deadlock(parties):
    alice, bob, cp, log = parties
    owner = alice.hook.local_worker
    errors, done = [], []

    def rounds(order):
        try:
            for _ in range(50):
                one_round([(owner, sy.messaging.messages.DeleteMessage([]), p) for p in order], "a test round",
                          reply_bytes=0)
            done.append(1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=rounds, args=(o,)) for o in ((alice, bob), (bob, alice))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(done) == 2
