"""Red team, second pass: secure aggregation's per-client views and the provider's turn hand-over while it
deals comparison material (commits 0945d58, 4e84224).

Holes found and fixed (each test failed on the code before its fix):

1. ``test_concurrent_comparison_dealings_hold_their_material_one_at_a_time``: the hand-over let a second
   client's ``deal_comparison`` start while the first waited for its turn back, and so on for every session:
   each holds its keys and shares in progress (up to a 192 MiB item, or a 64 MiB message per party, uncharged)
   until it sends them (3 at once here). Before the hand-over the turn ran dealings one at a time; now so does
   a per-worker dealing slot, which a dealing waits for outside the turn (its deadline and cancellation
   checked), so other requests still run meanwhile (``runtime.one_step_at_a_time``).
2. ``test_keys_made_with_hand_overs_between_tree_levels_are_the_keys_made_without``: the hand-over cut DCF key
   generation into chunks of 2048 entries (682 at 17 words), which made an honest dealing's keys 1.7-3x slower
   (torch's per-op overhead on small tensors; measured on 2^15 entries of 2 and 17 words). Chunks stay whole
   now and the hand-overs fall between groups of tree levels (a chunk's generation pauses as a generator),
   still ~0.1 s apart; the keys are the same.

Attacks that hold (guards): a survivor whose deposit carried no view, a malformed one or one of another round,
or who was told the same ids in another order, is refused; a view digest separates ids, n and t however the
parts are cut; a dealing cancelled while it waits for another's stops in one line, sending nothing.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import veil as sy
from veil.exceptions import VeilError
from veil.federated import secagg_confirm, secagg_crypto as sc
from veil.federated import secagg_client, secure_agg as sa
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.fss import dcf, material as fss
from veil.mpc.providers import fss_dealing
from veil.mpc.ring import random_ring

from server_sessions import open_session, quota_worker, request  # noqa: E402

TOKEN = "rt-smpc-secagg2-scientist"


# -- secure aggregation: views that reach a client by the peer path ------------------------------------------

def _round(hook, names, tag):
    """Clients advertised (t = 3 of 4) and sharing their keys under one view; their workers and pointers."""
    prefix = f"s2{new_id() % 10**9:09d}"
    workers = {k: sy.VirtualWorker(hook, id=f"{prefix}-{k}") for k in names}
    ptrs = {k: torch.randn(4, dtype=torch.float64).send(workers[k]) for k in names}
    return workers, ptrs


def _call(w, name, tag, *args):
    return sa._fetch(sa._call(f"veil.secagg.{name}", (tag, *args), w))


def _advertised(workers, tag, n=4, t=3):
    return torch.stack([_call(w, "advertise", tag, n, t) for w in workers.values()])


@pytest.mark.parametrize("told", ["none", "malformed", "other_round"])
def test_a_survivor_whose_deposit_carried_no_view_of_this_round_is_refused(hook, told):
    """A deposit that carries no view, a malformed one, or the digest of another round (a peer's view of round
    tag + 1, same ids, n and t) stands for no view of this round: masking with its sender fails closed."""
    names = ["u", "v", "w", "x"]
    tag = 7411
    workers, ptrs = _round(hook, names, tag)
    ids = [w.id for w in workers.values()]
    table = _advertised(workers, tag)
    for k in "uvw":
        sa._call("veil.secagg.share_keys", (tag, ids, table), workers[k])
    # x's deposit to u arrives by another path than its share_keys: what its view field carried is chosen here
    x = next(state for key, state in secagg_client._rounds(workers["x"]).items() if key[1] == tag)
    view = {"none": None, "malformed": torch.zeros(3, dtype=torch.int64),
            "other_round": sc.bytes_tensor(secagg_confirm.view_digest(tag + 1, 4, 3, ids))}[told]
    shares = sc.share(x.private, 4, 3)
    seeds = sc.share(x.self_seed, 4, 3)
    sa._call("veil.secagg.deposit", (tag, x.coordinator, workers["x"].id, sc.to_tensor([shares[0]]),
                                     sc.to_tensor([seeds[0]]), sc.bytes_tensor(x.public), view), workers["u"])
    with pytest.raises(VeilError, match=r"masked_input: refused \(a survivor was told another") as info:
        _call(workers["u"], "masked_input", tag, ids, [ptrs["u"]], 1.0)
    assert "\n" not in str(info.value)
    # without x, u masks (control: the refusal is x's view, nothing else)
    assert _call(workers["u"], "masked_input", tag, ids[:3], [ptrs["u"]], 1.0).numel() == 6


def test_survivors_told_the_same_ids_in_another_order_are_refused(hook):
    """The share order is each id's x-coordinate: two clients told one set of ids in different orders hold
    different views (told apart, the coordinator reads a share at another point than its holder dealt it)."""
    names = ["u", "v", "w", "x"]
    tag = 7412
    workers, ptrs = _round(hook, names, tag)
    ids = [w.id for w in workers.values()]
    table = _advertised(workers, tag)
    swapped = [ids[1], ids[0]] + ids[2:]
    for k in names:
        order = swapped if k == "v" else ids
        sa._call("veil.secagg.share_keys", (tag, order, table[[ids.index(i) for i in order]]), workers[k])
    with pytest.raises(VeilError, match=r"masked_input: refused \(a survivor was told another"):
        _call(workers["u"], "masked_input", tag, ids, [ptrs["u"]], 1.0)
    assert _call(workers["w"], "masked_input", tag, [ids[0], ids[2], ids[3]], [ptrs["w"]], 1.0).numel() == 6


def test_a_view_digest_separates_ids_n_and_t_however_they_are_cut():
    """The digest is over an unambiguous encoding: ids joined or split differently, or parts moved between
    tag, n and t, never give the same digest."""
    views = [(1, 4, 3, ["ab", "c"]), (1, 4, 3, ["a", "bc"]), (1, 4, 3, ["abc"]), (1, 4, 3, ["ab", "c", ""]),
             (1, 3, 4, ["ab", "c"]), (4, 1, 3, ["ab", "c"]), (1, 4, 3, ["c", "ab"]), (1 << 8, 4, 3, ["ab", "c"])]
    digests = {secagg_confirm.view_digest(*v) for v in views}
    assert len(digests) == len(views)


# -- the provider's dealing: concurrent requests, cancellation, determinism ----------------------------------

class _Parties:
    """The provider's peers, in process: each dealt message is counted (and answered Ok)."""

    def __init__(self) -> None:
        self.sent = 0
        self.ids: set = set()  # the ids each message stores its fields under
        self.lock = threading.Lock()

    def resolve(self, pid):
        return pid

    def send(self, msg, party):
        with self.lock:
            self.sent += 1
            self.ids.update(msg.return_ids)
        return m.OkReply()


