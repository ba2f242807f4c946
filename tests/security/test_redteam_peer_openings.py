"""Red team, peer openings (veil/workers/peer_openings.py): parties fetch each other's Beaver opening shares.

Four ``veil worker`` processes, each presenting its own peer token: alice, bob and charlie (parties)
and dave (a peer of everyone that holds no share). The attacks: fetches from a client or scientist
token, a non-party peer, a party twice, for another step, for a round that ended (replay) or was
abandoned (its orchestrator gone), a round id reused, an orchestrator naming a non-party peer or an
unknown worker, and a hostile party answering a fetch with values of the wrong count, shape or dtype.
After each, nothing was stored or revealed, the workers still serve a peer-opened product equal to
torch's, and the objects stored before are unchanged.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time

import pytest
import torch

import veil as sy
from veil.exceptions import VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize
from veil.tensors.mpc_glue.runtime import enable_peer_openings
from veil.workers.peer_openings import PeerFetchMessage, PeerOpenMessage

from network_helpers import PEER, TOKEN
from worker_processes import peer_mesh_args, spawn_all, spawned_workers, websocket_sink

CLIENT = "net-client-token-for-peer-tests"
NAMES = ("alice", "bob", "dave")  # veil worker processes; charlie is a sink the test runs (a malicious party)

#: every request the sink charlie was sent (decoded), and what it answers a fetch for a round with
RECEIVED: list = []
REPLIES: dict = {}


def _peer_token(name: str) -> str:
    return f"{PEER}-{name}"


def charlie_handler(received: list, replies: dict):
    """The fake party charlie's connection handler: records every request (decoded, or the decoding error) in
    ``received`` and answers a fetch with ``replies[round]``: tensors (an ObjectsReply; none set: no values),
    an object with ``send_to(ws)`` or a callable ``(ws, msg)`` writing its own answer (fragments, raw frames,
    errors, a hang-up); anything else with OkReply (it never fetches itself)."""
    from veil.messaging.serde import serialize

    def handler(ws):
        try:
            for data in ws:
                try:
                    msg = deserialize(data)[0]
                except Exception as e:  # noqa: BLE001  (recorded: a test fails on it)
                    msg = e
                received.append(msg)
                if type(msg) is PeerFetchMessage:
                    reply = replies.get(msg.round, [])
                    if hasattr(reply, "send_to"):
                        reply.send_to(ws)
                    elif callable(reply):
                        reply(ws, msg)
                    else:
                        ws.send(serialize(m.ObjectsReply(list(reply)), sender="charlie"))
                else:
                    ws.send(serialize(m.OkReply(), sender="charlie"))
        except Exception:  # noqa: BLE001  (an answer closed the connection)
            pass
    return handler


@pytest.fixture(scope="module")
def sink():
    """The fake party charlie (:func:`charlie_handler`) on a free port, recording into this module's tables."""
    with websocket_sink(charlie_handler(RECEIVED, REPLIES)) as port:
        yield port


@contextlib.contextmanager
def peer_cluster(hook, sink_port: int, wait: float):
    """alice, bob and dave as ``veil worker`` processes, peered with each other and with the sink charlie
    (``sink_port``), each accepting the serving client ``CLIENT`` and waiting ``wait`` seconds for a round's
    shares or fetches: name -> (process, scientist connection); peer openings enabled on alice and bob."""
    from veil.tensors.mpc_glue import runtime
    from veil.workers.websocket_launcher import free_port

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VEIL_PEER_WAIT_SECONDS", str(wait))
        mp.setattr(runtime, "PEER_MIN_ELEMENTS", 0)  # the attacks' small rounds go party to party too
        ports = {n: free_port() for n in NAMES}
        ports["charlie"] = sink_port
        conns = {}
        spawning = spawned_workers()
        spawn = next(spawning)
        try:
            procs = spawn_all(spawn, {n: (["--token", TOKEN, f"--client=serving-client={CLIENT}",
                                           *peer_mesh_args(n, ports, _peer_token)], ports[n]) for n in NAMES})
            conns = {n: sy.WebsocketClientWorker(hook, id=n, host="127.0.0.1", port=procs[n].port, token=TOKEN,
                                                 timeout=120) for n in NAMES}
            enable_peer_openings(conns["alice"], conns["bob"])
            yield {n: (procs[n], conns[n]) for n in NAMES}
            enable_peer_openings(conns["alice"], conns["bob"], enabled=False)
        finally:
            for c in conns.values():
                c.close()
            next(spawning, None)  # kills the processes


