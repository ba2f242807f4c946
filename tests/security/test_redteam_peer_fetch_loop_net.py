"""Red team, peer fetches served on a network worker's event loop (``WebsocketServerWorker._serve_peer_fetch``
-> ``peer_openings.serve_fetch_on_loop`` -> ``PeerRounds.take_on_loop``), over real ``veil worker`` processes.

A peer session's fetch is taken on the loop at once when its round is published, or parked as a future that
the next change of any round resolves (within ``MAX_WAITING_PER_PEER``/``MAX_WAITING_FETCHES``, one
``FETCH_SLICE_SECONDS`` slice); a peer-only session's request of at most 512 bytes that ``try_inline`` did
not decode (the worker was busy) is decoded on the loop; whatever the loop does not serve goes to the
handler thread (``_handle_peer_fetch``), which refuses and audits. The cluster of
test_redteam_peer_openings.py (alice, bob, dave as processes, the sink "charlie"). The attacks:

* peers that park fetches for rounds that never come on many connections and hang up mid-park (close
  frame, TCP reset, half-close, with more fetches pipelined behind the parked one): no waiting slot or
  parked future is left behind (each peer can park its ``MAX_WAITING_PER_PEER`` again, and no more);
* a flood of parked and refused fetches from two peers while honest rounds run (the loop is not stalled);
* small frames of a peer decoded on the loop while the worker is busy: malformed, truncated, deeply nested
  (lists and ext types), tensors claiming huge shapes, a pointer to another worker's object (decoded twice:
  on the loop and again on the handler thread, and garbage-collected both times), a prelude freeing the
  scientist's object, a fetch of exactly 512 bytes (decoded on the loop) and of 513 (not), one sent in
  one-byte fragments;
* fetches of the reader over more connections than it may park, and of two non-readers, parked before
  their round exists (the "too many" ones going to the handler thread, which takes again): one share, once;
* a reader's fetches parked on a top-bits round that is registered but not published (the first party
  waits for the sink), racing the round's publication or its end when its orchestrator hangs up;
* sessions presenting charlie's peer token with a scientist's or a client's token, or dave's with charlie's,
  fetching a round before it exists (refused; the share goes to charlie's own session only);
* a reader's connections hung up just as their parked fetches' round is published (the share is taken once);
* fetches parked for two rounds of two different sessions, which come in the other order;
* on a worker of its own that keeps its audit log on disk: refusals made on the loop (a non-reader woken at
  publication, a second take, fetches of an ended round written together with a close frame and a FIN)
  are each audited once by the handler thread.

After each: nothing leaked (only the reader got the share, once), nothing stored changed, each peer's
waiting slots recover, and the workers still serve a peer-opened product equal to torch's. No attack broke
the change: every test passes (none is marked xfail).
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import msgpack
import pytest
import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import EXT_CODES, WIRE_VERSION, deserialize, serialize
from veil.mpc.truncation import pack_top_bits, shift_for
from veil.tensors.pointer import PointerWire
from veil.workers.peer_openings import PeerFetchMessage, PeerOpenMessage
from veil.workers.peer_rounds import MAX_WAITING_PER_PEER

from network_helpers import TOKEN
from test_redteam_peer_fetch import GOOD, ZEROS, _answer, _ask, _bob_round, _frame, _honest_round_opens, _raw, _stored
from test_redteam_peer_openings import (  # noqa: F401  (fixtures: cluster and its sink charlie)
    CLIENT, REPLIES, _as, _fetches_of, _peer_token, _start, _stored_before, _unchanged, cluster,
    new_round, sink)

ENDED = ("ended", "no peer opening round")


def _counted(details: list) -> int:
    """Refusals audit rows with these details account for: one each, a summary row its count."""
    return sum(int(d.split()[0]) if " more refused " in d else 1 for d in details)


def _wait_for(predicate, what: str, limit: float = 60) -> None:
    """Until ``predicate()`` (an event); the limit only keeps a broken worker from hanging the run."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def _close_all(conns) -> None:
    for c in conns:
        try:
            c.close()
        except Exception:  # noqa: BLE001  (already reset by the test)
            pass


def _message(reply) -> str:
    return reply.message if type(reply) is m.ErrorReply else type(reply).__name__


