"""Red team, peer openings' fetches posted before the step (veil/workers/peer_openings.py: ``_post_fetches``).

A party now sends its round's fetch to each source peer once the monitor passed the step's arguments and
before the step runs, holding that link's send lock until it reads the reply (``_collect_posted``). The
attacks: a step that fails or is refused after the post (the reply is read and dropped, the link stays in
sync, nothing is stored, the peer's round ends), one refused before it (no fetch leaves the party), an
unknown party named after a known one, many concurrent rounds from several sessions over the same links,
and a hostile party (the sink "charlie") answering the posted fetch with garbage, errors, the wrong
values, late, or by hanging up. Four processes as in test_redteam_peer_openings.py: alice, bob, dave
``veil worker`` processes and the websockets sink charlie.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import veil as sy
from veil.exceptions import RemoteExecutionError, VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import serialize
from veil.workers.peer_openings import PeerFetchMessage, PeerOpenMessage

from network_helpers import TOKEN
from worker_processes import websocket_sink
from test_redteam_peer_openings import CLIENT, _as, _fetch, _peer_token, charlie_handler, new_round, peer_cluster

NAMES = ("alice", "bob", "dave")  # veil worker processes; charlie is the sink (a hostile party)
#: how long a test waits for anything a hang would block (a hang fails the test, never CI)
JOIN = 30

#: every request the sink charlie was sent: (round or None, decoded message)
RECEIVED: list = []
#: round -> what charlie answers a fetch of it with: tensors (an ObjectsReply), or ``fn(ws, msg)``
REPLIES: dict = {}


@pytest.fixture(scope="module")
def sink():
    """The fake party charlie (test_redteam_peer_openings.charlie_handler), recording into this module's tables:
    a round's entry in REPLIES is its tensors or a ``fn(ws, msg)`` writing its own answer."""
    with websocket_sink(charlie_handler(RECEIVED, REPLIES)) as port:
        yield port


@pytest.fixture(scope="module")
def cluster(request, hook, sink):
    """test_redteam_peer_openings' four workers with this module's sink as charlie; the workers wait
    ``request.param`` seconds (default 8) for a round's shares or fetches."""
    with peer_cluster(hook, sink, getattr(request, "param", 8)) as found:
        yield found


# ------------------------------------------------------------------------------------------------ helpers


def _fetches_of(round_id: str) -> list:
    """The fetches the sink charlie was sent for ``round_id``."""
    return [msg for msg in list(RECEIVED) if type(msg) is PeerFetchMessage and msg.round == round_id]


