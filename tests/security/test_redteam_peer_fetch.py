"""Red team, the pull of peer openings (``PeerFetchMessage``, veil/workers/peer_openings.py): a party
publishes its outputs to the round's readers, each of which fetches them once, as a server reply.

The cluster of test_redteam_peer_openings.py (alice, bob, dave as ``veil worker`` processes, the sink
"charlie" answering bob's and alice's fetches as the test sets). The attacks: sessions that mix a
peer's token with a scientist's or a client's, raw malformed fetch frames, a fetch that carries a
prelude of commands, fetches naming round ids no round can have (refused at once, not after a wait); the same fetch pipelined on one connection and a flood of fetches over many
connections, sent before the round exists (bounded waiting, one share served once, a non-reader that
waited is still refused); a top-bits truncation whose parties the orchestrator tells different
reveals (the second party never keeps c); a party that dies while it answers a fetch, or answers it
with objects that are not its shares. After each,
nothing was stored or revealed, the workers still serve a peer-opened product equal to torch's, and
the objects stored before are unchanged.
"""

from __future__ import annotations

import threading

import msgpack
import pytest
import torch

import veil as sy
from veil.exceptions import VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.mpc.truncation import shift_for
from veil.workers.peer_openings import PeerFetchMessage, PeerOpenMessage
from veil.messaging.serde import WIRE_VERSION

from network_helpers import TOKEN
from test_redteam_peer_openings import (  # noqa: F401  (fixtures: cluster and its sink charlie)
    CLIENT, REPLIES, _as, _fetch, _fetches_of, _peer_token, _start, _stored_before, _unchanged, cluster, new_round,
    sink)

GOOD = [torch.full((6,), 5, dtype=torch.int64)] * 2  # the sink charlie's beaver_mask share
ZEROS = torch.zeros(6, dtype=torch.int64)  # bob's share in the rounds below: x - x


def _raw(proc, token: str, extra: tuple = ()):
    """A raw connection to ``proc`` presenting ``token`` (and ``extra`` tokens in the same handshake)."""
    from veil.workers.websocket_auth import handshake_headers
    from veil.workers.websocket_transport import BlockingConnection

    return BlockingConnection(f"ws://127.0.0.1:{proc.port}", handshake_headers(token, list(extra)))


def _frame(round_id, name="beaver_mask", prelude=(), slots=False, done=()) -> bytes:
    return msgpack.packb([WIRE_VERSION, PeerFetchMessage.TYPE, "x", list(prelude), round_id, name, slots, list(done)],
                         use_bin_type=True)


def _ask(conn, data: bytes):
    conn.send(data)
    return deserialize(conn.recv(120))[0]


#: "not yet" replies a test's fetcher takes before it gives up (a fetch waits one ``FETCH_SLICE_SECONDS``
#: slice at the publishing party, then an honest peer asks again: the round may start seconds later)
MAX_ASKS = 2000


def _answers(conn, data: bytes, count: int) -> list:
    """``count`` answers to ``data`` already sent ``count`` times on ``conn`` (pipelined), each "not yet"
    asked again at once, as a peer does: the replies that are not "not yet" (OkReply), in arrival order."""
    answers, asks = [], 0
    while len(answers) < count:
        reply = deserialize(conn.recv(120))[0]
        if type(reply) is m.OkReply:
            asks += 1
            assert asks < MAX_ASKS, "the round never came"
            conn.send(data)
        else:
            answers.append(reply)
    return answers


def _answer(conn, data: bytes):
    """The answer to the fetch ``data`` sent on ``conn``, asked again on "not yet" as a peer does (the round,
    started on another thread, may be registered or published after the fetch's slice)."""
    conn.send(data)
    return _answers(conn, data, 1)[0]