def _fetch_absent_rounds(proc, peer: str, n: int) -> list:
    """``peer``'s replies to ``n`` fetches sent at once over ``n`` connections, each for a round that never comes."""
    conns = [_raw(proc, _peer_token(peer)) for _ in range(n)]
    try:
        for c in conns:
            c.send(_frame(new_round()))
        return [deserialize(c.recv(120))[0] for c in conns]
    finally:
        _close_all(conns)


def _slots_free(proc, peer: str) -> None:
    """No waiting slot of ``peer`` is held at ``proc``: ``MAX_WAITING_PER_PEER`` fetches sent at once, each for
    a round that never comes, all park and are answered "not yet" (a leaked slot refuses one "too many").
    Fetches of connections hung up just before may still be parked (a slice each), so a few waves."""
    for _ in range(20):
        replies = _fetch_absent_rounds(proc, peer, MAX_WAITING_PER_PEER)
        assert all(type(r) in (m.OkReply, m.ErrorReply) for r in replies), replies
        assert all("too many" in r.message for r in replies if type(r) is m.ErrorReply), [_message(r) for r in replies]
        if all(type(r) is m.OkReply for r in replies):
            return
    pytest.fail(f"{peer}'s waiting slots at {proc.id} never came back: {[_message(r) for r in replies]}")


def _limit_holds(proc, peer: str) -> None:
    """The per-peer limit still refuses: of ``MAX_WAITING_PER_PEER + 4`` fetches sent at once for rounds that
    never come, some are refused "too many", the others answered "not yet" (a few waves, in case one straggles)."""
    for _ in range(5):
        replies = _fetch_absent_rounds(proc, peer, MAX_WAITING_PER_PEER + 4)
        refused = [r for r in replies if type(r) is not m.OkReply]
        assert all(type(r) is m.ErrorReply and "too many" in r.message for r in refused), replies
        if refused:
            return
    pytest.fail(f"{peer} parked more than {MAX_WAITING_PER_PEER} fetches at {proc.id}")


def _recovers(hook, cluster) -> None:
    """Every peer's waiting slots at bob came back, the limit holds, and charlie takes bob's share of an honest
    round (over the loop path) once."""
    bob = cluster["bob"][0]
    for peer in ("charlie", "dave", "alice"):
        _slots_free(bob, peer)
    _limit_holds(bob, "charlie")
    _honest_round_opens(hook, cluster)


class _Fetcher(threading.Thread):
    """A peer connection asking for ``round_id`` again while the answer is "not yet" (as a party does) or, with
    ``retry_busy``, "too many" (an attacker), until it gets a share or another refusal: ``reply``."""

    def __init__(self, proc, peer: str, round_id: str, name: str = "beaver_mask", retry_busy: bool = False,
                 token: str | None = None, extra: tuple = ()):
        super().__init__(daemon=True)
        self.peer, self.round_id, self.name, self.retry_busy = peer, round_id, name, retry_busy
        self.conn = _raw(proc, token or _peer_token(peer), extra)
        self.not_yet = self.busy = 0
        self.reply = None

    def run(self) -> None:
        try:
            for _ in range(2000):  # (about 400 slices: the rounds here come within seconds)
                reply = _ask(self.conn, _frame(self.round_id, self.name))
                if type(reply) is m.OkReply:
                    self.not_yet += 1
                    continue
                if self.retry_busy and type(reply) is m.ErrorReply and "too many" in reply.message:
                    self.busy += 1
                    time.sleep(0.005)
                    continue
                self.reply = reply
                return
        except Exception as e:  # noqa: BLE001  (asserted by the test)
            self.reply = e
        finally:
            self.conn.close()


def _hang_up(conn, how: str) -> None:
    if how == "reset":  # RST, no close frame
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()
    elif how == "half-close":  # FIN without a close frame; the socket stays open for reading
        conn.sock.shutdown(socket.SHUT_WR)
    else:
        conn.close()


@pytest.mark.parametrize("how", ["close", "pipelined", pytest.param("reset", marks=pytest.mark.slow),
                                 pytest.param("half-close", marks=pytest.mark.slow)])
