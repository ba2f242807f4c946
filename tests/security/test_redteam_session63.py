"""Red team (session 63): today's two changes, attacked.

1. 6407393, ``handlers._failure_uses_approval``: an approved secure-aggregation masked input (``masked_input``, the
   one ``owner_guard.REVIEWED_INPUTS`` step) that failed after it ran on the approved values used the approval up.
   Holes found (network worker only): that use-up still ran after the step, so whatever made it fail or not happen
   left the range bit free: (a) the connection closed while the step ran (the cancellation was swallowed on a
   failure, cancelled a success's use-up), (b) a step past ``--max-command-seconds`` (the same with the deadline;
   the reply itself was the bit), (c) two sessions holding y under one id, both past the pre-check
   (``consume=False``, decided outside the turn) before either used the approval. Fixed: the approval is used up
   before the step runs (``handlers._owner_checks``, checked back in the turn by ``_released_as_approved``), once
   the step's checks that read no value passed (``owner_guard.REVIEWED_INPUT_CHECKS``: a round that does not exist
   leaves it standing, test_redteam_review_leftovers.py); no use-up after it.

2. d2afef1, ``WebsocketServerWorker.disconnect``: closes the connection, then waits (5 s at most) for the task
   serving it (``ws.serving``) to have ended the session. Held (regression guard): a client that floods and never
   answers the close is dropped at close_timeout (2 s); nothing of its session runs after disconnect returned.

3. 24c8fed, the masked input's value-free checks (``owner_guard.REVIEWED_INPUT_CHECKS``) run before the use-up.
   Hole found (then fixed): they ran on the arguments with the objects in place, before any review, secret or
   scrubbing check, and their VeilError goes back as is: an owner object sent as the round ``tag`` is printed by
   ``secagg_client._round`` (``no secure-aggregation round tensor([[...]])``), with no approval (raw review data,
   data derived from it, a ``private=True`` dataset). Fixed: the checks run on stand-ins, every tensor and stored
   object an empty tensor (``owner_guard.run_value_free_checks``), so they cannot read a value; and a non-int tag
   is never printed (``secagg_client._tag_text``). Held (regression guard): y in the other positions, a stray keyword
   and a multi-element tag are refused in one line with no value and leave the approval standing.

Set-up of the network-worker tests: a ``WebsocketServerWorker`` in process (requests through ``serve_bytes``, the
path a connection's requests take) holds X (``SECRET`` as in the review red teams) under the ``review`` policy; the
scientist ``sci`` computes its update ``y = x * 0.5`` and the owner approves one masked input of it. A secure-
aggregation round on that worker is made ready for ``masked_input`` with two peer sessions depositing their key
shares (``p1``, ``p2``), as other clients' workers do. ``confirm`` of the round, which any session of the
coordinator may send, answers whether the masked input went through (``masked_with`` set) or not: the bit a
dropout tells the coordinator.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.federated import secagg_confirm
from veil.federated import secagg_crypto as sc
from veil.federated import secagg_client, secure_agg
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.serde import deserialize, serialize
from veil.workers import cancellation
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import SECRET, uid  # noqa: E402
from server_sessions import open_session, request  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

SCI, PEER1, PEER2 = "rt63-scientist-token-0123456789abcdef", "rt63-peer1-token-0123456789abcdef", \
    "rt63-peer2-token-0123456789abcdef"
MASKED = "veil.secagg.masked_input"


class Setup:
    """The worker, the scientist's sessions, the peers' sessions and the approved update ``y``."""

    def __init__(self, hook) -> None:
        tokens = sy.TokenTable()
        tokens.add(SCI, "sci", "scientist")
        tokens.add(PEER1, "p1", "peer")
        tokens.add(PEER2, "p2", "peer")
        self.srv = WebsocketServerWorker(hook, id=uid("rt63"), port=0, tokens=tokens)
        self.xid = self.srv.load(SECRET.clone(), tags=("#x",), policy="review")
        self.s1, self.s2 = open_session(self.srv, SCI), open_session(self.srv, SCI)
        self.p1, self.p2 = open_session(self.srv, PEER1), open_session(self.srv, PEER2)
        self.y = new_id()
        self.compute_y(self.s1)
        self.tags = iter(range(1000 + time.monotonic_ns() % 10**6, 2 * 10**9))

    def command(self, session, op, *args, n=1, token=None):
        ids = [new_id() for _ in range(n)]
        msg = m.CommandMessage(op, args, {}, ids, False)
        reply = deserialize(self.srv.serve_bytes(serialize(msg, sender="client"), session, token))[0]
        return reply, ids

    def compute_y(self, session) -> None:
        """``y = x * 0.5`` for ``session``, under the scientist's id ``self.y`` (the same computation redone under
        the same id matches its approval: release.decide)."""
        msg = m.CommandMessage(ALLOWLIST.by_func(torch.mul).name, (m.ObjectRef(self.xid), 0.5), {}, [self.y], False)
        reply = deserialize(self.srv.serve_bytes(serialize(msg, sender="client"), session))[0]
        assert type(reply) is m.OkReply, reply

    def reconnect(self) -> None:
        """What the scientist's closed connection leaves: its session ended (its objects freed); a new one
        recomputes ``y``."""
        self.srv.end_session(self.s1)
        self.s1 = open_session(self.srv, SCI)
        self.compute_y(self.s1)

    def get(self, session, oid):
        return request(self.srv, session, m.GetObjectsMessage([oid], False, None)).objects[0]

    def round(self) -> int:
        """A fresh round (n = 3, t = 2) on the worker, keys shared, the peers' shares deposited."""
        tag = next(self.tags)
        ids = [self.srv.id, "p1", "p2"]
        reply, (pub,) = self.command(self.s2, "veil.secagg.advertise", tag, 3, 2)
        assert type(reply) is m.OkReply, reply
        mine = self.get(self.s2, pub)
        peers = {v: sc.public_bytes(sc.new_private_key()) for v in ("p1", "p2")}
        table = torch.stack([mine, sc.bytes_tensor(peers["p1"]), sc.bytes_tensor(peers["p2"])])
        reply, _ = self.command(self.s2, "veil.secagg.share_keys", tag, ids, table, n=0)
        assert type(reply) is m.OkReply, reply
        view = sc.bytes_tensor(secagg_confirm.view_digest(tag, 3, 2, ids))
        for v, session in (("p1", self.p1), ("p2", self.p2)):
            sk = sc.to_tensor([sc.share(b"\1" * 32, 3, 2)[0]])
            b = sc.to_tensor([sc.share(b"\2" * 32, 3, 2)[0]])
            reply, _ = self.command(session, "veil.secagg.deposit", tag, "sci", v, sk, b,
                                    sc.bytes_tensor(peers[v]), view, n=0)
            assert type(reply) is m.OkReply, reply
        return tag

    def masked_input(self, tag, weight, token=None):
        return self.command(self.s1, MASKED, tag, [self.srv.id, "p1"], [m.ObjectRef(self.y)], float(weight),
                            token=token)[0]

    def went_through(self, tag) -> bool:
        """The coordinator's view of the round: whether this client's masked input went (``confirm`` answers)."""
        reply, _ = self.command(self.s2, "veil.secagg.confirm", tag, [self.srv.id, "p1"])
        return type(reply) is m.OkReply

    def approve_one(self) -> None:
        reply = self.masked_input(self.round(), 1.0)
        assert type(reply) is m.ErrorReply and "pending" in str(reply).lower(), reply
        self.approve_pending()

    def approve_pending(self) -> None:
        (req,) = self.srv.release_requests.pending()
        self.srv.release_requests.approve(req.id)


