"""Red team, second pass on CKKS context scopes (``veil/he/context_scope.py``, ``veil/he/ckks_wire.py``): the
exceptions the first pass left, attacked through a real network worker's request path in process
(``serve_bytes`` with authenticated sessions, ``server_sessions.py``), and through a real move from one network
worker to another (a link that hands the first worker's frames to the second's peer session).

Attackers: a scientist B with another session's (A's) public context bytes (public: a round's context, or any
scientist's once sent); the same scientist holding a peer token too, or driving a move from another worker.

Holes found and fixed:

* A peer-only session saw every scope: a scientist who also held a peer token, or who had an honest peer move
  a ciphertext naming another session's context, learned whether that context was held (loaded vs refused)
  and computed under it. Now a move carries its ciphertexts' contexts (``context_scope.carrying_contexts``,
  around a move's send in ``veil/workers/handlers.py``): the receiver loads each under the context it carried,
  held in the peer link's own scope, and a peer session sees its own scope and the shared one only.
* Carrying a context per ciphertext (the first version of that fix): a move of many one-value ciphertexts under
  one context encoded it once per ciphertext (8 x 1.9 MB for 8; 34 MB each with Galois keys). Now once per
  context and move, the later ciphertexts naming the carried bytes' digest.
* The in-process key owner's shortcut answered every session: a scientist's tensor of that key, naming any
  evaluation keys, loaded (an oracle on whose key owner lives in this process), and a scientist sending that
  key's public context was handed the owner's secret-holding context object (uncharged). Now only decodes
  that run for no network session (the process's own code, in-process workers) use it.

Held (guards below): a context one session sent is charged to that session even when another sent the same
bytes; a context sent as a command's argument is as scoped as one stored; a move between workers still
computes (plain-torch values).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.he import ckks, ckks_wire, context_memory
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import DecodeContext, deserialize, serialize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from he_scopes import PEER, REFUSED, X, ScopedWorker, key_pair, naming, store_answer  # noqa: E402
from server_sessions import open_session, request  # noqa: E402

ts = pytest.importorskip("tenseal")

TAGGED = "w1#0123456789abcdef"  # (a peer's frame for one of its requester accounts)


class Link(sy.VirtualWorker):
    """Worker 1's link to worker 2: each frame worker 1 sends is served by worker 2 in its peer session."""

    frame_parts_over = None

    def __init__(self, hook, to: ScopedWorker):
        super().__init__(hook, id=f"ctx-two-link-{new_id() % 10**6}")
        self.to = to

        self.sizes = []  # (of each frame worker 1 sent)

    def _recv_msg(self, data):
        self.sizes.append(len(bytes(data)))
        return self.to.srv.serve_bytes(bytes(data), self.to.peer)


@pytest.fixture
def w(hook):
    return ScopedWorker(hook, "ctx-two")


# ------------------------------------------------------------------ 1. the peer exception


def test_a_peer_session_gets_the_same_refusal_whether_or_not_another_session_holds_the_context(w):
    """Attack (existence, through the peer exception): a scientist who also holds a peer token (or a peer moving
    on its behalf) sends, in a peer-only session, a ciphertext naming A's context without carrying it, once while
    A holds it here and once while nobody does. Must hold: the same one-line refusal both times (before: loaded
    under A's context while A held it, as peers saw every scope)."""
    answers = []
    for a_holds in (True, False):
        victim = key_pair()
        if a_holds:
            assert type(w.store(w.a, victim.public())) is m.OkReply
        answers.append(store_answer(w.store(w.peer, naming(victim), sender=TAGGED)))
    assert answers[0] == answers[1], answers
    assert REFUSED in answers[0]


def _move_worker(hook, w2):
    """Worker 1 (network, in process) with scientist sessions, linked to ``w2`` as its peer."""
    w1 = ScopedWorker(hook, "ctx-two-w1")
    link = Link(hook, w2)
    w1.srv.add_peer(link)
    return w1, link


def _forget_worker_1s_registrations(w1):
    """Worker 2 runs in this process too: what worker 1's sessions registered is not in worker 2's registry when
    they are two processes (worker 1's stored objects keep its contexts alive)."""
    worker_1s = {f"session:{s.id}" for s in w1.srv.sessions.values()}
    for key in [k for k in list(ckks_wire._received.keys()) if k[0] in worker_1s]:
        ckks_wire._received.pop(key, None)


