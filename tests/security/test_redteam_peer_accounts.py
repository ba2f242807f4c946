"""Red team: requester accounts on peer links (``veil/workers/accounts.py``, session 44).

A network worker names, in the sender field of the frames it sends a peer while it handles a session's
request, that session's random account tag (``"dave#<16 hex>"``); the receiving worker charges each unclaimed
hand-off to ``(peer link, account)`` (at most ``--max-session-mb`` per account, at most
``MAX_PEER_ACCOUNTS`` accounts per link) and frees an account's unclaimed hand-offs when the sending worker
says the session ended (``veil.peer.end_account``).

These tests drive real :class:`WebsocketServerWorker` request paths in-process (``serve_bytes`` with
authenticated sessions; ``dave``'s peer link to ``alice``/``bob`` is a shim that hands each frame to the
receiver's ``serve_bytes`` under dave's *peer* session there, on a fresh thread as a separate process
would). No worker processes: the whole file runs in a few seconds.

Findings (fixed in session 44; the first four tests failed before):

* ``test_a_hostile_peer_rotating_account_tags_holds_no_more_than_the_worker_admits``: the receiver trusts the
  tag, so a peer (or anything holding its peer token) that names a fresh tag per frame parks
  ``MAX_PEER_ACCOUNTS`` x the session quota (256x) on one link, where before the change the link held one
  session quota. The module docstring's "a peer that lies about it can do no more than it could with its
  own link" did not hold; nothing bounded a link's total. Now: at most ``PEER_LINK_SESSIONS`` quotas per link.
* ``test_end_session_does_not_wait_on_a_slow_peer``: ``end_session`` now sends ``end_account`` to every peer
  the session used, synchronously, on the executor thread (each peer up to the link's 120 s reply timeout
  or 10 s connect timeout, serialized on that link's lock); a slow, hung or black-holed peer makes every
  session end (and the worker's shutdown) wait, tying up handler threads. Now: one background sender.
* ``test_an_account_holding_only_empty_hand_offs_is_still_counted``: ``store._unaccount`` drops an account
  from ``account_usage`` when its bytes reach 0, even while zero-byte hand-offs of it are still unclaimed,
  so ``accounts()`` undercounts against ``MAX_PEER_ACCOUNTS``. Now: accounts counted by objects.
* ``test_empty_tensors_moved_through_the_provider_are_charged_something`` (pre-existing gap the account
  quota inherits): empty tensors are charged 0 bytes, so a provider-only session parks any number of
  hand-offs (~650 bytes of memory each) at the parties under one account. Now: every stored tensor is
  charged at least ``MIN_TENSOR_BYTES``.
"""

from __future__ import annotations

import random
import secrets
import threading
import time

import pytest
import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.mpc.providers.worker_dealer import DEAL
from veil.workers.accounts import END_ACCOUNT, MAX_PEER_ACCOUNTS, split_sender
from veil.workers.monitor import MIN_TENSOR_BYTES
from veil.workers.store import Entry, ObjectStore, StoreKey
from veil.workers.websocket_auth import authenticate
from veil.workers.websocket_server import WebsocketServerWorker

SCI = "rt44-scientist-token"  # a scientist at every worker
PEER_DAVE = "rt44-peer-dave-token"  # what dave presents to its peers
PEER_BOB = "rt44-peer-bob-token"  # what bob presents to its peers
QUOTA = 64 << 10  # --max-session-mb at the parties (64 KiB: cheap to fill)


class _Link:
    """dave's peer link to a receiver: each frame goes to the receiver's ``serve_bytes`` under dave's peer
    session there, on a thread of its own (a separate process: no context or thread-locals shared)."""

    frame_parts_over = None
    _skeletons = None

    def __init__(self, receiver: WebsocketServerWorker, session, concurrent: bool = False, delay_end: float = 0.0):
        self.receiver, self.session, self.id = receiver, session, receiver.id
        self.concurrent_requests = concurrent  # the runtime sends to it from pool threads, as to a network worker
        self.delay_end = delay_end
        #: set: an end_account notice waits for it (up to 120 s), and whether it was set in time is recorded
        self.end_gate: threading.Event | None = None
        self.end_released: list[bool] = []
        self.senders: list[str] = []
        self.ops: list[str] = []

    def _recv_msg(self, data):
        data = bytes(data)
        msg, sender, _ = deserialize(data)
        self.senders.append(sender)
        self.ops.append(getattr(msg, "op", type(msg).__name__))
        if self.delay_end and getattr(msg, "op", None) == END_ACCOUNT:
            time.sleep(self.delay_end)  # a busy, hung or far-away peer
        if self.end_gate is not None and getattr(msg, "op", None) == END_ACCOUNT:
            self.end_released.append(self.end_gate.wait(120))  # (hung until the test lets it answer)
        out = []
        t = threading.Thread(target=lambda: out.append(self.receiver.serve_bytes(data, self.session)))
        t.start()
        t.join()
        return out[0]


