"""Red team: secure aggregation rounds and encrypted serving, attacked from every seat.

Secure aggregation (veil/federated/secure_agg.py): a coordinator that lies about who dropped or forwards
public keys it made, a peer that deposits shares under another client's name, replays and reused round ids.
Serving (veil/serving/protocol.py): an owner that also holds a client session, malformed client requests.
Four tests were holes when a session-45 attacker wrote them (strict xfails then): clients accepted a
threshold that is no majority (inconsistent dropout views gave a coordinator both masks of one client);
they trusted the coordinator's key table (its own keys made every pair mask known to it); a peer deposited
shares under another client's name; and a serving batch mixed clients, so an owner with a client session
of its own received another client's input. Fixed: a majority threshold, keys checked against those the
clients deposited, a deposit only under the peer's own name (veil/federated/secure_agg.py), and one client
connection per claimed batch (veil/serving/protocol.py). Each test ends with the workers still answering.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import veil as sy
from veil.exceptions import VeilError
from veil.federated import secagg_crypto as sc
from veil.federated import secure_agg as sa
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.mpc.sharing import split
from veil.serving import protocol
from veil.serving.service import service_of
from veil.tensors import remote_ops
from veil.workers.registry import HookContext
from veil.workers.websocket_client import WebsocketClientWorker
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from serving_helpers import client_for, cluster  # noqa: E402,F401  (fixtures)
from server_sessions import open_session, request  # noqa: E402


def _call(name, args, w):
    return remote_ops.call(ALLOWLIST.by_name(f"veil.secagg.{name}"), args, {}, location=w)


def _clients(hook, prefix, n):
    workers = [sy.VirtualWorker(hook, id=f"{prefix}_{i}") for i in range(n)]
    plain = {w.id: torch.randn(6, dtype=torch.float64) for w in workers}
    return workers, [w.id for w in workers], plain, {w.id: [plain[w.id].send(w)] for w in workers}


def _decoded(v):
    return sa.decode(v, sa.ENCODING, dtype=torch.float64)[:6]


def _confirm_and_unmask(by_id, tag, told):
    """The consistency round run honestly on each client's own view ``told`` (id -> (survivors, dropped)):
    each confirms its survivor set, and gets the tags its survivors sent for it (zeros where one sent none),
    so an attack reaches its own step rather than the missing-confirm refusal. Returns the unmask answers."""
    confirmed = {i: (s, sa._fetch(_call("confirm", (tag, s), by_id[i]))) for i, (s, _) in told.items()}
    answers = {}
    for i, (survivors, dropped) in told.items():
        rows = [confirmed[v][1][confirmed[v][0].index(i)] if v in confirmed and i in confirmed[v][0]
                else torch.zeros(32, dtype=torch.int64) for v in survivors]
        answers[i] = sa._fetch(_call("unmask", (tag, survivors, dropped, torch.stack(rows)), by_id[i]))
    return answers


def _still_aggregates(hook, prefix):
    """An honest round on fresh workers still returns the exact sum."""
    workers, ids, plain, ptrs = _clients(hook, prefix, 3)
    total = sa.secure_sum(ptrs, {i: 1.0 for i in ids}, tag=int(new_id()))
    torch.testing.assert_close(total[0], sum(plain.values()), atol=1e-5, rtol=0)


# ================================================================== secure aggregation: coordinator lies


def test_inconsistent_dropout_views_with_a_low_threshold_do_not_reveal_one_update(hook):
    """n=4, t=2 (the worker accepts any 2 <= t <= n). Client 0 and 1 are told the survivors are {0, 1};
    clients 2 and 3 that 1 dropped. Each client answers unmask once and never names one client in both
    lists, yet the coordinator gets b_0 from {0, 1} and sk_1 from {2, 3}: y_0 - PRG(b_0) - PRG(s_01) = x_0."""
    workers, ids, plain, ptrs = _clients(hook, "rt_lowt", 4)
    by_id = dict(zip(ids, workers))
    c0, c1, c2, c3 = ids
    tag = 9_100_001
    recovered, refusal = None, ""
    try:
        pks = torch.stack([_call("advertise", (tag, 4, 2), w).get() for w in workers])
        for w in workers:
            _call("share_keys", (tag, ids, pks), w)
        views = {c0: [c0, c1], c1: [c0, c1], c2: [c1, c2, c3], c3: [c1, c2, c3]}
        y0 = None
        for w in workers:
            y = _call("masked_input", (tag, views[w.id], ptrs[w.id], 1.0, None), w).get()
            y0 = y if w.id == c0 else y0
        # two groups of t = 2 each confirm their own set: the consistency round cannot tell them apart
        ans = _confirm_and_unmask(by_id, tag, {c0: ([c0, c1], []), c1: ([c0, c1], []), c2: ([c2, c3], [c1]),
                                               c3: ([c2, c3], [c1])})
        b0 = sc.reconstruct({1: sc.from_tensor(ans[c0][0][:1])[0], 2: sc.from_tensor(ans[c1][0][:1])[0]})
        sk1 = sc.reconstruct({3: sc.from_tensor(ans[c2][1][:1])[0], 4: sc.from_tensor(ans[c3][1][:1])[0]})
        k = y0.numel()
        recovered = _decoded(y0 - sc.expand(b0, k) - sc.expand(sc.pair_seed(sk1, sc.tensor_bytes(pks[0]), tag), k))
    except VeilError as e:
        refusal = str(e)
    finally:
        _still_aggregates(hook, "rt_lowt_after")
    assert recovered is None or not torch.allclose(recovered, plain[c0], atol=1e-5)
    assert "must be a majority" in refusal, refusal  # refused by its own check, at share_keys


def test_a_forged_public_key_table_does_not_reveal_one_update_at_a_majority_threshold(hook):
    """n=3, t=2 (the default majority). Client 0 receives a table whose other keys the coordinator made;
    only its own row is checked. Its pair masks are then X25519(sk_fake, pk_0), and an honest unmask
    (everyone survived) hands over b_0: x_0 in the clear. The peers' deposits travel on authenticated
    links, so a key carried with them would let a client check the table."""
    workers, ids, plain, ptrs = _clients(hook, "rt_forge", 3)
    tag = 9_100_002
    recovered, refusal = None, ""
    try:
        pks = torch.stack([_call("advertise", (tag, 3, 2), w).get() for w in workers])
        fake = sc.new_private_key()
        fake_pub = sc.bytes_tensor(sc.public_bytes(fake))
        _call("share_keys", (tag, ids, torch.stack([pks[0], fake_pub, fake_pub])), workers[0])
        for w in workers[1:]:
            _call("share_keys", (tag, ids, pks), w)
        y = {w.id: _call("masked_input", (tag, ids, ptrs[w.id], 1.0, None), w).get() for w in workers}
        ans = _confirm_and_unmask(dict(zip(ids, workers)), tag, {i: (ids, []) for i in ids})  # honest from here
        b0 = sc.reconstruct({1: sc.from_tensor(ans[ids[0]][0][:1])[0], 2: sc.from_tensor(ans[ids[1]][0][:1])[0]})
        k = y[ids[0]].numel()
        pair = sc.expand(sc.pair_seed(sc.private_bytes(fake), sc.tensor_bytes(pks[0]), tag), k)
        recovered = _decoded(y[ids[0]] - sc.expand(b0, k) - pair - pair)  # 0 < 1, 0 < 2: both pair masks added
    except VeilError as e:
        refusal = str(e)
    finally:
        _still_aggregates(hook, "rt_forge_after")
    assert recovered is None or not torch.allclose(recovered, plain[ids[0]], atol=1e-5)
    assert "not the one its client deposited" in refusal, refusal  # refused by its own check, at masked_input


# ================================================================== secure aggregation: network roles


def _server(hook, wid):
    tokens = sy.TokenTable()
    tokens.add("rt-coordinator-tok", "coord", "scientist")
    tokens.add("rt-other-sci-tok", "other", "scientist")
    tokens.add("rt-peer-mallory", "mallory", "peer")
    tokens.add("rt-peer-victim0", "victim", "peer")
    tokens.add("rt-client-token", "client", "client")
    srv = WebsocketServerWorker(hook, id=wid, port=0, tokens=tokens)
    return srv, {name: open_session(srv, tok) for name, tok in (
        ("coord", "rt-coordinator-tok"), ("other", "rt-other-sci-tok"), ("mallory", "rt-peer-mallory"),
        ("victim", "rt-peer-victim0"), ("client", "rt-client-token"))}


def _fn(srv, sess, name, *args):
    return request(srv, sess, m.CommandMessage(f"veil.secagg.{name}", args, {}, [new_id()], False))


def test_a_peer_cannot_deposit_shares_under_another_clients_name(hook):
    srv, s = _server(hook, "rt_dep_srv")
    tag = 9_100_003
    assert type(_fn(srv, s["coord"], "advertise", tag, 3, 2)) is m.OkReply
    planted = torch.zeros(1, sc.SHARE_BYTES, dtype=torch.int64)
    key = torch.arange(32, dtype=torch.int64)
    spoof = _fn(srv, s["mallory"], "deposit", tag, "coord", "victim", planted, planted, key)
    real = torch.ones(1, sc.SHARE_BYTES, dtype=torch.int64)
    honest = _fn(srv, s["victim"], "deposit", tag, "coord", "victim", real, real, key)
    held = srv.__dict__["_secagg_rounds"][("coord", tag)].held
    assert type(honest) is m.OkReply, honest  # the real client's share is taken
    assert torch.equal(held["victim"][0], real)
    assert type(spoof) is m.ErrorReply


def test_only_the_coordinator_drives_a_round_and_other_seats_are_refused(hook):
    """Another scientist, a peer and a serving client try every stage of the coordinator's round on a
    network worker's request path: refused (the client before any handler), and the round goes on."""
    srv, s = _server(hook, "rt_roles_srv")
    tag = 9_100_004
    assert type(_fn(srv, s["coord"], "advertise", tag, 2, 2)) is m.OkReply
    fake = torch.zeros(1, sc.SHARE_BYTES, dtype=torch.int64)
    tries = [("share_keys", (tag, [srv.id, "x"], torch.zeros(2, 32, dtype=torch.int64))),
             ("masked_input", (tag, [srv.id, "x"], [torch.ones(3)], 1.0, None)),
             ("unmask", (tag, [srv.id, "x"], [])), ("discard", (tag,)), ("advertise", (tag, 2, 2))]
    for who in ("other", "mallory", "client"):
        for name, args in tries:
            reply = _fn(srv, s[who], name, *args)
            if who == "other" and name in ("advertise", "discard"):
                continue  # its own separate round / a silent no-op
            assert type(reply) is m.ErrorReply, (who, name, reply)
            assert any(t in reply.message for t in ("no secure-aggregation round", "may only")), reply
        client_dep = _fn(srv, s["client"], "deposit", tag, "coord", "x", fake, fake)
        assert type(client_dep) is m.ErrorReply
    state = srv.__dict__["_secagg_rounds"][("coord", tag)]
    assert state.masked_with is None and not state.ids  # nobody moved the coordinator's round on
    assert type(_fn(srv, s["coord"], "discard", tag)) is m.OkReply
    assert ("coord", tag) not in srv.__dict__["_secagg_rounds"]