@pytest.fixture
def setup(hook):
    return Setup(hook)


def test_harness_an_approval_lets_one_masked_input_go(setup):
    """Sanity of the harness: the approved update goes once (confirm answers), the next one waits for the owner,
    and a failure on the values (weight 1e15: past the range) uses the approval up (6407393)."""
    setup.approve_one()
    tag = setup.round()
    assert type(setup.masked_input(tag, 1.0)) is m.OkReply
    assert setup.went_through(tag)
    reply = setup.masked_input(setup.round(), 1.0)
    assert type(reply) is m.ErrorReply and "pending" in str(reply).lower(), reply
    setup.approve_pending()
    tag = setup.round()
    assert type(setup.masked_input(tag, 1e15)) is m.ErrorReply
    assert not setup.went_through(tag)
    reply = setup.masked_input(setup.round(), 1.0)
    assert type(reply) is m.ErrorReply and "pending" in str(reply).lower(), reply


def _cancelled_while_running(monkeypatch):
    """A token cancelled while the masked input computes: what ``_run_request`` does when the scientist's
    connection closes while its command runs (``token.cancel(f"session ... disconnected")``)."""
    token = cancellation.CancelToken(seconds=600.0)
    encode = secagg_client.encode

    def closed_while_encoding(*a, **k):
        token.cancel("session disconnected")  # (the close frame arrived while the step ran: it has no checkpoint)
        return encode(*a, **k)

    monkeypatch.setattr(secagg_client, "encode", closed_while_encoding)
    return token


