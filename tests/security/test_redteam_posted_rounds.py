"""Red team, posted peer rounds (``Outbox.send_round(post=...)``) and the one-exchange truncation on one host.

A posted round's replies are read behind the next request to that party. The attacks: a posted batch of
deferred commands that fails (or whose connection drops) and a round that follows it, a round that takes every
party's outcome (``return_errors``: the serving service's settle, fail and close) after a failed posted round,
a connection lost under a posted round, two threads of one orchestrator posting rounds to the same parties,
and truncation at the size where one exchange gives way to the top bits. After each: the right error, raised
once, at the right place; nothing deferred after a failure runs; the parties serve products equal to torch's.
"""

from __future__ import annotations

import threading

import pytest
import torch

from veil.exceptions import ObjectNotFoundError, RemoteExecutionError
from veil.messaging import messages as m
from veil.mpc.errors import PartyUnreachableError
from veil.tensors.mpc_glue import runtime
from veil.workers import outbox

from tests.mpc.peer_fixtures import cp, parties  # noqa: F401  (fixtures: 2 and 3 network parties, peer openings on)


def _posted(me) -> list:
    """The posted rounds whose replies this process has not read yet."""
    return [f for flights in me._in_flight.values() for f in flights if f[4]]


def _serve_exact_products(parties, cp) -> None:
    b = torch.randint(-1000, 1000, (6, 6))
    got = (b.share(*parties, crypto_provider=cp) * b.share(*parties, crypto_provider=cp)).get()
    assert torch.equal(got, b * b)


def _failing_posted_round(me, parties, cp):
    """A product whose peer round fails at every party (its operand's shares deleted behind this process's
    back), posted: nothing raised yet."""
    x = torch.randint(-100, 100, (8, 8)).share(*parties, crypto_provider=cp)
    for share in x.child.values():
        me.send_msg(m.DeleteMessage([share.id_at_location]), share.location)
    y = x * x
    assert _posted(me)
    return y


def _round(me, parties, **kw) -> list:
    return runtime.one_round([(me, m.DeleteMessage([]), w) for w in parties], "a test round", **kw)


def test_commands_deferred_after_a_failed_posted_batch_do_not_run_on_the_next_round(hook, parties, cp, monkeypatch):
    """A full batch of deferred commands is posted and fails on the worker; commands deferred after it (an in-place
    update, a new result) must not ride on the next round's request and run there: the batch's error is that
    party's, the later results are noted lost, the updated tensor is unchanged."""
    me = hook.local_worker
    alice = parties[0]
    w = torch.zeros(3).send(alice)
    b, bad = torch.ones(5, 7).send(alice), torch.ones(2, 3).send(alice)
    alice.flush()
    monkeypatch.setattr(outbox, "PRELUDE_LIMIT", 2)
    bad.__dict__["_meta"] = ((5, 7), torch.float32, False)  # the client believes a shape the worker does not have
    b @ bad.t()  # two deferred commands fill the batch: posted, failing on alice
    assert id(alice) in me._in_flight
    monkeypatch.setattr(outbox, "PRELUDE_LIMIT", 512)
    later = 555000333
    me.defer_command(alice, m.CommandMessage("Tensor.add_", (m.ObjectRef(w.id_at_location), 1.0), {}, [0], False))
    me.defer_command(alice, m.CommandMessage("torch.add", (m.ObjectRef(w.id_at_location), 1.0), {}, [later], False))
    with pytest.raises(RemoteExecutionError, match="matmul"):
        _round(me, parties)
    assert not me._in_flight
    with pytest.raises(ObjectNotFoundError, match="never created"):
        me.check_lost(alice, [later])
    assert torch.equal(w.get(), torch.zeros(3))  # the in-place update after the failure never ran
    _serve_exact_products(parties, cp)


def test_a_posted_batch_lost_with_its_connection_is_a_party_unreachable_error_at_the_next_round(hook, parties, cp,
                                                                                             monkeypatch):
    me = hook.local_worker
    alice = parties[0]
    p = torch.zeros(3).send(alice)
    alice.flush()
    monkeypatch.setattr(outbox, "PRELUDE_LIMIT", 2)
    outs = [p + i for i in range(2)]  # a full batch: posted
    assert id(alice) in me._in_flight
    monkeypatch.setattr(outbox, "PRELUDE_LIMIT", 512)
    alice.close()  # the connection drops before the batch is answered
    with pytest.raises(PartyUnreachableError, match="alice"):
        _round(me, parties)
    assert not me._in_flight
    for q in (p, *outs):
        q.mark_freed()  # (their session is gone)
    _serve_exact_products(parties, cp)