def _bob_round(hook, cluster, values=GOOD):
    """A beaver_mask round at bob with the sink charlie (which answers bob's fetch with ``values``), not yet
    sent: (round id, ids, message). bob's own outputs are x - x = 0."""
    x = torch.arange(6, dtype=torch.int64).send(cluster["bob"][1])
    round_id, ids = new_round(), [new_id(), new_id()]
    REPLIES[round_id] = values
    msg = PeerOpenMessage("beaver_mask", (m.ObjectRef(x.id_at_location),) * 4, {}, round_id, ["bob", "charlie"], ids)
    return round_id, ids, msg, x


def _honest_round_opens(hook, cluster, values=GOOD) -> None:
    """bob runs a round whose fetch charlie answers with ``values`` and charlie takes bob's share (x - x = 0):
    it completes and bob stores what was published, summed (GOOD)."""
    round_id, ids, msg, _x = _bob_round(hook, cluster, values=values)
    errors = {}
    thread = _start(hook, cluster["bob"][1], msg, errors, "bob")
    as_charlie = _as(hook, cluster["bob"][0], _peer_token("charlie"), "charlie")
    try:
        assert all(torch.equal(t, ZEROS) for t in _fetch(hook, as_charlie, round_id))
    finally:
        as_charlie.close()
    thread.join(120)
    assert not errors, errors
    _stored(hook, cluster["bob"][1], ids, GOOD[0])


def _until(predicate, *threads: threading.Thread) -> None:
    """Waits until ``predicate()`` or every thread ended (events, not a time limit)."""
    import time

    while not predicate() and any(t.is_alive() for t in threads):
        time.sleep(0.05)


def _stored(hook, conn, ids, value) -> None:
    for oid in ids:
        assert torch.equal(sy.PointerTensor(conn, oid, hook.local_worker, tuple(value.shape), value.dtype).get(),
                           value)


def _nothing_at(hook, conn, ids, shape=(6,)) -> None:
    for oid in ids:
        with pytest.raises(VeilError):
            sy.PointerTensor(conn, oid, hook.local_worker, shape, torch.int64).get()


def test_only_a_pure_peer_session_of_a_reader_takes_a_share(hook, cluster):
    """While bob's round waits for charlie to take its share: sessions that present charlie's peer token
    together with a scientist's or a client's token, the scientist and client tokens alone, and dave
    (a peer, not a reader) are refused and consume nothing; charlie's own peer session then takes the
    share, once."""
    stored = _stored_before(cluster)
    round_id, ids, msg, _x = _bob_round(hook, cluster)
    errors = {}
    thread = _start(hook, cluster["bob"][1], msg, errors, "bob")
    _until(lambda: _fetches_of(round_id), thread)  # bob published and fetched charlie's: the round is open
    bob = cluster["bob"][0]
    attackers = [(TOKEN, ()), (CLIENT, ()), (TOKEN, (_peer_token("charlie"),)), (_peer_token("charlie"), (TOKEN,)),
                 (_peer_token("charlie"), (CLIENT,)), (_peer_token("dave"), ())]
    for token, extra in attackers:
        conn = _raw(bob, token, extra)
        try:
            reply = _answer(conn, serialize(PeerFetchMessage(round_id, "beaver_mask")))
        finally:
            conn.close()
        assert type(reply) is m.ErrorReply, (token, extra, reply)
        assert any(w in reply.message.lower() for w in ("peer", "client token", "not a reader")), reply.message
    conn = _raw(bob, _peer_token("charlie"))
    try:
        share = _answer(conn, serialize(PeerFetchMessage(round_id, "beaver_mask")))
        again = _ask(conn, serialize(PeerFetchMessage(round_id, "beaver_mask")))
    finally:
        conn.close()
    assert type(share) is m.ObjectsReply and all(torch.equal(t, ZEROS) for t in share.objects)
    assert type(again) is m.ErrorReply
    thread.join(120)
    assert not errors, errors
    _stored(hook, cluster["bob"][1], ids, GOOD[0])
    _unchanged(cluster, stored)