def test_a_masked_input_whose_connection_closes_uses_the_approval_up(setup, monkeypatch):
    """Attack: one approval of y; for each probe weight w the scientist runs a fresh round from a second connection
    (session s2: advertise, share_keys, confirm), sends the masked input on the connection holding y (s1) and
    closes that connection while the step runs (``_run_request`` cancels the command's token). Whether the step
    failed the range check (|y * w| too large) or went through, the use-up after it raises the cancellation before
    anything is used up (``enforce_all``: ``cancellation.check()``): a failure's is swallowed (6407393's
    ``_failure_uses_approval``), a success's is the lost reply. The scientist reconnects and recomputes y under the
    same id (the approval matches it again); the round, which s2 holds, answers ``confirm`` for a masked input that
    went and refuses one that failed: max|y| read bit by bit, the approval never used. Must hold: a masked input
    that ran used the approval up however its command ended."""
    setup.approve_one()
    bits = []
    for weight in (1e11, 5e10, 1.0):  # max|y| = 3.375; two clients: |y * w| * 2^24 < 2^62, |y * w| < 2.7e11
        tag = setup.round()
        with monkeypatch.context() as mp:
            setup.masked_input(tag, weight, token=_cancelled_while_running(mp))  # (the reply is lost)
        setup.reconnect()
        bits.append(setup.went_through(tag))
    # (before: [False, True, True], the approval still unused) the first probe ran on the approved values and used
    # the approval up: the later ones wait for the owner, and so does the next masked input
    assert bits == [False, False, False], bits
    reply = setup.masked_input(setup.round(), 1.0)
    assert type(reply) is m.ErrorReply and "pending" in str(reply).lower(), reply