@pytest.fixture(scope="module")
def cluster(request, hook, sink):
    """:func:`peer_cluster` whose workers wait ``request.param`` seconds (default 45). One cluster per module
    and wait (starting four processes costs ~9 s): every test leaves it serving, which each one checks
    (``_unchanged``), and the attacks that abandon a round get a cluster of their own (their own wait)."""
    with peer_cluster(hook, sink, getattr(request, "param", 45)) as found:
        yield found


def _as(hook, proc, token: str, name: str):
    """A connection to ``proc`` presenting ``token`` (a peer's, a client's, ...)."""
    return sy.WebsocketClientWorker(hook, id=f"{name}-as-{proc.id}-{new_id()}", host="127.0.0.1", port=proc.port,
                                    token=token, timeout=90)


#: how long :func:`_fetch` asks again on "not yet" before it fails (a round's registration or publication that
#: never comes fails the test; a slow one on a loaded machine does not)
FETCH_PATIENCE = 120


def _fetch(hook, conn, round_id: str, name: str = "beaver_mask") -> list:
    """Fetches, over ``conn``, what the worker's round ``round_id`` published to that connection's peer, asked
    again while the answer is "not yet" (an OkReply), as a party does: a fetch waits one ``FETCH_SLICE_SECONDS``
    slice at the worker, and a round started on another thread may be registered and published later than
    that. A refusal raises (at once, or once the round is registered or published)."""
    deadline = time.monotonic() + FETCH_PATIENCE
    while True:
        reply = hook.local_worker.send_msg(PeerFetchMessage(round_id, name), conn)
        if type(reply) is not m.OkReply:
            return list(reply.objects)
        assert time.monotonic() < deadline, f"round {round_id} was never published at {conn.id}"


def _until_ended(hook, proc, round_id: str, name: str = "beaver_mask") -> None:
    """Waits until ``proc`` ended ``round_id`` (its orchestrator left): dave, a peer but no reader, is told
    "not a reader" while the round is open and "ended" after (a probe that takes nothing)."""
    deadline = time.monotonic() + 60
    while True:
        conn = _as(hook, proc, _peer_token("dave"), "dave")
        try:
            with pytest.raises(VeilError) as refused:
                _fetch(hook, conn, round_id, name)
        finally:
            conn.close()
        if "not a reader" not in str(refused.value):
            assert re.search("(?i)ended|no peer opening round", str(refused.value)), refused.value
            return
        assert time.monotonic() < deadline, "the abandoned round never ended"
        time.sleep(0.1)


def _fetches_of(round_id: str) -> list:
    """The fetches the sink charlie was sent for ``round_id``."""
    return [msg for msg in RECEIVED if type(msg) is PeerFetchMessage and msg.round == round_id]


def _start(hook, conn, msg, errors: dict, name: str) -> threading.Thread:
    """Sends ``msg`` over ``conn`` on a thread (a party's peer opening blocks until its round ends)."""
    def run():
        try:
            hook.local_worker.send_msg(msg, conn)
        except Exception as e:  # noqa: BLE001
            errors[name] = e

    t = threading.Thread(target=run)
    t.start()
    return t


def _honest_product(cluster, parties=("alice", "bob")):
    conns = [cluster[n][1] for n in parties]
    cp = cluster["dave"][1]
    a, b = torch.randint(-1000, 1000, (16, 8)), torch.randint(-1000, 1000, (16, 8))
    z = a.share(*conns, crypto_provider=cp) * b.share(*conns, crypto_provider=cp)
    assert torch.equal(z.get(), a * b)


def _stored_before(cluster):
    """An object of the scientist's on bob, to compare after the attack."""
    value = torch.arange(12.0)
    return value, value.send(cluster["bob"][1])


def _unchanged(cluster, stored):
    value, ptr = stored
    assert torch.equal(ptr.copy().get(), value)
    _honest_product(cluster)


def _rounds_seen(monkeypatch):
    """Records the round ids and ids of the peer openings this process sends."""
    seen = []
    from veil.workers import outbox

    exchange, send_round = outbox.Outbox._exchange, outbox.Outbox.send_round

    def spy(self, msg, location, prelude):
        if type(msg) is PeerOpenMessage:
            seen.append((location.id, msg))
        return exchange(self, msg, location, prelude)

    def spy_round(self, requests, post=None):  # (a round to network parties: every request from one thread)
        seen.extend((location.id, msg) for msg, location in requests if type(msg) is PeerOpenMessage)
        return send_round(self, requests, post)

    monkeypatch.setattr(outbox.Outbox, "_exchange", spy)
    monkeypatch.setattr(outbox.Outbox, "send_round", spy_round)
    return seen


