"""Red team, third pass: a crypto provider's dealing waits on its parties (commits bbfaf39, b13db6b, 011b2b1).

A provider deals off its turn, one dealing at a time (its 'dealing' slot, users in turns). Holes (each test
failed on 011b2b1's code, run in a git worktree with a strict xfail mark):

1. ``test_an_honest_dealing_to_other_parties_proceeds_while_one_party_hangs``: the dealing slot was held while
   the provider waited on a party's reply (a peer link's timeout is 120 s): a party that never answered stalled
   every session's dealings at its provider, to other parties too (comparison, seeded and unseeded dealings).
2. ``test_a_dealing_naming_a_hung_party_and_an_honest_one_frees_the_honest_ones``: the same through a dealing
   that names a party that hangs beside an honest one: the honest party's dealings waited for the link timeout.

Fixed: a dealing takes its provider's slots of all its parties at once (``party_slots.PartySlots``: all or none,
users in turns), then the dealing slot while it makes its material, gives that up before it waits on any party
and sends the parties their parts beside each other (network parties), freeing each party's slot as it answers
(``dealing_sends.py``). A waiter that cannot take its parties (one is busy) holds none back for them.

Guards (attacks that hold): dealings naming the same parties in either order never deadlock, and at most one
dealing's material waits on a party at any time (bounded memory); dealings that wait on a hung party hold no
material; concurrent dealings to the same parties give each party material that reconstructs to what torch
computes (Beaver triples; comparison fields all stored); a waiter whose deadline passes or whose session ends
leaves the queue holding nothing; a failed send frees its party's slot; waiters on a hung party look at the queue
again only when it changed (each walking it every 50 ms made a queue of connections quadratic CPU).
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from veil.exceptions import CommandCancelledError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.fss import dcf, material as fss
from veil.mpc.providers import fss_dealing, worker_dealer
from veil.workers.party_slots import PartySlots

from server_sessions import open_session, quota_worker, request  # noqa: E402

TOKEN = "rt-dealing-third-mallory"
BOB = "rt-dealing-third-bob"
CAROL = "rt-dealing-third-carol"


def _worker(hook, name):
    srv = quota_worker(hook, f"dt3-{name}-{new_id() % 10**9}", TOKEN, None)
    srv.tokens.add(BOB, "bob", "scientist")
    srv.tokens.add(CAROL, "carol", "scientist")
    return srv


class _Peer:
    """A provider's peer, as a network client worker looks to the dealer (its requests are worth sending
    beside each other)."""

    concurrent_requests = True

    def __init__(self, pid: str) -> None:
        self.id = pid


class _Parties:
    """The provider's peers, in process. A gated party's messages wait for ``open`` (at most 20 s); every party
    keeps what it was sent (expanded or checked as a real party would: ``stored``), and the most messages that
    were ever in flight to one party at once is noted."""

    def __init__(self, gated=(), delay: float = 0.0) -> None:
        self.gated, self.delay = set(gated), delay
        self.open = threading.Event()
        self.stored: dict = {}  # (party, id) -> tensor
        self.reached: dict = {}  # party -> Event set when a message reached it
        self.in_flight: dict = {}
        self.peak = 0
        self.lock = threading.Lock()

    def resolve(self, pid):
        return _Peer(pid)

    def send(self, msg, party):
        pid = party.id
        with self.lock:
            self.reached.setdefault(pid, threading.Event()).set()
            self.in_flight[pid] = self.in_flight.get(pid, 0) + 1
            self.peak = max(self.peak, self.in_flight[pid])
        try:
            if pid in self.gated:
                self.open.wait(20)
            time.sleep(self.delay)
            self._store(pid, msg)
            return m.OkReply()
        finally:
            with self.lock:
                self.in_flight[pid] -= 1

    def _store(self, pid, msg):
        if isinstance(msg, m.ObjectMessage):
            values = {o.id: o.obj for o in msg.objects}
        elif msg.op == worker_dealer.EXPAND:
            values = dict(zip(msg.return_ids, worker_dealer._expand_material(None, *msg.args)))
        else:
            values = dict(zip(msg.return_ids, fss_dealing._receive_comparison(None, *msg.args)))
        with self.lock:
            self.stored.update({(pid, oid): v for oid, v in values.items()})


def _patched(srv, monkeypatch, parties):
    monkeypatch.setattr(srv, "resolve_worker", parties.resolve)
    monkeypatch.setattr(srv, "send_msg", parties.send)
    return parties


def _deal(kind, party_ids, count=2):
    n = len(party_ids)
    if kind == "comparison":
        shape, n_values = (16,), 1
        ids = [[new_id() for _ in range(count * len(fss.field_shapes(shape, n_values, i < 2)))] for i in range(n)]
        return m.CommandMessage(fss_dealing.DEAL_COMPARISON, ((list(shape), n_values), list(party_ids), ids, count,
                                                              True), {}, [], False)
    spec = ("mul", (5,), (5,), {})
    ids = [[new_id() for _ in range(3 * count)] for _ in range(n)]  # (a, b, c) per item
    return m.CommandMessage(worker_dealer.DEAL, ("beaver", spec, list(party_ids), ids, count, kind == "seeded"),
                            {}, [], False)


def _start(srv, session, msg, out, key):
    thread = threading.Thread(target=lambda: out.setdefault(key, request(srv, session, msg)), daemon=True)
    thread.start()
    return thread


def _running(srv, session, extra=0.1):
    until = time.monotonic() + 20
    while session.id not in srv._running.values() and time.monotonic() < until:
        time.sleep(0.005)
    time.sleep(extra)


def _triples(parties, msg):
    """Each dealt Beaver item's (a, b, c), the parties' shares summed (the ring wraps as int64 does)."""
    ids, count = msg.args[3], msg.args[4]
    pids = msg.args[2]
    fields = [sum(parties.stored[(pids[i], ids[i][f])] for i in range(len(pids))) for f in range(3 * count)]
    return [fields[3 * k:3 * k + 3] for k in range(count)]


# -- holes ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["comparison", "seeded", "unseeded"])
def test_an_honest_dealing_to_other_parties_proceeds_while_one_party_hangs(hook, monkeypatch, kind):
    srv = _worker(hook, f"hang-{kind}")
    parties = _patched(srv, monkeypatch, _Parties(gated=("hostile0",)))
    out: dict = {}
    mallory = open_session(srv, TOKEN)
    stuck = _start(srv, mallory, _deal(kind, ("hostile0", "hostile1")), out, "mallory")
    _running(srv, mallory)
    bob = open_session(srv, BOB)
    msg = _deal(kind, ("q0", "q1"))
    t0 = time.monotonic()
    honest = _start(srv, bob, msg, out, "bob")
    honest.join(3)
    waited = time.monotonic() - t0
    served = type(out.get("bob")) is m.OkReply
    parties.open.set()
    stuck.join(30)
    honest.join(30)
    assert served, f"bob's dealing to other parties waited {waited:.1f} s for a party that did not answer mallory's: {out}"
    assert type(out.get("mallory")) is m.OkReply, out  # (and mallory's is dealt whole once its party answers)
    if kind != "comparison":
        for a, b, c in _triples(parties, msg):
            assert torch.equal(c, a * b)


@pytest.mark.parametrize("kind", ["comparison", "seeded", "unseeded"])
@pytest.mark.parametrize("hung_first", [True, False], ids=["hung-first", "hung-last"])
def test_a_dealing_naming_a_hung_party_and_an_honest_one_frees_the_honest_ones(hook, monkeypatch, kind, hung_first):
    srv = _worker(hook, f"mixed-{kind}")
    parties = _patched(srv, monkeypatch, _Parties(gated=("hostile0",)))
    out: dict = {}
    mallory = open_session(srv, TOKEN)
    named = ("hostile0", "q0") if hung_first else ("q0", "hostile0")
    stuck = _start(srv, mallory, _deal(kind, named), out, "mallory")
    _running(srv, mallory, extra=0.3)
    bob = open_session(srv, BOB)
    honest = _start(srv, bob, _deal(kind, ("q0", "q1")), out, "bob")
    honest.join(3)
    served = type(out.get("bob")) is m.OkReply
    parties.open.set()
    stuck.join(30)
    honest.join(30)
    assert served, "bob's dealing waited for a party that did not answer mallory's (q0 had answered it)"
    assert type(out.get("mallory")) is m.OkReply, out


# -- guards --------------------------------------------------------------------------------------------------

def test_dealings_naming_the_same_parties_in_either_order_finish_one_per_party_at_a_time(hook, monkeypatch):
    """Three users' Beaver dealings to p0, p1, p2 in different orders, at once, parties answering slowly: none
    waits for another for ever, at most one message is in flight to a party at any time (one dealing's
    material waits on each party), and every triple reconstructs to what torch computes."""
    srv = _worker(hook, "orders")
    parties = _patched(srv, monkeypatch, _Parties(delay=0.02))
    orders = [("p0", "p1"), ("p1", "p0"), ("p1", "p2", "p0"), ("p2", "p0"), ("p0", "p2", "p1"), ("p2", "p1")]
    out, threads, msgs = {}, [], {}
    for k, order in enumerate(orders * 2):
        token = (TOKEN, BOB, CAROL)[k % 3]
        msgs[k] = _deal("seeded" if k % 2 else "unseeded", order)
        threads.append(_start(srv, open_session(srv, token), msgs[k], out, k))
    for t in threads:
        t.join(60)
    assert len(out) == len(msgs) and all(type(r) is m.OkReply for r in out.values()), out
    assert parties.peak == 1, f"{parties.peak} dealings' messages were in flight to one party at once"
    for msg in msgs.values():
        for a, b, c in _triples(parties, msg):
            assert torch.equal(c, a * b)


def test_concurrent_comparison_dealings_give_each_party_consistent_material(hook, monkeypatch):
    """Two users' comparison dealings to the same two parties (in both orders) at once, one message in flight per
    party at a time: each item's stored shares reconstruct to a mask, its derived fields (its high bit, times the
    mask) and two DCF keys whose evaluations sum to the comparison of the input with the mask's low bits."""
    srv = _worker(hook, "cmp")
    parties = _patched(srv, monkeypatch, _Parties(delay=0.01))
    msgs = {"a": _deal("comparison", ("p0", "p1")), "b": _deal("comparison", ("p1", "p0"))}
    out: dict = {}
    threads = [_start(srv, open_session(srv, tok), msgs[k], out, k) for k, tok in (("a", TOKEN), ("b", BOB))]
    for t in threads:
        t.join(60)
    assert all(type(out.get(k)) is m.OkReply for k in msgs), out
    for msg in msgs.values():
        for mask, derived, key_pair in _comparison_items(parties, msg):
            hi, lo = fss.split_bits(mask)
            assert torch.equal(derived[0], hi) and torch.equal(derived[1], mask * hi)
            x = torch.cat([lo[:8], (lo[8:] - 1) & fss.LOW_MASK])  # (at and just below each threshold)
            x[::3] = torch.randint(0, 1 << 62, (x[::3].numel(),), dtype=torch.int64)
            got = dcf.evaluate(0, key_pair[0], x, fss.DCF_BITS) + dcf.evaluate(1, key_pair[1], x, fss.DCF_BITS)
            beta = torch.stack([torch.ones_like(mask), mask], dim=1) * (1 - 2 * hi).reshape(-1, 1)
            assert torch.equal(got, beta * (x < lo).to(torch.int64).reshape(-1, 1))
    assert parties.peak == 1