def test_malformed_fetch_frames_fail_cleanly_and_consume_nothing(hook, cluster):
    """Raw fetch frames from charlie's peer session for an open round: a round id or step of another type,
    too few or too many fields, nesting past the decoder's depth, and a fetch behind a prelude of a
    command a peer may not run (the fetch does not run): each gets an error reply, the round's share is
    still there for charlie's one well-formed fetch, and the connection keeps serving."""
    stored = _stored_before(cluster)
    round_id, ids, msg, x = _bob_round(hook, cluster)
    errors = {}
    thread = _start(hook, cluster["bob"][1], msg, errors, "bob")
    _until(lambda: _fetches_of(round_id), thread)
    pack = msgpack.packb  # (its packer refuses to nest this deep: the frame is built by hand)
    deep = b"\x96" + b"".join(pack(v) for v in (1, PeerFetchMessage.TYPE, "x", [])) + b"\x91" * 5000 \
        + pack(round_id) + pack("beaver_mask")
    frames = {
        "round an int": _frame(12345),
        "round None": _frame(None),
        "round a list": _frame([round_id]),
        "round bytes": _frame(round_id.encode()),
        "round a map": _frame({round_id: 1}),
        "step an int": _frame(round_id, 7),
        "step a list": _frame(round_id, ["beaver_mask"]),
        "too few fields": msgpack.packb([WIRE_VERSION, PeerFetchMessage.TYPE, "x", [], round_id]),
        "too many fields": msgpack.packb([WIRE_VERSION, PeerFetchMessage.TYPE, "x", [], round_id, "beaver_mask", False,
                                          [], "more"]),
        "nested past the decoder's depth": deep,
        "behind a command a peer may not run": _frame(round_id, prelude=[["torch.add", [1, 2], {}, [new_id()],
                                                                          False]]),
        "another step": _frame(round_id, "trunc_mask"),
    }
    conn = _raw(cluster["bob"][0], _peer_token("charlie"))
    try:
        for what, data in frames.items():
            # (a well-formed fetch of another step is refused once the round is published: asked again before)
            reply = _answer(conn, data) if what == "another step" else _ask(conn, data)
            assert type(reply) is m.ErrorReply, (what, reply)
            assert "\n" not in reply.message and len(reply.message) < 500, (what, reply.message)
        share = _answer(conn, _frame(round_id))  # the same connection, now well formed: the share, once
        assert type(share) is m.ObjectsReply and all(torch.equal(t, ZEROS) for t in share.objects)
    finally:
        conn.close()
    thread.join(120)
    assert not errors, errors
    _stored(hook, cluster["bob"][1], ids, GOOD[0])
    _unchanged(cluster, stored)


def test_pipelined_fetches_before_the_round_exists_serve_its_share_once(hook, cluster):
    """charlie pipelines the same fetch frame four times on one connection before bob's round exists (the
    first waits for it, the others queue behind it on the connection), and dave, no reader, fetches the
    same round from another connection: once bob runs the round exactly one reply carries bob's share,
    the other three are refused, and dave's waiting fetch is refused too (not served)."""
    stored = _stored_before(cluster)
    round_id, ids, msg, _x = _bob_round(hook, cluster)
    bob = cluster["bob"][0]
    as_charlie, as_dave = _raw(bob, _peer_token("charlie")), _raw(bob, _peer_token("dave"))
    try:
        frame = _frame(round_id)
        for _ in range(4):
            as_charlie.send(frame)
        as_dave.send(frame)
        errors, done = {}, {}
        charlie = threading.Thread(target=lambda: done.update(charlie=_answers(as_charlie, frame, 4)))
        dave_asks = threading.Thread(target=lambda: done.update(dave=_answers(as_dave, frame, 1)))
        charlie.start()
        dave_asks.start()
        thread = _start(hook, cluster["bob"][1], msg, errors, "bob")
        charlie.join(120)
        dave_asks.join(120)
        replies, (dave,) = done["charlie"], done["dave"]
    finally:
        as_charlie.close()
        as_dave.close()
    thread.join(120)
    assert not errors, errors
    served = [r for r in replies if type(r) is m.ObjectsReply]
    assert len(served) == 1 and all(torch.equal(t, ZEROS) for t in served[0].objects)
    assert all(type(r) is m.ErrorReply for r in replies if r is not served[0])
    assert type(dave) is m.ErrorReply and ("not a reader" in dave.message or "no peer opening" in dave.message), dave
    _stored(hook, cluster["bob"][1], ids, GOOD[0])
    _unchanged(cluster, stored)


