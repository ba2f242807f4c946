"""Red team: who gets a network worker's connection slots, and what a session may pin (serving clusters).

The attackers: a serving client (hostile in the threat model), several of them together, a peer worker,
and a session that keeps sending while its reader is busy. What must hold: each client has slots of its
own that another client cannot take, clients together cannot lock the model owner out, hostile peers
cannot lock the data owner's admin token out, and a busy session has about its message limit queued.

Found here, and fixed (each test asserts the safe behaviour):
- every serving client of a ``Cluster`` held the one client token, so one client could hold all of its 48
  slots and lock every other client out. Now the owner issues each client a token of its own
  (``Cluster.issue_client_token(name)``, ``save(path, client=name)``; parties take ``--client-issuer``):
  principal ``client/NAME`` with at most 4 sessions, allowed wherever the client user is;
- clients with tokens of their own (or several ``--client`` tokens) together took every unreserved slot:
  client-role sessions now hold at most 3/4 of a worker's slots, and where clients may have tokens of
  their own, table tokens (the shared one) half of that, so its holders cannot starve the others;
- the reserved slots were shared by the admin token and peers: a hostile peer took them all and the owner's
  admin token got 503. The last half of them (at least one) are now the admin's alone;
- a session whose reader was busy (a waiting fetch, a long command) had up to 5 messages of its message
  limit (quota + 1 MiB) queued, one frame each: reading now pauses once the queue passes the limit in bytes
  (a session that reads none of its replies already had its reading paused with its writes);
- one client with its own token filled a service's whole queue through its 4 sessions: such a client now
  queues at most an eighth of the service's bytes;
- the owner's serving loop took batches in queue order, so a client session that queued many requests first
  held every later client back for all of its batches: the session served longest ago now goes first.

- a model owner whose connection ended (its process killed) left its service open: clients' requests were
  queued and waited for their whole timeout. The service now closes with the session that opened it;
- an owner opening the service again dropped its clients' computed results and queued requests silently:
  results now stay fetchable, and queued requests fail at once.

Held (regression guards): a client gone mid-request (reset, reset mid-frame, close) leaves no queued
request and no slot.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

import veil as sy
from veil.exceptions import ObjectNotFoundError
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.serving import protocol
from veil.serving.errors import ServingError
from veil.serving.protocol import ServingMessage
from veil.workers.client_tokens import issue
from veil.workers.websocket_auth import authenticate, handshake_headers
from veil.workers.websocket_server import WebsocketServerWorker
from veil.workers.websocket_transport import BlockingConnection, frame_head

from worker_processes import serve_in_thread, stop_served

SECRET = "serving-slots-issuer-secret-0123456789"
OWNER, SHARED, ADMIN, PEER = "model-owner-token", "shared-client-token", "admin-token-xyz", "peer-token-xyz"


def _table(**extra: str) -> sy.TokenTable:
    tokens = sy.TokenTable()
    tokens.add(OWNER, "model-owner", "scientist")
    tokens.add(SHARED, "client", "client")
    tokens.add(ADMIN, "owner", "admin")
    tokens.add(PEER, "cp", "peer")
    tokens.add_issuer(SECRET, "client")
    for name, token in extra.items():
        tokens.add(token, name, "scientist" if name.startswith("sci") else "client")
    return tokens


@pytest.fixture
def serve(hook):
    """``serve(tokens, **worker_options) -> worker``: served from a thread, stopped after the test."""
    started = []

    def start(tokens: sy.TokenTable, **options) -> WebsocketServerWorker:
        w = WebsocketServerWorker(hook, id=f"slots-{time.monotonic_ns()}", port=0, tokens=tokens, **options)
        started.append((w, serve_in_thread(w)))
        return w

    yield start
    for w, thread in started:
        stop_served(w, thread)


@pytest.fixture
def conns():
    made: list[BlockingConnection] = []
    yield made
    for c in made:
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass


def _connect(w: WebsocketServerWorker, token: str, conns: list) -> BlockingConnection:
    c = BlockingConnection(f"ws://127.0.0.1:{w.bound_port}", handshake_headers(token), open_timeout=30)
    conns.append(c)
    return c


def _flood(w, token: str, conns: list, most: int = 80) -> int:
    """Connections ``token`` gets before the worker refuses one (kept open)."""
    got = 0
    for _ in range(most):
        try:
            _connect(w, token, conns)
        except Exception:  # noqa: BLE001  (503: no slot for it)
            return got
        got += 1
    return got


def _ask(conn: BlockingConnection, msg) -> object:
    conn.send(serialize(msg, sender="c"))
    return deserialize(conn.recv(60))[0]


# ------------------------------------------------------------------ slots

def test_each_issued_client_token_is_its_own_principal_with_its_own_slots(serve, conns):
    """Attack: a holder of the shared client token (every client had it) opens connections until refused, then
    client alice (her own issued token) does the same, on a worker whose principals may hold 48 sessions (a
    cluster's party). Must hold: the shared token gets half the client share (24), alice at most
    ``max_sessions_per_client``; client bob (his own token) and the model owner still get sessions; tokens
    forged from alice's (another holder's name with her MAC, a cut MAC, another issuer, another secret) are
    refused as unknown tokens."""
    w = serve(_table(), max_sessions_per_principal=48)
    alice, bob = issue(SECRET, "client", "alice"), issue(SECRET, "client", "bob")
    assert _flood(w, SHARED, conns) == 24
    assert _flood(w, alice, conns) == w.max_sessions_per_client == 4
    _connect(w, bob, conns)
    _connect(w, OWNER, conns)
    prefix, issuer, _, mac = alice.split(".")
    for forged in (f"{prefix}.{issuer}.bob.{mac}", alice[:-2], f"{prefix}.scientist.alice.{mac}",
                   issue("another-secret-0123456789", "client", "alice")):
        with pytest.raises(Exception, match="401"):
            _connect(w, forged, conns)


def test_clients_together_cannot_lock_out_the_model_owner(serve, conns):
    """Attack: four clients with table tokens (``--client``, each its own per-principal cap of 4), then clients
    with issued tokens, open connections on a worker of 16 slots until refused. They took all 15 unreserved
    slots and the model owner (a scientist: no reserved slot) got 503. Must hold: client-role sessions hold
    at most 3/4 of the slots (12), table tokens half of that, so the owner still gets a session."""
    tokens = _table(c1="client-token-1", c2="client-token-2", c3="client-token-3", c4="client-token-4")
    w = serve(tokens, max_connections=16)
    assert sum(_flood(w, t, conns) for t in ("client-token-1", "client-token-2", "client-token-3",
                                             "client-token-4")) == 6
    assert sum(_flood(w, issue(SECRET, "client", name), conns) for name in ("eve", "mallory", "trent")) == 6
    _connect(w, OWNER, conns)


def test_hostile_peers_cannot_take_the_slots_kept_for_the_admin(serve, conns):
    """Attack: scientists fill every unreserved slot of a 32-slot worker, then a peer (hostile: a compromised
    worker) opens connections until refused, taking the slots kept for the admin and peers. Must hold: the
    data owner's admin token still gets a session (the last reserved slot is the admin's alone)."""
    tokens = _table(sci1="scientist-token-1", sci2="scientist-token-2", sci3="scientist-token-3")
    w = serve(tokens, max_connections=32)
    assert sum(_flood(w, t, conns) for t in ("scientist-token-1", "scientist-token-2", "scientist-token-3")) == 24
    assert _flood(w, OWNER, conns) == 6  # 30: the unreserved slots are full
    peers = _flood(w, PEER, conns)
    _connect(w, ADMIN, conns)
    assert peers == 1  # one of the two reserved slots; the other is the admin's


@pytest.mark.parametrize("how", ["rst", "mid-frame", "close"])
def test_a_client_gone_mid_request_leaves_no_slot_and_no_request_behind(serve, conns, how):
    """Attack: a client with its own token opens its 4 sessions, each submits a request and asks for its
    result, then the client vanishes (a TCP reset, as kill -9 leaves it, also halfway through a 1 MiB frame,
    or a plain close). Must hold: its requests leave the service's queue, and its 4 slots come back."""
    w = serve(_table())
    owner = _connect(w, OWNER, conns)
    info = {"input_shape": [1, 4], "output_shape": [1, 2], "max_rows": 4}
    assert type(_ask(owner, ServingMessage("open", "m", [["client"], info]))) is m.ObjectsReply
    alice = issue(SECRET, "client", "alice")
    mine = [_connect(w, alice, []) for _ in range(4)]
    for i, c in enumerate(mine):
        assert type(_ask(c, ServingMessage("submit", "m", [i, torch.zeros(1, 4, dtype=torch.int64)]))) \
            is m.ObjectsReply
        c.send(serialize(ServingMessage("fetch", "m", [i, 1.0]), sender="c"))  # waiting on the worker
    pending = _ask(owner, ServingMessage("pending", "m", [0, []]))
    assert len(pending.objects) == 4
    for c in mine:
        if how == "mid-frame":
            c.sock.sendall(frame_head(0x82, 1 << 20, masked=True) + bytes(4 + 100_000))
        if how != "close":
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            c.sock.close()
        else:
            c.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (_ask(owner, ServingMessage("pending", "m", [0, []])).objects
                                           or len(w.sessions) > 1):
        time.sleep(0.1)
    assert _ask(owner, ServingMessage("pending", "m", [0, []])).objects == []
    assert _flood(w, alice, conns) == 4