def _dealing_worker(hook, monkeypatch, users):
    srv = quota_worker(hook, f"s2-deal-{new_id() % 10**9}", TOKEN, None)
    for name in users:
        srv.tokens.add(f"rt-smpc-secagg2-{name}", name, "scientist")
    parties = _Parties()
    monkeypatch.setattr(srv, "resolve_worker", parties.resolve)
    monkeypatch.setattr(srv, "send_msg", parties.send)
    return srv, parties


def _deal_message(shape, n_values, count):
    per_party = [len(fss.field_shapes(shape, n_values, i < 2)) for i in range(2)]
    ids = [[new_id() for _ in range(count * k)] for k in per_party]
    return m.CommandMessage(fss_dealing.DEAL_COMPARISON, ((list(shape), n_values), ["p0", "p1"], ids, count, True),
                            {}, [], False)


def test_concurrent_comparison_dealings_hold_their_material_one_at_a_time(hook, monkeypatch):
    """Three scientists' dealings at once on one provider (each 3 items of 2^12 entries): at most one holds
    material in progress at any time, all three are dealt, and a fourth client's store is still answered
    while they run (the first dealing's send is held, its material made, until the store was answered: a
    dealing holding the provider's turn would keep the store waiting out the hold)."""
    srv, parties = _dealing_worker(hook, monkeypatch, ["b", "c", "d"])
    live, peak, lock = [0], [0], threading.Lock()
    real_chunk, real_send = fss_dealing._chunk_messages, fss_dealing.send_each
    holding, answered, released = threading.Event(), threading.Event(), []

    def counted_chunk(*args, **kwargs):  # material in progress: from the first mask to the last message sent
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            return real_chunk(*args, **kwargs)
        except BaseException:
            with lock:
                live[0] -= 1
            raise

    def counted_send(*args, **kwargs):
        try:
            if not holding.is_set():  # the first dealing: held with its material until dave's store is answered
                holding.set()
                released.append(answered.wait(120))
            return real_send(*args, **kwargs)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr(fss_dealing, "_chunk_messages", counted_chunk)
    monkeypatch.setattr(fss_dealing, "send_each", counted_send)
    replies: dict = {}
    threads = []
    for name in (TOKEN, "rt-smpc-secagg2-b", "rt-smpc-secagg2-c"):
        session = open_session(srv, name)
        msg = _deal_message((1 << 12,), 1, 3)
        threads.append(threading.Thread(target=lambda s=session, x=msg, n=name: replies.setdefault(
            n, request(srv, s, x)), daemon=True))
    started = time.monotonic()
    for t in threads:
        t.start()
        time.sleep(0.05)  # (each arrives while the one before deals)
    assert holding.wait(120), "no dealing made its material"
    dave = open_session(srv, "rt-smpc-secagg2-d")
    t0 = time.monotonic()
    assert type(request(srv, dave, m.ObjectMessage([m.StoredObject(new_id(), torch.ones(3))]))) is m.OkReply
    dave_waited = time.monotonic() - t0
    answered.set()
    for t in threads:
        t.join(120)
    total = time.monotonic() - started
    assert all(type(r) is m.OkReply for r in replies.values()) and len(replies) == 3, replies
    assert parties.sent == 3 * 2
    assert peak[0] == 1, f"{peak[0]} dealings held their material in progress at once on one provider"
    assert released == [True], f"a store waited {dave_waited:.2f} s (of {total:.2f} s) for a dealing to end"