def test_a_flood_of_early_fetches_waits_bounded_and_takes_once(hook, cluster):
    """charlie sends a fetch for a round bob has not started over each of 10 connections: at most
    ``MAX_WAITING_PER_PEER`` (4) wait, the others are refused at once; when bob runs the round one
    of the waiting fetches takes the share and every other is refused; honest rounds go on meanwhile."""
    from veil.workers.peer_rounds import MAX_WAITING_PER_PEER

    stored = _stored_before(cluster)
    round_id, ids, msg, _x = _bob_round(hook, cluster)
    bob = cluster["bob"][0]
    n = 10
    conns = [_raw(bob, _peer_token("charlie")) for _ in range(n)]
    replies: list = []
    lock = threading.Lock()

    def fetch(conn):
        conn.send(_frame(round_id))
        (reply,) = _answers(conn, _frame(round_id), 1)
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=fetch, args=(c,)) for c in conns]
    try:
        for t in threads:
            t.start()
        _until(lambda: len(replies) >= n - MAX_WAITING_PER_PEER, *threads)
        early = list(replies)
        assert len(early) >= n - MAX_WAITING_PER_PEER
        assert all(type(r) is m.ErrorReply for r in early), early
        assert any("too many" in r.message for r in early), [r.message for r in early]
        _unchanged(cluster, stored)  # an honest round between alice and bob while charlie's fetches wait
        errors = {}
        thread = _start(hook, cluster["bob"][1], msg, errors, "bob")
        for t in threads:
            t.join(120)
        thread.join(120)
    finally:
        for c in conns:
            c.close()
    assert not errors, errors
    served = [r for r in replies if type(r) is m.ObjectsReply]
    assert len(replies) == n and len(served) == 1, replies
    assert all(torch.equal(t, ZEROS) for t in served[0].objects)
    _stored(hook, cluster["bob"][1], ids, GOOD[0])
    _unchanged(cluster, stored)


N = 20_000
PACKED = (N + 7) // 8


@pytest.mark.parametrize("first_reveal, second_reveal", [("top_bits", ""), ("", "top_bits")])
def test_parties_told_different_reveals_never_leave_c_at_the_second(hook, cluster, first_reveal, second_reveal):
    """A truncation round of alice (first) and bob whose orchestrator tells them different reveals: bob
    fetches what alice published and refuses it (packed bits where it expects c's share, or alice's share
    of c where it expects packed bits): bob's round fails and stores nothing (it never keeps c), alice's
    round, whose only reader bob took its part, keeps what alice opened (as it would have)."""
    stored = _stored_before(cluster)
    alice, bob = cluster["alice"][1], cluster["bob"][1]
    gen = torch.Generator().manual_seed(21)
    parts = {}
    for name, conn in (("alice", alice), ("bob", bob)):
        x = torch.empty(N, dtype=torch.int64).random_(-2**40, 2**40, generator=gen)
        r = torch.empty(N, dtype=torch.int64).random_(generator=gen)
        parts[name] = (x, r, x.send(conn), r.send(conn))
    round_id, oids, errors, threads = new_round(), {"alice": new_id(), "bob": new_id()}, {}, {}
    shift = shift_for(2**16)
    for name, conn, reveal, k in (("alice", alice, first_reveal, shift), ("bob", bob, second_reveal, 0)):
        _, _, xp, rp = parts[name]
        msg = PeerOpenMessage("trunc_mask", (m.ObjectRef(xp.id_at_location), m.ObjectRef(rp.id_at_location), k), {},
                              round_id, ["alice", "bob"], [oids[name]], reveal)
        threads[name] = _start(hook, conn, msg, errors, name)
    for t in threads.values():
        t.join(120)
    assert "bob" in errors and "shapes and dtypes" in str(errors["bob"]), errors
    for shape, dtype in (((N,), torch.int64), ((PACKED,), torch.uint8)):  # bob kept neither c nor bits
        with pytest.raises(VeilError):
            sy.PointerTensor(bob, oids["bob"], hook.local_worker, shape, dtype).get()
    c = parts["alice"][0] + parts["alice"][1] + shift + parts["bob"][0] + parts["bob"][1]
    if "alice" in errors:  # alice may fail too (her reader took nothing she could use): then she kept nothing
        with pytest.raises(VeilError):
            sy.PointerTensor(alice, oids["alice"], hook.local_worker, (N,), torch.int64).get()
    else:
        assert torch.equal(sy.PointerTensor(alice, oids["alice"], hook.local_worker, (N,), torch.int64).get(), c)
    _unchanged(cluster, stored)