def test_replays_reused_tags_and_short_survivor_sets_are_refused(hook):
    workers, ids, plain, ptrs = _clients(hook, "rt_replay", 3)
    tag = 9_100_005
    pks = torch.stack([_call("advertise", (tag, 3, 2), w).get() for w in workers])
    with pytest.raises(Exception, match="not fresh"):  # advertise replayed while the round lives
        _call("advertise", (tag, 3, 2), workers[0]).get()
    for w in workers:
        _call("share_keys", (tag, ids, pks), w)
    with pytest.raises(Exception, match="needs this worker"):  # share_keys replayed (new keys would re-share)
        _call("share_keys", (tag, ids, pks), workers[0])
    with pytest.raises(Exception, match="refused"):  # below the threshold
        _call("masked_input", (tag, ids[:1], ptrs[ids[0]], 1.0, None), workers[0]).get()
    with pytest.raises(Exception, match="refused"):  # a survivor outside U1
        _call("masked_input", (tag, [ids[0], "ghost"], ptrs[ids[0]], 1.0, None), workers[0]).get()
    y = {w.id: _call("masked_input", (tag, ids, ptrs[w.id], 1.0, None), w).get() for w in workers}
    with pytest.raises(Exception, match="refused"):  # a second masked input with fewer pair masks
        _call("masked_input", (tag, ids[:2], ptrs[ids[0]], 1.0, None), workers[0]).get()
    with pytest.raises(Exception, match="refused"):  # a client that submitted, named as dropped, by itself
        sa._fetch(_call("unmask", (tag, ids[1:], [ids[0]]), workers[0]))
    with pytest.raises(Exception, match="refused"):  # survivors and dropped must cover what it masked with
        sa._fetch(_call("unmask", (tag, ids[:2], []), workers[0]))
    tags = {w.id: sa._fetch(_call("confirm", (tag, ids), w)) for w in workers}  # (the consistency round)
    ans = {w.id: sa._fetch(_call("unmask", (tag, ids, [], sa.secagg_confirm.for_client(tags, ids, w.id)), w))
           for w in workers}
    with pytest.raises(Exception, match="no secure-aggregation round"):  # unmask replayed
        sa._fetch(_call("unmask", (tag, ids[:2], [ids[2]]), workers[0]))
    pubs = {w: sc.tensor_bytes(pks[i]) for i, w in enumerate(ids)}
    total = _decoded(sa._recover(y, ans, ids, ids, [], pubs, 2, 8, tag))
    torch.testing.assert_close(total, sum(plain.values()), atol=1e-5, rtol=0)
    # the tag reused after the round ended: fresh keys and seeds, nothing of the old round
    again = torch.stack([_call("advertise", (tag, 3, 2), w).get() for w in workers])
    assert not any(torch.equal(again[i], pks[i]) for i in range(3))
    assert all(workers[0].__dict__["_secagg_rounds"][k].held == {} for k in workers[0].__dict__["_secagg_rounds"])
    for w in workers:
        _call("discard", (tag,), w)
    assert all(not w.__dict__.get("_secagg_rounds") for w in workers)