def _moved(w1, link, session, ctx_public, tensor):
    """Stores ``ctx_public`` and ``tensor`` for ``session`` at worker 1 and moves the tensor to worker 2 (its new
    id, and the move's answer)."""
    tid, new = new_id(), new_id()
    reply = request(w1.srv, session, m.ObjectMessage([m.StoredObject(new_id(), ctx_public),
                                                      m.StoredObject(tid, tensor)]))
    assert type(reply) is m.OkReply, reply
    _forget_worker_1s_registrations(w1)
    return new, store_answer(request(w1.srv, session, m.MoveMessage([tid], link.id, [new])))


def test_a_move_of_a_ciphertext_under_anothers_public_context_does_not_tell_whether_it_is_held(hook, w):
    """Attack (existence, through an honest peer's move): B, a scientist at worker 1 too, stores there A's public
    context bytes and a ciphertext under them, and moves it to worker 2, once while A holds that context at worker
    2 and once while nobody does. Must hold: the same answer both times (before: the move succeeded iff A held
    it, the receiving peer session looking in every scope)."""
    w1, link = _move_worker(hook, w)
    answers = []
    for a_holds in (True, False):
        victim = key_pair()
        if a_holds:
            assert type(w.store(w.a, victim.public())) is m.OkReply
        answers.append(_moved(w1, link, w1.b, victim.public(), naming(victim))[1])
    assert answers[0] == answers[1], answers


def test_a_moved_ciphertext_still_computes_with_the_receivers_own(hook, w):
    """Kept (secure aggregation's move): the coordinator's session A stores the round's public context at both
    workers and a ciphertext at each; worker 1's moves to worker 2, where A adds the two. Must hold: the sum
    decrypts to plain torch's."""
    round_keys = key_pair()
    own = new_id()
    assert type(request(w.srv, w.a, m.ObjectMessage([m.StoredObject(new_id(), round_keys.public()),
                                                     m.StoredObject(own, ckks.encrypt(2 * X, round_keys))]))) \
        is m.OkReply
    w1, link = _move_worker(hook, w)
    new, answer = _moved(w1, link, w1.a, round_keys.public(), ckks.encrypt(X, round_keys.public()))
    assert answer == "loaded"
    out = new_id()
    reply = request(w.srv, w.a, m.CommandMessage("veil.he.op", ("add", m.ObjectRef(own), m.ObjectRef(new), out),
                                                 {}, [], False))
    assert type(reply) is m.OkReply, reply
    ckks_wire.remember(round_keys)  # (the coordinator's client decodes what comes back under its secret key)
    got = request(w.srv, w.a, m.GetObjectsMessage([out]))
    assert type(got) is m.ObjectsReply, got
    torch.testing.assert_close(got.objects[0].decrypt(round_keys), 3 * X, atol=1e-3, rtol=0)


def test_a_later_peer_session_does_not_load_under_a_context_an_earlier_one_carried(hook, w):
    """Attack (scope memory): the coordinator's session A holds the round's context at worker 2; a move carries
    it into the peer link's scope too, and the hand-off keeps it alive; a second peer session (another
    connection with the peer token) names it without carrying it. Must hold: refused, as a context nobody holds
    (a scope is one session's; before: loaded, peer sessions seeing every scope)."""
    round_keys = key_pair()
    assert type(w.store(w.a, round_keys.public())) is m.OkReply
    w1, link = _move_worker(hook, w)
    assert _moved(w1, link, w1.a, round_keys.public(), naming(round_keys))[1] == "loaded"
    again = open_session(w.srv, PEER)
    assert REFUSED in store_answer(w.store(again, naming(round_keys), sender=TAGGED))