def _comparison_items(parties, msg):
    """Each dealt comparison item (one value): (mask, [R_hi, mask * R_hi], both DCF keys), shares summed."""
    pids, ids, count = msg.args[1], msg.args[2], msg.args[3]
    per_party = len(ids[0]) // count
    out = []
    for k in range(count):
        f = [[parties.stored[(pids[i], ids[i][k * per_party + j])] for j in range(per_party)] for i in (0, 1)]
        out.append((f[0][0] + f[1][0], [f[0][1] + f[1][1], f[0][2] + f[1][2]],
                    (dcf.DCFKey(*f[0][3:]), dcf.DCFKey(*f[1][3:]))))
    return out


def test_dealings_waiting_on_a_hung_party_hold_no_material(hook, monkeypatch):
    """Mallory's four connections deal to a party that hangs: one dealing's material waits on it; the other
    three wait for its slot having made nothing (the provider's memory holds one waiting dealing per party)."""
    srv = _worker(hook, "memory")
    for k in range(4):
        srv.tokens.add(f"{TOKEN}-{k}", "mallory", "scientist")
    parties = _patched(srv, monkeypatch, _Parties(gated=("hostile0",)))
    made, lock = [0], threading.Lock()
    real = worker_dealer._corrections

    def counted(*args, **kwargs):
        with lock:
            made[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_dealer, "_corrections", counted)
    out: dict = {}
    threads = []
    for k in range(4):
        session = open_session(srv, f"{TOKEN}-{k}")
        threads.append(_start(srv, session, _deal("seeded", ("hostile0", "hostile1")), out, k))
        _running(srv, session, extra=0.05)
    time.sleep(0.3)
    held = made[0]
    parties.open.set()
    for t in threads:
        t.join(30)
    assert held == 1, f"{held} dealings had made their material while one party hung"
    assert len(out) == 4 and all(type(r) is m.OkReply for r in out.values()), out