def test_a_masked_input_past_the_deadline_uses_the_approval_up(setup, monkeypatch):
    """Attack (no disconnect needed): the owner limits commands (``--max-command-seconds``); the scientist makes its
    masked input run longer (its own tensors, as long as it likes, concatenated into ``state_tensors``: here the
    step is slowed instead). The use-up after the step starts with ``cancellation.check()``: past the deadline it
    raises before using anything up. A success answers CommandTimeoutError, a failure on the values (the range)
    its own error, swallowed the timeout (6407393's ``_failure_uses_approval``): the reply is the bit, the approval
    stays.
    Must hold: the first masked input that ran on y used the approval up; the next waits for the owner."""
    setup.approve_one()
    setup.srv.max_command_seconds = 0.05
    encode = secagg_client.encode

    def slow_encode(*a, **k):
        time.sleep(0.1)  # (a step the scientist made longer than the owner's limit)
        return encode(*a, **k)

    monkeypatch.setattr(secagg_client, "encode", slow_encode)
    replies = []
    for weight in (1e11, 5e10, 1.0):
        replies.append(setup.masked_input(setup.round(), weight, token=cancellation.CancelToken(seconds=0.05)))
    monkeypatch.setattr(secagg_client, "encode", encode)
    setup.srv.max_command_seconds = None
    kinds = [r.error if type(r) is m.ErrorReply else "ok" for r in replies]
    # (before: ProtectedDataError for 1e11, CommandTimeoutError for 5e10 and 1.0: the range bit in the reply)
    assert kinds[1:] == ["ReviewPendingError", "ReviewPendingError"], kinds
    reply = setup.masked_input(setup.round(), 1.0)
    assert type(reply) is m.ErrorReply and "pending" in str(reply).lower(), reply


def test_two_sessions_cannot_both_run_a_masked_input_on_one_approval(setup, monkeypatch):
    """Attack: the scientist's two connections each compute y under the same id (an approval is of the id, the
    value and the computation: both match) and send a masked input at once, for two rounds, weights 5e10 (in the
    range) and 1e11 (past it). The handler checks the approval without using it (``_owner_checks``:
    ``consume=False``), its decision outside the worker's turn, and uses it up only after the step ran: both checks
    pass before either use-up (widened here: the two decisions meet), both steps run on y, and the second use-up
    fails after its step: a success answers ReviewPendingError but its round has the masked input (confirm says so),
    a failure answers its range error (6407393's ``_failure_uses_approval`` swallowed the refusal). Must hold: at
    most one of them ran on y; the other waits for the owner."""
    from veil.governance import release

    setup.approve_one()
    s3 = open_session(setup.srv, SCI)
    setup.compute_y(s3)
    decide_all = release._decide_all
    meet = threading.Barrier(2)

    def decisions_meet(worker, frozen, user, session, purpose, consume, blocked):
        if purpose == MASKED and not consume:
            try:
                meet.wait(timeout=3)
            except threading.BrokenBarrierError:
                pass
        return decide_all(worker, frozen, user, session, purpose, consume, blocked)

    monkeypatch.setattr(release, "_decide_all", decisions_meet)
    tags = {"in": setup.round(), "past": setup.round()}
    replies = {}

    def send(session, which, weight):
        msg = m.CommandMessage(MASKED, (tags[which], [setup.srv.id, "p1"], [m.ObjectRef(setup.y)], weight), {},
                               [new_id()], False)
        replies[which] = deserialize(setup.srv.serve_bytes(serialize(msg, sender="client"), session))[0]

    threads = [threading.Thread(target=send, args=(setup.s1, "in", 5e10)),
               threading.Thread(target=send, args=(s3, "past", 1e11))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    monkeypatch.setattr(release, "_decide_all", decide_all)
    ran = {"in": setup.went_through(tags["in"]),
           "past": type(replies["past"]) is m.ErrorReply and replies["past"].error == "ProtectedDataError"}
    # (before: both ran; "in" answered ReviewPendingError or OkReply, "past" its range error)
    assert sum(ran.values()) <= 1, (ran, replies)


# ------------------------------------------------------------------------------ d2afef1: the owner's disconnect

ALICE = "rt63-alice-token-0123456789abcdef0123"


class SilentClient:
    """A hostile client on a raw socket (websockets' Sans-I/O protocol): it sends frames when told and reads what
    the worker sends only when asked, so it never answers the worker's close."""

    def __init__(self, port: int, token: str) -> None:
        import socket

        from websockets.client import ClientProtocol
        from websockets.http11 import Response
        from websockets.uri import parse_uri

        from veil.workers.websocket_auth import handshake_headers

        self.proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}"), max_size=None)
        request = self.proto.connect()
        for k, v in handshake_headers(token).items():
            request.headers[k] = v
        self.proto.send_request(request)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._flush()
        while not any(isinstance(e, Response) for e in self._read()):
            pass

    def _flush(self) -> None:
        for data in self.proto.data_to_send():
            if data:
                self.sock.sendall(data)

    def _read(self) -> list:
        self.proto.receive_data(self.sock.recv(1 << 20))
        return self.proto.events_received()

    def send(self, msg) -> None:
        self.proto.send_binary(serialize(msg, sender="client"))
        self._flush()

    def reply(self):
        from websockets.frames import Frame

        while True:
            for e in self._read():
                if isinstance(e, Frame):
                    return deserialize(e.data)[0]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def served(hook):
    from worker_processes import serve_in_thread, stop_served

    tokens = sy.TokenTable()
    tokens.add(ALICE, "alice", "scientist")
    srv = WebsocketServerWorker(hook, id=uid("rt63-disc"), port=0, tokens=tokens)
    thread = serve_in_thread(srv)
    yield srv
    stop_served(srv, thread)