def test_a_dealing_cancelled_while_it_waits_for_another_stops_and_leaves_the_provider_serving(hook, monkeypatch):
    """Bob's dealing arrives while alice's runs, and his session ends while he waits (outside the turn) for
    hers: his stops with one line having sent nothing, hers is dealt whole, and the next dealing still runs."""
    srv, parties = _dealing_worker(hook, monkeypatch, ["b", "c"])
    alice, bob = open_session(srv, TOKEN), open_session(srv, "rt-smpc-secagg2-b")
    out: dict = {}
    deals = {"a": _deal_message((1 << 13,), 1, 3), "b": _deal_message((1 << 10,), 0, 2)}
    first = threading.Thread(target=lambda: out.setdefault("a", request(srv, alice, deals["a"])), daemon=True)
    second = threading.Thread(target=lambda: out.setdefault("b", request(srv, bob, deals["b"])), daemon=True)
    first.start()
    while alice.id not in srv._running.values():
        time.sleep(0.005)
    second.start()
    while bob.id not in srv._running.values() and second.is_alive():
        time.sleep(0.005)
    time.sleep(0.1)
    for token, sid in list(srv._running.items()):  # what bob's closed connection does to his running command
        if sid == bob.id:
            token.cancel("the session ended")
    second.join(60)
    first.join(60)
    assert type(out.get("b")) is m.ErrorReply and "cancelled" in out["b"].message and "\n" not in out["b"].message
    assert type(out.get("a")) is m.OkReply, out
    dealt = {k: {i for party in msg.args[2] for i in party} for k, msg in deals.items()}
    assert parties.ids == dealt["a"], "alice's dealing was not sent whole, or bob's was sent in part"
    carol = open_session(srv, "rt-smpc-secagg2-c")
    deals["c"] = _deal_message((1 << 10,), 0, 2)
    assert type(request(srv, carol, deals["c"])) is m.OkReply
    assert parties.ids == dealt["a"] | {i for party in deals["c"].args[2] for i in party}


@pytest.mark.parametrize("threads", [1, 3])
def test_keys_made_with_hand_overs_between_tree_levels_are_the_keys_made_without(threads, monkeypatch):
    """Hand-overs fall between groups of tree levels of whole chunks, advanced one step per chunk on up to 3
    pool threads (3 chunks, the last one short; 9 words: fewer levels per step): the keys are those made in
    one pass, and the chunks stay whole (small ones made the keys 1.7-3x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = 2 * dcf.CHUNK + 1000
        alpha, beta = random_ring((n,)) & ((1 << 12) - 1), random_ring((n, 9))
        plain = dcf.gen(alpha, beta, 12, torch.Generator().manual_seed(11))
        calls, spans, real_chunk = [], [], dcf._gen_chunk
        monkeypatch.setattr(dcf, "_gen_chunk", lambda alpha, *rest: (spans.append(len(alpha)), real_chunk(alpha, *rest))[1])
        chunked = dcf.gen(alpha, beta, 12, torch.Generator().manual_seed(11), between=lambda: calls.append(1))
        per_step = max(1, dcf.YIELD_ENTRY_LEVELS // (2 * dcf.CHUNK))
        rounds = -(-3 // threads)  # rounds of one chunk per thread, each in ceil(12 / per_step) steps
        assert sorted(spans) == [1000, dcf.CHUNK, dcf.CHUNK], "hand-overs cut the key generation in small chunks"
        assert len(calls) == rounds * -(-12 // per_step)
        for a, b in zip(plain, chunked):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    finally:
        torch.set_num_threads(before)