def _long_fetch_waits(monkeypatch) -> float:
    """A fetch may wait 30 s here (MAX_WAIT is 1 s): a fetch answered only once its wait ran out takes 30 s, one
    answered at once well under the 20 s the tests allow, however loaded the machine."""
    from veil.serving import protocol

    monkeypatch.setattr(protocol, "MAX_WAIT", 30.0)
    return 30.0


def test_clients_hear_at_once_when_the_model_owners_connection_is_gone(serve, conns, monkeypatch):
    """Fault: the model owner's process dies (kill -9: a TCP reset) while a client's request is queued and
    another client waits on a fetch. The shares of the model were its session's and went with it, but the
    service stayed open: queued requests were never answered, new ones were accepted, and every client
    waited for its whole timeout (120 s by default). Must hold: the clients hear at once that the request
    failed, and a new submit is refused as the service being closed."""
    w = serve(_table())
    owner = _connect(w, OWNER, conns)
    info = {"input_shape": [1, 4], "output_shape": [1, 2], "max_rows": 4}
    assert type(_ask(owner, ServingMessage("open", "m", [["client"], info]))) is m.ObjectsReply
    alice = _connect(w, issue(SECRET, "client", "alice"), conns)
    share = torch.zeros(1, 4, dtype=torch.int64)
    assert type(_ask(alice, ServingMessage("submit", "m", [1, share]))) is m.ObjectsReply
    owner.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    owner.sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(w.sessions) > 1:
        time.sleep(0.05)
    wait = _long_fetch_waits(monkeypatch)
    started = time.monotonic()
    failed = _ask(alice, ServingMessage("fetch", "m", [1, wait]))
    assert type(failed) is m.ErrorReply and "owner's connection closed" in failed.message, failed
    assert time.monotonic() - started < 20  # answered, not waited out
    refused = _ask(alice, ServingMessage("submit", "m", [2, share]))
    assert type(refused) is m.ErrorReply and refused.error == "ServiceClosedError", refused