def _within(fn, seconds: float = JOIN, what: str = "call"):
    """``fn()`` on a thread, joined within ``seconds``: a hang fails the test (and never blocks CI)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{what} did not finish within {seconds} s (a link or lock left blocked)"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _start(hook, conn, msg, errors: dict, name: str) -> threading.Thread:
    """Sends ``msg`` over ``conn`` on a thread (a party's peer opening blocks until its round ends)."""
    def run():
        try:
            hook.local_worker.send_msg(msg, conn)
        except Exception as e:  # noqa: BLE001
            errors[name] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _join(*threads) -> None:
    for t in threads:
        t.join(JOIN)
        assert not t.is_alive(), "a party's peer opening never ended"


def _honest_product(cluster, parties=("alice", "bob"), conns=None):
    conns = conns or [cluster[n][1] for n in parties]
    cp = cluster["dave"][1]
    a, b = torch.randint(-1000, 1000, (16, 8)), torch.randint(-1000, 1000, (16, 8))

    def product():
        z = a.share(*conns, crypto_provider=cp) * b.share(*conns, crypto_provider=cp)
        return z.get()

    got = _within(product, what="an honest peer-opened product")
    assert torch.equal(got, a * b)


def _stored_before(cluster):
    """Objects of the scientist's on alice and bob, to compare after the attack."""
    value = torch.arange(12.0)
    return value, [value.send(cluster[n][1]) for n in ("alice", "bob")]


def _unchanged(cluster, stored):
    value, ptrs = stored
    for ptr in ptrs:
        assert torch.equal(_within(lambda p=ptr: p.copy().get(), what="a .get()"), value)
    _honest_product(cluster)


def _absent(hook, conn, ids, shape=(6,)):
    """Nothing was stored under ``ids`` (the opened values of a failed round)."""
    for oid in ids:
        with pytest.raises(VeilError, match="(?i)not found|no object|unknown|does not exist"):
            sy.PointerTensor(conn, oid, hook.local_worker, shape, torch.int64).get()


def _ref(ptr):
    return m.ObjectRef(ptr.id_at_location)


def _beaver(refs, round_id, parties, ids, reveal=""):
    return PeerOpenMessage("beaver_mask", tuple(refs), {}, round_id, list(parties), list(ids), reveal)


def _charlie_round(hook, cluster, party: str, values: list, x: torch.Tensor | None = None):
    """A two-party round of ``party`` with the sink charlie answering ``values``: the opened values stored at
    ``party`` (its own share of ``beaver_mask(x, x, 0, 0)`` is x, x: the opened values are values + x)."""
    conn = cluster[party][1]
    x = torch.arange(6, dtype=torch.int64) if x is None else x
    zero = torch.zeros_like(x)
    xp, zp = x.send(conn), zero.send(conn)
    round_id, ids = new_round(), [new_id(), new_id()]
    REPLIES[round_id] = values
    errors: dict = {}
    thread = _start(hook, conn, _beaver((_ref(xp), _ref(xp), _ref(zp), _ref(zp)), round_id, [party, "charlie"], ids),
                    errors, party)
    as_charlie = _as(hook, cluster[party][0], _peer_token("charlie"), "charlie")
    try:  # charlie takes the party's share (its round waits for that)
        got = _fetch(hook, as_charlie, round_id)
    finally:
        as_charlie.close()
    _join(thread)
    assert not errors, errors
    assert all(torch.equal(t, x) for t in got)
    return [_within(lambda o=oid: sy.PointerTensor(conn, o, hook.local_worker, tuple(x.shape), torch.int64).get())
            for oid in ids]


# ------------------------------------------------------------------------------------------- the attacks


@pytest.mark.parametrize("cluster", [7], indirect=True)  # a cluster of its own: a failure here breaks links
def test_an_unknown_party_named_after_a_known_one_leaves_no_link_locked_or_out_of_sync(hook, cluster):
    """parties [alice, charlie, zzz]: alice posts her fetch to charlie (sorted first), then cannot resolve
    "zzz". The orchestrator is told; the fetch posted to charlie must still be read and its send lock
    released: a later round with charlie gets *its own* reply (charlie's values of that round), not the
    stale one, and does not hang on the link; an honest product still equals torch. (Found: the fetches
    posted before the failing resolve were lost with ``_post_fetches``' frame, never read, their send lock
    held for good by that pool thread: a later round's fetch on another thread blocked on it forever, and
    one on the same thread (the lock is re-entrant) read the stale reply as its own and stored the wrong
    opened values, 1000 + x instead of 5 + x, reporting success.)"""
    stored = _stored_before(cluster)
    alice = cluster["alice"][1]
    x = torch.arange(6, dtype=torch.int64).send(alice)
    ref = _ref(x)
    _charlie_round(hook, cluster, "alice", [torch.zeros(6, dtype=torch.int64)] * 2)  # the link is connected
    for k in range(3):  # (several times: the handler threads of the worker's pool differ)
        round_id, ids = new_round(), [new_id(), new_id()]
        stale = [torch.full((6,), 1000 + k, dtype=torch.int64)] * 2  # what charlie answers the attack round
        REPLIES[round_id] = stale
        with pytest.raises(VeilError, match="(?i)no peer|does not know"):
            _within(lambda: hook.local_worker.send_msg(_beaver((ref,) * 4, round_id, ["alice", "charlie", "zzz"],
                                                               ids), alice))
        _absent(hook, alice, ids)
        good = [torch.full((6,), 5 + k, dtype=torch.int64)] * 2
        opened = _charlie_round(hook, cluster, "alice", good)
        want = good[0] + torch.arange(6, dtype=torch.int64)
        assert all(torch.equal(o, want) for o in opened), (opened, want)
    _unchanged(cluster, stored)


def _serving_share(hook, cluster, party: str, rid: int, batch: int, shape=(1, 3)):
    """(orchestrator, ref): a serving client's input share claimed into ``batch`` at ``party`` by a session of
    its own (claiming taints a session: its products stay the client's), which may compute on it but not reveal
    it: an opening of it needs fresh dealt masks of its own shape. The caller closes the orchestrator."""
    from veil.serving import protocol

    local, proc = hook.local_worker, cluster[party][0]
    conn = _as(hook, proc, TOKEN, "serving-owner")
    service = f"svc{new_id()}"
    protocol.call(local, conn, "open", service, ["serving-client"], {"input_shape": list(shape)})
    client = _as(hook, proc, CLIENT, "client")
    try:
        protocol.call(local, client, "submit", service, rid, torch.full(shape, 7, dtype=torch.int64))
        assert protocol.call(local, conn, "claim", service, [rid], batch) == [1]
    finally:
        client.close()
    return conn, m.ObjectRef(batch)


def _connected(hook, cluster, party: str) -> None:
    """``party``'s peer link to charlie is open (a fetch is posted only over an open, idle link)."""
    zero = [torch.zeros(6, dtype=torch.int64)] * 2
    assert all(torch.equal(o, torch.arange(6)) for o in _charlie_round(hook, cluster, party, zero))


def _in_sync_with_charlie(hook, cluster, party: str, k: int = 0) -> None:
    """A round of ``party`` with charlie opens *that* round's values (a reply left unread on the link by an
    earlier round would be read instead: charlie answered those with other values)."""
    good = [torch.full((6,), 50 + k, dtype=torch.int64)] * 2
    want = good[0] + torch.arange(6, dtype=torch.int64)
    opened = _charlie_round(hook, cluster, party, good)
    assert all(torch.equal(o, want) for o in opened), (opened, want)


def _refused_after_post(hook, cluster, party: str, msg_for, match: str, values: list, wait: float = 10.0,
                        conn=None) -> list:
    """``msg_for(round_id, ids)`` sent to ``party`` with charlie as the other party fails with ``match``
    within ``wait`` seconds, stores nothing; charlie got at most the one posted fetch, whose reply (``values``,
    of the right layout) was read and dropped: the next round with charlie opens its own values."""
    conn = conn or cluster[party][1]
    round_id, ids = new_round(), [new_id(), new_id()]
    REPLIES[round_id] = values
    began = time.monotonic()
    with pytest.raises(VeilError, match=match):
        _within(lambda: hook.local_worker.send_msg(msg_for(round_id, ids), conn))
    assert time.monotonic() - began < wait, "the refusal waited on the peer link"
    _absent(hook, conn, ids)
    _in_sync_with_charlie(hook, cluster, party)
    assert len(_fetches_of(round_id)) <= 1, _fetches_of(round_id)  # never asked again after the failure
    return _fetches_of(round_id)


def test_a_step_that_fails_after_the_post_reads_and_drops_the_reply_and_stores_nothing(hook, cluster):
    """alice runs rounds with charlie whose step fails after the fetch was posted: the step raises (shapes
    that do not broadcast), the monitor refuses its outputs (a serving client's share under a broadcast
    mask: "a mask of its own shape"), or it opens more values than ids were given. Each is reported at
    once, stores nothing, and the reply charlie sent to the posted fetch (values of the round's layout) is
    read and dropped: alice's next round with charlie opens that round's values."""
    from veil.mpc.providers.worker_dealer import WorkerDealer

    stored = _stored_before(cluster)
    alice = cluster["alice"][1]
    _connected(hook, cluster, "alice")
    six, seven = torch.arange(6, dtype=torch.int64).send(alice), torch.zeros(7, dtype=torch.int64).send(alice)
    stale = [torch.full((6,), 999, dtype=torch.int64)] * 2
    posts = []
    posts += _refused_after_post(  # the step raises inside run_openable
        hook, cluster, "alice",
        lambda r, ids: _beaver((_ref(six), _ref(six), _ref(seven), _ref(seven)), r, ["alice", "charlie"], ids),
        "(?i)size of tensor|must match", stale)
    posts += _refused_after_post(  # two outputs, one id: refused after the step, before anything is published
        hook, cluster, "alice", lambda r, ids: _beaver((_ref(six),) * 4, r, ["alice", "charlie"], ids[:1]),
        "(?i)opens 2 values; 1 ids", stale)
    owner, batch = _serving_share(hook, cluster, "alice", 7, 4242)
    try:
        pair = WorkerDealer(cluster["dave"][1], hook.local_worker, seeded=False).truncation_pairs(
            (1,), 2 ** 16, ["alice", "bob"])
        posts += _refused_after_post(  # the monitor refuses the outputs after the step ran
            hook, cluster, "alice",
            lambda r, ids: PeerOpenMessage("trunc_mask", (batch, _ref(pair["alice"][0])), {}, r,
                                           ["alice", "charlie"], ids[:1]),
            "(?i)mask of its own shape", [torch.full((1, 3), 999, dtype=torch.int64)], conn=owner)
    finally:
        owner.close()
    assert posts, "no fetch was posted before a failing step: the attack did not test the post"
    _unchanged(cluster, stored)


def test_a_step_failing_after_the_post_ends_the_honest_peers_round(hook, cluster):
    """alice's step raises after her fetch to bob was posted (bob may hand his share to it: it is dropped);
    bob, running the same round honestly, is refused alice's share as ended. Nothing is stored on either,
    both rounds are closed to any later fetch, and the link alice-bob is in sync (a product equals torch)."""
    stored = _stored_before(cluster)
    for attempt in range(3):  # (bob's share taken by the posted fetch or not, depending on timing)
        conns = {n: _as(hook, cluster[n][0], TOKEN, f"orch{attempt}") for n in ("alice", "bob")}
        try:
            six = {n: torch.arange(6, dtype=torch.int64).send(c) for n, c in conns.items()}
            seven = torch.zeros(7, dtype=torch.int64).send(conns["alice"])
            round_id = new_round()
            ids = {n: [new_id(), new_id()] for n in conns}
            args = {"alice": (_ref(six["alice"]),) * 2 + (_ref(seven),) * 2, "bob": (_ref(six["bob"]),) * 4}
            errors: dict = {}
            threads = [_start(hook, conns[n], _beaver(args[n], round_id, ["alice", "bob"], ids[n]), errors, n)
                       for n in ("bob", "alice")]
            _join(*threads)
            assert set(errors) == {"alice", "bob"}, errors
            assert "size of tensor" in str(errors["alice"]) or "must match" in str(errors["alice"]), errors["alice"]
            assert any(w in str(errors["bob"]) for w in ("ended", "no peer opening round")), errors["bob"]
            for n in conns:
                _absent(hook, conns[n], ids[n])
            for where, reader in (("alice", "bob"), ("bob", "alice")):  # both rounds closed for good
                peer = _as(hook, cluster[where][0], _peer_token(reader), reader)
                try:
                    with pytest.raises(VeilError, match="(?i)ended|no peer opening round|already took"):
                        _fetch(hook, peer, round_id)
                finally:
                    peer.close()
        finally:
            for c in conns.values():
                c.close()
        _honest_product(cluster)
    _unchanged(cluster, stored)


def test_a_step_refused_before_the_post_sends_no_fetch(hook, cluster):
    """Refusals before the monitor passed the arguments (an unknown id, a serving client's share opened
    without masks, a round id used before, a step that is not openable, a client's token): no fetch leaves
    alice for charlie (charlie, the sink, sees every request alice sends it, in order)."""
    stored = _stored_before(cluster)
    alice = cluster["alice"][1]
    _connected(hook, cluster, "alice")
    six = torch.arange(6, dtype=torch.int64).send(alice)
    owner, batch = _serving_share(hook, cluster, "alice", 8, 4343)
    used = new_round()
    REPLIES[used] = [torch.zeros(6, dtype=torch.int64)] * 2
    as_charlie = _as(hook, cluster["alice"][0], _peer_token("charlie"), "charlie")
    try:  # a round alice ran with charlie: its id is used
        t = _start(hook, alice, _beaver((_ref(six),) * 4, used, ["alice", "charlie"], [new_id(), new_id()]), {}, "a")
        _fetch(hook, as_charlie, used)
        _join(t)
    finally:
        as_charlie.close()
    before = len(_fetches_of(used))
    client = _as(hook, cluster["alice"][0], CLIENT, "client")
    rounds = []
    try:
        cases = [
            (alice, lambda r: _beaver((m.ObjectRef(987654321),) * 4, r, ["alice", "charlie"], [new_id(), new_id()]),
             "(?i)not found|no object|unknown"),
            (owner, lambda r: PeerOpenMessage("trunc_mask", (batch, m.ObjectRef(batch.id)), {}, r,
                                              ["alice", "charlie"], [new_id()]), "(?i)mask|permission|protected"),
            (alice, lambda r: PeerOpenMessage("Tensor.add", (_ref(six), _ref(six)), {}, r, ["alice", "charlie"],
                                              [new_id()]), "(?i)openable|not an? .*step|unknown"),
            (client, lambda r: _beaver((_ref(six),) * 4, r, ["alice", "charlie"], [new_id(), new_id()]),
             "(?i)client"),
        ]
        for conn, msg_for, match in cases:
            round_id = new_round()
            rounds.append(round_id)
            with pytest.raises(VeilError, match=match):
                _within(lambda: hook.local_worker.send_msg(msg_for(round_id), conn))
        with pytest.raises(VeilError, match="(?i)not fresh"):
            _within(lambda: hook.local_worker.send_msg(
                _beaver((_ref(six),) * 4, used, ["alice", "charlie"], [new_id(), new_id()]), alice))
    finally:
        client.close()
        owner.close()
    _in_sync_with_charlie(hook, cluster, "alice")  # (a later request on the link: every earlier one arrived)
    for round_id in rounds:
        assert _fetches_of(round_id) == [], round_id
    assert len(_fetches_of(used)) == before
    _unchanged(cluster, stored)


def _party_round(hook, conns: dict, msgs: dict) -> dict:
    """Sends each party its message at once (threads); party -> exception (absent: it succeeded)."""
    errors: dict = {}
    threads = [_start(hook, conns[n], msgs[n], errors, n) for n in msgs]
    _join(*threads)
    return errors


def _get(hook, conn, oid, shape, dtype=torch.int64):
    return _within(lambda: sy.PointerTensor(conn, oid, hook.local_worker, shape, dtype).get(), what="a .get()")


def test_concurrent_rounds_of_many_sessions_some_failing_keep_every_link_in_sync(hook, cluster):
    """Four orchestrator sessions at once, each with connections of its own to alice and bob, run honest
    beaver rounds, top-bits truncation rounds (bob posts to alice only) and rounds whose step raises at alice
    after her post, and threads of the module's session run peer-opened products, all over the same two
    peer links. Every honest result equals
    what the parties published, summed (or torch's product); every failing round fails at both parties;
    nothing hangs (a send lock never released, a reply read by the wrong request, the worker turn and a
    link lock waiting on each other would)."""
    from veil.mpc.truncation import pack_top_bits

    stored = _stored_before(cluster)
    problems: list = []
    gen = torch.Generator().manual_seed(11)
    shape = (4, 6)

    def session(k: int) -> None:
        conns = {n: _as(hook, cluster[n][0], TOKEN, f"sess{k}") for n in ("alice", "bob")}
        try:
            for i in range(3):
                vals = {n: [torch.randint(-2 ** 40, 2 ** 40, shape, generator=gen) for _ in range(4)] for n in conns}
                ptrs = {n: [v.send(conns[n]) for v in vals[n]] for n in conns}  # (kept: a dropped one is freed)
                refs = {n: [_ref(p) for p in ptrs[n]] for n in conns}
                # an honest beaver round: e = sum(x - a), f = sum(y - b) at both parties
                round_id, ids = new_round(), {n: [new_id(), new_id()] for n in conns}
                errors = _party_round(hook, conns, {n: _beaver(refs[n], round_id, ["alice", "bob"], ids[n])
                                                    for n in conns})
                if errors:
                    problems.append((k, i, "honest", errors))
                else:
                    e = sum(vals[n][0] - vals[n][2] for n in conns)
                    f = sum(vals[n][1] - vals[n][3] for n in conns)
                    for n in conns:
                        got = [_get(hook, conns[n], oid, shape) for oid in ids[n]]
                        if not (torch.equal(got[0], e) and torch.equal(got[1], f)):
                            problems.append((k, i, "wrong opened values", n))
                # a round whose step raises at alice after the post (shapes that do not broadcast)
                seven = torch.zeros(7, dtype=torch.int64).send(conns["alice"])
                bad = _ref(seven)
                round_id, fids = new_round(), {n: [new_id(), new_id()] for n in conns}
                errors = _party_round(hook, conns, {
                    "alice": _beaver(refs["alice"][:2] + [bad, bad], round_id, ["alice", "bob"], fids["alice"]),
                    "bob": _beaver(refs["bob"], round_id, ["alice", "bob"], fids["bob"])})
                if set(errors) != {"alice", "bob"} or not any(w in str(errors["bob"]) for w in ("ended", "no peer")):
                    problems.append((k, i, "failing round", {n: str(e)[:160] for n, e in errors.items()}))
                # a top-bits truncation round: alice keeps c = sum(x + r), bob its packed top bits
                round_id, tids = new_round(), {n: [new_id()] for n in conns}
                errors = _party_round(hook, conns, {
                    n: PeerOpenMessage("trunc_mask", (refs[n][0], refs[n][2]), {}, round_id, ["alice", "bob"],
                                       tids[n], "top_bits") for n in conns})
                if errors:
                    problems.append((k, i, "top bits", {n: str(e)[:160] for n, e in errors.items()}))
                else:
                    c = sum(vals[n][0] + vals[n][2] for n in conns)
                    bits = pack_top_bits(c)
                    if not torch.equal(_get(hook, conns["alice"], tids["alice"][0], shape), c) or not torch.equal(
                            _get(hook, conns["bob"], tids["bob"][0], tuple(bits.shape), torch.uint8), bits):
                        problems.append((k, i, "wrong top bits"))
                a, b = torch.randint(-1000, 1000, shape, generator=gen), torch.randint(-1000, 1000, shape,
                                                                                       generator=gen)
                # (a product needs connections named as the parties know each other: the module's, shared)
                parties, cp = (cluster["alice"][1], cluster["bob"][1]), cluster["dave"][1]
                z = (a.share(*parties, crypto_provider=cp) * b.share(*parties, crypto_provider=cp)).get()
                if not torch.equal(z, a * b):
                    problems.append((k, i, "wrong product"))
        except BaseException as e:  # noqa: BLE001
            problems.append((k, "raised", type(e).__name__, str(e)[:300]))
        finally:
            for c in conns.values():
                c.close()

    threads = [threading.Thread(target=session, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 4 * JOIN
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"a session hung; so far: {problems}"
    assert not problems, problems
    _unchanged(cluster, stored)


def _answer(reply):
    return lambda ws, msg: ws.send(serialize(reply, sender="charlie"))


def _hang_up(ws, msg):
    ws.close()


def _late(values, seconds):
    def answer(ws, msg):
        time.sleep(seconds)
        ws.send(serialize(m.ObjectsReply(list(values)), sender="charlie"))
    return answer


def _not_yet_once(values):
    asked = []

    def answer(ws, msg):
        asked.append(msg)
        reply = m.OkReply() if len(asked) == 1 else m.ObjectsReply(list(values))
        ws.send(serialize(reply, sender="charlie"))
    return answer


@pytest.mark.parametrize("name, answer, match", [
    ("garbage", lambda ws, msg: ws.send(b"\xff\x00not a veil message" * 8), "(?i)charlie.*(malformed|serializ|decode)"),
    ("text frame", lambda ws, msg: ws.send("a text frame"), "(?i)text frame"),
    # a peer's error is its claim: bob reports it as charlie's (not as its own PermissionDeniedError), cut short
    ("error reply", _answer(m.ErrorReply("PermissionDeniedError", "charlie says no")),
     "(?i)peer 'charlie' refused round .*: PermissionDeniedError: charlie says no"),
    ("long error reply", _answer(m.ErrorReply("DPBudgetExceededError", "x" * 200_000)),
     "(?i)peer 'charlie' refused round .*: \\w+: x{300}\\.\\.\\.$"),
    ("an op's reply", _answer(m.ObjectsReply([1, "two", None])), "(?i)shapes and dtypes|values"),
    ("wrong dtype", _answer(m.ObjectsReply([torch.zeros(6, dtype=torch.float64)] * 2)), "(?i)shapes and dtypes"),
    ("huge", _answer(m.ObjectsReply([torch.zeros(1 << 21, dtype=torch.int64)] * 2)), "(?i)shapes and dtypes"),
    ("hang-up", _hang_up, "(?i)connection|lost|closed"),
])
def test_a_hostile_peers_answer_to_the_posted_fetch_fails_the_round_cleanly(hook, cluster, name, answer, match):
    """bob's round with charlie, who answers bob's fetch (posted before bob's step) with garbage, a text
    frame, an ErrorReply, an op's reply, values of the wrong dtype, 32 MB of them, or by closing the
    connection: bob's round fails at once with a clear error and stores nothing, and bob's next round with
    charlie opens that round's values (the link was read to the end of the bad answer, or reconnected)."""
    stored = _stored_before(cluster)
    bob = cluster["bob"][1]
    _connected(hook, cluster, "bob")
    x = torch.arange(6, dtype=torch.int64).send(bob)
    round_id, ids = new_round(), [new_id(), new_id()]
    REPLIES[round_id] = answer
    began = time.monotonic()
    with pytest.raises(VeilError, match=match) as raised:
        _within(lambda: hook.local_worker.send_msg(_beaver((_ref(x),) * 4, round_id, ["bob", "charlie"], ids), bob))
    if "error reply" in name:  # bob's PeerOpeningError (a RemoteExecutionError here), not charlie's claimed class
        assert type(raised.value) is RemoteExecutionError, type(raised.value)
    assert time.monotonic() - began < 10, f"{name}: bob waited {time.monotonic() - began:.1f} s"
    assert len(_fetches_of(round_id)) == 1, _fetches_of(round_id)  # the posted fetch; not asked again
    _absent(hook, bob, ids)
    _in_sync_with_charlie(hook, cluster, "bob")
    _unchanged(cluster, stored)


@pytest.mark.parametrize("how", ["late", "not yet once"])
def test_a_slow_peer_is_waited_for_and_its_own_answer_is_used(hook, cluster, how):
    """charlie answers bob's posted fetch 1.5 s late (the keepalive thread may read it meanwhile), or first
    "not yet" and then the values (bob asks again after the posted fetch): the round opens what charlie
    published plus bob's share, and the link stays in sync."""
    stored = _stored_before(cluster)
    _connected(hook, cluster, "bob")
    values = [torch.full((6,), 70, dtype=torch.int64)] * 2
    answer = _late(values, 1.5) if how == "late" else _not_yet_once(values)
    opened = _charlie_round(hook, cluster, "bob", answer)
    want = values[0] + torch.arange(6, dtype=torch.int64)
    assert all(torch.equal(o, want) for o in opened), opened
    _in_sync_with_charlie(hook, cluster, "bob", 1)
    _unchanged(cluster, stored)


def test_two_sessions_rounds_over_one_link_each_open_their_own_values(hook, cluster):
    """Two sessions at bob run rounds with charlie at once; charlie answers the first round's fetch (posted before
    bob's step) 1.5 s late, the second's at once. The second round's fetch goes over the same connection while
    the first's reply is owed (the link's send lock is taken only to post), and each round gets its own reply
    by its ticket, whichever thread reads it (replies come in request order; charlie's values differ per round):
    neither round opens the other's values, and the link stays in sync."""
    stored = _stored_before(cluster)
    _connected(hook, cluster, "bob")
    proc, first_conn = cluster["bob"]
    second_conn = _as(hook, proc, TOKEN, "second-session")
    values = {"first": [torch.full((6,), 300, dtype=torch.int64)] * 2,
              "second": [torch.full((6,), 400, dtype=torch.int64)] * 2}
    rounds, errors = {}, {}
    try:
        for name, conn in (("first", first_conn), ("second", second_conn)):
            x = torch.arange(6, dtype=torch.int64)
            xp, zp = x.send(conn), torch.zeros_like(x).send(conn)
            round_id, ids = new_round(), [new_id(), new_id()]
            REPLIES[round_id] = _late(values[name], 1.5) if name == "first" else values[name]
            thread = _start(hook, conn, _beaver((_ref(xp), _ref(xp), _ref(zp), _ref(zp)), round_id, ["bob", "charlie"],
                                                ids), errors, name)
            rounds[name] = (conn, round_id, ids, thread, xp, zp)
            if name == "first":  # its fetch is posted (charlie holds it) before the second round starts
                deadline = time.monotonic() + JOIN
                while not _fetches_of(round_id):
                    assert time.monotonic() < deadline, "bob never fetched from charlie"
                    time.sleep(0.01)
        as_charlie = _as(hook, proc, _peer_token("charlie"), "charlie")
        try:  # charlie takes bob's share of each round (each round waits for that)
            for name in rounds:
                assert all(torch.equal(t, torch.arange(6)) for t in _fetch(hook, as_charlie, rounds[name][1]))
        finally:
            as_charlie.close()
        _join(*(r[3] for r in rounds.values()))
        assert not errors, errors
        for name, (conn, _, ids, _, _, _) in rounds.items():
            want = values[name][0] + torch.arange(6, dtype=torch.int64)
            for oid in ids:
                got = _within(lambda c=conn, o=oid: sy.PointerTensor(c, o, hook.local_worker, (6,), torch.int64).get())
                assert torch.equal(got, want), (name, got, want)
    finally:
        second_conn.close()
    _in_sync_with_charlie(hook, cluster, "bob", 2)
    _unchanged(cluster, stored)