def test_peers_hanging_up_mid_park_leave_no_waiting_slot_or_parked_fetch_behind(hook, cluster, how):
    """charlie and dave, over ``MAX_WAITING_PER_PEER`` connections each (and a few more, refused "too many"
    and sent to the handler thread), fetch rounds that never come and hang up while the fetches are parked,
    ten times: with a close frame, a TCP reset, a FIN without a close frame, or with three more fetches
    pipelined behind the parked one. Each peer then parks its ``MAX_WAITING_PER_PEER`` fetches again, no
    more, and charlie takes bob's share of an honest round."""
    stored = _stored_before(cluster)
    bob = cluster["bob"][0]
    for _ in range(10):
        conns = [_raw(bob, _peer_token(peer)) for peer in ("charlie", "dave") for _ in range(MAX_WAITING_PER_PEER + 2)]
        try:
            for c in conns:
                for _ in range(4 if how == "pipelined" else 1):
                    c.send(_frame(new_round()))
        finally:
            for c in conns:
                _hang_up(c, how)
        if how == "half-close":
            _close_all(conns)
    _recovers(hook, cluster)
    _unchanged(cluster, stored)


class _Busy:
    """A scientist session keeping bob's worker lock busy (medians of 8M values, one after another, which
    leave the inline lane for a handler thread after a few) until stopped: a peer's small requests arriving
    meanwhile are not decoded by ``try_inline`` but on the loop (``_serve_peer_fetch``)."""

    def __init__(self, hook, proc) -> None:
        self.hook, self.conn, self.stop = hook, _as(hook, proc, TOKEN, "busy"), threading.Event()
        self.big, self.runs, self.error = new_id(), 0, None
        hook.local_worker.send_msg(m.CommandMessage("torch.rand", (1 << 23,), {}, [self.big], False), self.conn)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                oid = new_id()
                self.hook.local_worker.send_msg(m.CommandMessage("torch.median", (m.ObjectRef(self.big),), {}, [oid],
                                                                 False), self.conn)
                self.hook.local_worker.send_msg(m.DeleteMessage([oid]), self.conn)
                self.runs += 1
        except Exception as e:  # noqa: BLE001  (asserted by the test)
            self.error = e

    def close(self) -> None:
        self.stop.set()
        self.thread.join(120)
        self.conn.close()
        assert self.error is None, self.error


def _ext(code: int, value) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(value, use_bin_type=True))


def _packed(*fields) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


def _padded_fetch(round_id: str, size: int) -> bytes:
    """A well-formed fetch frame of exactly ``size`` bytes (the sender field, which the worker ignores, pads it)."""
    for pad in range(size):
        data = _packed(WIRE_VERSION, PeerFetchMessage.TYPE, "p" * pad, [], round_id, "beaver_mask", False, [])
        if len(data) == size:
            return data
    raise AssertionError(size)


def _send_in_fragments(conn, data: bytes) -> None:
    """One binary message in one-byte fragments (RFC 6455 5.4), masked as a client's must be."""
    conn._flush()
    for k in range(len(data)):
        conn._send_frame(data[k:k + 1], (0x80 if k == len(data) - 1 else 0) | (0x02 if k == 0 else 0x00), 1)