def test_a_round_that_takes_every_partys_outcome_gets_an_earlier_posted_failure_in_its_place(hook, parties, cp):
    """``one_round(return_errors=True)`` (the serving service's settle, fail and close rounds) after a posted round
    failed: each party's outcome comes back (the earlier failure in that party's place), nothing is raised past
    it, nothing is left posted, and the next round succeeds."""
    me = hook.local_worker
    _failing_posted_round(me, parties, cp)
    outcomes = _round(me, parties, return_errors=True)
    assert len(outcomes) == len(parties)
    assert all(isinstance(r, ObjectNotFoundError) for r in outcomes), outcomes
    assert not me._in_flight
    assert all(type(r) is m.OkReply for r in _round(me, parties, return_errors=True))
    _serve_exact_products(parties, cp)


def test_an_earlier_posted_failure_is_raised_first_and_once(hook, parties, cp):
    """Without ``return_errors`` the earlier round's failure is raised (as the party's own class, not wrapped) and
    the next request finds nothing of it left."""
    me = hook.local_worker
    _failing_posted_round(me, parties, cp)
    with pytest.raises(ObjectNotFoundError):
        _round(me, parties)
    assert all(type(r) is m.OkReply for r in _round(me, parties))
    _serve_exact_products(parties, cp)


def test_a_connection_lost_under_a_posted_round_is_party_unreachable_at_the_next_request(hook, parties, cp):
    me = hook.local_worker
    a = torch.randint(-100, 100, (8, 8))
    y = a.share(*parties, crypto_provider=cp) * a.share(*parties, crypto_provider=cp)
    assert _posted(me)
    parties[0].close()  # the first party's connection (and session) go under the posted round
    with pytest.raises(PartyUnreachableError, match="alice") as raised:
        y.get()
    assert str(raised.value).count("was lost during") == 1  # said once, not wrapped again
    assert not _posted(me)
    _serve_exact_products(parties, cp)


def test_threads_posting_rounds_to_the_same_parties_get_exact_products(hook, parties, cp):
    """Two threads of one orchestrator run products on the same parties at once: every round of each is posted
    behind the other's; each result equals torch's and nothing is left unread after the reads."""
    gen = torch.Generator().manual_seed(7)
    inputs = [torch.randint(-2**10, 2**10, (12, 12), generator=gen) for _ in range(4)]
    results: dict = {}
    failures: list = []

    def work(k: int) -> None:
        try:
            a, b = inputs[2 * k], inputs[2 * k + 1]
            x, y = a.share(*parties, crypto_provider=cp), b.share(*parties, crypto_provider=cp)
            out = (x @ y) * x
            for _ in range(3):
                out = out * y
            results[k] = (out.get(), (((a @ b) * a) * b * b * b))
        except BaseException as e:  # noqa: BLE001  (reported below)
            failures.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for got, want in results.values():
        assert torch.equal(got, want)
    hook.local_worker.wait_posted()
    assert not _posted(hook.local_worker)


@pytest.mark.parametrize("entries", [-1, 0], ids=["one exchange", "top bits"])
def test_truncation_at_the_one_exchange_threshold_is_floor_or_next_at_the_range_edges(hook, parties, cp, monkeypatch,
                                                                                     entries):
    """One entry under ``TOP_BITS_MIN_ELEMENTS`` every party gets ``c`` (``trunc_finish`` everywhere, party 0
    alone adding the public terms); at it, the top bits. Both exact (floor or one more) at the range's edges."""
    from veil.mpc import truncation
    from veil.mpc.truncation import TRUNCATION_BOUND

    threshold = 64
    monkeypatch.setattr(truncation, "TOP_BITS_MIN_ELEMENTS", threshold)
    finishes = []
    real = truncation.run_party
    monkeypatch.setattr(truncation, "run_party", lambda name, *a, **kw: finishes.append((name, kw.get("first")))
                        or real(name, *a, **kw))
    divisor = 2**16
    edge = TRUNCATION_BOUND - divisor
    n = threshold + entries
    values = torch.tensor([edge, -edge, 0, -1, 1, edge - 1, -edge + 1] * n)[:n]
    z = values.share(*parties, crypto_provider=cp).truncate(divisor).get()
    floor = torch.div(values, divisor, rounding_mode="floor")
    assert bool(((z == floor) | (z == floor + 1)).all()), (z - floor)
    if entries < 0:
        assert finishes == [("trunc_finish", True)] + [("trunc_finish", False)] * (len(parties) - 1)
    else:
        assert [name for name, _ in finishes] == ["trunc_finish"] + ["trunc_finish_bits"] * (len(parties) - 1)