def test_a_service_opened_again_keeps_computed_results_and_fails_the_rest_at_once(serve, conns, monkeypatch):
    """Fault: the model owner shares the model again under the same name (a restarted owner script) while a
    client has one result computed and one request queued. ``open`` replaced the service: the computed
    result and the queued request were dropped silently, and the client waited for both until its timeout.
    Must hold: the computed result is still the client's to fetch (the value the owner responded with), and
    the queued request fails at once."""
    w = serve(_table())
    owner = _connect(w, OWNER, conns)
    info = {"input_shape": [1, 4], "output_shape": [1, 4], "max_rows": 4}
    assert type(_ask(owner, ServingMessage("open", "m", [["client"], info]))) is m.ObjectsReply
    alice = _connect(w, issue(SECRET, "client", "alice"), conns)
    share = torch.arange(4, dtype=torch.int64).reshape(1, 4)
    for rid in (1, 2):
        assert type(_ask(alice, ServingMessage("submit", "m", [rid, share + rid]))) is m.ObjectsReply
    assert _ask(owner, ServingMessage("claim", "m", [[1], 555])).objects == [1]
    reply = _ask(owner, ServingMessage("respond", "m", [[1], [1], m.ObjectRef(555)]))
    assert type(reply) is m.ObjectsReply, reply
    assert type(_ask(owner, ServingMessage("open", "m", [["client"], info]))) is m.ObjectsReply  # again
    wait = _long_fetch_waits(monkeypatch)
    started = time.monotonic()
    assert torch.equal(_ask(alice, ServingMessage("fetch", "m", [1, wait])).objects[0], share + 1)
    failed = _ask(alice, ServingMessage("fetch", "m", [2, wait]))
    assert type(failed) is m.ErrorReply and "opened the service again" in failed.message, failed
    assert time.monotonic() - started < 20  # (answered, not waited out)


# ------------------------------------------------------------------ serving clusters