def test_a_client_that_never_answers_the_close_and_floods_runs_nothing_after_disconnect(served, monkeypatch):
    """Attack on d2afef1: the scientist's client pipelines requests, never reads, never answers the owner's close
    (the worker's close_timeout, 2 s, then drops it). Must hold: ``disconnect`` returns within its bound (6 s) and
    True; no request of the session starts after it returned; the session is gone and its objects freed."""
    from veil.workers import handlers

    srv = served
    starts, run_command = [], handlers._run_command

    def recorded(worker, principal, sender, *a, **k):  # every command, inline, in the lane or on a handler thread
        current = worker.current_session() if worker is srv else None
        starts.append((time.monotonic(), current.id if current is not None else sender))
        return run_command(worker, principal, sender, *a, **k)

    monkeypatch.setattr(handlers, "_run_command", recorded)
    c = SilentClient(srv.bound_port, ALICE)
    oid = new_id()
    c.send(m.ObjectMessage([m.StoredObject(oid, torch.ones(4), (), "")]))
    assert type(c.reply()) is m.OkReply
    (session,) = list(srv.sessions.values())
    add = ALLOWLIST.by_func(torch.add).name
    flooding = threading.Event()

    def flood():
        while not flooding.is_set():
            try:
                c.send(m.CommandMessage(add, (m.ObjectRef(oid), 1.0), {}, [new_id()], False))
            except OSError:
                return
            time.sleep(0.002)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert srv.disconnect(session.id, "owner")
    returned = time.monotonic()
    flooding.set()
    flooder.join(10)
    time.sleep(0.5)
    assert returned - t0 < 6.5, returned - t0
    assert session.id not in srv.sessions
    assert not [oid for oid, e in srv.monitor.owner_entries() if e.created_by == session.id]
    late = [t for t, sid in starts if sid == session.id and t > returned]
    assert [sid for _, sid in starts].count(session.id) > 1, starts  # (the flood was served before the close)
    assert not late, f"{len(late)} requests of the disconnected session started after disconnect returned"
    c.close()


# ------------------------------------------- 24c8fed: the masked input's value-free checks before the use-up

def _no_value_in(reply, *values) -> None:
    """The refusal is one line and holds none of ``values`` (as a tensor's repr prints them)."""
    assert type(reply) is m.ErrorReply, reply
    text = str(reply.message)
    assert "\n" not in text, text
    leaked = [v for v in values if v in text]
    assert not leaked, (leaked, text)