def test_small_frames_of_a_peer_decoded_on_the_loop_while_the_worker_is_busy(hook, cluster):
    """While a scientist session keeps bob busy and bob's round waits for charlie to take its share, charlie's
    peer session sends small frames (each at most 512 bytes: decoded on the loop, then again on the handler
    thread): empty, a frame header claiming 4 GiB, truncated, a bare int, another wire version, an unknown
    type, a type or round id nested 440 lists deep, ext types nested 40 deep, a tensor claiming 2^62
    elements, an out-of-band tensor outside a frame, a command with a pointer to the scientist's object at
    alice (a peer of bob; garbage-collected after each decode), a fetch whose round is that pointer and a
    PeerOpenMessage get a short error reply each, a DeleteMessage of the scientist's object frees nothing,
    and the connection keeps serving;
    a fetch of exactly 512 bytes then takes the share, and one of 513 bytes, one in one-byte fragments and
    one behind a prelude freeing the scientist's object are refused (already taken). bob's round stores
    what was published, alice's object and the scientist's are intact."""
    stored = _stored_before(cluster)
    at_alice_value = torch.arange(5.0)
    at_alice = at_alice_value.send(cluster["alice"][1])
    bob = cluster["bob"][0]
    busy = _Busy(hook, bob)
    conn = None
    try:
        _wait_for(lambda: busy.runs >= 4, "the busy session's medians ran")  # (they left the inline lane)
        round_id, ids, msg, _x = _bob_round(hook, cluster)
        errors = {}
        thread = _start(hook, cluster["bob"][1], msg, errors, "bob")
        _wait_for(lambda: _fetches_of(round_id) or not thread.is_alive(), "bob published its round")
        pointer = PointerWire("alice", at_alice.id_at_location, (5,), torch.float32, False, True)
        head = msgpack.packb(WIRE_VERSION) + msgpack.packb(PeerFetchMessage.TYPE) + msgpack.packb("x") + b"\x90"
        nested = b"\x91" * 440 + msgpack.packb(round_id)
        tail = msgpack.packb(False) + msgpack.packb([])  # (the fetch's slots and done fields)
        deep_ext = 1
        for _ in range(40):
            deep_ext = msgpack.ExtType(EXT_CODES.TUPLE, msgpack.packb([deep_ext], use_bin_type=True))
        frames = {
            "empty": b"",
            "a frame header claiming 4 GiB": b"\xc1" + struct.pack("<I", 0xFFFFFFFF) + b"\x90",
            "truncated": _frame(round_id)[:-5],
            "a bare int": msgpack.packb(7),
            "another wire version": _packed(WIRE_VERSION + 1, PeerFetchMessage.TYPE, "x", [], round_id, "beaver_mask", False,
                                            []),
            "an unknown type": _packed(WIRE_VERSION, 999, "x", [], round_id, "beaver_mask", False, []),
            "a type nested 440 deep": b"\x98" + msgpack.packb(WIRE_VERSION) + b"\x91" * 440
            + msgpack.packb(PeerFetchMessage.TYPE) + msgpack.packb("x") + b"\x90" + msgpack.packb(round_id)
            + msgpack.packb("beaver_mask") + tail,
            "a round nested 440 deep": b"\x98" + head + nested + msgpack.packb("beaver_mask") + tail,
            "ext types nested 40 deep": _packed(WIRE_VERSION, PeerFetchMessage.TYPE, "x", [], deep_ext, "beaver_mask", False,
                                                []),
            "a tensor claiming 2^62 elements": _packed(WIRE_VERSION, PeerFetchMessage.TYPE, "x", [],
                                                       _ext(EXT_CODES.TENSOR, ["int64", [1 << 31, 1 << 31], False,
                                                                              b"\0" * 8]), "beaver_mask", False, []),
            "an out-of-band tensor outside a frame": _packed(WIRE_VERSION, PeerFetchMessage.TYPE, "x", [],
                                                             _ext(EXT_CODES.TENSOR_OOB, ["int64", [6], False, 48]),
                                                             "beaver_mask", False, []),
            "a command on a pointer to alice": serialize(m.CommandMessage("torch.add", (pointer, 1), {}, [new_id()],
                                                                          False)),
            "a fetch of a pointer to alice": serialize(PeerFetchMessage(pointer, "beaver_mask")),
            "a DeleteMessage of the scientist's object": serialize(m.DeleteMessage([stored[1].id_at_location])),
            "a PeerOpenMessage": serialize(PeerOpenMessage("beaver_mask", (m.ObjectRef(_x.id_at_location),) * 4, {},
                                                           new_round(), ["bob", "charlie"], [new_id(), new_id()])),
        }
        conn = _raw(bob, _peer_token("charlie"))
        for what, data in frames.items():
            assert len(data) <= 512, (what, len(data))
            reply = _ask(conn, data)
            if what == "a DeleteMessage of the scientist's object":  # a peer frees only its own hand-offs
                assert type(reply) in (m.OkReply, m.ErrorReply), (what, reply)
                continue
            assert type(reply) is m.ErrorReply, (what, reply)
            assert "\n" not in reply.message and len(reply.message) < 1200, (what, reply.message[:300])
        share = _answer(conn, _padded_fetch(round_id, 512))  # (asked again on "not yet", as a peer does)
        assert type(share) is m.ObjectsReply and all(torch.equal(t, ZEROS) for t in share.objects), share
        late = {"513 bytes": _padded_fetch(round_id, 513), "another step": _frame(round_id, "trunc_mask"),
                "freeing the scientist's object first": _frame(round_id, prelude=[stored[1].id_at_location]),
                "plain": _frame(round_id)}
        for what, data in late.items():
            reply = _ask(conn, data)
            assert type(reply) is m.ErrorReply, (what, reply)
            assert any(w in reply.message for w in ("already took", "opens 'beaver_mask'") + ENDED), \
                (what, reply.message)
        _send_in_fragments(conn, _frame(round_id))
        reply = deserialize(conn.recv(120))[0]
        assert type(reply) is m.ErrorReply and any(w in reply.message for w in ("already took",) + ENDED), reply
        thread.join(120)
    finally:
        if conn is not None:
            conn.close()
        busy.close()
    assert not errors, errors
    _stored(hook, cluster["bob"][1], ids, GOOD[0])
    assert torch.equal(at_alice.copy().get(), at_alice_value)  # neither decoded pointer freed it
    _recovers(hook, cluster)
    _unchanged(cluster, stored)