def test_a_failed_send_frees_its_partys_slot(hook, monkeypatch):
    """A party whose reply is an error (or whose link dropped) frees its slot: the next dealing to it runs."""
    srv = _worker(hook, "failed")
    parties = _Parties()
    real = parties.send
    calls = [0]

    def failing(msg, party):
        calls[0] += 1
        if calls[0] == 1:
            raise ConnectionError("link dropped")
        return real(msg, party)

    monkeypatch.setattr(srv, "resolve_worker", parties.resolve)
    monkeypatch.setattr(srv, "send_msg", failing)
    mallory = open_session(srv, TOKEN)
    first = request(srv, mallory, _deal("unseeded", ("p0", "p1")))
    assert type(first) is m.ErrorReply and "\n" not in first.message, first
    t0 = time.monotonic()
    assert type(request(srv, mallory, _deal("seeded", ("p0", "p1")))) is m.OkReply
    assert time.monotonic() - t0 < 5
    assert not srv.__dict__["_veil_party_slots"]._busy


# -- the slots themselves ------------------------------------------------------------------------------------

def test_a_waiter_for_a_busy_party_holds_back_no_other_party():
    slots = PartySlots()
    assert slots.try_take({"hostile0"})
    order: list = []

    def waiter(name, wanted, user):
        slots.take(wanted, lambda: None, interval=0.01, requester=user)
        order.append(name)

    blocked = threading.Thread(target=waiter, args=("mallory", {"hostile0", "q0"}, "mallory"), daemon=True)
    blocked.start()
    until = time.monotonic() + 10
    while "mallory" not in slots._waiting and time.monotonic() < until:
        time.sleep(0.002)
    honest = threading.Thread(target=waiter, args=("bob", {"q0", "q1"}, "bob"), daemon=True)
    honest.start()
    honest.join(2)
    assert order == ["bob"], order
    slots.release("q0")
    slots.release("q1")
    slots.release("hostile0")
    blocked.join(2)
    assert order == ["bob", "mallory"] and slots._busy == {"hostile0", "q0"}


