"""In-process parties running a big round on threads of their own (veil.tensors.mpc_glue.runtime).

Plain VirtualWorkers (no ``concurrent_requests`` flag): a round of at least
``PARALLEL_MIN_ELEMENTS`` ring elements per party runs each party's handler on
its own thread when there is a core per party; smaller rounds stay inline.
Barriers prove that requests are really in flight together; results are
compared with plain torch; counters and audit rows must come out the same as
when the parties take turns.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.messaging import messages as m
from veil.messaging.serde import deserialize
from veil.mpc.errors import MPCError, PartyUnreachableError
from veil.mpc.party import OpenMessage
from veil.mpc.providers.worker_dealer import EXPAND, dealer_for
from veil.tensors.mpc_glue import runtime

from party_faults import lose_first_opening


@pytest.fixture
def cores(monkeypatch):
    """Idle cores for the parties (the test box may be busy): big rounds run on threads."""
    monkeypatch.setattr(runtime, "_spare_cores", lambda parties: True)


@pytest.fixture
def workers(hook):
    alice, bob = sy.VirtualWorker(hook, id="alice"), sy.VirtualWorker(hook, id="bob")
    return alice, bob, sy.VirtualWorker(hook, id="crypto_provider")


def _shared(x, *parties, cp):
    return x.fix_precision().share(*parties, crypto_provider=cp)


def _watch_openings(monkeypatch, parties, barrier=None):
    """Records (party id, thread) of every OpenMessage; with ``barrier`` each opening waits for the others."""
    seen = []
    for w in parties:
        real = w._recv_msg

        def recv(data, real=real, w=w):
            if type(deserialize(data)[0]) is OpenMessage:
                seen.append((w.id, threading.current_thread()))
                if barrier is not None:
                    barrier.wait()
            return real(data)

        monkeypatch.setattr(w, "_recv_msg", recv)
    return seen


def test_the_decision_needs_a_big_round_two_parties_cores_and_no_pool_thread(monkeypatch):
    monkeypatch.setattr(runtime, "_spare_cores", lambda parties: True)
    big = runtime.PARALLEL_MIN_ELEMENTS
    assert runtime.parallel_in_process(big, 2)
    assert not runtime.parallel_in_process(big - 1, 2)
    assert not runtime.parallel_in_process(big, 1)
    assert not runtime._pool().submit(runtime.parallel_in_process, big, 2).result()  # nested: inline
    monkeypatch.setattr(runtime, "_spare_cores", lambda parties: False)
    assert not runtime.parallel_in_process(big, 2)


def test_the_estimate_is_the_largest_tensor_not_the_sum():
    # a comparison step: a dozen tensors of 2^14 entries is a round of small ops (inline), one of 2^15 is big
    small = [torch.zeros(128, 128, dtype=torch.long) for _ in range(12)]
    assert runtime.elements_of([small, {"k": small[0]}, 3]) == 128 * 128
    assert runtime.elements_of(small + [torch.zeros(2, 1 << 14, dtype=torch.long)]) == 1 << 15
    assert runtime.elements_of([]) == 0


def test_cores_follow_torch_threads_and_what_else_runs(monkeypatch):
    monkeypatch.setattr(runtime, "_cores", lambda: 2)
    monkeypatch.setattr(runtime, "_running_elsewhere", lambda: 0)
    monkeypatch.setattr(runtime.torch, "get_num_threads", lambda: 1)
    assert runtime._spare_cores(2)
    monkeypatch.setattr(runtime, "_running_elsewhere", lambda: 1)  # a busy core: the parties take turns
    assert not runtime._spare_cores(2)
    monkeypatch.setattr(runtime, "_running_elsewhere", lambda: 0)
    monkeypatch.setattr(runtime.torch, "get_num_threads", lambda: 2)  # each party's kernels would fight
    assert not runtime._spare_cores(2)


def test_what_else_runs_is_read_from_the_machine():
    assert 0 <= runtime._running_elsewhere() < 100_000
    assert runtime._cores() >= 1


def test_a_big_round_has_every_party_in_flight_at_once(workers, cores, monkeypatch):
    alice, bob, cp = workers
    x, y = torch.randn(512, 256), torch.randn(256, 512)  # masks of 2^17 entries: big even for a light step
    sx, sy_ = _shared(x, alice, bob, cp=cp), _shared(y, alice, bob, cp=cp)
    seen = _watch_openings(monkeypatch, (alice, bob), threading.Barrier(2, timeout=20))
    z = (sx @ sy_).get().float_precision()
    assert torch.allclose(z, x @ y, atol=5e-2)
    assert len(seen) >= 4  # beaver + truncation openings, each met by both parties
    assert len({id(t) for _, t in seen}) >= 2


def test_light_steps_weigh_less_than_a_product(workers, cores, monkeypatch):
    """A 256^3 matmul: its mask round (two subtractions per party on 2^16 entries, a light step) stays on
    the caller's thread; the truncation round carrying the combine (two 256^3 products) takes threads."""
    alice, bob, cp = workers
    x, y = torch.randn(256, 256), torch.randn(256, 256)
    sx, sy_ = _shared(x, alice, bob, cp=cp), _shared(y, alice, bob, cp=cp)
    seen = []
    for w in (alice, bob):
        real = w._recv_msg

        def recv(data, real=real):
            msg = deserialize(data)[0]
            if type(msg) is OpenMessage:
                seen.append((msg.name, threading.current_thread()))
            return real(data)

        monkeypatch.setattr(w, "_recv_msg", recv)
    z = (sx @ sy_).get().float_precision()
    assert torch.allclose(z, x @ y, atol=5e-2)
    here = threading.current_thread()
    assert [t for name, t in seen if name == "beaver_mask"] == [here, here]
    assert any(t is not here for name, t in seen if name == "trunc_mask")
    assert runtime.step_elements("beaver_mask", [torch.zeros(256, 256)]) == (1 << 16) // runtime.LIGHT_STEP_DISCOUNT
    assert runtime.step_elements("beaver_combine", [torch.zeros(256, 256)]) == 1 << 16