def test_a_cluster_issues_each_client_its_own_token_and_its_parties_accept_it(tmp_path):
    """A cluster's parties take its client secret (``Cluster.worker_args`` -> ``--client-issuer``), so a token
    ``issue_client_token`` makes is principal ``client/NAME`` there; the crypto provider takes none. The file
    ``save(path, client=NAME)`` writes holds that client's token alone: not the shared client token, not
    the secret, not the owner's token; ``save(path)`` still writes the shared one (the existing API)."""
    import argparse

    from veil.serving.cluster import Cluster, NetworkWorker
    from veil.workers import websocket_cli

    cluster = Cluster(*(NetworkWorker(f"127.0.0.1:{7000 + i}") for i in range(3)), auto_managed=True)
    alice = cluster.issue_client_token("alice")
    parser = argparse.ArgumentParser(fromfile_prefix_chars="@")
    websocket_cli.configure(parser)
    for w in cluster.workers:
        table, _ = websocket_cli._token_table(parser.parse_args(["--id", w.id, *cluster.worker_args(w)]))
        found = table.lookup(alice)
        if w is cluster.crypto_provider:
            assert found is None
        else:
            assert (found.name, found.role, found.issued_by) == ("client/alice", "client", "client")
            assert table.lookup(cluster.client_token).name == "client"  # the shared token still works
            assert table.lookup(cluster.issue_client_token("bob")).name == "client/bob"
    text = cluster.save(tmp_path / "alice.json", client="alice").read_text()
    assert json.loads(text)["client_token"] == alice
    for secret in (cluster.client_token, cluster.client_secret, cluster.owner_token, cluster.peer_token):
        assert secret not in text
    assert Cluster.load(tmp_path / "alice.json").client_token == alice
    assert json.loads(cluster.save(tmp_path / "all.json").read_text())["client_token"] == cluster.client_token
    with pytest.raises(ServingError, match="client secret"):
        Cluster.load(tmp_path / "all.json").issue_client_token("carol")
    with pytest.raises(ServingError, match="holder"):
        cluster.issue_client_token("a.b")


def test_an_issued_client_queries_services_open_to_clients_only_and_can_be_revoked_alone(hook):
    """An issued client (``client/alice``) may query a service open to the client user, as the shared token
    does, and no service open to other users only; it may send only the client's requests; revoking
    ``client/alice`` refuses her token and no other client's."""
    tokens = _table()
    w = WebsocketServerWorker(hook, id=f"slots-svc-{time.monotonic_ns()}", port=0, tokens=tokens)
    alice_token = issue(SECRET, "client", "alice")

    def session(token):
        s = authenticate(tokens, [token])
        w.sessions[s.id] = s
        return s

    def ask(s, msg):
        return deserialize(w.serve_bytes(serialize(msg, sender="c"), s))[0]

    owner, alice, shared = session(OWNER), session(alice_token), session(SHARED)
    info = {"input_shape": [1, 4], "output_shape": [1, 2], "max_rows": 4}
    assert type(ask(owner, ServingMessage("open", "m", [["client"], info]))) is m.ObjectsReply
    assert type(ask(owner, ServingMessage("open", "n", [["someone"], info]))) is m.ObjectsReply
    assert ask(alice, ServingMessage("info", "m", [])).objects[0]["input_shape"] == [1, 4]
    assert ask(shared, ServingMessage("info", "m", [])).objects[0]["input_shape"] == [1, 4]
    refused = ask(alice, ServingMessage("info", "n", []))
    assert type(refused) is m.ErrorReply and "client/alice" in refused.message
    assert type(ask(alice, ServingMessage("open", "x", [["client"], info]))) is m.ErrorReply
    assert type(ask(alice, m.ObjectMessage([m.StoredObject(5, torch.ones(2))]))) is m.ErrorReply
    assert w.revoke("client/alice") == 1  # (the owner's `veil users revoke client/alice`): her session too
    assert alice.revoked and not shared.revoked
    assert tokens.lookup(alice_token) is None
    assert tokens.lookup(issue(SECRET, "client", "bob")).name == "client/bob"
    del protocol._SERVICES[w]


