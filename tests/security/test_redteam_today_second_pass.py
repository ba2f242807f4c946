"""Red team, second pass on today's fixes: attacks on the fixes themselves.

Covers the review queue's denial by digest (a denied value refused under any id), the network worker's bound
on unfinished opening handshakes (``OpeningConnections``), the per-principal connection cap (several tokens in
one handshake, serving clusters' shared client token), the written-storage taint on the inline lane, and the DP
budget's relative slack. Holes are strict xfails asserting the safe behaviour; the
defences that held are ordinary tests.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import veil as sy
from veil.exceptions import RequestDeniedError, ReviewPendingError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.websocket_connections import MAX_OPENING, ConnectionServing, OpeningConnections
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, send_tensor  # noqa: E402

SECRET = torch.tensor([[1.5, -2.25, 3.0], [4.0, 5.5, -6.75]])


def _uid(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


@pytest.fixture
def owner(hook):
    w = sy.VirtualWorker(hook, id=_uid("rt2-owner"))
    w.load(SECRET.clone(), tags=("#clinic",), description="clinic data", policy="review")
    return w


def _data(w):
    return w.search(["#clinic"])[0]


def _outcome(fn) -> str:
    """What the scientist sees of a ``.get()`` under review: "pending", "denied" or "released"."""
    try:
        fn()
    except ReviewPendingError:
        return "pending"
    except RequestDeniedError:
        return "denied"
    return "released"


# ------------------------------------------------------------------------------------------------------- holes


def test_denial_by_digest_is_no_equality_oracle_on_review_data(owner):
    """Attack: the scientist asks for one bit of review data, ``x[0, 0] > 0`` (a 0-d bool, ``True``), and the
    owner denies it. ``release.decide`` now refuses any value with the same digest for this user at once
    (``queue.denied_for``), before the owner sees anything; a value with other bytes is filed as a new pending
    request. So every later ``(x[i, j] > t).get()`` answers "denied" iff the bit is True: a binary search on
    each record's values with no approval, the owner only seeing the requests whose bit was False (and those
    already leaked their bit by being pending). Must hold: the scientist's outcome for a fresh derived value
    does not depend on whether its bytes equal a denied value's (both pending, or both refused). (Fixed: both
    pending; the owner's preview flags the one with the denied bytes.)"""
    x = _data(owner)
    with pytest.raises(ReviewPendingError) as info:
        (x[0, 0] > 0).get()
    owner.release_requests.deny(info.value.request_id, "no row-level answers")
    true_bit = _outcome((x[1, 1] > 5).get)    # 5.5 > 5: True, the denied bytes
    false_bit = _outcome((x[0, 1] > 0).get)   # -2.25 > 0: False, other bytes
    assert {true_bit, false_bit} <= {"pending", "denied"}, (true_bit, false_bit)  # nothing released
    assert true_bit == false_bit, f"the outcome tells the bit: True -> {true_bit}, False -> {false_bit}"


def test_a_denied_object_rewritten_in_place_is_no_equality_oracle(owner):
    """Attack (the same oracle through one object): the owner denies ``b = x[0, 0] > 0`` (True); the scientist
    writes a probe into that very object in place (``b.copy_(x[i, j] > t)``) and asks again. Before, the same
    object with the denied bytes answered "denied" and any other bytes "pending". Must hold: after an in-place
    write the request is a new one whatever the bytes (the request is matched by bytes and op graph root)."""
    x = _data(owner)
    b = x[0, 0] > 0
    with pytest.raises(ReviewPendingError) as info:
        b.get()
    owner.release_requests.deny(info.value.request_id, "no row-level answers")
    outcomes = []
    for probe in (x[1, 1] > 5, x[0, 1] > 0):  # True (the denied bytes), then False
        b.copy_(probe)
        outcomes.append(_outcome(b.get))
    assert outcomes == ["pending", "pending"], outcomes


class _Conn:
    def __init__(self, name: str) -> None:
        self.name, self.aborted = name, False
        self.transport = SimpleNamespace(abort=self._abort)

    def _abort(self) -> None:
        self.aborted = True


@pytest.mark.parametrize("flood_address", [lambda i: f"127.0.{i // 250}.{i % 250 + 2}",
                                           lambda i: f"2001:db8:0:1::{i + 2:x}",
                                           lambda i: f"::ffff:127.1.{i // 250}.{i % 250 + 2}"],
                         ids=["loopback", "ipv6-64", "ipv4-mapped"])