@pytest.mark.parametrize("what", ["review source", "review derived", "private", "one element, rounds exist"])
def test_the_value_free_checks_do_not_print_an_owner_tensor_passed_as_the_tag(setup, what):
    """Attack (no approval needed): the scientist sends ``masked_input`` with an owner object as ``tag`` (raw X
    under review, its own y derived from X, a ``private=True`` dataset on the same worker, or a one-element value
    derived from X while rounds exist, so that ``any(key[1] == tag ...)`` does not raise). The value-free checks
    run first, on the arguments with the objects in place (``_owner_checks``: before the consume=True review check,
    ``monitor.hides`` and the step's ``client_error`` scrubbing); ``_round`` finds no round for a non-int tag and
    answers ``no secure-aggregation round tensor([[ 1.5000, -2.2500, ...]])``: a RemoteExecutionError (a
    VeilError: re-raised as is). Before 24c8fed the review check (consume=False) answered ReviewPendingError
    first, and the step's own errors on owner data answered ProtectedDataError (details in the owner's log).
    Must hold: no value of an owner object in the reply (a refusal that reads no value, or the review's)."""
    srv = setup.srv
    tag_id = setup.xid
    if what == "review derived":
        tag_id = setup.y
    elif what == "private":
        tag_id = srv.load(torch.tensor([[7.125, 8.5], [9.25, -1.0]]), tags=("#p",), private=True)
    elif what == "one element, rounds exist":
        setup.round()
        tag_id = new_id()
        msg = m.CommandMessage(ALLOWLIST.by_func(torch.sum).name, (m.ObjectRef(setup.xid),), {}, [tag_id], False)
        assert type(deserialize(srv.serve_bytes(serialize(msg, sender="client"), setup.s1))[0]) is m.OkReply
    reply, _ = setup.command(setup.s1, MASKED, m.ObjectRef(tag_id), [srv.id, "p1"], [m.ObjectRef(setup.y)], 1.0)
    _no_value_in(reply, "1.5000", "-2.2500", "0.7500", "7.1250", "tensor(5.")


def test_hostile_arguments_to_the_value_free_checks_answer_one_line_and_leave_the_approval(setup):
    """Attack: y (approved once) in every other argument position the value-free checks read: ``survivors`` (y,
    [y]), ``weight`` (y), ``state_tensors`` not a list (y itself), a keyword the step does not take, and a multi-
    element tensor as the tag while a round exists (``any(key[1] == tag ...)`` raises RuntimeError, mapped to one
    line). Held: each is refused with one line and no value, none ran the step, and the approval still lets one
    masked input go (a refusal that reads no value leaves it standing)."""
    setup.approve_one()
    tag = setup.round()
    srv, y, mine = setup.srv, m.ObjectRef(setup.y), [setup.srv.id, "p1"]
    hostile = [
        ((tag, y, [y], 1.0), {}),
        ((tag, [y], [y], 1.0), {}),
        ((tag, mine, [y], y), {}),
        ((tag, mine, y, 1.0), {}),
        ((tag, mine, [y], 1.0), {"extra": y}),
        ((y, mine, [y], 1.0), {}),  # (rounds exist, y has 6 elements: RuntimeError)
    ]
    for args, kwargs in hostile:
        msg = m.CommandMessage(MASKED, args, kwargs, [new_id()], False)
        reply = deserialize(srv.serve_bytes(serialize(msg, sender="client"), setup.s1))[0]
        _no_value_in(reply, "0.7500", "-1.1250", "3.3750")
        assert reply.error != "ReviewPendingError", reply
    assert not srv.release_requests.pending()
    assert not setup.went_through(tag)
    assert type(setup.masked_input(tag, 1.0)) is m.OkReply
    assert setup.went_through(tag)
    reply = setup.masked_input(setup.round(), 1.0)
    assert type(reply) is m.ErrorReply and "pending" in str(reply).lower(), reply


def test_a_round_tag_that_is_not_an_int_is_never_printed():
    """Defence in depth behind the stand-ins: the round tag is a requester's argument and may be any value, a stored
    tensor too; secure aggregation's refusals name an int tag and only the type of anything else."""
    probe = torch.tensor([[1.625, -2.375]])
    with pytest.raises(ValueError) as info:
        sc.check_round_tag(probe)
    assert "1.625" not in str(info.value) and "Tensor" in str(info.value)
    assert secagg_client._tag_text(probe) == "(not an int: Tensor)" and secagg_client._tag_text(42) == "42"