class _Dies:
    """A sink answer that tears its connection down while answering (the party died mid-fetch)."""

    def __iter__(self):
        raise ConnectionAbortedError("charlie died")


def test_a_party_that_dies_while_answering_a_fetch_ends_the_round_cleanly(hook, cluster):
    """The sink charlie drops the connection on bob's fetch: bob's round fails, stores nothing, its id is
    closed (charlie's later fetch is refused, bob's share never leaves), and bob reconnects for the next
    round, which opens the right values."""
    stored = _stored_before(cluster)
    round_id, ids, msg, _x = _bob_round(hook, cluster, values=_Dies())
    with pytest.raises(VeilError):
        hook.local_worker.send_msg(msg, cluster["bob"][1])
    _nothing_at(hook, cluster["bob"][1], ids)
    as_charlie = _as(hook, cluster["bob"][0], _peer_token("charlie"), "charlie")
    try:
        with pytest.raises(VeilError, match="(?i)ended|no peer opening round"):
            _fetch(hook, as_charlie, round_id)
    finally:
        as_charlie.close()
    _honest_round_opens(hook, cluster)
    _unchanged(cluster, stored)


@pytest.mark.parametrize("what", ["sparse", "strings", "nones", "nested", "a 2-d view", "numbers"])
def test_a_hostile_partys_answer_of_other_kinds_ends_the_round(hook, cluster, what):
    """charlie answers bob's fetch with objects that are not two dense int64 tensors of bob's shape: bob's
    round fails and stores nothing."""
    stored = _stored_before(cluster)
    values = {"sparse": [torch.zeros(6, dtype=torch.int64).to_sparse()] * 2, "strings": ["5" * 6] * 2,
              "nones": [None, None], "nested": [[GOOD[0]], [GOOD[0]]],
              "a 2-d view": [torch.zeros(2, 3, dtype=torch.int64)] * 2,
              "numbers": [5, 5]}[what]
    round_id, ids, msg, _x = _bob_round(hook, cluster, values=values)
    with pytest.raises(VeilError):
        hook.local_worker.send_msg(msg, cluster["bob"][1])
    _nothing_at(hook, cluster["bob"][1], ids)
    _unchanged(cluster, stored)


