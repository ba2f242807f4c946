"""Red team, peer openings (veil/workers/peer_openings.py): parties send Beaver opening shares to each other.

Four ``veil worker`` processes, each presenting its own peer token: alice, bob and charlie (parties)
and dave (a peer of everyone that holds no share). The attacks: shares from a client or scientist
token, a non-party peer, a party twice, of the wrong shape / dtype / size, for a round that ended
(replay) or was abandoned (its orchestrator gone), a round id reused, an orchestrator naming a
non-party peer or an unknown worker. After each, nothing was stored or revealed, the workers still
serve a peer-opened product equal to torch's, and the objects stored before are unchanged.
"""

from __future__ import annotations

import threading

import pytest
import torch

import veil as sy
from veil.exceptions import VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.tensors.mpc_glue.runtime import enable_peer_openings
from veil.workers.peer_openings import PEER_SHARE, PeerOpenMessage

from network_helpers import PEER, TOKEN
from worker_processes import spawned_workers

CLIENT = "net-client-token-for-peer-tests"
NAMES = ("alice", "bob", "dave")  # veil worker processes; charlie is a sink the test runs (a malicious party)


def _peer_token(name: str) -> str:
    return f"{PEER}-{name}"


@pytest.fixture(scope="module")
def sink():
    """A fake party "charlie": accepts any peer connection and answers every request with OkReply
    (it takes the shares it is sent and never sends its own)."""
    from websockets.sync.server import serve

    from veil.messaging.serde import serialize
    from veil.workers.websocket_launcher import free_port

    def handler(ws):
        for _ in ws:
            ws.send(serialize(m.OkReply(), sender="charlie"))

    port = free_port()
    server = serve(handler, "127.0.0.1", port, max_size=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()


@pytest.fixture(scope="module")
def cluster(request, hook, sink):
    """name -> (process, scientist connection); peer openings enabled on alice and bob. The workers wait
    ``request.param`` seconds (default 45) for a round's shares or registration. One cluster per module
    and wait (starting four processes costs ~9 s): every test leaves it serving, which each one checks
    (``_unchanged``), and the attacks that abandon a round get a cluster of their own (their own wait)."""
    from veil.workers.websocket_launcher import free_port

    from veil.tensors.mpc_glue import runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VEIL_PEER_WAIT_SECONDS", str(getattr(request, "param", 45)))
        mp.setattr(runtime, "PEER_MIN_ELEMENTS", 0)  # the attacks' small rounds go party to party too
        ports = {n: free_port() for n in NAMES}
        ports["charlie"] = sink
        procs, conns = {}, {}
        spawning = spawned_workers()
        spawn = next(spawning)
        try:
            for n in NAMES:
                args = ["--token", TOKEN, f"--client=serving-client={CLIENT}"]
                for other in ports:
                    if other != n:
                        args += ["--peer", f"{other}=127.0.0.1:{ports[other]}", "--peer-token",
                                 f"{other}={_peer_token(n)}", "--accept-peer", f"{other}={_peer_token(other)}"]
                procs[n] = spawn(n, args, port=ports[n])
            conns = {n: sy.WebsocketClientWorker(hook, id=n, host="127.0.0.1", port=procs[n].port, token=TOKEN,
                                                 timeout=120) for n in NAMES}
            enable_peer_openings(conns["alice"], conns["bob"])
            yield {n: (procs[n], conns[n]) for n in NAMES}
            enable_peer_openings(conns["alice"], conns["bob"], enabled=False)
        finally:
            for c in conns.values():
                c.close()
            next(spawning, None)  # kills the processes


def _as(hook, proc, token: str, name: str):
    """A connection to ``proc`` presenting ``token`` (a peer's, a client's, ...)."""
    return sy.WebsocketClientWorker(hook, id=f"{name}-as-{proc.id}-{new_id()}", host="127.0.0.1", port=proc.port,
                                    token=token, timeout=90)


def _share(hook, conn, round_id: str, values: list, name: str = "beaver_mask"):
    return hook.local_worker.send_msg(m.CommandMessage(PEER_SHARE, (round_id, name, *values), {}, [], False), conn)


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

    exchange = outbox.Outbox._exchange

    def spy(self, msg, location, prelude):
        if type(msg) is PeerOpenMessage:
            seen.append((location.id, msg))
        return exchange(self, msg, location, prelude)

    monkeypatch.setattr(outbox.Outbox, "_exchange", spy)
    return seen


def test_peer_command_and_peer_opening_need_a_peer_token(hook, cluster):
    stored = _stored_before(cluster)
    bob = cluster["bob"][0]
    values = [torch.zeros(16, 8, dtype=torch.int64)] * 2
    for token in (TOKEN, CLIENT):  # a scientist (full rights otherwise) and a serving client
        conn = _as(hook, bob, token, "intruder")
        try:
            with pytest.raises(VeilError, match="(?i)peer|client token"):
                _share(hook, conn, "a" * 32, values)
        finally:
            conn.close()
    conn = _as(hook, bob, CLIENT, "client")
    try:  # a client may not start a peer opening either (it may only submit queries and fetch results)
        with pytest.raises(VeilError, match="(?i)client"):
            hook.local_worker.send_msg(PeerOpenMessage("beaver_mask", (), {}, "b" * 32, ["alice", "bob"], [1, 2]), conn)
    finally:
        conn.close()
    _unchanged(cluster, stored)


def test_a_share_for_an_ended_round_is_refused_and_a_round_id_is_used_once(hook, cluster, monkeypatch):
    stored = _stored_before(cluster)
    seen = _rounds_seen(monkeypatch)
    _honest_product(cluster)
    (where, msg), = [s for s in seen if s[0] == "bob"]
    as_alice = _as(hook, cluster["bob"][0], _peer_token("alice"), "alice")
    try:  # replay: alice's peer connection delivers a share for the round that was opened
        with pytest.raises(VeilError, match="(?i)ended|no peer opening round"):
            _share(hook, as_alice, msg.round, [torch.zeros(16, 8, dtype=torch.int64)] * 2)
    finally:
        as_alice.close()
    # the orchestrator opens a step again under the same round id: refused before anything is sent
    bob = cluster["bob"][1]
    x = torch.zeros(16, 8, dtype=torch.int64).send(bob)
    again = PeerOpenMessage("beaver_mask", (m.ObjectRef(x.id_at_location),) * 4, {}, msg.round, ["alice", "bob"],
                            [new_id(), new_id()])
    with pytest.raises(VeilError, match="(?i)not fresh"):
        hook.local_worker.send_msg(again, bob)
    _unchanged(cluster, stored)


@pytest.mark.parametrize("cluster", [3], indirect=True)  # dave waits 3 s for a round it never runs
def test_an_orchestrator_cannot_route_a_share_to_a_non_party_or_unknown_worker(hook, cluster):
    stored = _stored_before(cluster)
    alice = cluster["alice"][1]
    x = torch.arange(8, dtype=torch.int64).send(alice)
    ids = [new_id(), new_id()]
    args = (m.ObjectRef(x.id_at_location),) * 4
    for parties, match in ((["alice", "dave"], "(?i)no peer opening round|peer share"),  # dave runs no such round
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


# the workers wait 20 s (not 45) for a round's shares: the attacks below take a few seconds, and the
# abandoned round then ends after its wait, which this test sits through
@pytest.mark.parametrize("cluster", [20], indirect=True)
def test_shares_of_non_parties_wrong_form_or_after_the_round_was_abandoned_are_refused(hook, cluster):
    """alice and bob run a three-party round with the sink "charlie", which takes their shares and sends
    none: both wait for charlie's. Meanwhile dave (a peer, not a party), shares of the wrong shape, dtype,
    size or count, and a second share from charlie are refused at bob; one good share from charlie
    completes bob's round. alice's orchestrator disconnects (her round is abandoned): charlie's share,
    arriving now, is refused, and nothing was stored under alice's ids."""
    stored = _stored_before(cluster)
    round_id = new_round()
    orchestrator = {n: _as(hook, cluster[n][0], TOKEN, "orchestrator") for n in ("alice", "bob")}
    ids = {n: [new_id(), new_id()] for n in orchestrator}
    x = torch.arange(6, dtype=torch.int64)
    shares = {n: x.send(c) for n, c in orchestrator.items()}
    errors = {}

    def open_on(name):
        ref = m.ObjectRef(shares[name].id_at_location)
        msg = PeerOpenMessage("beaver_mask", (ref,) * 4, {}, round_id, ["alice", "bob", "charlie"], ids[name])
        try:
            hook.local_worker.send_msg(msg, orchestrator[name])
        except Exception as e:  # noqa: BLE001
            errors[name] = e

    threads = {n: threading.Thread(target=open_on, args=(n,)) for n in orchestrator}
    for t in threads.values():
        t.start()
    bob = cluster["bob"][0]
    good = [torch.full((6,), 5, dtype=torch.int64)] * 2
    attacks = [("dave", good, "not a party"),
               ("charlie", [torch.zeros(7, dtype=torch.int64)] * 2, "shapes"),
               ("charlie", [torch.zeros(6, dtype=torch.int32)] * 2, "shapes"),
               ("charlie", [torch.zeros(6, dtype=torch.float64)] * 2, "shapes"),
               ("charlie", [torch.zeros(1 << 20, dtype=torch.int64)] * 2, "shapes"),
               ("charlie", good[:1], "values"),
               ("charlie", good, None),  # the share bob's round waits for: accepted ...
               ("charlie", good, "(?i)already sent|ended|no peer opening round")]  # ... once
    for sender, values, match in attacks:
        conn = _as(hook, bob, _peer_token(sender), sender)
        try:
            if match is None:
                _share(hook, conn, round_id, values)
            else:
                with pytest.raises(VeilError, match=match):
                    _share(hook, conn, round_id, values)
        finally:
            conn.close()
    threads["bob"].join(120)
    assert "bob" not in errors, errors
    # bob opened x - x from itself and alice (0) plus charlie's 5: what the parties sent, summed mod 2^64
    for oid in ids["bob"]:
        got = sy.PointerTensor(orchestrator["bob"], oid, hook.local_worker, (6,), torch.int64).get()
        assert torch.equal(got, good[0])
    orchestrator["alice"].close()  # alice still waits for charlie: her round is abandoned
    threads["alice"].join(120)
    assert "alice" in errors
    conn = _as(hook, cluster["alice"][0], _peer_token("charlie"), "charlie")
    try:
        with pytest.raises(VeilError, match="(?i)ended|no peer opening round"):
            _share(hook, conn, round_id, good)
    finally:
        conn.close()
    orchestrator["bob"].close()
    _unchanged(cluster, stored)