def test_the_reader_over_more_connections_than_it_may_park_and_non_readers_get_one_share_once(hook, cluster):
    """Before bob's round exists, charlie (its reader) fetches it over ``MAX_WAITING_PER_PEER + 3``
    connections, asking again after "not yet" and after "too many" (those go to the handler thread, which
    takes again), and once for another step; dave and alice (peers, not readers) over two each; sessions
    presenting charlie's peer token with a scientist's or a client's, and dave's with charlie's (dave first),
    once each. Once bob runs the round exactly one reply carries its share, to one of charlie's own
    sessions; every other fetch is refused."""
    stored = _stored_before(cluster)
    bob = cluster["bob"][0]
    round_id, ids, msg, _x = _bob_round(hook, cluster)
    fetchers = [_Fetcher(bob, "charlie", round_id, retry_busy=True) for _ in range(MAX_WAITING_PER_PEER + 3)]
    fetchers += [_Fetcher(bob, peer, round_id, retry_busy=True) for peer in ("dave", "alice") for _ in range(2)]
    fetchers += [_Fetcher(bob, "charlie+", round_id, token=_peer_token("charlie"), extra=(extra,))
                 for extra in (TOKEN, CLIENT)]
    fetchers += [_Fetcher(bob, "scientist+", round_id, token=TOKEN, extra=(_peer_token("charlie"),)),
                 _Fetcher(bob, "dave+", round_id, token=_peer_token("dave"), extra=(_peer_token("charlie"),)),
                 _Fetcher(bob, "charlie", round_id, "trunc_mask", retry_busy=True)]
    for f in fetchers:
        f.start()
    _wait_for(lambda: all(f.not_yet or f.busy or f.reply is not None for f in fetchers),
              "every fetch waited, or was refused, once")
    errors = {}
    thread = _start(hook, cluster["bob"][1], msg, errors, "bob")
    for f in fetchers:
        f.join(120)
    thread.join(120)
    assert not errors, errors
    served = [f for f in fetchers if type(f.reply) is m.ObjectsReply]
    assert len(served) == 1 and served[0].peer == "charlie", [(f.peer, _message(f.reply)) for f in fetchers]
    assert all(torch.equal(t, ZEROS) for t in served[0].reply.objects)
    for f in fetchers:
        if f is served[0]:
            continue
        assert type(f.reply) is m.ErrorReply, (f.peer, f.reply)
        allowed = {"charlie": ("already took", "opens 'beaver_mask'") + ENDED, "charlie+": ("peer workers",),
                   "scientist+": ("peer workers",)}.get(f.peer, ("not a reader",) + ENDED)
        assert any(w in f.reply.message for w in allowed), (f.peer, f.reply.message)
    _stored(hook, cluster["bob"][1], ids, GOOD[0])
    _recovers(hook, cluster)
    _unchanged(cluster, stored)


@pytest.mark.parametrize("how", ["close", pytest.param("reset", marks=pytest.mark.slow)])
def test_readers_hanging_up_as_their_round_is_published_leave_its_share_taken_once(hook, cluster, how):
    """charlie parks fetches for bob's round (not yet started) on four connections and hangs two of them up
    just as bob starts the round (racing the publication: a fetch on a hung-up connection may take the share
    and lose it, as a party that hangs up does). The share is taken once in all: bob's round completes and
    stores what was published, the surviving fetches get the share or "already taken", never both twice."""
    stored = _stored_before(cluster)
    bob = cluster["bob"][0]
    round_id, ids, msg, _x = _bob_round(hook, cluster)
    fetchers = [_Fetcher(bob, "charlie", round_id, retry_busy=True) for _ in range(2)]
    doomed = [_raw(bob, _peer_token("charlie")) for _ in range(2)]
    for f in fetchers:
        f.start()
    for c in doomed:
        c.send(_frame(round_id))
    _wait_for(lambda: all(f.not_yet for f in fetchers), "the fetches parked")
    errors = {}
    thread = _start(hook, cluster["bob"][1], msg, errors, "bob")
    for c in doomed:
        _hang_up(c, how)
    for f in fetchers:
        f.join(120)
    thread.join(120)
    assert not errors, errors
    served = [f.reply for f in fetchers if type(f.reply) is m.ObjectsReply]
    assert len(served) <= 1, served
    assert all(torch.equal(t, ZEROS) for rep in served for t in rep.objects)
    assert all(type(f.reply) is m.ErrorReply and any(w in f.reply.message for w in ("already took",) + ENDED)
               for f in fetchers if type(f.reply) is not m.ObjectsReply), [_message(f.reply) for f in fetchers]
    _stored(hook, cluster["bob"][1], ids, GOOD[0])
    _recovers(hook, cluster)
    _unchanged(cluster, stored)