def test_a_leaked_issued_token_is_revoked_before_its_holder_ever_connects(hook):
    """An owner learns that client carol's issued token leaked before carol (or the thief) ever connected: the
    worker had never seen ``client/carol``, so ``veil users revoke client/carol`` answered "no user named" and
    the token stayed good. Must hold: the name of any client the worker's issuer would accept can be revoked
    ahead of use; a name no issuer here gives stays unknown; other issued clients are untouched."""
    tokens = _table()
    w = WebsocketServerWorker(hook, id=f"slots-pre-{time.monotonic_ns()}", port=0, tokens=tokens)
    carol = issue(SECRET, "client", "carol")
    assert w.revoke("client/carol") == 0  # nobody connected: no session closed, the token refused from now on
    assert tokens.lookup(carol) is None
    assert tokens.lookup(issue(SECRET, "client", "dave")).name == "client/dave"
    for unknown in ("nobody/carol", "client/", "client/a.b"):
        with pytest.raises(ObjectNotFoundError):
            w.revoke(unknown)
    w.readmit("client/carol")
    assert tokens.lookup(carol).name == "client/carol"


def test_one_issued_client_cannot_fill_a_services_queue_with_its_sessions(hook, monkeypatch):
    """Attack: client alice opens her 4 sessions and queues the most each session may (2 requests here; the
    bounds are small, the checks the 64 MiB / 1 GiB defaults'), filling the service's whole queue (8): client
    bob's request is then refused as "busy". Must hold: a client with its own token queues at most an
    eighth of the service's bytes over all its sessions (here one session's share), so bob is served."""
    share = torch.zeros(1, 4, dtype=torch.int64)
    monkeypatch.setattr(protocol, "MAX_SESSION_BYTES", 2 * 32)
    monkeypatch.setattr(protocol, "MAX_PENDING_BYTES", 8 * 32)
    tokens = _table()
    w = WebsocketServerWorker(hook, id=f"slots-queue-{time.monotonic_ns()}", port=0, tokens=tokens)

    def session(token):
        s = authenticate(tokens, [token])
        w.sessions[s.id] = s
        return s

    def ask(s, msg):
        return deserialize(w.serve_bytes(serialize(msg, sender="c"), s))[0]

    owner = session(OWNER)
    info = {"input_shape": [1, 4], "output_shape": [1, 2], "max_rows": 4}
    assert type(ask(owner, ServingMessage("open", "m", [["client"], info]))) is m.ObjectsReply
    alice = [session(issue(SECRET, "client", "alice")) for _ in range(4)]
    taken = sum(type(ask(s, ServingMessage("submit", "m", [i, share]))) is m.ObjectsReply
                for s in alice for i in range(2))
    bob = session(issue(SECRET, "client", "bob"))
    replies = [ask(bob, ServingMessage("submit", "m", [i, share])) for i in range(2)]
    assert all(type(r) is m.ObjectsReply for r in replies), replies
    assert taken == 2
    del protocol._SERVICES[w]


@pytest.fixture
def serving(hook, serving_cluster_pool):
    """(the shared serving cluster of tests/serving, serving_helpers) — started here when no module has yet."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
    import serving_helpers

    c = serving_cluster_pool.get("cluster")
    if c is None or not c._processes or not all(p.alive() for p in c._processes):
        if c is not None:
            c.stop()
        c = serving_cluster_pool["cluster"] = serving_helpers.new_cluster().start()
    yield c, serving_helpers
    serving_helpers._stop_services(c)


@pytest.mark.slow  # (a cluster of three worker processes, unless tests/serving started one)
def test_a_client_with_its_own_token_queries_a_served_model(serving, tmp_path):
    """End to end: the owner issues alice a token and a cluster file of her own; a ModelClient with either gets
    the model's output (vs plain torch), and her principal's cap does not stop her from querying while
    another client holds every connection it may."""
    from veil.workers.registry import HookContext

    cluster, helpers = serving
    model, expected = helpers.served_small_model(cluster, "issued-e2e")
    alice = sy.ModelClient(hook=HookContext(), timeout=60)
    bob = sy.ModelClient(hook=HookContext(), timeout=60)
    hogs = []
    try:
        bob_token = cluster.issue_client_token("bob")
        for _ in range(8):
            try:
                hogs.append(BlockingConnection(f"ws://{cluster.parties[0].address}", handshake_headers(bob_token),
                                               open_timeout=30))
            except Exception:  # noqa: BLE001  (503: bob has all his slots)
                break
        assert len(hogs) == 4
        alice.connect_to_model((1, 4), (1, 2), cluster.save(tmp_path / "alice.json", client="alice"),
                               name="issued-e2e")
        helpers.assert_query_ok(alice, expected)
        for c in hogs:
            c.close()
        bob.connect_to_model((1, 4), (1, 2), cluster, token=bob_token, name="issued-e2e")
        helpers.assert_query_ok(bob, expected)
    finally:
        for c in (alice, bob):
            c.close()
        for c in hogs:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        model.stop()


def test_a_client_that_queued_first_does_not_hold_back_every_later_client(monkeypatch):
    """Attack: one client session queues 40 requests before client bob queues one. The owner's loop took batches
    in queue order (one client session per batch): bob waited for all three of the attacker's batches (with
    48 sessions of 32 requests, over 60 batches, past a client's timeout). Must hold: the loop takes the
    session served longest ago next, so bob's request is in the second batch, and every request is served."""
    from veil.serving.service import ModelService

    queue = [[r, 1, "attacker"] for r in range(1, 41)] + [[100, 1, "bob"]]
    batches: list = []
    svc = ModelService.__new__(ModelService)
    svc.parties, svc._known, svc._partial, svc.partial_timeout, svc.failed_requests = [0, 1], [], {}, 30.0, 0
    svc.max_rows, svc._linger, svc._requeued, svc.served, svc._waited = 64, (None, 0), frozenset(), 0, False
    svc._turns, svc._last_turn = 0, {}

    def call_all(action, per_party_args, return_errors=False):
        assert action == "pending"
        return [[[r, n, f"{g}@party{i}"] for r, n, g in queue] for i in range(2)]

    def compute(rids):
        batches.append(rids)
        queue[:] = [q for q in queue if q[0] not in rids]
        return True

    monkeypatch.setattr(svc, "_call_all", call_all, raising=False)
    monkeypatch.setattr(svc, "_compute", compute, raising=False)
    while queue and len(batches) < 10:
        svc.step(16)
    assert sorted(r for b in batches for r in b) == [*range(1, 41), 100]
    assert batches[1] == [100], batches