def test_a_small_round_stays_on_the_callers_thread(workers, cores, monkeypatch):
    alice, bob, cp = workers
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    sx, sy_ = _shared(x, alice, bob, cp=cp), _shared(y, alice, bob, cp=cp)
    seen = _watch_openings(monkeypatch, (alice, bob))
    z = (sx @ sy_).get().float_precision()
    assert torch.allclose(z, x @ y, atol=1e-2)
    assert seen and {t for _, t in seen} == {threading.current_thread()}


def test_without_spare_cores_big_rounds_stay_inline(workers, monkeypatch):
    monkeypatch.setattr(runtime, "_spare_cores", lambda parties: False)
    alice, bob, cp = workers
    x = torch.randn(300, 300)
    sx = _shared(x, alice, bob, cp=cp)
    seen = _watch_openings(monkeypatch, (alice, bob))
    assert torch.allclose((sx * sx).get().float_precision(), x * x, atol=1e-2)
    assert seen and {t for _, t in seen} == {threading.current_thread()}


@pytest.mark.parametrize("n", [2, 3])
def test_threaded_rounds_match_torch(hook, cores, monkeypatch, n):
    monkeypatch.setattr(runtime, "PARALLEL_MIN_ELEMENTS", 1)  # every round on threads
    parties = [sy.VirtualWorker(hook, id=f"p{i}") for i in range(n)]
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    seen = _watch_openings(monkeypatch, parties)
    x, w = torch.randn(4, 1, 8, 8), torch.randn(3, 1, 3, 3)
    a, b = torch.randn(64, 40), torch.randn(40, 16)
    u, v = torch.randn(1000), torch.randn(1000)
    sx, sw = _shared(x, *parties, cp=cp), _shared(w, *parties, cp=cp)
    sa, sb = _shared(a, *parties, cp=cp), _shared(b, *parties, cp=cp)
    su, sv = _shared(u, *parties, cp=cp), _shared(v, *parties, cp=cp)
    assert torch.allclose((su * sv).get().float_precision(), u * v, atol=1e-2)
    assert torch.allclose((sa @ sb).get().float_precision(), a @ b, atol=5e-2)
    assert torch.allclose(F.conv2d(sx, sw).get().float_precision(), F.conv2d(x, w), atol=5e-2)
    assert torch.allclose(F.relu(su).get().float_precision(), F.relu(u), atol=1e-3)
    assert torch.equal((su > sv).get().float_precision(), (u > v).float())
    assert len({id(t) for _, t in seen}) >= 2  # some party ran on a pool thread


def _run_counted(hook, parties, cp, x, y):
    me = hook.local_worker
    before = me.stats.snapshot()
    rows = [len(w.monitor.audit_log) for w in parties]
    out = (_shared(x, *parties, cp=cp) @ _shared(y, *parties, cp=cp)).get().float_precision()
    after = me.stats.snapshot()
    return out, {k: after[k] - before[k] for k in after}, [len(w.monitor.audit_log) - r
                                                          for w, r in zip(parties, rows)]