N = 64


class _Gate:
    """The sink's answer to bob's fetch, held until the test opens the gate: then ``values`` or, None, "not
    yet" (while it is held, bob's top-bits round is registered at bob but not published)."""

    def __init__(self, values) -> None:
        self.values, self.open = values, threading.Event()

    def send_to(self, ws) -> None:
        self.open.wait(120)
        reply = m.OkReply() if self.values is None else m.ObjectsReply(list(self.values))
        ws.send(serialize(reply, sender="charlie"))


@pytest.mark.parametrize("end", ["published", "abandoned"])
def test_fetches_parked_on_a_registered_round_race_its_publication_or_its_end(hook, cluster, end):
    """bob runs a top-bits truncation round as its first party with the sink charlie, whose answer the test
    holds: the round is registered at bob (charlie its reader) but publishes nothing. charlie's fetches over
    three connections park, again and again. Then either the sink answers (bob publishes the top bits of c:
    exactly one of charlie's fetches takes them, the others are refused, bob stores c) or the orchestrator
    hangs up first and the sink answers "not yet" (the round ends: every fetch is refused, none gets
    anything)."""
    stored = _stored_before(cluster)
    bob = cluster["bob"][0]
    orchestrator = _as(hook, bob, TOKEN, "orchestrator")
    gen = torch.Generator().manual_seed(7)
    x, r = (torch.empty(N, dtype=torch.int64).random_(generator=gen) for _ in range(2))
    s = torch.empty(N, dtype=torch.int64).random_(generator=gen)  # the sink's share of c
    xp, rp = x.send(orchestrator), r.send(orchestrator)
    round_id, oid, shift = new_round(), new_id(), shift_for(2**16)
    gate = _Gate([s] if end == "published" else None)
    REPLIES[round_id] = gate
    msg = PeerOpenMessage("trunc_mask", (m.ObjectRef(xp.id_at_location), m.ObjectRef(rp.id_at_location), shift), {},
                          round_id, ["bob", "charlie"], [oid], "top_bits")
    errors = {}
    thread = _start(hook, orchestrator, msg, errors, "bob")
    fetchers = []
    try:
        _wait_for(lambda: _fetches_of(round_id) or not thread.is_alive(), "bob registered the round and fetched")
        fetchers = [_Fetcher(bob, "charlie", round_id, "trunc_mask", retry_busy=True) for _ in range(3)]
        for f in fetchers:
            f.start()
        _wait_for(lambda: all(f.not_yet for f in fetchers), "each fetch parked and was answered not yet")
        if end == "abandoned":
            orchestrator.close()
        gate.open.set()
        for f in fetchers:
            f.join(120)
        thread.join(120)
        if end == "published":  # bob stored the opened c for the orchestrator
            assert torch.equal(sy.PointerTensor(orchestrator, oid, hook.local_worker, (N,), torch.int64).get(),
                               x + r + shift + s)
    finally:
        gate.open.set()
        orchestrator.close()
    replies = [f.reply for f in fetchers]
    served = [rep for rep in replies if type(rep) is m.ObjectsReply]
    refused = [rep for rep in replies if type(rep) is m.ErrorReply]
    c = x + r + shift + s
    if end == "published":
        assert not errors, errors
        assert len(served) == 1 and len(refused) == 2, replies
        (bits,) = served[0].objects
        assert torch.equal(bits, pack_top_bits(c))
        assert all(any(w in rep.message for w in ("already took",) + ENDED) for rep in refused), replies
    else:
        assert "bob" in errors
        assert not served and len(refused) == 3, replies
        assert all(any(w in rep.message for w in ENDED) for rep in refused), [rep.message for rep in refused]
    _recovers(hook, cluster)
    _unchanged(cluster, stored)