# ------------------------------------------------------------------ what a busy session may queue

def _queued_bytes(w: WebsocketServerWorker) -> int:
    """Bytes of frames queued for the worker's connections' readers (read from the test's thread: retried
    if the loop changes a queue meanwhile)."""
    while True:
        try:
            return sum(len(f.data) for ws, _ in list(w._connections.values()) for f in list(ws.recv_messages.frames.queue))
        except RuntimeError:
            continue


def _frame(payload: bytes) -> bytes:
    """One unfragmented binary frame, as a raw client sends it (masked with the all-zero key; veil's own
    client would send 1 MiB fragments)."""
    return frame_head(0x82, len(payload), masked=True) + b"\0\0\0\0" + payload


def test_a_busy_session_cannot_queue_past_its_message_limit(serve, conns):
    """Attack: a client whose session quota is 4 MiB (message limit 5 MiB) sends a fetch that waits a second on
    the worker (its reader awaits the reply meanwhile), then six messages of almost 5 MiB at once, each one
    frame. websockets
    pauses reading past 4 queued frames whatever their size: 5 of them (25 MiB, 5 times the quota) were held.
    Must hold: the queue holds at most twice the message limit (reading pauses past the limit in bytes), and
    the session is then served as before (every request answered, in order)."""
    quota = 4 * 2**20
    w = serve(_table(), max_session_bytes=quota)
    owner = _connect(w, OWNER, conns)
    info = {"input_shape": [1, 4], "output_shape": [1, 2], "max_rows": 4}
    assert type(_ask(owner, ServingMessage("open", "m", [["client"], info]))) is m.ObjectsReply
    alice = _connect(w, issue(SECRET, "client", "alice"), conns)
    limit = quota + 2**20
    junk = b"\x00" * (limit - 4096)  # not a veil message: each is answered with an error, once read
    alice.send(serialize(ServingMessage("fetch", "m", [99, 1.0]), sender="c"))
    frame = _frame(junk)
    flood = threading.Thread(target=lambda: [alice.sock.sendall(frame) for _ in range(6)], daemon=True)
    flood.start()
    peak, end = 0, time.monotonic() + 0.9
    while time.monotonic() < end:
        peak = max(peak, _queued_bytes(w))
        time.sleep(0.005)
    flood.join(30)
    assert not flood.is_alive()
    replies = [deserialize(alice.recv(60))[0] for _ in range(7)]
    assert replies[0].objects == [] and all(type(r) is m.ErrorReply for r in replies[1:])
    assert _ask(alice, ServingMessage("info", "m", [])).objects[0]["max_rows"] == 4
    assert peak > 0, "nothing was queued: the attack did not run"
    print(f"peak queued {peak / 2**20:.1f} MiB")
    assert peak <= 2 * limit, f"a busy session had {peak / 2**20:.1f} MiB queued (limit {limit >> 20} MiB)"