def test_waiters_able_to_take_their_parties_are_served_in_turns_per_user():
    """When one release frees parties several waiters want, the user first in the rotation takes them; a user
    just served goes behind the others."""
    slots = PartySlots()
    assert slots.try_take({"p0"})
    order: list = []

    def waiter(name, user):
        slots.take({"p0"}, lambda: None, interval=0.01, requester=user)
        order.append(name)
        time.sleep(0.02)
        slots.release("p0")

    threads = []
    for k, (name, user) in enumerate([("m1", "mallory"), ("m2", "mallory"), ("m3", "mallory"), ("b1", "bob"),
                                      ("c1", "carol")]):
        threads.append(threading.Thread(target=waiter, args=(name, user), daemon=True))
        threads[-1].start()
        until = time.monotonic() + 10
        while sum(map(len, list(slots._waiting.values()))) <= k and time.monotonic() < until:
            time.sleep(0.002)  # (each queued before the next arrives)
    slots.release("p0")
    for t in threads:
        t.join(10)
    assert order == ["m1", "b1", "c1", "m2", "m3"], order
    assert not slots._waiting and not slots._rotation and not slots._busy


def test_a_waiter_that_gives_up_leaves_holding_nothing():
    slots = PartySlots()
    assert slots.try_take({"p0"})
    stop = threading.Event()
    gave_up: list = []

    def poll():
        if stop.is_set():
            raise CommandCancelledError("the session ended")

    def waiter():
        try:
            slots.take({"p0", "p1"}, poll, interval=0.01, requester="mallory")
        except CommandCancelledError:
            gave_up.append(True)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    time.sleep(0.05)
    stop.set()
    thread.join(5)
    assert gave_up and not slots._waiting and not slots._rotation and slots._busy == {"p0"}
    assert slots.try_take({"p1"})