def test_a_fetch_naming_what_no_round_can_be_is_refused_at_once(hook, cluster):
    """Round ids are 16-64 letters or digits (a PeerOpenMessage with another is refused) and steps are short
    names: fetches naming an empty, path-like, non-ASCII or 1 MB round id, or a 1 MB step, could never be
    answered. Each is refused at once with a short error (not echoing the megabyte back after waiting
    with it held), and holds none of charlie's waiting slots: charlie's fetch for bob's round, sent
    after them, still waits for the round and takes its share."""
    stored = _stored_before(cluster)
    bob = cluster["bob"][0]
    good = new_round()
    bogus = [_frame(""), _frame("../" * 8), _frame("ä" * 32), _frame("a" * (1 << 20)), _frame(good, "x" * (1 << 20))]
    conns = [_raw(bob, _peer_token("charlie")) for _ in bogus]
    try:
        for conn, data in zip(conns, bogus):
            conn.send(data)
        _unchanged(cluster, stored)  # (round trips: the frames above have reached bob)
        round_id, ids, msg, _x = _bob_round(hook, cluster)
        honest = _raw(bob, _peer_token("charlie"))
        conns.append(honest)
        honest.send(_frame(round_id))
        errors = {}
        thread = _start(hook, cluster["bob"][1], msg, errors, "bob")
        (share,) = _answers(honest, _frame(round_id), 1)
        thread.join(120)
        replies = [deserialize(c.recv(120))[0] for c in conns[:len(bogus)]]
    finally:
        for c in conns:
            c.close()
    assert not errors, errors
    assert type(share) is m.ObjectsReply and all(torch.equal(t, ZEROS) for t in share.objects), share
    for reply in replies:
        assert type(reply) is m.ErrorReply and len(reply.message) < 500, str(reply)[:200]
    _stored(hook, cluster["bob"][1], ids, GOOD[0])
    _unchanged(cluster, stored)


class _Fragments:
    """A sink answer sent as a fragmented message: ``values`` serialized, cut into ``size``-byte fragments;
    ``cut``: the sink fails the connection after that many fragments (a reply cut short); ``claim``: after
    the first fragment the sink writes a raw continuation header declaring ``claim`` bytes, and nothing more."""

    def __init__(self, values, size: int = 7, cut: int | None = None, claim: int | None = None) -> None:
        self.values, self.size, self.cut, self.claim = values, size, cut, claim

    def send_to(self, ws) -> None:
        data = serialize(m.ObjectsReply(list(self.values)), sender="charlie")
        pieces = [data[at: at + self.size] for at in range(0, len(data), self.size)]
        if self.claim is not None:
            first = bytes((0x02, len(pieces[0]))) + pieces[0]  # a binary first fragment (size < 126)
            ws.socket.sendall(first + bytes((0x00, 0x7F)) + self.claim.to_bytes(8, "big"))
            return

        def fragments():
            for k, piece in enumerate(pieces):
                if k == self.cut:
                    raise ConnectionAbortedError("charlie stops mid-reply")
                yield piece
        ws.send(fragments())


@pytest.mark.parametrize("what", ["larger", "smaller", "cut short", "claims 1 TiB", "claims 2^63"])
def test_a_hostile_partys_fragmented_answer_of_the_wrong_size_ends_the_round(hook, cluster, what):
    """bob receives a fetch reply into one buffer of the size it expects (its own outputs' layout, never a
    size the peer announces). charlie answers in small fragments with more values than bob's (a 1 MiB
    tensor), fewer, a reply cut short, or a frame header claiming 1 TiB or 2^63 bytes: bob's round fails,
    nothing is stored, and bob's next round, answered in 7-byte fragments, opens the right values."""
    stored = _stored_before(cluster)
    values = {"larger": _Fragments([torch.zeros(1 << 17, dtype=torch.int64)] * 2, size=65_536),
              "smaller": _Fragments([torch.zeros(5, dtype=torch.int64)] * 2),
              "cut short": _Fragments(GOOD, cut=5),
              "claims 1 TiB": _Fragments(GOOD, size=40, claim=1 << 40),
              "claims 2^63": _Fragments(GOOD, size=40, claim=(1 << 63) - 1)}[what]
    round_id, ids, msg, _x = _bob_round(hook, cluster, values=values)
    with pytest.raises(VeilError):
        hook.local_worker.send_msg(msg, cluster["bob"][1])
    _nothing_at(hook, cluster["bob"][1], ids)
    _honest_round_opens(hook, cluster, values=_Fragments(GOOD))
    _unchanged(cluster, stored)