def test_a_distributed_handshake_flood_does_not_evict_a_lone_client(flood_address):
    """Attack: a local user (any 127.0.0.0/8 address is its own on Linux, no privileges needed; a remote one
    with an IPv6 /64) opens ``MAX_OPENING`` connections, each from its own address, each sending a partial
    opening request. ``OpeningConnections.add`` past the limit drops the oldest handshake of the "busiest"
    address, but every address holds one: the tie goes to the first address in the table, the legitimate
    client's, whose handshake is in flight. Repeated, no client can finish a handshake. Must hold: a flood of
    handshakes that all come from one host (one loopback range, one /64) is charged as one source, so the
    flood evicts its own handshakes and not the lone client's."""
    dropped: list = []
    opening = OpeningConnections(on_drop=lambda a, r: dropped.append((a, r)))
    client = _Conn("client")
    opening.add(client, "10.1.2.3")
    flood = [_Conn(f"f{i}") for i in range(MAX_OPENING)]
    for i, c in enumerate(flood):
        opening.add(c, flood_address(i))
    assert dropped, "the flood went past the limit: something must have been dropped"
    assert not client.aborted, f"the lone client's handshake was dropped: {dropped[:2]}"


def _open(port: int, token: str):
    from veil.workers.websocket_auth import handshake_headers
    from veil.workers.websocket_transport import BlockingConnection

    return BlockingConnection(f"ws://127.0.0.1:{port}", handshake_headers(token), open_timeout=60)


def test_one_serving_client_cannot_lock_the_model_owner_out_of_a_cluster_worker(spawn):
    """Attack: a serving client (hostile in the threat model; every client holds the one shared client
    token) opens connections to a party of a serving ``Cluster`` until refused and keeps them (answering
    pings costs nothing). ``Cluster.worker_args`` started parties with ``--max-sessions-per-principal=64``,
    the worker's whole connection table, so the per-principal cap no longer binds: the client takes all 60
    non-reserved slots, and the model owner (``--token``, a scientist-role principal, not the admin token:
    no reserved slot) can no longer connect to share or serve a model. Must hold: after one client's flood,
    the model owner still gets a session (fixed: a cluster's workers cap each principal at 48 of the 64)."""
    from veil.serving.cluster import Cluster, NetworkWorker
    from veil.workers.websocket_launcher import free_port

    ws = [NetworkWorker(f"127.0.0.1:{free_port()}", id=f"server{i}") for i in range(2)]
    cluster = Cluster(*ws, NetworkWorker(f"127.0.0.1:{free_port()}", id="crypto_provider"), auto_managed=True)
    party = ws[0]
    wp = spawn(party.id, cluster.worker_args(party), port=party.port)
    held = []
    try:
        for _ in range(70):
            try:
                held.append(_open(wp.port, cluster.client_token))
            except Exception:  # noqa: BLE001  (503: no slot for it)
                break
        assert len(held) >= 16, "the client got fewer sessions than before the fix: the flood did not run"
        try:
            _open(wp.port, cluster.owner_token).close()
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"the model owner was locked out after a client held {len(held)} sessions: {e}")
    finally:
        for c in held:
            c.close()


# ------------------------------------------------------------------------------------------- defences that held


def test_unfinished_handshakes_past_the_caps_drop_the_oldest_and_an_oversized_request():
    """The bookkeeping behind the handshake test, in process: past the per-address cap the oldest
    connection of that address is dropped, past the global cap the oldest of the busiest address, and a
    connection whose opening request passes the byte cap is dropped; each drop is audited."""
    def conn():
        return _Conn("c")

    dropped = []
    openings = OpeningConnections(on_drop=lambda address, reason: dropped.append((address, reason)),
                                  limit=5, per_address=3, max_bytes=2048)
    a = [conn() for _ in range(4)]
    for c in a:
        openings.add(c, "10.0.0.1")
    assert dropped == [("10.0.0.1", "too many unfinished opening handshakes from this address")]
    b = [conn() for _ in range(3)]
    for c in b:
        openings.add(c, "10.0.1.2")  # another /24, another source; the 3rd is the 6th in all: the busiest loses one
    assert [d[0] for d in dropped] == ["10.0.0.1", "10.0.0.1"]
    assert [c.aborted for c in a] == [True, True, False, False]
    assert openings.received(b[0], 2048) and not openings.received(b[0], 1)
    assert dropped[-1] == ("10.0.1.2", "opening request over 2 KiB") and b[0].aborted
    openings.discard(a[3])  # its request is whole: no longer counted
    openings.add(conn(), "10.0.0.3")
    assert len(dropped) == 3


def test_the_busiest_address_loses_its_oldest_handshake_not_a_lone_client():
    """Attack: one address floods ``MAX_OPENING`` unfinished handshakes after a lone client opened one. Must
    hold: the flooder's own oldest is dropped (its per-address cap), the lone client's handshake is kept, and
    the table never holds more than ``MAX_OPENING``."""
    opening = OpeningConnections(on_drop=lambda a, r: None)
    client = _Conn("client")
    opening.add(client, "10.1.2.3")
    flood = [_Conn(f"f{i}") for i in range(MAX_OPENING + 10)]
    for c in flood:
        opening.add(c, "127.0.0.9")
    assert not client.aborted
    assert sum(not c.aborted for c in flood) <= opening.per_address
    assert opening.received(client, 100) and not client.aborted
    assert not opening.received(client, opening.max_bytes) and client.aborted  # past 16 KiB: dropped