# ------------------------------------------- session 63, third pass: stored objects, nesting, after the use-up

def _spy_checks(monkeypatch):
    """Records every argument tree the masked input's value-free checks are called with (then runs them)."""
    from veil.workers import owner_guard

    seen, checks = [], owner_guard.REVIEWED_INPUT_CHECKS[MASKED]

    def spy(worker, *args, **kwargs):
        seen.append((args, kwargs))
        return checks(worker, *args, **kwargs)

    monkeypatch.setitem(owner_guard.REVIEWED_INPUT_CHECKS, MASKED, spy)
    return seen


def _tree_leaves(value):
    if type(value) in (list, tuple):
        return [leaf for v in value for leaf in _tree_leaves(v)]
    if type(value) is dict:
        return [leaf for v in value.values() for leaf in _tree_leaves(v)]
    return [value]


def test_stored_objects_nested_anywhere_reach_the_value_free_checks_only_as_empty_stand_ins(setup, monkeypatch):
    """Attack on fd1dbff's stand-ins: y (approved once), the raw X and a stored non-tensor object (a ``PlanSpec``,
    one of ``base.STORABLE_TYPES``) nested in dicts, tuples and lists in every argument position of the masked
    input and in its keywords (``losses``, which ``_ready_to_mask`` takes and never checks). Dict keys cannot carry
    a stored object: an ObjectRef is unhashable (serialize refuses it) and ``resolve_args`` replaces values only.
    Held: every leaf the checks see is an empty tensor or a wire value of the scientist's (none is a stored object,
    none has an element); each refusal is one line with no value; none ran the step; the approval still stands."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    srv, y, x = setup.srv, m.ObjectRef(setup.y), m.ObjectRef(setup.xid)
    plan_id = new_id()
    plan = PlanSpec("ident", 1, 0, 2, [PlanOp(ALLOWLIST.by_func(torch.mul).name, (SlotRef(0), 1.0), {}, [1], False)],
                    SlotRef(1))
    reply = request(srv, setup.s1, m.ObjectMessage([m.StoredObject(plan_id, plan, (), "")]))
    assert type(reply) is m.OkReply, reply
    p = m.ObjectRef(plan_id)
    setup.approve_one()
    tag = setup.round()
    mine = [srv.id, "p1"]
    stored = {id(e.obj) for _, e in srv.monitor.owner_entries()}
    seen = _spy_checks(monkeypatch)
    hostile = [
        ((tag, mine, [y], 1.0), {"losses": {"a": (x, [p])}}),  # (its refusal: the keyword is a dict; no value)
        ((tag, mine, (y, {"k": [x, p]}), 1.0), {}),
        ((tag, mine, [p], 1.0), {}),  # (a stored plan among the state tensors: see the test below)
        (({"t": tag, "y": y}, mine, [y], 1.0), {}),
        ((tag, [srv.id, ("p1", p)], [y], {"w": x}), {}),
        ((p, mine, [y], 1.0), {}),
        ((tag, mine, [y], p), {"losses": p}),
    ]
    for i, (args, kwargs) in enumerate(hostile[:2] + hostile[3:]):
        msg = m.CommandMessage(MASKED, args, kwargs, [new_id()], False)
        reply = deserialize(srv.serve_bytes(serialize(msg, sender="client"), setup.s1))[0]
        _no_value_in(reply, "0.7500", "-1.1250", "3.3750", "1.5000", "-2.2500", "ident")
        if i == 0:  # (``losses`` is not checked: the checks pass, then the review asks for X; y's approval unused)
            assert reply.error == "ReviewPendingError" and str(setup.xid) in str(reply.message), reply
        else:
            assert reply.error != "ReviewPendingError", reply
    assert len(seen) == len(hostile) - 1, seen
    for args, kwargs in seen:
        for leaf in _tree_leaves((args, kwargs)):
            assert id(leaf) not in stored and not any(leaf is e.obj for _, e in srv.monitor.owner_entries())
            assert not isinstance(leaf, PlanSpec), leaf
            if isinstance(leaf, torch.Tensor):
                assert leaf.numel() == 0, leaf
    assert [r.object_id for r in srv.release_requests.pending()] == [setup.xid]  # (X's, filed by the first; not y's)
    assert not setup.went_through(tag)
    assert type(setup.masked_input(tag, 1.0)) is m.OkReply
    assert setup.went_through(tag)


def test_a_stored_non_tensor_among_the_state_tensors_fails_after_the_use_up_in_one_line(setup):
    """Attack: a stored object that is not a tensor (a ``PlanSpec``) among the state tensors beside y passes the
    value-free checks as its stand-in (an empty tensor), so the approval is used up and the step's own
    ``_ready_to_mask`` refuses it on the real arguments. Held: the refusal names no value and reads none (it is the
    type check, before any value is read: no range bit), the round has no masked input, and the approval is used
    up as the threat model says (a failure after the value-free checks, of any kind, has used it)."""
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    srv = setup.srv
    plan_id = new_id()
    plan = PlanSpec("ident", 1, 0, 2, [PlanOp(ALLOWLIST.by_func(torch.mul).name, (SlotRef(0), 1.0), {}, [1], False)],
                    SlotRef(1))
    assert type(request(srv, setup.s1, m.ObjectMessage([m.StoredObject(plan_id, plan, (), "")]))) is m.OkReply
    setup.approve_one()
    for weight in (1e11, 1.0):  # (the same answer whatever the range would say)
        tag = setup.round()
        reply, _ = setup.command(setup.s1, MASKED, tag, [srv.id, "p1"], [m.ObjectRef(setup.y),
                                                                        m.ObjectRef(plan_id)], weight)
        _no_value_in(reply, "0.7500", "-1.1250", "3.3750", "ident")
        assert not setup.went_through(tag)
        if weight == 1e11:
            assert reply.error != "ReviewPendingError", reply
            first = reply
        else:
            assert reply.error == "ReviewPendingError", reply
    assert first.error == "ProtectedDataError", first  # (as a range refusal answers: the one failure bit)


def test_wait_sessions_ended_is_bounded_and_closes_nothing_itself(served):
    """Attack on 02f7f66: the console's revoke waits (``wait_sessions_ended``) on the tasks serving the revoked
    user's connections. A scientist that keeps its connection open (here: never revoked, so its task never ends)
    must not hold the console's thread past the bound, and the wait alone must end no session (only the owner's
    revoke or disconnect closes one). Unknown names return at once."""
    srv = served
    c = SilentClient(srv.bound_port, ALICE)
    try:
        oid = new_id()
        c.send(m.ObjectMessage([m.StoredObject(oid, torch.ones(2), (), "")]))
        assert type(c.reply()) is m.OkReply
        (session,) = list(srv.sessions.values())
        t0 = time.monotonic()
        srv.wait_sessions_ended("nobody", seconds=60)  # (at once: well under the 60 s a wait would take)
        assert time.monotonic() - t0 < 30
        t0 = time.monotonic()
        srv.wait_sessions_ended("alice", seconds=0.3)  # (its bound: the slack is for a loaded machine)
        assert time.monotonic() - t0 < 5
        assert session.id in srv.sessions
        c.send(m.CommandMessage(ALLOWLIST.by_func(torch.add).name, (m.ObjectRef(oid), 1.0), {}, [new_id()], False))
        assert type(c.reply()) is m.OkReply  # (the session still serves: the wait changed nothing)
    finally:
        c.close()