def test_many_dealings_over_random_party_sets_never_deadlock_or_share_a_party():
    slots = PartySlots()
    holders: dict = {}
    clash, lock = [], threading.Lock()
    done = []

    def dealer(seed):
        rng = random.Random(seed)
        for _ in range(15):
            wanted = rng.sample(["p0", "p1", "p2", "p3"], rng.randint(1, 3))
            slots.take(wanted, lambda: None, interval=0.005, requester=f"u{seed % 3}")
            with lock:
                clash.extend(p for p in wanted if p in holders)
                holders.update({p: seed for p in wanted})
            time.sleep(rng.random() * 0.003)
            rng.shuffle(wanted)
            for p in wanted:  # (each party freed as it answers, in any order)
                with lock:
                    holders.pop(p)
                slots.release(p)
        done.append(seed)

    threads = [threading.Thread(target=dealer, args=(k,), daemon=True) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(done) == 8, "dealings over overlapping parties waited for each other for ever"
    assert not clash and not slots._busy and not slots._waiting


def test_waiters_on_a_hung_party_cost_no_cpu_while_nothing_changes(monkeypatch):
    """Forty connections' dealings wait on a party that hangs: once queued, a waiter woken by its poll's
    interval (the deadline check) looks at the queue again only if something changed (each walking every
    waiter every 50 ms was CPU for nothing, quadratic in the queue)."""
    slots = PartySlots()
    assert slots.try_take({"hostile0"})
    looks = [0]
    real = slots._free_for

    def counted(ticket, parties):
        looks[0] += 1
        return real(ticket, parties)

    monkeypatch.setattr(slots, "_free_for", counted)
    stop = threading.Event()

    def poll():
        if stop.is_set():
            raise CommandCancelledError("done")

    def waiter(k):
        try:
            slots.take({"hostile0", f"q{k}"}, poll, interval=0.01, requester=f"u{k % 4}")
        except CommandCancelledError:
            pass

    threads = [threading.Thread(target=waiter, args=(k,), daemon=True) for k in range(40)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    before = looks[0]
    time.sleep(0.5)  # (~50 intervals of each of 40 waiters)
    idle = looks[0] - before
    stop.set()
    for t in threads:
        t.join(5)
    assert idle == 0, f"{idle} looks at the queue while nothing changed"
    assert not slots._waiting and not slots._rotation and slots._busy == {"hostile0"}