def test_a_multi_token_handshake_counts_against_every_name_it_presents():
    """Attack: a scientist holding two tokens (names ``a`` and ``b``) opens sessions presenting both, hoping
    they count against neither name's cap (or only one), then more with ``a`` alone. Must hold: each session
    with both tokens counts against ``a``'s cap, so ``a`` alone is refused once its cap is reached, and a
    non-admin never takes the reserved slots."""
    def session(*names, roles=("scientist",)):
        ps = [SimpleNamespace(name=n) for n in names]
        return SimpleNamespace(principals=ps, has_role=lambda r: r in roles, peer_only=False)

    srv = SimpleNamespace(sessions={}, _handshakes={}, max_connections=64, reserved_slots=4,
                          max_sessions_per_principal=3)
    refuse = lambda s: ConnectionServing._slot_refusal(srv, s)  # noqa: E731
    for i in range(3):
        assert refuse(session("a", "b")) is None
        srv.sessions[i] = session("a", "b")
    assert refuse(session("a")) is not None and "token" in refuse(session("a"))
    assert refuse(session("b")) is not None
    assert refuse(session("c")) is None
    srv.sessions.update({100 + i: session(f"n{i}") for i in range(57)})  # 60 held: the last 4 are reserved
    assert refuse(session("c")) == "too many connections\n"
    assert refuse(session("adm", roles=("admin",))) is None


def test_relative_budget_slack_gives_away_no_usable_epsilon(tmp_path):
    """Attack: with a huge budget (epsilon 1e3) the relative slack (1e-9 of the total) is 1e-6 epsilon; a
    scientist spends the budget exactly and then keeps charging tiny queries in the slack. Must hold: once the
    total is spent, the slack covers at most ~1e-6 epsilon in all (not per charge), and a pure-DP budget
    (delta 0) pays for no delta at all."""
    from veil.dp.budget import BudgetLedger
    from veil.exceptions import BudgetExceededError

    ledger = BudgetLedger(tmp_path / "b.db")
    ledger.set_budget("sci", 1000.0, 0.0)
    ledger.charge("sci", 1000.0, 0.0, "all of it")
    free = 0
    for _ in range(20):
        try:
            ledger.charge("sci", 5e-7, 0.0, "in the slack")
            free += 1
        except BudgetExceededError:
            break
    assert free <= 2, f"{free} charges of 5e-7 accepted past the total"
    with pytest.raises(BudgetExceededError):
        ledger.charge("sci", 0.0, 1e-15, "a Gaussian on a pure budget")


def test_running_statistics_written_on_the_inline_lane_still_wait_for_review(hook):
    """Attack: the written-storage taint (batch norm's running statistics) was added to
    ``handlers._run_resolved``; the inline lane (``InlineLane.try_inline`` -> ``_serve_command``), which serves
    a full-rights session's plain torch op on the event loop without the generic dispatch, might skip it.
    The scientist runs ``F.batch_norm(review_data, rm, rv, training=True, momentum=1.0)`` through the lane
    and fetches ``rm``. Must hold: the command is served inline (the lane took it) and the fetch of the
    written buffer waits for the owner's review (ReviewPendingError), on the lane too."""
    tokens = sy.TokenTable()
    tokens.add("rt2-sci-token", "sci", "scientist")
    srv = WebsocketServerWorker(hook, id=_uid("rt2-lane"), port=0, tokens=tokens)
    d = srv.load(SECRET.clone(), tags=("#d",), policy="review")
    sci = open_session(srv, "rt2-sci-token")
    rm, rv = send_tensor(srv, sci, torch.zeros(3)), send_tensor(srv, sci, torch.ones(3))
    msg = m.CommandMessage("torch.nn.functional.batch_norm", (m.ObjectRef(d), m.ObjectRef(rm), m.ObjectRef(rv)),
                           {"training": True, "momentum": 1.0}, [new_id()], False)
    reply, decoded = srv.try_inline(serialize(msg, sender="client"), sci)
    assert reply is not None and decoded is None, "the inline lane did not take the command: nothing probed"
    assert type(deserialize(reply)[0]) is m.OkReply, deserialize(reply)[0]
    got, _ = srv.try_inline(serialize(m.GetObjectsMessage([rm]), sender="client"), sci)
    got = deserialize(got)[0] if got is not None else \
        deserialize(srv.serve_bytes(serialize(m.GetObjectsMessage([rm]), sender="client"), sci))[0]
    assert type(got) is m.ErrorReply and got.error == "ReviewPendingError", got