def test_counters_and_audit_rows_are_the_same_as_taking_turns(hook, monkeypatch):
    x, y = torch.randn(384, 384), torch.randn(384, 384)  # every round big (the light mask round too)
    parties = [sy.VirtualWorker(hook, id=f"q{i}") for i in range(2)]
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    monkeypatch.setattr(runtime, "_spare_cores", lambda parties: False)
    out_turns, stats_turns, audit_turns = _run_counted(hook, parties, cp, x, y)
    monkeypatch.setattr(runtime, "_spare_cores", lambda parties: True)
    seen = _watch_openings(monkeypatch, parties, threading.Barrier(2, timeout=20))
    out_threads, stats_threads, audit_threads = _run_counted(hook, parties, cp, x, y)
    assert len(seen) >= 4
    assert torch.allclose(out_threads, x @ y, atol=5e-2) and torch.allclose(out_turns, x @ y, atol=5e-2)
    assert stats_threads["messages"] == stats_turns["messages"]  # every request counted once
    for k in ("bytes_sent", "bytes_received"):  # up to ids' varint sizes and the deletions riding along
        assert abs(stats_threads[k] - stats_turns[k]) <= 0.001 * stats_turns[k]
    assert audit_threads == audit_turns


def test_each_party_sees_the_orchestrator_as_its_requester(workers, cores, monkeypatch):
    alice, bob, cp = workers
    me = alice.hook.local_worker
    barrier = threading.Barrier(2, timeout=20)
    requesters = []
    for w in (alice, bob):
        real = w.monitor.open_step

        def open_step(*args, real=real, w=w, **kwargs):
            barrier.wait()  # both handlers inside a request at once
            requesters.append((w.id, w.requester()))
            return real(*args, **kwargs)

        monkeypatch.setattr(w.monitor, "open_step", open_step)
    x = torch.randn(400, 400)  # 1.6e5 entries: every round on threads, the light mask round too
    sx = _shared(x, alice, bob, cp=cp)
    assert torch.allclose((sx * sx).get().float_precision(), x * x, atol=1e-2)
    assert requesters and all(r == me.id for _, r in requesters)
    assert alice.requester() is None and bob.requester() is None  # nothing left on this thread


def test_a_lost_party_in_a_threaded_round_raises_and_the_next_query_works(workers, cores, monkeypatch):
    alice, bob, cp = workers
    x, y = torch.randn(200, 200), torch.randn(200, 200)
    sx, sy_ = _shared(x, alice, bob, cp=cp), _shared(y, alice, bob, cp=cp)
    lose_first_opening(monkeypatch, bob)
    with pytest.raises(MPCError, match="party 'bob' was lost during opening") as info:
        sx @ sy_
    assert isinstance(info.value, PartyUnreachableError)
    assert torch.allclose((sx @ sy_).get().float_precision(), x @ y, atol=5e-2)


def test_dealing_expands_the_first_partys_seed_beside_the_dealer(workers, cores, monkeypatch):
    alice, bob, cp = workers
    me = alice.hook.local_worker
    expands = []
    for w in (alice, bob):
        real = w._recv_msg

        def recv(data, real=real, w=w):
            msg, _, prelude = deserialize(data)
            if type(msg) is m.CommandMessage and msg.op == EXPAND:
                expands.append((w.id, threading.current_thread()))
            return real(data)

        monkeypatch.setattr(w, "_recv_msg", recv)
    x, y = torch.randn(300, 300), torch.randn(300, 300)
    sx, sy_ = _shared(x, alice, bob, cp=cp), _shared(y, alice, bob, cp=cp)
    dealer = dealer_for(cp, me)
    with dealer.record() as plan:
        kept = sx * sy_  # alive at the block's end: the truncation it owes is paid there, and recorded
    assert kept.pending_divisor == 1
    expands.clear()
    dealer.deal_ahead(plan)
    threads = dict(expands)
    assert threads["alice"] is not threading.current_thread()  # the first party: on a pool thread
    assert threads["bob"] is threading.current_thread()  # the last: after the dealer's corrections
    saved = dealer.on_exhausted
    dealer.on_exhausted = "raise"  # the product uses exactly the material dealt above
    try:
        z = (sx * sy_).get().float_precision()
    finally:
        dealer.on_exhausted = saved
    assert torch.allclose(z, x * y, atol=1e-2)


def test_small_dealing_stays_on_the_dealers_thread(workers, cores, monkeypatch):
    alice, bob, cp = workers
    threads = []
    real = alice._recv_msg

    def recv(data):
        msg = deserialize(data)[0]
        if type(msg) is m.CommandMessage and msg.op == EXPAND:
            threads.append(threading.current_thread())
        return real(data)

    monkeypatch.setattr(alice, "_recv_msg", recv)
    x = torch.randn(10)
    assert torch.allclose((_shared(x, alice, bob, cp=cp) * _shared(x, alice, bob, cp=cp)).get().float_precision(),
                          x * x, atol=1e-2)
    assert threads and set(threads) == {threading.current_thread()}