# ================================================================== serving


def _raw(cluster, worker, token):
    ctx = HookContext()
    return ctx, WebsocketClientWorker(ctx, id=worker.id, host=worker.host, port=worker.port, token=token)


def _shared(cluster, name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        expected = model(torch.ones(1, 4))
    model.share(cluster, name=name)
    return model, expected


def _honest_query(cluster, client_for, model, name, expected):
    model.serve(background=True)
    try:
        honest = client_for(cluster, (1, 4), (1, 2), name=name, timeout=30)
        assert torch.allclose(honest.query_model(torch.ones(1, 4)), expected, atol=1e-2)
    finally:
        model.stop()


def test_an_owner_with_a_client_session_cannot_read_a_batch_neighbours_input(cluster, client_for):
    """The owner (it made the client token, or colludes with any client) submits its own request, claims it in
    one batch with the victim's, and responds with the claimed input batch itself, all rows to its own id.
    release_output only checks that the recipient is among the batch's clients."""
    name = "rt-mix"
    model, expected = _shared(cluster, name)
    service = service_of(model)
    conns = []
    stolen = None
    try:
        victim = [_raw(cluster, p, cluster.client_token) for p in cluster.parties]
        mole = [_raw(cluster, p, cluster.client_token) for p in cluster.parties]
        conns = [w for _, w in victim + mole]
        secret = torch.tensor([[1111, -2222, 3333, 4444]], dtype=torch.int64)
        rv, rm = new_id(), new_id()
        for (ctx, w), share in zip(victim, split(secret, len(cluster.parties))):
            protocol.call(ctx.local_worker, w, "submit", name, rv, share)
        for ctx, w in mole:
            protocol.call(ctx.local_worker, w, "submit", name, rm, torch.zeros(1, 4, dtype=torch.int64))
        oids = [new_id() for _ in service.parties]
        claimed = service._call_all("claim", [[[rv, rm], oid] for oid in oids], return_errors=True)
        try:
            assert not any(isinstance(c, BaseException) for c in claimed), claimed
            service._call_all("respond", [[[rm, rv], [2, 0], m.ObjectRef(oid)] for oid in oids])
            pieces = [protocol.call(ctx.local_worker, w, "fetch", name, rm)[0] for ctx, w in mole]
            stolen = sum(pieces)
        except Exception:  # noqa: BLE001  (refused: the secure outcome)
            assert all("one client session" in str(c) for c in claimed), claimed  # refused at the claim
            service._call_all("fail", [[[rv, rm], "refused"] for _ in oids], return_errors=True)
    finally:
        for w in conns:
            w.close()
        _honest_query(cluster, client_for, model, name, expected)
    assert stolen is None or not any(torch.equal(row, secret[0]) for row in stolen)


def test_malformed_client_requests_fail_alone_and_the_cluster_still_serves(cluster, client_for):
    """A client token sends wrong dtypes, shapes, nested payloads, odd ids and zero-row requests; reaches for
    the weights and other messages; the owner's loop answers or refuses each, and an honest query works."""
    name = "rt-malformed"
    model, expected = _shared(cluster, name)
    service = service_of(model)
    ctx, party = _raw(cluster, cluster.parties[0], cluster.client_token)
    send = ctx.local_worker.send_msg
    try:
        bad = [[new_id(), torch.zeros(1, 4)],                              # float
               [new_id(), torch.zeros(1, 5, dtype=torch.int64)],           # wrong width
               [new_id(), torch.zeros(65, 4, dtype=torch.int64)],          # over max_rows
               [new_id(), torch.tensor(3, dtype=torch.int64)],             # a scalar
               [new_id(), [[torch.zeros(1, 4, dtype=torch.int64)]]],       # nested payload
               [True, torch.zeros(1, 4, dtype=torch.int64)],               # a bool id
               [new_id()], [new_id(), torch.zeros(1, 4, dtype=torch.int64), 3]]
        for args in bad:
            with pytest.raises(Exception):
                send(protocol.ServingMessage("submit", name, args), party)
        for args in ([[1, 2]], ["x"], [new_id(), 5.0], []):  # fetch: odd ids, over-long waits
            with pytest.raises(Exception):
                send(protocol.ServingMessage("fetch", name, args), party)
        weight = next(iter(model.parameters())).child.child[party.id].id_at_location
        for msg in (m.GetObjectsMessage([weight]), protocol.ServingMessage("pending", name, []),
                    protocol.ServingMessage("claim", name, [[1], new_id()]),
                    m.CommandMessage("veil.secagg.advertise", (1, 2, 2), {}, [new_id()], False)):
            with pytest.raises(Exception, match="client token may only"):
                send(msg, party)
        assert service.step(4) == 0  # nothing malformed was queued
    finally:
        party.close()
    # a zero-row request is computed alone and answered with zero rows at every party
    raws = [_raw(cluster, p, cluster.client_token) for p in cluster.parties]
    try:
        rid = new_id()
        for c, w in raws:
            protocol.call(c.local_worker, w, "submit", name, rid, torch.zeros(0, 4, dtype=torch.int64))
        assert service.step(4) == 1
        for c, w in raws:
            assert protocol.call(c.local_worker, w, "fetch", name, rid)[0].shape == (0, 2)
    finally:
        for _, w in raws:
            w.close()
    _honest_query(cluster, client_for, model, name, expected)