def test_peer_fetch_and_peer_opening_need_a_peer_token(hook, cluster):
    stored = _stored_before(cluster)
    bob = cluster["bob"][0]
    for token in (TOKEN, CLIENT):  # a scientist (full rights otherwise) and a serving client
        conn = _as(hook, bob, token, "intruder")
        try:
            with pytest.raises(VeilError, match="(?i)peer|client token"):
                _fetch(hook, conn, "a" * 32)
        finally:
            conn.close()
    conn = _as(hook, bob, CLIENT, "client")
    try:  # a client may not start a peer opening either (it may only submit queries and fetch results)
        with pytest.raises(VeilError, match="(?i)client"):
            hook.local_worker.send_msg(PeerOpenMessage("beaver_mask", (), {}, "b" * 32, ["alice", "bob"], [1, 2]), conn)
    finally:
        conn.close()
    _unchanged(cluster, stored)


def test_a_fetch_for_an_ended_round_is_refused_and_a_round_id_is_used_once(hook, cluster, monkeypatch):
    stored = _stored_before(cluster)
    seen = _rounds_seen(monkeypatch)
    _honest_product(cluster)
    (where, msg), = [s for s in seen if s[0] == "bob"]
    as_alice = _as(hook, cluster["bob"][0], _peer_token("alice"), "alice")
    try:  # replay: alice's peer connection asks again for bob's share of the round that was opened
        with pytest.raises(VeilError, match="(?i)ended|no peer opening round"):
            _fetch(hook, as_alice, msg.round)
    finally:
        as_alice.close()
    # the orchestrator opens a step again under the same round id: refused before anything is published
    bob = cluster["bob"][1]
    x = torch.zeros(16, 8, dtype=torch.int64).send(bob)
    again = PeerOpenMessage("beaver_mask", (m.ObjectRef(x.id_at_location),) * 4, {}, msg.round, ["alice", "bob"],
                            [new_id(), new_id()])
    with pytest.raises(VeilError, match="(?i)not fresh"):
        hook.local_worker.send_msg(again, bob)
    _unchanged(cluster, stored)


@pytest.mark.parametrize("cluster", [3], indirect=True)  # alice waits 3 s for a fetch dave never makes
def test_an_orchestrator_cannot_route_a_share_to_a_non_party_or_unknown_worker(hook, cluster):
    stored = _stored_before(cluster)
    alice = cluster["alice"][1]
    x = torch.arange(8, dtype=torch.int64).send(alice)
    ids = [new_id(), new_id()]
    args = (m.ObjectRef(x.id_at_location),) * 4
    for parties, match in ((["alice", "dave"], "(?i)no peer opening round|peer"),  # dave runs no such round
                           (["alice", "mallory"], "(?i)does not know|no peer")):  # not a configured peer
        with pytest.raises(VeilError, match=match):
            hook.local_worker.send_msg(PeerOpenMessage("beaver_mask", args, {}, new_round(), parties, ids), alice)
    with pytest.raises(VeilError, match="(?i)not among the parties"):  # alice must be one of the parties
        hook.local_worker.send_msg(PeerOpenMessage("beaver_mask", args, {}, new_round(), ["bob", "dave"], ids), alice)
    for oid in ids:  # nothing opened was stored
        with pytest.raises(VeilError):
            sy.PointerTensor(alice, oid, hook.local_worker, (8,), torch.int64).get()
    _unchanged(cluster, stored)


def new_round() -> str:
    import secrets

    return secrets.token_hex(16)


@pytest.mark.parametrize("cluster", [20], indirect=True)
def test_a_hostile_partys_wrong_values_end_the_round_and_nothing_is_stored(hook, cluster):
    """bob runs two-party rounds with the sink charlie, which answers bob's fetch with values of the wrong
    count, shape, size or dtype: each round fails at bob at once and stores nothing; a good answer (and
    charlie taking bob's share) completes one, whose opened value is what the two published, summed."""
    stored = _stored_before(cluster)
    bob = cluster["bob"][1]
    x = torch.arange(6, dtype=torch.int64).send(bob)
    ref = m.ObjectRef(x.id_at_location)
    good = [torch.full((6,), 5, dtype=torch.int64)] * 2
    bad = [[torch.zeros(7, dtype=torch.int64)] * 2, [torch.zeros(6, dtype=torch.int32)] * 2,
           [torch.zeros(6, dtype=torch.float64)] * 2, [torch.zeros(1 << 20, dtype=torch.int64)] * 2, good[:1],
           good * 2]
    for values in bad:
        round_id, ids = new_round(), [new_id(), new_id()]
        REPLIES[round_id] = values
        with pytest.raises(VeilError, match="(?i)shapes and dtypes|values"):
            hook.local_worker.send_msg(PeerOpenMessage("beaver_mask", (ref,) * 4, {}, round_id, ["bob", "charlie"],
                                                       ids), bob)
        for oid in ids:
            with pytest.raises(VeilError):
                sy.PointerTensor(bob, oid, hook.local_worker, (6,), torch.int64).get()
    round_id, ids, errors = new_round(), [new_id(), new_id()], {}
    REPLIES[round_id] = good
    thread = _start(hook, bob, PeerOpenMessage("beaver_mask", (ref,) * 4, {}, round_id, ["bob", "charlie"], ids),
                    errors, "bob")
    as_charlie = _as(hook, cluster["bob"][0], _peer_token("charlie"), "charlie")
    try:  # charlie takes bob's share: x - x = 0 for both beaver_mask outputs
        assert all(torch.equal(t, torch.zeros(6, dtype=torch.int64)) for t in _fetch(hook, as_charlie, round_id))
    finally:
        as_charlie.close()
    thread.join(120)
    assert not errors, errors
    for oid in ids:
        assert torch.equal(sy.PointerTensor(bob, oid, hook.local_worker, (6,), torch.int64).get(), good[0])
    _unchanged(cluster, stored)