def test_a_move_of_many_ciphertexts_under_one_context_carries_it_once(hook, w):
    """Attack (resources, the carried contexts): B moves, in one MoveMessage, 8 one-value ciphertexts under one
    context. Must hold: the frame holds the context once (else once per ciphertext: 8 x 1.9 MB here, 34 MB each
    with Galois keys, so a move of a thousand tiny ciphertexts made worker 1 build tens of GB), every one loads
    at worker 2, and two of them sum there to plain torch's."""
    keys = key_pair()
    w1, link = _move_worker(hook, w)
    values = [torch.tensor([float(i)], dtype=torch.float64) for i in range(8)]
    tensors = [ckks.encrypt(v, keys.public()) for v in values]
    ids, news = [new_id() for _ in tensors], [new_id() for _ in tensors]
    assert type(request(w1.srv, w1.b, m.ObjectMessage([m.StoredObject(new_id(), keys.public())] + [
        m.StoredObject(i, t) for i, t in zip(ids, tensors)]))) is m.OkReply
    _forget_worker_1s_registrations(w1)
    assert store_answer(request(w1.srv, w1.b, m.MoveMessage(ids, link.id, news))) == "loaded"
    ciphertexts = sum(len(seg.serialize()) for t in tensors for seg in t.segments)
    assert link.sizes[-1] < len(keys.public().serialize()) + ciphertexts + (64 << 10), link.sizes
    out = new_id()
    assert type(request(w.srv, w.b, m.CommandMessage("veil.he.op", ("add", m.ObjectRef(news[3]),
                                                                     m.ObjectRef(news[7]), out), {}, [], False))) \
        is m.OkReply
    ckks_wire.remember(keys)  # (B's client decodes what comes back under its secret key)
    got = request(w.srv, w.b, m.GetObjectsMessage([out]))
    assert type(got) is m.ObjectsReply, got
    torch.testing.assert_close(got.objects[0].decrypt(keys), values[3] + values[7], atol=1e-3, rtol=0)


# ------------------------------------------------------------------ 2. the in-process key owner


def test_an_in_process_key_owner_is_no_oracle_to_a_scientist(w):
    """Attack (existence of a key owner): this worker's process holds a secret context (the owner's script did
    ``send_encrypted`` elsewhere, or runs a round's coordinator here); B, who has its public key (public), sends
    a ciphertext of that key naming evaluation keys nobody sent. Must hold: the refusal a stranger key gets
    (before: loaded under the key owner's secret-holding context)."""
    owner = key_pair()
    ckks_wire.remember(owner)
    answers = [store_answer(w.store(w.b, naming(ctx))) for ctx in (owner, key_pair())]
    assert answers[0] == answers[1], answers
    assert REFUSED in answers[0]


def test_a_scientist_is_not_handed_the_in_process_key_owners_context(w):
    """Attack (confused deputy): B sends the public context of the in-process key owner's key. Must hold: what
    B's decode gets holds no secret key and is charged to B like any context (before: the owner's own context
    object, secret key and all, uncharged beside B's ciphertexts)."""
    owner = key_pair()
    ckks_wire.remember(owner)
    frame = serialize(m.ObjectMessage([m.StoredObject(new_id(), owner.public())]), sender="client")
    got = deserialize(frame, DecodeContext(session=lambda: w.b))[0].objects[0].obj
    assert not got.has_secret_key
    assert type(w.store(w.b, owner.public(), naming(owner))) is m.OkReply
    assert w.srv.monitor.session_bytes(w.b.id) >= context_memory.held_bytes(owner.public())


# ------------------------------------------------------------------ 3. who fills which scope, and is charged


def test_a_context_sent_as_a_command_argument_is_scoped_to_its_session(w):
    """Attack (another door into the shared scope): A passes its public context as the key of an encryption
    request (a worker function's argument, not a stored object); B then names it. Must hold: B is refused as
    for a context nobody holds, while A's own later tensor loads (what A sent stays A's)."""
    victim = key_pair()
    state = request(w.srv, w.a, m.ObjectMessage([m.StoredObject(sid := new_id(), torch.ones(3))]))
    assert type(state) is m.OkReply, state
    reply = request(w.srv, w.a, m.CommandMessage("veil.fl.encrypt_state", ([m.ObjectRef(sid)], 1.0,
                                                                           victim.public(), [new_id()]),
                                                 {}, [], False))
    assert type(reply) is m.OkReply, reply
    assert REFUSED in store_answer(w.store(w.b, naming(victim)))
    assert store_answer(w.store(w.a, naming(victim))) == "loaded"  # (its ciphertext keeps A's copy alive)


def test_each_session_sending_one_context_is_charged_for_it(w):
    """Attack (scope memory): A and B each send the same public context (each session loads its own copy).
    Must hold: each session is charged at least what SEAL holds for it, not one of them alone."""
    ctx = key_pair()
    for session in (w.a, w.b):
        assert type(w.store(session, ctx.public())) is m.OkReply
        assert w.srv.monitor.session_bytes(session.id) >= context_memory.held_bytes(ctx.public())