def _server(hook, wid: str, quota: int | None = QUOTA) -> WebsocketServerWorker:
    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    tokens.add(PEER_DAVE, "dave", "peer")
    tokens.add(PEER_BOB, "bob", "peer")
    srv = WebsocketServerWorker(hook, id=wid, port=0, tokens=tokens)
    srv.monitor.max_session_bytes = quota
    return srv


def _session(srv: WebsocketServerWorker, token: str):
    session = authenticate(srv.tokens, [token])
    srv.sessions[session.id] = session
    return session


def _req(srv, session, msg, sender: str = "client"):
    return deserialize(srv.serve_bytes(serialize(msg, sender=sender), session))[0]


def _ok(reply) -> None:
    assert type(reply) is m.OkReply, reply


def _int64(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64)


def _store(srv):
    return srv.monitor._store


def _charged(n: int) -> int:
    """What ``_int64(n)`` is charged to a quota (every tensor at least MIN_TENSOR_BYTES)."""
    return max(8 * n, MIN_TENSOR_BYTES)


def _until(condition, timeout: float = 10.0) -> bool:
    """Waits for ``condition()`` (the end of a session reaches the peers from a background thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def cluster(hook):
    """alice and bob (parties, 64 KiB session quota), dave (provider) with peer links to both."""
    alice, bob, dave = _server(hook, "alice"), _server(hook, "bob"), _server(hook, "dave", quota=None)
    links = {}
    for party in (alice, bob):
        link_session = _session(party, PEER_DAVE)
        links[party.id] = _Link(party, link_session, concurrent=True)
        dave.add_peer(links[party.id])
    return alice, bob, dave, links


# ------------------------------------------------------------------------------------------------ open findings


def test_a_hostile_peer_rotating_account_tags_holds_no_more_than_the_worker_admits(hook):
    """Attack: a peer worker (or whoever holds its peer token) names a fresh account tag in every frame
    (``"dave#<16 random hex>"``) and hands alice objects nobody will claim. Each tag is a new account with
    its own session quota, up to MAX_PEER_ACCOUNTS (256) of them: one link parks 256 x ``--max-session-mb``
    at alice. Before session 44 the link's namespace was held to one session quota; the owner sized alice's
    memory as (connections x quota) and a peer link now escapes that by 256x (with a 1 GiB quota: 256 GiB).
    Expected: one peer link never holds more than alice admits for all its own connections together
    (``max_connections`` x quota). Fix: a ceiling per peer link as well (e.g. ``--max-peer-mb``, or at most
    max_connections accounts x quota, fair-shared), keeping the per-account quota inside it."""
    alice = _server(hook, "alice")
    link = _session(alice, PEER_DAVE)
    held = 0
    for k in range(MAX_PEER_ACCOUNTS + 20):
        tag = secrets.token_hex(8)
        reply = _req(alice, link, m.ObjectMessage([m.StoredObject(new_id(), _int64(QUOTA // 8))]),
                     sender="dave#" + tag)
        if type(reply) is m.OkReply:
            held += QUOTA
    assert alice.monitor.session_bytes(link.id) == held
    bound = alice.max_connections * QUOTA
    assert held <= bound, (
        f"one peer link holds {held >> 10} KiB of unclaimed hand-offs at alice by rotating account tags: "
        f"{held // QUOTA} x the {QUOTA >> 10} KiB session quota, more than alice admits for all its "
        f"{alice.max_connections} connections together ({bound >> 10} KiB)")


def test_end_session_does_not_wait_on_a_slow_peer(cluster):
    """Attack/fault: a session at dave moves one object to alice, then leaves. ``end_session`` now sends
    ``veil.peer.end_account`` to alice synchronously, on the handler thread that ends the session (outside
    the worker lock, but on the peer link's lock): a peer that answers slowly (busy, hung, or a black-holed
    address: up to the link's 120 s reply timeout, 10 s per reconnect) holds every ending session's thread,
    and the worker's shutdown (``serve_async`` waits for its executor), for as long, one session after the
    other. Before session 44 ending a session never touched the network.
    Expected: end_session returns promptly; the end_account notice still reaches alice (asynchronously).
    Fix: queue the notices to a background sender (bounded, best effort) instead of sending them inline."""
    alice, bob, dave, links = cluster
    # alice answers the end_account notice only once the test lets her, after end_session returned (or after
    # 120 s: an end_session that waited for her reply returns only then, and the notice is recorded as not let go)
    links["alice"].end_gate = gate = threading.Event()
    s = _session(dave, SCI)
    _ok(_req(dave, s, m.ObjectMessage([m.StoredObject(5, _int64(16))])))
    _ok(_req(dave, s, m.MoveMessage([5], "alice", [new_id()])))
    assert _store(alice).account_usage
    started = time.monotonic()
    dave.end_session(s)
    took = time.monotonic() - started
    gate.set()
    deadline = time.monotonic() + 60
    while _store(alice).account_usage and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _store(alice).account_usage, "the session's hand-offs at alice were never freed"
    released = links["alice"].end_released
    assert released == [True], f"end_session waited {took:.1f} s on a slow peer's end_account reply ({released})"


def test_an_account_holding_only_empty_hand_offs_is_still_counted():
    """Store accounting: an account with an 8-byte and a 0-byte unclaimed hand-off; a session claims the
    8-byte one. ``_unaccount`` pops the account from ``account_usage`` once its bytes reach 0, although the
    0-byte hand-off is still unclaimed (``drop_account`` still finds it through ``_hand_offs``), so
    ``accounts()`` no longer counts it and MAX_PEER_ACCOUNTS does not bound accounts that hold only empty
    tensors (whose entries cost memory the byte quota does not see). Fix: count an account while
    ``_hand_offs`` names it (e.g. per-account object counts), not while its bytes are positive."""
    key = StoreKey()
    store = ObjectStore("alice", key)
    store.put(key, "peer-link", 1, Entry(_int64(1), nbytes=8), hand_off=True, account="a" * 16)
    store.put(key, "peer-link", 2, Entry(_int64(0), nbytes=0), hand_off=True, account="a" * 16)
    assert store.accounts("peer-link") == 1
    assert store.claim(key, "session-c", 1) is not None
    assert store._hand_offs.get(2) == ("peer-link", "a" * 16)  # still an unclaimed hand-off of that account
    assert store.accounts("peer-link") == 1, "an account still holding an unclaimed hand-off is not counted"


def test_empty_tensors_moved_through_the_provider_are_charged_something(cluster):
    """Attack (pre-existing accounting gap that the account quota inherits): a provider-only session stores
    20 000 empty tensors at dave (0 bytes each) and moves them all to alice in one MoveMessage. alice keeps
    20 000 hand-offs (about 650 bytes of memory each, ~30 bytes on the wire) charged 0 bytes to the account:
    neither the 64 KiB account quota nor MAX_PEER_ACCOUNTS (a 0-byte account may drop out of the count, see
    above) bounds them, and the session can repeat it while it stays connected (one 256 MB frame: ~8 M entries,
    ~5 GiB at the party). Fix: charge every stored entry a minimum (the README's "at least 1 kB" for other
    objects), hand-offs included."""
    alice, _, dave, links = cluster
    mallory = _session(dave, SCI)
    n = 20_000
    ids = [new_id() for _ in range(n)]
    _ok(_req(dave, mallory, m.ObjectMessage([m.StoredObject(i, torch.empty(0, dtype=torch.int64)) for i in ids])))
    _req(dave, mallory, m.MoveMessage(ids, "alice", [new_id() for _ in range(n)]))
    held = len(_store(alice)._spaces.get(links["alice"].session.id, {}))
    assert held * 64 <= QUOTA, (
        f"alice holds {held} empty hand-offs for one account charged "
        f"{sum(_store(alice).account_usage.values())} bytes against a {QUOTA >> 10} KiB quota")


# --------------------------------------------------------------------------- properties checked (pass today)


def test_a_scientist_forging_an_account_tag_is_ignored(cluster):
    """A scientist session at alice sends frames whose sender names dave and an account tag: its objects are
    its own (not hand-offs, charged to its namespace), and it cannot end dave's accounts there."""
    alice, bob, dave, links = cluster
    s = _session(dave, SCI)
    oid = new_id()
    _ok(_req(dave, s, m.ObjectMessage([m.StoredObject(7, _int64(16))])))
    _ok(_req(dave, s, m.MoveMessage([7], "alice", [oid])))
    (link_ns, tag), = _store(alice).account_usage
    mallory = _session(alice, SCI)
    mine = new_id()
    _ok(_req(alice, mallory, m.ObjectMessage([m.StoredObject(mine, _int64(4))]), sender=f"dave#{tag}"))
    assert mine not in _store(alice)._hand_offs
    assert alice.monitor.session_bytes(mallory.id) == _charged(4)
    assert set(_store(alice).account_usage) == {(link_ns, tag)}
    reply = _req(alice, mallory, m.CommandMessage(END_ACCOUNT, (), {}, [], False), sender=f"dave#{tag}")
    assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError"
    assert oid in _store(alice)._hand_offs  # dave's hand-off is still there, for its claimant
    other = _session(alice, SCI)
    got = _req(alice, other, m.GetObjectsMessage([oid], False))
    assert torch.equal(got.objects[0], _int64(16))


def test_every_frame_the_provider_sends_for_a_session_names_its_account(cluster):
    """Sending side: plain and seeded dealing (seeded: the other party's seed is sent from a runtime pool
    thread, the link counting as a network worker) and a move, all for one session, name that session's
    account in every frame to alice and bob; a second session gets another tag; when the first ends, dave
    tells exactly the peers it used, and they free its unclaimed hand-offs and nothing of the second's."""
    alice, bob, dave, links = cluster
    s1, s2 = _session(dave, SCI), _session(dave, SCI)
    for seeded in (False, True):
        ids = [[new_id()], [new_id()]]
        _ok(_req(dave, s1, m.CommandMessage(DEAL, ("zero", ((256,),), ["alice", "bob"], ids, 1, seeded), {}, [],
                                            False)))
    _ok(_req(dave, s1, m.ObjectMessage([m.StoredObject(9, _int64(8))])))
    _ok(_req(dave, s1, m.MoveMessage([9], "alice", [new_id()])))
    tags = {split_sender(s)[1] for link in links.values() for s in link.senders}
    assert len(tags) == 1 and "" not in tags, [link.senders for link in links.values()]
    tag1 = tags.pop()
    _ok(_req(dave, s2, m.ObjectMessage([m.StoredObject(9, _int64(8))])))
    _ok(_req(dave, s2, m.MoveMessage([9], "bob", [new_id()])))
    tag2 = split_sender(links["bob"].senders[-1])[1]
    assert tag2 and tag2 != tag1
    assert {acc[1] for acc in _store(alice).account_usage} == {tag1}
    assert {acc[1] for acc in _store(bob).account_usage} == {tag1, tag2}
    dave.end_session(s1)
    assert _until(lambda: not _store(alice).account_usage and (_store(bob).account_usage.keys() == {
        acc for acc in _store(bob).account_usage if acc[1] == tag2}))
    assert links["alice"].ops[-1] == END_ACCOUNT and links["bob"].ops[-1] == END_ACCOUNT
    assert not _store(alice).account_usage and not _store(alice)._hand_offs
    assert {acc[1] for acc in _store(bob).account_usage} == {tag2}
    assert alice.monitor.session_bytes(links["alice"].session.id) == 0
    dave.end_session(s2)
    assert _until(lambda: not _store(bob).account_usage)
    assert links["alice"].ops.count(END_ACCOUNT) == 1  # s2 never used alice
    assert not _store(bob).account_usage and not _store(bob)._hand_offs


def test_a_peer_ends_only_its_own_accounts_unclaimed_hand_offs(cluster):
    """Receiving side: dave's link hands alice objects for accounts A and B, bob's link one for account A
    (same tag, another link); a session at alice claims one of A's. dave ending A frees A's other hand-off
    only: the claimed one stays with its claimant, B's and bob's stay unclaimed, and the counters agree."""
    alice, _, _, links = cluster
    dave_link = links["alice"].session
    bob_link = _session(alice, PEER_BOB)
    a, b = "a" * 16, "b" * 16
    claimed, unclaimed, other, bobs = new_id(), new_id(), new_id(), new_id()
    _ok(_req(alice, dave_link, m.ObjectMessage([m.StoredObject(claimed, _int64(8)),
                                                m.StoredObject(unclaimed, _int64(8))]), sender=f"dave#{a}"))
    _ok(_req(alice, dave_link, m.ObjectMessage([m.StoredObject(other, _int64(8))]), sender=f"dave#{b}"))
    _ok(_req(alice, bob_link, m.ObjectMessage([m.StoredObject(bobs, _int64(8))]), sender=f"bob#{a}"))
    c = _session(alice, SCI)
    assert torch.equal(_req(alice, c, m.GetObjectsMessage([claimed], False)).objects[0], _int64(8))
    usage = _store(alice).account_usage
    one = _charged(8)
    assert usage == {(dave_link.id, a): one, (dave_link.id, b): one, (bob_link.id, a): one}
    _ok(_req(alice, dave_link, m.CommandMessage(END_ACCOUNT, (), {}, [], False), sender=f"dave#{a}"))
    assert usage == {(dave_link.id, b): one, (bob_link.id, a): one}
    assert set(_store(alice)._hand_offs) == {other, bobs}
    assert torch.equal(_req(alice, c, m.GetObjectsMessage([claimed], False)).objects[0], _int64(8))
    assert type(_req(alice, c, m.GetObjectsMessage([unclaimed], False))) is m.ErrorReply
    assert alice.monitor.session_bytes(dave_link.id) == one and alice.monitor.session_bytes(c.id) == one
    # an untagged frame (the link's shared account) ends nothing
    reply = _req(alice, dave_link, m.CommandMessage(END_ACCOUNT, (), {}, [], False), sender="dave")
    assert type(reply) is m.ErrorReply and usage == {(dave_link.id, b): one, (bob_link.id, a): one}


def test_one_account_is_held_to_the_session_quota_and_others_still_deal(cluster):
    """A provider-only session fills its own account at alice (moves nobody claims) up to the quota; another
    session's move through dave to alice still works meanwhile, and after the first leaves nothing of it
    stays at alice."""
    alice, _, dave, links = cluster
    mallory, honest = _session(dave, SCI), _session(dave, SCI)
    moved = 0
    for _ in range(2 * QUOTA // 4096):
        _ok(_req(dave, mallory, m.ObjectMessage([m.StoredObject(11, _int64(512))])))
        if type(_req(dave, mallory, m.MoveMessage([11], "alice", [new_id()]))) is not m.OkReply:
            break
        moved += 4096
    assert moved == QUOTA
    _ok(_req(dave, honest, m.ObjectMessage([m.StoredObject(12, _int64(8))])))
    _ok(_req(dave, honest, m.MoveMessage([12], "alice", [new_id()])))
    dave.end_session(mallory)
    assert _until(lambda: alice.monitor.session_bytes(links["alice"].session.id) == _charged(8))


def test_a_second_peer_cannot_take_over_an_unclaimed_hand_off_id(cluster):
    """bob's link hands alice an object under the id of dave's unclaimed hand-off: refused (before, it
    re-pointed the id's index to bob's object, which the claimant then got instead of dave's); the
    claimant still gets dave's value, and the refused store left no charge behind."""
    alice, _, _, links = cluster
    dave_link, bob_link = links["alice"].session, _session(alice, PEER_BOB)
    oid = new_id()
    _ok(_req(alice, dave_link, m.ObjectMessage([m.StoredObject(oid, _int64(8))]), sender="dave#" + "1" * 16))
    reply = _req(alice, bob_link, m.ObjectMessage([m.StoredObject(oid, -_int64(8))]), sender="bob#" + "2" * 16)
    assert type(reply) is m.ErrorReply
    assert alice.monitor.session_bytes(bob_link.id) == 0 and (bob_link.id, "2" * 16) not in _store(alice).account_usage
    c = _session(alice, SCI)
    assert torch.equal(_req(alice, c, m.GetObjectsMessage([oid], False)).objects[0], _int64(8))


def test_a_hand_off_claimed_before_the_sender_session_ends_survives_it(cluster):
    """The honest flow the README asks for (claim before closing the sending connection): a client moves
    through dave to alice, uses it at alice, then closes its dave session; the value stays with it at alice.
    (Not claiming first loses it: by design since session 44, documented in the README.)"""
    alice, _, dave, _ = cluster
    s, c = _session(dave, SCI), _session(alice, SCI)
    oid, late = new_id(), new_id()
    _ok(_req(dave, s, m.ObjectMessage([m.StoredObject(3, _int64(8)), m.StoredObject(4, _int64(4))])))
    _ok(_req(dave, s, m.MoveMessage([3, 4], "alice", [oid, late])))
    reply = _req(alice, c, m.CommandMessage("torch.add", (m.ObjectRef(oid), 1), {}, [new_id()], False))
    assert type(reply) is not m.ErrorReply, reply
    dave.end_session(s)
    assert _until(lambda: late not in _store(alice)._hand_offs)
    assert torch.equal(_req(alice, c, m.GetObjectsMessage([oid], False)).objects[0], _int64(8))
    assert type(_req(alice, c, m.GetObjectsMessage([late], False))) is m.ErrorReply  # the documented trade-off


def test_store_accounting_stays_consistent_under_random_claims_and_drops():
    """Random put (two peer links, three accounts incl. the untagged one, two sessions), claim, remove,
    drop_account and drop_namespace sequences: each account's bytes equal its unclaimed hand-offs' bytes,
    each namespace's usage its objects' bytes, and the hand-off index names only stored entries."""
    peers, sessions, accounts, ids = ["P1", "P2"], ["S1", "S2"], ["a" * 16, "b" * 16, ""], [1, 2, 3, 4]
    for seed in range(600):
        rng = random.Random(seed)
        key = StoreKey()
        store = ObjectStore("alice", key)
        for _ in range(30):
            op, oid = rng.choice(["put", "put", "claim", "remove", "drop", "dropns"]), rng.choice(ids)
            if op == "put":
                ns = rng.choice(peers + sessions)
                if store.has(key, ns, oid):
                    continue
                hand_off = ns in peers
                try:
                    store.put(key, ns, oid, Entry(None, nbytes=rng.choice([8, 16])), hand_off=hand_off,
                              account=rng.choice(accounts) if hand_off else "")
                except Exception:
                    continue
            elif op == "claim":
                s = rng.choice(sessions)
                if store.lookup(key, s, oid) is None:
                    store.claim(key, s, oid)
            elif op == "remove":
                store.remove(key, rng.choice(peers + sessions), oid)
            elif op == "drop":
                store.drop_account(key, rng.choice(peers), rng.choice(accounts))
            else:
                store.drop_namespace(key, rng.choice(peers + sessions))
            want: dict = {}
            for hid, acc in store._hand_offs.items():
                entry = store._spaces.get(acc[0], {}).get(hid)
                assert entry is not None, (seed, "index names no entry", hid, acc)
                want[acc] = want.get(acc, 0) + entry.nbytes
            assert want == store.account_usage, (seed, want, store.account_usage)
            for ns, space in store._spaces.items():
                if ns in peers + sessions:
                    assert sum(e.nbytes for e in space.values()) == store.usage.get(ns, 0), (seed, ns)


def test_a_session_using_the_id_of_an_unclaimed_hand_off_keeps_both_apart(cluster):
    """A session at alice stores its own object under the id of dave's unclaimed hand-off (ids are per
    namespace): it keeps reading its own, another session naming the id claims dave's, and dave ending the
    account afterwards touches neither; every counter agrees."""
    alice, _, dave, links = cluster
    s = _session(dave, SCI)
    oid = new_id()
    _ok(_req(dave, s, m.ObjectMessage([m.StoredObject(21, _int64(8))])))
    _ok(_req(dave, s, m.MoveMessage([21], "alice", [oid])))
    c, d = _session(alice, SCI), _session(alice, SCI)
    _ok(_req(alice, c, m.ObjectMessage([m.StoredObject(oid, -_int64(2))])))
    assert torch.equal(_req(alice, c, m.GetObjectsMessage([oid], False)).objects[0], -_int64(2))
    assert oid in _store(alice)._hand_offs  # c's own object did not claim dave's
    assert torch.equal(_req(alice, d, m.GetObjectsMessage([oid], False)).objects[0], _int64(8))
    assert not _store(alice).account_usage and oid not in _store(alice)._hand_offs
    dave.end_session(s)
    assert _until(lambda: END_ACCOUNT in links["alice"].ops)
    assert torch.equal(_req(alice, c, m.GetObjectsMessage([oid], False)).objects[0], -_int64(2))
    assert torch.equal(_req(alice, d, m.GetObjectsMessage([oid], False)).objects[0], _int64(8))
    assert alice.monitor.session_bytes(c.id) == _charged(2) and alice.monitor.session_bytes(d.id) == _charged(8)
    assert alice.monitor.session_bytes(links["alice"].session.id) == 0