# the workers wait 20 s (not 45) for a round's fetches: the attacks below take a few seconds; the abandoned
# round ends when its orchestrator closes the connection (the wait bounds it if cancellation failed)
@pytest.mark.parametrize("cluster", [20], indirect=True)
def test_fetches_of_non_parties_other_steps_twice_or_after_the_round_was_abandoned_are_refused(hook, cluster):
    """alice and bob run a three-party round with the sink "charlie", which answers their fetches but never
    takes their shares: both wait for charlie. Meanwhile dave (a peer, not a party), a fetch for another
    step and a second fetch from charlie are refused at bob; charlie's one fetch gets bob's share and
    completes bob's round. alice's orchestrator disconnects (her round is abandoned): charlie's fetch,
    arriving now, is refused, and nothing was stored under alice's ids."""
    stored = _stored_before(cluster)
    round_id = new_round()
    good = [torch.full((6,), 5, dtype=torch.int64)] * 2
    REPLIES[round_id] = good
    orchestrator = {n: _as(hook, cluster[n][0], TOKEN, "orchestrator") for n in ("alice", "bob")}
    ids = {n: [new_id(), new_id()] for n in orchestrator}
    x = torch.arange(6, dtype=torch.int64)
    shares = {n: x.send(c) for n, c in orchestrator.items()}
    errors = {}
    threads = {}
    for n in orchestrator:
        ref = m.ObjectRef(shares[n].id_at_location)
        msg = PeerOpenMessage("beaver_mask", (ref,) * 4, {}, round_id, ["alice", "bob", "charlie"], ids[n])
        threads[n] = _start(hook, orchestrator[n], msg, errors, n)
    bob = cluster["bob"][0]
    attacks = [("dave", "beaver_mask", "(?i)not a reader"),
               ("charlie", "trunc_mask", "(?i)opens 'beaver_mask'"),
               ("charlie", "beaver_mask", None),  # the fetch bob's round waits for: answered ...
               ("charlie", "beaver_mask", "(?i)already took|ended|no peer opening round")]  # ... once
    for sender, step, match in attacks:
        conn = _as(hook, bob, _peer_token(sender), sender)
        try:
            if match is None:
                got = _fetch(hook, conn, round_id, step)
                assert all(torch.equal(t, torch.zeros(6, dtype=torch.int64)) for t in got)  # bob's x - x
            else:
                with pytest.raises(VeilError, match=match):
                    _fetch(hook, conn, round_id, step)
        finally:
            conn.close()
    threads["bob"].join(120)
    assert "bob" not in errors, errors
    # bob opened x - x from itself and alice (0) plus charlie's 5: what the parties published, summed mod 2^64
    for oid in ids["bob"]:
        got = sy.PointerTensor(orchestrator["bob"], oid, hook.local_worker, (6,), torch.int64).get()
        assert torch.equal(got, good[0])
    orchestrator["alice"].close()  # alice still waits for charlie's fetch: her round is abandoned
    threads["alice"].join(120)
    assert "alice" in errors
    _until_ended(hook, cluster["alice"][0], round_id)  # the worker cancels the departed session's round
    conn = _as(hook, cluster["alice"][0], _peer_token("charlie"), "charlie")
    try:
        with pytest.raises(VeilError, match="(?i)ended|no peer opening round"):
            _fetch(hook, conn, round_id)
    finally:
        conn.close()
    orchestrator["bob"].close()
    _unchanged(cluster, stored)
